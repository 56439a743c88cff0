"""MED transformer: checkpoint key layout, SDPA == explicit attention, masks, KV cache, shared image K/V."""
import hashlib
from pathlib import Path

import pytest
import torch

from models.blip import DEFAULT_VOCAB, init_tokenizer, load_med_config
from models.med import MED, MEDConfig, MEDLMHeadModel, math_attention, resize_token_embeddings
from tests.dispatched import DispatchedOps
from tests.tiny import TINY_MED

REF = Path(__file__).parent / 'reference_keys'


def reference_keys(name: str, prefix: str) -> dict:
    rows = [line.rstrip('\n').split('\t') for line in open(REF / f'{name}.txt') if not line.startswith('#')]
    return {k[len(prefix):]: v for k, v, _ in rows if k.startswith(prefix)}


def shapes(module) -> dict:
    return {k: str(list(v.shape)) for k, v in module.state_dict().items()}


def tiny(**changes) -> MEDConfig:
    return load_med_config(dict(TINY_MED), **changes)


@pytest.mark.parametrize('config_file,vocab', [('configs/med_config.json', 30524), ('configs/bert_config.json', 30522)])
def test_decoder_keys_equal_original(config_file, vocab):
    with torch.device('meta'):
        decoder = MEDLMHeadModel(load_med_config(config_file))
    expected = reference_keys('decoder', 'text_decoder.')
    if vocab != 30524:
        expected = {k: v.replace('30524', str(vocab)) for k, v in expected.items()}
    assert shapes(decoder) == expected


def test_encoder_keys_equal_original_base_and_large_vision():
    with torch.device('meta'):
        encoder = MED(load_med_config('configs/med_config.json'))
        large = MED(load_med_config('configs/med_config.json', encoder_width=1024))
    assert shapes(encoder) == reference_keys('base', 'text_encoder.')
    cross = large.encoder.layer[0].crossattention.self.state_dict()
    assert cross['key.weight'].shape == (768, 1024) and cross['value.weight'].shape == (768, 1024)


def _reference_order(name: str, prefix: str) -> list:
    return [line.split('\t')[0][len(prefix):] for line in open(REF / f'{name}.txt')
            if not line.startswith('#') and line.startswith(prefix)]


def test_fused_projections_save_and_load_the_original_layout_in_its_order():
    """qkv / kv parameters are written as the original query/key/value tensors, in the original key order,
    and a file in that layout loads strictly back into the same parameters."""
    torch.manual_seed(0)
    decoder = MEDLMHeadModel(tiny())
    sd = decoder.state_dict()
    with torch.device('meta'):
        full = MEDLMHeadModel(load_med_config('configs/med_config.json'))
    assert list(full.state_dict()) == _reference_order('decoder', 'text_decoder.')
    layer = decoder.bert.encoder.layer[1]
    H = TINY_MED['hidden_size']
    for i, name in enumerate(('query', 'key', 'value')):
        assert torch.equal(sd[f'bert.encoder.layer.1.attention.self.{name}.weight'],
                           layer.attention.self.qkv.weight[i * H:(i + 1) * H])
        assert torch.equal(sd[f'bert.encoder.layer.1.attention.self.{name}.bias'],
                           layer.attention.self.qkv.bias[i * H:(i + 1) * H])
    assert torch.equal(sd['bert.encoder.layer.1.crossattention.self.query.weight'], layer.crossattention.self.query.weight)
    assert torch.equal(sd['bert.encoder.layer.1.crossattention.self.value.weight'],
                       layer.crossattention.self.kv.weight[H:])
    assert not any('qkv' in k or '.kv.' in k for k in sd)
    other = MEDLMHeadModel(tiny())
    other.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    for (name, p), q in zip(decoder.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name


def test_fused_attention_equals_the_original_separate_projections():
    """Self-attention (bidirectional, causal with cache) and cross-attention with fused projections give the
    outputs of BERT's three separate projections (the original's computation, written out from its keys)."""
    torch.manual_seed(0)
    model = MED(tiny()).eval()
    ids, mask, image = _inputs()
    ours = model(ids, attention_mask=mask, encoder_hidden_states=image, is_decoder=True).last_hidden_state
    h = TINY_MED['num_attention_heads']

    def separate(att, x, context, causal):
        w = att.state_dict()
        heads = lambda t: t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
        q = heads(torch.nn.functional.linear(x, w['query.weight'], w['query.bias']))
        k = heads(torch.nn.functional.linear(context, w['key.weight'], w['key.bias']))
        v = heads(torch.nn.functional.linear(context, w['value.weight'], w['value.bias']))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if causal:
            L = x.shape[1]
            allowed = torch.ones(L, L, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
            scores = scores.masked_fill(~allowed, float('-inf'))
        out = scores.softmax(-1) @ v
        return out.transpose(1, 2).reshape(x.shape)

    x = model.embeddings(ids)
    for layer in model.encoder.layer:
        x = layer.attention.output(separate(layer.attention.self, x, x, True), x)
        x = layer.crossattention.output(separate(layer.crossattention.self, x, image, False), x)
        x = layer.output(layer.intermediate(x), x)
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], x[valid], atol=1e-5, rtol=1e-5)


def test_partial_and_mismatched_loads_name_the_original_keys():
    torch.manual_seed(0)
    source, target = MED(tiny()), MED(tiny())
    sd = source.state_dict()
    key_w = 'encoder.layer.0.crossattention.self.key.weight'
    before = target.encoder.layer[0].crossattention.self.kv.weight.detach().clone()
    partial = {k: v for k, v in sd.items() if k != key_w}
    result = target.load_state_dict(partial, strict=False)
    assert result.missing_keys == [key_w] and result.unexpected_keys == []
    kv = target.encoder.layer[0].crossattention.self.kv.weight
    H = TINY_MED['hidden_size']
    assert torch.equal(kv[:H], before[:H])                      # the part not in the file keeps its values
    assert torch.equal(kv[H:], sd['encoder.layer.0.crossattention.self.value.weight'])
    with pytest.raises(RuntimeError, match=key_w):
        target.load_state_dict(partial, strict=True)
    bad = dict(sd)
    bad['encoder.layer.1.attention.self.query.weight'] = torch.zeros(H, H + 1)
    with pytest.raises(RuntimeError, match=r'encoder\.layer\.1\.attention\.self\.query\.weight.*\(32, 33\)'):
        target.load_state_dict(bad)
    with torch.device('meta'):                                      # load by assignment into an empty model
        empty = MED(tiny())
    assert empty.load_state_dict(sd, assign=True).missing_keys == []
    assert torch.equal(empty.encoder.layer[0].attention.self.qkv.weight, source.encoder.layer[0].attention.self.qkv.weight)
    fused = {k: v.detach() for k, v in source.named_parameters()}   # the fused layout loads as it is
    fused.update({k: v for k, v in source.named_buffers()})
    assert target.load_state_dict(fused, strict=False).missing_keys == []


def test_lm_head_is_tied_and_bias_stored_twice():
    decoder = MEDLMHeadModel(tiny())
    pred = decoder.cls.predictions
    assert pred.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    assert pred.decoder.bias is pred.bias
    assert {'cls.predictions.bias', 'cls.predictions.decoder.bias'} <= set(decoder.state_dict())


def test_unknown_config_key_is_an_error(tmp_path):
    path = tmp_path / 'med.json'
    path.write_text('{"hidden_size": 32, "hiden_layers": 3}')
    with pytest.raises(ValueError, match='hiden_layers'):
        MEDConfig.from_json_file(str(path))


def _inputs(B=3, L=7, N=5, W=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    ids = ids * mask
    image = torch.randn(B, N, W, generator=g)
    return ids, mask, image


@pytest.mark.parametrize('mode,is_decoder', [('text', False), ('multimodal', False), ('multimodal', True)])
def test_sdpa_equals_explicit_softmax_oracle(mode, is_decoder):
    torch.manual_seed(0)
    model = MED(tiny()).eval()
    ids, mask, image = _inputs()
    kwargs = dict(attention_mask=mask, encoder_hidden_states=image, mode=mode, is_decoder=is_decoder)
    fast = model(ids, **kwargs).last_hidden_state
    with math_attention():
        slow = model(ids, **kwargs).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(fast[valid], slow[valid], atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_valid_positions():
    torch.manual_seed(0)
    decoder = MEDLMHeadModel(tiny()).eval()
    ids, mask, image = _inputs()
    batch = decoder(ids, attention_mask=mask, encoder_hidden_states=image).logits
    alone = decoder(ids[1:2, :5], attention_mask=mask[1:2, :5], encoder_hidden_states=image[1:2]).logits
    torch.testing.assert_close(batch[1, :5], alone[0], atol=1e-5, rtol=1e-5)


def test_text_mode_ignores_image_and_causality_comes_from_is_decoder():
    torch.manual_seed(0)
    model = MED(tiny()).eval()
    ids, mask, image = _inputs()
    a = model(ids, attention_mask=mask, mode='text').last_hidden_state
    b = model(ids, attention_mask=mask, encoder_hidden_states=image * 5, mode='text').last_hidden_state
    torch.testing.assert_close(a, b)
    # causal: changing a later token leaves earlier positions unchanged
    ids2 = ids.clone()
    ids2[0, 4] = 7
    d1 = model(ids, encoder_hidden_states=image, is_decoder=True).last_hidden_state
    d2 = model(ids2, encoder_hidden_states=image, is_decoder=True).last_hidden_state
    torch.testing.assert_close(d1[0, :4], d2[0, :4])
    assert not torch.allclose(d1[0, 4:], d2[0, 4:])
    with pytest.raises(ValueError, match='encoder_hidden_states'):
        model(ids, mode='multimodal')


def test_kv_cache_gives_the_logits_of_full_recomputation():
    torch.manual_seed(0)
    decoder = MEDLMHeadModel(tiny()).eval()
    ids, _, image = _inputs()
    ids[:, 0] = 30522
    full = decoder(ids, encoder_hidden_states=image).logits
    past, steps = None, []
    cross_kv = decoder.bert.precompute_cross_kv(image)
    for t in range(ids.shape[1]):
        chunk = ids[:, :3] if t == 0 else ids[:, t:t + 1]
        if t in (1, 2):
            continue
        out = decoder(chunk, past_key_values=past, use_cache=True, cross_kv=cross_kv)
        past = out.past_key_values
        steps.append(out.logits)
    cached = torch.cat(steps, 1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_image_rows_share_cross_attention_without_copies():
    """Text batch r*B_img against B_img images equals repeating each image r times."""
    torch.manual_seed(0)
    model = MED(tiny()).eval()
    ids, mask, image = _inputs(B=6)
    images = image[:2]
    shared = model(ids, attention_mask=mask, encoder_hidden_states=images).last_hidden_state
    copied = model(ids, attention_mask=mask, encoder_hidden_states=images.repeat_interleave(3, 0)).last_hidden_state
    torch.testing.assert_close(shared, copied, atol=1e-5, rtol=1e-5)
    image_mask = torch.ones(2, 5, dtype=torch.long)
    image_mask[1, 3:] = 0
    shared = model(ids, encoder_hidden_states=images, encoder_attention_mask=image_mask).last_hidden_state
    copied = model(ids, encoder_hidden_states=images.repeat_interleave(3, 0),
                   encoder_attention_mask=image_mask.repeat_interleave(3, 0)).last_hidden_state
    torch.testing.assert_close(shared, copied, atol=1e-5, rtol=1e-5)


def test_image_tokens_are_cast_once_under_autocast_with_the_same_outputs(monkeypatch):
    """Under bf16 autocast the fp32 image tokens are cast once per forward, not by each layer's key and value
    projection (one copy per layer, kept for backward, as key and value are one fused linear); the outputs
    are bit-identical."""
    import models.med as med

    torch.manual_seed(0)
    model = MED(tiny(num_hidden_layers=3)).train()
    ids, mask, image = _inputs(B=4)

    def run():
        torch.manual_seed(1)  # same dropout masks
        with torch.autocast('cpu', dtype=torch.bfloat16), DispatchedOps() as seen:
            out = model(ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state
        return out, list(zip(seen.ops, seen.shapes)).count(('_to_copy', tuple(image.shape)))

    once, n_once = run()
    monkeypatch.setattr(med, 'autocast_context', lambda states: states)
    per_projection, n_per_projection = run()
    assert (n_once, n_per_projection) == (1, 3)
    assert torch.equal(once, per_projection)


def test_lm_loss_mean_and_none_reductions():
    torch.manual_seed(0)
    decoder = MEDLMHeadModel(tiny()).eval()
    ids, mask, image = _inputs()
    labels = ids.masked_fill(mask == 0, -100)
    out_mean = decoder(ids, attention_mask=mask, encoder_hidden_states=image, labels=labels)
    out_none = decoder(ids, attention_mask=mask, encoder_hidden_states=image, labels=labels, reduction='none')
    logp = out_mean.logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    valid = target != -100
    nll = -logp.gather(2, target.clamp(min=0)[..., None])[..., 0]
    smooth = -logp.mean(-1)
    per_token = (0.9 * nll + 0.1 * smooth) * valid
    torch.testing.assert_close(out_none.loss, per_token.sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_mean.loss, per_token.sum() / valid.sum(), atol=1e-5, rtol=1e-5)
    assert decoder(ids, encoder_hidden_states=image, return_logits=True).shape[1] == ids.shape[1] - 1
    # the head applied only at target positions gives the same losses, without [B, L, V] logits
    for reduction, full in (('mean', out_mean), ('none', out_none)):
        fast = decoder(ids, attention_mask=mask, encoder_hidden_states=image, labels=labels, reduction=reduction,
                       loss_only=True)
        assert fast.logits is None
        torch.testing.assert_close(fast.loss, full.loss, atol=1e-5, rtol=1e-5)
    none_valid = torch.full_like(labels, -100)
    assert decoder(ids, encoder_hidden_states=image, labels=none_valid, loss_only=True).loss.isnan()
    assert torch.equal(decoder(ids, encoder_hidden_states=image, labels=none_valid, loss_only=True,
                               reduction='none').loss, torch.zeros(ids.shape[0]))


def test_resize_token_embeddings_keeps_old_rows_and_tie():
    decoder = MEDLMHeadModel(tiny(vocab_size=30522))
    old = decoder.bert.embeddings.word_embeddings.weight.detach().clone()
    resize_token_embeddings(decoder, 30524)
    new = decoder.bert.embeddings.word_embeddings.weight
    assert new.shape == (30524, 32)
    torch.testing.assert_close(new[:30522], old)
    assert decoder.cls.predictions.decoder.weight is new
    assert decoder.cls.predictions.decoder.bias is decoder.cls.predictions.bias


def test_tokenizer_ids_and_shipped_vocabulary():
    assert hashlib.md5(DEFAULT_VOCAB.read_bytes()).hexdigest() == '64800d5d8528ce344256daf115d4965e'
    tok = init_tokenizer()
    assert len(tok) == 30524
    assert tok.bos_token_id == 30522 and tok.enc_token_id == 30523
    assert tok('a picture of ').input_ids == [101, 1037, 3861, 1997, 102]
    assert (tok.pad_token_id, tok.sep_token_id, tok.cls_token_id) == (0, 102, 101)


def _decode_as_transformers_4_15(tok, ids):
    """The slow BertTokenizer's decode(skip_special_tokens=True) of transformers 4.15, written out: join the
    word pieces, then clean_up_tokenization (on by default there)."""
    words = [t for t in tok.convert_ids_to_tokens(ids) if t not in tok.all_special_tokens]
    text = ' '.join(words).replace(' ##', '').strip()
    for a, b in [(' .', '.'), (' ?', '?'), (' !', '!'), (' ,', ','), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]:
        text = text.replace(a, b)
    return text


@pytest.mark.parametrize('text', ["a man's dog doesn't bark.", "it's a cat, isn't it? we're here!",
                                  'two people riding bikes down a street', "the players' uniforms"])
def test_decoded_text_is_the_originals(text):
    """Captions and VQA answers are decoded as the original's transformers 4.15 did ("man's", not "man ' s")."""
    tok = init_tokenizer()
    ids = tok(text).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == _decode_as_transformers_4_15(tok, ids)
    assert tok.batch_decode([ids], skip_special_tokens=True) == [_decode_as_transformers_4_15(tok, ids)]


def test_tokenizer_that_failed_to_load_is_an_error(tmp_path):
    bad = tmp_path / 'vocab.txt'
    bad.write_text('[PAD]\n[UNK]\n')
    with pytest.raises(RuntimeError, match='did not load'):
        init_tokenizer(str(bad))
    with pytest.raises(Exception):
        init_tokenizer(str(tmp_path / 'no-such-folder'))


@pytest.mark.parametrize('rows', [1, 2, 3, 4, 5, 6, 8, 16, 17, 40])
@pytest.mark.parametrize('grad', [False, True])
@pytest.mark.parametrize('transposed_for_few_rows', [False, True])   # the AVX2 and the AVX-512 kernel choice
def test_skinny_cpu_linear_is_the_same_function(rows, grad, transposed_for_few_rows, monkeypatch):
    """The decode-time CPU kernels for a few rows compute F.linear (to fp32 rounding), in any input shape."""
    from models import med
    monkeypatch.setattr(med, '_TRANSPOSED_FOR_FEW_ROWS', transposed_for_few_rows)
    torch.manual_seed(rows)
    layer = med.Linear(96, 200)
    x = torch.randn(rows, 1, 96, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        fast = med.skinny_cpu_linear(x, layer.weight, layer.bias)
        # with grad: rows 2-4 the transposed product (autograd-safe), others F.linear; without grad: 1 and 5-16
        # oneDNN's kernel, 2-4 the transposed product or oneDNN's, as _TRANSPOSED_FOR_FEW_ROWS says
        expect_fast = 2 <= rows <= 4 or (rows <= 16 and not grad and med._ONEDNN_LINEAR)
        assert (fast is not None) == expect_fast
        if 2 <= rows <= 4 and not grad and med._ONEDNN_LINEAR:   # the kernel the (patched) choice names
            with DispatchedOps() as seen:
                med.skinny_cpu_linear(x, layer.weight, layer.bias)
            assert ('addmm' if transposed_for_few_rows else '_linear_pointwise') in seen.ops
        out, ref = layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert out.shape == ref.shape == (rows, 1, 200)
    assert out.is_contiguous()   # row-major as F.linear's: attention needs unit-stride heads for its fused kernel
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if grad:
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(out, (x, layer.weight, layer.bias), g),
                                   torch.autograd.grad(ref, (x, layer.weight, layer.bias), g), rtol=1e-5, atol=1e-5)
    no_bias = med.Linear(96, 200, bias=False)
    with torch.no_grad():
        torch.testing.assert_close(no_bias(x), x @ no_bias.weight.T, rtol=1e-5, atol=1e-5)
        assert layer(x[:0]).shape == (0, 1, 200)   # no rows: the plain kernel
