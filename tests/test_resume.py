"""A training run killed with SIGKILL mid-epoch and resumed with ``--resume auto`` ends with exactly the
weights of an uninterrupted run (CPU, ``num_workers=0``: every random draw — augmentation, dropout, ITM
negative sampling — comes from RNG streams that the checkpoint restores).

With ``num_workers > 0`` the same holds since each sample's augmentation is seeded by (seed, epoch, index)
(tests/test_shards.py kills and resumes runs with 2 workers, on JSON lists and on shards)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.toy import ensure_toy_dataset
from tests.toy_runs import script_env as _env, steps_logged as _steps_logged

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def toy(module_dir) -> Path:
    return ensure_toy_dataset(module_dir('toy'), n_train=12, n_val=4, n_test=4, n_web=12, n_videos=2,
                              video_frames=2)


def pretrain_cmd(toy: Path, out: Path, *extra: str) -> list[str]:
    r = str(toy)
    return [sys.executable, str(ROOT / 'pretrain.py'), '--config', str(ROOT / 'configs/toy/pretrain.yaml'),
            '--output_dir', str(out), '--device', 'cpu', *extra, '--options', f'toy_root={r}',
            f'train_file=[{r}/annotation/coco_karpathy_train.json, {r}/annotation/pretrain_noisy.json]',
            f'image_root={r}/images', 'num_workers=0', 'image_size=32', 'batch_size=8', 'queue_size=16',
            'warmup_steps=3', 'max_epoch=2', 'save_every_steps=2', 'log_every=1']


def _final_weights(out: Path) -> dict:
    return torch.load(out / 'checkpoint_last.pth', weights_only=True)['model']


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(toy, tmp_path):
    straight = tmp_path / 'straight'
    subprocess.run(pretrain_cmd(toy, straight), env=_env(), check=True, capture_output=True, timeout=600)
    steps = _steps_logged(straight)
    per_epoch = max(s for e, s in steps if e == 0)
    assert per_epoch >= 6, 'the toy set must give several steps per epoch'

    killed = tmp_path / 'killed'
    proc = subprocess.Popen(pretrain_cmd(toy, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = (1, 3)  # mid-epoch 1, after the step-2 checkpoint of that epoch
    deadline = time.time() + 600
    while time.time() < deadline and target not in _steps_logged(killed) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    resume = torch.load(killed / 'checkpoint_last.pth', weights_only=True)['resume']
    assert resume['epoch'] == 1 and 0 < resume['step'] < per_epoch, resume

    subprocess.run(pretrain_cmd(toy, killed, '--resume', 'auto'), env=_env(), check=True, capture_output=True,
                   timeout=600)
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} tensors differ after resume, e.g. {different[:3]}'
    # the queues and their pointer (buffers) are part of the resumed state too
    assert torch.equal(a['image_queue'], b['image_queue']) and torch.equal(a['queue_ptr'], b['queue_ptr'])
    # and log.txt's line for the interrupted epoch averages all of its steps, as the uninterrupted run's does
    epochs = [[json.loads(line) for line in (out / 'log.txt').read_text().splitlines()] for out in (straight, killed)]
    assert epochs[0] == epochs[1] and [e['epoch'] for e in epochs[0]] == [0, 1]
    # resuming a finished run trains nothing and says why, rather than exiting silently
    again = subprocess.run(pretrain_cmd(toy, straight, '--resume', 'auto'), env=_env(), check=True,
                           capture_output=True, text=True, timeout=600)
    assert 'nothing left to train' in again.stdout and 'max_epoch' in again.stdout
    assert _steps_logged(straight) == steps
