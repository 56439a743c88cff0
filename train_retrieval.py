"""Fine-tune and evaluate BLIP image-text retrieval (COCO, Flickr30k, or the toy dataset).

Evaluation is the original protocol: ITC similarities pick the top ``k_test`` candidates, the ITM head
re-ranks them (score = ITM logit + cosine), recall@1/5/10 in both directions.

    torchrun --nproc_per_node=8 train_retrieval.py --config configs/retrieval_coco.yaml --output_dir output/retrieval_coco
    python train_retrieval.py --config configs/toy/retrieval.yaml --output_dir output/toy_retrieval
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch

from engine.config import VisionConfig
from engine.cuda_graph import graphed_step_fn
from engine.retrieval_eval import evaluation_retrieval, itm_eval
from engine.runner import Run, cosine_epoch_lr
from models.blip_retrieval import blip_retrieval


@dataclass
class RetrievalConfig(VisionConfig):
    image_root: str = ''
    ann_root: str = ''
    dataset: str = 'coco'
    # not an original key: a JSON list of {image, caption} or tar shards that replace the data roots (data.own_data)
    own_data: str = ''
    pretrained: str = ''
    batch_size_train: int = 32
    batch_size_test: int = 64
    vit_grad_ckpt: bool = True
    vit_ckpt_layer: int = 4
    init_lr: float = 1e-5
    queue_size: int = 57600
    alpha: float = 0.4
    momentum: float = 0.995   # EMA of the momentum encoders (the original's constructor default)
    k_test: int = 256
    negative_all_rank: bool = True
    # not in the original: record the step (forward + backward, then clipping + AdamW) as CUDA graphs and replay
    # them per batch (engine.cuda_graph.TrainStep); empty: on where the conditions hold (the first log lines say)
    cuda_graph: Optional[bool] = None
    weight_decay: float = 0.05
    min_lr: float = 0.0
    max_epoch: int = 6


def distillation_weight(config: RetrievalConfig, ctx) -> float:
    """alpha ramps up over the first epoch (original train_retrieval.py)."""
    return config.alpha * (min(1.0, ctx.step / ctx.steps_per_epoch) if ctx.epoch == 0 else 1.0)


def make_step(config: RetrievalConfig):
    def retrieval_step(model, batch, ctx) -> dict:
        image, caption, idx = batch
        loss_ita, loss_itm = model(image.to(ctx.device, non_blocking=True), caption,
                                   alpha=distillation_weight(config, ctx), idx=idx.to(ctx.device, non_blocking=True))
        return {'loss_ita': loss_ita, 'loss_itm': loss_itm}
    return retrieval_step


def make_graphed_step(config: RetrievalConfig, model, optimizer, sync_grads: bool = False):
    """``cuda_graph``: the step of ``make_step`` with its backward, clipping and update replayed as CUDA graphs
    (``engine.cuda_graph.TrainStep``). Captions are tokenised here (35 tokens, as the model always pads), alpha goes
    in as a 0-dim tensor; the ITM negatives are drawn on the device, so the losses are the eager step's."""
    def losses(image, input_ids, attention_mask, alpha, idx):
        return dict(zip(('loss_ita', 'loss_itm'), model.losses(image, input_ids, attention_mask, alpha, idx)))

    def inputs_of(batch, ctx) -> dict:
        image, caption, idx = batch
        text = model.tokenize(caption, ctx.device)
        return dict(image=image.to(ctx.device, non_blocking=True), input_ids=text.input_ids,
                    attention_mask=text.attention_mask,
                    alpha=torch.tensor(distillation_weight(config, ctx), device=ctx.device),
                    idx=idx.to(ctx.device, dtype=torch.long, non_blocking=True))
    return graphed_step_fn(losses, optimizer, config, sync_grads, inputs_of)


def evaluate(run: Run, loader) -> dict:
    model = run.eval_model
    score_i2t, score_t2i = evaluation_retrieval(model, loader, model.tokenizer,
                                                run.device, run.config.k_test, amp_dtype=run.amp_dtype)
    dataset = loader.dataset
    return itm_eval(score_i2t, score_t2i, dataset.txt2img, dataset.img2txt)


def main(argv: Optional[list[str]] = None) -> dict:
    run = Run.start(argv, RetrievalConfig, description=__doc__)
    config = run.config
    train_set, val_set, test_set = run.datasets(f'retrieval_{config.dataset}')
    # every rank scores the whole evaluation set (split over ranks inside evaluation_retrieval)
    train_loader, val_loader, test_loader = run.loaders(
        [train_set, val_set, test_set], [True, False, False],
        [config.batch_size_train, config.batch_size_test, config.batch_size_test], distributed_eval=False)
    model = blip_retrieval(pretrained=config.pretrained, queue_size=config.queue_size,
                           negative_all_rank=config.negative_all_rank, momentum=config.momentum, **config.model_kwargs())
    run.setup_model(model, graphed_step=True)
    stats = {}
    step = (make_graphed_step(config, run.model_without_ddp, run.optimizer, sync_grads=run.distributed)
            if run.cuda_graph else make_step(config))
    for epoch in run.epochs():
        train_stats = {} if run.args.evaluate else run.train_epoch(
            epoch, train_loader, step, cosine_epoch_lr(epoch, config.max_epoch, config.init_lr, config.min_lr))
        val = evaluate(run, val_loader)
        if run.args.evaluate:
            test = evaluate(run, test_loader)
            stats = {**{f'val_{k}': v for k, v in val.items()}, **{f'test_{k}': v for k, v in test.items()}}
            run.log(stats, 'evaluate.txt')
            break
        stats = {**{f'train_{k}': v for k, v in train_stats.items()}, **{f'val_{k}': v for k, v in val.items()},
                 'epoch': epoch}
        if run.improved(val['r_mean'], epoch):  # same metrics on every rank: all take this branch or none
            # test numbers are computed for the best epoch only, as the original does
            test = evaluate(run, test_loader)
            stats.update({f'test_{k}': v for k, v in test.items()})
            run.save('checkpoint_best.pth', epoch)
        stats['best_epoch'] = run.best_epoch
        run.log(stats)
        run.end_epoch(epoch)
    run.finish()
    return stats


if __name__ == '__main__':
    from engine.errors import run_script
    run_script(main, sys.argv[1:])  # a user error: one message, exit 2/1 (traceback with --debug)
