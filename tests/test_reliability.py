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


# ------------------------------------------------------------------------------------------ non-finite checkpoints

def _tiny_decoder(pretrained: str = ''):
    from models.blip import blip_decoder
    from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT
    return blip_decoder(pretrained, med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT))


NAN_KEY = 'text_decoder.bert.encoder.layer.0.attention.self.query.weight'


def test_checkpoints_with_nan_or_inf_weights_are_refused_naming_the_keys(tmp_path, monkeypatch):
    """One NaN in a decoder attention projection gave a plausible caption (the CPU's SDPA zeroes NaN rows) and
    predict.py exited 0; loading now refuses, naming file and keys; an environment flag loads them for forensics."""
    from engine.checkpoint_io import load_training_state
    from models.checkpoint import CheckpointError
    sd = _tiny_decoder().state_dict()
    key = next(k for k in sd if k.startswith('text_decoder.bert.encoder.layer.0.attention.self.'))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[3] = float('nan')
    sd['visual_encoder.blocks.0.mlp.fc1.weight'] = sd['visual_encoder.blocks.0.mlp.fc1.weight'].clone().fill_(float('inf'))
    path = tmp_path / 'broken.pth'
    torch.save({'model': sd, 'epoch': 0}, path)
    with pytest.raises(CheckpointError, match=rf'broken\.pth: 2 tensor\(s\) hold NaN or inf values: .*{key}') as e:
        _tiny_decoder(str(path))
    assert 'visual_encoder.blocks.0.mlp.fc1.weight' in str(e.value)
    with pytest.raises(CheckpointError, match='hold NaN or inf'):  # --resume from it too
        load_training_state(path, _tiny_decoder(), None)
    monkeypatch.setenv('BLIP_ALLOW_NONFINITE_WEIGHTS', '1')
    model = _tiny_decoder(str(path))
    assert not torch.isfinite(model.state_dict()['visual_encoder.blocks.0.mlp.fc1.weight']).any()


def test_training_from_a_nan_pretrained_file_names_the_file_and_key(toy, tmp_path):
    """It stopped at the first step with 'checkpoints on disk are from earlier steps' (there were none)."""
    import train_caption
    from models.blip import blip_decoder
    from models.checkpoint import CheckpointError
    sd = blip_decoder(image_size=32, vit='tiny', med_config=str(ROOT / 'configs/toy/med_config.json')).state_dict()
    key = next(k for k in sd if k.startswith('text_decoder.bert.encoder.layer.1.'))
    sd[key] = torch.full_like(sd[key], float('nan'))
    torch.save({'model': sd}, tmp_path / 'pre.pth')
    with pytest.raises(CheckpointError, match=rf'pre\.pth: 1 tensor\(s\) hold NaN or inf values: {key}'):
        train_caption.main(caption_argv(toy, tmp_path / 'out', options=(f'pretrained={tmp_path}/pre.pth',)))


def test_a_wrong_task_checkpoint_gives_one_count_of_missing_keys(tmp_path, capsys):
    """An NLVR model from a decoder checkpoint logged '64 missing' and then failed with 'lacks 60 key(s)': the
    new head's keys (initialised afresh) were counted as missing in the log only."""
    from models.blip_nlvr import blip_nlvr
    from models.checkpoint import CheckpointError
    from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT
    torch.save({'model': _tiny_decoder().state_dict()}, tmp_path / 'caption.pth')
    with pytest.raises(CheckpointError, match=r'lacks (\d+) key') as e:
        blip_nlvr(str(tmp_path / 'caption.pth'), med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT))
    lacking = int(e.value.args[0].split('lacks ')[1].split()[0])
    logged = capsys.readouterr().out
    assert f', {lacking} missing' in logged and 'initialised afresh' in logged


def test_a_nan_loss_before_any_checkpoint_does_not_speak_of_checkpoints_on_disk(toy, tmp_path, monkeypatch):
    """'checkpoints on disk are from earlier steps' was said when there were none."""
    import train_caption
    from engine.loop import NonFiniteLossError
    monkeypatch.setattr(train_caption, 'caption_step', lambda model, batch, ctx: {'loss': torch.tensor(float('nan'))})
    with pytest.raises(NonFiniteLossError, match='no checkpoint was written in .*out yet') as e:
        train_caption.main(caption_argv(toy, tmp_path / 'out'))
    assert 'earlier steps' not in str(e.value)
