"""Zero-shot video question answering (MSRVTT-QA, MSVD-QA) with an image VQA model (paper section 5.6).

Each video is ``num_frm_test`` uniformly sampled frames (the paper: 16); every frame goes through the ViT and
all frames' tokens, concatenated, are what the question encoder attends to (no temporal modelling). Answers
are ranked over ``answer_list`` (``inference: rank``, the VQA model's rank mode, ``k_test`` candidates after
first-token pruning) or generated (``inference: generate``). Writes ``result/videoqa_test.json`` and a
``log.txt`` JSON line with ``test_acc``: exact match after the VQA answer normalisation, in percent.

    torchrun --nproc_per_node=8 eval_videoqa.py --config configs/videoqa_msrvtt.yaml --output_dir output/msrvtt_qa
    python eval_videoqa.py --config configs/toy/videoqa.yaml --output_dir output/toy_videoqa \\
        --options pretrained=output/toy_vqa/checkpoint_03.pth
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from data.videoqa_dataset import videoqa_collate_fn
from engine.config import VisionConfig
from engine.results import save_result
from engine.runner import Run, progress
from engine.vqa_eval import vqa_accuracy
from models.blip_vqa import blip_vqa
from models.video_qa import answer_video_questions, tokenize_candidates

INFERENCE = ('rank', 'generate')


@dataclass
class VideoQAConfig(VisionConfig):
    video_root: str = ''
    test_file: str = ''
    answer_list: str = ''
    video_fmt: str = '.mp4'
    video_name: str = 'video{}'
    video_mapping: str = ''
    pretrained: str = ''
    batch_size: int = 8
    frame_chunk: int = 32
    num_frm_test: int = 16
    inference: str = 'rank'
    k_test: int = 128
    num_beams: int = 3
    max_length: int = 10
    min_length: int = 1


def check_config(config: VideoQAConfig, path: str) -> None:
    if config.inference not in INFERENCE:
        raise ValueError(f'{path}: inference must be one of {INFERENCE}, got {config.inference!r}')
    if config.inference == 'rank' and not config.answer_list:
        raise ValueError(f"{path}: inference 'rank' needs answer_list (a JSON list of candidate answers)")
    if not config.test_file:
        raise ValueError(f'{path}: test_file (the QA json) is empty')


@torch.no_grad()
def answer_all(run: Run, model, loader) -> list[dict]:
    config, device = run.config, run.device
    answer_list = loader.dataset.answer_list
    candidates = tokenize_candidates(model, answer_list, device) if config.inference == 'rank' else None
    results = []
    for video, questions, question_ids in progress(loader, 'video qa'):
        video = video.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            answers = answer_video_questions(model, video, questions, config.inference, candidates, answer_list,
                                             k_test=config.k_test, frame_chunk=config.frame_chunk,
                                             num_beams=config.num_beams, max_length=config.max_length,
                                             min_length=config.min_length)
        results += [{'question_id': q, 'answer': a} for q, a in zip(question_ids, answers)]
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    run = Run.start(argv, VideoQAConfig, description=__doc__)
    config = run.config
    check_config(config, run.args.config)
    test_set = run.datasets('videoqa')
    (loader,) = run.loaders([test_set], [False], [config.batch_size], collate_fns=[videoqa_collate_fn])
    model = blip_vqa(pretrained=config.pretrained, **config.model_kwargs()).to(run.device).eval()
    results = answer_all(run, model, loader)
    # distributed samplers pad with duplicates: keep one answer per question
    path = save_result(results, run.result_dir, 'videoqa_test', remove_duplicate='question_id')
    stats = {}
    if run.is_main:
        with open(path) as f:
            merged = json.load(f)
        stats = {'test_acc': vqa_accuracy(merged, test_set.annotation), 'num_questions': len(merged),
                 'inference': config.inference, 'num_frm_test': config.num_frm_test}
    run.log(stats)
    run.finish()
    return stats


if __name__ == '__main__':
    main(sys.argv[1:])
