"""The webdataset shard source of pretraining (data.shards): split over ranks and loader workers without overlap,
the same pairs as the equivalent JSON list, exact resume at the sample and at shard granularity with another
layout, and every kind of dirty web sample counted and skipped."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from data.loading import stop_workers
from data.pretrain_dataset import load_annotation_index, pretrain_dataset
from data.shards import (DirtLimits, Shard, ShardCollate, ShardProgress, ShardStream, buffer_order, expand_shard_urls,
                         json_shards, shard_count, to_rgb)
from data.toy import ensure_toy_dataset, ensure_toy_shards
from transform import create_transforms
from tests.toy_runs import script_env as _env, steps_logged as _steps_logged

N_WEB = 24


@pytest.fixture(scope='module')
def toy(module_dir) -> Path:
    root = ensure_toy_dataset(module_dir('toy'), n_train=4, n_val=2, n_test=2, n_web=N_WEB, n_videos=2,
                              video_frames=2)
    ensure_toy_shards(root, shard_size=5)   # 24 pairs: shards of 5, 5, 5, 5, 4
    return root


def toy_shards(toy: Path) -> list[Shard]:
    return [Shard(u, shard_count(u)) for u in expand_shard_urls(f'{toy}/shards/{{00000..00004}}.tar')]


def stream(toy: Path, batch: int = 3, world: int = 1, rank: int = 0, shards=None, buffer: int = 4, **kw) -> ShardStream:
    transform, _ = create_transforms(16, 0.2)
    return ShardStream(shards or toy_shards(toy), transform, batch, world, rank, seed=7, shuffle_buffer=buffer, **kw)


def epoch_batches(ds: ShardStream, workers: int, epoch: int = 0, start: int = 0) -> list[tuple]:
    """(ids, captions, image hash, BatchInfo) per batch of one epoch through a real DataLoader."""
    ds.set_epoch(epoch)
    ds.start_at_step(start, max(1, workers))
    loader = DataLoader(ds, batch_size=ds.batch_size, num_workers=workers, drop_last=True, collate_fn=ShardCollate())
    out = []
    for step, (image, caption, info) in zip(range(start, ds.steps), loader):
        out.append((tuple(info.ids), tuple(caption), hashlib.sha1(image.numpy().tobytes()).hexdigest(), info))
    return out


def test_toy_shards_have_img2dataset_layout(toy):
    urls = expand_shard_urls(f'{toy}/shards/{{00000..00004}}.tar')
    assert [shard_count(u) for u in urls] == [5, 5, 5, 5, 4]
    stats = json.loads((toy / 'shards' / '00000_stats.json').read_text())
    assert stats['successes'] == 5
    first = next(iter(wds.WebDataset(urls[0], shardshuffle=False)))
    assert {'jpg', 'txt', 'json'} <= set(first)
    entries = json.loads((toy / 'annotation' / 'pretrain_noisy.json').read_text())
    assert first['txt'].decode() == entries[0]['caption']
    assert first['jpg'] == (toy / 'images' / entries[0]['image']).read_bytes()


def test_shard_count_counted_once_and_cached_without_stats(toy, tmp_path):
    url = str(toy / 'shards' / '00001.tar')
    copy = tmp_path / 'x.tar'
    copy.write_bytes(Path(url).read_bytes())
    assert shard_count(str(copy), tmp_path / 'cache') == 5
    assert len(list((tmp_path / 'cache').iterdir())) == 1
    with pytest.raises(FileNotFoundError, match='no such shard file'):
        expand_shard_urls(str(tmp_path / '{0..1}.tar'))


def test_two_ranks_two_workers_no_overlap_full_coverage(toy):
    """2 ranks x 2 workers, batch 3: 24 pairs give 4 steps per rank; every pair exactly once, and each step's
    batch comes from the worker the round-robin assigns (the plan the resume relies on)."""
    seen = []
    for rank in range(2):
        batches = epoch_batches(stream(toy, world=2, rank=rank), workers=2)
        assert len(batches) == 4
        assert [b[3].logical for b in batches] == [0, 1, 0, 1]
        seen += [i for b in batches for i in b[0]]
    assert sorted(seen) == list(range(N_WEB))
    # another epoch reshuffles (another order), still every pair once
    again = [i for rank in range(2) for b in epoch_batches(stream(toy, world=2, rank=rank), 2, epoch=1) for i in b[0]]
    assert sorted(again) == list(range(N_WEB)) and again != seen


def test_epoch_length_drops_at_most_one_global_batch(toy):
    ds = stream(toy, batch=5, world=2)
    assert ds.steps == 2 and len(ds) == 10   # 24 // (2 * 5)
    ids = [i for rank in range(2) for b in epoch_batches(stream(toy, batch=5, world=2, rank=rank), 2) for i in b[0]]
    assert len(ids) == len(set(ids)) == 20


def _hashes(image) -> tuple:
    return tuple(hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in image)


def test_persistent_workers_get_each_epoch_as_fresh_workers_do(toy):
    """pretrain.py keeps its loader workers across epochs; their dataset copies are made once, so the epoch (and a
    resume plan that only the first epoch has) must reach them: every epoch's batches equal a fresh loader's."""
    ds = stream(toy, batch=3)
    persistent = DataLoader(ds, batch_size=3, num_workers=2, drop_last=True, collate_fn=ShardCollate(),
                            persistent_workers=True)
    for epoch in range(3):
        ds.set_epoch(epoch)
        ds.start_at_step(0, 2)
        kept = [(tuple(info.ids), hashlib.sha1(image.numpy().tobytes()).hexdigest())
                for _, (image, _, info) in zip(range(ds.steps), persistent)]
        assert kept == [b[:1] + b[2:3] for b in epoch_batches(stream(toy, batch=3), 2, epoch=epoch)], epoch
    # the JSON list: the epoch seeds the augmentation inside the workers
    transform, _ = create_transforms(16, 0.2)
    listed = pretrain_dataset([str(toy / 'annotation' / 'pretrain_noisy.json')], '', transform,
                              image_root=str(toy / 'images'))
    sampler = DistributedSampler(listed, num_replicas=1, rank=0, shuffle=False)
    kept_loader = DataLoader(listed, batch_size=4, sampler=sampler, num_workers=2, persistent_workers=True)
    per_epoch = []
    for epoch in range(2):
        listed.set_epoch(epoch)
        kept = [_hashes(image) for image, _ in kept_loader]
        assert kept == [_hashes(image) for image, _ in DataLoader(listed, batch_size=4, sampler=sampler, num_workers=2)]
        per_epoch.append(kept)
    assert per_epoch[0] != per_epoch[1]   # another epoch, other augmentation draws
    # pretrain.py ends kept workers itself before the process group goes (not at interpreter exit)
    workers = list(kept_loader._iterator._workers)
    assert workers and all(w.is_alive() for w in workers)
    stop_workers(kept_loader)
    assert not any(w.is_alive() for w in workers) and kept_loader._iterator is None


def test_pretraining_keeps_its_workers_only_where_they_need_nothing_more_between_epochs():
    from types import SimpleNamespace

    from pretrain import keep_workers
    config = SimpleNamespace(num_workers=2, laion_path='', skip_bad_samples=False)
    assert keep_workers(config, shards=True) and keep_workers(config, shards=False)
    assert not keep_workers(SimpleNamespace(num_workers=0, laion_path='', skip_bad_samples=False), shards=True)
    assert not keep_workers(SimpleNamespace(num_workers=2, laion_path='/laion', skip_bad_samples=False), shards=False)
    skipping = SimpleNamespace(num_workers=2, laion_path='', skip_bad_samples=True)
    assert keep_workers(skipping, shards=True) and not keep_workers(skipping, shards=False)


def test_same_multiset_of_pairs_as_the_json_list(toy):
    """One epoch over the shards and one over pretrain_noisy.json train on the same (caption, augmented image)
    pairs: the augmentation is seeded per sample id, and the shards keep the list's order."""
    transform, _ = create_transforms(16, 0.2)
    listed = pretrain_dataset([str(toy / 'annotation' / 'pretrain_noisy.json')], '', transform,
                              image_root=str(toy / 'images'))
    listed.seed, listed.epoch = 7, 0
    sampler = DistributedSampler(listed, num_replicas=1, rank=0, shuffle=True, seed=7)
    loader = DataLoader(listed, batch_size=4, sampler=sampler, num_workers=2, drop_last=True)
    from_list = Counter((c, hashlib.sha1(img.numpy().tobytes()).hexdigest())
                        for image, caption in loader for img, c in zip(image, caption))
    from_shards = Counter()
    ds = stream(toy, batch=4)
    ds.set_epoch(0)
    ds.start_at_step(0, 2)
    for image, caption, info in DataLoader(ds, batch_size=4, num_workers=2, drop_last=True, collate_fn=ShardCollate()):
        from_shards.update((c, hashlib.sha1(img.numpy().tobytes()).hexdigest()) for img, c in zip(image, caption))
    assert sum(from_list.values()) == N_WEB
    assert from_shards == from_list


def test_json_lists_mix_into_the_epoch_as_virtual_shards(toy):
    annotation = load_annotation_index([str(toy / 'annotation' / 'coco_karpathy_train.json')])
    shards = toy_shards(toy) + json_shards(annotation.parts, 7)
    ds = stream(toy, batch=4, shards=shards, annotation=annotation, image_root=str(toy / 'images'))
    assert ds.total == N_WEB + 20 and ds.steps == 11
    batches = epoch_batches(ds, workers=2)
    sources = Counter()
    for b in batches:
        sources.update(b[3].sources)
    assert sources == {'shards': N_WEB, 'lists': 20}
    assert sorted(i for b in batches for i in b[0]) == list(range(N_WEB + 20))


def _state(ds: ShardStream, batches: list, step: int, workers: int) -> dict:
    progress = ShardProgress()
    for b in batches[:step]:
        progress.update(b[3])
    return ds.state(step, workers, [progress.cursors])


@pytest.mark.parametrize('workers', [0, 2])
def test_exact_resume_continues_at_the_same_sample(toy, workers):
    """Resumed at step 3 (mid-shard, with samples waiting in the shuffle buffer), every later batch is the
    uninterrupted run's: same pairs, same augmentation."""
    straight = epoch_batches(stream(toy, batch=2), workers)
    for step in (3, 5):
        ds = stream(toy, batch=2)
        ds.set_epoch(0)
        ds.set_resume_state(_state(ds, straight, step, max(1, workers)))
        resumed = epoch_batches(ds, workers, start=step)
        assert [b[:3] for b in resumed] == [b[:3] for b in straight[step:]]


def test_resume_with_another_layout_redoes_partly_done_shards(toy):
    """Saved by 1 rank x 2 workers, resumed by 2 ranks x 1 worker: shards the first run finished are not read
    again, partly done ones are redone (and named), every pair of the epoch is trained on at least once."""
    straight = epoch_batches(stream(toy, batch=2, buffer=1), workers=2)
    step = 6
    done = [i for b in straight[:step] for i in b[0]]
    state = _state(stream(toy, batch=2, buffer=1), straight, step, 2)
    rest, said = [], []
    for rank in range(2):
        ds = stream(toy, batch=2, world=2, rank=rank, buffer=1)
        ds.set_epoch(0)
        ds.set_resume_state(state)
        said += ds.start_at_step(step // 2, 1)
        loader = DataLoader(ds, batch_size=2, num_workers=0, drop_last=True, collate_fn=ShardCollate())
        rest += [i for _, (_, _, info) in zip(range(step // 2, ds.steps), loader) for i in info.ids]
    assert 'redone from their start' in said[0] and 'shard(s) done' in said[0]
    assert len(rest) == len(set(rest)) == 12   # 3 more steps x 2 ranks x batch 2, no pair twice
    shard_of = lambda i: i // 5  # noqa: E731
    ids_of = lambda s: set(range(5 * s, min(5 * s + 5, N_WEB)))  # noqa: E731
    finished = {s for s in range(5) if ids_of(s) <= set(done)}
    untouched = {s for s in range(5) if not ids_of(s) & set(done)}
    partial = set(range(5)) - finished - untouched
    assert finished and untouched and partial
    assert not any(shard_of(i) in finished for i in rest)              # a finished shard is not read again
    assert set().union(*map(ids_of, untouched)) <= set(rest)            # shards not started come first
    assert all(f'{s:05d}.tar' in said[0] for s in partial)              # the redone shards are named


def test_buffer_order_is_a_permutation_and_mixes():
    order = buffer_order(100, 10, [1, 2])
    assert sorted(order.tolist()) == list(range(100)) and order.tolist() != list(range(100))
    assert (buffer_order(100, 10, [1, 2]) == order).all()


# ------------------------------------------------------------------------------------------- dirty data

def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format='PNG')
    return buf.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def dirty_shard(path: Path) -> dict:
    """A shard with one good pair and one sample of every dirty kind; returns key -> expected kind."""
    good = Image.new('RGB', (32, 24), (200, 40, 40))
    samples = {
        'good': ({'jpg': _jpeg(good), 'txt': b'a red square'}, None),
        'broken': ({'jpg': b'\xff\xd8\xff\xe0 not a jpeg at all', 'txt': b'x'}, 'undecodable'),
        'noimage': ({'txt': b'a caption without an image'}, 'no_image'),
        'nocaption': ({'jpg': _jpeg(good)}, 'no_caption'),
        'empty': ({'jpg': _jpeg(good), 'txt': b' ... !! '}, 'empty_caption'),
        'long': ({'jpg': _jpeg(good), 'txt': ('word ' * 1000).encode()}, 'long_caption'),
        'tiny': ({'png': _png(Image.new('RGB', (1, 1)))}, 'too_small'),
        # 200 M pixels: over twice PIL's bomb limit, where Image.open itself raises
        'huge': ({'png': _png(Image.new('1', (20000, 10000))), 'txt': b'a very large image'}, 'too_large'),
        'cmyk': ({'jpg': _jpeg(Image.new('CMYK', (32, 24), (0, 255, 255, 0))), 'txt': b'cmyk'}, 'cmyk'),
        'palette': ({'png': _png(Image.new('RGB', (32, 24), (10, 200, 10)).convert('P')), 'txt': b'pal'}, 'palette'),
        'deep': ({'png': _png(Image.fromarray(np.full((24, 32), 32768, dtype=np.uint16))), 'txt': b'16 bit'},
                 'high_bit_depth'),
    }
    samples['tiny'][0]['txt'] = b'one pixel'
    with open(path, 'wb') as f:
        writer = wds.TarWriter(f, encoder=False)
        for key, (fields, _) in samples.items():
            writer.write({'__key__': key, **fields})
        writer.close()
    return {k: kind for k, (_, kind) in samples.items()}


def test_every_dirty_kind_is_counted_and_skipped(tmp_path):
    kinds = dirty_shard(tmp_path / '00000.tar')
    url = str(tmp_path / '00000.tar')
    transform, _ = create_transforms(16, 0.2)
    ds = ShardStream([Shard(url, shard_count(url, tmp_path))], transform, 1, seed=0, shuffle_buffer=1,
                     limits=DirtLimits())
    progress = ShardProgress()
    captions = []
    for _, (image, caption, info) in zip(range(ds.steps), DataLoader(ds, batch_size=1, collate_fn=ShardCollate())):
        progress.update(info)
        captions += caption
    skipped = {k for k in kinds.values() if k and not k.startswith(('cmyk', 'palette', 'high'))}
    assert {k.removeprefix('skipped_') for k in progress.counts if k.startswith('skipped_')} == skipped
    assert all(progress.counts[f'skipped_{k}'] == 1 for k in skipped)
    assert {progress.counts[f'converted_{k}'] for k in ('cmyk', 'palette', 'high_bit_depth')} == {1}
    trained = 4   # good, cmyk, palette, 16-bit
    assert progress.counts['samples'] == ds.steps == len(kinds)
    assert progress.counts['repeated'] == ds.steps - trained   # the epoch's length is kept by repeating its pairs
    assert set(captions) == {'a red square', 'cmyk', 'pal', '16 bit'}


def test_high_bit_depth_and_palette_convert_to_the_right_colours():
    deep = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert np.asarray(to_rgb(deep))[0, 0].tolist() == [128, 128, 128]   # convert('RGB') clipped it to 255
    rgba = Image.new('RGBA', (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]   # transparent over white, not black
    cmyk = Image.new('CMYK', (4, 4), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


# ------------------------------------------------------------------------------ pretrain.py, killed and resumed

ROOT = Path(__file__).resolve().parent.parent


def pretrain_cmd(toy: Path, out: Path, source: str, *extra: str) -> list[str]:
    data = ([f'train_file=[{toy}/annotation/pretrain_noisy.json]', 'train_shards=[]'] if source == 'json' else
            ['train_file=[]', f"train_shards=['{toy}/shards/{{00000..00004}}.tar']", 'shuffle_buffer=3'])
    return [sys.executable, str(ROOT / 'pretrain.py'), '--config', str(ROOT / 'configs/toy/pretrain_shards.yaml'),
            '--output_dir', str(out), '--device', 'cpu', *extra, '--options', f'toy_root={toy}', *data,
            f'image_root={toy}/images', 'num_workers=2', 'image_size=32', 'batch_size=4', 'queue_size=8',
            'warmup_steps=3', 'max_epoch=2', 'save_every_steps=2', 'log_every=1']


@pytest.mark.parametrize('source', ['json', 'shards'])
def test_killed_run_with_workers_resumes_to_the_same_weights(toy, tmp_path, source):
    """SIGKILL mid-epoch with 2 loader workers, then --resume auto: the final weights equal the uninterrupted
    run's (the JSON list differed by up to 0.13 before augmentation was seeded per sample), and log.txt's lines
    (losses, train_samples) are the same."""
    straight = tmp_path / 'straight'
    subprocess.run(pretrain_cmd(toy, straight, source), env=_env(), check=True, capture_output=True, timeout=600)
    killed = tmp_path / 'killed'
    proc = subprocess.Popen(pretrain_cmd(toy, killed, source), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = (1, 3)   # mid-epoch 1, after its step-2 resume point
    deadline = time.time() + 600
    while time.time() < deadline and target not in _steps_logged(killed) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    resume = torch.load(killed / 'checkpoint_last.pth', weights_only=True)['resume']
    assert resume['epoch'] == 1 and resume['step'] == 2, resume
    done = subprocess.run(pretrain_cmd(toy, killed, source, '--resume', 'auto'), env=_env(), check=True,
                          capture_output=True, text=True, timeout=600)
    if source == 'shards':
        assert 'at the exact sample' in done.stdout
    a, b = (torch.load(out / 'checkpoint_last.pth', weights_only=True)['model'] for out in (straight, killed))
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} tensors differ after resume, e.g. {different[:3]}'
    logs = [[json.loads(line) for line in (out / 'log.txt').read_text().splitlines()] for out in (straight, killed)]
    assert logs[0] == logs[1] and logs[0][0]['train_samples'] == N_WEB


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(')', 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_torchrun_two_ranks_killed_then_one_process_resumes_at_shard_granularity(toy, tmp_path):
    """End to end with another world size: `torchrun --nproc_per_node=2` on the toy shards (gloo, CPU) is killed
    after its step-2 resume point; `--resume auto` in one process redoes the partly done shards, names them, and
    trains the rest of the epoch: its log.txt counts at least every pair once."""
    out = tmp_path / 'out'
    argv = pretrain_cmd(toy, out, 'shards')[1:]
    argv[argv.index('num_workers=2')] = 'num_workers=0'
    argv[argv.index('batch_size=4')] = 'batch_size=2'   # 24 pairs: 6 steps per rank
    argv[argv.index('max_epoch=2')] = 'max_epoch=1'
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             *argv], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)   # its own process group: the launcher and both ranks die
    deadline = time.time() + 300
    while time.time() < deadline and (0, 3) not in _steps_logged(out) and proc.poll() is None:
        time.sleep(0.05)
    ranks = _children(proc.pid)   # torchrun starts each rank in a session of its own: kill them by pid
    proc.kill()
    proc.wait()
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert (0, 3) in _steps_logged(out) and len(ranks) == 2, 'the 2-rank run did not reach step 3'
    resume = torch.load(out / 'checkpoint_last.pth', weights_only=True)['resume']
    assert resume['epoch'] == 0 and resume['step'] in (2, 4), resume   # 4: a step passed between poll and kill
    assert resume['progress']['shard_state']['data']['world_size'] == 2
    done = subprocess.run([sys.executable, *argv, '--resume', 'auto'], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'saved with 2 rank(s), resuming with 1' in done.stdout
    said = re.search(r'saved with 2 rank\(s\) x 1 worker\(s\) x batch 2 and resumes with 1 x 1 x 2 at shard '
                     r'granularity: (\d+) shard\(s\) done, (\d+) partly done shard\(s\) redone from their start '
                     r'\((\d+) pairs seen again\)(?:: (.*))?', done.stdout)
    assert said, done.stdout[-3000:]
    partial, again = int(said.group(2)), int(said.group(3))
    named = said.group(4).split(', ') if said.group(4) else []
    assert partial == len(named) and again > 0
    urls = expand_shard_urls(f'{toy}/shards/{{00000..00004}}.tar')
    assert set(named) <= set(urls)
    # the pairs seen again are among the named shards' and were trained before the kill (steps x 2 ranks x 2)
    assert again <= sum(shard_count(u) for u in named) and again <= resume['step'] * 4
    epoch = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    assert epoch['epoch'] == 0 and epoch['train_samples'] == N_WEB


def test_readme_shard_command_trains_on_the_toy_shards(tmp_path, monkeypatch):
    """The README's toy shard command, run from a fresh folder (on a small complete toy dataset there): the web
    pairs come from the shards, the human pairs from the JSON list, in one epoch."""
    import shlex

    import pretrain

    line = next(text for text in (ROOT / 'README.md').read_text().splitlines()
                if text.startswith('python pretrain.py') and 'pretrain_shards.yaml' in text)
    argv = shlex.split(line)[2:]
    argv[argv.index('--config') + 1] = str(ROOT / argv[argv.index('--config') + 1])
    monkeypatch.chdir(tmp_path)
    ensure_toy_dataset('output/toy_data', n_train=4, n_val=2, n_test=2, n_web=24, n_videos=2, video_frames=2)
    ensure_toy_shards('output/toy_data', shard_size=6)   # the 4 shards the config names
    stats = pretrain.main([*argv, '--device', 'cpu', '--options', 'max_epoch=1', 'image_size=32', 'batch_size=8',
                           'queue_size=16', 'num_workers=0', f'med_config={ROOT}/configs/toy/med_config.json'])
    assert stats['train_samples'] == 40 and stats['train_samples_shards'] + stats['train_samples_lists'] == 40
    assert stats['train_samples_shards'] > 0 and stats['train_samples_lists'] > 0
    assert (tmp_path / 'output' / 'toy_pretrain_shards' / 'checkpoint_00.pth').is_file()
