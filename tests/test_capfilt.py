"""CapFilt (capfilt.py) with tiny real models: filtering logic, keep modes, shards and resume (also after
SIGKILL), rank-count independence (also under a real 2-process torchrun), output readable by
pretraining, the HTML report, bad images, config errors. Noise removal on toy data, with a
captioner and a filter trained there, is in test_learning.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

import capfilt
from engine.capfilt import folder, json_list
from engine.capfilt.config import CapFiltConfig, validate
from engine.capfilt.selection import Histogram
from engine.config import ConfigError, load_config
from models.blip import BLIP_Decoder
from models.blip_itm import BLIP_ITM
from tests.tiny import TINY_IMAGE, TINY_MED, TINY_VIT

ROOT = Path(__file__).resolve().parent.parent
COLOURS = [(220, 30, 30), (30, 170, 40), (30, 60, 220), (235, 200, 20)]
WEB_CAPTIONS = ['a red circle', 'a green square on the left', 'two blue triangles', 'a yellow circle at the top',
                'a <b>bold</b> & "quoted" caption', 'the square in the center is red']
N_WEB = 12


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and OpenMP threads that spin-wait for a core
    another process holds make every small op ~100x slower; one thread keeps the file fast on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(''.join(f'{k}: {json.dumps(v)}\n' for k, v in data.items()))  # JSON values are valid YAML
    return path


@pytest.fixture(scope='module')
def setup(module_dir) -> dict:
    """Tiny images, web and human annotation files, tiny captioner and filter checkpoints, a config."""
    root = module_dir('capfilt')
    images = root / 'images'
    (images / 'web').mkdir(parents=True)
    web = []
    for i in range(N_WEB):
        Image.new('RGB', (40, 40), COLOURS[i % 4]).save(images / 'web' / f'{i}.jpg')
        web.append({'image': f'web/{i}.jpg', 'caption': WEB_CAPTIONS[i % len(WEB_CAPTIONS)]})
    (images / 'web' / 'corrupt.jpg').write_bytes(b'this is not a jpeg')
    web.insert(5, {'image': 'web/corrupt.jpg', 'caption': 'a picture that cannot be read'})
    human = [{'image': f'web/{i}.jpg', 'caption': f'human caption {i}', 'image_id': str(i)} for i in range(3)]
    (root / 'web.json').write_text(json.dumps(web))
    (root / 'human.json').write_text(json.dumps(human))
    med = json.loads((ROOT / 'configs' / 'med_config.json').read_text())
    med.update(TINY_MED)
    (root / 'med.json').write_text(json.dumps(med))
    kw = dict(med_config=str(root / 'med.json'), image_size=TINY_IMAGE, vit=dict(TINY_VIT))
    torch.manual_seed(0)
    torch.save({'model': BLIP_Decoder(**kw).state_dict()}, root / 'captioner.pth')
    torch.save({'model': BLIP_ITM(**kw).state_dict()}, root / 'filter.pth')
    config = write_yaml(root / 'capfilt.yaml', {
        'ann_file': [str(root / 'web.json')], 'human_ann_file': [str(root / 'human.json')],
        'image_root': str(images), 'captioner': str(root / 'captioner.pth'), 'filter': str(root / 'filter.pth'),
        'med_config': str(root / 'med.json'), 'vit': dict(TINY_VIT), 'image_size': TINY_IMAGE,
        'num_captions': 2, 'max_length': 12, 'min_length': 5, 'batch_size': 4, 'shard_size': 4,
        'num_workers': 0, 'report_samples': 6})
    return {'root': root, 'config': config, 'web': web, 'human': human, 'images': images}


def run_capfilt(setup: dict, out: Path, *options: str) -> dict:
    return capfilt.main(['--config', str(setup['config']), '--output_dir', str(out), '--device', 'cpu',
                         '--options', *options])


def read_output(out: Path) -> list[dict]:
    return json.loads((out / 'capfilt_annotations.json').read_text())


@pytest.fixture(scope='module')
def full_run(setup, module_dir) -> tuple[Path, dict]:
    """One uninterrupted run with threshold 0: every caption kept."""
    out = module_dir('full')
    return out, run_capfilt(setup, out, 'threshold=0.0')


def copy_scored_shards(out: Path, copy: Path) -> Path:
    """A new output folder holding ``out``'s scored shards only: a rerun there merges without scoring again."""
    (copy / 'shards').mkdir(parents=True)
    for f in (out / 'shards').iterdir():
        (copy / 'shards' / f.name).write_bytes(f.read_bytes())
    return copy


def test_threshold_zero_keeps_everything(setup, full_run):
    out, summary = full_run
    n_good = N_WEB
    assert summary['images_seen'] == n_good + 1 and summary['images_processed'] == n_good
    assert summary['web_kept'] == n_good and summary['web_removed'] == 0
    assert summary['synthetic_kept'] == 2 * n_good and summary['synthetic_removed'] == 0
    pairs = read_output(out)
    assert len(pairs) == summary['output_pairs'] == summary['web_pairs_out'] + summary['synthetic_pairs_out'] + 3
    web_pairs = {(e['image'], e['caption']) for e in setup['web'] if 'corrupt' not in e['image']}
    assert web_pairs <= {(p['image'], p['caption']) for p in pairs}
    assert pairs[-3:] == [{'image': h['image'], 'caption': h['caption']} for h in setup['human']]
    assert all(set(p) == {'image', 'caption'} for p in pairs)
    for name in ('web_score_histogram', 'synthetic_score_histogram'):
        assert sum(summary[name]['counts']) == summary[name.split('_')[0] + '_kept']
    assert summary['images_per_s'] > 0


def test_progress_is_logged_as_json_lines_per_shard(full_run):
    out, summary = full_run
    lines = [json.loads(x) for x in (out / 'capfilt_log_rank0.jsonl').read_text().splitlines()]
    assert [x['shard'] for x in lines] == list(range(4)) and sum(x['images'] for x in lines) == N_WEB + 1
    assert sum(x['bad_images'] for x in lines) == 1 and all(x['images_per_s'] > 0 for x in lines)


def test_wrong_image_root_or_missing_human_file_fails_before_any_model_work(setup, tmp_path, monkeypatch):
    """A wrong image_root used to count every image as bad and write an output of human pairs only."""
    monkeypatch.setattr(json_list, 'build_models', lambda *a: pytest.fail('models built before the inputs were checked'))
    with pytest.raises(ConfigError, match=r"none of the first 13 web images exists.*image_root \('/nonexistent'\)"):
        run_capfilt(setup, tmp_path / 'a', 'image_root=/nonexistent')
    with pytest.raises(ConfigError, match=r"human_ann_file '/nonexistent/h.json' does not exist"):
        run_capfilt(setup, tmp_path / 'b', 'human_ann_file=[/nonexistent/h.json]')
    assert not list(tmp_path.rglob('shard_*.json'))


def test_nan_scores_are_counted_apart_in_the_histogram():
    hist = Histogram(0.0, 1.0, bins=4)
    for value in (0.1, float('nan'), 0.9, float('inf')):
        hist.add(value)
    assert hist.to_dict()['counts'] == [1, 0, 0, 1] and hist.to_dict()['non_finite'] == 2


def test_bad_image_counted_not_fatal(full_run):
    out, summary = full_run
    assert summary['bad_images'] == 1
    assert 'corrupt.jpg' in summary['bad_image_errors'][0]['error']
    assert all('corrupt' not in p['image'] for p in read_output(out))
    saved = json.loads((out / 'capfilt_summary.json').read_text())
    assert saved['bad_images'] == 1 and saved['web_kept'] == summary['web_kept']


def test_threshold_one_removes_everything_and_remerges_without_models(setup, full_run, tmp_path, monkeypatch):
    out, _ = full_run
    copy = copy_scored_shards(out, tmp_path / 'out')
    # finished shards hold scores, so a new threshold needs no model at all
    monkeypatch.setattr(json_list, 'build_models', lambda *a: pytest.fail('models rebuilt for a re-merge'))
    summary = run_capfilt(setup, copy, 'threshold=1.0')
    assert summary['web_kept'] == 0 and summary['synthetic_kept'] == 0
    assert summary['web_removed'] == N_WEB and summary['synthetic_removed'] == 2 * N_WEB
    assert read_output(copy) == [{'image': h['image'], 'caption': h['caption']} for h in setup['human']]


def test_threshold_splits_by_score(setup, full_run, tmp_path):
    out, _ = full_run
    scores = sorted(r['w'] for f in sorted((out / 'shards').glob('shard_*.json'))
                    for r in json.loads(f.read_text())['records'])
    threshold = (scores[3] + scores[4]) / 2  # 4 web captions below, 8 above
    copy = copy_scored_shards(out, tmp_path / 'out')
    summary = run_capfilt(setup, copy, f'threshold={threshold}', 'keep=both')
    assert summary['web_kept'] == N_WEB - 4 and summary['web_removed'] == 4


def test_keep_web_has_no_synthetic_captions(setup, tmp_path):
    summary = run_capfilt(setup, tmp_path, 'threshold=0.0', 'keep=web', 'captioner=')
    assert summary['num_captions'] == 0 and summary['synthetic_kept'] + summary['synthetic_removed'] == 0
    web_captions = {e['caption'] for e in setup['web']}
    pairs = read_output(tmp_path)
    assert len(pairs) == N_WEB + 3
    assert all(p['caption'] in web_captions for p in pairs[:-3])


def test_keep_synthetic_drops_web_captions(setup, full_run, tmp_path):
    out, full = full_run
    copy = copy_scored_shards(out, tmp_path / 'out')
    summary = run_capfilt(setup, copy, 'threshold=0.0', 'keep=synthetic')
    pairs = read_output(copy)[:-3]
    assert summary['web_pairs_out'] == 0 and len(pairs) == summary['synthetic_pairs_out'] > 0
    report = (copy / 'capfilt_report.html').read_text()   # marked as the output has them, not by score alone
    assert 'web, kept' not in report and 'web, removed' in report and 'synthetic, kept' in report
    full_synthetic = [p for p in read_output(out)[:-3] if p['caption'] not in {e['caption'] for e in setup['web']}]
    assert pairs == full_synthetic


def test_keep_web_remerges_shards_made_with_captions_but_makes_no_new_ones_among_them(setup, full_run, tmp_path):
    """The README's promise: a new keep mode only re-merges (the synthetic captions are not read), even with
    the captioner left out; but a missing shard would be made without captions among shards that have them."""
    out, full = full_run
    copy = copy_scored_shards(out, tmp_path / 'out')
    summary = run_capfilt(setup, copy, 'threshold=0.0', 'keep=web', 'captioner=')
    assert summary['web_pairs_out'] == full['web_kept'] and summary['synthetic_pairs_out'] == 0
    assert summary['num_captions'] == 0 and summary['synthetic_kept'] + summary['synthetic_removed'] == 0
    assert sum(summary['synthetic_score_histogram']['counts']) == 0  # the shards' synthetic scores are not read
    next(iter(sorted((copy / 'shards').glob('shard_*.json')))).unlink()
    with pytest.raises(RuntimeError, match='other data or settings'):
        run_capfilt(setup, copy, 'threshold=0.0', 'keep=web', 'captioner=')


def test_changed_generation_settings_refuse_old_shards(setup, full_run, tmp_path):
    out, _ = full_run
    copy = copy_scored_shards(out, tmp_path / 'out')
    with pytest.raises(RuntimeError, match='other data or settings'):
        run_capfilt(setup, copy, 'threshold=0.0', 'num_captions=3')


def test_resume_after_lost_shards_and_other_world_size_give_identical_output(setup, full_run, tmp_path, monkeypatch):
    out, _ = full_run
    reference = (out / 'capfilt_annotations.json').read_bytes()
    assert len(list((out / 'shards').glob('shard_*.json'))) == 4  # 13 entries, shard_size 4
    # an interrupted run: shards 1 and 3 never written; the resumed run redoes exactly those
    copy = tmp_path / 'resumed'
    (copy / 'shards').mkdir(parents=True)
    for f in (out / 'shards').iterdir():
        if f.name not in ('shard_000001.json', 'shard_000003.json'):
            (copy / 'shards' / f.name).write_bytes(f.read_bytes())
    before = (copy / 'shards' / 'shard_000000.json').stat().st_mtime_ns
    summary = run_capfilt(setup, copy, 'threshold=0.0')
    assert summary['images_this_run'] == 5
    assert (copy / 'shards' / 'shard_000000.json').stat().st_mtime_ns == before
    assert (copy / 'capfilt_annotations.json').read_bytes() == reference
    # two ranks (rank 1 first, then rank 0, which merges): the same bytes
    two = tmp_path / 'two_ranks'
    for rank in (1, 0):
        monkeypatch.setenv('RANK', str(rank))
        monkeypatch.setenv('WORLD_SIZE', '2')
        result = run_capfilt(setup, two, 'threshold=0.0')
        assert (result == {}) == (rank == 1)
    assert (two / 'capfilt_annotations.json').read_bytes() == reference


def test_torchrun_with_two_processes_gives_identical_output(setup, full_run, tmp_path):
    out, _ = full_run
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'capfilt.py',
           '--config', str(setup['config']), '--output_dir', str(tmp_path), '--device', 'cpu', '--options',
           'threshold=0.0']
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / 'capfilt_summary.json').read_text())
    assert summary['world_size'] == 2
    assert (tmp_path / 'capfilt_annotations.json').read_bytes() == (out / 'capfilt_annotations.json').read_bytes()


def test_sigkill_mid_run_then_resume_is_identical(setup, full_run, tmp_path):
    """A real kill: the child sleeps after each shard so that the kill lands between shards 0 and 3."""
    out, _ = full_run
    killed = tmp_path / 'killed'
    child = (
        'import sys, time, capfilt\n'
        'from engine.capfilt import json_list\n'
        'write = json_list.write_json_atomic\n'
        'def slow(path, obj):\n'
        '    write(path, obj)\n'
        '    if "shard_0" in str(path): time.sleep(30)\n'
        'json_list.write_json_atomic = slow\n'
        'capfilt.main(sys.argv[1:])\n')
    cmd = [sys.executable, '-c', child, '--config', str(setup['config']), '--output_dir', str(killed),
           '--device', 'cpu', '--options', 'threshold=0.0']
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (killed / 'shards' / 'shard_000000.json').exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, 'no shard written within 60 s'
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (killed / 'shards').glob('shard_*.json')) == ['shard_000000.json']
    assert not (killed / 'capfilt_annotations.json').exists()
    summary = run_capfilt(setup, killed, 'threshold=0.0')
    assert summary['images_this_run'] == 9  # shards 1-3 (4 + 4 + 1 entries)
    assert (killed / 'capfilt_annotations.json').read_bytes() == (out / 'capfilt_annotations.json').read_bytes()


def test_output_is_read_by_pretrain_dataset(setup, full_run):
    from data.pretrain_dataset import pretrain_dataset
    from transform import create_transforms
    out, summary = full_run
    train_transform, _ = create_transforms(TINY_IMAGE)
    ds = pretrain_dataset([str(out / 'capfilt_annotations.json')], '', train_transform,
                          image_root=str(setup['images']))
    assert len(ds) == summary['output_pairs']
    image, caption = ds[0]
    assert image.shape == (3, TINY_IMAGE, TINY_IMAGE) and isinstance(caption, str)
    image, caption = ds[len(ds) - 1]
    assert caption == 'human caption 2'


class TagChecker(HTMLParser):
    VOID = {'img', 'meta', 'br', 'link', 'hr', 'input'}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.text, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f'unbalanced </{tag}> with open {self.stack}')
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_well_formed_and_escaped(full_run):
    out, _ = full_run
    page = (out / 'capfilt_report.html').read_text()
    checker = TagChecker()
    checker.feed(page)
    checker.close()
    assert not checker.errors and not checker.stack
    assert 'b' not in checker.tags  # the caption's <b> is text, not markup
    text = ''.join(checker.text)
    assert 'a <b>bold</b> & "quoted" caption' in text
    assert '&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot;' in page
    assert page.count('<img src="data:image/jpeg;base64,') == 6  # report_samples
    assert 'kept' in text and 'synthetic' in text and 'web' in text


def test_unknown_config_key_errors_naming_it(setup, tmp_path):
    with pytest.raises(ConfigError, match='no_such_key'):
        run_capfilt(setup, tmp_path, 'no_such_key=1')
    with pytest.raises(ConfigError, match='keep'):
        run_capfilt(setup, tmp_path, 'keep=everything')
    with pytest.raises(ConfigError, match=r'threshold must be in \[-1, 1\] for ITC'):
        run_capfilt(setup, tmp_path, 'score=itc', 'threshold=1.5')


def test_shipped_configs_load():
    for path in ('configs/capfilt.yaml', 'configs/toy/capfilt.yaml'):
        config = load_config(ROOT / path, CapFiltConfig)
        validate(config, path)
        assert config.threshold == 0.5 and config.score == 'itm' and config.top_p == 0.9


def test_toy_capfilt_redoes_a_step_whose_command_changed(tmp_path):
    """toy_capfilt.py reuses finished steps; a step run again with other flags (another filter checkpoint,
    other CapFilt options) is redone in an emptied folder instead of reporting old outputs under new settings."""
    import sys
    import toy_capfilt
    work = tmp_path / 'work'

    def cmd(value):
        return [sys.executable, '-c', f"import pathlib; p = pathlib.Path({str(work)!r}); p.mkdir(exist_ok=True); "
                                      f"(p / 'done').write_text({value!r})"]

    step = lambda value: toy_capfilt.run_step('s', cmd(value), tmp_path / 'log', work / 'done', False, {},  # noqa: E731
                                              workdir=work)
    step('a')
    (work / 'old_shard').write_text('x')
    assert step('a') == 0.0 and (work / 'old_shard').exists()          # same command: reused as it is
    step('b')
    assert (work / 'done').read_text() == 'b' and not (work / 'old_shard').exists()


def test_rank_0_stops_waiting_for_shards_that_never_come(tmp_path):
    """A rank that died without taking the job down must not leave rank 0 waiting forever."""
    (tmp_path / 'shards').mkdir()
    (tmp_path / 'shards' / 'shard_000000.json').write_text('{}')
    with pytest.raises(TimeoutError, match=r'1 missing, e\.g\. \[1\].*run again'):
        folder.wait_for_shards(tmp_path, 2, timeout_s=0.05, poll_s=0.01)
    (tmp_path / 'shards' / 'shard_000001.json').write_text('{}')
    folder.wait_for_shards(tmp_path, 2, timeout_s=0.05, poll_s=0.01)   # all there: returns at once


def test_changed_settings_are_named_and_overwrite_starts_over(setup, full_run, tmp_path):
    """The refusal said only that two fingerprints differ, and --overwrite (listed in --help) had no effect."""
    import capfilt
    out, full = full_run
    copy = copy_scored_shards(out, tmp_path / 'out')
    with pytest.raises(folder.ShardMismatchError, match=r'num_captions: \d+ -> 3'):
        run_capfilt(setup, copy, 'threshold=0.0', 'num_captions=3')
    summary = capfilt.main(['--config', str(setup['config']), '--output_dir', str(copy), '--device', 'cpu',
                            '--overwrite', '--options', 'threshold=0.0', 'num_captions=3'])
    assert summary['num_captions'] == 3 and summary['images_this_run'] == full['images_seen']
    assert summary['synthetic_kept'] - summary['synthetic_pairs_out'] == summary['synthetic_duplicates']
