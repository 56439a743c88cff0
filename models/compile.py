"""Opt-in regional ``torch.compile``: each ViT block and each MED layer becomes one compiled call.

Why regional: the repeated units are where the operators are (a MED layer runs ~22 kernels forward, most
of them small elementwise ones: casts, dropout, residual adds, LayerNorm), and eager training steps of
this model are bound by launching them on a GPU host (BENCHMARKS.md). Compiling the unit fuses those
chains and runs the layer as one call, while the Python around it -- queues, hard-negative sampling,
the beam search -- stays eager and cannot cause graph breaks. Instances of one class share their compiled
graphs, so the model compiles a handful of graphs (ViT block, text layer, image-grounded layer, decoder
layer, each with and without gradients), not one per layer.

``Module.compile`` keeps every module and parameter where it was: state-dict keys, checkpoint loading,
the optimizer and DDP see the same model. Decoding runs eagerly even with compiled layers (see
``models.generation``): its cache length changes at every step, which would recompile every step.
"""
from __future__ import annotations

import torch.nn as nn
from timm.models.vision_transformer import Block

from models.med import Layer

COMPILED_UNITS = (Block, Layer)


def compile_layers(model: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` every ViT block and MED layer of ``model`` in place; returns how many.

    ``compile_kwargs`` go to ``torch.compile`` (``backend``, ``mode``, ``dynamic`` ...). Modules shared by two
    layers (the pretraining encoder's cross-attention and FFN are the decoder's) are compiled as part of
    each layer that calls them.
    """
    units = [m for m in model.modules() if isinstance(m, COMPILED_UNITS)]
    for unit in units:
        unit.compile(**compile_kwargs)
    return len(units)
