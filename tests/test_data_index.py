"""The compact pretraining index: JSON == JSONL, memory per entry, caching, errors, LAION rotation."""
import json
import os
import pickle
import tracemalloc

import numpy as np
import pytest
from PIL import Image

import data.ann_index as ann_index
from data.ann_index import AnnotationIndex, iter_json_entries
from data.loading import AnnotationError
from data.pretrain_dataset import load_annotation_index, pretrain_dataset


def entries(n, prefix='img'):
    return [{'image': f'{prefix}/{i}.jpg', 'caption': f'caption number {i} ünïcode', 'extra': [i, None]}
            for i in range(n)]


def write_list(path, items):
    path.write_text(json.dumps(items, indent=1))


def write_lines(path, items):
    path.write_text(''.join(json.dumps(x) + '\n' for x in items))


def test_json_list_and_jsonl_give_identical_items(tmp_path, monkeypatch):
    items = entries(500)
    write_list(tmp_path / 'a.json', items)
    write_lines(tmp_path / 'a.jsonl', items)
    monkeypatch.setattr(ann_index, '_READ_CHUNK', 97)  # entries straddle many read chunks
    from_list, from_lines = load_annotation_index(str(tmp_path / 'a.json')), load_annotation_index(
        [str(tmp_path / 'a.jsonl')])
    assert len(from_list) == len(from_lines) == 500
    assert list(from_list) == list(from_lines) == items
    assert from_list[-1] == items[-1] and from_list[10:12] == items[10:12]


def test_empty_and_concatenated_files(tmp_path):
    write_list(tmp_path / 'empty.json', [])
    write_lines(tmp_path / 'b.jsonl', entries(3, 'b'))
    index = load_annotation_index([str(tmp_path / 'empty.json'), str(tmp_path / 'b.jsonl')])
    assert len(index) == 3 and index[2]['image'] == 'b/2.jpg'
    with pytest.raises(IndexError):
        index[3]


def test_index_is_reused_and_rebuilt_when_source_changes(tmp_path):
    src = tmp_path / 'a.jsonl'
    write_lines(src, entries(5))
    first = AnnotationIndex(str(src))
    built = first.offsets_path.stat().st_mtime_ns
    assert AnnotationIndex(str(src)).offsets_path.stat().st_mtime_ns == built
    write_lines(src, entries(7))
    import os
    os.utime(src, ns=(built + 10**9, built + 10**9))
    assert len(AnnotationIndex(str(src))) == 7
    assert not list(tmp_path.glob('*.tmp'))


def test_a_file_put_back_with_an_older_mtime_is_not_served_from_the_old_index(tmp_path):
    """cp -p / rsync -a / tar x restore a file's own (older) mtime: the index was still newer than the
    source and kept serving the old entries."""
    src = tmp_path / 'a.json'
    src.write_text(json.dumps([{'image': 'x.jpg', 'caption': 'old caption'}]))
    assert AnnotationIndex(str(src))[0]['caption'] == 'old caption'
    fixed = tmp_path / 'fixed.json'
    fixed.write_text(json.dumps([{'image': 'x.jpg', 'caption': 'new caption'}]))
    os.utime(fixed, ns=(10**18, 10**18))  # an older mtime than the index's (year 2001)
    os.replace(fixed, src)
    assert AnnotationIndex(str(src))[0]['caption'] == 'new caption'
    assert AnnotationIndex(str(src))[0]['caption'] == 'new caption'  # and that index is reused as is


def test_index_in_cache_dir_and_pickles_small(tmp_path):
    write_lines(tmp_path / 'a.jsonl', entries(1000))
    index = AnnotationIndex(str(tmp_path / 'a.jsonl'), cache_dir=str(tmp_path / 'cache'))
    assert index.offsets_path.parent == tmp_path / 'cache'
    blob = pickle.dumps(index)
    assert len(blob) < 2000 and pickle.loads(blob)[999] == entries(1000)[999]


def test_index_files_get_the_umask_permissions(tmp_path):
    # a cache shared by a group (BLIP_ANN_CACHE) must be readable by its other members, not 0600
    write_lines(tmp_path / 'a.jsonl', entries(3))
    old = os.umask(0o022)
    try:
        index = AnnotationIndex(str(tmp_path / 'a.jsonl'), cache_dir=str(tmp_path / 'cache'))
    finally:
        os.umask(old)
    files = sorted((tmp_path / 'cache').iterdir())
    assert index.offsets_path in files and not [f for f in files if f.suffix == '.tmp']
    assert {os.stat(f).st_mode & 0o777 for f in files} == {0o644}


@pytest.mark.parametrize('text, message', [
    ('[{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}]', "entry 1 has no key 'caption'"),
    ('[{"image": "a.jpg", "caption": "x"}, {"url": 5, "caption": "y"}]', "entry 1 key 'url' has value 5"),
    ('[{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "caption": "y"', 'entry 1 is not valid JSON'),
    ('{"image": "a.jpg"}', 'expected a JSON list'),
])
def test_malformed_pretraining_file(tmp_path, text, message):
    (tmp_path / 'bad.json').write_text(text)
    with pytest.raises(AnnotationError, match='bad.json') as info:
        load_annotation_index(str(tmp_path / 'bad.json'))
    assert message in str(info.value)


def test_malformed_jsonl_line(tmp_path):
    (tmp_path / 'bad.jsonl').write_text('{"image": "a", "caption": "b"}\n\n{"image": oops}\n')
    with pytest.raises(AnnotationError, match=r'bad.jsonl: entry 1 \(line 3\)'):
        load_annotation_index(str(tmp_path / 'bad.jsonl'))


def test_compact_index_memory(tmp_path):
    """200k entries: 8 index bytes per entry in a memory map, no per-entry Python objects."""
    n = 200_000
    src = tmp_path / 'big.jsonl'
    with open(src, 'w') as f:
        for i in range(n):
            f.write('{"image": "/data/laion/%09d.jpg", "caption": "a photo of thing %d"}\n' % (i, i))
    AnnotationIndex(str(src))  # build once (one-time conversion, streamed)
    tracemalloc.start()
    index = load_annotation_index(str(src))
    sample = [index[i] for i in range(0, n, 997)]
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(index) == n and sample[1] == {'image': '/data/laion/000000997.jpg', 'caption': 'a photo of thing 997'}
    part = index.parts[0]
    assert part.nbytes_resident_index() / n < 8.1
    assert isinstance(part._offsets, np.memmap) and isinstance(part._blob, np.memmap)
    # A list of 200k dicts would take ~50 MB of Python heap; the index allocates almost nothing.
    assert peak < 1_000_000, peak


def write_pretrain_images(tmp_path, names):
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (8, 8), (10, 20, 30)).save(tmp_path / name)


def test_pretrain_dataset_and_laion_rotation(tmp_path):
    write_pretrain_images(tmp_path, ['coco/a.jpg', 'laion/x0.jpg', 'laion/x1.jpg', 'laion/y.jpg'])
    write_list(tmp_path / 'coco.json', [{'image': str(tmp_path / 'coco/a.jpg'), 'caption': 'A cat.'}])
    shards = tmp_path / 'laion_shards'
    shards.mkdir()
    write_lines(shards / 'part1.jsonl', [{'url': 'laion/y.jpg', 'caption': 'Shard one'}])
    write_list(shards / 'part0.json', [{'image': 'laion/x0.jpg', 'caption': 'Shard zero'},
                                       {'image': 'laion/x1.jpg', 'caption': 'Shard zero b'}])
    ds = pretrain_dataset([str(tmp_path / 'coco.json')], str(shards), lambda im: np.asarray(im),
                          image_root=str(tmp_path))
    assert ds.laion_files == [str(shards / 'part0.json'), str(shards / 'part1.jsonl')]
    assert len(ds) == 3 and ds[0][1] == 'a cat' and ds[2][1] == 'shard zero b' and ds[2][0].shape == (8, 8, 3)
    assert ds.annotation[2]['caption'] == 'Shard zero b'   # raw entry kept for CapFilt write-back
    ds.reload_laion(1)
    assert len(ds) == 2 and ds[1][1] == 'shard one'
    ds.reload_laion(2)
    assert len(ds) == 3


def test_pretrain_bad_image_names_entry(tmp_path):
    write_lines(tmp_path / 'p.jsonl', [{'image': 'missing.jpg', 'caption': 'x'},
                                       {'url': 'https://example.com/a.jpg', 'caption': 'y'}])
    ds = pretrain_dataset([str(tmp_path / 'p.jsonl')], '', lambda im: im, image_root=str(tmp_path))
    from data.loading import BadSampleError
    with pytest.raises(BadSampleError, match=r'missing\.jpg \(annotation index 0 of .*p\.jsonl\)'):
        ds[0]
    with pytest.raises(BadSampleError, match='remote URL'):
        ds[1]


def test_iter_json_entries_handles_whitespace(tmp_path):
    (tmp_path / 'w.json').write_text(' \n [ \n {"a": 1} ,\n\n {"b": [1, 2]}\n ] \n')
    assert list(iter_json_entries(str(tmp_path / 'w.json'))) == [{'a': 1}, {'b': [1, 2]}]
