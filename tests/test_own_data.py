"""Your own {image, caption} pairs -> the COCO Karpathy files: images split (not pairs), ids from the linked file
names, and train_caption.py / train_retrieval.py train and evaluate on them with only the roots overridden."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import train_caption
import train_retrieval
from data.own_data import main as own_data
from data.toy import ensure_toy_dataset
from tests.toy_runs import ROOT


@pytest.fixture(scope='module')
def pairs(module_dir) -> Path:
    """Twenty toy images under arbitrary names (no COCO-style number), two captions each, in a JSON list."""
    toy = ensure_toy_dataset(module_dir('toy'), n_train=20, n_val=2, n_test=2, n_web=2, n_videos=2, video_frames=2)
    mine = module_dir('mine')
    (mine / 'photos').mkdir()
    captions: dict = {}
    for a in json.loads((toy / 'annotation' / 'coco_karpathy_train.json').read_text()):
        captions.setdefault(a['image'], []).append(a['caption'])
    entries = []
    for k, (image, caps) in enumerate(captions.items()):
        name = f'holiday picture {k}.jpg'
        (mine / 'photos' / name).write_bytes((toy / 'images' / image).read_bytes())
        entries += [{'image': f'photos/{name}', 'caption': c} for c in caps[:2]]
    (mine / 'pairs.json').write_text(json.dumps(entries))
    return mine / 'pairs.json'


def test_images_are_split_and_every_caption_of_a_held_out_image_is_a_reference(pairs, tmp_path):
    counts = own_data([str(pairs), '--out', str(tmp_path), '--val', '3', '--test', '3'])
    ann = tmp_path / 'annotation'
    train = json.loads((ann / 'coco_karpathy_train.json').read_text())
    val = json.loads((ann / 'coco_karpathy_val.json').read_text())
    gt = json.loads((ann / 'coco_gt' / 'coco_karpathy_val_gt.json').read_text())
    assert counts['val_images'] == len(val) == 3 and len({t['image'] for t in train}) == counts['train_images']
    assert not {t['image'] for t in train} & {v['image'] for v in val}
    assert all(len(v['caption']) == 2 for v in val) and len(gt['annotations']) == 6
    assert {g['id'] for g in gt['images']} == {int(v['image'][4:10]) for v in val}
    assert (tmp_path / 'images' / val[0]['image']).resolve().name.startswith('holiday picture')


def test_a_missing_image_is_one_clear_error(tmp_path):
    (tmp_path / 'p.json').write_text(json.dumps([{'image': f'x{i}.jpg', 'caption': 'c'} for i in range(5)]))
    with pytest.raises(SystemExit, match=r'image x0.jpg not found'):
        own_data([str(tmp_path / 'p.json'), '--out', str(tmp_path / 'o')])


@pytest.mark.parametrize('script, config, extra', [
    (train_caption, 'caption', ['batch_size=8', 'max_length=8', 'num_beams=2',
                                'coco_gt_root={data}/annotation/coco_gt']),
    (train_retrieval, 'retrieval', ['batch_size_train=8', 'batch_size_test=8', 'queue_size=16', 'k_test=4'])])
def test_caption_and_retrieval_train_on_your_own_data(pairs, tmp_path, script, config, extra):
    data = tmp_path / 'data'
    own_data([str(pairs), '--out', str(data), '--val', '3', '--test', '3'])
    out = tmp_path / 'run'
    script.main(['--config', str(ROOT / 'configs' / 'toy' / f'{config}.yaml'), '--output_dir', str(out),
                 '--device', 'cpu', '--options', 'toy_root=', f'image_root={data}/images',
                 f'ann_root={data}/annotation',
                 'num_workers=0', 'image_size=32', 'max_epoch=1', *[e.format(data=data) for e in extra]])
    stats = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    assert ('test_CIDEr' in stats) if config == 'caption' else ('test_txt_r1' in stats), stats
