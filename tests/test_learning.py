"""A short CPU run of the real captioning script on the toy dataset must learn: CIDEr ends clearly above
what a model that ignores the image scores (one caption for every image, "mode collapse": CIDEr ~0.55
on this toy set, measured), so a broken loss, mask, prompt or label fails it.

Retrieval, VQA and NLVR from random weights do not leave chance within a CI-sized CPU budget (measured:
ITC/ITM losses stay at their chance values for 4-6 epochs on 300 images; VQA stays at its image-blind
prior of ~46%), so they have no learning test yet; see issue 5's note.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.toy import ensure_toy_dataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def toy(tmp_path_factory) -> Path:
    return ensure_toy_dataset(tmp_path_factory.mktemp('toy'), n_train=300, n_val=30, n_test=30, n_web=4,
                              n_videos=2, video_frames=2)


def run(script: str, config: str, toy: Path, out: Path, *options: str) -> dict:
    import importlib
    r = str(toy)
    argv = ['--config', str(ROOT / 'configs' / 'toy' / f'{config}.yaml'), '--output_dir', str(out),
            '--device', 'cpu', '--seed', '0', '--options', f'toy_root={r}', 'num_workers=0', *options]
    importlib.import_module(script).main(argv)
    return json.loads((out / 'log.txt').read_text().splitlines()[-1])


def test_captioning_learns(toy, tmp_path):
    stats = run('train_caption', 'caption', toy, tmp_path, f'image_root={toy}/images', f'ann_root={toy}/annotation',
                f'coco_gt_root={toy}/annotation/coco_gt', 'max_epoch=6', 'init_lr=3e-3', 'num_beams=2')
    print(stats)
    # measured: val 1.25 / test 1.28 after 6 epochs (276 steps); mode collapse scores ~0.55
    assert stats['val_CIDEr'] > 0.9 and stats['test_CIDEr'] > 0.9
