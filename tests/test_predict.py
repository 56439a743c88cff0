"""predict.py: one image, three tasks, model settings read from the checkpoint's config, clear errors."""
import json

import pytest
import torch
from PIL import Image

import predict
from models.blip import blip_decoder
from models.blip_itm import blip_itm
from models.blip_vqa import blip_vqa
from models.checkpoint import CheckpointError
from tests.tiny import TINY_MED

# what a toy run of this project's scripts saves in its checkpoint's 'config' entry (other keys omitted)
TOY = {'vit': 'tiny', 'image_size': 32, 'med_config': 'configs/toy/med_config.json', 'batch_size': 8}


def save(model, path, config=TOY):
    torch.save({'model': model.state_dict(), **({'config': config} if config else {})}, path)
    return str(path)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / 'shapes.jpg'
    pixels = torch.randint(0, 256, (40, 56, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return str(path)


def model_settings():
    return {k: TOY[k] for k in predict.MODEL_KEYS}


def test_caption_uses_the_checkpoints_settings_and_matches_the_model(tmp_path, image, capsys):
    torch.manual_seed(0)
    model = blip_decoder(**model_settings()).eval()
    ckpt = save(model, tmp_path / 'caption.pth')
    result = predict.main(['--task', 'caption', '--image', image, '--checkpoint', ckpt, '--device', 'cpu'])
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1]) == result
    assert "settings from the checkpoint's config" in out.err
    with torch.no_grad():
        expected = model.generate(predict.load_image(image, 32, 'cpu'), num_beams=3, max_length=20, min_length=5)[0]
    assert result == {'caption': expected}


def test_vqa_and_itm_run_on_their_checkpoints(tmp_path, image):
    torch.manual_seed(0)
    vqa = save(blip_vqa(**model_settings()), tmp_path / 'vqa.pth')
    answer = predict.main(['--task', 'vqa', '--image', image, '--checkpoint', vqa, '--question', 'what colour?',
                           '--device', 'cpu'])
    assert answer['question'] == 'what colour?' and isinstance(answer['answer'], str)
    itm = save(blip_itm(**model_settings()), tmp_path / 'itm.pth')
    match = predict.main(['--task', 'itm', '--image', image, '--checkpoint', itm, '--caption', 'a red circle',
                          '--device', 'cpu'])
    assert 0.0 <= match['itm_match_probability'] <= 1.0 and -1.0 <= match['itc_cosine'] <= 1.0


def test_flags_override_the_checkpoint_and_a_mismatch_names_the_keys(tmp_path, image):
    torch.manual_seed(0)
    model = blip_decoder(**model_settings()).eval()
    plain = save(model, tmp_path / 'plain.pth', config=None)           # no config entry: flags are needed
    result = predict.predict('caption', image, plain, vit='tiny', image_size=48, med_config=TOY['med_config'])
    assert isinstance(result['caption'], str)                         # 48 px: position embeddings interpolated
    narrower = dict(TINY_MED, encoder_width=64)                        # a 32-wide MED where the toy one is 64
    with pytest.raises(CheckpointError, match=r'(?s)shape mismatch .*checkpoint \(64,\) vs model \(32,\)') as e:
        predict.predict('caption', image, save(model, tmp_path / 'toy.pth'), med_config=narrower)
    lines = str(e.value).splitlines()                                 # 61 keys differ: the first 8 are listed
    assert 'check vit, image_size and med_config' in lines[0] and len(lines) == 10 and '53 more' in lines[-1]


def test_unreadable_image_is_a_one_line_error(tmp_path):
    bad = tmp_path / 'not_an_image.jpg'
    bad.write_text('hello')
    with pytest.raises(SystemExit, match='cannot read image .*not_an_image.jpg'):
        predict.load_image(str(bad), 32, 'cpu')


def test_decompression_bomb_is_a_one_line_error(tmp_path):
    """A PNG whose header claims 30000 x 30000 pixels: PIL refuses it, predict.py says so without a traceback."""
    import struct
    import zlib
    small = tmp_path / 'small.png'
    Image.new('RGB', (4, 4)).save(small)
    data = bytearray(small.read_bytes())
    ihdr = struct.pack('>II', 30000, 30000) + bytes(data[24:29])  # width, height, then depth/colour/... as saved
    data[16:29] = ihdr
    data[29:33] = struct.pack('>I', zlib.crc32(b'IHDR' + ihdr))
    bomb = tmp_path / 'bomb.png'
    bomb.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r'cannot read image .*bomb\.png: .*pixels'):
        predict.load_image(str(bomb), 32, 'cpu')
