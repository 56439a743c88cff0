"""transform.fast: the fast pretraining pipeline (JPEG decoded at a reduced DCT scale, uint8 out, normalised on the
device) makes the same random draws as the original pipeline and gives nearly the same pixels, so the augmentation's
distribution is unchanged."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from transform import create_transforms
from transform.fast import create_fast_train_transform, decode_scale, normalize_uint8


def photo_like(width: int, height: int) -> bytes:
    """A JPEG (quality 90) with smooth gradients and a few sharp shapes."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = np.concatenate([x * 200 + 30 + 0 * y, y * 180 + 40 + 0 * x, (x + y) * 90 + 20], axis=2)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.1, height * 0.2, width * 0.4, height * 0.6], fill=(220, 30, 30))
    draw.rectangle([width * 0.55, height * 0.5, width * 0.9, height * 0.85], fill=(20, 40, 200))
    buf = io.BytesIO()
    image.save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def run(transform, data: bytes, seed: int, decode: bool):
    torch.manual_seed(seed)
    np.random.seed(seed)
    image = Image.open(io.BytesIO(data))
    if decode:
        image = image.convert('RGB')
    out = transform(image)
    return out, torch.get_rng_state(), np.random.get_state()[1].copy()


@pytest.mark.parametrize('size,min_scale,shape', [(224, 0.2, (640, 480)), (384, 0.5, (1024, 768))])
def test_same_random_draws_and_nearly_the_same_pixels(size, min_scale, shape):
    data = photo_like(*shape)
    slow, _ = create_transforms(size, min_scale)
    fast = create_fast_train_transform(size, min_scale)
    diffs, other = [], []
    for seed in range(12):
        a, rng_a, np_a = run(slow, data, seed, decode=True)
        b, rng_b, np_b = run(fast, data, seed, decode=False)
        assert b.dtype == torch.uint8 and b.shape == a.shape
        # the same number and order of draws from both generators: the same crop, flip and RandomAugment ops
        assert torch.equal(rng_a, rng_b) and (np_a == np_b).all()
        diffs.append((normalize_uint8(b[None])[0] - a).abs().mean().item())
        c, _, _ = run(slow, data, seed + 1000, decode=True)
        other.append((c - a).abs().mean().item())
    # scaled decoding changes pixels a little; another draw changes them a lot
    assert np.median(diffs) < 0.05 and max(diffs) < 0.2, diffs
    assert np.median(other) > 5 * np.median(diffs)


def test_uint8_then_device_normalisation_equals_the_worker_normalisation():
    data = photo_like(64, 48)
    slow, _ = create_transforms(32, 0.2)
    normalised = create_fast_train_transform(32, 0.2, normalize=True)
    uint8 = create_fast_train_transform(32, 0.2)
    a, _, _ = run(normalised, data, 3, decode=False)
    b, _, _ = run(uint8, data, 3, decode=False)
    assert torch.allclose(normalize_uint8(b[None])[0], a, atol=1e-6)


def test_decode_scale_keeps_the_crop_at_least_the_output_size():
    assert decode_scale(480, 640, 224, 224) == 2
    assert decode_scale(447, 640, 224, 224) == 1
    assert decode_scale(1800, 1800, 224, 224) == 8
    assert decode_scale(100, 100, 224, 224) == 1


def test_torch_uint8_bicubic_of_a_crop_matches_pils_bicubic():
    """The crop's resize runs on torch's vectorised uint8 kernel; on the same pixels it is PIL's bicubic (down and
    up) to a level or two of rounding."""
    from transform.fast import resize_crop_uint8
    image = Image.open(io.BytesIO(photo_like(320, 240))).convert('RGB')
    for box, (h, w) in [((0, 0, 320, 240), (112, 112)), ((10, 20, 300, 230), (150, 90)), ((0, 0, 100, 80), (224, 224))]:
        crop = image.crop(box)
        ours = resize_crop_uint8(np.asarray(crop), (0, 0, crop.width, crop.height), h, w)
        theirs = np.asarray(crop.resize((w, h), Image.BICUBIC))
        assert ours.shape == theirs.shape == (h, w, 3)
        assert np.abs(ours.astype(int) - theirs).max() <= 2, box
