"""Every image dataset on small files written here, create_dataset/loader semantics, robust inputs."""
import json
import logging
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
import data.utils
from data import create_dataset, create_loader, create_sampler
from data.coco_karpathy_dataset import coco_karpathy_caption_eval, coco_karpathy_retrieval_eval, coco_karpathy_train
from data.flickr30k_dataset import flickr30k_retrieval_eval, flickr30k_train
from data.loading import AnnotationError, BadSampleError
from data.nlvr_dataset import nlvr_dataset
from data.nocaps_dataset import nocaps_eval
from data.vqa_dataset import vqa_collate_fn, vqa_dataset


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def write_image(path, colour=(200, 10, 10), size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, colour).save(path)


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def coco(tmp_path):
    img, ann = tmp_path / 'img', tmp_path / 'ann'
    names = [f'val2014/COCO_val2014_{i:012d}.jpg' for i in (57870, 384029, 222016)]
    for i, n in enumerate(names):
        write_image(img / n, (i * 80, 0, 0))
    write_json(ann / 'coco_karpathy_train.json', [
        {'image': names[0], 'caption': 'A man riding a horse.', 'image_id': 'coco_57870'},
        {'image': names[1], 'caption': 'Two dogs!', 'image_id': 'coco_384029'},
        {'image': names[0], 'caption': 'A rider.', 'image_id': 'coco_57870'}])
    for split in ('val', 'test'):
        write_json(ann / f'coco_karpathy_{split}.json', [
            {'image': names[1], 'caption': ['Two dogs.', 'Dogs playing']},
            {'image': names[2], 'caption': ['A cat', 'A cat on a mat', 'cat']}])
    return img, ann, names


def test_coco_train_items(coco):
    img, ann, _ = coco
    ds = coco_karpathy_train(to_tensor, str(img), str(ann), prompt='a picture of ')
    assert len(ds) == 3 and ds.img_ids == {'coco_57870': 0, 'coco_384029': 1}
    image, caption, idx = ds[2]
    assert image.shape == (3, 10, 12) and caption == 'a picture of a rider' and idx == 0


def test_coco_caption_eval_parses_coco_ids(coco):
    img, ann, _ = coco
    ds = coco_karpathy_caption_eval(to_tensor, str(img), str(ann), 'val')
    assert [ds[i][1] for i in range(len(ds))] == [384029, 222016]


def test_retrieval_eval_maps(coco):
    img, ann, names = coco
    ds = coco_karpathy_retrieval_eval(to_tensor, str(img), str(ann), 'test')
    assert ds.text == ['two dogs', 'dogs playing', 'a cat', 'a cat on a mat', 'cat']
    assert ds.img2txt == {0: [0, 1], 1: [2, 3, 4]} and ds.txt2img == {0: 0, 1: 0, 2: 1, 3: 1, 4: 1}
    assert ds.image == names[1:] and ds[1][1] == 1


def test_flickr_uses_its_file_names(tmp_path, coco):
    img, ann, _ = coco
    for split in ('train', 'val', 'test'):
        (ann / f'flickr30k_{split}.json').write_text((ann / f'coco_karpathy_{split}.json').read_text())
        (ann / f'coco_karpathy_{split}.json').unlink()
    assert len(flickr30k_train(to_tensor, str(img), str(ann))) == 3
    assert flickr30k_retrieval_eval(to_tensor, str(img), str(ann), 'val').img2txt[1] == [2, 3, 4]


def test_nocaps(tmp_path):
    write_image(tmp_path / 'a.jpg')
    write_json(tmp_path / 'nocaps_val.json', [{'image': 'a.jpg', 'img_id': '17'}])
    image, img_id = nocaps_eval(to_tensor, str(tmp_path), str(tmp_path), 'val')[0]
    assert img_id == 17 and image.shape == (3, 10, 12)


def test_vqa_train_weights_and_collate(tmp_path):
    write_image(tmp_path / 'coco' / 'a.jpg')
    write_image(tmp_path / 'vg' / 'b.jpg')
    answers = ['red'] * 6 + ['blue'] * 3 + ['pink']
    write_json(tmp_path / 'vqa_train.json', [{'image': 'a.jpg', 'question': 'What color?!', 'answer': answers,
                                              'dataset': 'vqa', 'question_id': 1}])
    write_json(tmp_path / 'vg_qa.json', [{'image': 'b.jpg', 'question': 'Where.', 'answer': 'park', 'dataset': 'vg'}])
    ds = vqa_dataset(to_tensor, str(tmp_path), str(tmp_path / 'coco'), str(tmp_path / 'vg'),
                     train_files=['vqa_train', 'vg_qa'], split='train')
    image, question, ans, weights = ds[0]
    assert question == 'what color?' and ans == ['red', 'blue', 'pink']
    assert weights == pytest.approx([0.6, 0.3, 0.1])
    assert ds[1][2:] == (['park'], [0.2])
    images, questions, flat, w, n = vqa_collate_fn([ds[0], ds[1]])
    assert images.shape == (2, 3, 10, 12) and questions == ['what color?', 'where']
    assert flat == ['red', 'blue', 'pink', 'park'] and n == [3, 1]
    assert torch.allclose(w, torch.tensor([0.6, 0.3, 0.1, 0.2]))


def test_vqa_test_split(tmp_path):
    write_image(tmp_path / 'a.jpg')
    write_json(tmp_path / 'vqa_test.json', [{'image': 'a.jpg', 'question': 'Is it red?', 'question_id': 262148000,
                                             'dataset': 'vqa'}])
    write_json(tmp_path / 'answer_list.json', ['yes', 'no'])
    ds = vqa_dataset(to_tensor, str(tmp_path), str(tmp_path), '', split='test')
    assert ds[0][1:] == ('is it red?', 262148000) and ds.answer_list == ['yes', 'no']


def test_nlvr_swaps_images_and_left_right(tmp_path):
    write_image(tmp_path / 'l.png', (255, 0, 0))
    write_image(tmp_path / 'r.png', (0, 0, 255))
    write_json(tmp_path / 'nlvr_dev.json', [{'images': ['l.png', 'r.png'], 'sentence': 'The left image has more.',
                                             'label': 'False'}])
    ds = nlvr_dataset(to_tensor, str(tmp_path), str(tmp_path), 'val')
    random.seed(0)
    seen = set()
    for _ in range(40):
        a, b, sentence, label = ds[0]
        assert label == 0
        seen.add((a[0, 0, 0].item() == 255, sentence))
    assert seen == {(True, 'the left image has more'), (False, 'the right image has more')}


def test_create_dataset_tuples_and_mapping_config(coco):
    img, ann, _ = coco

    class Config:  # mapping-like, not a dict
        def __init__(self, d):
            self.d = d

        def __getitem__(self, k):
            return self.d[k]

        def __contains__(self, k):
            return k in self.d

        def get(self, k, default=None):
            return self.d.get(k, default)

    config = Config({'image_root': str(img), 'ann_root': str(ann), 'image_size': 16, 'prompt': 'a picture of '})
    train, val, test = create_dataset('caption_coco', config)
    assert isinstance(train, coco_karpathy_train) and train[0][0].shape == (3, 16, 16)
    assert train[0][1].startswith('a picture of ') and isinstance(test, coco_karpathy_caption_eval)
    assert [type(d).__name__ for d in create_dataset('retrieval_coco', config)] == [
        'coco_karpathy_train', 'coco_karpathy_retrieval_eval', 'coco_karpathy_retrieval_eval']
    with pytest.raises(KeyError, match="'vqa_root'"):
        create_dataset('vqa', config)
    with pytest.raises(ValueError, match='unknown dataset'):
        create_dataset('coco', config)


def test_create_loader_semantics(coco):
    img, ann, _ = coco
    ds = coco_karpathy_train(lambda im: to_tensor(im.resize((8, 8))), str(img), str(ann))
    samplers = create_sampler([ds, ds], [True, False], num_tasks=2, global_rank=1)
    assert samplers[0].shuffle and not samplers[1].shuffle and samplers[0].num_replicas == 2
    train, test = create_loader([ds, ds], [None, None], batch_size=[2, 2], num_workers=[0, 0],
                                is_trains=[True, False], collate_fns=[None, None])
    assert train.drop_last and len(train) == 1 and not test.drop_last and len(test) == 2
    assert train.pin_memory == torch.cuda.is_available()
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert isinstance(test.sampler, torch.utils.data.SequentialSampler)


def test_missing_annotation_is_downloaded(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root):
        calls.append(url)
        write_json(tmp_path / 'nocaps_test.json', [])

    monkeypatch.setattr(data.utils, 'download_url', fake_download)
    nocaps_eval(to_tensor, str(tmp_path), str(tmp_path), 'test')
    nocaps_eval(to_tensor, str(tmp_path), str(tmp_path), 'test')   # present now: no second download
    assert calls == ['https://storage.googleapis.com/sfr-vision-language-research/datasets/nocaps_test.json']


def test_failed_download_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data.utils, 'download_url', lambda url, root: None)
    with pytest.raises(FileNotFoundError, match='nocaps_val.json'):
        nocaps_eval(to_tensor, str(tmp_path), str(tmp_path), 'val')


def test_offline_missing_annotation_names_the_local_file_and_leaves_no_folders(tmp_path, monkeypatch):
    """Offline, a missing file (or a typo in ann_root) was a bare URLError naming only the URL."""
    def offline(url, root):
        raise OSError('<urlopen error [Errno -2] Name or service not known>')

    monkeypatch.setattr(data.utils, 'download_url', offline)
    typo = tmp_path / 'no_such_dir' / 'annotation'
    with pytest.raises(FileNotFoundError, match=r'annotation file .*no_such_dir/annotation/vqa_test\.json is '
                                                r'missing and downloading https://\S+vqa_test\.json failed.*ann_root'):
        vqa_dataset(to_tensor, str(typo), '', '', split='test')
    assert not (tmp_path / 'no_such_dir').exists() and tmp_path.exists()


@pytest.fixture
def broken(coco):
    img, ann, names = coco
    (img / names[1]).write_bytes(b'not a jpeg at all')       # corrupt
    (img / names[2]).unlink()                                # missing
    return img, ann, names


def test_bad_image_error_names_file_and_index(broken):
    img, ann, names = broken
    ds = coco_karpathy_caption_eval(to_tensor, str(img), str(ann), 'val')
    with pytest.raises(BadSampleError, match=r'COCO_val2014_000000384029\.jpg.*annotation index 0'):
        ds[0]
    with pytest.raises(BadSampleError, match=r'COCO_val2014_000000222016\.jpg.*annotation index 1'):
        ds[1]


def test_skip_bad_samples_counts_logs_and_replaces(broken, caplog):
    img, ann, names = broken
    ds = coco_karpathy_train(to_tensor, str(img), str(ann), skip_bad_samples=True)
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert ds.num_bad_samples == 1 and 'COCO_val2014_000000384029.jpg' in caplog.text
    captions = [it[1] for it in items]
    assert captions[0] == 'a man riding a horse' and captions[2] == 'a rider'
    assert captions[1] in captions[::2] and captions == [ds[i][1] for i in range(len(ds))]  # a random other, reproducible
    all_bad = coco_karpathy_caption_eval(to_tensor, str(img), str(ann), 'val', skip_bad_samples=True)
    with pytest.raises(BadSampleError, match='consecutive'):
        all_bad[0]
    assert all_bad.num_bad_samples == 2


def test_skip_bad_samples_via_config(broken):
    img, ann, _ = broken
    config = {'image_root': str(img), 'ann_root': str(ann), 'image_size': 16, 'skip_bad_samples': True}
    train, val, test = create_dataset('retrieval_coco', config)
    assert train.skip_bad_samples and not val.skip_bad_samples and not test.skip_bad_samples
    assert train[1][2] == 0 and train.num_bad_samples == 1


def test_eval_splits_never_replace_an_unreadable_image(broken):
    """A replaced gallery image would be scored under the missing one's id: evaluation stops instead, naming it
    and saying that skipping covers training splits only."""
    img, ann, _ = broken
    config = {'image_root': str(img), 'ann_root': str(ann), 'image_size': 16, 'skip_bad_samples': True}
    for name in ('retrieval_coco', 'caption_coco'):
        val = create_dataset(name, config)[1]
        with pytest.raises(BadSampleError, match=r'COCO_val2014_000000384029\.jpg.*training samples'):
            [val[i] for i in range(len(val))]
        assert val.num_bad_samples == 0


def test_truncated_image_is_an_error_except_in_pretraining(tmp_path):
    """The original let PIL decode truncated files everywhere (the missing part grey); here only pretraining on
    web images does, and the setting does not leak into other datasets of the same process."""
    import io
    from PIL import Image, ImageFile
    from data.loading import load_image
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert('RGB').save(buf, format='JPEG')
    path = tmp_path / 'cut.jpg'
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 3 // 4])
    with pytest.raises(BadSampleError, match=r'cut\.jpg \(annotation index 7 of a\.json\).*truncated'):
        load_image(str(path), 7, 'a.json')
    assert load_image(str(path), 7, 'a.json', lenient=True).size == (64, 64)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False and Image.MAX_IMAGE_PIXELS is not None
    write_json(tmp_path / 'web.json', [{'image': str(path), 'caption': 'a noisy web picture'}])
    pre = create_dataset('pretrain', {'train_file': [str(tmp_path / 'web.json')], 'image_size': 16})
    assert pre[0][1] == 'a noisy web picture'
    with pytest.raises(BadSampleError):
        load_image(str(path), 7, 'a.json')


@pytest.mark.parametrize('entry, message', [
    ({'image': 'a.jpg', 'caption': 'x'}, "entry 1 has no key 'image_id'"),
    ({'image': 'a.jpg', 'caption': 3, 'image_id': 1}, "entry 1 key 'caption' has value 3 of type int"),
    (['a.jpg'], 'entry 1 is a list'),
])
def test_malformed_annotation_names_file_and_index(tmp_path, entry, message):
    good = {'image': 'a.jpg', 'caption': 'x', 'image_id': 1}
    write_json(tmp_path / 'coco_karpathy_train.json', [good, entry])
    with pytest.raises(AnnotationError, match='coco_karpathy_train.json') as info:
        coco_karpathy_train(to_tensor, str(tmp_path), str(tmp_path))
    assert message in str(info.value)


@pytest.mark.parametrize('captions, message', [([], "entry 1 (b.jpg) has an empty 'caption' list"),
                                               (['ok', 3], "entry 1 (b.jpg) key 'caption' holds 3 of type int")])
def test_retrieval_split_needs_captions_for_every_image(tmp_path, captions, message):
    """Found when the split is read, not by the evaluation after a training epoch."""
    write_json(tmp_path / 'coco_karpathy_val.json', [{'image': 'a.jpg', 'caption': ['x']},
                                                      {'image': 'b.jpg', 'caption': captions}])
    with pytest.raises(AnnotationError, match=re.escape(message)) as info:
        coco_karpathy_retrieval_eval(to_tensor, str(tmp_path), str(tmp_path), 'val')
    assert 'coco_karpathy_val.json' in str(info.value)


def test_malformed_vqa_and_nlvr_entries(tmp_path):
    write_json(tmp_path / 'vqa_train.json', [{'image': 'a', 'question': 'q', 'answer': 'x', 'dataset': 'vqa'}])
    with pytest.raises(AnnotationError, match=r"vqa_train.json: entry 0 \('vqa'\) key 'answer'"):
        vqa_dataset(to_tensor, str(tmp_path), '', '', train_files=['vqa_train'])
    write_json(tmp_path / 'nlvr_train.json', [{'images': ['a'], 'sentence': 's', 'label': 'True'}])
    with pytest.raises(AnnotationError, match="nlvr_train.json: entry 0 key 'images'"):
        nlvr_dataset(to_tensor, str(tmp_path), str(tmp_path), 'train')
