"""NLVR, fine-tuned from a short toy pretraining as the original fine-tunes from its pretrained model,
must end clearly above chance (50%; the toy statements are true and false equally often, so the sentence
alone predicts nothing). From random weights NLVR stays at chance in every setting swept
(``BENCHMARKS.md``, toy learning sweep)."""
from __future__ import annotations

from pathlib import Path

import pytest

from data.toy import ensure_toy_dataset
from tests.toy_runs import run

pytestmark = pytest.mark.learning


@pytest.fixture(scope='module')
def toy_nlvr(module_dir) -> Path:
    # 300 + 300 evaluation pairs: with 100 + 100 the sampling noise of the accuracy (~3.5 points) was as
    # large as the margin between a learning run and a blind one
    return ensure_toy_dataset(module_dir('toy_nlvr'), n_val=300, n_test=300, n_web=4, n_videos=2,
                              video_frames=2)


@pytest.fixture(scope='module')
def pretrain_run(toy_nlvr, module_dir) -> Path:
    out = module_dir('pretrain')
    run('pretrain', 'pretrain', toy_nlvr, out, f'image_root={toy_nlvr}/images',
        f'train_file=[{toy_nlvr}/annotation/coco_karpathy_train.json]', 'max_epoch=3')
    return out


def test_nlvr_learns_from_a_toy_pretrained_model(toy_nlvr, pretrain_run, tmp_path):
    log = run('train_nlvr', 'nlvr', toy_nlvr, tmp_path, f'image_root={toy_nlvr}/images', 'max_epoch=15',
              f'pretrained={pretrain_run}/checkpoint_last.pth')
    # 600 pairs per epoch, half true; the mean of the last 3 epochs evens out epoch-to-epoch swings of ~2
    accuracy = sum((e['val_acc'] + e['test_acc']) / 2 for e in log[-3:]) / 3
    print(accuracy, log[-1])
    # A constant answer scores 50, the best sentence-only rule ~52. The outcome depends on floating-point
    # details (thread count, machine): with 10 NLVR epochs the final accuracy ranged 53.2-60.2 over 7 runs
    # (seeds, thread counts), one below 55. With 15 epochs (1 thread, seeds 0-2) the mean of the last 3
    # epochs was 58.8, 62.4, 61.6 (seed 0 was the weakest run at 10 epochs: 56.0).
    assert accuracy > 55, (accuracy, log[-3:])
