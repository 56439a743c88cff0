"""BLIP for visual question answering (``BLIP_VQA``, reference 5.7).

ViT -> question encoder (MED, image-grounded, ``[ENC]`` first) -> answer decoder (MED + LM head,
cross-attending to the *question states*, ``[DEC]`` first). The encoder and decoder are independent
(no weight tying). Same factory, constructor and ``forward`` as the original, plus:

  * ``inference='generate'`` masks question padding in the decoder's cross-attention by default.
    The original passed an all-ones mask there (quirk 10.4.5: the answer attends to ``[PAD]`` states
    and so depends on how long the other questions of the batch are); ``mask_question_padding=False``
    (constructor or ``forward``) reproduces it exactly, e.g. to match the released numbers token for token.
  * ``inference='rank'`` computes the question states' cross-attention keys/values once per question
    and shares them by the question's ``k`` candidate answers (no ``tile`` copies); ``return_topk=N``
    returns the N best answers with their scores instead of the argmax.
  * ``remap_checkpoint`` documents the one shape gap of ViT-L pretrain checkpoints (quirk 10.4.6).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from models import generation
from models.blip import init_tokenizer, load_med_config
from models.blip_pretrain import TextBatch
from models.layout import load_pretrained
from models.med import MED, MEDLMHeadModel
from models.vit import create_vit


def drop_decoder_cross_kv_mismatch(state_dict: Mapping[str, torch.Tensor],
                                   model_state: Mapping[str, torch.Tensor]) -> tuple[dict, list]:
    """Drop ``text_decoder`` cross-attention key/value weights whose shape differs from the model's.

    A ViT-L pretrain checkpoint's decoder attends to 1024-wide image tokens ([768, 1024]); the VQA
    decoder attends to 768-wide question states ([768, 768]) (reference 5.7, quirk 10.4.6). The
    original deleted these keys silently, leaving them at their random initialisation; we do the
    same, but only for these keys and with a report. Any other shape mismatch still fails the load.

    Returns:
        (state_dict without those keys, the dropped key names)
    """
    out, dropped = dict(state_dict), []
    for key, value in state_dict.items():
        if (key.startswith('text_decoder.bert.encoder.layer.') and '.crossattention.self.' in key
                and key.endswith(('key.weight', 'value.weight'))
                and key in model_state and value.shape != model_state[key].shape):
            del out[key]
            dropped.append(key)
    return out, dropped


class BLIP_VQA(nn.Module):
    """ViT + image-grounded question encoder + answer decoder.

    Args:
        med_config: MED config (json path, dict or MEDConfig). The encoder's cross-attention reads
            the ViT width; the decoder's reads the text width (question states), as in the original
            whose decoder config kept the file's 768 even for ViT-L.
        image_size, vit, vit_grad_ckpt, vit_ckpt_layer: ViT options (drop path 0.1).
        mask_question_padding: honour the question padding mask in 'generate' (default). False
            reproduces the original's all-ones mask.
    """

    def __init__(self, med_config='configs/med_config.json', image_size: int = 480, vit='base',
                 vit_grad_ckpt: bool = False, vit_ckpt_layer: int = 0, mask_question_padding: bool = True):
        super().__init__()
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer,
                                                       drop_path_rate=0.1)
        self.tokenizer = init_tokenizer()
        self.text_encoder = MED(load_med_config(med_config, encoder_width=vision_width))
        decoder_config = load_med_config(med_config)
        self.text_decoder = MEDLMHeadModel(decoder_config.replace(encoder_width=decoder_config.hidden_size))
        self.mask_question_padding = mask_question_padding

    # ------------------------------------------------------------------------------------------ helpers

    def encode_question(self, image: torch.Tensor, question: Union[str, Sequence[str]]):
        """Question states [B, Lq, H] grounded on the image, and the question padding mask [B, Lq]."""
        return self.question_states(self.visual_encoder(image), question)         # ViT tokens [B, N, Dv]

    def question_states(self, image_embeds: torch.Tensor, question: Union[str, Sequence[str]]):
        """Question states [B, Lq, H] attending to ``image_embeds`` [B, N, Dv] (an image's ViT tokens, or a video's
        frames' tokens in one sequence), with ``[ENC]`` first, and the question padding mask [B, Lq]."""
        q = self.tokenize_questions(question, image_embeds.device)
        return self.states_from_tokens(image_embeds, q.input_ids, q.attention_mask), q.attention_mask

    def tokenize_questions(self, question: Union[str, Sequence[str]], device=None, static: bool = False) -> TextBatch:
        """Questions as the encoder reads them (at most 35 tokens); ``static``: padded to 35, the fixed shape a
        replayed CUDA graph needs (the same states where the mask is 1)."""
        q = self.tokenizer(question, padding='max_length' if static else 'longest', truncation=True, max_length=35,
                           return_tensors='pt')
        return TextBatch(q.input_ids.to(device), q.attention_mask.to(device))

    def encode_tokens(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``encode_question``'s states from tokenised questions (``tokenize_questions``)."""
        return self.states_from_tokens(self.visual_encoder(image), input_ids, attention_mask)

    def states_from_tokens(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
        """Question states [B, Lq, H] of tokenised questions attending to ``image_embeds`` ([ENC] put first)."""
        ids = input_ids.clone()
        ids[:, 0] = self.tokenizer.enc_token_id
        return self.text_encoder(ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                 mode='multimodal').last_hidden_state

    def tokenize_answers(self, answer, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer ids [A, La] with ``[DEC]`` first and their mask, from strings or a tokenizer output."""
        if isinstance(answer, str):
            answer = [answer]
        if isinstance(answer, (list, tuple)) and all(isinstance(a, str) for a in answer):
            a = self.tokenizer(list(answer), padding='longest', return_tensors='pt').to(device)
            ids = a.input_ids.clone()
            ids[:, 0] = self.tokenizer.bos_token_id
            return ids, a.attention_mask
        return answer['input_ids'].to(device), answer['attention_mask'].to(device)  # already [DEC]-first (train_vqa)

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, image: torch.Tensor, question: Union[str, Sequence[str]], answer=None,
                n: Optional[Union[Sequence[int], torch.Tensor]] = None, weights: Optional[torch.Tensor] = None,
                train: bool = True, inference: str = 'rank', k_test: int = 128, *,
                return_topk: Optional[int] = None, mask_question_padding: Optional[bool] = None,
                num_beams: int = 3, max_length: int = 10, min_length: int = 1):
        """Training loss, generated answers or ranked answers (reference 5.7).

        Args:
            image: [B, 3, S, S].
            question: B strings.
            answer: train: the ``sum(n)`` answers (strings), grouped per question; 'rank': the candidate
                list (strings, or the tokenizer output with ``[DEC]`` at position 0, as train_vqa passes).
            n: train: number of answers of each question (B ints).
            weights: train: [sum(n)] weight of each answer.
            k_test: 'rank': candidates kept after first-token pruning.
            return_topk: 'rank': return (indices [B, N], scores [B, N]) of the N best instead of [B] indices.
            mask_question_padding: 'generate': overrides the constructor's choice.
            num_beams, max_length, min_length: 'generate' beam search (the original's 3 / 10 / 1).

        Returns:
            train: scalar loss ``sum(weights * answer_loss) / B``; 'generate': B strings;
            'rank': [B] indices into the candidate list (or the top-N pair above).
        """
        states, q_mask = self.encode_question(image, question)
        if train:
            return self.answer_loss(states, q_mask, answer, n, weights)
        if inference == 'generate':
            honour = self.mask_question_padding if mask_question_padding is None else mask_question_padding
            bos = torch.full((image.shape[0], 1), self.tokenizer.bos_token_id, device=image.device)
            ids = generation.generate(self.text_decoder, bos, states, q_mask if honour else None,
                                      num_beams=num_beams, max_length=max_length, min_length=min_length,
                                      eos_token_id=self.tokenizer.sep_token_id,
                                      pad_token_id=self.tokenizer.pad_token_id)
            return [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids.tolist()]
        if inference == 'rank':
            answer_ids, answer_atts = self.tokenize_answers(answer, image.device)
            return self.rank_answer(states, q_mask, answer_ids, answer_atts, k_test, return_topk=return_topk)
        raise ValueError(f"inference must be 'rank' or 'generate', got {inference!r}")

    def answer_loss(self, states: torch.Tensor, q_mask: torch.Tensor, answer, n, weights) -> torch.Tensor:
        """``sum_i weights_i * LM_loss(answer_i | question of answer_i) / B`` (summed smoothed token NLL)."""
        if answer is None or n is None or weights is None:
            raise ValueError('training needs answer, n and weights')
        ids, atts = self.tokenize_answers(answer, states.device)
        targets = ids.masked_fill(ids == self.tokenizer.pad_token_id, -100)
        n = torch.as_tensor(n, device=states.device)
        if int(n.sum()) != ids.shape[0]:
            raise ValueError(f'n sums to {int(n.sum())} but there are {ids.shape[0]} answers')
        # Project each question's states to cross-attention K/V once; answers of the same question
        # share them (row grouping when every question has the same number of answers, else a gather).
        cross_kv = self.text_decoder.bert.precompute_cross_kv(states)
        if not bool((n == n[0]).all()):
            cross_kv = [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in cross_kv]
            q_mask = q_mask.repeat_interleave(n, 0)
        out = self.text_decoder(ids, attention_mask=atts, encoder_attention_mask=q_mask, cross_kv=cross_kv,
                                labels=targets, reduction='none', loss_only=True)
        return (weights.to(out.loss.dtype) * out.loss).sum() / states.shape[0]

    def static_answers(self, answer: Sequence[str], n: Sequence[int], weights: torch.Tensor, per_question: int,
                       length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's answers in the fixed layout of ``losses`` (on the host, before the step): ``per_question`` rows
        per question, each ``length`` tokens, ``[DEC]`` first; the rows a question does not fill hold an empty
        answer with weight 0. Returns ids [B * per_question, length], their mask and weights [B * per_question].

        A question with more answers or an answer with more tokens is an error, never cut: the loss stays
        ``answer_loss``'s."""
        n = [int(c) for c in n]
        if max(n) > per_question:
            raise ValueError(f'a question has {max(n)} answers, more than the fixed {per_question} per question')
        a = self.tokenizer(list(answer), padding='longest', return_tensors='pt')
        if a.input_ids.shape[1] > length:
            raise ValueError(f'an answer has {a.input_ids.shape[1]} tokens, more than the fixed length {length}')
        rows = torch.tensor([q * per_question + j for q, count in enumerate(n) for j in range(count)], dtype=torch.long)
        total = len(n) * per_question
        ids = torch.full((total, length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(total, length, dtype=a.attention_mask.dtype)
        ids[:, 1], mask[:, :2] = self.tokenizer.sep_token_id, 1        # the filler rows: '[DEC] [SEP]'
        ids[rows], mask[rows] = 0, 0
        ids[rows, :a.input_ids.shape[1]] = a.input_ids
        mask[rows, :a.input_ids.shape[1]] = a.attention_mask
        ids[:, 0] = self.tokenizer.bos_token_id
        w = torch.zeros(total, dtype=torch.float)
        w[rows] = torch.as_tensor(weights, dtype=torch.float)
        return ids, mask, w

    def losses(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
               answer_ids: torch.Tensor, answer_mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The training loss of ``forward(train=True)`` on fixed shapes (the body of a replayed CUDA graph):
        questions from ``tokenize_questions(static=True)``, answers from ``static_answers`` (the same number of
        rows for every question, so the answers of a question share its cross-attention keys/values by row
        grouping; filler rows have weight 0). No host read; the same value as ``answer_loss``."""
        states = self.encode_tokens(image, question_ids, question_mask)
        targets = answer_ids.masked_fill(answer_ids == self.tokenizer.pad_token_id, -100)
        cross_kv = self.text_decoder.bert.precompute_cross_kv(states)
        out = self.text_decoder(answer_ids, attention_mask=answer_mask, encoder_attention_mask=question_mask,
                                cross_kv=cross_kv, labels=targets, reduction='none', loss_only=True)
        return (weights.to(out.loss.dtype) * out.loss).sum() / states.shape[0]

    @torch.no_grad()
    def rank_answer(self, question_states: torch.Tensor, question_atts: torch.Tensor, answer_ids: torch.Tensor,
                    answer_atts: torch.Tensor, k: int, return_topk: Optional[int] = None):
        """Pick each question's answer from a candidate list (the original's ``rank_answer``).

        1. One decoder step on ``[DEC]``: probability of each candidate's first token; keep the top k.
        2. Score the k candidates by minus their summed, label-smoothed token NLL (the decoder loss with
           ``reduction='none'``); the first-token probability only prunes, it is not added.

        Args:
            question_states: [B, Lq, H]; question_atts: [B, Lq] padding mask.
            answer_ids: [A, La] candidates, ``[DEC]`` first, ``[PAD]`` (0) after ``[SEP]``; answer_atts [A, La].
            k: candidates kept per question (min(k, A)).
            return_topk: if set, return the N best (indices, scores), sorted by score.

        Returns:
            [B] candidate indices, or (indices [B, N], scores [B, N]).
        """
        B, k = question_states.shape[0], min(k, answer_ids.shape[0])
        # the question states' K/V, computed once and shared by the first step and all k candidates
        cross_kv = self.text_decoder.bert.precompute_cross_kv(question_states)
        start = answer_ids[:1, :1].expand(B, 1)                                        # [B, 1] [DEC]
        logits = self.text_decoder(start, encoder_attention_mask=question_atts, cross_kv=cross_kv).logits[:, 0]
        first_prob = logits.float().softmax(-1).index_select(1, answer_ids[:, 1])    # [B, A]
        topk_probs, topk_ids = first_prob.topk(k, dim=1)                              # [B, k]
        ids = answer_ids[topk_ids.view(-1)]                                           # [B*k, La] per question
        atts = answer_atts[topk_ids.view(-1)]
        targets = ids.masked_fill(ids == self.tokenizer.pad_token_id, -100)
        out = self.text_decoder(ids, attention_mask=atts, encoder_attention_mask=question_atts, cross_kv=cross_kv,
                                labels=targets, reduction='none', loss_only=True)     # rows j -> question j // k
        scores = -out.loss.view(B, k)                                                 # smoothed log-likelihood
        if return_topk is None:
            return topk_ids.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
        best_scores, order = scores.topk(min(return_topk, k), dim=1)
        return topk_ids.gather(1, order), best_scores

    # ------------------------------------------------------------------------------------------ checkpoints

    def remap_checkpoint(self, state_dict: Mapping[str, torch.Tensor]) -> dict:
        """Called by ``load_checkpoint``: drops (and reports) a ViT-L pretrain decoder's cross K/V."""
        state_dict, dropped = drop_decoder_cross_kv_mismatch(state_dict, self.state_dict())
        if dropped:
            print(f'BLIP_VQA: dropped {len(dropped)} text_decoder cross-attention key/value weights whose width '
                  f'differs (ViT-L pretrain checkpoint; the VQA decoder attends to question states); '
                  f'they stay randomly initialised, as in the original')
        return state_dict


def blip_vqa(pretrained: str = '', **kwargs) -> BLIP_VQA:
    """Build BLIP_VQA, optionally loading a pretrain or VQA checkpoint.

    The only keys a checkpoint may lack are the decoder cross-attention K/V weights dropped by
    ``remap_checkpoint`` (ViT-L pretrain); anything else missing is an error.
    """
    model = BLIP_VQA(**kwargs)
    load_pretrained(model, pretrained, 'blip_vqa')
    return model
