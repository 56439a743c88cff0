"""Faults a hostile-but-fair user finds (issue #28): a second run in a live run's folder, broken evaluation
images, non-finite checkpoints, ``pretrain.py --evaluate``, logs after a resume, and messages a person can read."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.toy import ensure_toy_dataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def toy(tmp_path_factory) -> Path:
    return ensure_toy_dataset(tmp_path_factory.mktemp('toy'), n_train=8, n_val=4, n_test=4, n_web=8, n_videos=0)


def caption_argv(toy: Path, out: Path, *extra: str, options: tuple = ()) -> list[str]:
    r = str(toy)
    return ['--config', str(ROOT / 'configs/toy/caption.yaml'), '--output_dir', str(out), '--device', 'cpu', *extra,
            '--options', f'toy_root={r}', f'image_root={r}/images', f'ann_root={r}/annotation',
            f'coco_gt_root={r}/annotation/coco_gt', 'num_workers=0', 'image_size=32', 'batch_size=4',
            'max_length=6', 'num_beams=1', 'max_epoch=1', *options]


def _env() -> dict:
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': str(ROOT)}


# ------------------------------------------------------------------------------------------ output folder lock

def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ('import sys, time; from engine.lock import lock_output_dir; lock_output_dir(sys.argv[1]); '
            'print("held", flush=True); time.sleep(120)')
    holder = subprocess.Popen([sys.executable, '-c', code, str(folder)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'held'
    return holder


def test_a_second_run_in_a_live_runs_output_dir_is_refused_at_once(toy, tmp_path):
    """Two runs in one folder interleaved train_log.jsonl and deleted each other's checkpoint temp files; the
    second is now refused before any work, naming the folder and the holder; a killed holder's lock is gone."""
    import train_caption
    from engine.lock import OutputDirInUse, lock_output_dir, release_output_dir
    out = tmp_path / 'o7'
    holder = _hold_lock(out)
    try:
        t0 = time.time()
        with pytest.raises(OutputDirInUse, match=rf'{out}.*pid {holder.pid} on host '):
            train_caption.main(caption_argv(toy, out, '--resume', 'auto'))
        assert time.time() - t0 < 30 and not (out / 'config.yaml').exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_output_dir(out)  # a crashed holder leaves no stale lock
    release_output_dir(out)


# ------------------------------------------------------------------------------------------ evaluation images
