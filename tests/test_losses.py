"""Loss functions against literal restatements of the formulas; ITM negative sampling; queues; momentum EMA."""
import math

import pytest
import torch
import torch.nn as nn

from models.losses import itc_loss, itm_loss, itm_negative_weights, sample_negatives, soft_targets
from models.momentum import FeatureQueue, copy_params, momentum_update


def test_itc_loss_equals_the_formula_written_out():
    g = torch.Generator().manual_seed(0)
    sim_i2t, sim_t2i = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    t_i2t, t_t2i = torch.rand(3, 5, generator=g), torch.rand(3, 5, generator=g)
    t_i2t, t_t2i = t_i2t / t_i2t.sum(1, keepdim=True), t_t2i / t_t2i.sum(1, keepdim=True)

    def direction(sim, t):
        total = 0.0
        for b in range(3):
            log_z = math.log(sum(math.exp(sim[b][j]) for j in range(5)))
            total += -sum((sim[b][j] - log_z) * t[b][j] for j in range(5))
        return total / 3

    expected = (direction(sim_i2t.tolist(), t_i2t.tolist()) + direction(sim_t2i.tolist(), t_t2i.tolist())) / 2
    got = itc_loss(sim_i2t.bfloat16(), sim_t2i.bfloat16(), t_i2t, t_t2i)
    assert got.dtype == torch.float32
    assert itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i).item() == pytest.approx(expected, rel=1e-6)


def test_soft_targets_mix_momentum_softmax_and_hard_targets():
    sim_m = torch.tensor([[1.0, 2.0, 0.0]])
    hard = torch.tensor([[1.0, 0.0, 0.0]])
    e = [math.exp(1.0), math.exp(2.0), 1.0]
    expected = [0.4 * x / sum(e) + 0.6 * h for x, h in zip(e, [1, 0, 0])]
    assert soft_targets(sim_m, hard, 0.4)[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(soft_targets(sim_m, hard, 0.0), hard)


def test_itm_negative_weights_softmax_plus_eps_with_positives_zeroed():
    sim = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 1.0]])
    positive = torch.tensor([[True, False, False], [False, True, True]])
    w = itm_negative_weights(sim, positive, eps=1e-4)
    row0 = [math.exp(x) / (1 + math.e + math.e ** 2) + 1e-4 for x in (0.0, 1.0, 2.0)]
    assert w[0].tolist() == pytest.approx([0.0, row0[1], row0[2]], rel=1e-6)
    assert w[1, 1] == 0 and w[1, 2] == 0 and w[1, 0] > 0


def test_sample_negatives_never_draws_zero_weight_and_survives_empty_rows():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 1, 2, 5])
    positive = ids[:, None] == ids[None, :]
    positive[5] = True                               # row 5: no valid candidate at all
    weights = itm_negative_weights(torch.randn(6, 6, generator=g), positive)
    for _ in range(50):
        idx, valid = sample_negatives(weights, generator=g)
        assert idx.shape == (6,) and idx.dtype == torch.long
        assert valid.tolist() == [True] * 5 + [False]
        assert (ids[idx[:5]] != ids[:5]).all()       # never the same image id
        assert 0 <= idx[5] < 6


def test_itm_loss_is_cross_entropy_ignoring_minus_100():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [5.0, 5.0]])
    labels = torch.tensor([1, 0, -100])
    expected = (-math.log(math.exp(2) / (1 + math.exp(2))) - math.log(math.e / (math.e + math.exp(-1)))) / 2
    assert itm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


class _Owner(nn.Module):
    pass


def test_feature_queue_writes_at_pointer_and_wraps_around():
    owner, queue = _Owner(), FeatureQueue('image_queue', 'text_queue', 'ptr_queue', idx='idx_queue')
    queue.register(owner, embed_dim=3, queue_size=8)
    assert owner.idx_queue.tolist() == [[-100] * 8] and owner.ptr_queue.tolist() == [0]
    assert torch.allclose(owner.image_queue.norm(dim=0), torch.ones(8))
    assert set(owner.state_dict()) == {'image_queue', 'text_queue', 'idx_queue', 'ptr_queue'}
    for step in range(3):                            # 3 batches of 4 into 8 slots: 0-3, 4-7, 0-3 again
        image, text = torch.full((4, 3), float(step)), torch.full((4, 3), float(-step))
        queue.enqueue(owner, image, text, idx=torch.arange(4) + 10 * step)
        assert owner.ptr_queue.item() == (step + 1) * 4 % 8
    assert owner.image_queue[0].tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    assert owner.text_queue[0].tolist() == [-2, -2, -2, -2, -1, -1, -1, -1]
    assert owner.idx_queue.tolist() == [[20, 21, 22, 23, 10, 11, 12, 13]]
    with pytest.raises(AssertionError, match='multiple of the global batch'):
        queue.enqueue(owner, torch.zeros(3, 3), torch.zeros(3, 3), idx=torch.zeros(3, dtype=torch.long))


def test_momentum_update_is_the_ema_and_copy_params_freezes():
    torch.manual_seed(0)
    online, twin = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    pairs = [(online, twin)]
    copy_params(pairs)
    assert all(torch.equal(a, b) and not b.requires_grad for a, b in zip(online.parameters(), twin.parameters()))
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in twin.parameters()]
    momentum_update(pairs, 0.9)
    for p, p_m, old in zip(online.parameters(), twin.parameters(), before):
        torch.testing.assert_close(p_m, 0.9 * old + (1 - 0.9) * p, rtol=0, atol=1e-7)


def test_momentum_update_refuses_a_twin_whose_parameters_changed_since_copy_params():
    online, twin = nn.Linear(3, 4), nn.Linear(3, 4)
    copy_params([(online, twin)])
    twin.extra = nn.Parameter(torch.zeros(1), requires_grad=False)   # pairing by position would shift
    with pytest.raises(ValueError, match='momentum twin of Linear has 3 parameters, the online module 2'):
        momentum_update([(online, twin)], 0.9)


def test_sample_negatives_draws_what_torch_multinomial_draws_from_the_same_generator():
    """Same algorithm as torch.multinomial(w, 1) (the draws and the generator's use are identical), and the
    same distribution: frequencies follow the weights."""
    weights = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1e-4]])
    for seed in range(20):
        ours, _ = sample_negatives(weights, generator=torch.Generator().manual_seed(seed))
        theirs = torch.multinomial(weights, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
        assert torch.equal(ours, theirs)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_negatives(weights[:1], generator=g)[0] for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    torch.testing.assert_close(freq, weights[0], atol=0.03, rtol=0)
