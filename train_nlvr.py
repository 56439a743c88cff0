"""Fine-tune and evaluate BLIP on NLVR2 (two images, one statement: true or false).

    torchrun --nproc_per_node=16 train_nlvr.py --config configs/nlvr.yaml --output_dir output/nlvr
    python train_nlvr.py --config configs/toy/nlvr.yaml --output_dir output/toy_nlvr
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch

from data.utils import pre_caption
from engine import distributed as du
from engine.config import VisionConfig
from engine.cuda_graph import graphed_step_fn, static_text_length
from engine.precision import autocast
from engine.runner import Run, cosine_epoch_lr, gather_objects, progress
from models.blip_nlvr import blip_nlvr


@dataclass
class NLVRConfig(VisionConfig):
    image_root: str = ''
    ann_root: str = ''
    pretrained: str = ''
    batch_size_train: int = 16
    batch_size_test: int = 64
    max_epoch: int = 15
    weight_decay: float = 0.05
    init_lr: float = 3e-5
    min_lr: float = 0.0
    # not in the original: record the step (forward + backward, then clipping + AdamW) as CUDA graphs and replay
    # them per batch (engine.cuda_graph.TrainStep); empty: on where the conditions hold (the first log lines say)
    cuda_graph: Optional[bool] = None


def nlvr_step(model, batch, ctx) -> dict:
    image0, image1, text, targets = batch
    images = torch.cat([image0, image1], 0).to(ctx.device, non_blocking=True)
    return {'loss': model(images, text, targets.to(ctx.device, non_blocking=True), train=True)}


def make_graphed_step(config: NLVRConfig, model, optimizer, train_set, sync_grads: bool = False):
    """``cuda_graph``: ``nlvr_step`` with its backward, clipping and update replayed as CUDA graphs
    (``engine.cuda_graph.TrainStep``). The original pads each batch's sentences to its longest; here they are padded
    to the longest of the training set (fixed shapes, the same loss: padding is masked)."""
    sentences = [pre_caption(ann['sentence'], train_set.max_words) for ann in train_set.annotation]
    # swapping the images swaps 'left' and 'right' in the sentence: one token each, the length stays
    length = static_text_length(model.tokenizer, sentences, model.text_encoder.config.max_position_embeddings)
    if du.is_main_process():
        print(f'cuda_graph: sentences padded to {length} tokens (the longest of the training set, rounded up to 8)')

    def inputs_of(batch, ctx) -> dict:
        image0, image1, text, targets = batch
        tokens = model.tokenize(text, ctx.device, length=length)
        return dict(image=torch.cat([image0, image1], 0).to(ctx.device, non_blocking=True),
                    input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                    targets=targets.to(ctx.device, dtype=torch.long, non_blocking=True))
    return graphed_step_fn(lambda **inputs: {'loss': model.losses(**inputs)}, optimizer, config, sync_grads,
                           inputs_of)


@torch.no_grad()
def evaluate(run: Run, loader) -> dict:
    """Accuracy over the dataset's examples, each counted once (distributed-sampler padding removed)."""
    model = run.eval_model
    model.eval()
    correct = []
    for image0, image1, text, targets in progress(loader, 'nlvr'):
        images = torch.cat([image0, image1], 0).to(run.device, non_blocking=True)
        with autocast(run.device, run.amp_dtype):
            logits = model(images, text, targets.to(run.device), train=False)
        correct += (logits.argmax(1).cpu() == targets).tolist()
    sampler = loader.sampler if run.distributed else None
    indices = list(iter(sampler)) if sampler is not None else list(range(len(correct)))
    by_index = dict(gather_objects(list(zip(indices, correct))))
    return {'acc': 100.0 * sum(by_index.values()) / max(1, len(by_index))}


def main(argv: Optional[list[str]] = None) -> dict:
    run = Run.start(argv, NLVRConfig, description=__doc__)
    config = run.config
    train_set, val_set, test_set = run.datasets('nlvr')
    train_loader, val_loader, test_loader = run.loaders(
        [train_set, val_set, test_set], [True, False, False],
        [config.batch_size_train, config.batch_size_test, config.batch_size_test])
    model = blip_nlvr(pretrained=config.pretrained, **config.model_kwargs())
    run.setup_model(model, graphed_step=True)
    step = (make_graphed_step(config, run.model_without_ddp, run.optimizer, train_set, sync_grads=run.distributed)
            if run.cuda_graph and not run.args.evaluate else nlvr_step)
    stats = {}
    for epoch in run.epochs():
        train_stats = {} if run.args.evaluate else run.train_epoch(
            epoch, train_loader, step, cosine_epoch_lr(epoch, config.max_epoch, config.init_lr, config.min_lr))
        val, test = evaluate(run, val_loader), evaluate(run, test_loader)
        stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'val_acc': val['acc'], 'test_acc': test['acc'],
                 'epoch': epoch}
        if run.args.evaluate:
            run.log(stats, 'evaluate.txt')
            break
        if run.improved(val['acc'], epoch):
            run.save('checkpoint_best.pth', epoch)
        stats['best_epoch'] = run.best_epoch
        run.log(stats)
        run.end_epoch(epoch)
    run.finish()
    return stats


if __name__ == '__main__':
    from engine.errors import run_script
    run_script(main, sys.argv[1:])  # a user error: one message, exit 2/1 (traceback with --debug)
