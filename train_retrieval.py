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

from engine.config import VisionConfig
from engine.evaluation import evaluation_retrieval, itm_eval
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
    weight_decay: float = 0.05
    min_lr: float = 0.0
    max_epoch: int = 6


def make_step(config: RetrievalConfig):
    def retrieval_step(model, batch, ctx) -> dict:
        image, caption, idx = batch
        # the distillation weight ramps up over the first epoch (original train_retrieval.py)
        alpha = config.alpha * (min(1.0, ctx.step / ctx.steps_per_epoch) if ctx.epoch == 0 else 1.0)
        loss_ita, loss_itm = model(image.to(ctx.device, non_blocking=True), caption, alpha=alpha,
                                   idx=idx.to(ctx.device, non_blocking=True))
        return {'loss_ita': loss_ita, 'loss_itm': loss_itm}
    return retrieval_step


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
    run.setup_model(model)
    stats = {}
    step = make_step(config)
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
