"""Turn your own ``[{"image", "caption"}]`` pairs into the COCO Karpathy files every caption and retrieval script reads.

    python -m data.own_data my_pairs.json --out output/my_data [--image_root /photos] [--val 50 --test 50]

writes ``output/my_data/images/own_NNNNNN.ext`` (symbolic links to your images: the caption evaluation reads an
image's integer id from its file name, as the original does with COCO's), ``annotation/coco_karpathy_{train,val,
test}.json`` and ``annotation/coco_gt/coco_karpathy_{val,test}_gt.json``. Images, not pairs, are split: every
caption of a held-out image is one of its references. Then the COCO configs train on it with the three roots
overridden (README, "Fine-tune on your own images").
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Optional

from data.loading import AnnotationError, check_entries, load_json_list

SCHEMA = {'image': str, 'caption': str}


def group_pairs(pairs: list[dict], path: str) -> dict[str, list[str]]:
    """image -> its captions, in order of first appearance."""
    check_entries(pairs, SCHEMA, path)
    grouped: dict[str, list[str]] = {}
    for pair in pairs:
        grouped.setdefault(pair['image'], []).append(pair['caption'])
    return grouped


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def coco_gt(names: list[str], captions: dict[str, list[str]]) -> dict:
    """The COCO caption ground truth pycocoevalcap reads; ids are the numbers in the ``own_NNNNNN`` names."""
    images = [{'id': int(Path(n).stem.split('_')[-1]), 'file_name': n} for n in names]
    annotations = []
    for img, name in zip(images, names):
        for caption in captions[name]:
            annotations.append({'image_id': img['id'], 'caption': caption, 'id': len(annotations)})
    return {'info': {'description': 'own data'}, 'licenses': [], 'type': 'captions', 'images': images,
            'annotations': annotations}


def prepare_own_data(pairs_file: str, out: str, image_root: str = '', n_val: Optional[int] = None,
                     n_test: Optional[int] = None, seed: int = 0) -> dict:
    """Write the Karpathy-format files for ``pairs_file`` into ``out`` (see the module docstring).

    Args:
        pairs_file: JSON list (or JSON lines) of ``{"image": path, "caption": text}``; an image may repeat.
        out: output folder.
        image_root: folder relative image paths are relative to (default: the pairs file's folder).
        n_val, n_test: held-out images (default 5% each, at least 1, at most 1000).
        seed: the split's random seed.

    Returns:
        counts of images per split and of training pairs.
    """
    grouped = group_pairs(load_json_list(pairs_file), pairs_file)
    if len(grouped) < 3:
        raise AnnotationError(f'{pairs_file}: {len(grouped)} distinct images; at least 3 are needed (train, val, test)')
    root = Path(image_root or Path(pairs_file).parent).absolute()
    default = min(1000, max(1, len(grouped) // 20))
    n_val, n_test = n_val or default, n_test or default
    if n_val + n_test >= len(grouped):
        raise ValueError(f'{pairs_file}: {len(grouped)} images cannot hold out {n_val} val + {n_test} test images')
    out_dir = Path(out)
    images_dir = out_dir / 'images'
    images_dir.mkdir(parents=True, exist_ok=True)
    names, captions = [], {}
    for k, (image, caps) in enumerate(grouped.items()):
        source = Path(image) if os.path.isabs(image) else root / image
        if not source.is_file():
            raise FileNotFoundError(f'{pairs_file}: image {image} not found (looked at {source}; set --image_root)')
        name = f'own_{k:06d}{source.suffix.lower() or ".jpg"}'
        link = images_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
        names.append(name)
        captions[name] = caps
    order = names[:]
    random.Random(seed).shuffle(order)
    splits = {'val': sorted(order[:n_val]), 'test': sorted(order[n_val:n_val + n_test]),
              'train': sorted(order[n_val + n_test:])}
    ann = out_dir / 'annotation'
    write_json(ann / 'coco_karpathy_train.json', [{'image': n, 'caption': c, 'image_id': Path(n).stem}
                                                  for n in splits['train'] for c in captions[n]])
    for split in ('val', 'test'):
        write_json(ann / f'coco_karpathy_{split}.json', [{'image': n, 'caption': captions[n]} for n in splits[split]])
        write_json(ann / 'coco_gt' / f'coco_karpathy_{split}_gt.json', coco_gt(splits[split], captions))
    return {'train_images': len(splits['train']), 'val_images': n_val, 'test_images': n_test,
            'train_pairs': sum(len(captions[n]) for n in splits['train'])}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('pairs', help='JSON list / JSON lines of {"image", "caption"}')
    parser.add_argument('--out', required=True)
    parser.add_argument('--image_root', default='', help="relative image paths' folder (default: the file's)")
    parser.add_argument('--val', type=int, default=None, help='held-out val images (default 5%%)')
    parser.add_argument('--test', type=int, default=None, help='held-out test images (default 5%%)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = prepare_own_data(args.pairs, args.out, args.image_root, args.val, args.test, args.seed)
    except (AnnotationError, FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e))
    print(json.dumps(counts))
    return counts


if __name__ == '__main__':
    main(sys.argv[1:])
