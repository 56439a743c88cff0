"""Caption, question-answer or image-text match one image from the command line.

    python predict.py --task caption --image demo.jpg --checkpoint model_base_caption_capfilt_large.pth
    python predict.py --task vqa --image demo.jpg --question "where is the woman sitting?" \
        --checkpoint model_base_vqa_capfilt_large.pth
    python predict.py --task itm --image demo.jpg --caption "a woman sitting on the beach" \
        --checkpoint model_base_retrieval_coco.pth

The original's ``predict.py`` (a cog predictor) did the same three tasks; checkpoints are paths or
URLs (downloaded once into torch hub's cache). ``--vit``, ``--image_size`` and ``--med_config`` default to
those of the run that wrote the checkpoint (its ``config`` entry, which this project's scripts save), else to
ViT-B, the task's image size and ``configs/med_config.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Mapping, Optional

import torch
from PIL import Image

from models.checkpoint import read_checkpoint
from transform import create_transforms

IMAGE_SIZES = {'caption': 384, 'vqa': 480, 'itm': 384}


def load_image(path: str, image_size: int, device) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            image = im.convert('RGB')
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SystemExit(f'cannot read image {path}: {e}')
    _, test_transform = create_transforms(image_size)
    return test_transform(image).unsqueeze(0).to(device)


MODEL_KEYS = ('vit', 'image_size', 'med_config')


def checkpoint_settings(checkpoint: str) -> dict:
    """``vit``, ``image_size`` and ``med_config`` of the run that saved ``checkpoint`` (its ``config`` entry;
    the official checkpoints mostly have none): a toy or ViT-L checkpoint then loads without extra flags."""
    config = read_checkpoint(checkpoint).get('config')
    if not isinstance(config, Mapping):
        return {}
    return {k: config[k] for k in MODEL_KEYS if config.get(k) not in (None, '')}


def predict(task: str, image_path: str, checkpoint: str, question: str = '', caption: str = '',
            vit: Optional[str] = None, image_size: Optional[int] = None, med_config: Optional[str] = None,
            sample: bool = False, device: str = 'cpu') -> dict:
    """Run one task on one image and return a JSON-able result.

    ``vit`` / ``image_size`` / ``med_config`` left at None come from the checkpoint's config, else from the
    defaults (ViT-B, ``IMAGE_SIZES[task]``, ``configs/med_config.json``)."""
    given = {k: v for k, v in zip(MODEL_KEYS, (vit, image_size, med_config)) if v is not None}
    saved = {} if len(given) == len(MODEL_KEYS) else checkpoint_settings(checkpoint)
    settings = {'vit': 'base', 'image_size': IMAGE_SIZES[task], 'med_config': 'configs/med_config.json',
                **saved, **given}
    if saved:
        print(f'model settings from the checkpoint\'s config: {saved}', file=sys.stderr)
    image = load_image(image_path, int(settings['image_size']), device)
    common = dict(pretrained=checkpoint, **settings)
    with torch.no_grad():
        if task == 'caption':
            from models.blip import blip_decoder
            model = blip_decoder(**common).to(device).eval()
            text = model.generate(image, sample=sample, num_beams=3, max_length=20, min_length=5)[0]
            return {'caption': text}
        if task == 'vqa':
            from models.blip_vqa import blip_vqa
            model = blip_vqa(**common).to(device).eval()
            answer = model(image, question, train=False, inference='generate')[0]
            return {'question': question, 'answer': answer}
        from models.blip_itm import blip_itm
        model = blip_itm(**common).to(device).eval()
        itm = model(image, caption, match_head='itm').softmax(-1)[0, 1].item()
        itc = model(image, caption, match_head='itc')[0, 0].item()
        return {'caption': caption, 'itm_match_probability': itm, 'itc_cosine': itc}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--task', choices=sorted(IMAGE_SIZES), required=True)
    parser.add_argument('--image', required=True)
    parser.add_argument('--checkpoint', required=True, help='path or URL of a BLIP checkpoint')
    parser.add_argument('--question', default='')
    parser.add_argument('--caption', default='')
    parser.add_argument('--vit', default=None, help="ViT size ('base', 'large'; default: the checkpoint's, else base)")
    parser.add_argument('--image_size', type=int, default=None,
                        help=f"default: the checkpoint's, else {IMAGE_SIZES} by task")
    parser.add_argument('--med_config', default=None,
                        help="MED config json (default: the checkpoint's, else configs/med_config.json)")
    parser.add_argument('--sample', action='store_true', help='nucleus sampling instead of beam search')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    if args.task == 'vqa' and not args.question:
        parser.error('--task vqa needs --question')
    if args.task == 'itm' and not args.caption:
        parser.error('--task itm needs --caption')
    result = predict(args.task, args.image, args.checkpoint, args.question, args.caption, args.vit,
                     args.image_size, args.med_config, args.sample, args.device)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
