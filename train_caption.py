"""Fine-tune and evaluate BLIP's captioner on COCO Karpathy splits (or the toy dataset).

    torchrun --nproc_per_node=8 train_caption.py --config configs/caption_coco.yaml --output_dir output/caption_coco
    python train_caption.py --config configs/toy/caption.yaml --output_dir output/toy_caption
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from data.utils import ensure_annotation
from engine.caption_metrics import coco_caption_eval
from engine.captioning import generate_captions
from engine.config import VisionConfig
from engine.cuda_graph import decoding_note, graphed_step_fn
from engine.results import save_result
from engine.runner import Run, cosine_epoch_lr
from models.blip import blip_decoder


@dataclass
class CaptionConfig(VisionConfig):
    image_root: str = ''
    ann_root: str = ''
    coco_gt_root: str = ''
    # not an original key: a JSON list of {image, caption} or tar shards that replace the data roots (data.own_data)
    own_data: str = ''
    pretrained: str = ''
    batch_size: int = 32
    init_lr: float = 1e-5
    max_length: int = 20
    min_length: int = 5
    num_beams: int = 3
    prompt: str = 'a picture of '
    # not an original key: replay each decode step as one CUDA graph (same captions); empty = on with a GPU
    cuda_graph: Optional[bool] = None
    weight_decay: float = 0.05
    min_lr: float = 0.0
    max_epoch: int = 5


def caption_step(model, batch, ctx) -> dict:
    image, caption, _ = batch
    return {'loss': model(image.to(ctx.device, non_blocking=True), caption)}


def make_graphed_step(config: CaptionConfig, model, optimizer, sync_grads: bool = False):
    """``cuda_graph: true``: ``caption_step`` with its backward, clipping and update replayed as CUDA graphs
    (``engine.cuda_graph.TrainStep``); captions padded to the decoder's 40 tokens (fixed shapes, same loss)."""
    def inputs_of(batch, ctx) -> dict:
        image, caption, _ = batch
        text = model.tokenize(caption, ctx.device, static=True)
        return dict(image=image.to(ctx.device, non_blocking=True), input_ids=text.input_ids,
                    attention_mask=text.attention_mask)
    return graphed_step_fn(lambda **inputs: {'loss': model.losses(**inputs)}, optimizer, config, sync_grads, inputs_of)


def evaluate_split(run: Run, model, loader, split: str, tag: str) -> dict:
    results = generate_captions(model, loader, run.config, run.device, run.amp_dtype)
    path = save_result(results, run.result_dir, f'{split}_{tag}', remove_duplicate='image_id')
    if not run.is_main:
        return {}
    return coco_caption_eval(caption_gt_file(run.config, split), path)


def caption_gt_file(config: CaptionConfig, split: str) -> str:
    """COCO-format ground truth of a Karpathy split in ``coco_gt_root``, downloaded there when missing (as the
    original's ``coco_caption_eval`` does)."""
    if not config.coco_gt_root:
        raise ValueError('config key coco_gt_root is not set: the folder for coco_karpathy_{val,test}_gt.json '
                         '(configs/caption_coco.yaml: annotation/coco_gt)')
    return ensure_annotation(f'coco_karpathy_{split}_gt.json', config.coco_gt_root)


def main(argv: Optional[list[str]] = None) -> dict:
    run = Run.start(argv, CaptionConfig, description=__doc__)
    config = run.config
    if run.is_main:
        print(decoding_note(config.cuda_graph, run.device))
    train_set, val_set, test_set = run.datasets('caption_coco')  # first: writes the toy dataset on first use
    if run.is_main:  # fetched before training, so that a missing file cannot end a run after its first epoch
        for split in ('val', 'test'):
            caption_gt_file(config, split)
    train_loader, val_loader, test_loader = run.loaders([train_set, val_set, test_set], [True, False, False],
                                                        [config.batch_size] * 3)
    model = blip_decoder(pretrained=config.pretrained, prompt=config.prompt, **config.model_kwargs())
    run.setup_model(model, graphed_step=True)
    step = (make_graphed_step(config, run.model_without_ddp, run.optimizer, sync_grads=run.distributed)
            if run.cuda_graph else caption_step)
    stats = {}
    for epoch in run.epochs():  # one pass with --evaluate
        train_stats = {} if run.args.evaluate else run.train_epoch(
            epoch, train_loader, step, cosine_epoch_lr(epoch, config.max_epoch, config.init_lr, config.min_lr))
        val = evaluate_split(run, run.eval_model, val_loader, 'val', f'epoch{epoch}')
        test = evaluate_split(run, run.eval_model, test_loader, 'test', f'epoch{epoch}')
        if run.is_main and run.args.evaluate:
            stats = {**{f'val_{k}': v for k, v in val.items()}, **{f'test_{k}': v for k, v in test.items()}}
            run.log(stats, 'evaluate.txt')
        elif run.is_main:  # metrics exist on rank 0 only; every rank goes on to the collective end_epoch
            if run.improved(val['CIDEr'] + val['Bleu_4'], epoch):
                run.save('checkpoint_best.pth', epoch)
            stats = {**{f'train_{k}': v for k, v in train_stats.items()}, **{f'val_{k}': v for k, v in val.items()},
                     **{f'test_{k}': v for k, v in test.items()}, 'epoch': epoch, 'best_epoch': run.best_epoch}
            run.log(stats)
        run.end_epoch(epoch)
    run.finish()
    return stats


if __name__ == '__main__':
    from engine.errors import run_script
    run_script(main, sys.argv[1:])  # a user error: one message, exit 2/1 (traceback with --debug)
