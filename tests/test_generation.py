"""Decoding: cached == recomputed, transformers-4.15 semantics (min/max length, [SEP], penalties), batching."""
import gc
import weakref

import pytest
import torch

from models.blip import BLIP_Decoder, load_med_config
from models.generation import apply_repetition_penalty, generate, top_k_top_p_filter
from models.med import MEDLMHeadModel
from tests.dispatched import DispatchedOps
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT

SEP, PAD, DEC = 102, 0, 30522


@pytest.fixture(scope='module')
def decoder():
    torch.manual_seed(0)
    model = MEDLMHeadModel(load_med_config(dict(TINY_MED))).eval()
    # a small effective vocabulary makes beams collide and [SEP] appear: the interesting cases
    with torch.no_grad():
        model.cls.predictions.bias.fill_(-30)
        model.cls.predictions.bias[[SEP, 1000, 1001, 1002, 1003, 1004, 1005]] = 0
        model.cls.predictions.bias[SEP] = -1.0
    return model


def prompts(B):
    return torch.tensor([[DEC, 1037, 3861, 1997]] * B)


def images(B, seed=0):
    return torch.randn(B, 5, 32, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize('kwargs', [dict(num_beams=1), dict(num_beams=3), dict(num_beams=4, num_return_sequences=2),
                                    dict(num_beams=3, repetition_penalty=1.5)])
def test_cached_decoding_equals_full_recomputation(decoder, kwargs):
    ids = prompts(3)
    fast = generate(decoder, ids, images(3), max_length=14, min_length=6, **kwargs)
    slow = generate(decoder, ids, images(3), max_length=14, min_length=6, use_cache=False, **kwargs)
    assert torch.equal(fast, slow)


def test_cached_sampling_equals_full_recomputation(decoder):
    torch.manual_seed(3)
    fast = generate(decoder, prompts(2), images(2), sample=True, top_p=0.9, max_length=12, num_return_sequences=3)
    torch.manual_seed(3)
    slow = generate(decoder, prompts(2), images(2), sample=True, top_p=0.9, max_length=12, num_return_sequences=3,
                    use_cache=False)
    assert fast.shape[0] == 6 and torch.equal(fast, slow)


def first_sep(row):
    hits = (row == SEP).nonzero()
    return int(hits[0]) if len(hits) else None


@pytest.mark.parametrize('num_beams', [1, 3])
def test_min_length_counts_the_prompt_and_blocks_sep(decoder, num_beams):
    with torch.no_grad():
        decoder.cls.predictions.bias[SEP] = 20.0  # [SEP] would win at once
    try:
        short = generate(decoder, prompts(2), images(2), num_beams=num_beams, max_length=20, min_length=0)
        longer = generate(decoder, prompts(2), images(2), num_beams=num_beams, max_length=20, min_length=9)
    finally:
        with torch.no_grad():
            decoder.cls.predictions.bias[SEP] = -1.0
    assert [first_sep(r) for r in short] == [4, 4]  # early [SEP]: nothing but the prompt
    assert short.shape[1] == 5
    assert [first_sep(r) for r in longer] == [9, 9]  # 9 tokens in all (4 prompt + 5 new) before [SEP]


@pytest.mark.parametrize('num_beams', [1, 3])
def test_max_length_bounds_the_total_length(decoder, num_beams):
    out = generate(decoder, prompts(2), images(2), num_beams=num_beams, max_length=8, min_length=8)
    assert out.shape[1] == 8
    assert (out[:, :4] == prompts(2)).all()


@pytest.mark.parametrize('kwargs', [dict(num_beams=1), dict(num_beams=3)])
def test_batch_equals_one_image_at_a_time(decoder, kwargs):
    batch = generate(decoder, prompts(3), images(3), max_length=12, min_length=5, **kwargs)
    for i in range(3):
        alone = generate(decoder, prompts(1), images(3)[i:i + 1], max_length=12, min_length=5, **kwargs)
        row = batch[i, :alone.shape[1]]
        assert torch.equal(row, alone[0]) and (batch[i, alone.shape[1]:] == PAD).all()


def test_num_return_sequences_best_first_and_distinct(decoder):
    one = generate(decoder, prompts(2), images(2), num_beams=4, max_length=12, min_length=5)
    many = generate(decoder, prompts(2), images(2), num_beams=4, max_length=12, min_length=5, num_return_sequences=3)
    assert many.shape[0] == 6
    for i in range(2):
        assert torch.equal(many[3 * i, :one.shape[1]], one[i])
        rows = {tuple(r[r != PAD].tolist()) for r in many[3 * i:3 * i + 3]}
        assert len(rows) == 3
    with pytest.raises(ValueError):
        generate(decoder, prompts(1), images(1), num_beams=2, num_return_sequences=3)


def test_sampling_stops_rows_independently_and_pads(decoder):
    torch.manual_seed(0)
    out = generate(decoder, prompts(4), images(4), sample=True, top_p=0.9, max_length=16, min_length=5)
    for row in out:
        end = first_sep(row)
        if end is not None:
            assert end >= 5 and (row[end + 1:] == PAD).all()


def test_repetition_penalty_literal():
    scores = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    ids = torch.tensor([[0, 1, 1]])  # token 1 twice: penalised once
    out = apply_repetition_penalty(scores, ids, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_top_k_top_p_literal():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_k_top_p_filter(logits, top_k=50, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, then 0.8 crosses: kept, rest removed
    kept = torch.isfinite(top_k_top_p_filter(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(top_k_top_p_filter(logits, top_k=50, top_p=0.1))
    assert kept.tolist() == [[True, False, False, False]]  # at least one token survives


def test_blip_decoder_generate_returns_strings_per_image():
    torch.manual_seed(0)
    model = BLIP_Decoder(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=TINY_VIT).eval()
    image = torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE)
    captions = model.generate(image, num_beams=3, max_length=10, min_length=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    sampled = model.generate(image, sample=True, max_length=10, min_length=5, num_return_sequences=3)
    assert len(sampled) == 6
    loss = model(image, ['a picture of a red circle', 'a picture of two squares'])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize('mode', ['beam', 'greedy', 'sample'])
def test_cuda_graph_decoding_path_gives_the_same_captions(mode, monkeypatch):
    """``cuda_graph=True`` runs its static decode step (fixed-size cache, additive mask) eagerly off the
    GPU: the same function as the default path, so the same captions (sampling with the same seed)."""
    torch.manual_seed(0)
    model = BLIP_Decoder(med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=TINY_VIT).eval()
    image = torch.randn(3, 3, TINY_IMAGE, TINY_IMAGE)
    kwargs = {'beam': dict(num_beams=3), 'greedy': dict(num_beams=1),
              'sample': dict(sample=True, num_return_sequences=2)}[mode]
    from models import generation
    built, graphed = [], generation._GraphedDecoder
    monkeypatch.setattr(generation, '_GraphedDecoder', type('Counted', (graphed,), {
        '__init__': lambda self, *a, **k: (built.append(1), graphed.__init__(self, *a, **k))[1]}))
    captions = []
    for graph in (False, True):
        torch.manual_seed(1)
        captions.append(model.generate(image, max_length=12, min_length=4, cuda_graph=graph, **kwargs))
    assert built == [1]   # the static path ran, once
    assert captions[0] == captions[1] and len(captions[0]) == 3 * kwargs.get('num_return_sequences', 1)


@pytest.mark.parametrize('amp', [False, True])
def test_a_decode_step_runs_one_projection_per_attention_input(decoder, amp):
    """Launch count of a cached decode step (a GPU's eager decoding is bound by it): per layer one fused
    query/key/value product and one cross-attention query product (image keys/values come precomputed),
    two output products and two FFN products; under autocast one cast per product input that is fp32."""
    layers = TINY_MED['num_hidden_layers']
    image = torch.randn(2, 5, TINY_MED['encoder_width'])
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        cross_kv = decoder.bert.precompute_cross_kv(image)
        first = decoder.bert(prompts(2), cross_kv=cross_kv, use_cache=True, is_decoder=True)
        with DispatchedOps() as count:
            decoder.bert(prompts(2)[:, -1:], past_key_values=first.past_key_values, cross_kv=cross_kv,
                         use_cache=True, is_decoder=True)
    products = [op for op in count.ops if op in ('addmm', 'mm', '_linear_pointwise')]  # bmm: CPU math attention
    assert len(products) == 6 * layers
    if amp:  # the inputs of the fused projection, the cross query and the FFN (LayerNorm outputs are fp32)
        assert count.ops.count('_to_copy') == 3 * layers


@pytest.mark.parametrize('B, num_beams', [(1, 3), (2, 3), (1, 1)])  # 3 decode rows, 6, 1 (and a 4-row prompt)
@pytest.mark.parametrize('transposed_for_few_rows', [False, True])     # the AVX2 and the AVX-512 kernel choice
def test_decoding_attention_takes_the_fused_cpu_kernel(decoder, B, num_beams, transposed_for_few_rows, monkeypatch):
    """Every attention call of decoding gets row-major heads, so CPU SDPA runs its fused kernel. The skinny
    CPU linear layers once returned a transposed view for 2-4 rows: strided heads sent SDPA to its math
    fallback, which copies the keys per call (25% of CPU caption decoding at base size)."""
    from models import med
    monkeypatch.setattr(med, '_TRANSPOSED_FOR_FEW_ROWS', transposed_for_few_rows)
    with DispatchedOps() as seen:
        generate(decoder, prompts(B), images(B), num_beams=num_beams, max_length=8)
    fused = seen.ops.count('_scaled_dot_product_flash_attention_for_cpu')
    assert fused == 2 * TINY_MED['num_hidden_layers'] * (8 - 4)   # self + cross, every layer, every step
    assert 'bmm' not in seen.ops


def test_cuda_graph_decoding_keeps_its_static_step_between_calls_with_the_same_shapes():
    """The buffers (and on a GPU the captured graph) of ``cuda_graph`` decoding are kept between calls: a
    second call with other images only loads their keys/values, and decodes exactly what the default path
    decodes. Off the GPU the step 'replays' on the tensors bound at capture, as a graph would, so a buffer
    replaced rather than refilled would show here as wrong tokens."""
    from models import generation
    torch.manual_seed(3)
    model = MEDLMHeadModel(load_med_config(dict(TINY_MED, initializer_range=0.1))).eval()  # images matter
    kw = dict(num_beams=3, max_length=12, min_length=4)
    firsts, seconds = images(2, seed=1), images(2, seed=2)
    want = [generate(model, prompts(2), x, **kw) for x in (firsts, seconds)]
    assert not torch.equal(want[0], want[1])          # the images matter, so reuse is tested on real work
    got, kept = [], []
    for x in (firsts, seconds, firsts):
        got.append(generate(model, prompts(2), x, cuda_graph=True, **kw))
        kept.append(generation._STATIC_STEPS[model])
    assert [torch.equal(g, w) for g, w in zip(got, want + want[:1])] == [True] * 3
    assert kept[0] is kept[1] is kept[2] and kept[0].graph is not None
    greedy = generate(model, prompts(2), seconds, num_beams=1, max_length=12, cuda_graph=True)  # 2 rows, not 6
    assert torch.equal(greedy, generate(model, prompts(2), seconds, num_beams=1, max_length=12))
    assert generation._STATIC_STEPS[model] is not kept[0]                 # other shapes: built anew, one kept


def test_kept_decoding_step_follows_the_weights_and_is_released_for_training():
    """In-place weight updates (optimizer steps, ``load_state_dict``) are read at every replay; weights moved
    to new storage (``assign=True``, ``.to()``) build a new step, since a graph would read the old storage;
    ``train()`` frees what was kept."""
    from models import generation
    torch.manual_seed(4)
    model = MEDLMHeadModel(load_med_config(dict(TINY_MED, initializer_range=0.1))).eval()
    other = MEDLMHeadModel(load_med_config(dict(TINY_MED, initializer_range=0.1))).eval().state_dict()
    kw = dict(num_beams=3, max_length=12, min_length=4)
    x = images(2, seed=1)
    before = generate(model, prompts(2), x, cuda_graph=True, **kw)
    kept = generation._STATIC_STEPS[model]
    model.load_state_dict(other)                                            # in place
    after = generate(model, prompts(2), x, cuda_graph=True, **kw)
    assert generation._STATIC_STEPS[model] is kept
    assert torch.equal(after, generate(model, prompts(2), x, **kw)) and not torch.equal(after, before)
    model.load_state_dict({k: v.clone() for k, v in other.items()}, assign=True)  # new storage
    assert torch.equal(generate(model, prompts(2), x, cuda_graph=True, **kw), after)
    assert generation._STATIC_STEPS[model] is not kept
    model.train()
    assert model not in generation._STATIC_STEPS
    model.eval()
    generate(model, prompts(2), x, cuda_graph=True, **kw)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None   # what is kept for decoding does not keep the model alive


@pytest.mark.parametrize('kwargs', [dict(num_beams=3), dict(num_beams=1), dict(sample=True)])
def test_max_length_not_beyond_the_prompt_is_a_clear_error(decoder, kwargs):
    with pytest.raises(ValueError, match=r'max_length \(4\) counts the prompt'):
        generate(decoder, prompts(2), images(2), max_length=4, **kwargs)
