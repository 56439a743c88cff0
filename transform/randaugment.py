"""BLIP's ``RandomAugment``: N random ops, each applied with probability 0.5 at level M.

Same op list, level-to-argument mapping, random-number order and fill value as the original
(reference 7.1), on PIL / torchvision v2 instead of OpenCV. The global numpy RNG drives every
choice (as in the original), so ``np.random.seed`` makes it reproducible, and DataLoader workers
get distinct streams because PyTorch seeds numpy per worker.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image, ImageEnhance
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

MAX_LEVEL = 10
FILL = (128, 128, 128)
# Translate by up to 10 pixels at MAX_LEVEL (5 at the level BLIP uses).
TRANSLATE_CONST = 10


# ---------------------------------------------------------------------------------------------- ops
# Each op takes and returns an HWC uint8 RGB array.

def identity(img: np.ndarray) -> np.ndarray:
    return img


def autocontrast(img: np.ndarray) -> np.ndarray:
    """Stretch each channel's [min, max] to [0, 255] (cutoff 0); flat channels are left alone."""
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        channel = img[..., c]
        low, high = int(channel.min()), int(channel.max())
        if high <= low:
            out[..., c] = channel
            continue
        scale = 255.0 / (high - low)
        table = np.clip(np.arange(256) * scale - low * scale, 0, 255).astype(np.uint8)
        out[..., c] = table[channel]
    return out


def equalize(img: np.ndarray) -> np.ndarray:
    """Per-channel histogram equalisation, PIL's algorithm (the original reimplements it too)."""
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        channel = img[..., c]
        hist = np.bincount(channel.ravel(), minlength=256)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            out[..., c] = channel
            continue
        counts = np.empty_like(hist)
        counts[0] = step // 2
        counts[1:] = hist[:-1]
        table = np.clip(np.cumsum(counts) // step, 0, 255).astype(np.uint8)
        out[..., c] = table[channel]
    return out


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    table = np.clip(np.arange(256) * factor, 0, 255).astype(np.uint8)
    return table[img]


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return img
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(factor))


def _affine(img: np.ndarray, inverse: tuple, fill: tuple) -> np.ndarray:
    """Warp with the *inverse* affine map (output pixel -> input pixel), bilinear, constant fill."""
    pil = Image.fromarray(img)
    return np.asarray(pil.transform(pil.size, Image.Transform.AFFINE, inverse, Image.Resampling.BILINEAR,
                                    fillcolor=fill))


def shear_x(img: np.ndarray, factor: float, fill: tuple) -> np.ndarray:
    """x' = x + factor * y about the top-left corner (as OpenCV's warpAffine in the original)."""
    return _affine(img, (1, -factor, 0, 0, 1, 0), fill)


def shear_y(img: np.ndarray, factor: float, fill: tuple) -> np.ndarray:
    return _affine(img, (1, 0, 0, -factor, 1, 0), fill)


def translate_x(img: np.ndarray, offset: float, fill: tuple) -> np.ndarray:
    """Content moves by ``-offset`` pixels: output(x) = input(x + offset), as in the original."""
    return _affine(img, (1, 0, offset, 0, 1, 0), fill)


def translate_y(img: np.ndarray, offset: float, fill: tuple) -> np.ndarray:
    return _affine(img, (1, 0, 0, 0, 1, offset), fill)


def rotate(img: np.ndarray, degrees: float, fill: tuple) -> np.ndarray:
    """Counter-clockwise rotation about the image centre, bilinear, corners filled."""
    out = F.rotate(Image.fromarray(img), degrees, interpolation=v2.InterpolationMode.BILINEAR, fill=list(fill))
    return np.asarray(out)


# ------------------------------------------------------------------------------ level -> arguments
# Random signs are drawn here, after the op's probability draw, in the original's order.

def _no_args(level: float) -> tuple:
    return ()


def _enhance_args(level: float) -> tuple:
    # 1.0 at level 5: Brightness and Sharpness are no-ops in BLIP's setting.
    return ((level / MAX_LEVEL) * 1.8 + 0.1,)


def _signed(magnitude: float) -> float:
    return -magnitude if np.random.random() > 0.5 else magnitude


def _shear_args(level: float) -> tuple:
    return _signed((level / MAX_LEVEL) * 0.3), FILL


def _translate_args(level: float) -> tuple:
    return _signed((level / MAX_LEVEL) * float(TRANSLATE_CONST)), FILL


def _rotate_args(level: float) -> tuple:
    # the original negates rotations on random() < 0.5, shears and translations on > 0.5
    degrees = (level / MAX_LEVEL) * 30
    return (-degrees if np.random.random() < 0.5 else degrees), FILL


OPS: dict[str, tuple[Callable, Callable]] = {
    'Identity': (identity, _no_args),
    'AutoContrast': (autocontrast, _no_args),
    'Equalize': (equalize, _no_args),
    'Brightness': (brightness, _enhance_args),
    'Sharpness': (sharpness, _enhance_args),
    'ShearX': (shear_x, _shear_args),
    'ShearY': (shear_y, _shear_args),
    'TranslateX': (translate_x, _translate_args),
    'TranslateY': (translate_y, _translate_args),
    'Rotate': (rotate, _rotate_args),
}


class RandomAugment:
    """Apply ``N`` ops drawn with replacement from ``augs``, each with probability 0.5 at level ``M``.

    Args:
        N: number of ops drawn per image.
        M: magnitude level in [0, 10].
        isPIL: the input is a PIL image (else an HWC uint8 numpy array).
        augs: op names (keys of :data:`OPS`); empty means all of them.

    Returns (when called):
        HWC uint8 RGB numpy array, like the original.
    """

    def __init__(self, N: int = 2, M: int = 5, isPIL: bool = False, augs: Sequence[str] = ()):
        unknown = [a for a in augs if a not in OPS]
        if unknown:
            raise ValueError(f'unknown RandomAugment ops {unknown}; known: {sorted(OPS)}')
        self.N, self.M, self.isPIL = N, M, isPIL
        self.augs = list(augs) if augs else list(OPS)

    def get_random_ops(self) -> list[tuple[str, float, int]]:
        """``(name, probability, level)`` of the ``N`` ops drawn for one image."""
        return [(str(name), 0.5, self.M) for name in np.random.choice(self.augs, self.N)]

    def __call__(self, img: Union[Image.Image, np.ndarray]) -> np.ndarray:
        if self.isPIL:
            img = np.array(img.convert('RGB'))
        for name, prob, level in self.get_random_ops():
            if np.random.random() > prob:
                continue
            op, to_args = OPS[name]
            img = op(img, *to_args(level))
        # PIL-backed results are read-only views; torch warns on those, so hand back a writable copy.
        return img if img.flags.writeable else img.copy()

    def __repr__(self) -> str:
        return f'{type(self).__name__}(N={self.N}, M={self.M}, isPIL={self.isPIL}, augs={self.augs})'
