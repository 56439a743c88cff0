"""A deterministic synthetic dataset in the original annotation formats, for offline runs and tests.

Each image is a 64x64 plain background with 1-3 coloured shapes (circle/square/triangle; red, green,
blue, yellow; small/large) at distinct positions (left, right, top, bottom, center). Captions,
VQA answers and NLVR labels are functions of the scene, with a small vocabulary, so a tiny model can
learn every task in minutes on a CPU.

Layout under ``root`` (image paths in annotations are relative to ``images/``)::

    images/toy/toy_{train,val,test,web}_NNNNNN.jpg   (ids unique across splits)
    annotation/coco_karpathy_{train,val,test}.json   flickr30k_{train,val,test}.json
    annotation/coco_gt/coco_karpathy_{val,test}_gt.json
    annotation/nocaps_{val,test}.json
    annotation/vqa_{train,val,test}.json   annotation/answer_list.json
    annotation/nlvr_{train,dev,test}.json
    annotation/pretrain_clean.json   annotation/pretrain_noisy.json   annotation/pretrain_noisy_truth.json
    annotation/msrvtt_test.jsonl   videos/videoN.mp4
    annotation/videoqa_test.json   annotation/videoqa_answer_list.json   videos/qa_videoN.mp4
    .toy_complete.json   (written last; holds the generation parameters)
"""
from __future__ import annotations

import fcntl
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import av
import numpy as np
from PIL import Image, ImageDraw

from engine.atomic import atomic_write_text

VERSION = 3   # 2: NLVR statements balanced per sentence; 3: video QA clips and questions
IMAGE_SIZE = 64
KINDS = ('circle', 'square', 'triangle')
COLOURS = {'red': (220, 30, 30), 'green': (30, 170, 40), 'blue': (30, 60, 220), 'yellow': (235, 200, 20)}
SIZES = {'small': 5, 'large': 9}
# Centres chosen so that two large shapes at any two positions do not overlap.
POSITIONS = {'left': (14, 32), 'right': (50, 32), 'top': (32, 14), 'bottom': (32, 50), 'center': (32, 32)}
POSITION_ORDER = ('left', 'top', 'center', 'bottom', 'right')
POSITION_PHRASES = {'left': 'on the left', 'right': 'on the right', 'top': 'at the top', 'bottom': 'at the bottom',
                    'center': 'in the center'}
BACKGROUND = (235, 235, 235)
NUMBER_WORDS = {1: 'one', 2: 'two', 3: 'three'}
PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles'}
DIRECTIONS = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}
MARKER = '.toy_complete.json'


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str


@dataclass
class ToyParams:
    seed: int = 0
    n_train: int = 1000
    n_val: int = 100
    n_test: int = 100
    n_web: int = 1000
    noise_fraction: float = 0.3
    n_videos: int = 32
    video_frames: int = 8
    n_videoqa: int = 64
    version: int = VERSION


# ---------------------------------------------------------------------------------------------- scenes

def random_scene(rng: random.Random) -> list[Shape]:
    """1-3 shapes at distinct positions, listed in reading order (left, top, center, bottom, right)."""
    positions = rng.sample(POSITION_ORDER, rng.randint(1, 3))
    shapes = [Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), p) for p in positions]
    return sorted(shapes, key=lambda s: POSITION_ORDER.index(s.position))


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, colour: str, radius: int, centre: tuple[float, float]) -> None:
    x, y = centre
    fill = COLOURS[colour]
    if kind == 'circle':
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)
    elif kind == 'square':
        draw.rectangle([x - radius, y - radius, x + radius, y + radius], fill=fill)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=fill)


def render_scene(shapes: list[Shape]) -> Image.Image:
    image = Image.new('RGB', (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        draw_shape(draw, s.kind, s.colour, SIZES[s.size], POSITIONS[s.position])
    return image


# -------------------------------------------------------------------------------------------- captions

def _article(word: str) -> str:
    return 'an' if word[0] in 'aeiou' else 'a'


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]


def _grouped(shapes: list[Shape]) -> list[str]:
    """'two blue squares' for repeated (colour, kind), 'a red circle' otherwise; first-seen order."""
    counts: dict = {}
    for s in shapes:
        counts[(s.colour, s.kind)] = counts.get((s.colour, s.kind), 0) + 1
    return [f'a {c} {k}' if n == 1 else f'{NUMBER_WORDS[n]} {c} {PLURALS[k]}' for (c, k), n in counts.items()]


def captions(shapes: list[Shape]) -> list[str]:
    """Five phrasings, each fully determined by the scene."""
    n = len(shapes)
    count = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}"
    return [
        _join([f'a {s.colour} {s.kind} {POSITION_PHRASES[s.position]}' for s in shapes]),
        _join([f'a {s.size} {s.colour} {s.kind}' for s in shapes]),
        _join(_grouped(shapes)),
        f'{count}, ' + _join([f'{_article(s.colour)} {s.colour} {s.kind}' for s in shapes]),
        _join([f'the {s.kind} {POSITION_PHRASES[s.position]} is {s.colour}' for s in shapes]),
    ]


# ------------------------------------------------------------------------------------------------ VQA

def questions(shapes: list[Shape], rng: random.Random) -> list[tuple[str, str]]:
    """Three (question, answer) pairs about a scene, from a small set of templates."""
    qa = [('how many shapes are there?', str(len(shapes)))]
    kinds = [s.kind for s in shapes]
    unique = [s for s in shapes if kinds.count(s.kind) == 1]
    if unique:
        s = rng.choice(unique)
        qa.append((f'what color is the {s.kind}?', s.colour))
    s = rng.choice(shapes)
    qa.append((f'what shape is {POSITION_PHRASES[s.position]}?', s.kind))
    colour, kind = rng.choice(list(COLOURS)), rng.choice(KINDS)
    present = any(x.colour == colour and x.kind == kind for x in shapes)
    if not present and rng.random() < 0.5:
        # Ask about a shape that is there, so 'yes' and 'no' are about equally frequent.
        colour, kind, present = s.colour, s.kind, True
    qa.append((f'is there a {colour} {kind}?', 'yes' if present else 'no'))
    rng.shuffle(qa)
    return qa[:3]


ANSWER_GROUPS = [['1', '2', '3'], list(COLOURS), list(KINDS), ['yes', 'no']]
ANSWER_LIST = [a for group in ANSWER_GROUPS for a in group]


def annotator_answers(answer: str, rng: random.Random, noise: float = 0.1) -> list[str]:
    """Ten annotator answers: the true one, each replaced with probability ``noise`` by another of its kind."""
    group = next(g for g in ANSWER_GROUPS if answer in g)
    return [rng.choice([a for a in group if a != answer]) if rng.random() < noise else answer for _ in range(10)]


# ----------------------------------------------------------------------------------------------- NLVR

def _statements(rng: random.Random) -> tuple[str, callable]:
    """A random pair-symmetric statement and its truth function over two scenes."""
    colour, kind = rng.choice(list(COLOURS)), rng.choice(KINDS)
    has_c = lambda sc: any(s.colour == colour for s in sc)  # noqa: E731
    has_k = lambda sc: any(s.kind == kind for s in sc)  # noqa: E731
    has_ck = lambda sc: any(s.colour == colour and s.kind == kind for s in sc)  # noqa: E731
    options = [
        (f'both images contain a {colour} shape', lambda a, b: has_c(a) and has_c(b)),
        (f'exactly one image contains a {kind}', lambda a, b: has_k(a) != has_k(b)),
        (f'at least one image contains a {colour} {kind}', lambda a, b: has_ck(a) or has_ck(b)),
        (f'neither image contains a {kind}', lambda a, b: not has_k(a) and not has_k(b)),
        ('the two images contain the same number of shapes', lambda a, b: len(a) == len(b)),
        (f'both images contain a {kind}', lambda a, b: has_k(a) and has_k(b)),
    ]
    return rng.choice(options)


def nlvr_entry(scenes: list, names: list[str], rng: random.Random, want: bool) -> dict:
    """A statement, then a pair for which it is ``want``.

    Choosing the statement first keeps every statement true and false equally often, so the sentence
    alone predicts nothing and only looking at the images beats 50%. (Version 1 drew pairs and
    statements together, which made rare-to-be-true statements mostly false: a sentence-only model
    scored 55-70%.)
    """
    while True:
        sentence, truth = _statements(rng)
        for _ in range(1000):   # every statement is true and false for some pair; give up on none
            i, j = rng.sample(range(len(scenes)), 2)
            if truth(scenes[i], scenes[j]) == want:
                return {'images': [names[i], names[j]], 'sentence': sentence, 'label': 'True' if want else 'False'}


# ------------------------------------------------------------------------------------------------ video

def write_video(path: Path, kind: str, colour: str, direction: str, frames: int) -> None:
    """A shape moving across a 64x64 clip, encoded with PyAV (mpeg4, one thread: reproducible bytes)."""
    dx, dy = DIRECTIONS[direction]
    with av.open(str(path), mode='w', format='mp4') as container:
        stream = container.add_stream('mpeg4', rate=8)
        stream.width = stream.height = IMAGE_SIZE
        stream.pix_fmt = 'yuv420p'
        stream.thread_count = 1
        stream.codec_context.options = {'flags': '+bitexact'}
        container.metadata['encoder'] = ''
        for t in range(frames):
            offset = -20 + 40 * t / max(1, frames - 1)
            image = Image.new('RGB', (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
            draw_shape(ImageDraw.Draw(image), kind, colour, 8, (32 + dx * offset, 32 + dy * offset))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# -------------------------------------------------------------------------------------------- writing

def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=None), fsync=False)


def _make_split(root: Path, split: str, start: int, n: int, rng: random.Random) -> tuple[list, list[str]]:
    scenes, names = [], []
    for k in range(n):
        scene = random_scene(rng)
        name = f'toy/toy_{split}_{start + k:06d}.jpg'
        render_scene(scene).save(root / 'images' / name, quality=95)
        scenes.append(scene)
        names.append(name)
    return scenes, names


def _caption_files(ann: Path, prefix: str, splits: dict) -> None:
    scenes, names = splits['train']
    _write_json(ann / f'{prefix}_train.json', [
        {'image': name, 'caption': c, 'image_id': Path(name).stem}
        for scene, name in zip(scenes, names) for c in captions(scene)])
    for split in ('val', 'test'):
        scenes, names = splits[split]
        _write_json(ann / f'{prefix}_{split}.json', [{'image': name, 'caption': captions(scene)}
                                                   for scene, name in zip(scenes, names)])


def _image_id(name: str) -> int:
    return int(Path(name).stem.split('_')[-1])


def _coco_gt(ann: Path, splits: dict) -> None:
    for split in ('val', 'test'):
        scenes, names = splits[split]
        annotations = [{'image_id': _image_id(name), 'caption': c, 'id': i * 5 + j}
                       for i, (scene, name) in enumerate(zip(scenes, names)) for j, c in enumerate(captions(scene))]
        _write_json(ann / 'coco_gt' / f'coco_karpathy_{split}_gt.json', {
            'info': {'description': 'BLIP toy dataset'}, 'licenses': [], 'type': 'captions',
            'images': [{'id': _image_id(name), 'file_name': name} for name in names],
            'annotations': annotations})
        _write_json(ann / f'nocaps_{split}.json', [{'image': name, 'img_id': _image_id(name)} for name in names])


def _vqa_files(ann: Path, splits: dict, rng: random.Random) -> None:
    qid = 0
    for split in ('train', 'val', 'test'):
        entries = []
        for scene, name in zip(*splits[split]):
            for question, answer in questions(scene, rng):
                entries.append({'question_id': qid, 'image': name, 'question': question,
                                'answer': annotator_answers(answer, rng), 'dataset': 'vqa'})
                qid += 1
        _write_json(ann / f'vqa_{split}.json', entries)
    _write_json(ann / 'answer_list.json', ANSWER_LIST)


def _nlvr_files(ann: Path, splits: dict, rng: random.Random) -> None:
    for split, filename in (('train', 'nlvr_train.json'), ('val', 'nlvr_dev.json'), ('test', 'nlvr_test.json')):
        scenes, names = splits[split]
        _write_json(ann / filename, [nlvr_entry(scenes, names, rng, want=k % 2 == 0) for k in range(len(scenes))])


def _pretrain_files(ann: Path, web: tuple, rng: random.Random, noise_fraction: float) -> None:
    scenes, names = web
    clean = [{'image': name, 'caption': rng.choice(captions(scene))} for scene, name in zip(scenes, names)]
    noisy_idx = set(rng.sample(range(len(clean)), round(noise_fraction * len(clean))))
    noisy = []
    for i, entry in enumerate(clean):
        caption = entry['caption']
        if i in noisy_idx:
            # A caption of another image that does not also describe this one.
            while caption == entry['caption'] or caption in captions(scenes[i]):
                caption = rng.choice(captions(scenes[rng.randrange(len(scenes))]))
        noisy.append({'image': entry['image'], 'caption': caption})
    _write_json(ann / 'pretrain_clean.json', clean)
    _write_json(ann / 'pretrain_noisy.json', noisy)
    _write_json(ann / 'pretrain_noisy_truth.json', [i in noisy_idx for i in range(len(clean))])


def _video_files(root: Path, params: ToyParams, rng: random.Random) -> None:
    (root / 'videos').mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(params.n_videos):
        kind, colour, direction = rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(list(DIRECTIONS))
        clip = f'video{k}'
        write_video(root / 'videos' / f'{clip}.mp4', kind, colour, direction, params.video_frames)
        lines.append(json.dumps({'clip_name': clip, 'caption': f'a {colour} {kind} moving {_direction_phrase(direction)}'}))
    path = root / 'annotation' / 'msrvtt_test.jsonl'
    atomic_write_text(path, '\n'.join(lines) + '\n', fsync=False)


VIDEOQA_FRAMES = 16   # the paper samples 16 frames per video for QA


def videoqa_questions(kind: str, colour: str, k: int, rng: random.Random) -> list[tuple[str, str]]:
    """Three (question, answer) pairs about a clip of one moving shape, in the image VQA templates (so a toy
    VQA model answers them zero-shot), each needing the frames: its colour, its kind (the shape crosses the
    centre), and whether a shape of a given colour is there (true for even ``k``; else another colour, so the
    question's words give nothing away)."""
    asked = colour if k % 2 == 0 else rng.choice([c for c in COLOURS if c != colour])
    return [(f'what color is the {kind}?', colour),
            ('what shape is in the center?', kind),
            (f'is there a {asked} {kind}?', 'yes' if asked == colour else 'no')]


def _videoqa_files(root: Path, params: ToyParams, rng: random.Random) -> None:
    """``n_videoqa`` clips ``videos/qa_videoN.mp4`` of VIDEOQA_FRAMES frames and their questions in the
    MSRVTT-QA format (``video_id``, ``question``, ``answer``, ``id``), plus the candidate answer list."""
    entries = []
    for k in range(params.n_videoqa):
        kind, colour, direction = rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(list(DIRECTIONS))
        write_video(root / 'videos' / f'qa_video{k}.mp4', kind, colour, direction, VIDEOQA_FRAMES)
        for question, answer in videoqa_questions(kind, colour, k, rng):
            entries.append({'video_id': k, 'question': question, 'answer': answer, 'id': len(entries)})
    _write_json(root / 'annotation' / 'videoqa_test.json', entries)
    _write_json(root / 'annotation' / 'videoqa_answer_list.json', ANSWER_LIST)


def _direction_phrase(direction: str) -> str:
    return f'to the {direction}' if direction in ('left', 'right') else direction


def generate(root: Path, params: ToyParams) -> None:
    """Write every toy file into ``root`` (overwriting), deterministically from ``params``."""
    rng = random.Random(params.seed)
    ann = root / 'annotation'
    (root / 'images' / 'toy').mkdir(parents=True, exist_ok=True)
    ann.mkdir(parents=True, exist_ok=True)
    splits, start = {}, 0
    for split, n in (('train', params.n_train), ('val', params.n_val), ('test', params.n_test),
                     ('web', params.n_web)):
        splits[split] = _make_split(root, split, start, n, rng)
        start += n
    _caption_files(ann, 'coco_karpathy', splits)
    _caption_files(ann, 'flickr30k', splits)
    _coco_gt(ann, splits)
    _vqa_files(ann, splits, rng)
    _pretrain_files(ann, splits['web'], rng, params.noise_fraction)
    _video_files(root, params, rng)
    # own stream, last: a change to the NLVR statements leaves every other file as it was
    _nlvr_files(ann, splits, random.Random(f'{params.seed}-nlvr'))
    _videoqa_files(root, params, random.Random(f'{params.seed}-videoqa'))


def ensure_toy_dataset(root: str | os.PathLike, seed: int = 0, n_train: int = 1000, n_val: int = 100,
                       n_test: int = 100, n_web: int = 1000, noise_fraction: float = 0.3, n_videos: int = 32,
                       video_frames: int = 8, exact: bool = True, n_videoqa: int = 64) -> Path:
    """Generate the toy dataset into ``root`` unless a complete one with the same parameters is there.

    A marker file holding the parameters is written last, so an interrupted generation is redone;
    a file lock makes concurrent ranks wait for the first one instead of writing the same files.

    Args:
        root: output folder.
        seed: RNG seed; the same parameters give byte-identical files.
        n_train, n_val, n_test: COCO/Flickr-style split sizes (images); VQA and NLVR reuse them.
        n_web: images of the noisy "web" pretraining part (disjoint from every other split).
        noise_fraction: fraction of web captions replaced by another image's caption.
        n_videos: number of MSRVTT-style clips.
        video_frames: frames per clip.
        n_videoqa: clips of the video QA test set (three questions each).
        exact: regenerate when the complete dataset in ``root`` was made with other parameters;
            False accepts any complete toy dataset of this generator version (what ``create_dataset``
            does with ``toy_root``).

    Returns:
        ``Path(root)``.
    """
    params = ToyParams(seed, n_train, n_val, n_test, n_web, noise_fraction, n_videos, video_frames, n_videoqa)
    if min(n_train, n_val, n_test, n_web) < 2:
        raise ValueError(f'every toy split needs at least 2 images (NLVR pairs them); got {params}')
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER
    with open(root / '.toy_lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _marker_params(marker)
        if found is not None and (found == asdict(params) or (not exact and found.get('version') == VERSION)):
            return root
        if marker.exists():
            marker.unlink()
        generate(root, params)
        _write_json(marker, asdict(params))
    return root


def _marker_params(marker: Path) -> Optional[dict]:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ web shards

SHARD_DIR = 'shards'
SHARD_MARKER = '.shards_complete.json'


def toy_shard_pattern(root: str | os.PathLike, num_shards: int) -> str:
    """The brace pattern naming the toy web shards, e.g. ``ROOT/shards/{00000..00003}.tar``."""
    return f'{Path(root) / SHARD_DIR}/{{00000..{num_shards - 1:05d}}}.tar'


def write_toy_shards(root: str | os.PathLike, shard_size: int = 250, source: str = 'pretrain_noisy.json') -> list[Path]:
    """The toy web pairs (``annotation/pretrain_noisy.json``, in its order) as img2dataset-style webdataset shards
    ``shards/NNNNN.tar`` (``KEY.jpg``, ``KEY.txt``, ``KEY.json``) with ``NNNNN_stats.json`` beside each; the JPEG
    bytes are the image files' own. Byte-identical for the same input (member times are 0)."""
    import webdataset as wds

    root = Path(root)
    entries = json.loads((root / 'annotation' / source).read_text())
    folder = root / SHARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(entries), shard_size)):
        part = entries[start:start + shard_size]
        path = folder / f'{number:05d}.tar'
        tmp = path.with_name(path.name + '.tmp')
        with open(tmp, 'wb') as f:
            writer = wds.TarWriter(f, mtime=0, encoder=False)
            for k, entry in enumerate(part):
                key = f'{number:05d}{k:04d}'
                writer.write({'__key__': key, 'jpg': (root / 'images' / entry['image']).read_bytes(),
                              'txt': entry['caption'].encode(),
                              'json': json.dumps({'key': key, 'caption': entry['caption'],
                                                  'url': entry['image']}).encode()})
            writer.close()
        os.replace(tmp, path)
        _write_json(folder / f'{number:05d}_stats.json', {'count': len(part), 'successes': len(part)})
        paths.append(path)
    return paths


def ensure_toy_shards(root: str | os.PathLike, shard_size: Optional[int] = None) -> str:
    """Write the toy web shards unless complete ones are there (of ``shard_size`` when given; None accepts any,
    writing 250 a shard when there are none); returns their brace pattern."""
    root = Path(root)
    marker = root / SHARD_DIR / SHARD_MARKER
    with open(root / '.toy_lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _marker_params(marker)
        if found is None or shard_size not in (None, found.get('shard_size')):
            for old in (root / SHARD_DIR).glob('*'):   # shards of another size must not stay in the pattern
                old.unlink()
            paths = write_toy_shards(root, shard_size or 250)
            _write_json(marker, {'shard_size': shard_size or 250, 'num_shards': len(paths)})
            found = _marker_params(marker)
    return toy_shard_pattern(root, found['num_shards'])
