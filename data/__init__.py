"""Dataset registry (one entry per task), sampler and loader factories, with the original's names (reference 7.4)."""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data.coco_karpathy_dataset import coco_karpathy_caption_eval, coco_karpathy_retrieval_eval, coco_karpathy_train
from data.flickr30k_dataset import flickr30k_retrieval_eval, flickr30k_train
from data.nlvr_dataset import nlvr_dataset
from data.nocaps_dataset import nocaps_eval
from data.pretrain_dataset import pretrain_dataset
from data.video_dataset import VideoDataset
from data.videoqa_dataset import videoqa_dataset
from data.vqa_dataset import vqa_collate_fn, vqa_dataset
from transform import create_transforms

__all__ = ['DATASETS', 'DatasetRequest', 'create_dataset', 'create_loader', 'create_sampler', 'register_dataset',
           'vqa_collate_fn']


class DatasetRequest:
    """What a dataset builder reads: config keys (a missing one is an error naming the key and the dataset),
    ``skip_bad_samples`` and the train/test transforms.

    ``config`` is mapping-like (``config[key]``, ``key in config``, ``config.get(key, default)``)."""

    def __init__(self, dataset: str, config: Any, min_scale: float):
        self.dataset, self.config, self.min_scale = dataset, config, min_scale
        # Training splits only: an evaluation split that replaced an unreadable item by the next one would score
        # that item under the wrong id (retrieval galleries, caption and VQA result files); it stops instead.
        self.skip = bool(config.get('skip_bad_samples', False))
        self.image_size = self.req('image_size')

    def req(self, key: str) -> Any:
        if key not in self.config:
            raise KeyError(f"config has no key {key!r}, which dataset {self.dataset!r} needs")
        return self.config[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    @functools.cached_property
    def transforms(self) -> tuple[Callable, Callable]:
        """(train, test) image transforms at ``image_size``."""
        return create_transforms(self.image_size, self.min_scale)

    @property
    def roots(self) -> tuple[str, str]:
        """(image_root, ann_root), what the image-caption datasets take."""
        return self.req('image_root'), self.req('ann_root')


# name -> builder(request) -> the dataset, or its splits as a tuple; one entry per task (create_dataset's names)
_BUILDERS: dict[str, Callable[[DatasetRequest], Any]] = {}


def register_dataset(name: str) -> Callable:
    """Decorator: ``create_dataset(name, config)`` returns what the decorated ``builder(request)`` returns."""
    def add(builder: Callable[[DatasetRequest], Any]) -> Callable[[DatasetRequest], Any]:
        _BUILDERS[name] = builder
        return builder
    return add


@register_dataset('pretrain')
def _pretrain(r: DatasetRequest) -> Dataset:
    return pretrain_dataset(r.req('train_file'), r.get('laion_path', ''), r.transforms[0],
                            image_root=r.get('image_root', ''), skip_bad_samples=r.skip)


@register_dataset('caption_coco')
def _caption_coco(r: DatasetRequest) -> tuple:
    train, test = r.transforms
    return (coco_karpathy_train(train, *r.roots, prompt=r.get('prompt', ''), skip_bad_samples=r.skip),
            coco_karpathy_caption_eval(test, *r.roots, 'val'),
            coco_karpathy_caption_eval(test, *r.roots, 'test'))


@register_dataset('nocaps')
def _nocaps(r: DatasetRequest) -> tuple:
    roots, test = r.roots, r.transforms[1]
    return nocaps_eval(test, *roots, 'val'), nocaps_eval(test, *roots, 'test')


def _retrieval(train_set: Callable, eval_set: Callable) -> Callable[[DatasetRequest], tuple]:
    """The builder of a retrieval task: (train, val, test) of an image-caption dataset."""
    def build(r: DatasetRequest) -> tuple:
        roots, (train, test) = r.roots, r.transforms
        return (train_set(train, *roots, skip_bad_samples=r.skip),
                eval_set(test, *roots, 'val'), eval_set(test, *roots, 'test'))
    return build


register_dataset('retrieval_coco')(_retrieval(coco_karpathy_train, coco_karpathy_retrieval_eval))
register_dataset('retrieval_flickr')(_retrieval(flickr30k_train, flickr30k_retrieval_eval))


@register_dataset('vqa')
def _vqa(r: DatasetRequest) -> tuple:
    roots = (r.req('ann_root'), r.req('vqa_root'), r.get('vg_root', ''))
    train, test = r.transforms
    return (vqa_dataset(train, *roots, train_files=r.req('train_files'), split='train', skip_bad_samples=r.skip),
            vqa_dataset(test, *roots, split='test'))


@register_dataset('nlvr')
def _nlvr(r: DatasetRequest) -> tuple:
    roots, (train, test) = r.roots, r.transforms
    return tuple(nlvr_dataset(train if split == 'train' else test, *roots, split,
                              skip_bad_samples=r.skip and split == 'train') for split in ('train', 'val', 'test'))


@register_dataset('retrieval_msrvtt')
def _retrieval_msrvtt(r: DatasetRequest) -> Dataset:
    return VideoDataset(r.req('video_root'), r.req('ann_root'), num_frm=r.req('num_frm_test'),
                        frm_sampling_strategy='uniform', max_img_size=r.image_size)


@register_dataset('videoqa')
def _videoqa(r: DatasetRequest) -> Dataset:
    return videoqa_dataset(r.req('test_file'), r.req('video_root'), r.get('answer_list', ''),
                           num_frm=r.req('num_frm_test'), frm_sampling_strategy='uniform', max_img_size=r.image_size,
                           video_fmt=r.get('video_fmt', '.mp4'), video_name=r.get('video_name', 'video{}'),
                           video_mapping=r.get('video_mapping', ''))


DATASETS = tuple(_BUILDERS)


def create_dataset(dataset: str, config: Any, min_scale: float = 0.5):
    """Build the datasets of a task, as the original's ``create_dataset``.

    Args:
        dataset: one of :data:`DATASETS` (a ``register_dataset`` entry).
        config: mapping-like config (``config[key]``, ``key in config``, ``config.get(key, default)``)
            with the task's original keys. ``skip_bad_samples`` (default False) is passed to every
            training split; a non-empty ``toy_root`` generates the toy dataset there first (default size;
            a complete one already there, of any size, is used as is).
        min_scale: smallest RandomResizedCrop area (0.2 for pretraining).

    Returns:
        pretrain: the dataset; caption_coco, retrieval_coco, retrieval_flickr, nlvr: (train, val, test);
        nocaps: (val, test); vqa: (train, test); retrieval_msrvtt, videoqa: the video test dataset.
    """
    if dataset not in _BUILDERS:
        raise ValueError(f'unknown dataset {dataset!r}; expected one of {tuple(_BUILDERS)}')
    if config.get('toy_root', ''):
        from data.toy import ensure_toy_dataset

        ensure_toy_dataset(config['toy_root'], exact=False)
    return _BUILDERS[dataset](DatasetRequest(dataset, config, min_scale))


def create_sampler(datasets: Sequence[Dataset], shuffles: Sequence[bool], num_tasks: int,
                   global_rank: int) -> list[DistributedSampler]:
    """One ``DistributedSampler(num_replicas=num_tasks, rank=global_rank, shuffle)`` per dataset."""
    return [DistributedSampler(d, num_replicas=num_tasks, rank=global_rank, shuffle=s)
            for d, s in zip(datasets, shuffles)]


def create_loader(datasets: Sequence[Dataset], samplers: Sequence[Optional[torch.utils.data.Sampler]],
                  batch_size: Sequence[int], num_workers: Sequence[int], is_trains: Sequence[bool],
                  collate_fns: Sequence[Optional[Callable]],
                  persistent: Optional[Sequence[bool]] = None) -> list[DataLoader]:
    """DataLoaders as the original builds them.

    Training loaders drop the last incomplete batch and shuffle when they have no sampler;
    evaluation loaders keep order and every sample. Memory is pinned only when CUDA is available.
    ``persistent``: per loader, keep its workers from one epoch to the next (only for datasets whose workers need
    nothing from the training process between epochs but what they read from shared memory, e.g. the epoch).
    """
    loaders = []
    pin = torch.cuda.is_available()
    for dataset, sampler, bs, workers, is_train, collate_fn, keep in zip(
            datasets, samplers, batch_size, num_workers, is_trains, collate_fns, persistent or [False] * len(datasets)):
        loaders.append(DataLoader(dataset, batch_size=bs, num_workers=workers, pin_memory=pin, sampler=sampler,
                                  shuffle=is_train and sampler is None, collate_fn=collate_fn,
                                  drop_last=is_train, persistent_workers=bool(keep and workers > 0)))
    return loaders
