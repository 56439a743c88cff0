"""Image pipelines for training and evaluation, as the original builds them (reference 7.1)."""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from transform.randaugment import RandomAugment

# CLIP's image statistics, used by BLIP for every task.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BLIP's RandomAugment op list (no colour-destroying ops: captions name colours).
TRAIN_AUGS = ['Identity', 'AutoContrast', 'Brightness', 'Sharpness', 'Equalize',
              'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate']

__all__ = ['CLIP_MEAN', 'CLIP_STD', 'RandomAugment', 'TRAIN_AUGS', 'create_transforms']


def _to_normalized_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD),
            v2.ToPureTensor()]


def create_transforms(image_size: int, min_scale: float = 0.5) -> tuple[v2.Compose, v2.Compose]:
    """The original's train and test pipelines (PIL image -> normalised float tensor [3, S, S]).

    train: RandomResizedCrop(scale=(min_scale, 1), bicubic) -> horizontal flip -> RandomAugment(2, 5)
    -> tensor -> CLIP normalisation. test: Resize((S, S), bicubic) (aspect ratio squashed, no crop)
    -> tensor -> CLIP normalisation.

    Args:
        image_size: output side S.
        min_scale: smallest crop area fraction (0.5 for fine-tuning, 0.2 for pretraining).

    Returns:
        ``(transform_train, transform_test)``.
    """
    bicubic = v2.InterpolationMode.BICUBIC
    train = v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=bicubic),
        v2.RandomHorizontalFlip(),
        RandomAugment(2, 5, isPIL=True, augs=TRAIN_AUGS),
        *_to_normalized_tensor(),
    ])
    test = v2.Compose([v2.Resize((image_size, image_size), interpolation=bicubic), *_to_normalized_tensor()])
    return train, test
