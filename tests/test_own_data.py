"""Your own data with one override: ``own_data=pairs.json`` or ``own_data=shards/{0..1}.tar`` makes
train_caption.py and train_retrieval.py train and evaluate on it (images split, not pairs; ids from the linked file
names; shard images read at their byte offsets, held-out ones copied out), and bad input is one clear error."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

import train_caption
import train_retrieval
from data.loading import AnnotationError
from data.own_data import main as own_data, own_shard_train, plan_own_data, write_own_data
from data.toy import ensure_toy_dataset
from engine import caption_metrics
from tests.toy_runs import ROOT

# the Java scorers (METEOR, SPICE) take most of a toy caption run; BLEU and CIDEr still score the GT files written
FAST_SCORERS = [(f, names) for f, names in caption_metrics.CAPTION_SCORERS if names[0] in ('Bleu_1', 'CIDEr')]
SPEED = ['num_workers=0', 'image_size=32', 'max_epoch=1']
RUN_OPTIONS = {'caption': ['batch_size=8', 'max_length=8', 'num_beams=1'],
               'retrieval': ['batch_size_train=8', 'batch_size_test=8', 'queue_size=16', 'k_test=4']}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def mine(module_dir) -> Path:
    """Twenty toy images, two captions each: as ``pairs.json`` (photos under arbitrary names, no COCO-style
    number) and as two img2dataset-style shards (``KEY.jpg``, ``KEY.txt``, ``KEY.json``; the same keys in both
    shards, and one sample without a caption)."""
    toy = ensure_toy_dataset(module_dir('toy'), n_train=20, n_val=2, n_test=2, n_web=2, n_videos=2, video_frames=2)
    mine = module_dir('mine')
    (mine / 'photos').mkdir()
    (mine / 'shards').mkdir()
    captions: dict = {}
    for a in json.loads((toy / 'annotation' / 'coco_karpathy_train.json').read_text()):
        captions.setdefault(a['image'], []).append(a['caption'])
    entries, items = [], list(captions.items())
    for k, (image, caps) in enumerate(items):
        name = f'holiday picture {k}.jpg'
        (mine / 'photos' / name).write_bytes((toy / 'images' / image).read_bytes())
        entries += [{'image': f'photos/{name}', 'caption': c} for c in caps[:2]]
    (mine / 'pairs.json').write_text(json.dumps(entries))
    for shard in range(2):
        with tarfile.open(mine / 'shards' / f'{shard:05d}.tar', 'w') as tar:
            for k, (image, caps) in enumerate(items[shard::2]):
                key = f'{k:04d}'
                add_member(tar, f'{key}.jpg', (toy / 'images' / image).read_bytes())
                add_member(tar, f'{key}.txt', caps[0].encode())
                add_member(tar, f'{key}.json', json.dumps({'key': key}).encode())
            add_member(tar, 'nocaption.jpg', (toy / 'images' / items[0][0]).read_bytes())
    return mine


def test_images_are_split_and_every_caption_of_a_held_out_image_is_a_reference(mine, tmp_path):
    counts = own_data([str(mine / 'pairs.json'), '--out', str(tmp_path), '--val', '3', '--test', '3'])
    ann = tmp_path / 'annotation'
    train = json.loads((ann / 'coco_karpathy_train.json').read_text())
    val = json.loads((ann / 'coco_karpathy_val.json').read_text())
    gt = json.loads((ann / 'coco_gt' / 'coco_karpathy_val_gt.json').read_text())
    assert counts['val_images'] == len(val) == 3 and len({t['image'] for t in train}) == counts['train_images']
    assert not {t['image'] for t in train} & {v['image'] for v in val}
    assert all(len(v['caption']) == 2 for v in val) and len(gt['annotations']) == 6
    assert {g['id'] for g in gt['images']} == {int(v['image'][4:10]) for v in val}
    assert (tmp_path / 'images' / val[0]['image']).resolve().name.startswith('holiday picture')
    # the same input, the same split: a resumed run rewrites the same files
    again = plan_own_data(str(mine / 'pairs.json'), n_val=3, n_test=3)
    assert [i.name for i in again.splits['val']] == [v['image'] for v in val]


def test_shard_samples_are_keyed_by_shard_and_key_and_read_at_their_offsets(mine, tmp_path):
    plan = plan_own_data(str(mine / 'shards' / '{00000..00001}.tar'), n_val=2, n_test=2)
    assert plan.kind == 'shards' and plan.skipped == 2   # the caption-less sample of each shard
    counts = write_own_data(plan, tmp_path)
    assert (counts['train_images'], counts['val_images'], counts['test_images']) == (16, 2, 2)
    # held-out images are copied out of their tar; training ones are not
    val = json.loads((tmp_path / 'annotation' / 'coco_karpathy_val.json').read_text())
    assert sorted(p.name for p in (tmp_path / 'images').iterdir()) == sorted(
        v['image'] for s in ('val', 'test') for v in json.loads((tmp_path / 'annotation' /
                                                                  f'coco_karpathy_{s}.json').read_text()))
    assert (tmp_path / 'images' / val[0]['image']).read_bytes() == plan.splits['val'][0].read()
    train = own_shard_train(lambda image: image.size, str(tmp_path / 'annotation' / 'own_shard_train.json'),
                            prompt='a picture of ')
    # the same key in two shards is two images: sixteen pairs, sixteen ITC targets
    assert len(train) == 16 and len(set(train.img_ids.values())) == 16
    size, caption, idx = train[0]
    assert len(size) == 2 and min(size) > 8   # a decoded PIL image reached the transform
    assert caption.startswith('a picture of ') and 0 <= idx < 16


@pytest.mark.parametrize('kind', ['list', 'shards'])
@pytest.mark.parametrize('script, task', [(train_caption, 'caption'), (train_retrieval, 'retrieval')])
def test_one_override_trains_and_evaluates_on_your_own_data(mine, tmp_path, monkeypatch, script, task, kind):
    source = mine / 'pairs.json' if kind == 'list' else mine / 'shards' / '{00000..00001}.tar'
    real_eval = train_caption.coco_caption_eval
    monkeypatch.setattr(train_caption, 'coco_caption_eval', lambda gt, res: real_eval(gt, res, scorers=FAST_SCORERS))
    out = tmp_path / 'run'
    # the toy config's data keys (toy_root, image_root, ann_root, coco_gt_root) stay as they are: own_data wins
    script.main(['--config', str(ROOT / 'configs' / 'toy' / f'{task}.yaml'), '--output_dir', str(out),
                 '--device', 'cpu', '--options', f'own_data={source}', *SPEED, *RUN_OPTIONS[task]])
    stats = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    assert ('test_CIDEr' in stats) if task == 'caption' else ('test_txt_r1' in stats), stats
    assert stats['train_loss' if task == 'caption' else 'train_loss_ita'] > 0
    assert (out / 'own_data' / 'annotation' / 'coco_karpathy_test.json').is_file()
    if task == 'caption':   # the result file holds the held-out images' ids, which the GT file scored
        gt = json.loads((out / 'own_data' / 'annotation' / 'coco_gt' / 'coco_karpathy_test_gt.json').read_text())
        results = json.loads(next((out / 'result').glob('test_epoch0*.json')).read_text())
        assert {r['image_id'] for r in results} == {g['id'] for g in gt['images']}


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize('make, message', [
    (lambda d, m: str(d / 'nothere.json'), r"own_data: no such file .*nothere\.json"),
    (lambda d, m: write(d / 'p.json', json.dumps([{'image': 'photos/holiday picture 0.jpg', 'caption': 'a'},
                                                   {'image': 'x.jpg'}])),
     r"p\.json: entry 1 has no key 'caption'"),
    (lambda d, m: write(d / 'p.json', json.dumps([{'image': f'x{i}.jpg', 'caption': 'c'} for i in range(5)])),
     r'p\.json: entry 0: image x0\.jpg not found'),
    (lambda d, m: write(d / 'p.json', '{"image": "a.jpg"'), r'p\.json: not valid JSON'),
    (lambda d, m: write(m / 'two.json', json.dumps([{'image': f'photos/holiday picture {i}.jpg', 'caption': 'c'}
                                                    for i in range(2)])), r'2 usable images; at least 3 are needed'),
    (lambda d, m: write(d / 'p.csv', 'a.jpg,cat'), r'expected a JSON list .* or webdataset tar shards'),
    (lambda d, m: str(m / 'shards' / '{00000..00002}.tar'), r'no such shard file .*00002\.tar'),
    (lambda d, m: write(d / 'bad.tar', 'not a tar'), r'bad\.tar is not an uncompressed tar file'),
])
def test_bad_input_is_one_clear_error(mine, tmp_path, make, message):
    with pytest.raises((AnnotationError, FileNotFoundError), match=message):
        plan_own_data(make(tmp_path, mine))


def test_the_script_says_it_in_one_line(tmp_path, capsys):
    from engine.errors import run_script
    with pytest.raises(SystemExit) as end:
        run_script(train_retrieval.main, ['--config', str(ROOT / 'configs' / 'toy' / 'retrieval.yaml'), '--output_dir',
                                          str(tmp_path / 'run'), '--device', 'cpu',
                                          '--options', f'own_data={tmp_path}/nothere.json'])
    assert end.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"error: own_data: no such file '{tmp_path}/nothere.json'", err
