"""Zero-shot video QA with an image VQA model (paper section 5.6): every frame through the ViT, all frames'
tokens concatenated into one sequence the question encoder cross-attends to, no temporal modelling.

The answer decoder then works as for an image (``BLIP_VQA``): it ranks a candidate list (``rank``) or
generates (``generate``). Frames go through the ViT ``frame_chunk`` at a time, so that 16 frames x 577
tokens per video at 384 px fit a 24 GiB GPU at a useful batch size.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from models import generation
from models.blip_vqa import BLIP_VQA


def encode_video(visual_encoder: torch.nn.Module, video: torch.Tensor, frame_chunk: int = 32) -> torch.Tensor:
    """Videos ``[B, F, 3, S, S]`` -> every frame's ViT tokens concatenated, ``[B, F * N, W]`` (frame-major:
    frame 0's N tokens, then frame 1's, ...), encoding at most ``frame_chunk`` frames per ViT call."""
    if frame_chunk < 1:
        raise ValueError(f'frame_chunk must be at least 1, got {frame_chunk}')
    B, n_frames = video.shape[:2]
    frames = video.flatten(0, 1)
    tokens = torch.cat([visual_encoder(frames[s:s + frame_chunk]) for s in range(0, len(frames), frame_chunk)])
    return tokens.reshape(B, n_frames * tokens.shape[1], tokens.shape[2])


def tokenize_candidates(model: BLIP_VQA, answers: Sequence[str], device: torch.device):
    """Candidate answers as the decoder ranks them: ``[DEC]`` first, padded to the longest."""
    return model.tokenize_answers(list(answers), device)


@torch.no_grad()
def answer_video_questions(model: BLIP_VQA, video: torch.Tensor, questions: Sequence[str], inference: str = 'rank',
                           candidates: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                           answer_list: Sequence[str] = (), k_test: int = 128, frame_chunk: int = 32,
                           num_beams: int = 3, max_length: int = 10, min_length: int = 1) -> list[str]:
    """One answer per (video, question) row.

    Args:
        model: a (VQA-finetuned) ``BLIP_VQA`` in eval mode.
        video: ``[B, F, 3, S, S]``; questions: B strings.
        inference: 'rank' (best of the candidate list, after keeping the k_test most likely first tokens) or
            'generate' (beam search, the VQA model's settings).
        candidates: 'rank': ``tokenize_candidates(model, answer_list, device)``, computed once by the caller.
        answer_list: 'rank': the candidate strings.
    """
    states, mask = model.question_states(encode_video(model.visual_encoder, video, frame_chunk), list(questions))
    if inference == 'rank':
        if candidates is None or not answer_list:
            raise ValueError("inference 'rank' needs the candidate answers (answer_list)")
        best = model.rank_answer(states, mask, candidates[0], candidates[1], k_test)
        return [answer_list[int(i)] for i in best]
    if inference == 'generate':
        bos = torch.full((video.shape[0], 1), model.tokenizer.bos_token_id, device=video.device)
        honour = model.mask_question_padding
        ids = generation.generate(model.text_decoder, bos, states, mask if honour else None, num_beams=num_beams,
                                  max_length=max_length, min_length=min_length,
                                  eos_token_id=model.tokenizer.sep_token_id, pad_token_id=model.tokenizer.pad_token_id)
        return [model.tokenizer.decode(row, skip_special_tokens=True) for row in ids.tolist()]
    raise ValueError(f"inference must be 'rank' or 'generate', got {inference!r}")
