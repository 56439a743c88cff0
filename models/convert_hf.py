"""Convert between Hugging Face transformers' BLIP layout and the original BLIP layout (ours).

transformers ports BLIP as ``BlipForConditionalGeneration`` (captioning), ``BlipForImageTextRetrieval``
(ITM/ITC) and ``BlipForQuestionAnswering`` (VQA). Their text side keeps the original's names
(``text_encoder.*``, ``text_decoder.bert.*``, ``text_decoder.cls.predictions.*``, ``vision_proj``,
``text_proj``, ``itm_head``); only the vision tower is renamed, CLIP style:

=============================================================  ==========================================
HF (``vision_model.``)                                          original (``visual_encoder.``)
=============================================================  ==========================================
``embeddings.class_embedding``           [1, 1, D]              ``cls_token``          [1, 1, D]
``embeddings.position_embedding``        [1, N, D]              ``pos_embed``          [1, N, D]
``embeddings.patch_embedding.{weight,bias}``                    ``patch_embed.proj.{weight,bias}``
``encoder.layers.i.layer_norm1 / layer_norm2``                  ``blocks.i.norm1 / norm2``
``encoder.layers.i.self_attn.qkv``  (q, k, v stacked)           ``blocks.i.attn.qkv`` (same order)
``encoder.layers.i.self_attn.projection``                       ``blocks.i.attn.proj``
``encoder.layers.i.mlp.fc1 / fc2``                              ``blocks.i.mlp.fc1 / fc2``
``post_layernorm``                                              ``norm``
=============================================================  ==========================================

Shapes are equal on both sides, so the conversion is a pure rename plus these explicit gaps:

* ``*.embeddings.position_ids``: a persistent buffer in the original (present in its checkpoints),
  non-persistent in HF. ``hf_to_blip`` rebuilds it as ``arange(max_position_embeddings)``;
  ``blip_to_hf`` drops it.
* LM-head duplicates: the original stores ``cls.predictions.bias`` and ``cls.predictions.decoder.bias``
  (one Parameter) and ``decoder.weight`` (tied to the word embeddings). ``save_pretrained`` may omit the
  tied copies; ``hf_to_blip`` restores whichever is missing from its twin.
* ``embeddings.token_type_embeddings``: neither layout has them (the original drops BERT's, reference
  3.2); a state dict that carries them is refused rather than silently changed.
* Keys HF's classes do not have (momentum encoders ``*_m.*``, queues, ``temp``, a decoder when
  converting to the retrieval class, ...) are dropped by ``blip_to_hf`` per target ``kind``; the
  dropped names are available from ``blip_to_hf_dropped``.

Numerics worth knowing (checked in ``tests/test_parity_hf.py``): the HF hub configs use vision
``layer_norm_eps=1e-5`` while BLIP's ViT uses 1e-6; our models keep the original's 1e-6. HF's text
``label_smoothing`` defaults to 0.0, the original trains with 0.1.

Usage::

    python -m models.convert_hf path/to/hf_folder_or_file out.pth   # writes {'model': state_dict}
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Mapping, Union

import torch

from engine.atomic import atomic_write_with

# (HF substring, original substring), applied in order to vision keys only. ``blip_to_hf`` applies the
# same pairs reversed. Every vision key of either layout matches exactly one prefix rule below.
VISION_SWAPS: list[tuple[str, str]] = [
    ('vision_model.embeddings.class_embedding', 'visual_encoder.cls_token'),
    ('vision_model.embeddings.position_embedding', 'visual_encoder.pos_embed'),
    ('vision_model.embeddings.patch_embedding.', 'visual_encoder.patch_embed.proj.'),
    ('vision_model.post_layernorm.', 'visual_encoder.norm.'),
    ('vision_model.encoder.layers.', 'visual_encoder.blocks.'),
    ('.self_attn.qkv.', '.attn.qkv.'),
    ('.self_attn.projection.', '.attn.proj.'),
    ('.layer_norm1.', '.norm1.'),
    ('.layer_norm2.', '.norm2.'),
]

# Top-level modules of each HF class (original names; the vision tower is ``visual_encoder``).
HF_KINDS: dict[str, tuple[str, ...]] = {
    'caption': ('visual_encoder.', 'text_decoder.'),
    'retrieval': ('visual_encoder.', 'text_encoder.', 'vision_proj.', 'text_proj.', 'itm_head.'),
    'vqa': ('visual_encoder.', 'text_encoder.', 'text_decoder.'),
}
HF_CLASS_KIND = {'BlipForConditionalGeneration': 'caption', 'BlipForImageTextRetrieval': 'retrieval',
                 'BlipForQuestionAnswering': 'vqa'}

_LM = 'text_decoder.cls.predictions.'
_WORD_EMB = 'text_decoder.bert.embeddings.word_embeddings.weight'


def _rename_vision(key: str, swaps: list[tuple[str, str]]) -> str:
    for old, new in swaps:
        key = key.replace(old, new)
    return key


def _check_no_token_types(sd: Mapping[str, torch.Tensor]) -> None:
    bad = [k for k in sd if k.endswith('embeddings.token_type_embeddings.weight')]
    if bad:
        raise ValueError(f'{bad}: BLIP has no token-type embeddings (neither the original nor HF layout); '
                         'convert from a BLIP checkpoint, not a plain BERT one')


def hf_to_blip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``Blip*`` state dict -> original BLIP layout (loads into our models with strict keys).

    Keys already in the original layout pass through unchanged, so the function is idempotent.
    """
    _check_no_token_types(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith('vision_model.'):
            if key.endswith('.position_ids'):  # old HF files persisted this buffer; timm's ViT has none
                continue
            key = _rename_vision(key, VISION_SWAPS)
            if not key.startswith('visual_encoder.'):
                raise KeyError(f'unknown HF vision key {key!r}')
        elif key.startswith(('text_model.', 'visual_projection.', 'text_projection.', 'logit_scale')):
            raise KeyError(f'{key!r}: BlipModel (the deprecated CLIP-style class) has no original-layout '
                           'counterpart; convert a BlipFor* checkpoint')
        out[key] = value
    # the original's persistent position_ids buffer (HF keeps it non-persistent)
    for prefix in ('text_encoder.', 'text_decoder.bert.'):
        pos = f'{prefix}embeddings.position_embeddings.weight'
        if pos in out and f'{prefix}embeddings.position_ids' not in out:
            out[f'{prefix}embeddings.position_ids'] = torch.arange(out[pos].shape[0]).unsqueeze(0)
    # LM head: one bias stored under two names, output weights tied to the word embeddings
    if f'{_LM}bias' in out or f'{_LM}decoder.bias' in out:
        out.setdefault(f'{_LM}bias', out.get(f'{_LM}decoder.bias'))
        out.setdefault(f'{_LM}decoder.bias', out[f'{_LM}bias'])
        if _WORD_EMB in out:
            out.setdefault(f'{_LM}decoder.weight', out[_WORD_EMB])
    return out


def _blip_to_hf_split(state_dict: Mapping[str, torch.Tensor], kind: str):
    kind = HF_CLASS_KIND.get(kind, kind)
    if kind not in HF_KINDS:
        raise ValueError(f"kind must be one of {sorted(HF_KINDS)} or an HF class name, got {kind!r}")
    _check_no_token_types(state_dict)
    keep, dropped = {}, []
    reverse = [(new, old) for old, new in VISION_SWAPS]
    for key, value in state_dict.items():
        if not key.startswith(HF_KINDS[kind]) or key.endswith('embeddings.position_ids'):
            dropped.append(key)  # momentum/queue/temp/other heads; position_ids is non-persistent in HF
            continue
        if key.startswith('visual_encoder.'):
            key = _rename_vision(key, reverse)
        keep[key] = value
    return keep, dropped


def blip_to_hf(state_dict: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Original BLIP layout -> HF layout of ``kind`` ('caption', 'retrieval', 'vqa' or an HF class name).

    Keys the HF class lacks are dropped (see ``blip_to_hf_dropped``).
    """
    return _blip_to_hf_split(state_dict, kind)[0]


def blip_to_hf_dropped(state_dict: Mapping[str, torch.Tensor], kind: str) -> list[str]:
    """The original-layout keys ``blip_to_hf(state_dict, kind)`` leaves out."""
    return _blip_to_hf_split(state_dict, kind)[1]


def read_hf_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Tensors of an HF checkpoint: a ``save_pretrained`` folder (safetensors, sharded or not, or
    ``pytorch_model.bin``) or a single ``.safetensors`` / ``.bin`` file. Pickles load with weights_only."""
    path = Path(path)
    if path.is_dir():
        for name in ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin'):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f'{path}: no model.safetensors(.index.json) or pytorch_model.bin')
    if path.name.endswith('.index.json'):
        with open(path) as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(read_hf_state_dict(path.parent / shard))
        return sd
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        return load_file(str(path))
    from models.checkpoint import torch_load_checked  # its errors name the file (pickled code, truncation)
    sd = torch_load_checked(path)
    return dict(sd.get('model', sd)) if isinstance(sd, Mapping) else sd


def load_hf_blip(model_or_path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Original-layout state dict from an HF BLIP model instance or a checkpoint path (see
    ``read_hf_state_dict``). Load it with ``models.checkpoint.load_state_dict_checked(model, sd)`` or
    save it with the CLI for ``load_checkpoint``.

    Args:
        dtype: cast floating-point tensors (e.g. ``torch.float32`` for fp16 hub files); None keeps them.
    """
    if isinstance(model_or_path, torch.nn.Module):
        sd = model_or_path.state_dict()
    else:
        sd = read_hf_state_dict(model_or_path)
    sd = hf_to_blip(sd)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def hf_config_to_blip_kwargs(config) -> dict:
    """Constructor kwargs for our models from an HF ``BlipConfig`` (object or dict): ``vit``,
    ``image_size`` and ``med_config``. Vision LayerNorm eps stays BLIP's 1e-6 (see module docstring)."""
    cfg = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
    v, t = cfg['vision_config'], cfg['text_config']
    if v.get('intermediate_size', 4 * v['hidden_size']) != 4 * v['hidden_size']:
        raise ValueError('BLIP ViT uses mlp_ratio 4')
    return dict(
        vit={'embed_dim': v['hidden_size'], 'depth': v['num_hidden_layers'],
             'num_heads': v['num_attention_heads'], 'patch_size': v['patch_size']},
        image_size=v['image_size'],
        med_config={'vocab_size': t['vocab_size'], 'hidden_size': t['hidden_size'],
                    'num_hidden_layers': t['num_hidden_layers'], 'num_attention_heads': t['num_attention_heads'],
                    'intermediate_size': t['intermediate_size'],
                    'max_position_embeddings': t['max_position_embeddings'],
                    'layer_norm_eps': t['layer_norm_eps'], 'pad_token_id': t.get('pad_token_id', 0),
                    'encoder_width': v['hidden_size']})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Convert an HF BLIP checkpoint to the original layout '
                                                 "({'model': state_dict} .pth, loadable by load_checkpoint).")
    parser.add_argument('src', help='save_pretrained folder, .safetensors or .bin file')
    parser.add_argument('dst', help='output .pth')
    parser.add_argument('--fp32', action='store_true', help='cast floating-point tensors to float32')
    args = parser.parse_args(argv)
    sd = load_hf_blip(args.src, torch.float32 if args.fp32 else None)
    atomic_write_with(args.dst, lambda f: torch.save({'model': sd}, f))  # never a half-written checkpoint
    print(f'wrote {len(sd)} tensors to {args.dst}')


if __name__ == '__main__':
    main()
