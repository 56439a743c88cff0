"""BLIP_Retrieval: gradients, id-aware ITC against the formula, ITM negatives, checkpoints, and a two-process
(gloo, DDP) run against one process.

What the two-process test compares (dropout 0, deterministic negative sampler, ViT drop-path 0):
  * ``itc_all_rank=True`` (+ ``negative_all_rank=True`` for retrieval): every loss is a function of the
    global batch only, so rank-averaged losses, DDP gradients and queues equal one process with the
    global batch (for pretraining, whose ITM negatives are always local, the one-process sampler is
    restricted to each rank's block). This exercises the gradient through gathered negative images.
  * the original's default (local in-batch ITC columns, local ITM negatives): the only cross-rank step
    is the queue, so rank r's losses equal one process on rank r's half, the DDP gradients equal the
    mean of the two halves' gradients, and both ranks' queues hold the momentum features of the global
    batch in rank order.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.blip_itm import BLIP_ITM, blip_itm
from models.blip_pretrain import BLIP_Pretrain
from models.blip_retrieval import BLIP_Retrieval, blip_retrieval
from models.checkpoint import load_checkpoint
from models.losses import itm_loss, sample_negatives
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT

CAPTIONS = ['a dog on a red sofa', 'two people', 'a bicycle leaning on a wall next to a door', 'sky',
            'a cat', 'a red car parked on the street']
MED_NO_DROPOUT = {**TINY_MED, 'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0}
KW = dict(image_size=TINY_IMAGE, vit=dict(TINY_VIT), embed_dim=16)


def tiny(cls=BLIP_Retrieval, seed=0, med=TINY_MED, **kwargs):
    torch.manual_seed(seed)
    if cls is not BLIP_ITM:
        kwargs.setdefault('queue_size', 8)
    return cls(med_config=dict(med), **KW, **kwargs)


def images(B, seed=1):
    return torch.randn(B, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(seed))


class Recorder:
    """Negative sampler that records what it was given and what it drew."""

    def __init__(self, sampler=sample_negatives):
        self.sampler, self.calls = sampler, []

    def __call__(self, weights):
        idx, valid = self.sampler(weights)
        self.calls.append((weights.clone(), idx, valid))
        return idx, valid


@pytest.mark.parametrize('negative_all_rank', [False, True])
def test_every_trainable_parameter_gets_a_gradient_momentum_none(negative_all_rank):
    model = tiny(negative_all_rank=negative_all_rank)
    losses = model(images(4), CAPTIONS[:4], alpha=0.4, idx=torch.tensor([3, 3, 5, 7]))
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    sum(losses).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    momentum = [p for _, m in model.model_pairs for p in m.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in momentum)
    assert model.ptr_queue.item() == 4 and model.idx_queue[0, :4].tolist() == [3, 3, 5, 7]


def test_itc_with_alpha_0_equals_id_aware_formula():
    model = tiny(med=MED_NO_DROPOUT).eval()  # eval: online == momentum features (the twins are copies)
    image, idx = images(4), torch.tensor([3, 3, 5, 7])
    with torch.no_grad():
        text = model.tokenizer(CAPTIONS[:4], padding='max_length', truncation=True, max_length=35, return_tensors='pt')
        img = torch.nn.functional.normalize(model.vision_proj(model.visual_encoder(image)[:, 0]), dim=-1)
        txt = torch.nn.functional.normalize(model.text_proj(model.text_encoder(
            text.input_ids, attention_mask=text.attention_mask, mode='text').last_hidden_state[:, 0]), dim=-1)
        image_queue, text_queue, idx_queue = model.image_queue.clone(), model.text_queue.clone(), model.idx_queue[0].tolist()
        loss_ita, _ = model(image, CAPTIONS[:4], alpha=0.0, idx=idx)
    ids_all = idx.tolist() + idx_queue                                   # in-batch columns, then the queue
    sim_i2t = (img @ torch.cat([txt.T, text_queue], 1) / 0.07).tolist()
    sim_t2i = (txt @ torch.cat([img.T, image_queue], 1) / 0.07).tolist()

    def direction(sim):
        total = 0.0
        for b in range(4):
            positives = [j for j, i in enumerate(ids_all) if i == idx[b]]
            log_z = torch.tensor(sim[b]).logsumexp(0).item()
            total += -sum(sim[b][j] - log_z for j in positives) / len(positives)
        return total / 4

    assert loss_ita.item() == pytest.approx((direction(sim_i2t) + direction(sim_t2i)) / 2, rel=1e-4)


def test_itm_negatives_never_share_the_image_id():
    model = tiny(queue_size=12)
    model.negative_sampler = recorder = Recorder()
    idx = torch.tensor([0, 0, 1, 1, 2, 2])
    for _ in range(5):
        model(images(6), CAPTIONS, alpha=0.4, idx=idx)
    assert len(recorder.calls) == 10
    for weights, drawn, valid in recorder.calls:
        assert valid.all() and (idx[drawn] != idx).all()
        assert (weights[idx[:, None] == idx[None, :]] == 0).all()


def ids_and_mask(model, captions):
    """The ITM texts as the original builds them: padded to 30 (pretraining) or 35 tokens, [ENC] first."""
    text = model.tokenizer(captions, padding='max_length', truncation=True, return_tensors='pt',
                           max_length=30 if isinstance(model, BLIP_Pretrain) else 35)
    ids = text.input_ids.clone()
    ids[:, 0] = model.tokenizer.enc_token_id
    return ids, text.attention_mask


@pytest.mark.parametrize('cls, kwargs', [(BLIP_Retrieval, {}), (BLIP_Retrieval, {'negative_all_rank': True}),
                                         (BLIP_Pretrain, {})], ids=['retrieval', 'retrieval_all_rank', 'pretrain'])
def test_itm_and_lm_equal_the_passes_over_copied_image_tokens(cls, kwargs, monkeypatch):
    """ITM (and pretraining's LM) project each image's tokens to keys/values once; the losses and every gradient
    equal the original's passes over one copy of the image tokens per row."""
    model = tiny(cls, med=MED_NO_DROPOUT, queue_size=12, **kwargs)   # no dropout: the reference is the same function
    model.negative_sampler = recorder = Recorder()
    image_embeds, decoder_calls = [], []
    model.visual_encoder.register_forward_hook(lambda module, args, out: image_embeds.append(out))
    if cls is BLIP_Pretrain:  # the LM reference reuses the decoder's inputs (ids, mask, labels)
        def record(*args, _forward=model.text_decoder.forward, **kw):
            decoder_calls.append((args, kw))
            return _forward(*args, **kw)
        monkeypatch.setattr(model.text_decoder, 'forward', record)
    B = len(CAPTIONS)
    extra = (torch.arange(B),) if cls is BLIP_Retrieval else ()
    losses = model(images(B), CAPTIONS, 0.4, *extra)
    objective = sum(losses[1:])                                                        # ITM (+ LM)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)

    E = image_embeds[0]
    (_, neg_image, valid_image), (_, neg_text, valid_text) = recorder.calls
    # the original: one pass over [positives; texts with negative images; negative texts with their images]
    ids, mask = ids_and_mask(model, CAPTIONS)
    ids_all, mask_all = torch.cat([ids, ids, ids[neg_text]]), torch.cat([mask, mask, mask[neg_text]])
    out = model.text_encoder(ids_all, attention_mask=mask_all, mode='multimodal',
                             encoder_hidden_states=torch.cat([E, E[neg_image], E]))
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
    labels[B:] = labels[B:].masked_fill(~torch.cat([valid_image, valid_text]), -100)
    reference = [itm_loss(model.itm_head(out.last_hidden_state[:, 0]), labels)]
    if cls is BLIP_Pretrain:
        (dec_ids,), kw = decoder_calls[0]
        reference.append(model.text_decoder(dec_ids, attention_mask=kw['attention_mask'], encoder_hidden_states=E,
                                            labels=kw['labels'], loss_only=True).loss)
    want = torch.autograd.grad(sum(reference), params, allow_unused=True)
    torch.testing.assert_close(torch.stack(list(losses[1:])), torch.stack(reference), rtol=1e-5, atol=1e-6)
    for (name, _), g, w in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_of_one_image_has_no_valid_negative_and_does_not_crash():
    model = tiny()
    model.negative_sampler = recorder = Recorder()
    loss_ita, loss_itm = model(images(4), CAPTIONS[:4], alpha=0.4, idx=torch.tensor([9, 9, 9, 9]))
    assert torch.isfinite(loss_ita) and torch.isfinite(loss_itm)
    assert all(not valid.any() for _, _, valid in recorder.calls)   # negatives ignored: positives only
    loss_itm.backward()


def test_retrieval_and_itm_checkpoints_load_across(tmp_path):
    retrieval = tiny(seed=4)
    torch.save({'model': retrieval.state_dict()}, tmp_path / 'retrieval.pth')
    sd = retrieval.state_dict()
    momentum = {k for k in sd if k.startswith(('visual_encoder_m.', 'vision_proj_m.', 'text_encoder_m.', 'text_proj_m.'))}
    itm, msg = load_checkpoint(tiny(BLIP_ITM), str(tmp_path / 'retrieval.pth'))
    assert msg.missing_keys == []
    assert set(msg.unexpected_keys) == momentum | {'temp', 'image_queue', 'text_queue', 'idx_queue', 'ptr_queue'}
    blip_itm(str(tmp_path / 'retrieval.pth'), med_config=dict(TINY_MED), **KW)

    torch.save({'model': itm.state_dict()}, tmp_path / 'itm.pth')    # no momentum, queues or temp
    loaded = blip_retrieval(str(tmp_path / 'itm.pth'), med_config=dict(TINY_MED), queue_size=8, **KW)
    for online, twin in loaded.model_pairs:                          # twins copied from the loaded weights
        assert all(torch.equal(p, p_m) for p, p_m in zip(online.parameters(), twin.parameters()))
    assert torch.equal(loaded.itm_head.weight, sd['itm_head.weight'])


# ------------------------------------------------------------------------------------------ two processes

B_LOCAL, WORLD = 2, 2
DDP_IDX = torch.tensor([0, 1, 0, 2])   # sample 2 (rank 1) shows the same image as sample 0 (rank 0)
# the LM loss is a mean over tokens: both ranks get 8 caption tokens, so the mean of the rank means is
# the global mean (with unequal counts DDP weights tokens differently, in the original too)
DDP_CAPTIONS = ['a dog on a red sofa', 'two people', 'a cat on a mat', 'a red car']
SCENARIOS = {  # name: (class, kwargs, reference)
    'retrieval_all_rank': (BLIP_Retrieval, dict(negative_all_rank=True, itc_all_rank=True), 'global'),
    'pretrain_all_rank': (BLIP_Pretrain, dict(itc_all_rank=True), 'global'),
    'retrieval_original': (BLIP_Retrieval, dict(), 'halves'),
    'pretrain_original': (BLIP_Pretrain, dict(), 'halves'),
}


def argmax_sampler(weights):
    return weights.argmax(1), weights.sum(1) > 0


def block_argmax_sampler(weights):
    """argmax within each row's block of B_LOCAL columns: one process reproducing per-rank local negatives."""
    rows, cols = torch.arange(weights.shape[0]), torch.arange(weights.shape[1])
    block = (rows[:, None] // B_LOCAL) == (cols[None, :] // B_LOCAL)
    weights = weights * block
    return weights.argmax(1), weights.sum(1) > 0


def build(name):
    cls, kwargs, _ = SCENARIOS[name]
    model = tiny(cls, seed=0, med=MED_NO_DROPOUT, **kwargs)
    model.negative_sampler = argmax_sampler
    return model


def run(model, name, rows):
    image, captions = images(WORLD * B_LOCAL)[rows], DDP_CAPTIONS[rows]
    if SCENARIOS[name][0] is BLIP_Retrieval:
        return model(image, captions, alpha=0.4, idx=DDP_IDX[rows])
    return model(image, captions, alpha=0.4)


def snapshot(model, losses):
    return {'losses': torch.stack([loss.detach() for loss in losses]),
            'grads': {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
            'buffers': {k: v.clone() for k, v in model.named_buffers() if 'queue' in k or 'ptr' in k}}


def _ddp_worker(rank, port, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD)
    results = {}
    for name in SCENARIOS:
        model = build(name)
        ddp = DDP(model)  # keep a reference: its reducer must outlive the backward pass
        losses = run(ddp, name, slice(rank * B_LOCAL, (rank + 1) * B_LOCAL))
        sum(losses).backward()
        results[name] = snapshot(model, losses)
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


def reference(name):
    """What the two ranks should see, computed in this process."""
    if SCENARIOS[name][2] == 'global':
        model = build(name)
        if SCENARIOS[name][0] is BLIP_Pretrain:   # pretraining ITM negatives stay within each rank's batch
            model.negative_sampler = block_argmax_sampler
        model.negative_sampler = recorder = Recorder(model.negative_sampler)
        losses = run(model, name, slice(None))
        sum(losses).backward()
        crossed = any(((drawn // B_LOCAL) != torch.arange(len(drawn)) // B_LOCAL).any() for _, drawn, _ in recorder.calls)
        assert crossed == (name == 'retrieval_all_rank')   # all-rank negatives do come from the other rank
        ref = snapshot(model, losses)
        return [ref['losses']] * WORLD, ref['grads'], ref['buffers']
    halves, initial = [], build(name)
    for r in range(WORLD):
        model = build(name)
        losses = run(model, name, slice(r * B_LOCAL, (r + 1) * B_LOCAL))
        sum(losses).backward()
        halves.append(snapshot(model, losses))
    grads = {n: sum(h['grads'][n] for h in halves) / WORLD for n in halves[0]['grads']}
    buffers = {}
    for k, v in initial.named_buffers():
        if 'queue' in k and k not in ('ptr_queue', 'queue_ptr'):     # rank r's features at columns of rank r
            v = v.clone()
            for r, h in enumerate(halves):
                v[:, r * B_LOCAL:(r + 1) * B_LOCAL] = h['buffers'][k][:, :B_LOCAL]
            buffers[k] = v
        elif 'ptr' in k:
            buffers[k] = torch.tensor([WORLD * B_LOCAL])
    return [h['losses'] for h in halves], grads, buffers


def test_two_processes_match_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(WORLD)]
    for name in SCENARIOS:
        losses, grads, buffers = reference(name)
        if SCENARIOS[name][2] == 'global':  # the global loss is the mean of the rank losses (equal batches)
            torch.testing.assert_close(sum(r[name]['losses'] for r in ranks) / WORLD, losses[0], rtol=1e-5, atol=1e-6)
        else:
            for r in range(WORLD):
                torch.testing.assert_close(ranks[r][name]['losses'], losses[r], rtol=1e-5, atol=1e-6)
        for r in range(WORLD):
            assert ranks[r][name]['grads'].keys() == grads.keys()
            for n, g in grads.items():
                torch.testing.assert_close(ranks[r][name]['grads'][n], g, rtol=1e-4, atol=1e-6, msg=f'{name} {n}')
            for k, v in buffers.items():
                torch.testing.assert_close(ranks[r][name]['buffers'][k], v, rtol=1e-5, atol=1e-6, msg=f'{name} {k}')
