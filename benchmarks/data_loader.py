"""Images per second per CPU core of the pretraining and fine-tuning image pipelines on real-size JPEGs.

Writes ``--images`` photo-like JPEGs (quality 90, smooth gradients + shapes + sensor-like noise, so they compress
like photographs) of each size into webdataset tar shards, then measures:

* ``transform``: decode + transform in this process, one thread (the per-core cost with nothing around it);
* ``loader``: the real dataset (:class:`data.shards.ShardStream`) through a DataLoader with ``--workers`` worker
  processes (tar reading, shuffle buffer, decode, augmentation, collate, pinned memory when CUDA is there), rate
  over all workers divided by the workers;
* ``gpu_decode`` (``--gpu``, CUDA only): ``torchvision.io.decode_jpeg`` on the device for a batch, then the
  crop / resize on the device (no RandomAugment: the PIL ops have no GPU version here), for comparison.

Pipelines: ``pretrain`` = RandomResizedCrop(224, scale 0.2-1) + flip + RandomAugment; ``finetune`` = the same at
384 with scale 0.5-1. ``original`` = PIL full decode -> float normalised in the worker (the original's
``create_transforms``); ``fast`` = ``transform.fast`` (JPEG DCT-scaled decoding where the crop allows, uint8 out,
normalisation on the device, not counted here).

    python benchmarks/data_loader.py --workers 1 2 --json bench_results/data_loader_cpu.jsonl
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.shards import Shard, ShardCollate, ShardStream, shard_count  # noqa: E402
from transform import create_transforms  # noqa: E402
from transform.fast import create_fast_train_transform  # noqa: E402

PIPELINES = {'pretrain': (224, 0.2), 'finetune': (384, 0.5)}


def photo_jpeg(width: int, height: int, rng: np.random.Generator) -> bytes:
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    a, b, c = rng.uniform(0.3, 1.0, 3)
    base = np.stack([a * 200 * x + 30 + 20 * y, b * 180 * y + 40 + 10 * x, c * 90 * (x + y) + 20], axis=2)
    base = base + rng.normal(0, 12, base.shape)   # texture: photographs do not compress like flat colour
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(20, width / 4)
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    image.save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def write_shards(folder: Path, width: int, height: int, n: int, per_shard: int = 256) -> list[str]:
    import webdataset as wds

    rng = np.random.default_rng(width)
    urls = []
    for number, start in enumerate(range(0, n, per_shard)):
        path = folder / f'{width}x{height}-{number:05d}.tar'
        with open(path, 'wb') as f:
            writer = wds.TarWriter(f, encoder=False)
            for k in range(min(per_shard, n - start)):
                writer.write({'__key__': f'{number:05d}{k:04d}', 'jpg': photo_jpeg(width, height, rng),
                              'txt': b'a photograph of some shapes'})
            writer.close()
        urls.append(str(path))
    return urls


def transform_for(pipeline: str, impl: str):
    size, min_scale = PIPELINES[pipeline]
    return create_fast_train_transform(size, min_scale) if impl == 'fast' else create_transforms(size, min_scale)[0]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader's workers once joined): on a shared host
    images per CPU-second is the per-core rate, where wall-clock rates depend on the neighbours."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_transform(urls: list[str], pipeline: str, impl: str, n: int) -> tuple[float, float]:
    """decode + transform of ``n`` images in this process (one thread): (images/s, images per CPU-second)."""
    from data.shards import iter_tar_samples

    blobs = [s['jpg'] for u in urls for s in iter_tar_samples(u)][:n]
    transform = transform_for(pipeline, impl)
    torch.manual_seed(0)
    np.random.seed(0)
    for data in blobs[:8]:   # warm-up
        transform(Image.open(io.BytesIO(data)) if impl == 'fast' else Image.open(io.BytesIO(data)).convert('RGB'))
    start, cpu = time.perf_counter(), cpu_seconds()
    for data in blobs:
        image = Image.open(io.BytesIO(data))
        transform(image if impl == 'fast' else image.convert('RGB'))
    return len(blobs) / (time.perf_counter() - start), len(blobs) / (cpu_seconds() - cpu)


def time_loader(urls: list[str], pipeline: str, impl: str, workers: int, batch: int) -> tuple[float, float]:
    """The real ShardStream through a DataLoader with ``workers`` processes: images/s over the epoch after the
    first batch of every worker, and images per CPU-second of the main process and the workers over the whole
    epoch (worker start-up included)."""
    shards = [Shard(u, shard_count(u)) for u in urls]
    stream = ShardStream(shards, transform_for(pipeline, impl), batch, seed=0, shuffle_buffer=256)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers, drop_last=True,
                                         collate_fn=ShardCollate(), pin_memory=torch.cuda.is_available(),
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    stream.start_at_step(0, max(1, workers))
    cpu = cpu_seconds()
    it = iter(loader)
    warm = max(1, workers)
    for _ in range(warm):
        next(it)
    start, images = time.perf_counter(), 0
    for _, batch_data in zip(range(stream.steps - warm), it):
        images += batch_data[0].shape[0]
    wall = time.perf_counter() - start
    del it   # joins the workers, whose CPU time then counts in RUSAGE_CHILDREN
    return images / wall, (images + warm * batch) / (cpu_seconds() - cpu)


def time_gpu_decode(urls: list[str], pipeline: str, batch: int) -> float:
    """nvJPEG decoding of a batch on the device + crop/resize there (no RandomAugment): images/s."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    from data.shards import iter_tar_samples

    size, min_scale = PIPELINES[pipeline]
    blobs = [torch.frombuffer(bytearray(s['jpg']), dtype=torch.uint8) for u in urls for s in iter_tar_samples(u)]
    crop = v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True)
    flip = v2.RandomHorizontalFlip()

    def run(chunk):
        images = decode_jpeg(chunk, device='cuda')
        return torch.stack([flip(crop(im)) for im in images])

    run(blobs[:batch])
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    for i in range(0, len(blobs) - batch + 1, batch):
        run(blobs[i:i + batch])
        n += batch
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=512, help='JPEGs of each size')
    p.add_argument('--workers', type=int, nargs='+', default=[1, 2])
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--sizes', nargs='+', default=['640x480', '1024x768'])
    p.add_argument('--gpu', action='store_true', help='also time torchvision.io.decode_jpeg on CUDA')
    p.add_argument('--json', default='', help='append the records to this JSON-lines file')
    args = p.parse_args()
    torch.set_num_threads(1)
    env = {'host': platform.node(), 'cpus': os.cpu_count(), 'torch': torch.__version__,
           'pillow': Image.__version__, 'date': time.strftime('%Y-%m-%d')}
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            width, height = map(int, size.split('x'))
            urls = write_shards(Path(tmp), width, height, args.images)
            for pipeline in PIPELINES:
                for impl in ('original', 'fast'):
                    rate, per_cpu = time_transform(urls, pipeline, impl, min(args.images, 256))
                    records.append({'jpeg': size, 'pipeline': pipeline, 'impl': impl, 'what': 'transform',
                                    'workers': 1, 'img_per_s': round(rate, 1), 'img_per_cpu_s': round(per_cpu, 1)})
                    print(json.dumps(records[-1]), flush=True)
                    for workers in args.workers:
                        rate, per_cpu = time_loader(urls, pipeline, impl, workers, args.batch)
                        records.append({'jpeg': size, 'pipeline': pipeline, 'impl': impl, 'what': 'loader',
                                        'workers': workers, 'img_per_s': round(rate, 1),
                                        'img_per_s_per_worker': round(rate / max(1, workers), 1),
                                        'img_per_cpu_s': round(per_cpu, 1)})
                        print(json.dumps(records[-1]), flush=True)
                if args.gpu and torch.cuda.is_available():
                    rate = time_gpu_decode(urls, pipeline, args.batch)
                    records.append({'jpeg': size, 'pipeline': pipeline, 'impl': 'gpu_decode', 'what': 'device',
                                    'workers': 0, 'img_per_s': round(rate, 1)})
                    print(json.dumps(records[-1]), flush=True)
    if args.json:
        with open(args.json, 'a') as f:
            for r in records:
                f.write(json.dumps({**env, **r}) + '\n')


if __name__ == '__main__':
    main()
