"""Training transforms for fast data loading: JPEGs decoded at the smallest DCT scale their random crop allows
(libjpeg's scaled decoding through ``Image.draft``), output kept as uint8 and normalised on the device.

The random draws are those of the original pipeline, in the same order and from the same generators
(:class:`DraftResizedCrop` is a ``v2.RandomResizedCrop`` and uses its ``make_params``; the flip draws as
``v2.RandomHorizontalFlip``): with the same seed both pipelines pick the same crop box, flip and RandomAugment ops.
Only the resampling of the crop differs: a JPEG decoded at 1/2, 1/4 or 1/8 scale when the crop is at least twice the
output size, and a crop on whole pixels resized by torch's uint8 antialiased bicubic kernel (the filter of PIL's
bicubic, vectorised; PIL's resize took a third of the time) instead of PIL's, which differs from PIL's result by at
most a few levels at the crop's border (PIL reads pixels beyond the box there). Between the steps the image is an
HWC uint8 array, not a PIL image. ``tests/test_transform_fast.py`` checks draws and pixels.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from transform import CLIP_MEAN, CLIP_STD, TRAIN_AUGS, RandomAugment

__all__ = ['DraftResizedCrop', 'HorizontalFlipHWC', 'create_fast_train_transform', 'decode_scale',
           'normalize_uint8']


def decode_scale(crop_height: int, crop_width: int, out_height: int, out_width: int) -> int:
    """The largest JPEG reduction (8, 4 or 2) leaving the crop at least the output size in both sides, else 1."""
    return next((k for k in (8, 4, 2) if crop_height >= k * out_height and crop_width >= k * out_width), 1)


def resize_crop_uint8(image: np.ndarray, box: tuple[int, int, int, int], out_h: int, out_w: int) -> np.ndarray:
    """HWC uint8 ``image[top:bottom, left:right]`` resized to ``(out_h, out_w)`` with torch's antialiased bicubic
    (a = -0.5, as PIL's), on a channels-last tensor: the layout of torch's vectorised uint8 kernel."""
    left, top, right, bottom = box
    with warnings.catch_warnings():   # PIL's pixels come as a read-only array; this only reads them
        warnings.simplefilter('ignore', UserWarning)
        pixels = torch.from_numpy(image)
    crop = pixels[top:bottom, left:right].permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    if (bottom - top, right - left) != (out_h, out_w):
        crop = F.interpolate(crop, size=(out_h, out_w), mode='bicubic', antialias=True)
    return crop[0].permute(1, 2, 0).numpy()   # channels-last memory is HWC: no copy


class DraftResizedCrop(v2.RandomResizedCrop):
    """``RandomResizedCrop`` for a PIL image that may not be decoded yet: the crop box is drawn from the header's
    size (as ``RandomResizedCrop`` draws it), the JPEG is decoded at the reduced scale that box allows, and the box
    (scaled) is resized bicubically to the output size in one step. HWC uint8 RGB array out (greyscale and other
    modes are converted)."""

    def __call__(self, image: Image.Image) -> np.ndarray:
        params = self.make_params([image])
        top, left, height, width = params['top'], params['left'], params['height'], params['width']
        out_h, out_w = self.size
        full_w, full_h = image.size
        k = decode_scale(height, width, out_h, out_w)
        if k > 1 and image.format == 'JPEG' and image.mode in ('RGB', 'L') and getattr(image, 'tile', None):
            image.draft(image.mode, (-(-full_w // k), -(-full_h // k)))
        sx, sy = image.size[0] / full_w, image.size[1] / full_h
        box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
        if image.mode == 'RGB' and all(float(v).is_integer() for v in box):
            # the box's pixels only: PIL hands its pixels over as a copy
            crop = np.asarray(image.crop(tuple(int(v) for v in box)))
            return resize_crop_uint8(crop, (0, 0, crop.shape[1], crop.shape[0]), out_h, out_w)
        # a box between pixels (a reduced decode) or another mode: PIL's resize of the box
        # reducing_gap: a shrink by 3x or more first averages whole pixel blocks (Image.reduce), then the bicubic
        # filter covers at most 3x; PIL documents the result as indistinguishable from the full filter
        out = image.resize((out_w, out_h), Image.BICUBIC, box=box, reducing_gap=3.0)
        return np.array(out if out.mode == 'RGB' else out.convert('RGB'))


class HorizontalFlipHWC:
    """``v2.RandomHorizontalFlip(p)`` for an HWC array, with its draw (``torch.rand(1) >= p`` keeps the image)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if torch.rand(1) >= self.p:
            return image
        return np.ascontiguousarray(image[:, ::-1])


def hwc_to_chw(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 array -> ``[3, H, W]`` uint8 tensor over the same memory (the batch's collation copies it once)."""
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1)


def create_fast_train_transform(image_size: int, min_scale: float = 0.5, normalize: bool = False) -> v2.Compose:
    """The original's training pipeline (``create_transforms``' train) with :class:`DraftResizedCrop`; uint8
    ``[3, S, S]`` out unless ``normalize`` (then as ``create_transforms``). ``.decodes`` tells a dataset that it
    may hand over an undecoded JPEG."""
    steps = [DraftResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
             HorizontalFlipHWC(), RandomAugment(2, 5, isPIL=False, augs=TRAIN_AUGS), hwc_to_chw]
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
