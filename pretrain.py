"""Pretrain BLIP with ITC (momentum distillation), ITM (hard negatives) and LM.

The original downloaded its initial weights inside the model constructor. Here the model starts
random and ``init_vit`` / ``init_text`` name the sources explicitly (timm model names or local files
for the ViT; a transformers BERT name or folder for the text encoder and decoder); empty = random.

    torchrun --nproc_per_node=8 pretrain.py --config configs/pretrain.yaml --output_dir output/pretrain
    python pretrain.py --config configs/toy/pretrain.yaml --output_dir output/toy_pretrain
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from engine.runner import CommonConfig, Run
from models.blip_pretrain import TextBatch, TokenizingCollate, blip_pretrain, init_from_pretrained


@dataclass
class PretrainConfig(CommonConfig):
    train_file: list = field(default_factory=list)
    laion_path: str = ''
    image_root: str = ''   # prefix for relative image paths in train_file (toy data)
    vit: object = 'base'
    vit_grad_ckpt: bool = False
    vit_ckpt_layer: int = 0
    image_size: int = 224
    batch_size: int = 75
    queue_size: int = 57600
    alpha: float = 0.4
    momentum: float = 0.995   # EMA of the momentum encoders (the original's constructor default)
    weight_decay: float = 0.05
    init_lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    lr_decay_rate: float = 0.9
    max_epoch: int = 20
    warmup_steps: int = 3000
    med_config: str = 'configs/bert_config.json'
    init_vit: str = ''    # e.g. 'deit_base_patch16_224.fb_in1k' (the original's DeiT-B) or a file
    init_text: str = ''   # e.g. 'bert-base-uncased' or a local BERT folder
    # not in the original: record the whole step (forward, backward, AdamW) once as a CUDA graph and replay it
    # per batch (engine.cuda_graph); one process, no accum_steps / clip_grad / fp16
    cuda_graph: bool = False


def lr_function(config: PretrainConfig, epoch: int):
    """Linear warm-up over the first ``warmup_steps`` of epoch 0, then step decay per epoch (original)."""
    decayed = max(config.min_lr, config.init_lr * config.lr_decay_rate ** epoch)
    if epoch > 0:
        return lambda step: decayed

    def warmup(step: int) -> float:
        if config.warmup_steps == 0:  # no warm-up: the full rate from the first step
            return config.init_lr
        return min(config.init_lr, config.warmup_lr + (config.init_lr - config.warmup_lr) * step / config.warmup_steps)
    return warmup


def distillation_weight(config: PretrainConfig, ctx) -> float:
    """alpha ramps up linearly over the first two epochs (original)."""
    progress = (ctx.epoch * ctx.steps_per_epoch + ctx.step) / (2 * ctx.steps_per_epoch)
    return config.alpha * min(1.0, progress)


def batch_text(batch) -> object:
    """The batch's tokenised captions (``TokenizingCollate``), or its caption strings from any other loader."""
    return batch[2] if len(batch) > 2 and isinstance(batch[2], TextBatch) else batch[1]


def make_step(config: PretrainConfig):
    def pretrain_step(model, batch, ctx) -> dict:
        loss_ita, loss_itm, loss_lm = model(batch[0].to(ctx.device, non_blocking=True), batch_text(batch),
                                            alpha=distillation_weight(config, ctx))
        return {'loss_ita': loss_ita, 'loss_itm': loss_itm, 'loss_lm': loss_lm}
    return pretrain_step


def make_graphed_step(config: PretrainConfig, model, optimizer):
    """``cuda_graph: true``: the step of ``make_step`` plus its backward and AdamW update as one replayed graph.

    The tokenised captions (from the loader's workers), the image and alpha are copied into the graph's static
    buffers; the loop's autocast is active while the step runs (and is recorded)."""
    from engine.cuda_graph import GraphedStep, training_step

    def losses(image, input_ids, attention_mask, alpha):
        return dict(zip(('loss_ita', 'loss_itm', 'loss_lm'), model.losses(image, input_ids, attention_mask, alpha)))

    graphed = GraphedStep(training_step(losses, optimizer), optimizer)

    def pretrain_step(_, batch, ctx) -> dict:
        text = batch_text(batch)
        if not isinstance(text, TextBatch):
            text = model.tokenize(text)
        return graphed(image=batch[0].to(ctx.device, non_blocking=True),
                       input_ids=text.input_ids.to(ctx.device, non_blocking=True),
                       attention_mask=text.attention_mask.to(ctx.device, non_blocking=True),
                       alpha=torch.tensor(distillation_weight(config, ctx), device=ctx.device))
    return pretrain_step


def main(argv: Optional[list[str]] = None) -> dict:
    run = Run.start(argv, PretrainConfig, description=__doc__, evaluates=False)
    config = run.config
    train_set = run.datasets('pretrain', min_scale=0.2)
    model = blip_pretrain(image_size=config.image_size, vit=config.vit, vit_grad_ckpt=config.vit_grad_ckpt,
                          vit_ckpt_layer=config.vit_ckpt_layer, queue_size=config.queue_size, momentum=config.momentum,
                          med_config=config.med_config)
    # not in the original: captions are tokenised in the loader's workers, not between two training steps
    (train_loader,) = run.loaders([train_set], [True], [config.batch_size], [TokenizingCollate(model.tokenizer)])
    if config.init_vit or config.init_text:
        init_from_pretrained(model, vit_source=config.init_vit or None, bert_source=config.init_text or None)
    run.setup_model(model)
    stats = {}
    step = make_graphed_step(config, run.model_without_ddp, run.optimizer) if config.cuda_graph else make_step(config)
    for epoch in run.epochs():
        if config.laion_path and hasattr(train_set, 'reload_laion'):
            train_set.reload_laion(epoch)
        train_stats = run.train_epoch(epoch, train_loader, step, lr_function(config, epoch),
                                      save_before_eval=False)  # nothing to evaluate: the epoch end saves
        run.save(f'checkpoint_{epoch:02d}.pth', epoch)
        stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch}
        run.log(stats)
        run.end_epoch(epoch)
    run.finish()
    return stats


if __name__ == '__main__':
    from engine.errors import run_script
    run_script(main, sys.argv[1:])  # a user error: one message, exit 2/1 (traceback with --debug)
