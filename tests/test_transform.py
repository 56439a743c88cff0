"""RandomAugment (BLIP's op list, probabilities, magnitudes, fill) and the train/test pipelines."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from transform import CLIP_MEAN, CLIP_STD, TRAIN_AUGS, create_transforms
from transform.randaugment import OPS, RandomAugment, autocontrast, equalize, rotate, translate_x


def random_image(seed=0, size=(24, 32)):
    return (np.random.default_rng(seed).random((*size, 3)) * 200 + 20).astype(np.uint8)


def test_ops_are_chosen_uniformly_with_replacement():
    aug = RandomAugment(2, 5, augs=TRAIN_AUGS)
    np.random.seed(0)
    draws = [name for _ in range(5000) for name, prob, level in aug.get_random_ops()]
    counts = {name: draws.count(name) / len(draws) for name in TRAIN_AUGS}
    assert all(abs(f - 0.1) < 0.01 for f in counts.values()), counts
    assert all(prob == 0.5 and level == 5 for _, prob, level in aug.get_random_ops())
    np.random.seed(1)
    pairs = [tuple(n for n, _, _ in aug.get_random_ops()) for _ in range(2000)]
    assert 0.07 < sum(a == b for a, b in pairs) / len(pairs) < 0.13  # with replacement: P(same) = 0.1


def test_each_op_applied_with_probability_half():
    aug = RandomAugment(2, 5, augs=['Rotate'])
    img = random_image()
    np.random.seed(0)
    changed = np.mean([not np.array_equal(aug(img), img) for _ in range(1000)])
    assert abs(changed - 0.75) < 0.04  # two draws, each applied with p=0.5


@pytest.mark.parametrize('name', ['Brightness', 'Sharpness', 'Identity'])
def test_level_5_enhance_ops_are_noops(name):
    img = random_image()
    np.random.seed(0)
    aug = RandomAugment(2, 5, augs=[name])
    assert all(np.array_equal(aug(img), img) for _ in range(20))


def test_seeded_runs_are_identical():
    aug = RandomAugment(2, 5, isPIL=True, augs=TRAIN_AUGS)
    pil = Image.fromarray(random_image(3))
    np.random.seed(42)
    first = [aug(pil) for _ in range(30)]
    np.random.seed(42)
    second = [aug(pil) for _ in range(30)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert all(a.dtype == np.uint8 and a.shape == (24, 32, 3) and a.flags.writeable for a in first)


def test_autocontrast_and_equalize_match_pil():
    img = random_image(5)
    pil = Image.fromarray(img)
    assert np.array_equal(autocontrast(img), np.asarray(ImageOps.autocontrast(pil, cutoff=0)))
    assert np.array_equal(equalize(img), np.asarray(ImageOps.equalize(pil)))


def test_geometry_direction_and_fill():
    img = np.zeros((16, 16, 3), np.uint8)
    img[8, 10] = 255
    out = translate_x(img, 5.0, (128, 128, 128))
    assert tuple(out[8, 5]) == (255, 255, 255)          # output(x) = input(x + 5): content moves left
    assert tuple(out[0, 15]) == (128, 128, 128)          # uncovered area takes the fill
    square = np.full((21, 21, 3), 50, np.uint8)
    rotated = rotate(square, 15.0, (128, 128, 128))
    assert tuple(rotated[0, 0]) == (128, 128, 128) and tuple(rotated[10, 10]) == (50, 50, 50)


def test_magnitudes_at_level_5():
    np.random.seed(0)
    assert OPS['Brightness'][1](5) == (1.0,)
    assert {abs(OPS['ShearX'][1](5)[0]) for _ in range(10)} == {0.15}
    assert {abs(OPS['TranslateY'][1](5)[0]) for _ in range(10)} == {5.0}
    signs = {np.sign(OPS['Rotate'][1](5)[0]) for _ in range(50)}
    assert {abs(OPS['Rotate'][1](5)[0]) for _ in range(10)} == {15.0} and signs == {-1.0, 1.0}
    assert OPS['Rotate'][1](5)[1] == (128, 128, 128)


def test_unknown_op_is_an_error():
    with pytest.raises(ValueError, match='Solarise'):
        RandomAugment(2, 5, augs=['Solarise'])


def test_create_transforms_shapes_and_normalisation():
    train, test = create_transforms(32, min_scale=0.5)
    pil = Image.fromarray(random_image(1, (40, 60)))
    torch.manual_seed(0)
    np.random.seed(0)
    x = train(pil)
    assert type(x) is torch.Tensor and x.shape == (3, 32, 32) and x.dtype == torch.float32
    y = test(Image.new('RGB', (50, 20), (255, 0, 0)))
    assert y.shape == (3, 32, 32)
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(y[:, 16, 16], expected, atol=1e-5)
    assert 'RandomAugment' in repr(train) and 'RandomResizedCrop' in repr(train)


def test_sign_draws_follow_the_original():
    """Same seed, same directions as the original: rotations are negated when random() < 0.5, shears and
    translations when random() > 0.5."""
    np.random.seed(3)
    draws = np.random.random(20)
    np.random.seed(3)
    assert [OPS['Rotate'][1](5)[0] for _ in range(10)] == [-15.0 if d < 0.5 else 15.0 for d in draws[:10]]
    assert [OPS['ShearX'][1](5)[0] for _ in range(10)] == [-0.15 if d > 0.5 else 0.15 for d in draws[10:]]
