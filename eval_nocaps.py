"""Caption NoCaps val and test images for the official evaluation server.

    torchrun --nproc_per_node=8 eval_nocaps.py --config configs/nocaps.yaml --output_dir output/nocaps
    python eval_nocaps.py --config configs/toy/nocaps.yaml --output_dir output/toy_nocaps
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from engine.captioning import generate_captions
from engine.config import VisionConfig
from engine.cuda_graph import decoding_note
from engine.results import save_result
from engine.runner import Run
from models.blip import blip_decoder


@dataclass
class NoCapsConfig(VisionConfig):
    image_root: str = ''
    ann_root: str = ''
    pretrained: str = ''
    batch_size: int = 32
    max_length: int = 20
    min_length: int = 5
    num_beams: int = 3
    prompt: str = 'a picture of '
    # not an original key: replay each decode step as one CUDA graph (same captions); empty = on with a GPU
    cuda_graph: Optional[bool] = None


def main(argv: Optional[list[str]] = None) -> dict:
    run = Run.start(argv, NoCapsConfig, description=__doc__, trains=False)
    config = run.config
    if run.is_main:
        print(decoding_note(config.cuda_graph, run.device))
    val_set, test_set = run.datasets('nocaps')
    val_loader, test_loader = run.loaders([val_set, test_set], [False, False], [config.batch_size] * 2)
    model = blip_decoder(pretrained=config.pretrained, prompt=config.prompt, **config.model_kwargs())
    model = model.to(run.device).eval()
    paths = {}
    for split, loader in (('val', val_loader), ('test', test_loader)):
        # NoCaps uses a repetition penalty of 1.1 (original eval_nocaps.py)
        results = generate_captions(model, loader, config, run.device, run.amp_dtype, repetition_penalty=1.1)
        paths[split] = str(save_result(results, run.result_dir, split, remove_duplicate='image_id'))
    run.log({'result_files': paths}, 'evaluate.txt')
    run.finish()
    return paths


if __name__ == '__main__':
    from engine.errors import run_script
    run_script(main, sys.argv[1:])  # a user error: one message, exit 2/1 (traceback with --debug)
