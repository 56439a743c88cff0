"""Fine-tune BLIP for VQA and answer the test questions (result file for the VQA server).

Answers are ranked over ``answer_list`` ('rank', the paper's setting) or generated ('generate').
Where the evaluated split carries answers (the toy dataset, or VQA val), the standard VQA accuracy
is computed too.

    torchrun --nproc_per_node=16 train_vqa.py --config configs/vqa.yaml --output_dir output/vqa
    python train_vqa.py --config configs/toy/vqa.yaml --output_dir output/toy_vqa
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from data.vqa_dataset import vqa_collate_fn
from engine.config import VisionConfig
from engine.precision import autocast
from engine.results import save_result
from engine.runner import Run, cosine_epoch_lr, progress
from engine.vqa_eval import vqa_accuracy
from models.blip_vqa import blip_vqa


@dataclass
class VQAConfig(VisionConfig):
    vqa_root: str = ''
    vg_root: str = ''
    train_files: list = field(default_factory=lambda: ['vqa_train', 'vqa_val', 'vg_qa'])
    ann_root: str = ''
    pretrained: str = ''
    batch_size_train: int = 16
    batch_size_test: int = 32
    init_lr: float = 2e-5
    image_size: int = 480
    k_test: int = 128
    inference: str = 'rank'
    weight_decay: float = 0.05
    min_lr: float = 0.0
    max_epoch: int = 10


def vqa_step(model, batch, ctx) -> dict:
    image, question, answer, weights, n = batch
    loss = model(image.to(ctx.device, non_blocking=True), question, answer, train=True, n=n,
                 weights=weights.to(ctx.device, non_blocking=True))
    return {'loss': loss}


@torch.no_grad()
def answer_questions(run: Run, loader) -> list[dict]:
    model, config, device = run.eval_model, run.config, run.device
    model.eval()
    answer_list = loader.dataset.answer_list
    results = []
    if config.inference == 'rank':
        answer_candidates = model.tokenizer(answer_list, padding='longest', return_tensors='pt').to(device)
        answer_candidates.input_ids[:, 0] = model.tokenizer.bos_token_id
    for image, question, question_id in progress(loader, 'vqa'):
        image = image.to(device, non_blocking=True)
        with autocast(device, run.amp_dtype):
            if config.inference == 'generate':
                answers = model(image, question, train=False, inference='generate')
            else:
                answer_ids = model(image, question, answer_candidates, train=False, inference='rank',
                                   k_test=config.k_test)
                answers = [answer_list[int(i)] for i in answer_ids]
        results += [{'question_id': int(q), 'answer': a} for q, a in zip(question_id, answers)]
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    run = Run.start(argv, VQAConfig, description=__doc__)
    config = run.config
    if config.inference not in ('rank', 'generate'):
        raise ValueError(f"{run.args.config}: inference must be 'rank' or 'generate', got {config.inference!r}")
    train_set, test_set = run.datasets('vqa')
    train_loader, test_loader = run.loaders([train_set, test_set], [True, False],
                                            [config.batch_size_train, config.batch_size_test],
                                            collate_fns=[vqa_collate_fn, None])
    model = blip_vqa(pretrained=config.pretrained, **config.model_kwargs())
    run.setup_model(model)
    stats = {}
    for epoch in run.epochs():
        if run.args.evaluate:
            break
        train_stats = run.train_epoch(epoch, train_loader, vqa_step,
                                      cosine_epoch_lr(epoch, config.max_epoch, config.init_lr, config.min_lr))
        run.save(f'checkpoint_{epoch:02d}.pth', epoch)
        stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch}
        run.log(stats)
        run.end_epoch(epoch)
    results = answer_questions(run, test_loader)
    # distributed samplers pad with duplicates: keep one answer per question
    path = save_result(results, run.result_dir, 'vqa_result', remove_duplicate='question_id')
    if run.is_main:
        with open(path) as f:
            merged = json.load(f)
        annotations = getattr(test_set, 'annotation', [])
        if annotations and all('answer' in a for a in annotations):
            stats = {'test_vqa_accuracy': vqa_accuracy(merged, annotations), 'num_questions': len(merged)}
            run.log(stats, 'evaluate.txt' if run.args.evaluate else 'log.txt')
        print(f'VQA result file: {path}')
    run.finish()
    return stats


if __name__ == '__main__':
    from engine.errors import run_script
    run_script(main, sys.argv[1:])  # a user error: one message, exit 2/1 (traceback with --debug)
