"""ONNX export (``python -m models.export_onnx``) and the onnxruntime captioner (``models.onnx_generate``).

Every graph reloaded in onnxruntime gives PyTorch's outputs within 1e-4 (fp32) at batch sizes and lengths other
than the traced ones; captioning on onnxruntime gives the same greedy and beam tokens as ``BLIP_Decoder``;
a checkpoint without keys its task needs is refused, naming them. Tiny models; the caption model has a vision
tower wider than its text side (48 vs 32, as ViT-L's 1024 vs 768) at 48 px (not the default size)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

from models.blip import BLIP_Base, BLIP_Decoder  # noqa: E402
from models.blip_itm import BLIP_ITM  # noqa: E402
from models.export_onnx import main as export_main  # noqa: E402
from models.generation import generate  # noqa: E402
from models.onnx_generate import OnnxCaptioner, main as caption_main  # noqa: E402
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT, WIDE_VIT, randomize, save_tiny as save  # noqa: E402

SEP = 102
TOL = 1e-4


def session(folder, name):
    return ort.InferenceSession(str(folder / f'{name}.onnx'), providers=['CPUExecutionProvider'])


def images(B, size, seed=0):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a) - b).abs().max())


@pytest.fixture(scope='module')
def caption_export(module_dir):
    """A captioner whose vocabulary has few live words and a [SEP] that competes: beams collide and end early."""
    folder = module_dir('onnx_caption')
    ours = randomize(BLIP_Decoder(med_config=dict(TINY_MED), image_size=48, vit=dict(WIDE_VIT)))
    with torch.no_grad():
        bias = ours.text_decoder.cls.predictions.bias
        bias.fill_(-30)
        bias[1000:1030] = 0
        bias[SEP] = 0.0
    export_main([str(save(ours, folder / 'caption.pth', WIDE_VIT, 48)), str(folder / 'onnx'), '--task', 'caption'])
    return ours, folder / 'onnx'


def test_caption_graphs_match_pytorch_at_other_shapes(caption_export):
    ours, folder = caption_export
    manifest = json.loads((folder / 'export.json').read_text())
    assert manifest['opset'] == 18 and set(manifest['files']) == {'image_encoder', 'decoder_cross_kv', 'decoder_step'}
    assert all(v <= TOL for v in manifest['max_abs_diff_vs_pytorch'].values())
    image = images(3, 48, seed=5)  # traced with 2 images
    (embeds,) = session(folder, 'image_encoder').run(None, {'pixel_values': image.numpy()})
    cross_k, cross_v = session(folder, 'decoder_cross_kv').run(None, {'image_embeds': embeds})
    dec = ours.text_decoder
    with torch.no_grad():
        ref_embeds = ours.visual_encoder(image)
        ref_kv = dec.bert.precompute_cross_kv(ref_embeds)
    assert max_diff(embeds, ref_embeds) < TOL
    assert max_diff(cross_k, torch.stack([k for k, _ in ref_kv])) < TOL
    # prompt (empty cache, 5 tokens), then one token, 4 rows per image (traced with 2, 3 tokens, cache 2)
    step = session(folder, 'decoder_step')
    ids = torch.randint(1000, 1006, (12, 6), generator=torch.Generator().manual_seed(0))
    empty = np.zeros((2, 12, 2, 0, 16), np.float32)
    logits, pk, pv = step.run(None, {'input_ids': ids[:, :5].numpy(), 'past_k': empty, 'past_v': empty,
                                     'cross_k': cross_k, 'cross_v': cross_v})
    logits2, pk2, _ = step.run(None, {'input_ids': ids[:, 5:].numpy(), 'past_k': pk, 'past_v': pv,
                                      'cross_k': cross_k, 'cross_v': cross_v})
    assert pk2.shape == (2, 12, 2, 6, 16)
    with torch.no_grad():
        full = dec(ids, encoder_hidden_states=ref_embeds.repeat_interleave(4, 0)).logits
    assert max_diff(logits, full[:, 4]) < TOL and max_diff(logits2, full[:, 5]) < TOL


@pytest.mark.parametrize('B,num_beams', [(3, 1), (3, 3), (1, 3)])
def test_onnxruntime_captions_have_pytorchs_tokens(caption_export, B, num_beams):
    ours, folder = caption_export
    captioner = OnnxCaptioner(folder, threads=1)
    image = images(B, 48, seed=10 + B)
    kwargs = dict(num_beams=num_beams, max_length=14, min_length=5)
    got = captioner.generate_ids(image.numpy(), **kwargs)
    with torch.no_grad():
        want = generate(ours.text_decoder, ours.prompt_ids(B, 'cpu'), ours.visual_encoder(image),
                        eos_token_id=SEP, pad_token_id=0, **kwargs)
    assert got.tolist() == want.tolist()
    if B == 3:  # not vacuous: captions differ per image, some end before max_length, beams get reordered
        assert len({tuple(r) for r in want.tolist()}) == B and (want == SEP).any()
    assert captioner.generate(image.numpy(), **kwargs) == ours.generate(image, **kwargs)


def test_onnx_generate_cli_captions_an_image_file(caption_export, tmp_path, capsys):
    ours, folder = caption_export
    path = tmp_path / 'im.png'
    Image.fromarray((torch.rand(60, 70, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy()).save(path)
    captions = caption_main([str(folder), str(path), '--threads', '1', '--max-length', '12', '--no-spin'])
    from predict import load_image
    with torch.no_grad():
        want = ours.generate(load_image(str(path), 48, 'cpu'), num_beams=3, max_length=12, min_length=5)
    assert captions == want and json.loads(capsys.readouterr().out.strip())['caption'] == want[0]


# ------------------------------------------------------------------------------------------ feature / itm

CAPTIONS = ['a dog on a red sofa', 'two people', 'a very long caption about a bicycle leaning on a wall']


def test_itm_export_scores_and_features_match_pytorch(tmp_path):
    ours = randomize(BLIP_ITM(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT)), seed=1)
    export_main([str(save(ours, tmp_path / 'itm.pth', TINY_VIT, TINY_IMAGE)), str(tmp_path / 'onnx'), '--task', 'itm'])
    folder = tmp_path / 'onnx'
    image = images(3, TINY_IMAGE, seed=2)
    text = ours.tokenizer(CAPTIONS, padding='max_length', truncation=True, max_length=35, return_tensors='pt')
    embeds, image_feat = session(folder, 'image_encoder').run(None, {'pixel_values': image.numpy()})
    _, text_feat = session(folder, 'text_encoder').run(None, {'input_ids': text.input_ids.numpy(),
                                                                'attention_mask': text.attention_mask.numpy()})
    ids = text.input_ids.clone()
    ids[:, 0] = ours.tokenizer.enc_token_id
    (itm,) = session(folder, 'itm').run(None, {'input_ids': ids.numpy(), 'attention_mask': text.attention_mask.numpy(),
                                                'image_embeds': embeds})
    with torch.no_grad():
        assert max_diff(itm, ours(image, CAPTIONS, match_head='itm')) < TOL
        assert max_diff(image_feat @ text_feat.T, ours(image, CAPTIONS, match_head='itc')) < TOL


def test_feature_export_of_a_model_without_projections(tmp_path):
    ours = randomize(BLIP_Base(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT)), seed=2)
    export_main([str(save(ours, tmp_path / 'base.pth', TINY_VIT, TINY_IMAGE)), str(tmp_path / 'onnx'),
                 '--task', 'feature'])
    folder = tmp_path / 'onnx'
    image = images(1, TINY_IMAGE, seed=3)
    outs = session(folder, 'image_encoder').run(None, {'pixel_values': image.numpy()})
    text = ours.tokenizer(CAPTIONS, padding=True, return_tensors='pt')  # 3 texts, another length than traced
    (text_embeds,) = session(folder, 'text_encoder').run(None, {'input_ids': text.input_ids.numpy(),
                                                                'attention_mask': text.attention_mask.numpy()})
    with torch.no_grad():
        assert len(outs) == 1 and max_diff(outs[0], ours(image, '', mode='image')) < TOL
        ref = ours.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text').last_hidden_state
        assert max_diff(text_embeds, ref) < TOL


def test_export_of_a_checkpoint_with_missing_keys_is_refused_naming_them(tmp_path):
    ours = BLIP_ITM(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT))
    gone = ['itm_head.weight', 'text_encoder.encoder.layer.0.crossattention.self.value.bias']
    save(ours, tmp_path / 'broken.pth', drop=gone)
    with pytest.raises(SystemExit) as e:
        export_main([str(tmp_path / 'broken.pth'), str(tmp_path / 'onnx'), '--task', 'itm'])
    assert 'lacks 2 key(s)' in str(e.value) and all(k in str(e.value) for k in gone)
    assert not (tmp_path / 'onnx').exists()
    with pytest.raises(SystemExit, match='no text_decoder weights'):
        export_main([str(tmp_path / 'broken.pth'), str(tmp_path / 'onnx'), '--task', 'caption'])
