"""Dataset, sampler and loader factories with the original's names and semantics (reference 7.4)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data.coco_karpathy_dataset import coco_karpathy_caption_eval, coco_karpathy_retrieval_eval, coco_karpathy_train
from data.flickr30k_dataset import flickr30k_retrieval_eval, flickr30k_train
from data.nlvr_dataset import nlvr_dataset
from data.nocaps_dataset import nocaps_eval
from data.pretrain_dataset import pretrain_dataset
from data.video_dataset import VideoDataset
from data.vqa_dataset import vqa_collate_fn, vqa_dataset
from transform import create_transforms

DATASETS = ('pretrain', 'caption_coco', 'nocaps', 'retrieval_coco', 'retrieval_flickr', 'vqa', 'nlvr',
            'retrieval_msrvtt')

__all__ = ['DATASETS', 'create_dataset', 'create_loader', 'create_sampler', 'vqa_collate_fn']


def _required(config: Any, key: str, dataset: str) -> Any:
    if key not in config:
        raise KeyError(f"config has no key {key!r}, which dataset {dataset!r} needs")
    return config[key]


def create_dataset(dataset: str, config: Any, min_scale: float = 0.5):
    """Build the datasets of a task, as the original's ``create_dataset``.

    Args:
        dataset: one of :data:`DATASETS`.
        config: mapping-like config (``config[key]``, ``key in config``, ``config.get(key, default)``)
            with the task's original keys. ``skip_bad_samples`` (default False) is passed to every
            dataset; a non-empty ``toy_root`` generates the toy dataset there first (default size;
            a complete one already there, of any size, is used as is).
        min_scale: smallest RandomResizedCrop area (0.2 for pretraining).

    Returns:
        pretrain: the dataset; caption_coco, retrieval_coco, retrieval_flickr, nlvr: (train, val, test);
        nocaps: (val, test); vqa: (train, test); retrieval_msrvtt: the video test dataset.
    """
    if dataset not in DATASETS:
        raise ValueError(f'unknown dataset {dataset!r}; expected one of {DATASETS}')
    if config.get('toy_root', ''):
        from data.toy import ensure_toy_dataset

        ensure_toy_dataset(config['toy_root'], exact=False)
    req = lambda key: _required(config, key, dataset)  # noqa: E731
    # Training splits only: an evaluation split that replaced an unreadable item by the next one would score
    # that item under the wrong id (retrieval galleries, caption and VQA result files); it stops instead.
    skip = bool(config.get('skip_bad_samples', False))
    image_size = req('image_size')
    if dataset == 'retrieval_msrvtt':
        return VideoDataset(req('video_root'), req('ann_root'), num_frm=req('num_frm_test'),
                            frm_sampling_strategy='uniform', max_img_size=image_size)
    transform_train, transform_test = create_transforms(image_size, min_scale)
    if dataset == 'pretrain':
        return pretrain_dataset(req('train_file'), config.get('laion_path', ''), transform_train,
                                image_root=config.get('image_root', ''), skip_bad_samples=skip)
    if dataset == 'vqa':
        roots = (req('ann_root'), req('vqa_root'), config.get('vg_root', ''))
        train = vqa_dataset(transform_train, *roots, train_files=req('train_files'), split='train',
                            skip_bad_samples=skip)
        test = vqa_dataset(transform_test, *roots, split='test')
        return train, test
    roots = (req('image_root'), req('ann_root'))
    if dataset == 'caption_coco':
        return (coco_karpathy_train(transform_train, *roots, prompt=config.get('prompt', ''), skip_bad_samples=skip),
                coco_karpathy_caption_eval(transform_test, *roots, 'val'),
                coco_karpathy_caption_eval(transform_test, *roots, 'test'))
    if dataset == 'nocaps':
        return (nocaps_eval(transform_test, *roots, 'val'),
                nocaps_eval(transform_test, *roots, 'test'))
    if dataset == 'retrieval_coco':
        return (coco_karpathy_train(transform_train, *roots, skip_bad_samples=skip),
                coco_karpathy_retrieval_eval(transform_test, *roots, 'val'),
                coco_karpathy_retrieval_eval(transform_test, *roots, 'test'))
    if dataset == 'retrieval_flickr':
        return (flickr30k_train(transform_train, *roots, skip_bad_samples=skip),
                flickr30k_retrieval_eval(transform_test, *roots, 'val'),
                flickr30k_retrieval_eval(transform_test, *roots, 'test'))
    return tuple(nlvr_dataset(transform_train if split == 'train' else transform_test, *roots, split,
                              skip_bad_samples=skip and split == 'train') for split in ('train', 'val', 'test'))


def create_sampler(datasets: Sequence[Dataset], shuffles: Sequence[bool], num_tasks: int,
                   global_rank: int) -> list[DistributedSampler]:
    """One ``DistributedSampler(num_replicas=num_tasks, rank=global_rank, shuffle)`` per dataset."""
    return [DistributedSampler(d, num_replicas=num_tasks, rank=global_rank, shuffle=s)
            for d, s in zip(datasets, shuffles)]


def create_loader(datasets: Sequence[Dataset], samplers: Sequence[Optional[torch.utils.data.Sampler]],
                  batch_size: Sequence[int], num_workers: Sequence[int], is_trains: Sequence[bool],
                  collate_fns: Sequence[Optional[Callable]]) -> list[DataLoader]:
    """DataLoaders as the original builds them.

    Training loaders drop the last incomplete batch and shuffle when they have no sampler;
    evaluation loaders keep order and every sample. Memory is pinned only when CUDA is available.
    """
    loaders = []
    pin = torch.cuda.is_available()
    for dataset, sampler, bs, workers, is_train, collate_fn in zip(datasets, samplers, batch_size, num_workers,
                                                                   is_trains, collate_fns):
        loaders.append(DataLoader(dataset, batch_size=bs, num_workers=workers, pin_memory=pin, sampler=sampler,
                                  shuffle=is_train and sampler is None, collate_fn=collate_fn,
                                  drop_last=is_train))
    return loaders
