"""Captioning every image of a loader with beam search: what caption evaluation and NoCaps submission share."""
from __future__ import annotations

from typing import Optional

import torch

from engine.precision import autocast
from engine.runner import progress


@torch.no_grad()
def generate_captions(model: torch.nn.Module, loader, config, device: torch.device,
                      amp_dtype: Optional[torch.dtype], **generate_kwargs) -> list[dict]:
    """``[{'image_id', 'caption'}]`` for every image of ``loader`` on this rank; ``config`` gives ``num_beams``,
    ``max_length``, ``min_length`` and ``cuda_graph``."""
    model.eval()
    results = []
    for image, image_id in progress(loader, 'caption'):
        with autocast(device, amp_dtype):
            captions = model.generate(image.to(device, non_blocking=True), sample=False, num_beams=config.num_beams,
                                      max_length=config.max_length, min_length=config.min_length,
                                      cuda_graph=config.cuda_graph, **generate_kwargs)
        results += [{'image_id': int(i), 'caption': c} for i, c in zip(image_id, captions)]
    return results
