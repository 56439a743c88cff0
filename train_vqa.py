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

from data.vqa_dataset import answer_weights, vqa_collate_fn
from engine import distributed as du
from engine.config import VisionConfig
from engine.cuda_graph import graphed_step_fn, static_text_length
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
    # not in the original: record the step (forward + backward, then clipping + AdamW) as CUDA graphs and replay
    # them per batch (engine.cuda_graph.TrainStep); empty: on where the conditions hold (the first log lines say)
    cuda_graph: Optional[bool] = None


def vqa_step(model, batch, ctx) -> dict:
    image, question, answer, weights, n = batch
    loss = model(image.to(ctx.device, non_blocking=True), question, answer, train=True, n=n,
                 weights=weights.to(ctx.device, non_blocking=True))
    return {'loss': loss}


def answer_layout(model, train_set) -> tuple[int, int]:
    """(answers per question, tokens per answer) of the captured step's fixed answer rows: the most distinct answers
    any training question has, and the longest training answer (rounded up to 8), so that no batch is cut."""
    per_question, answers = 1, set()
    for ann in train_set.annotation:
        given = answer_weights(ann['answer'])[0] if ann['dataset'] == 'vqa' else [ann['answer']]
        per_question = max(per_question, len(given))
        answers.update(given)
    length = static_text_length(model.tokenizer, sorted(answers), model.text_decoder.config.max_position_embeddings)
    return per_question, length


def make_graphed_step(config: VQAConfig, model, optimizer, train_set, sync_grads: bool = False):
    """``cuda_graph``: ``vqa_step`` with its backward, clipping and update replayed as CUDA graphs
    (``engine.cuda_graph.TrainStep``). Fixed shapes: questions padded to 35 tokens; each question's answers in the
    same number of rows (``BLIP_VQA.static_answers``: empty rows weigh 0), so no answer count is read in the step.
    The loss is ``vqa_step``'s; the decoder runs over the filler rows too."""
    per_question, length = answer_layout(model, train_set)
    if du.is_main_process():
        print(f'cuda_graph: answers in {per_question} rows of {length} tokens per question (the most and longest of '
              f'the training set)')

    def inputs_of(batch, ctx) -> dict:
        image, question, answer, weights, n = batch
        q = model.tokenize_questions(question, ctx.device, static=True)
        ids, mask, w = model.static_answers(answer, n, weights, per_question, length)
        return dict(image=image.to(ctx.device, non_blocking=True), question_ids=q.input_ids,
                    question_mask=q.attention_mask, answer_ids=ids.to(ctx.device, non_blocking=True),
                    answer_mask=mask.to(ctx.device, non_blocking=True), weights=w.to(ctx.device, non_blocking=True))
    return graphed_step_fn(lambda **inputs: {'loss': model.losses(**inputs)}, optimizer, config, sync_grads,
                           inputs_of)


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
    run.setup_model(model, graphed_step=True)
    step = (make_graphed_step(config, run.model_without_ddp, run.optimizer, train_set, sync_grads=run.distributed)
            if run.cuda_graph and not run.args.evaluate else vqa_step)
    stats = {}
    for epoch in run.epochs():
        if run.args.evaluate:
            break
        train_stats = run.train_epoch(epoch, train_loader, step,
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
