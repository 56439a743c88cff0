"""Beam search, greedy and nucleus-sampling decoding over the MED decoder.

Decoding semantics follow transformers 4.15's ``generate`` as BLIP used it (reference section 13),
so the same weights give the same tokens as the original. What differs is the work done:
  * self-attention keys/values are cached and appended one token per step;
  * each image's cross-attention keys/values are computed once per layer and shared by all of its
    beams / samples (rows are grouped per image, see ``models.med``), never copied or recomputed;
  * the beam bookkeeping reads one small tensor per step from the device.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from models.med import KVCache, MEDLMHeadModel, attention


class _Decoder:
    """Runs the decoder one step at a time: self-attention KV cache + per-image cross K/V.

    With ``use_cache=False`` every step recomputes the whole prefix against per-row copies of the
    image states, the straightforward way; tests use it as the reference for the cached path.
    """

    def __init__(self, decoder: MEDLMHeadModel, encoder_hidden_states, encoder_attention_mask,
                 rows_per_image: int, use_cache: bool = True, max_length: int = 0):
        self.decoder, self.use_cache = decoder, use_cache
        if use_cache:
            self.cross_kv = decoder.bert.precompute_cross_kv(encoder_hidden_states)
            self.states, self.cross_mask = None, encoder_attention_mask
            # preallocated self-attention K/V: written in place each step, one gather per beam reorder
            self.past = KVCache(decoder.config.num_hidden_layers, max_length) if max_length else None
        else:
            self.cross_kv = None
            self.states = encoder_hidden_states.repeat_interleave(rows_per_image, 0)
            self.cross_mask = None if encoder_attention_mask is None else \
                encoder_attention_mask.repeat_interleave(rows_per_image, 0)
            self.past = None
        self.started = False

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [R, V] (fp32) for the last position; feeds only the new tokens."""
        new = input_ids[:, -1:] if (self.started and self.use_cache) else input_ids
        self.started = True
        out = self.decoder.bert(new, past_key_values=self.past, use_cache=self.use_cache, cross_kv=self.cross_kv,
                                encoder_hidden_states=self.states, encoder_attention_mask=self.cross_mask,
                                is_decoder=True, mode='multimodal')
        self.past = out.past_key_values if self.use_cache else None
        return self.decoder.cls(out.last_hidden_state[:, -1]).float()

    def reorder(self, rows: torch.Tensor) -> None:
        if isinstance(self.past, KVCache):
            self.past.reorder(rows)
        elif self.past is not None:
            self.past = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.past]


class _StaticStep:
    """What a ``_GraphedDecoder`` keeps between ``generate`` calls: the static buffers its decode step reads
    and writes, and the CUDA graph captured over them.

    Capturing costs about two eager decode steps (a warm-up and the recorded run) plus instantiating a
    graph of ~260 kernels; with this kept, a later call with the same shapes only copies its image
    keys/values into the buffers and replays. ``key`` says when a kept one still fits: rows, cache length,
    image tokens, dtypes, autocast, and the storage of every decoder parameter (a graph reads parameters
    where they were at capture, so ``model.to(...)`` or ``load_state_dict(assign=True)`` must not reuse it;
    in-place updates such as an optimizer step are read at each replay).
    """

    def __init__(self, key: tuple, cache: KVCache, cross_kv: list):
        self.key, self.cache, self.cross_kv = key, cache, cross_kv
        self.tok = self.pos = self.mask = self.out = None
        self.graph = None   # torch.cuda.CUDAGraph, or _EagerGraph off the GPU

    def load(self, cross_kv: list) -> None:
        """Start a new call: its image keys/values into the captured buffers, an empty cache."""
        for (k, v), (k_new, v_new) in zip(self.cross_kv, cross_kv):
            k.copy_(k_new)
            v.copy_(v_new)
        self.cache.length = 0


class _EagerGraph:
    """Off the GPU, a stand-in for a captured graph: the tensors bound at capture, which every eager 'replay'
    runs the step on, as a CUDA graph does (a buffer replaced instead of written in place would be missed in
    both). Holds no reference to the decoder, so the kept state does not keep the model alive."""

    def __init__(self, *tensors):
        self.tensors = tensors


# one kept static step per decoder, while it is in eval mode (MEDLMHeadModel.train releases it)
_STATIC_STEPS: 'weakref.WeakKeyDictionary[MEDLMHeadModel, _StaticStep]' = weakref.WeakKeyDictionary()


def release_static_decoding(decoder: Optional[MEDLMHeadModel] = None) -> None:
    """Free the buffers and CUDA graph kept for ``decoder``'s decoding (every decoder's if None)."""
    if decoder is None:
        _STATIC_STEPS.clear()
    else:
        _STATIC_STEPS.pop(decoder, None)


MEDLMHeadModel.on_train.append(release_static_decoding)


def _static_key(decoder: MEDLMHeadModel, cross_kv: list, rows: int, max_length: int) -> tuple:
    k = cross_kv[0][0]
    device = k.device.type
    amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    params = tuple((p.data_ptr(), p.dtype) for p in decoder.parameters())
    return rows, max_length, tuple(k.shape), k.dtype, str(k.device), amp, decoder.training, params


class _GraphedDecoder:
    """``_Decoder`` whose decode steps (one new token per row) replay one captured CUDA graph.

    Eager decoding of the base model is host-bound on a GPU (~264 kernel launches per step). Here the
    prompt step runs eagerly into a preallocated ``KVCache``; every later step is one static computation
    (token and position in fixed buffers, new K/V written with ``index_copy_``, self-attention over all
    ``max_length`` slots with an additive mask: 0 up to the current position, -inf beyond, i.e. exactly
    zero probability for unused slots), captured at the first such step with the autocast weight-cast
    cache disabled (the graph owns its casts) and replayed afterwards. The buffers and the graph are kept
    for the next call with the same shapes (``_StaticStep``). Off the GPU the same static step runs
    eagerly. Same function as ``_Decoder``; the attention kernel differs (masked memory-efficient vs
    flash), so bf16 logits can differ in the last bits.
    """

    def __init__(self, decoder: MEDLMHeadModel, encoder_hidden_states, encoder_attention_mask,
                 rows_per_image: int, use_cache: bool = True, max_length: int = 0):
        if encoder_attention_mask is not None or not use_cache or not max_length:
            raise ValueError('cuda_graph decoding needs all-ones image masks (None) and the KV cache')
        self.decoder, self.bert = decoder, decoder.bert
        cross_kv = self.bert.precompute_cross_kv(encoder_hidden_states)
        key = _static_key(decoder, cross_kv, encoder_hidden_states.shape[0] * rows_per_image, max_length)
        kept = _STATIC_STEPS.get(decoder)
        if kept is not None and kept.key == key:
            kept.load(cross_kv)
            self.s = kept
        else:
            _STATIC_STEPS.pop(decoder, None)  # its graph and buffers go before new ones are allocated
            self.s = _STATIC_STEPS[decoder] = _StaticStep(
                key, KVCache(decoder.config.num_hidden_layers, max_length), cross_kv)
        self.use_graph = encoder_hidden_states.is_cuda

    def _step(self, tok, pos, mask, out, cache_k, cache_v, cross_kv) -> None:
        x = self.bert.embeddings(tok, position_ids=pos[None])                         # [R,1,H]
        for i, layer in enumerate(self.bert.encoder.layer):
            sa = layer.attention.self
            q, k, v = sa.project_qkv(x)
            cache_k[i].index_copy_(2, pos, k)
            cache_v[i].index_copy_(2, pos, v)
            h = attention(q, cache_k[i], cache_v[i], mask, 0.0, False)
            x = layer.attention.output(h.transpose(1, 2).reshape(x.shape[0], 1, -1), x)
            x, _ = layer.crossattention(x, None, None, kv=cross_kv[i])
            x = layer.output(layer.intermediate(x), x)
        out.copy_(self.decoder.cls(x[:, -1]).float())

    def _capture(self) -> None:
        s = self.s
        bound = (s.tok, s.pos, s.mask, s.out, s.cache.k, s.cache.v, s.cross_kv)
        if not self.use_graph:
            s.graph = _EagerGraph(*bound)
            return
        ctx = torch.autocast('cuda', dtype=torch.get_autocast_dtype('cuda'), cache_enabled=False) \
            if torch.is_autocast_enabled('cuda') else contextlib.nullcontext()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), ctx:
            self._step(*bound)  # warm-up; writes slot T with the values the replay writes again
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), ctx:
            self._step(*bound)
        s.graph = graph

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = self.s
        if s.cache.length == 0:  # the prompt, eagerly, into the preallocated cache
            out = self.bert(input_ids, past_key_values=s.cache, cross_kv=s.cross_kv, is_decoder=True,
                            mode='multimodal')
            logits = self.decoder.cls(out.last_hidden_state[:, -1]).float()
            if s.tok is None:
                s.tok = input_ids[:, -1:].clone()
                s.pos = torch.zeros(1, dtype=torch.long, device=input_ids.device)
                s.mask = torch.empty((1, 1, 1, s.cache.max_length), dtype=s.cache.k.dtype, device=input_ids.device)
                s.out = torch.empty_like(logits)
            s.mask.fill_(float('-inf'))
            return logits
        T = s.cache.length
        s.tok.copy_(input_ids[:, -1:])
        s.pos.fill_(T)
        s.mask[..., :T + 1] = 0
        if s.graph is None:
            self._capture()
        if isinstance(s.graph, _EagerGraph):
            self._step(*s.graph.tensors)
        else:
            s.graph.replay()
        s.cache.advance(1)
        return s.out.clone()

    def reorder(self, rows: torch.Tensor) -> None:
        self.s.cache.reorder(rows)


def apply_repetition_penalty(scores: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Every token already in the row (prompt included, once): s*penalty if s<0 else s/penalty."""
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, input_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, input_ids, seen)


def apply_min_length(scores: torch.Tensor, cur_len: int, min_length: int, eos_token_id: int) -> torch.Tensor:
    if cur_len < min_length:
        scores = scores.clone()
        scores[:, eos_token_id] = float('-inf')
    return scores


def top_k_top_p_filter(scores: torch.Tensor, top_k: int = 50, top_p: float = 1.0) -> torch.Tensor:
    """transformers' TopK then TopP warpers: removed scores become -inf, at least one token is kept."""
    if top_k > 0:
        k = min(top_k, scores.shape[-1])
        kth = scores.topk(k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float('-inf'))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the first token that crosses top_p
        remove[..., 0] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), float('-inf'))
    return scores


@dataclass
class _Hypotheses:
    """Finished hypotheses of one image (transformers 4.15 BeamHypotheses, length_penalty 1)."""
    num_beams: int
    beams: list = field(default_factory=list)
    worst_score: float = 1e9

    def add(self, ids: list, sum_logprobs: float) -> None:
        score = sum_logprobs / len(ids)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, ids))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        return len(self.beams) >= self.num_beams and self.worst_score >= best_sum_logprobs / cur_len


@torch.no_grad()
@torch.compiler.set_stance('force_eager')  # layers compiled for training (models.compile) decode eagerly
def generate(decoder: MEDLMHeadModel, input_ids: torch.Tensor, encoder_hidden_states,
             encoder_attention_mask: Optional[torch.Tensor] = None, *, sample: bool = False, num_beams: int = 1,
             max_length: int = 30, min_length: int = 0, top_p: float = 1.0, top_k: int = 50,
             repetition_penalty: float = 1.0, num_return_sequences: int = 1, eos_token_id: int = 102,
             pad_token_id: int = 0, use_cache: bool = True, cuda_graph: bool = False,
             step_runner=None) -> torch.Tensor:
    """Decode continuations of ``input_ids`` conditioned on image (or question) states.

    Args:
        input_ids: [B, P] prompt ids, one row per image.
        encoder_hidden_states: [B, N, W] states the decoder cross-attends to (one per image).
        encoder_attention_mask: [B, N] or None (all valid).
        max_length / min_length: totals including the P prompt tokens (transformers' convention).
        num_return_sequences: best hypotheses per image (beam search) or samples per image.
        use_cache: False recomputes everything each step (reference path for tests).
        cuda_graph: replay each decode step as one CUDA graph (``_GraphedDecoder``; all-ones image masks
            only). Several times faster on a GPU where eager decoding is launch-bound; off by default. The
            graph and its buffers are kept for later calls with the same shapes (one set per decoder, freed
            by ``decoder.train()`` or ``release_static_decoding``).
        step_runner: decode with this instead of ``decoder`` (which is then unused): an object with
            ``logits(ids [R, T]) -> [R, V]`` (fp32, next-token logits; the first call gets the prompt rows, later
            ones rows one token longer) and ``reorder(rows)``, R = B * beams (or samples), e.g. onnxruntime
            sessions (``models.onnx_generate``): the same search on another runtime.

    Returns:
        [B * num_return_sequences, T] token ids, rows grouped per image, ``[PAD]`` after the end.
    """
    if max_length <= input_ids.shape[1]:
        raise ValueError(f'max_length ({max_length}) counts the prompt and must exceed its length ({input_ids.shape[1]})')
    if sample:
        return _sample_or_greedy(decoder, input_ids, encoder_hidden_states, encoder_attention_mask, True,
                                 max_length, min_length, top_k, top_p, repetition_penalty,
                                 num_return_sequences, eos_token_id, pad_token_id, use_cache, cuda_graph,
                                 step_runner)
    if num_beams == 1:
        if num_return_sequences != 1:
            raise ValueError('greedy decoding returns one sequence per image; use beams or sampling')
        return _sample_or_greedy(decoder, input_ids, encoder_hidden_states, encoder_attention_mask, False,
                                 max_length, min_length, 0, 1.0, repetition_penalty, 1, eos_token_id,
                                 pad_token_id, use_cache, cuda_graph, step_runner)
    if num_return_sequences > num_beams:
        raise ValueError(f'num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})')
    return _beam_search(decoder, input_ids, encoder_hidden_states, encoder_attention_mask, num_beams,
                        max_length, min_length, repetition_penalty, num_return_sequences, eos_token_id,
                        pad_token_id, use_cache, cuda_graph, step_runner)


def _sample_or_greedy(decoder, input_ids, states, mask, sample, max_length, min_length, top_k, top_p,
                      repetition_penalty, n, eos, pad, use_cache, cuda_graph=False, step_runner=None):
    ids = input_ids.repeat_interleave(n, 0)                                # [B*n, P]
    runner = step_runner or (_GraphedDecoder if cuda_graph else _Decoder)(decoder, states, mask, n, use_cache,
                                                                          max_length)
    unfinished = torch.ones(ids.shape[0], dtype=torch.long, device=ids.device)
    while ids.shape[1] < max_length:
        scores = runner.logits(ids)
        scores = apply_repetition_penalty(scores, ids, repetition_penalty)
        scores = apply_min_length(scores, ids.shape[1], min_length, eos)
        if sample:
            scores = top_k_top_p_filter(scores, top_k, top_p)
            next_tokens = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
        else:
            next_tokens = scores.argmax(-1)
        next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        ids = torch.cat([ids, next_tokens[:, None]], 1)
        unfinished = unfinished * (next_tokens != eos).long()
        if not bool(unfinished.any()):
            break
    return ids


def _beam_search(decoder, input_ids, states, mask, k, max_length, min_length, repetition_penalty, n_return,
                 eos, pad, use_cache, cuda_graph=False, step_runner=None):
    B, device = input_ids.shape[0], input_ids.device
    ids = input_ids.repeat_interleave(k, 0)                                # [B*k, P], beams grouped per image
    host_ids = ids.cpu().tolist()
    beam_scores = torch.zeros(B, k, device=device)
    beam_scores[:, 1:] = -1e9  # all beams start identical: expand only the first one
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(k) for _ in range(B)]
    done = [False] * B
    runner = step_runner or (_GraphedDecoder if cuda_graph else _Decoder)(decoder, states, mask, k, use_cache,
                                                                          max_length)
    while ids.shape[1] < max_length:
        cur_len = ids.shape[1]
        scores = F.log_softmax(runner.logits(ids), -1)                      # [B*k, V]
        scores = apply_repetition_penalty(scores, ids, repetition_penalty)
        scores = apply_min_length(scores, cur_len, min_length, eos)
        V = scores.shape[1]
        scores = (scores + beam_scores[:, None]).view(B, k * V)
        top_scores, top_ids = scores.topk(2 * k, dim=1)                    # [B, 2k], sorted
        top_scores_h, top_ids_h = top_scores.tolist(), top_ids.tolist()    # the step's one device->host read
        next_scores, next_tokens, next_rows = [], [], []
        for b in range(B):
            if done[b]:
                next_scores += [0.0] * k
                next_tokens += [pad] * k
                next_rows += [b * k] * k
                continue
            chosen = 0
            for rank, (score, flat) in enumerate(zip(top_scores_h[b], top_ids_h[b])):
                row, token = b * k + flat // V, flat % V
                if token == eos:
                    if rank < k:
                        hyps[b].add(host_ids[row], score)
                else:
                    next_scores.append(score)
                    next_tokens.append(token)
                    next_rows.append(row)
                    chosen += 1
                if chosen == k:
                    break
            done[b] = done[b] or hyps[b].is_done(top_scores_h[b][0], cur_len)
        # one host->device copy for the step's choices (rows and tokens are exact in float64)
        step = torch.tensor([next_rows, next_tokens, next_scores], dtype=torch.float64).to(device, non_blocking=True)
        rows, tokens = step[0].long(), step[1].long()
        beam_scores = step[2].float()
        ids = torch.cat([ids.index_select(0, rows), tokens[:, None]], 1)
        host_ids = [host_ids[r] + [t] for r, t in zip(next_rows, next_tokens)]
        runner.reorder(rows)
        if all(done):
            break
    final_scores = beam_scores.tolist()
    for b in range(B):
        if not done[b]:
            for j in range(k):
                hyps[b].add(host_ids[b * k + j], final_scores[b * k + j])
    best = []
    for b in range(B):
        ranked = sorted(hyps[b].beams, key=lambda h: h[0])[::-1]  # ties: the later hypothesis, as HF's pop()
        best += [seq for _, seq in ranked[:n_return]]
    width = min(max(len(s) for s in best) + 1, max_length)
    out = torch.full((len(best), width), pad, dtype=torch.long)
    for i, seq in enumerate(best):
        out[i, :len(seq)] = torch.tensor(seq)
        if len(seq) < max_length:
            out[i, len(seq)] = eos
    return out.to(device)
