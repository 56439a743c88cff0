"""predict.py over many images: folders, globs, file lists and tar shards; one JSON line per input; an unreadable
file is an error row; a rerun skips what is done and retries errors; every task (caption, vqa, itm, itc, embed,
retrieve) gives what the model gives for the same inputs."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import predict
from models.blip import blip_decoder
from models.blip_itm import blip_itm
from models.blip_vqa import blip_vqa

TOY = {'vit': 'tiny', 'image_size': 32, 'med_config': 'configs/toy/med_config.json'}


def save(model, path) -> str:
    torch.save({'model': model.state_dict(), 'config': TOY}, path)
    return str(path)


def write_image(path: Path, seed: int) -> None:
    pixels = torch.randint(0, 256, (36, 44, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / 'photos'
    (root / 'sub').mkdir(parents=True)
    for i in range(4):
        write_image(root / f'img{i}.jpg', i)
    write_image(root / 'sub' / 'img4.png', 4)
    (root / 'broken.jpg').write_bytes(b'not a jpeg')
    (root / 'notes.md').write_text('not an image, not listed')
    return root


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpt')
    torch.manual_seed(0)
    made = {'caption': blip_decoder(**TOY).eval(), 'vqa': blip_vqa(**TOY).eval(), 'itm': blip_itm(**TOY).eval()}
    return {task: (model, save(model, d / f'{task}.pth')) for task, model in made.items()}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensor(path, size=32) -> torch.Tensor:
    return predict.load_image(str(path), size, 'cpu')


def test_caption_a_folder_with_a_broken_file_then_rerun_skipping_what_is_done(folder, models, tmp_path):
    model, ckpt = models['caption']
    out = tmp_path / 'captions.jsonl'
    argv = ['--task', 'caption', '--images', str(folder), '--output', str(out), '--checkpoint', ckpt,
            '--batch_size', '2', '--num_workers', '0', '--device', 'cpu', '--max_length', '8', '--min_length', '3']
    counts = predict.main(argv)
    got = {r['path']: r for r in rows(out)}
    assert sorted(Path(p).name for p in got) == ['broken.jpg', *(f'img{i}.jpg' for i in range(4)), 'img4.png']
    assert counts['written'] == 6 and counts['errors'] == 1 and counts['images_per_second'] > 0
    assert 'cannot read image' in got[str(folder / 'broken.jpg')]['error']
    paths = [str(folder / f'img{i}.jpg') for i in range(4)] + [str(folder / 'sub' / 'img4.png')]
    with torch.no_grad():
        expected = model.generate(torch.cat([tensor(p) for p in paths]), num_beams=3, max_length=8, min_length=3)
    assert [got[p]['captions'] for p in paths] == [[c] for c in expected]

    # a kill mid-write leaves half a line; the rerun drops it and the error row, redoes both, and nothing else
    text = out.read_text().splitlines(keepends=True)
    last_done = next(line for line in reversed(text) if 'error' not in line)
    out.write_text(''.join(line for line in text if line is not last_done) + last_done[:15])
    counts = predict.main(argv)
    assert counts == {**counts, 'done_before': 4, 'written': 2, 'errors': 1}
    again = rows(out)
    assert sorted(r['path'] for r in again) == sorted(got) and len(again) == 6
    assert {r['path']: r for r in again} == got


def test_nucleus_sampling_gives_n_captions_per_image_from_a_glob(folder, models, tmp_path):
    _, ckpt = models['caption']
    out = tmp_path / 'sampled.jsonl'
    predict.main(['--task', 'caption', '--images', str(folder / '*.jpg'), '--output', str(out), '--checkpoint', ckpt,
                  '--sample', '--num_captions', '3', '--max_length', '8', '--num_workers', '0', '--device', 'cpu'])
    got = [r for r in rows(out) if 'error' not in r]
    assert len(got) == 4 and all(len(r['captions']) == 3 and all(isinstance(c, str) for c in r['captions'])
                                 for r in got)


def test_vqa_over_a_json_list_with_per_image_questions(folder, models, tmp_path):
    model, ckpt = models['vqa']
    listing = tmp_path / 'questions.json'
    listing.write_text(json.dumps([{'image': str(folder / 'img0.jpg'), 'question': 'what color is it?'},
                                   {'image': 'photos/img1.jpg', 'question': 'is there a circle?'}]))
    answers = tmp_path / 'answers.json'
    answers.write_text(json.dumps(['red', 'yes', 'no', 'a blue square']))
    out = tmp_path / 'vqa.jsonl'
    predict.main(['--task', 'vqa', '--images', str(listing), '--output', str(out), '--checkpoint', ckpt,
                  '--inference', 'rank', '--answer_list', str(answers), '--k_test', '3', '--num_workers', '0',
                  '--device', 'cpu'])
    got = rows(out)
    assert [r['question'] for r in got] == ['what color is it?', 'is there a circle?']
    assert got[1]['path'] == str(tmp_path / 'photos' / 'img1.jpg')          # relative to the list's folder
    images = torch.cat([tensor(folder / 'img0.jpg'), tensor(folder / 'img1.jpg')])
    with torch.no_grad():
        best = model(images, ['what color is it?', 'is there a circle?'], ['red', 'yes', 'no', 'a blue square'],
                     train=False, inference='rank', k_test=3)
    assert [r['answer'] for r in got] == [['red', 'yes', 'no', 'a blue square'][int(i)] for i in best]


@pytest.mark.parametrize('task', ['itm', 'itc'])
def test_itm_and_itc_scores_for_pairs_match_the_model(folder, models, tmp_path, task):
    model, ckpt = models['itm']
    out = tmp_path / f'{task}.jsonl'
    predict.main(['--task', task, '--images', str(folder / 'img*.jpg'), '--caption', 'a red circle', '--output',
                  str(out), '--checkpoint', ckpt, '--num_workers', '0', '--device', 'cpu'])
    got = rows(out)
    images = torch.cat([tensor(r['path']) for r in got])
    with torch.no_grad():
        itm = model(images, ['a red circle'] * 4, match_head='itm').softmax(-1)[:, 1]
        itc = model(images, ['a red circle'], match_head='itc')[:, 0]
    torch.testing.assert_close(torch.tensor([r['itc_cosine'] for r in got]), itc, rtol=1e-4, atol=1e-5)
    if task == 'itm':
        torch.testing.assert_close(torch.tensor([r['itm_match_probability'] for r in got]), itm, rtol=1e-4, atol=1e-5)
    else:
        logit = model(images, ['a red circle'] * 4, match_head='itm')[:, 1]
        torch.testing.assert_close(torch.tensor([r['retrieval_score'] for r in got]), logit + itc, rtol=1e-4, atol=1e-5)


def write_shard(path: Path, folder: Path) -> None:
    """img2dataset layout: KEY.jpg + KEY.txt; one broken image; a json sidecar that is not an image."""
    with tarfile.open(path, 'w') as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(3):
            add(f'{i:09d}.jpg', (folder / f'img{i}.jpg').read_bytes())
            add(f'{i:09d}.txt', f'caption number {i}'.encode())
            add(f'{i:09d}.json', b'{}')
        add('000000009.jpg', b'broken')


def test_tar_shards_are_keyed_by_shard_and_key_and_use_their_captions(folder, models, tmp_path):
    model, ckpt = models['itm']
    shards = tmp_path / 'shards'
    shards.mkdir()
    write_shard(shards / '00000.tar', folder)
    (shards / '00001.tar').write_bytes(b'not a tar file')
    out = tmp_path / 'shard_scores.jsonl'
    argv = ['--task', 'itm', '--images', str(shards / '*.tar'), '--output', str(out), '--checkpoint', ckpt,
            '--num_workers', '0', '--device', 'cpu', '--batch_size', '2']
    predict.main(argv)
    got = {r['path']: r for r in rows(out)}
    shard = str(shards / '00000.tar')
    assert sorted(got) == [f'{shard}/{i:09d}' for i in (0, 1, 2, 9)] + [str(shards / '00001.tar')]
    assert 'error' in got[f'{shard}/000000009'] and 'cannot read shard' in got[str(shards / '00001.tar')]['error']
    with torch.no_grad():
        p = model(tensor(folder / 'img1.jpg'), ['caption number 1'], match_head='itm').softmax(-1)[0, 1].item()
    assert got[f'{shard}/000000001']['caption'] == 'caption number 1'
    assert got[f'{shard}/000000001']['itm_match_probability'] == pytest.approx(p, rel=1e-4, abs=1e-6)
    assert predict.main(argv)['written'] == 2                     # rerun: only the two error rows again


def test_embed_then_retrieve_both_ways_ranks_as_the_itc_similarity(folder, models, tmp_path):
    model, ckpt = models['itm']
    texts = tmp_path / 'texts.txt'
    texts.write_text('a red circle\na blue square\ntwo green triangles\n')
    emb = tmp_path / 'set.safetensors'
    common = ['--checkpoint', ckpt, '--num_workers', '0', '--device', 'cpu']
    first = predict.main(['--task', 'embed', '--images', str(folder / 'img[01].jpg'), '--texts', str(texts),
                          '--output', str(emb), *common])
    more = predict.main(['--task', 'embed', '--images', str(folder), '--output', str(emb), *common])
    assert first['images'] == 2 and more == {'images': 5, 'new_images': 3, 'texts': 3, 'errors': 1}
    tensors, meta = predict.load_embeddings(str(emb))
    keys = meta['image_keys']
    with torch.no_grad():
        image_feats = model.image_features(torch.cat([tensor(k) for k in keys]))
        text_feats = model.text_features(texts.read_text().split('\n')[:3])
    torch.testing.assert_close(tensors['image_embeds'], image_feats, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tensors['text_embeds'], text_feats, rtol=1e-4, atol=1e-5)
    assert 'broken.jpg' in next(iter(meta['errors']))

    hits = tmp_path / 'hits.jsonl'
    predict.main(['--task', 'retrieve', '--embeddings', str(emb), '--texts', str(texts), '--top_k', '2',
                  '--output', str(hits), *common])
    sims = text_feats @ image_feats.T
    for row, sim in zip(rows(hits), sims):
        assert [r['path'] for r in row['results']] == [keys[i] for i in sim.topk(2).indices]
    back = tmp_path / 'back.jsonl'
    predict.main(['--task', 'retrieve', '--embeddings', str(emb), '--images', str(folder / 'img0.jpg'), '--top_k', '3',
                  '--output', str(back), *common])
    (row,) = rows(back)
    order = (image_feats[keys.index(str(folder / 'img0.jpg'))] @ text_feats.T).argsort(descending=True)
    assert [r['text'] for r in row['results']] == [texts.read_text().split('\n')[i] for i in order]
    assert predict.main(['--task', 'retrieve', '--embeddings', str(emb), '--texts', str(texts), '--output', str(hits),
                         *common])['queries'] == 0          # rerun: every query answered already


@pytest.mark.parametrize('argv, message', [
    (['--task', 'caption', '--images', 'x'], 'needs --output'),
    (['--task', 'caption'], 'give --image FILE, or --images'),
    (['--task', 'embed', '--images', 'x', '--output', 'o.jsonl'], '.safetensors'),
    (['--task', 'retrieve', '--output', 'o.jsonl', '--texts', 'q.txt'], 'needs --embeddings'),
    (['--task', 'vqa', '--images', 'x', '--output', 'o', '--inference', 'rank'], 'needs --answer_list'),
    (['--task', 'caption', '--images', 'x', '--output', 'o', '--num_captions', '5'], 'need --num_beams >= that'),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        predict.main([*argv, '--checkpoint', 'c.pth'])
    assert message in capsys.readouterr().err


def test_nothing_to_read_names_the_input(tmp_path, models):
    with pytest.raises(SystemExit, match='--images .*nothing.*: no images or .tar shards found'):
        predict.main(['--task', 'caption', '--images', str(tmp_path / 'nothing*'), '--output', str(tmp_path / 'o'),
                      '--checkpoint', models['caption'][1], '--device', 'cpu'])


def test_embed_and_retrieve_find_the_toy_images_of_a_model_trained_on_them(tmp_path):
    """A tiny ITC model fitted for 70 steps on 12 toy images (their first caption each) -> embed the set with
    predict.py, retrieve with the captions and with the images: recall@1 well above chance (1/12) both ways."""
    import torch.nn.functional as F

    from data.toy import ensure_toy_dataset
    toy = ensure_toy_dataset(tmp_path / 'toy', n_train=12, n_val=2, n_test=2, n_web=2, n_videos=2, video_frames=2,
                             n_videoqa=2)
    captions = {}
    for a in json.loads((toy / 'annotation' / 'coco_karpathy_train.json').read_text()):
        captions.setdefault(str(toy / 'images' / a['image']), a['caption'])
    paths, texts = list(captions), list(captions.values())
    torch.manual_seed(0)
    model = blip_itm(vit='tiny', image_size=32, med_config='configs/toy/med_config.json')
    images = torch.cat([tensor(p) for p in paths])
    optimizer, target = torch.optim.AdamW(model.parameters(), lr=1e-3), torch.arange(len(paths))
    for _ in range(70):
        sims = model.image_features(images) @ model.text_features(texts).T / 0.07
        loss = (F.cross_entropy(sims, target) + F.cross_entropy(sims.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ckpt = save(model.eval(), tmp_path / 'itc.pth')
    (tmp_path / 'images.txt').write_text('\n'.join(paths))
    (tmp_path / 'texts.txt').write_text('\n'.join(texts))
    common = ['--checkpoint', ckpt, '--num_workers', '0', '--device', 'cpu', '--top_k', '1']
    predict.main(['--task', 'embed', '--images', str(tmp_path / 'images.txt'), '--texts', str(tmp_path / 'texts.txt'),
                  '--output', str(tmp_path / 'set.safetensors'), *common])
    embeddings = ['--embeddings', str(tmp_path / 'set.safetensors')]
    predict.main(['--task', 'retrieve', *embeddings, '--texts', str(tmp_path / 'texts.txt'),
                  '--output', str(tmp_path / 't2i.jsonl'), *common])
    predict.main(['--task', 'retrieve', *embeddings, '--images', str(tmp_path / 'images.txt'),
                  '--output', str(tmp_path / 'i2t.jsonl'), *common])
    t2i = sum(r['results'][0]['path'] == paths[texts.index(r['query'])] for r in rows(tmp_path / 't2i.jsonl'))
    i2t = sum(r['results'][0]['text'] == captions[r['path']] for r in rows(tmp_path / 'i2t.jsonl'))
    assert t2i >= 6 and i2t >= 6, (t2i, i2t)      # of 12; measured 12 and 12 after 80 steps, 9 after 60
