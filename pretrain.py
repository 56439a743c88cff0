"""Pretrain BLIP with ITC (momentum distillation), ITM (hard negatives) and LM.

The original downloaded its initial weights inside the model constructor. Here the model starts
random and ``init_vit`` / ``init_text`` name the sources explicitly (timm model names or local files
for the ViT; a transformers BERT name or folder for the text encoder and decoder); empty = random.

    torchrun --nproc_per_node=8 pretrain.py --config configs/pretrain.yaml --output_dir output/pretrain
    python pretrain.py --config configs/toy/pretrain.yaml --output_dir output/toy_pretrain
    python pretrain.py --config configs/toy/pretrain_shards.yaml --output_dir output/toy_pretrain_shards

``train_shards`` (webdataset tar shards, img2dataset's layout) stream through ``data.shards``, mixed with the
``train_file`` lists in one epoch; without it the lists are read as the original does (``data.pretrain_dataset``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import DataLoader

from data.loading import stop_workers
from data.shards import BatchInfo, ShardCollate, ShardProgress, ShardStream, count_keys, pretrain_stream
from engine import distributed as du
from engine.config import VisionConfig
from engine.runner import Run, gather_objects
from transform import create_transforms
from transform.fast import create_fast_train_transform, normalize_uint8
from models.blip_pretrain import TextBatch, TokenizingCollate, blip_pretrain, init_from_pretrained


@dataclass
class PretrainConfig(VisionConfig):
    train_file: list = field(default_factory=list)
    laion_path: str = ''
    image_root: str = ''   # prefix for relative image paths in train_file (toy data)
    # not in the original: webdataset tar shards (brace patterns, local files or pipe: commands), see data.shards
    train_shards: list = field(default_factory=list)
    json_shard_size: int = 1000     # train_file entries per virtual shard when mixed with train_shards
    shuffle_buffer: int = 1000      # samples in each loader worker's shuffle buffer (shards)
    shard_count_cache: str = ''     # where counted shard sizes are kept ('' = ~/.cache/blip/shard_counts)
    min_image_side: int = 8         # shards: smaller images are skipped (counted)
    max_image_pixels: int = 89478485  # shards: larger images are skipped unread (counted)
    max_caption_chars: int = 2000   # shards: longer captions are skipped (counted)
    # shards: JPEGs decoded at the reduced scale the random crop allows, uint8 batches normalised on the device
    # (transform.fast: the same random draws as the original pipeline); False = the original pipeline
    fast_decode: bool = True
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
    # not in the original: record the step (forward + backward, then clipping + AdamW) as CUDA graphs and replay
    # them per batch (engine.cuda_graph.TrainStep); accum_steps, clip_grad and several processes work, fp16 does not
    cuda_graph: Optional[bool] = None  # empty: on with one GPU (engine.runner.Run.setup_model says why not)


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


def device_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The batch's images on the device, normalised there when the loader left them uint8 (``fast_decode``)."""
    images = images.to(device, non_blocking=True)
    return normalize_uint8(images) if images.dtype == torch.uint8 else images


def make_step(config: PretrainConfig, on_batch=None):
    def pretrain_step(model, batch, ctx) -> dict:
        if on_batch is not None and isinstance(batch[-1], BatchInfo):
            on_batch(batch[-1])
        loss_ita, loss_itm, loss_lm = model(device_images(batch[0], ctx.device), batch_text(batch),
                                            alpha=distillation_weight(config, ctx))
        return {'loss_ita': loss_ita, 'loss_itm': loss_itm, 'loss_lm': loss_lm}
    return pretrain_step


def make_graphed_step(config: PretrainConfig, model, optimizer, sync_grads: bool = False, on_batch=None):
    """``cuda_graph: true``: the step of ``make_step`` plus its backward, clipping and AdamW update as replayed
    graphs (``engine.cuda_graph.TrainStep``; ``sync_grads``: averaged over the ranks between them).

    The tokenised captions (from the loader's workers), the image and alpha are copied into the graph's static
    buffers; the loop's autocast is active while the step runs (and is recorded)."""
    from engine.cuda_graph import graphed_step_fn

    def losses(image, input_ids, attention_mask, alpha):
        return dict(zip(('loss_ita', 'loss_itm', 'loss_lm'), model.losses(image, input_ids, attention_mask, alpha)))

    def inputs_of(batch, ctx) -> dict:
        if on_batch is not None and isinstance(batch[-1], BatchInfo):
            on_batch(batch[-1])
        text = batch_text(batch)
        if not isinstance(text, TextBatch):
            text = model.tokenize(text)
        return dict(image=device_images(batch[0], ctx.device),
                    input_ids=text.input_ids.to(ctx.device, non_blocking=True),
                    attention_mask=text.attention_mask.to(ctx.device, non_blocking=True),
                    alpha=torch.tensor(distillation_weight(config, ctx), device=ctx.device))
    return graphed_step_fn(losses, optimizer, config, sync_grads, inputs_of)


class ShardTracker:
    """pretrain.py's side of a shard stream: follows the batches trained on, puts the stream's position into every
    resume point (``run.resume_state['shard_state']``) and gives the epoch's data counts."""

    def __init__(self, run: Run, dataset: ShardStream, loader: DataLoader):
        self.run, self.dataset, self.workers = run, dataset, max(1, loader.num_workers)
        self.progress, self.restored = ShardProgress(), {}
        run.resume_hooks.append(self.before_save)

    def progress_update(self, info: BatchInfo) -> None:
        self.progress.update(info)

    def start_epoch(self, epoch: int) -> None:
        saved = self.run.resume_state.get('shard_state')
        resuming = saved and saved['data']['epoch'] == epoch and epoch == self.run.start_epoch and self.run.start_step
        self.dataset.set_resume_state(saved['data'] if resuming else None)
        self.restored = dict(saved['counts']) if resuming and self.run.is_main else {}
        self.progress = ShardProgress()

    def totals(self) -> dict:
        """The epoch's counts so far over every rank (a collective)."""
        keys = count_keys()
        local = [self.progress.counts.get(k, 0) + self.restored.get(k, 0) for k in keys]
        return dict(zip(keys, (int(v) for v in du.all_reduce_sum(local))))

    def before_save(self, resume: tuple[int, int]) -> None:
        if resume[1] == 0:   # an epoch's end: the next one starts afresh
            self.run.resume_state.pop('shard_state', None)
            return
        cursors = gather_objects([{**self.dataset.cursors, **self.progress.cursors}])
        self.run.resume_state['shard_state'] = {'data': self.dataset.state(resume[1], self.workers, cursors),
                                            'counts': self.totals()}


def build_train_set(run: Run, config: PretrainConfig):
    """A shard stream when ``train_shards`` is set, else the original's JSON-list dataset (built before the model:
    the toy data is written here on first use)."""
    if not config.train_shards:
        train_set = run.datasets('pretrain', min_scale=0.2)
        train_set.seed = run.args.seed   # per-sample augmentation seeds (data.loading.seeded_augmentation)
        return train_set
    if config.laion_path:
        raise ValueError(f'{run.args.config}: laion_path and train_shards: give the LAION shards in train_shards')
    if config.toy_root:
        if run.is_main:
            from data.toy import ensure_toy_dataset, ensure_toy_shards
            ensure_toy_shards(ensure_toy_dataset(config.toy_root, exact=False))
        du.barrier()
    if config.fast_decode:
        transform = create_fast_train_transform(config.image_size, 0.2)
    else:
        transform, _ = create_transforms(config.image_size, 0.2)
    stream = pretrain_stream(config, transform, run.args.seed, du.get_world_size(), du.get_rank())
    if run.is_main:
        print(f'train_shards: {len(stream.shards)} shards, {stream.total} samples, {stream.steps} steps per epoch')
    return stream


def keep_workers(config: PretrainConfig, shards: bool) -> bool:
    """Whether the training loader keeps its workers across epochs (``persistent_workers``).

    Yes where every random draw in them is seeded per sample and the epoch reaches them through shared memory
    (data.loading.SharedInts); not with laion_path, whose shard rotation changes the dataset in the training process
    only, nor for JSON lists with skip_bad_samples, whose per-epoch count of bad files comes from workers that start
    without knowing them (a kept worker skips a known bad file unread and unreported)."""
    return config.num_workers > 0 and not config.laion_path and (shards or not config.skip_bad_samples)


def build_train_loader(run: Run, config: PretrainConfig, train_set, collate) -> tuple[DataLoader,
                                                                                     Optional[ShardTracker]]:
    if not isinstance(train_set, ShardStream):
        (loader,) = run.loaders([train_set], [True], [config.batch_size], [collate],
                                persistent_train_workers=keep_workers(config, shards=False))
        return loader, None
    loader = DataLoader(train_set, batch_size=config.batch_size, num_workers=config.num_workers, drop_last=True,
                        pin_memory=torch.cuda.is_available(), collate_fn=ShardCollate(collate),
                        persistent_workers=keep_workers(config, shards=True),
                        # the workers' seeds from this generator, not a draw from the global RNG that resume restores
                        # (the stream seeds everything itself)
                        generator=torch.Generator())
    return loader, ShardTracker(run, train_set, loader)


def data_stats(tracker: Optional[ShardTracker], loader) -> dict:
    """The epoch's data counts for log.txt: ``samples`` = pairs trained on (over all ranks)."""
    if tracker is None:
        return {'samples': len(loader) * loader.batch_size * du.get_world_size()}
    return tracker.totals()


def main(argv: Optional[list[str]] = None) -> dict:
    run = Run.start(argv, PretrainConfig, description=__doc__, evaluates=False)
    config = run.config
    train_set = build_train_set(run, config)
    model = blip_pretrain(queue_size=config.queue_size, momentum=config.momentum, **config.model_kwargs())
    # not in the original: captions are tokenised in the loader's workers, not between two training steps
    train_loader, tracker = build_train_loader(run, config, train_set, TokenizingCollate(model.tokenizer))
    if config.init_vit or config.init_text:
        init_from_pretrained(model, vit_source=config.init_vit or None, bert_source=config.init_text or None)
    run.setup_model(model, graphed_step=True)
    stats = {}
    on_batch = tracker.progress_update if tracker else None
    step = (make_graphed_step(config, run.model_without_ddp, run.optimizer, sync_grads=run.distributed,
                              on_batch=on_batch)
            if run.cuda_graph else make_step(config, on_batch))
    for epoch in run.epochs():
        if config.laion_path and hasattr(train_set, 'reload_laion'):
            train_set.reload_laion(epoch)
        if tracker is not None:
            tracker.start_epoch(epoch)
        train_stats = run.train_epoch(epoch, train_loader, step, lr_function(config, epoch),
                                      save_before_eval=False)  # nothing to evaluate: the epoch end saves
        counts = data_stats(tracker, train_loader)
        run.save(f'checkpoint_{epoch:02d}.pth', epoch)
        stats = {**{f'train_{k}': v for k, v in {**train_stats, **counts}.items()}, 'epoch': epoch}
        run.log(stats)
        run.end_epoch(epoch)
    stop_workers(train_loader)  # kept workers end before the process group does
    run.finish()
    return stats


if __name__ == '__main__':
    from engine.errors import run_script
    run_script(main, sys.argv[1:])  # a user error: one message, exit 2/1 (traceback with --debug)
