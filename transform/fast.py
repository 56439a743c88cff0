"""Training transforms for fast data loading: JPEGs decoded at the smallest DCT scale their random crop allows
(libjpeg's scaled decoding through ``Image.draft``), output kept as uint8 and normalised on the device.

The random draws are those of the original pipeline, in the same order and from the same generators
(:class:`DraftResizedCrop` is a ``v2.RandomResizedCrop`` and uses its ``make_params``): with the same seed both
pipelines pick the same crop box, flip and RandomAugment ops; only the resampling of the crop differs (a JPEG
decoded at 1/2, 1/4 or 1/8 scale, then the bicubic resize of the same box), when the crop is at least twice the
output size. ``tests/test_transform_fast.py`` checks both.
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2

from transform import CLIP_MEAN, CLIP_STD, TRAIN_AUGS, RandomAugment

__all__ = ['DraftResizedCrop', 'create_fast_train_transform', 'decode_scale', 'normalize_uint8']


def decode_scale(crop_height: int, crop_width: int, out_height: int, out_width: int) -> int:
    """The largest JPEG reduction (8, 4 or 2) leaving the crop at least the output size in both sides, else 1."""
    return next((k for k in (8, 4, 2) if crop_height >= k * out_height and crop_width >= k * out_width), 1)


class DraftResizedCrop(v2.RandomResizedCrop):
    """``RandomResizedCrop`` for a PIL image that may not be decoded yet: the crop box is drawn from the header's
    size (as ``RandomResizedCrop`` draws it), the JPEG is decoded at the reduced scale that box allows, and the box
    (scaled) is resized bicubically to the output size in one step. RGB out (greyscale JPEGs are converted)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        params = self.make_params([image])
        top, left, height, width = params['top'], params['left'], params['height'], params['width']
        out_h, out_w = self.size
        full_w, full_h = image.size
        k = decode_scale(height, width, out_h, out_w)
        if k > 1 and image.format == 'JPEG' and image.mode in ('RGB', 'L') and getattr(image, 'tile', None):
            image.draft(image.mode, (-(-full_w // k), -(-full_h // k)))
        sx, sy = image.size[0] / full_w, image.size[1] / full_h
        # reducing_gap: a shrink by 3x or more first averages whole pixel blocks (Image.reduce), then the bicubic
        # filter covers at most 3x; PIL documents the result as indistinguishable from the full filter
        out = image.resize((out_w, out_h), Image.BICUBIC,
                           box=(left * sx, top * sy, (left + width) * sx, (top + height) * sy), reducing_gap=3.0)
        return out if out.mode == 'RGB' else out.convert('RGB')


def create_fast_train_transform(image_size: int, min_scale: float = 0.5, normalize: bool = False) -> v2.Compose:
    """The original's training pipeline (``create_transforms``' train) with :class:`DraftResizedCrop`; uint8
    ``[3, S, S]`` out unless ``normalize`` (then as ``create_transforms``). ``.decodes`` tells a dataset that it
    may hand over an undecoded JPEG."""
    steps = [DraftResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
             v2.RandomHorizontalFlip(), RandomAugment(2, 5, isPIL=True, augs=TRAIN_AUGS), v2.ToImage()]
    if normalize:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)]
    transform = v2.Compose([*steps, v2.ToPureTensor()])
    transform.decodes = True
    return transform


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> CLIP-normalised float32 on the images' device (what the slow pipeline's
    ``ToDtype(scale=True)`` + ``Normalize`` do in each worker)."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std
