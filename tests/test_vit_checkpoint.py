"""ViT presets and grad checkpointing; checkpoint loading: safety, remaps, reporting, URLs."""
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import checkpoint as ckpt
from models.blip import BLIP_Decoder, blip_decoder, load_checkpoint
from models.vit import create_vit, interpolate_pos_embed
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT

REF = Path(__file__).parent / 'reference_keys'


def vit_reference(name='decoder'):
    rows = [line.rstrip('\n').split('\t') for line in open(REF / f'{name}.txt') if not line.startswith('#')]
    return {k[len('visual_encoder.'):]: v for k, v, _ in rows if k.startswith('visual_encoder.')}


def test_vit_base_keys_equal_original_and_large_sizes():
    with torch.device('meta'):
        base, width = create_vit('base', 224)
        large, large_width = create_vit('large', 384)
    assert {k: str(list(v.shape)) for k, v in base.state_dict().items()} == vit_reference()
    assert (width, large_width) == (768, 1024)
    assert len(large.blocks) == 24 and large.pos_embed.shape == (1, 577, 1024)
    assert large.blocks[0].attn.qkv.weight.shape == (3072, 1024)


def test_vit_large_always_uses_drop_path_01_like_the_original():
    with torch.device('meta'):
        large, _ = create_vit('large', 224, drop_path_rate=0)
    assert abs(large.blocks[-1].drop_path1.drop_prob - 0.1) < 1e-6


def test_vit_returns_all_tokens_and_checkpointing_changes_nothing():
    torch.manual_seed(0)
    plain, _ = create_vit(TINY_VIT, 32)
    ckpt_vit, _ = create_vit(TINY_VIT, 32, use_grad_checkpointing=True, ckpt_layer=1)
    ckpt_vit.load_state_dict(plain.state_dict())
    assert set(ckpt_vit.state_dict()) == set(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out_a, out_b = plain(x), ckpt_vit(x)
    assert out_a.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(out_a, out_b)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt_vit.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_interpolate_pos_embed_matches_bicubic_with_cls_kept():
    vit, _ = create_vit(TINY_VIT, 64)                  # 8x8 grid
    old = torch.randn(1, 1 + 16, 32)                   # 4x4 grid
    new = interpolate_pos_embed(old, vit)
    grid = old[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode='bicubic', align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, 32)
    assert new.shape == (1, 65, 32)
    torch.testing.assert_close(new[:, :1], old[:, :1])
    torch.testing.assert_close(new[:, 1:], expected)
    assert interpolate_pos_embed(new, vit) is new


def tiny_decoder(image_size=TINY_IMAGE):
    return BLIP_Decoder(med_config=dict(TINY_MED), image_size=image_size, vit=TINY_VIT).eval()


def save(tmp_path, state_dict, name='ckpt.pth'):
    path = tmp_path / name
    torch.save({'model': state_dict, 'epoch': 3}, path)
    return str(path)


def test_round_trip_loads_every_key(tmp_path):
    torch.manual_seed(0)
    src = tiny_decoder()
    dst = tiny_decoder()
    model, msg = load_checkpoint(dst, save(tmp_path, src.state_dict()))
    assert model is dst and msg.missing_keys == [] and msg.unexpected_keys == []
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, msg=k)


def test_unused_keys_are_dropped_and_reported_missing_keys_are_errors_for_the_decoder(tmp_path):
    sd = tiny_decoder().state_dict()
    sd['text_encoder.some.weight'] = torch.zeros(2)
    _, msg = load_checkpoint(tiny_decoder(), save(tmp_path, sd))
    assert msg.unexpected_keys == ['text_encoder.some.weight']
    del sd['text_decoder.cls.predictions.transform.dense.weight']
    path = save(tmp_path, sd, 'partial.pth')
    with pytest.raises(ckpt.CheckpointError, match='transform.dense.weight'):
        blip_decoder(pretrained=path, med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=TINY_VIT)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    sd = tiny_decoder().state_dict()
    sd['text_decoder.cls.predictions.transform.dense.weight'] = torch.zeros(5, 32)
    with pytest.raises(ckpt.CheckpointError, match=r'transform\.dense\.weight: checkpoint \(5, 32\) vs model \(32, 32\)'):
        load_checkpoint(tiny_decoder(), save(tmp_path, sd))


def test_pos_embed_is_resized_for_another_image_size(tmp_path):
    src = tiny_decoder(32)
    dst = tiny_decoder(64)
    _, msg = load_checkpoint(dst, save(tmp_path, src.state_dict()))
    assert msg.missing_keys == []
    expected = interpolate_pos_embed(src.visual_encoder.pos_embed.detach(), dst.visual_encoder)
    torch.testing.assert_close(dst.visual_encoder.pos_embed.detach(), expected)


class _Exploit:
    def __reduce__(self):
        return (os.system, ('touch pwned_marker',))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        torch.save({'model': {}, 'payload': _Exploit()}, f)
    with pytest.raises(ckpt.CheckpointError, match='refused'):
        load_checkpoint(tiny_decoder(), str(path))
    assert not (tmp_path / 'pwned_marker').exists()


def test_missing_file_and_garbage_file_are_clear_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match='invalid'):
        load_checkpoint(tiny_decoder(), str(tmp_path / 'nope.pth'))
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ckpt.CheckpointError, match='junk.pth'):
        load_checkpoint(tiny_decoder(), str(tmp_path / 'junk.pth'))


def test_path_objects_load_and_a_model_entry_that_is_no_state_dict_is_a_clear_error(tmp_path):
    from engine.checkpoint_io import load_training_state
    src = tiny_decoder()
    model, msg = load_checkpoint(tiny_decoder(), Path(save(tmp_path, src.state_dict())))
    assert msg.missing_keys == []
    torch.save({'model': [1, 2], 'epoch': 0}, tmp_path / 'list.pth')
    with pytest.raises(ckpt.CheckpointError, match=r"list.pth: checkpoint\['model'\] is a list"):
        load_checkpoint(tiny_decoder(), tmp_path / 'list.pth')
    with pytest.raises(ckpt.CheckpointError, match=r"list.pth: checkpoint\['model'\] is a list"):
        load_training_state(tmp_path / 'list.pth', tiny_decoder(), None)


def test_url_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    src = tiny_decoder()
    local = save(tmp_path, src.state_dict(), 'model_base_caption.pth')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        Path(dst).write_bytes(Path(local).read_bytes())

    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake_download)
    url = 'https://example.invalid/BLIP/models/model_base_caption.pth'
    for _ in range(2):
        _, msg = load_checkpoint(tiny_decoder(), url)
        assert msg.missing_keys == []
    assert calls == [url]
    assert (tmp_path / 'hub' / 'checkpoints' / 'model_base_caption.pth').exists()
    _, msg = load_checkpoint(tiny_decoder(), 'file://' + local)
    assert msg.missing_keys == []


def test_vit_dict_with_a_wrong_key_is_a_clear_error():
    with pytest.raises(ValueError, match=r"missing \['patch_size'\], unknown \['patch_sise'\]"):
        create_vit({'embed_dim': 32, 'depth': 2, 'num_heads': 2, 'patch_sise': 8}, 32)
