"""Faults a hostile-but-fair user finds (issue #28): a second run in a live run's folder, broken evaluation
images, non-finite checkpoints, ``pretrain.py --evaluate``, logs after a resume, and messages a person can read."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import numpy as np
import torch

from data.toy import ensure_toy_dataset
from tests.toy_runs import script_env

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


# ------------------------------------------------------------------------------------------ output folder lock

def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ('import sys, time; from engine.lock import lock_output_dir; lock_output_dir(sys.argv[1]); '
            'print("held", flush=True); time.sleep(120)')
    holder = subprocess.Popen([sys.executable, '-c', code, str(folder)], cwd=ROOT, env=script_env(),
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
    assert f', {lacking} missing' in logged and 'initialises afresh' in logged


def test_a_nan_loss_before_any_checkpoint_does_not_speak_of_checkpoints_on_disk(toy, tmp_path, monkeypatch):
    """'checkpoints on disk are from earlier steps' was said when there were none."""
    import train_caption
    from engine.loop import NonFiniteLossError
    monkeypatch.setattr(train_caption, 'caption_step', lambda model, batch, ctx: {'loss': torch.tensor(float('nan'))})
    with pytest.raises(NonFiniteLossError, match='no checkpoint was written in .*out yet') as e:
        train_caption.main(caption_argv(toy, tmp_path / 'out'))
    assert 'earlier steps' not in str(e.value)


# ------------------------------------------------------------------------------------------ evaluation splits

@pytest.fixture
def own_toy(tmp_path) -> Path:
    """A toy dataset this test may damage."""
    return ensure_toy_dataset(tmp_path / 'toy', n_train=8, n_val=4, n_test=4, n_web=2, n_videos=0)


def test_an_unreadable_evaluation_image_stops_the_run_before_training(own_toy, tmp_path, monkeypatch):
    """One corrupt val image ended the run after a whole training epoch, with no checkpoint written."""
    import train_caption
    from data.loading import BadSampleError
    from engine.runner import Run
    monkeypatch.setenv('BLIP_ANN_CACHE', str(tmp_path / 'cache'))
    val = json.loads((own_toy / 'annotation/coco_karpathy_val.json').read_text())
    bad = own_toy / 'images' / val[1]['image']
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    trained = []
    monkeypatch.setattr(Run, 'train_epoch', lambda self, *a, **kw: trained.append(1))
    with pytest.raises(BadSampleError, match=rf'1 of 4 evaluation image\(s\) cannot be read.*\n  {bad} '
                                             r'\(annotation index 1 of .*coco_karpathy_val\.json\)'):
        train_caption.main(caption_argv(own_toy, tmp_path / 'out', options=('skip_bad_samples=True',)))
    assert not trained and not list((tmp_path / 'out').glob('checkpoint_*'))


def test_images_that_opened_are_not_opened_again(own_toy, tmp_path, monkeypatch):
    from data import image_check
    refs = [(str(p), i, 'ann.json') for i, p in enumerate(sorted((own_toy / 'images').rglob('*.jpg'))[:6])]
    assert image_check.check_images(refs, 'split', cache_dir=str(tmp_path)) == 6
    assert image_check.check_images(refs, 'split', cache_dir=str(tmp_path)) == 0   # all cached
    Path(refs[2][0]).write_bytes(b'not an image')                                   # changed: checked again
    with pytest.raises(image_check.BadSampleError, match='1 of 6'):
        image_check.check_images(refs, 'split', cache_dir=str(tmp_path))


def _cheap_scores(monkeypatch):
    """The COCO scorers (METEOR's and SPICE's Java among them) take most of a toy epoch's time; these tests are
    about what is saved and logged, not the scores."""
    import train_caption
    monkeypatch.setattr(train_caption, 'coco_caption_eval', lambda gt, path: {'CIDEr': 0.5, 'Bleu_4': 0.1})


def test_a_failing_evaluation_keeps_the_trained_epoch(toy, tmp_path, monkeypatch):
    """The epoch is saved before its evaluation; --resume auto goes straight to the evaluation, and the logs read
    as one run."""
    import train_caption
    _cheap_scores(monkeypatch)
    out = tmp_path / 'out'
    evaluate = train_caption.evaluate_split

    def broken(*args, **kwargs):
        raise RuntimeError('evaluation failed')

    monkeypatch.setattr(train_caption, 'evaluate_split', broken)
    with pytest.raises(RuntimeError, match='evaluation failed'):
        train_caption.main(caption_argv(toy, out))
    saved = torch.load(out / 'checkpoint_last.pth', weights_only=True)['resume']
    steps = len(json.loads((toy / 'annotation/coco_karpathy_train.json').read_text())) // 4
    assert (saved['epoch'], saved['step']) == (0, steps)     # the whole epoch, evaluation pending
    monkeypatch.setattr(train_caption, 'evaluate_split', evaluate)
    trained_steps = []
    from engine import runner
    train = runner.train_one_epoch
    monkeypatch.setattr(runner, 'train_one_epoch', lambda *a: trained_steps.append(a[3].start_step) or train(*a))
    stats = train_caption.main(caption_argv(toy, out, '--resume', 'auto'))
    assert trained_steps == [steps] and stats['epoch'] == 0 and 'val_CIDEr' in stats and stats['train_loss'] > 0


# ------------------------------------------------------------------------------------------ logs after a resume

def test_logs_read_as_one_run_after_a_resume_and_a_fresh_run_starts_them_anew(toy, tmp_path, monkeypatch):
    """log.txt got the same epoch twice when a run was killed between its epoch line and checkpoint_last, and
    train_log.jsonl repeated steps after a resume and was appended to by a later unrelated run."""
    import train_caption
    _cheap_scores(monkeypatch)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'train_log.jsonl').write_text('{"epoch": 0, "step": 1, "loss": 99.0, "unrelated": true}\n')
    (out / 'log.txt').write_text('{"epoch": 0, "unrelated": true}\n')
    train_caption.main(caption_argv(toy, out, options=('log_every=5',)))
    assert 'unrelated' not in (out / 'train_log.jsonl').read_text() + (out / 'log.txt').read_text()
    # a run cut off after writing epoch 1's lines but before its checkpoint_last
    with open(out / 'log.txt', 'a') as f:
        f.write('{"epoch": 1, "cut_off": true}\n')
    with open(out / 'train_log.jsonl', 'a') as f:
        f.write('{"epoch": 1, "step": 5, "cut_off": true}\n{"epoch": 1, "step": 10, "cut_o')  # torn by the kill
    train_caption.main(caption_argv(toy, out, '--resume', 'auto', options=('log_every=5', 'max_epoch=2')))
    epochs = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    steps = [json.loads(line) for line in (out / 'train_log.jsonl').read_text().splitlines()]
    assert [e['epoch'] for e in epochs] == [0, 1] and not any('cut_off' in e for e in epochs + steps)
    assert [(s['epoch'], s['step']) for s in steps] == [(0, 5), (0, 10), (1, 5), (1, 10)]


# ------------------------------------------------------------------------------------------ flags

def test_pretrain_refuses_evaluate_and_leaves_an_earlier_run_alone(toy, tmp_path, capsys):
    """``pretrain.py --evaluate`` trained an epoch and, since --evaluate skipped the output-folder check,
    rewrote an earlier run's checkpoint_00.pth and appended to its log.txt."""
    import pretrain
    from engine.config import UsageError
    out = tmp_path / 'earlier'
    out.mkdir()
    (out / 'checkpoint_00.pth').write_bytes(b'earlier run')
    (out / 'log.txt').write_text('{"epoch": 0}\n')
    argv = ['--config', str(ROOT / 'configs/toy/pretrain.yaml'), '--output_dir', str(out), '--device', 'cpu',
            '--evaluate', '--options', f'toy_root={toy}']
    with pytest.raises(UsageError, match='--evaluate is not supported.*train_retrieval.py --evaluate'):
        pretrain.main(argv)
    assert (out / 'checkpoint_00.pth').read_bytes() == b'earlier run'
    assert (out / 'log.txt').read_text() == '{"epoch": 0}\n' and sorted(p.name for p in out.iterdir()) == [
        'checkpoint_00.pth', 'log.txt']
    with pytest.raises(SystemExit):
        pretrain.main(['--help'])
    assert '--evaluate' not in capsys.readouterr().out


def test_evaluation_only_scripts_refuse_resume_and_overwrite(tmp_path, capsys):
    import eval_nocaps
    from engine.config import UsageError
    base = ['--config', str(ROOT / 'configs/toy/nocaps.yaml'), '--output_dir', str(tmp_path / 'out')]
    for flag in (['--resume', 'auto'], ['--overwrite']):
        with pytest.raises(UsageError, match=f'{flag[0]} does not apply'):
            eval_nocaps.main(base + flag)
    assert not (tmp_path / 'out').exists()
    with pytest.raises(SystemExit):
        eval_nocaps.main(['--help'])
    shown = capsys.readouterr().out
    assert '--resume' not in shown and '--overwrite' not in shown and '--evaluate' not in shown
    assert re.search(r'--seed SEED\s+seed of', shown) and re.search(r'--distributed BOOL\s+join a process group', shown)


# ------------------------------------------------------------------------------------------ messages

def _script(args: list[str], torchrun: bool = False, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] if torchrun \
        else [sys.executable]
    return subprocess.run([*launcher, *args], cwd=ROOT, env={**script_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=300)


def test_a_user_error_is_one_message_with_exit_status_2_and_a_traceback_only_on_request(tmp_path, capsys,
                                                                                       monkeypatch):
    """A misspelled key printed an 18-66 line traceback with the message last."""
    import train_caption
    from engine.errors import run_script
    args = ['--config', str(ROOT / 'configs/toy/caption.yaml'), '--output_dir', str(tmp_path / 'out'), '--device',
            'cpu', '--options', 'batch_sise=3']
    proc = _script([str(ROOT / 'train_caption.py'), *args])  # as a person runs it
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.startswith("error: --options") and "did you mean 'batch_size'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2 and not (tmp_path / 'out').exists()
    with pytest.raises(SystemExit) as e:
        run_script(train_caption.main, args)  # the same, in-process
    assert e.value.code == 2 and 'Traceback' not in capsys.readouterr().err
    monkeypatch.setenv('BLIP_DEBUG', '1')
    with pytest.raises(SystemExit) as e:
        run_script(train_caption.main, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' in err and 'error: --options' in err
    monkeypatch.delenv('BLIP_DEBUG')
    damaged = tmp_path / 'damaged.pth'
    damaged.write_bytes(b'\0' * 100)
    with pytest.raises(SystemExit) as e:
        run_script(train_caption.main, ['--config', str(ROOT / 'configs/toy/caption.yaml'), '--output_dir',
                                        str(tmp_path / 'out2'), '--device', 'cpu', '--resume', str(damaged)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'Traceback' not in err and 'not a PyTorch checkpoint' in err


def test_under_torchrun_one_rank_reports_a_config_error_and_the_others_exit_quietly(tmp_path):
    """Both ranks' tracebacks (67 lines) were interleaved."""
    proc = _script([str(ROOT / 'train_caption.py'), '--config', str(ROOT / 'configs/toy/caption.yaml'),
                    '--output_dir', str(tmp_path / 'out'), '--device', 'cpu', '--options', 'batch_sise=3'],
                   torchrun=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and output.count("unknown config key(s) ['batch_sise']") == 1
    assert 'Traceback (most recent call last):\n  File "' + str(ROOT / 'train_caption.py') not in output


# ------------------------------------------------------------------------------------------ bad training samples

def test_skip_bad_samples_counts_files_draws_random_replacements_and_logs_the_epoch_total(own_toy, tmp_path,
                                                                                          monkeypatch):
    """20 bad files were reported as '210 so far' (failed reads), every bad entry became the same next entry, and
    no total reached log.txt."""
    import train_caption
    from data.coco_karpathy_dataset import coco_karpathy_train
    from data.utils import pre_caption
    _cheap_scores(monkeypatch)
    train = json.loads((own_toy / 'annotation/coco_karpathy_train.json').read_text())
    bad_images = sorted({entry['image'] for entry in train})[:3]
    for name in bad_images:
        (own_toy / 'images' / name).write_bytes(b'\xff\xd8 not a jpeg')
    ds = coco_karpathy_train(lambda image: 0, str(own_toy / 'images'), str(own_toy / 'annotation'),
                             skip_bad_samples=True)
    bad = [i for i, entry in enumerate(train) if entry['image'] in bad_images]
    replaced = [ds[i][1] for i in bad]
    assert ds.num_bad_samples == 3                                  # files, not failed reads
    assert len(set(replaced)) > len(bad) // 2                       # not all the same neighbour
    assert not set(replaced) & {pre_caption(train[i]['caption'], 30) for i in bad}
    out = tmp_path / 'out'
    train_caption.main(caption_argv(own_toy, out, options=('skip_bad_samples=True', 'num_workers=2')))
    epoch = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    assert epoch['train_bad_samples'] == 3


def test_empty_training_captions_are_counted_in_a_warning_per_file(tmp_path, caplog):
    """Empty captions were accepted silently."""
    import logging
    from data.coco_karpathy_dataset import coco_karpathy_train
    entries = [{'image': f'x{i}.jpg', 'caption': c, 'image_id': i}
               for i, c in enumerate(['a dog', '', ' ... ', 'a cat', '  '])]
    (tmp_path / 'coco_karpathy_train.json').write_text(json.dumps(entries))
    with caplog.at_level(logging.WARNING):
        coco_karpathy_train(lambda image: image, str(tmp_path), str(tmp_path))
    warned = [r.getMessage() for r in caplog.records if 'empty' in r.getMessage()]
    assert len(warned) == 1 and 'coco_karpathy_train.json: 3 of 5 entries have an empty' in warned[0]


def test_where_flock_is_unsupported_the_lock_is_an_exclusive_file_and_a_dead_holders_is_taken_over(tmp_path,
                                                                                                 monkeypatch):
    import errno
    import socket
    from engine import lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, 'No locks available')

    monkeypatch.setattr(lock.fcntl, 'flock', no_flock)
    first = lock.OutputDirLock(tmp_path).acquire()
    with pytest.raises(lock.OutputDirInUse, match=rf'pid {os.getpid()} on host '):
        lock.OutputDirLock(tmp_path).acquire()
    first.release()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / (lock.LOCK_NAME + '.excl')).write_text(json.dumps({'host': socket.gethostname(), 'pid': dead.pid}))
    lock.OutputDirLock(tmp_path).acquire().release()  # a crashed holder on this host: stale, taken over
    (tmp_path / (lock.LOCK_NAME + '.excl')).write_text(json.dumps({'host': 'elsewhere', 'pid': 1}))
    with pytest.raises(lock.OutputDirInUse, match='if no run is live there, remove'):
        lock.OutputDirLock(tmp_path).acquire()


def _signal_then_sleep(started, seconds: float) -> None:
    started.set()
    time.sleep(seconds)


def test_a_forked_child_does_not_keep_the_output_dir_lock(tmp_path):
    """DataLoader workers outlive a SIGKILLed run by seconds; they held its flock (a forked copy of the same open
    file), so an immediate --resume auto was refused naming the dead run (issue 25's flaky kill-and-resume test)."""
    import multiprocessing
    from engine import lock
    held = lock.lock_output_dir(tmp_path)
    ctx = multiprocessing.get_context('fork')
    started = ctx.Event()
    child = ctx.Process(target=_signal_then_sleep, args=(started, 60), daemon=True)
    child.start()
    # the fork handlers run in the child before its target: on a loaded machine the parent would otherwise race
    # ahead of a child that has not run yet
    assert started.wait(60)
    try:
        with pytest.raises(lock.OutputDirInUse):   # the parent's lock still holds while the child lives
            lock.OutputDirLock(tmp_path).acquire()
        held.release()                              # the run ends; its worker is still alive
        lock.OutputDirLock(tmp_path).acquire().release()
    finally:
        child.kill()
        child.join()


def test_vqa_from_a_checkpoint_without_a_decoder_logs_the_count_its_refusal_names(tmp_path, capsys):
    """predict.py --task vqa on another task's checkpoint logged '64 missing' and failed with 'lacks 60'."""
    from models.blip_vqa import blip_vqa
    from models.checkpoint import CheckpointError
    from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT
    sd = {k: v for k, v in _tiny_decoder().state_dict().items() if not k.startswith('text_decoder.')}
    torch.save({'model': sd}, tmp_path / 'caption.pth')
    with pytest.raises(CheckpointError, match=r'lacks (\d+) key') as e:
        blip_vqa(str(tmp_path / 'caption.pth'), med_config=dict(TINY_MED), image_size=TINY_IMAGE, vit=dict(TINY_VIT))
    lacking = int(e.value.args[0].split('lacks ')[1].split()[0])
    assert f', {lacking} missing' in capsys.readouterr().out
