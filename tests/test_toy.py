"""The toy dataset: deterministic, complete, and readable by every dataset class and pycocotools."""
import filecmp
import json

import pytest
from PIL import Image

from data import create_dataset
from data.toy import captions, ensure_toy_dataset, Shape

SMALL = dict(n_train=12, n_val=6, n_test=6, n_web=10, n_videos=3)


@pytest.fixture(scope='module')
def toy(module_dir):
    return ensure_toy_dataset(module_dir('toy') / 'toy_data', seed=0, **SMALL)


def tree(root):
    return sorted(p.relative_to(root) for p in root.rglob('*') if p.is_file() and p.name != '.toy_lock')


def test_same_seed_gives_identical_files(toy, tmp_path):
    again = ensure_toy_dataset(tmp_path / 'again', seed=0, **SMALL)
    files = tree(toy)
    assert files == tree(again) and len(files) > 40
    match, mismatch, errors = filecmp.cmpfiles(toy, again, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    other = ensure_toy_dataset(tmp_path / 'other', seed=1, **SMALL)
    assert (other / 'annotation/coco_karpathy_train.json').read_text() != \
        (toy / 'annotation/coco_karpathy_train.json').read_text()


def test_generation_is_skipped_when_complete_and_redone_when_interrupted(toy, tmp_path):
    root = ensure_toy_dataset(tmp_path / 't', **SMALL)
    probe = root / 'annotation' / 'nlvr_dev.json'
    probe.write_text('[]')
    ensure_toy_dataset(root, **SMALL)
    assert probe.read_text() == '[]'                       # complete: untouched
    (root / '.toy_complete.json').unlink()                  # as if interrupted before the marker
    ensure_toy_dataset(root, **SMALL)
    assert json.loads(probe.read_text())


def config(toy, **extra):
    base = {'toy_root': str(toy), 'image_root': str(toy / 'images'), 'ann_root': str(toy / 'annotation'),
            'vqa_root': str(toy / 'images'), 'video_root': str(toy / 'videos'), 'image_size': 32,
            'prompt': 'a picture of ', 'train_files': ['vqa_train'], 'num_frm_test': 8}
    return {**base, **extra}


def test_every_file_reads_back_through_its_dataset(toy):
    cfg = config(toy)
    train, val, test = create_dataset('caption_coco', cfg)
    assert len(train) == 5 * SMALL['n_train'] and len(val) == SMALL['n_val']
    image, caption, idx = train[0]
    assert image.shape == (3, 32, 32) and caption.startswith('a picture of ') and idx == 0
    assert val[0][1] == SMALL['n_train']                    # int id parsed from toy_val_000012.jpg
    _, rval, rtest = create_dataset('retrieval_coco', cfg)
    assert len(rval.text) == 5 * SMALL['n_val'] and rtest[0][1] == 0
    assert len(create_dataset('retrieval_flickr', cfg)[0]) == 5 * SMALL['n_train']
    nval, ntest = create_dataset('nocaps', cfg)
    assert ntest[0][1] == SMALL['n_train'] + SMALL['n_val']
    vtrain, vtest = create_dataset('vqa', cfg)
    _, question, answers, weights = vtrain[0]
    assert question.endswith('?') and abs(sum(weights) - 1) < 1e-6 and vtest.answer_list
    assert all(a in vtest.answer_list for a in answers)
    ntrain, ndev, ntest = create_dataset('nlvr', cfg)
    labels = [int(e['label'] == 'True') for e in ntrain.annotation]
    assert sum(labels) * 2 == len(labels) and ndev[0][2] and ntest[0][0].shape == (3, 32, 32)
    pre = create_dataset('pretrain', config(toy, train_file=[str(toy / 'annotation/pretrain_noisy.json')],
                                            image_root=str(toy / 'images')), min_scale=0.2)
    assert len(pre) == SMALL['n_web'] and pre[0][0].shape == (3, 32, 32)
    video = create_dataset('retrieval_msrvtt', cfg)
    frames, clip = video[0]
    assert frames.shape == (8, 3, 32, 32) and clip == 'video0' and 'moving' in video.text[0]


def test_web_images_are_disjoint_and_noise_matches_truth(toy):
    ann = toy / 'annotation'
    clean = json.loads((ann / 'pretrain_clean.json').read_text())
    noisy = json.loads((ann / 'pretrain_noisy.json').read_text())
    truth = json.loads((ann / 'pretrain_noisy_truth.json').read_text())
    train_images = {e['image'] for e in json.loads((ann / 'coco_karpathy_train.json').read_text())}
    assert not train_images & {e['image'] for e in noisy}
    assert sum(truth) == 3 and len(truth) == len(noisy) == len(clean)          # 0.3 of 10
    assert [a['caption'] != b['caption'] for a, b in zip(clean, noisy)] == truth


def test_coco_ground_truth_loads_with_pycocotools(toy):
    from pycocotools.coco import COCO

    gt = COCO(str(toy / 'annotation/coco_gt/coco_karpathy_val_gt.json'))
    ids = sorted(gt.getImgIds())
    assert len(ids) == SMALL['n_val'] and len(gt.getAnnIds(imgIds=ids[:1])) == 5
    result = gt.loadRes([{'image_id': i, 'caption': 'a red circle'} for i in ids])
    assert len(result.getAnnIds()) == SMALL['n_val']


def test_vqa_answers_are_mostly_the_truth(toy):
    entries = json.loads((toy / 'annotation/vqa_train.json').read_text())
    assert all(len(e['answer']) == 10 and e['dataset'] == 'vqa' and isinstance(e['question_id'], int)
               for e in entries)
    image = Image.open(toy / 'images' / entries[0]['image'])
    assert image.size == (64, 64) and image.mode == 'RGB'


def test_captions_are_determined_by_the_scene():
    scene = [Shape('circle', 'red', 'small', 'left'), Shape('circle', 'red', 'large', 'right')]
    assert captions(scene) == [
        'a red circle on the left and a red circle on the right',
        'a small red circle and a large red circle',
        'two red circles',
        'two shapes, a red circle and a red circle',
        'the circle on the left is red and the circle on the right is red',
    ]


def test_nlvr_sentence_alone_predicts_nothing(tmp_path):
    """Each statement is true and false equally often, so only the images can beat 50% (generator v2)."""
    from collections import Counter, defaultdict
    root = ensure_toy_dataset(tmp_path / 'toy', n_train=400, n_val=4, n_test=4, n_web=2, n_videos=1)
    train = json.loads((root / 'annotation' / 'nlvr_train.json').read_text())
    labels = defaultdict(Counter)
    for entry in train:
        labels[entry['sentence'].split(' a ')[0]][entry['label']] += 1   # per template
    assert len(labels) >= 5
    for template, count in labels.items():
        assert abs(count['True'] - count['False']) <= 0.25 * sum(count.values()) + 3, (template, count)


def test_a_toy_dataset_of_an_older_generator_version_is_regenerated(tmp_path):
    root = ensure_toy_dataset(tmp_path / 't', **SMALL)
    marker = root / '.toy_complete.json'
    params = json.loads(marker.read_text())
    marker.write_text(json.dumps({**params, 'version': params['version'] - 1, 'n_train': 99}))
    probe = root / 'annotation' / 'nlvr_dev.json'
    probe.write_text('[]')
    ensure_toy_dataset(root, exact=False)                   # any size is fine, an old version is not
    assert probe.read_text() != '[]' and json.loads(marker.read_text())['version'] == params['version']
