"""A checkpoint made ready for export: its task, its model sizes read off the tensors, our model built and
loaded with every needed key present (a missing key is a refusal naming it).

Shared by the transformers export (``models.convert_hf --to-hf``) and the ONNX export (``models.export_onnx``).
Sizes come from the tensors themselves (widths, depths, patch and image size, vocabulary, positions); the
head counts cannot be read off a tensor, so they come from the checkpoint's ``config`` entry (which this
project's training scripts save: ``vit`` and ``med_config``) or default to 64-wide heads, which holds for
BLIP's ViT-B/ViT-L and BERT-base.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from models.checkpoint import CheckpointError, extract_state_dict, load_state_dict_checked, read_checkpoint
from models.hf_layout import hf_config_to_blip_kwargs

# Tasks and the top-level modules the model of each task needs (original layout).
TASK_MODULES: dict[str, tuple[str, ...]] = {
    'caption': ('visual_encoder.', 'text_decoder.'),
    'retrieval': ('visual_encoder.', 'text_encoder.', 'vision_proj.', 'text_proj.', 'itm_head.'),
    'vqa': ('visual_encoder.', 'text_encoder.', 'text_decoder.'),
    'feature': ('visual_encoder.', 'text_encoder.'),
}
HEAD_DIM = 64  # BLIP's ViT-B/L and BERT-base heads


class ExportError(CheckpointError):
    """A checkpoint that cannot be exported as asked (missing keys, unknown task, no matching class)."""


def _has(sd: Mapping, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def infer_task(state_dict: Mapping[str, torch.Tensor], source: str = '') -> str:
    """'caption', 'retrieval' or 'vqa' from the modules the checkpoint holds; ambiguous ones are refused."""
    if any('.crossattention.self0.' in k for k in state_dict):
        raise ExportError(f'{source}: an NLVR2 checkpoint (twin cross-attention) has no transformers class')
    dec, enc, itm = (_has(state_dict, p) for p in ('text_decoder.', 'text_encoder.', 'itm_head.'))
    if dec and itm:
        raise ExportError(f'{source}: the checkpoint holds a decoder and the ITM head (a pretraining checkpoint?); '
                          'say which model to export with --task caption|retrieval|vqa')
    if dec:
        return 'vqa' if enc else 'caption'
    if itm:
        return 'retrieval'
    raise ExportError(f'{source}: cannot tell the task: no text_decoder.* (caption, vqa) and no itm_head.* '
                      '(retrieval) keys')


def _count(state_dict: Mapping, pattern: str) -> int:
    found = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _saved_vit_heads(config: Mapping) -> Optional[int]:
    vit = config.get('vit')
    if isinstance(vit, Mapping):
        return vit.get('num_heads')
    if isinstance(vit, str):
        from models.vit import VIT_PRESETS
        return VIT_PRESETS.get(vit, {}).get('num_heads')
    return None


def _saved_med_config(config: Mapping) -> dict:
    med = config.get('med_config')
    if isinstance(med, Mapping):
        return dict(med)
    if isinstance(med, str):
        from models.blip import REPO_ROOT
        for path in (Path(med), REPO_ROOT / med):
            if path.is_file():
                with open(path) as f:
                    return json.load(f)
    return {}


def _default_heads(width: int, what: str, flag: str, source: str) -> int:
    if width % HEAD_DIM:
        raise ExportError(f'{source}: cannot tell the number of {what} attention heads (width {width}, no config entry '
                          f'saying it, not a multiple of {HEAD_DIM}); pass {flag}')
    return width // HEAD_DIM


def model_sizes(state_dict: Mapping[str, torch.Tensor], config: Optional[Mapping] = None,
                text_prefix: Optional[str] = None, heads: Optional[tuple] = None, source: str = '') -> dict[str, Any]:
    """Constructor kwargs ``vit``, ``image_size``, ``med_config`` (and ``embed_dim``) for the checkpoint's sizes.

    ``heads``: (vision, text) head counts overriding the config entry / the 64-wide default (None: not given)."""
    config = config or {}
    vit_heads, text_heads = heads or (None, None)
    cls = state_dict['visual_encoder.cls_token']
    width = cls.shape[-1]
    patch = state_dict['visual_encoder.patch_embed.proj.weight'].shape[-1]
    grid = math.isqrt(state_dict['visual_encoder.pos_embed'].shape[1] - 1)
    vit = {'embed_dim': width, 'depth': _count(state_dict, r'visual_encoder\.blocks\.(\d+)\.'),
           'num_heads': vit_heads or _saved_vit_heads(config) or _default_heads(width, 'vision', '--vit-heads', source),
           'patch_size': patch}
    if text_prefix is None:
        text_prefix = 'text_decoder.bert.' if _has(state_dict, 'text_decoder.') else 'text_encoder.'
    saved = _saved_med_config(config)
    words = state_dict[f'{text_prefix}embeddings.word_embeddings.weight']
    hidden = words.shape[1]
    med = {'vocab_size': words.shape[0], 'hidden_size': hidden,
           'num_hidden_layers': _count(state_dict, rf'{re.escape(text_prefix)}encoder\.layer\.(\d+)\.'),
           'num_attention_heads': text_heads or saved.get('num_attention_heads')
           or _default_heads(hidden, 'text', '--text-heads', source),
           'intermediate_size': state_dict[f'{text_prefix}encoder.layer.0.intermediate.dense.weight'].shape[0],
           'max_position_embeddings': state_dict[f'{text_prefix}embeddings.position_embeddings.weight'].shape[0],
           'layer_norm_eps': saved.get('layer_norm_eps', 1e-12), 'pad_token_id': saved.get('pad_token_id', 0),
           'encoder_width': width}
    sizes = {'vit': vit, 'image_size': grid * patch, 'med_config': med}
    if 'vision_proj.weight' in state_dict:
        sizes['embed_dim'] = state_dict['vision_proj.weight'].shape[0]
    return sizes


def _task_class(task: str, projections: bool):
    if task == 'caption':
        from models.blip import BLIP_Decoder
        return BLIP_Decoder, {}
    if task in ('retrieval', 'itm') or (task == 'feature' and projections):
        from models.blip_itm import BLIP_ITM
        return BLIP_ITM, {}
    if task == 'vqa':
        from models.blip_vqa import BLIP_VQA
        return BLIP_VQA, {}
    if task == 'feature':
        from models.blip import BLIP_Base
        return BLIP_Base, {}
    raise ExportError(f'unknown task {task!r}')


def read_for_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(original-layout state dict, the checkpoint's ``config`` entry or {}) of a .pth file or an HF folder."""
    checkpoint = read_checkpoint(os.fspath(path))
    config = checkpoint.get('config')
    config = dict(config) if isinstance(config, Mapping) else {}
    hf_config = Path(path) / 'config.json'
    if not config and hf_config.is_file():  # an HF folder: its config.json says the head counts
        with open(hf_config) as f:
            config = hf_config_to_blip_kwargs(json.load(f))
    return extract_state_dict(checkpoint, os.fspath(path)), config


def build_loaded(task: str, state_dict: Mapping[str, torch.Tensor], config: Optional[Mapping] = None,
                 source: str = '', heads: Optional[tuple] = None) -> tuple[nn.Module, dict]:
    """Our model of ``task`` at the checkpoint's sizes with its weights (dtype kept), in eval mode.

    Raises:
        ExportError: the checkpoint lacks keys the model needs (named), or a module of the task entirely.
    """
    task_key = 'retrieval' if task == 'itm' else task
    lacking = [p.rstrip('.') for p in TASK_MODULES[task_key] if not _has(state_dict, p)]
    if lacking:
        raise ExportError(f'{source}: cannot export task {task!r}: the checkpoint has no {", ".join(lacking)} '
                          f'weights (keys {", ".join(p + ".*" for p in lacking)})')
    text_prefix = 'text_encoder.' if task in ('retrieval', 'itm', 'feature', 'vqa') else 'text_decoder.bert.'
    sizes = model_sizes(state_dict, config, text_prefix, heads, source)
    cls, extra = _task_class(task, 'vision_proj.weight' in state_dict)
    kwargs = {k: v for k, v in sizes.items() if k != 'embed_dim' or cls.__name__ == 'BLIP_ITM'}
    model = cls(**kwargs, **extra)
    dtype = state_dict['visual_encoder.cls_token'].dtype
    model = model.to(dtype).eval()
    with torch.no_grad():
        result = load_state_dict_checked(model, state_dict, source, verbose=False)
    if result.missing_keys:
        shown = result.missing_keys[:20]
        more = f' ... and {len(result.missing_keys) - 20} more' if len(result.missing_keys) > 20 else ''
        raise ExportError(f'{source}: refusing to export task {task!r}: the checkpoint lacks '
                          f'{len(result.missing_keys)} key(s) the model needs: {", ".join(shown)}{more}')
    return model, sizes


def write_folder(out_dir: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """``write(tmp)`` into a sibling folder, then move it to ``out_dir``: no half-written export is left."""
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f'{out_dir}: exists and is not empty (choose another folder or pass --overwrite)')
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
