"""Caption, answer, score, embed or retrieve images from the command line: one image, or many in batches.

One image (prints one JSON object):

    python predict.py --task caption --image demo.jpg --checkpoint model_base_caption_capfilt_large.pth
    python predict.py --task vqa --image demo.jpg --question "where is the woman sitting?" \\
        --checkpoint model_base_vqa_capfilt_large.pth
    python predict.py --task itm --image demo.jpg --caption "a woman sitting on the beach" \\
        --checkpoint model_base_retrieval_coco.pth

Many images (one JSON line per input in ``--output``; batched, bf16 and CUDA-graph decoding on a GPU):

    python predict.py --task caption --images photos/ --output captions.jsonl --batch_size 64 --checkpoint ...
    python predict.py --task itm --images pairs.json --output scores.jsonl --checkpoint ...   # [{image, caption}]
    python predict.py --task embed --images 'shards/*.tar' --texts captions.txt --output set.safetensors ...
    python predict.py --task retrieve --embeddings set.safetensors --texts queries.txt --output hits.jsonl ...

``--images`` is a folder (every image below it), a glob, a file list (``.txt``: one path per line; ``.json`` /
``.jsonl``: ``{"image", "caption"/"question"}`` entries; relative paths are relative to the list's folder) or
tar shards (``.tar`` files or a glob of them, img2dataset layout: ``KEY.jpg`` + ``KEY.txt``; rows are keyed
``shard_path/KEY``). An unreadable file is an error row, never a crash; a rerun into the same ``--output``
skips the rows already done and retries the error rows.

The original's ``predict.py`` (a cog predictor) did the first three tasks on one image; checkpoints are paths or
URLs (downloaded once into torch hub's cache). ``--vit``, ``--image_size`` and ``--med_config`` default to
those of the run that wrote the checkpoint (its ``config`` entry, which this project's scripts save), else to
ViT-B, the task's image size and ``configs/med_config.json``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tarfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from models.checkpoint import read_checkpoint
from transform import create_transforms

IMAGE_SIZES = {'caption': 384, 'vqa': 480, 'itm': 384, 'itc': 384, 'embed': 384, 'retrieve': 384}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
MODEL_KEYS = ('vit', 'image_size', 'med_config')


# ------------------------------------------------------------------------------------------------ images

def read_image(source, name: str) -> Image.Image:
    """Fully decoded RGB image from a path or a file object; ``ValueError`` naming ``name`` when unreadable."""
    try:
        with Image.open(source) as im:
            return im.convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f'cannot read image {name}: {type(e).__name__}: {e}') from None


def load_image(path: str, image_size: int, device) -> torch.Tensor:
    """One image as a ``[1, 3, S, S]`` test-transformed tensor; a one-line ``SystemExit`` when unreadable."""
    try:
        image = read_image(path, path)
    except ValueError as e:
        raise SystemExit(str(e))
    _, test_transform = create_transforms(image_size)
    return test_transform(image).unsqueeze(0).to(device)


# ------------------------------------------------------------------------------------------------ inputs

def is_shard(path: str) -> bool:
    return path.endswith('.tar')


def list_inputs(spec: str) -> tuple[list[dict], list[str]]:
    """``--images`` -> (file entries ``{'path', 'text'?}``, tar shard paths); one of them is empty.

    Raises:
        SystemExit: nothing matches, or a list file is malformed (naming the file and the line/entry).
    """
    if os.path.isdir(spec):
        files = sorted(str(p) for p in Path(spec).rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS)
        entries, shards = [{'path': f} for f in files], []
    elif os.path.isfile(spec) and is_shard(spec):
        entries, shards = [], [spec]
    elif os.path.isfile(spec) and spec.endswith(('.txt', '.json', '.jsonl')):
        entries, shards = read_file_list(spec), []
    elif os.path.isfile(spec):
        entries, shards = [{'path': spec}], []
    else:
        matches = sorted(glob.glob(spec, recursive=True))
        shards = [m for m in matches if is_shard(m)]
        entries = [] if shards else [{'path': m} for m in matches if Path(m).suffix.lower() in IMAGE_EXTENSIONS]
    if not entries and not shards:
        raise SystemExit(f'--images {spec}: no images or .tar shards found there')
    return entries, shards


def read_file_list(path: str) -> list[dict]:
    """``.txt``: one image path per line; ``.json``/``.jsonl``: ``{"image", "caption"|"question"|"text"}``."""
    base = Path(path).parent
    resolve = lambda p: p if os.path.isabs(p) else str(base / p)  # noqa: E731
    if path.endswith('.txt'):
        with open(path, encoding='utf-8') as f:
            return [{'path': resolve(line.strip())} for line in f if line.strip()]
    from data.loading import AnnotationError, load_json_list
    try:
        items = load_json_list(path)
    except AnnotationError as e:
        raise SystemExit(str(e))
    entries = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {'image': item}
        if not isinstance(item, dict) or not isinstance(item.get('image'), str):
            raise SystemExit(f'{path}: entry {i} needs an "image" path, got {item!r}')
        text = next((item[k] for k in ('caption', 'question', 'text') if isinstance(item.get(k), str)), None)
        entries.append({'path': resolve(item['image']), **({'text': text} if text is not None else {})})
    return entries


class FileImages(Dataset):
    """``(key, image tensor | None, error | None, text | None)`` for a list of image files."""

    def __init__(self, entries: list[dict], transform):
        self.entries, self.transform = entries, transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        entry = self.entries[i]
        try:
            return entry['path'], self.transform(read_image(entry['path'], entry['path'])), None, entry.get('text')
        except ValueError as e:
            return entry['path'], None, str(e), entry.get('text')


class ShardImages(IterableDataset):
    """The images of tar shards (img2dataset layout: ``KEY.jpg`` with an optional ``KEY.txt`` caption), keyed
    ``shard_path/KEY``; a data-loader worker reads every ``num_workers``-th shard. ``done`` keys are skipped
    without decoding them."""

    def __init__(self, shards: list[str], transform, done: frozenset = frozenset()):
        self.shards, self.transform, self.done = shards, transform, done

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in mine:
            yield from self.read_shard(shard)

    def read_shard(self, shard: str) -> Iterator:
        try:
            with tarfile.open(shard) as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                for name, member in members.items():
                    stem, ext = os.path.splitext(name)
                    key = f'{shard}/{stem}'
                    if ext.lower() not in IMAGE_EXTENSIONS or key in self.done:
                        continue
                    text_member = members.get(stem + '.txt')
                    text = tar.extractfile(text_member).read().decode('utf-8').strip() if text_member else None
                    try:
                        image = self.transform(read_image(tar.extractfile(member), key))
                        yield key, image, None, text
                    except ValueError as e:
                        yield key, None, str(e), text
        except (OSError, tarfile.TarError) as e:   # an unreadable shard is one error row
            yield shard, None, f'cannot read shard {shard}: {type(e).__name__}: {e}', None


def _keep_list(batch: list) -> list:
    return batch


# ------------------------------------------------------------------------------------------------ output

def read_done(output: str) -> set:
    """Keys (``path``, or ``query`` of text retrieval) already answered in ``output``; the file is rewritten
    without its error rows (they are retried) and without a line cut off by a kill."""
    if not os.path.exists(output):
        return set()
    kept, done = [], set()
    with open(output, encoding='utf-8') as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            key = row.get('path', row.get('query')) if isinstance(row, dict) else None
            if key is not None and 'error' not in row:
                kept.append(line if line.endswith('\n') else line + '\n')
                done.add(key)
    tmp = output + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(kept)
    os.replace(tmp, output)
    return done


# ------------------------------------------------------------------------------------------------ models

def checkpoint_settings(checkpoint: str) -> dict:
    """``vit``, ``image_size`` and ``med_config`` of the run that saved ``checkpoint`` (its ``config`` entry;
    the official checkpoints mostly have none): a toy or ViT-L checkpoint then loads without extra flags."""
    config = read_checkpoint(checkpoint).get('config')
    if not isinstance(config, Mapping):
        return {}
    return {k: config[k] for k in MODEL_KEYS if config.get(k) not in (None, '')}


def model_settings(task: str, checkpoint: str, vit=None, image_size=None, med_config=None) -> dict:
    given = {k: v for k, v in zip(MODEL_KEYS, (vit, image_size, med_config)) if v is not None}
    saved = {} if len(given) == len(MODEL_KEYS) else checkpoint_settings(checkpoint)
    if saved:
        print(f'model settings from the checkpoint\'s config: {saved}', file=sys.stderr)
    return {'vit': 'base', 'image_size': IMAGE_SIZES[task], 'med_config': 'configs/med_config.json', **saved, **given}


def build_model(task: str, checkpoint: str, settings: dict, device):
    common = dict(pretrained=checkpoint, **settings)
    if task == 'caption':
        from models.blip import blip_decoder
        model = blip_decoder(**common)
    elif task == 'vqa':
        from models.blip_vqa import blip_vqa
        model = blip_vqa(**common)
    else:
        from models.blip_itm import blip_itm
        model = blip_itm(**common)
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------ one image

def predict(task: str, image_path: str, checkpoint: str, question: str = '', caption: str = '',
            vit: Optional[str] = None, image_size: Optional[int] = None, med_config: Optional[str] = None,
            sample: bool = False, device: str = 'cpu') -> dict:
    """Run caption / vqa / itm on one image and return a JSON-able result.

    ``vit`` / ``image_size`` / ``med_config`` left at None come from the checkpoint's config, else from the
    defaults (ViT-B, ``IMAGE_SIZES[task]``, ``configs/med_config.json``)."""
    settings = model_settings(task, checkpoint, vit, image_size, med_config)
    image = load_image(image_path, int(settings['image_size']), device)
    model = build_model(task, checkpoint, settings, device)
    with torch.no_grad():
        if task == 'caption':
            return {'caption': model.generate(image, sample=sample, num_beams=3, max_length=20, min_length=5)[0]}
        if task == 'vqa':
            return {'question': question, 'answer': model(image, question, train=False, inference='generate')[0]}
        scores = model.pair_scores(image, [caption])
        return {'caption': caption, 'itm_match_probability': scores.itm.item(), 'itc_cosine': scores.itc.item()}


# ------------------------------------------------------------------------------------------------ batches

class BatchPredictor:
    """Runs one task on batches of ``(key, image, text)`` and returns their JSON rows."""

    def __init__(self, task: str, model, args, device: torch.device):
        self.task, self.model, self.args, self.device = task, model, args, device
        self.amp = (torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' and args.amp == 'bf16'
                    else nullcontext())
        self.candidates = None
        if task == 'vqa' and args.inference == 'rank':
            self.answer_list = [str(a) for a in json.loads(Path(args.answer_list).read_text())]
            self.candidates = model.tokenize_answers(self.answer_list, device)

    @torch.no_grad()
    def __call__(self, keys: list, images: torch.Tensor, texts: list) -> list[dict]:
        a = self.args
        with self.amp:
            if self.task == 'caption':
                captions = self.model.generate(images, sample=a.sample, num_beams=a.num_beams, max_length=a.max_length,
                                               min_length=a.min_length, top_p=a.top_p,
                                               num_return_sequences=a.num_captions,
                                               cuda_graph=self.device.type == 'cuda' and not a.no_cuda_graph)
                n = a.num_captions
                return [{'path': k, 'captions': captions[i * n:(i + 1) * n]} for i, k in enumerate(keys)]
            if self.task == 'vqa':
                if self.candidates is not None:
                    ids, atts = self.candidates
                    best = self.model(images, texts, {'input_ids': ids, 'attention_mask': atts}, train=False,
                                      inference='rank', k_test=a.k_test)
                    answers = [self.answer_list[int(i)] for i in best]
                else:
                    answers = self.model(images, texts, train=False, inference='generate')
                return [{'path': k, 'question': q, 'answer': ans} for k, q, ans in zip(keys, texts, answers)]
            scores = self.model.pair_scores(images, texts)
            if self.task == 'itm':
                return [{'path': k, 'caption': t, 'itm_match_probability': p, 'itc_cosine': c}
                        for k, t, p, c in zip(keys, texts, scores.itm.tolist(), scores.itc.tolist())]
            return [{'path': k, 'caption': t, 'itc_cosine': c, 'retrieval_score': s}
                    for k, t, c, s in zip(keys, texts, scores.itc.tolist(), scores.sum.tolist())]


def make_loader(spec: str, image_size: int, batch_size: int, num_workers: int,
                done: set) -> tuple[DataLoader, Optional[int]]:
    """Batches of ``(key, image | None, error | None, text | None)`` tuples; the number of items when known."""
    _, transform = create_transforms(image_size)
    entries, shards = list_inputs(spec)
    if shards:
        dataset, total = ShardImages(shards, transform, frozenset(done)), None
    else:
        todo = [e for e in entries if e['path'] not in done]
        dataset, total = FileImages(todo, transform), len(todo)
    workers = min(num_workers, len(shards)) if shards else num_workers
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_keep_list,
                        pin_memory=torch.cuda.is_available())
    return loader, total


def item_text(task: str, text: Optional[str], args) -> Optional[str]:
    """The question / caption of an item: its own (list entry, shard .txt), else --question / --caption."""
    if task == 'vqa':
        return args.question or text
    if task in ('itm', 'itc'):
        return args.caption or text
    return text


def run_batches(args, device: torch.device) -> dict:
    """Every ``--images`` item through the task into ``--output`` (JSON lines); returns counts and img/s."""
    settings = model_settings(args.task, args.checkpoint, args.vit, args.image_size, args.med_config)
    model = build_model(args.task, args.checkpoint, settings, device)
    return predict_into(args, model, int(settings['image_size']), device)


def predict_into(args, model, image_size: int, device: torch.device) -> dict:
    """``run_batches`` with a built model (``benchmarks/predict_batch.py`` times this)."""
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    predictor = BatchPredictor(args.task, model, args, device)
    done = read_done(args.output)
    loader, total = make_loader(args.images, image_size, args.batch_size, args.num_workers, done)
    counts = {'done_before': len(done), 'written': 0, 'errors': 0}
    start = time.perf_counter()
    with open(args.output, 'a', encoding='utf-8') as out, \
            tqdm(total=total, unit='img', desc=args.task, dynamic_ncols=True, file=sys.stderr) as bar:
        for batch in loader:
            rows, good = [], []
            for key, image, error, text in batch:
                text = item_text(args.task, text, args)
                if error is None and args.task in ('vqa', 'itm', 'itc') and not text:
                    what = 'question' if args.task == 'vqa' else 'caption'
                    error = f'no {what} for {key} (give --{what})'
                if error is not None:
                    rows.append({'path': key, 'error': error})
                else:
                    good.append((key, image, text))
            if good:
                keys, images, texts = zip(*good)
                rows += predictor(list(keys), torch.stack(images).to(device, non_blocking=True), list(texts))
            for row in rows:
                out.write(json.dumps(row) + '\n')
            out.flush()
            counts['written'] += len(rows)
            counts['errors'] += sum('error' in r for r in rows)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    counts['images_per_second'] = round((counts['written'] - counts['errors']) / max(seconds, 1e-9), 2)
    return counts


# ------------------------------------------------------------------------------------------- embed, retrieve

def read_texts(path: str) -> list[str]:
    with open(path, encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip()]


@torch.no_grad()
def embed_texts(model, texts: list[str], batch_size: int, device) -> torch.Tensor:
    feats = [model.text_features(texts[s:s + batch_size]) for s in range(0, len(texts), batch_size)]
    return torch.cat(feats).cpu() if feats else torch.zeros(0, model.text_proj.out_features)


@torch.no_grad()
def embed_images(model, spec: str, image_size: int, args, device, skip: set) -> tuple[list, torch.Tensor, dict]:
    """(keys, ITC embeddings [N, D], {key: error}) of the ``--images`` not in ``skip``."""
    loader, total = make_loader(spec, image_size, args.batch_size, args.num_workers, skip)
    keys, feats, errors = [], [], {}
    bf16 = device.type == 'cuda' and args.amp == 'bf16'
    amp = torch.autocast('cuda', dtype=torch.bfloat16) if bf16 else nullcontext()
    with tqdm(total=total, unit='img', desc='embed', dynamic_ncols=True, file=sys.stderr) as bar:
        for batch in loader:
            good = [(k, im) for k, im, err, _ in batch if err is None]
            errors.update({k: err for k, _, err, _ in batch if err is not None})
            if good:
                with amp:
                    feats.append(model.image_features(torch.stack([im for _, im in good]).to(device)).float().cpu())
                keys += [k for k, _ in good]
            bar.update(len(batch))
    return keys, (torch.cat(feats) if feats else torch.zeros(0, model.vision_proj.out_features)), errors


def load_embeddings(path: str) -> tuple[dict, dict]:
    """(tensors, metadata decoded from JSON) of an ``--task embed`` file."""
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return tensors, meta


def run_embed(args, device) -> dict:
    """ITC embeddings of ``--images`` (and ``--texts``) into ``--output`` (``.safetensors``: ``image_embeds``
    [N, D] with ``image_keys`` in the metadata, ``text_embeds`` with ``texts``). A rerun into the same file keeps
    its embeddings, embeds only the new images and retries the unreadable ones (``errors`` in the metadata)."""
    from safetensors.torch import save_file
    settings = model_settings('embed', args.checkpoint, args.vit, args.image_size, args.med_config)
    model = build_model('embed', args.checkpoint, settings, device)
    old_t, old_m = load_embeddings(args.output) if os.path.exists(args.output) else ({}, {})
    keys, feats = list(old_m.get('image_keys', [])), [old_t['image_embeds']] if 'image_embeds' in old_t else []
    new_keys, new_feats, errors = embed_images(model, args.images, int(settings['image_size']), args, device,
                                               set(keys)) if args.images else ([], None, {})
    keys += new_keys
    feats += [new_feats] if new_feats is not None else []
    tensors = {'image_embeds': torch.cat(feats).contiguous()} if feats else {}
    meta = {'image_keys': keys, 'errors': errors}
    texts = read_texts(args.texts) if args.texts else old_m.get('texts', [])
    if args.texts:
        tensors['text_embeds'] = embed_texts(model, texts, args.batch_size, device).contiguous()
    elif 'text_embeds' in old_t:
        tensors['text_embeds'] = old_t['text_embeds']
    if texts:
        meta['texts'] = texts
    tmp = args.output + '.tmp'
    save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, args.output)
    for key, error in errors.items():
        print(f'error: {key}: {error}', file=sys.stderr)
    return {'images': len(keys), 'new_images': len(new_keys), 'texts': len(texts), 'errors': len(errors)}


def run_retrieve(args, device) -> dict:
    """Top-k images of the ``--embeddings`` set for each ``--texts`` query (``{"query", "results": [{"path",
    "score"}]}``), or, with ``--images`` as queries, the top-k texts of the set (``{"path", "results": [{"text",
    "score"}]}``); scores are ITC cosines. Rows go to ``--output`` (JSON lines; a rerun skips answered queries)."""
    tensors, meta = load_embeddings(args.embeddings)
    settings = model_settings('retrieve', args.checkpoint, args.vit, args.image_size, args.med_config)
    model = build_model('retrieve', args.checkpoint, settings, device)
    done = read_done(args.output)
    rows = []
    if args.texts:
        if 'image_embeds' not in tensors:
            raise SystemExit(f'--embeddings {args.embeddings} holds no image embeddings to retrieve from')
        queries = [q for q in read_texts(args.texts) if q not in done]
        with torch.no_grad():
            sims = embed_texts(model, queries, args.batch_size, device) @ tensors['image_embeds'].float().T
        gallery, field, query_field = meta['image_keys'], 'path', 'query'
    else:
        if 'text_embeds' not in tensors:
            raise SystemExit(f'--embeddings {args.embeddings} holds no text embeddings (embed with --texts)')
        queries, feats, errors = embed_images(model, args.images, int(settings['image_size']), args, device, done)
        rows += [{'path': k, 'error': e} for k, e in errors.items()]
        sims = feats @ tensors['text_embeds'].float().T
        gallery, field, query_field = meta['texts'], 'text', 'path'
    k = min(args.top_k, sims.shape[1])
    scores, index = sims.topk(k, dim=1) if k else (sims[:, :0], sims[:, :0].long())
    for q, s_row, i_row in zip(queries, scores.tolist(), index.tolist()):
        rows.append({query_field: q, 'results': [{field: gallery[i], 'score': s} for i, s in zip(i_row, s_row)]})
    with open(args.output, 'a', encoding='utf-8') as out:
        for row in rows:
            out.write(json.dumps(row) + '\n')
    return {'queries': len(queries), 'done_before': len(done)}


# ------------------------------------------------------------------------------------------------ command line

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--task', choices=sorted(IMAGE_SIZES), required=True)
    parser.add_argument('--checkpoint', required=True, help='path or URL of a BLIP checkpoint')
    parser.add_argument('--image', help='one image: prints one JSON object (caption, vqa, itm)')
    parser.add_argument('--images', help='many images: a folder, a glob, a file list (.txt / .json / .jsonl) or tar '
                                         'shards (.tar files or a glob of them)')
    parser.add_argument('--output', help='--images: the JSON lines file (embed: a .safetensors file); a rerun into it '
                                         'skips what is done')
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--num_workers', type=int, default=4, help='image-decoding worker processes')
    parser.add_argument('--question', default='',
                        help='vqa: the question asked of the image (every image, with --images; a list entry\'s '
                             'own "question" is used when this is empty)')
    parser.add_argument('--caption', default='',
                        help='itm / itc: the text scored against the image (every image, with --images; a list '
                             'entry\'s "caption" or a shard\'s KEY.txt is used when this is empty)')
    parser.add_argument('--texts', help='embed: captions (one per line) to embed too; retrieve: the text queries')
    parser.add_argument('--embeddings', help='retrieve: a .safetensors file written by --task embed')
    parser.add_argument('--top_k', type=int, default=5, help='retrieve: results per query')
    parser.add_argument('--vit', default=None, help="ViT size ('base', 'large'; default: the checkpoint's, else base)")
    parser.add_argument('--image_size', type=int, default=None,
                        help=f"default: the checkpoint's, else {IMAGE_SIZES} by task")
    parser.add_argument('--med_config', default=None,
                        help="MED config json (default: the checkpoint's, else configs/med_config.json)")
    parser.add_argument('--sample', action='store_true', help='caption: nucleus sampling instead of beam search')
    parser.add_argument('--num_captions', type=int, default=1, help='caption: captions per image')
    parser.add_argument('--num_beams', type=int, default=3)
    parser.add_argument('--top_p', type=float, default=0.9)
    parser.add_argument('--max_length', type=int, default=20)
    parser.add_argument('--min_length', type=int, default=5)
    parser.add_argument('--inference', choices=('generate', 'rank'), default='generate', help='vqa with --images')
    parser.add_argument('--answer_list', default='', help='vqa --inference rank: JSON list of candidate answers')
    parser.add_argument('--k_test', type=int, default=128, help='vqa --inference rank: candidates kept')
    parser.add_argument('--amp', choices=('bf16', 'none'), default='bf16', help='GPU precision (the CPU runs fp32)')
    parser.add_argument('--no_cuda_graph', action='store_true', help='caption on a GPU: decode eagerly')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    batch = args.task in ('embed', 'retrieve') or args.images
    if not batch and not args.image:
        parser.error('give --image FILE, or --images DIR|GLOB|LIST|SHARDS with --output')
    if args.image and args.images:
        parser.error('--image and --images exclude each other')
    if args.task in ('embed', 'retrieve') and args.image:
        parser.error(f'--task {args.task} works on --images / --texts, not --image')
    if batch and not args.output:
        parser.error(f'--task {args.task} with --images needs --output')
    if args.image and args.task not in ('caption', 'vqa', 'itm'):
        parser.error(f'--image answers caption, vqa or itm; --task {args.task} needs --images')
    if args.image and args.task == 'vqa' and not args.question:
        parser.error('--task vqa needs --question')
    if args.image and args.task == 'itm' and not args.caption:
        parser.error('--task itm needs --caption')
    if args.task == 'embed' and not (args.images or args.texts):
        parser.error('--task embed needs --images and/or --texts')
    if args.task == 'embed' and not args.output.endswith('.safetensors'):
        parser.error('--task embed writes a .safetensors --output')
    if args.task == 'retrieve' and (not args.embeddings or bool(args.texts) == bool(args.images)):
        parser.error('--task retrieve needs --embeddings and either --texts (text queries) or --images (image queries)')
    if args.task == 'vqa' and args.inference == 'rank' and not args.answer_list:
        parser.error('--inference rank needs --answer_list')
    for flag in ('texts', 'embeddings', 'answer_list'):
        value = getattr(args, flag)
        if value and not os.path.isfile(value):
            parser.error(f'--{flag} {value}: no such file')
    if args.task == 'caption' and not args.sample and args.num_captions > args.num_beams:
        parser.error(f'--num_captions {args.num_captions} beam-search captions need --num_beams >= that (or --sample)')
    if args.batch_size < 1 or args.num_captions < 1:
        parser.error('--batch_size and --num_captions must be at least 1')


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.image:
        result = predict(args.task, args.image, args.checkpoint, args.question, args.caption, args.vit,
                         args.image_size, args.med_config, args.sample, args.device)
    else:
        device = torch.device(args.device if args.device != 'cuda' or torch.cuda.is_available() else 'cpu')
        runner = {'embed': run_embed, 'retrieve': run_retrieve}.get(args.task, run_batches)
        result = runner(args, device)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
