"""BLIP_NLVR: original keys, twin cross-attention math (mean, then merge), checkpoint expansion, gradients."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.blip import BLIP_Base
from models.blip_nlvr import BLIP_NLVR, blip_nlvr, expand_twin_cross_attention
from models.checkpoint import CheckpointError, load_checkpoint
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT

REF = Path(__file__).parent / 'reference_keys'
TEXTS = ['the left image has two dogs', 'there is a bird']


def reference_shapes(name: str) -> dict:
    rows = [line.rstrip('\n').split('\t') for line in open(REF / f'{name}.txt') if not line.startswith('#')]
    return {k: v for k, v, _ in rows}


def tiny_nlvr(seed=0, image_size=TINY_IMAGE) -> BLIP_NLVR:
    torch.manual_seed(seed)
    return BLIP_NLVR(med_config=dict(TINY_MED), image_size=image_size, vit=dict(TINY_VIT))


def images(B, seed=1, size=TINY_IMAGE):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_keys_equal_original():
    with torch.device('meta'):
        model = BLIP_NLVR(image_size=224)
    assert {k: str(list(v.shape)) for k, v in model.state_dict().items()} == reference_shapes('nlvr')


def reference_attention(att, x, context):
    """softmax(q k^T / sqrt(d)) v per head, written out."""
    B, L, H = x.shape
    h = att.heads
    w = att.state_dict()  # the original's separate query / key / value projections
    q = F.linear(x, w['query.weight'], w['query.bias']).view(B, L, h, -1).transpose(1, 2)
    k = F.linear(context, w['key.weight'], w['key.bias']).view(B, context.shape[1], h, -1).transpose(1, 2)
    v = F.linear(context, w['value.weight'], w['value.bias']).view(B, context.shape[1], h, -1).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(B, L, H)


@torch.no_grad()
def test_twin_layers_average_then_merge():
    model = tiny_nlvr(seed=2).eval()
    for p in model.text_encoder.parameters():  # break the init's symmetries (zero biases, unit LayerNorms)
        p.add_(0.1 * torch.randn_like(p))
    layers = model.text_encoder.encoder.layer
    first, second = layers[0].crossattention, layers[1].crossattention   # 2 layers: merge from layer 1 on
    assert not hasattr(first.output, 'merge_layer') and hasattr(second.output, 'merge_layer')
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, TINY_MED['hidden_size'], generator=g)
    c0, c1 = (torch.randn(2, 7, TINY_VIT['embed_dim'], generator=g) for _ in range(2))
    for ca, merged in ((first, False), (second, True)):
        h0 = ca.output.dense0(reference_attention(ca.self0, x, c0))
        h1 = ca.output.dense1(reference_attention(ca.self1, x, c1))
        h = ca.output.merge_layer(torch.cat([h0, h1], -1)) if merged else (h0 + h1) / 2
        expected = F.layer_norm(h + x, (x.shape[-1],), ca.output.LayerNorm.weight, ca.output.LayerNorm.bias,
                                ca.output.LayerNorm.eps)
        got, _ = ca(x, [c0, c1], [None, None])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the model feeds the first half of the batch as image0, the second as image1, and classifies [ENC]
    image = images(4)
    logits = model(image, TEXTS, torch.tensor([0, 1]), train=False)
    tokens = model.tokenizer(TEXTS, padding='longest', return_tensors='pt')
    ids = tokens.input_ids.clone()
    ids[:, 0] = model.tokenizer.enc_token_id
    embeds = model.visual_encoder(image)
    states = model.text_encoder(ids, attention_mask=tokens.attention_mask,
                                encoder_hidden_states=[embeds[:2], embeds[2:]]).last_hidden_state
    torch.testing.assert_close(logits, model.cls_head(states[:, 0]))
    swapped = model(torch.cat([image[2:], image[:2]]), TEXTS, torch.tensor([0, 1]), train=False)
    assert not torch.allclose(logits, swapped)


def pretrain_layout_checkpoint(path, seed=5):
    """A tiny BLIP_Base/pretrain-shaped state dict (single cross-attention), plus a pretrain-only key."""
    torch.manual_seed(seed)
    sd = BLIP_Base(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT)).state_dict()
    sd['temp'] = torch.tensor(0.07)
    torch.save({'model': sd}, path)
    return sd


def test_pretrain_checkpoint_expands_to_twin_layout(tmp_path):
    sd = pretrain_layout_checkpoint(tmp_path / 'pretrain.pth')
    model, msg = load_checkpoint(tiny_nlvr(seed=6, image_size=2 * TINY_IMAGE), str(tmp_path / 'pretrain.pth'))
    assert set(msg.missing_keys) == {
        'text_encoder.encoder.layer.1.crossattention.output.merge_layer.weight',
        'text_encoder.encoder.layer.1.crossattention.output.merge_layer.bias',
        'cls_head.0.weight', 'cls_head.0.bias', 'cls_head.2.weight', 'cls_head.2.bias'}
    assert msg.unexpected_keys == ['temp']
    loaded = model.state_dict()
    for i in range(TINY_MED['num_hidden_layers']):
        src = f'text_encoder.encoder.layer.{i}.crossattention.'
        for name in ('query', 'key', 'value'):
            for twin in ('self0', 'self1'):
                assert torch.equal(loaded[f'{src}{twin}.{name}.weight'], sd[f'{src}self.{name}.weight'])
                assert torch.equal(loaded[f'{src}{twin}.{name}.bias'], sd[f'{src}self.{name}.bias'])
        for twin in ('dense0', 'dense1'):
            assert torch.equal(loaded[f'{src}output.{twin}.weight'], sd[f'{src}output.dense.weight'])
        assert torch.equal(loaded[f'{src}output.LayerNorm.weight'], sd[f'{src}output.LayerNorm.weight'])
    assert loaded['visual_encoder.pos_embed'].shape[1] == 1 + (2 * TINY_IMAGE // TINY_VIT['patch_size']) ** 2
    # the factory takes a local path (the original's loader raised NameError) and accepts exactly this gap
    blip_nlvr(str(tmp_path / 'pretrain.pth'), med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT))
    del sd['text_encoder.encoder.layer.0.intermediate.dense.weight']
    torch.save({'model': sd}, tmp_path / 'broken.pth')
    with pytest.raises(CheckpointError, match='intermediate.dense.weight'):
        blip_nlvr(str(tmp_path / 'broken.pth'), med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT))


def test_nlvr_checkpoint_passes_unchanged(tmp_path):
    source = tiny_nlvr(seed=7)
    sd = source.state_dict()
    assert expand_twin_cross_attention(sd).keys() == sd.keys()
    torch.save({'model': sd}, tmp_path / 'nlvr.pth')
    model, msg = load_checkpoint(tiny_nlvr(seed=8), str(tmp_path / 'nlvr.pth'))
    assert msg.missing_keys == [] and msg.unexpected_keys == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


def test_gradients_reach_every_trainable_parameter():
    model = tiny_nlvr(seed=9).train()
    loss = model(images(4), TEXTS, torch.tensor([1, 0]), train=True)
    loss.backward()
    assert loss.ndim == 0
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
