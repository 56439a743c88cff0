"""CapFilt over webdataset tar shards (capfilt.py, ann_shards): the same scores as over the JSON list, kept pairs written
as tar shards that pretrain.py trains on directly, resumable per input shard, threshold re-merges rewrite the
output shards, the HTML report shows the shard images."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

import capfilt
import pretrain
from data.shards import expand_shard_urls, iter_tar_samples, shard_count
from engine.capfilt import folder, tar_shards
from engine.lock import LOCK_NAME
import tests.test_capfilt as base

N_WEB = base.N_WEB
setup, one_thread = base.setup, base.one_thread   # the CapFilt tests' fixtures: tiny models, web pairs, config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def shards(setup) -> str:
    """The setup's web pairs (the unreadable one too) as 3 tar shards of 5, 5, 3 samples."""
    folder = setup['root'] / 'in_shards'
    folder.mkdir(exist_ok=True)
    web = setup['web']
    for number, start in enumerate(range(0, len(web), 5)):
        with open(folder / f'{number:05d}.tar', 'wb') as f:
            writer = wds.TarWriter(f, encoder=False)
            for k, entry in enumerate(web[start:start + 5]):
                writer.write({'__key__': f'{number:05d}{k:04d}', 'jpg': (setup['images'] / entry['image']).read_bytes(),
                              'txt': entry['caption'].encode()})
            writer.close()
    return f'{folder}/{{00000..00002}}.tar'


def run(setup, shards: str, out: Path, *options: str) -> dict:
    return capfilt.main(['--config', str(setup['config']), '--output_dir', str(out), '--device', 'cpu',
                         '--options', 'ann_file=[]', f"ann_shards=['{shards}']", *options])


@pytest.fixture(scope='module')
def shard_run(setup, shards, module_dir):
    out = module_dir('capfilt_shards')
    return out, run(setup, shards, out, 'threshold=0.0')


def test_over_shards_scores_like_the_json_list_and_writes_shards(setup, shards, shard_run, tmp_path):
    out, summary = shard_run
    assert (out / LOCK_NAME).read_text() == ''  # the folder's lock is released at the end (a held one names its pid)
    assert summary['images_seen'] == N_WEB + 1 and summary['bad_images'] == 1
    assert 'undecodable' in summary['bad_image_errors'][0]['error']
    urls = expand_shard_urls(summary['train_shards'])
    assert len(urls) == 3
    pairs = [s for u in urls for s in iter_tar_samples(u)]
    assert len(pairs) == sum(shard_count(u) for u in urls) == summary['web_pairs_out'] + summary['synthetic_pairs_out']
    # threshold 0 keeps every web caption of every readable image, with its image's bytes
    web = [s for s in pairs if json.loads(s['json'])['kind'] == 'web']
    readable = [e for e in setup['web'] if 'corrupt' not in e['image']]
    assert sorted(s['txt'].decode() for s in web) == sorted(e['caption'] for e in readable)
    # the same scores as the JSON-list run over the same pairs (same model, same seed per unit of 5 images)
    listed = capfilt.main(['--config', str(setup['config']), '--output_dir', str(tmp_path / 'listed'), '--device',
                           'cpu', '--options', 'threshold=0.0', 'shard_size=5', 'keep=web'])
    assert listed['web_score_histogram']['counts'] == summary['web_score_histogram']['counts']
    assert json.loads((out / folder.SUMMARY_FILE).read_text())['human_pairs'] == 3
    page = (out / folder.REPORT_FILE).read_text()
    assert 'data:image/jpeg;base64,' in page and '(unreadable)' not in page


def test_resumes_per_input_shard_and_remerges_a_new_threshold(setup, shards, shard_run, tmp_path, monkeypatch):
    out, summary = shard_run
    again = tmp_path / 'again'
    run(setup, shards, again, 'threshold=0.0')
    (again / 'shards' / 'shard_000001.json').unlink()   # as if killed while shard 1 was being done
    done = []
    real = tar_shards.score_tar_shard

    def counting(shard, *a, **k):
        done.append(shard)
        return real(shard, *a, **k)
    monkeypatch.setattr(tar_shards, 'score_tar_shard', counting)
    run(setup, shards, again, 'threshold=0.0')
    assert done == [1]
    for u in range(3):
        name = f'web_shards/{u:05d}.tar'
        assert (again / name).read_bytes() == (out / name).read_bytes()
    # threshold 1: no model work, every output shard rewritten empty
    done.clear()
    strict = run(setup, shards, again, 'threshold=1.0')
    assert done == [] and strict['output_shards_rewritten'] == 3
    assert sum(shard_count(u) for u in expand_shard_urls(strict['train_shards'])) == 0


def test_pretrain_trains_on_capfilt_output_shards(setup, shard_run, tmp_path):
    """CapFilt's shards and human list feed pretrain.py as they are: train_shards + train_file."""
    out, summary = shard_run
    stats = pretrain.main([
        '--config', str(ROOT / 'configs/toy/pretrain_shards.yaml'), '--output_dir', str(tmp_path / 'pre'),
        '--device', 'cpu', '--options', 'toy_root=', f"train_shards=['{summary['train_shards']}']",
        f"train_file=[{summary['train_file']}]", f"image_root={setup['images']}", 'num_workers=0', 'image_size=32',
        'batch_size=4', 'queue_size=8', 'max_epoch=1', 'warmup_steps=2', 'json_shard_size=2'])
    total = summary['output_pairs']
    assert stats['train_samples'] == total // 4 * 4 and stats['train_samples_lists'] <= 3
    assert stats['train_samples_shards'] >= total // 4 * 4 - 3
