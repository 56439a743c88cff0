"""Reading BLIP checkpoints safely and loading them into our models with every gap reported.

``load_checkpoint(model, url_or_filename)`` keeps the original's name and ``(model, msg)`` return, but:
  * files are read with ``torch.load(weights_only=True)``: a pickle that would run code is refused;
  * remaps are explicit pure functions (pos-embed resize here, model-specific ones through a
    ``remap_checkpoint(state_dict)`` method on the model, e.g. the NLVR2 twin expansion);
  * keys the model does not use are dropped *and reported*; a shape mismatch is an error naming the
    key and both shapes (the original silently deleted such keys);
  * weights holding NaN or inf are refused, naming the keys (a NaN in one attention projection still gave a
    plausible caption on the CPU); ``BLIP_ALLOW_NONFINITE_WEIGHTS=1`` loads them anyway, for forensics.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple
from urllib.parse import urlparse

import torch
import torch.nn as nn

from models.hf_layout import hf_to_blip
from models.vit import interpolate_pos_embed


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


ALLOW_NONFINITE_ENV = 'BLIP_ALLOW_NONFINITE_WEIGHTS'


def nonfinite_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or inf."""
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())]


def check_finite_state_dict(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights that are not finite, naming the file and the keys, unless ``BLIP_ALLOW_NONFINITE_WEIGHTS=1``."""
    bad = nonfinite_keys(state_dict)
    if not bad:
        return
    shown = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
    if os.environ.get(ALLOW_NONFINITE_ENV, '') not in ('', '0'):
        print(f'warning: {source}: {len(bad)} tensor(s) hold NaN/inf ({shown}); loaded anyway ({ALLOW_NONFINITE_ENV})')
        return
    raise CheckpointError(f'{source}: {len(bad)} tensor(s) hold NaN or inf values: {shown}. The weights are '
                          f'broken (a diverged run?); use an earlier checkpoint. To load them anyway for '
                          f'inspection set {ALLOW_NONFINITE_ENV}=1')


class LoadResult(NamedTuple):
    """What ``load_checkpoint`` did: keys the model kept random, and keys of the file it dropped."""
    missing_keys: list
    unexpected_keys: list


def is_url(url_or_filename: str) -> bool:
    return urlparse(str(url_or_filename)).scheme in ('http', 'https')


def download_cached_file(url: str, progress: bool = True) -> str:
    """Download ``url`` once into torch hub's checkpoint cache and return the local path."""
    cache_dir = Path(torch.hub.get_dir()) / 'checkpoints'
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / os.path.basename(urlparse(url).path)
    if not target.exists():
        print(f'downloading {url} to {target}')
        try:
            torch.hub.download_url_to_file(url, str(target), progress=progress)  # writes a temp file, then moves
        except Exception as e:  # network errors come in many types; name the URL either way
            raise CheckpointError(f'could not download checkpoint {url}: {e}') from e
    return str(target)


def resolve_checkpoint_path(url_or_filename: str | os.PathLike) -> str:
    url_or_filename = os.fspath(url_or_filename)
    if is_url(url_or_filename):
        return download_cached_file(url_or_filename)
    path = url_or_filename.removeprefix('file://')
    if os.path.isdir(path) or path.endswith('.safetensors'):
        return path  # an HF ``save_pretrained`` folder or safetensors file
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint url or path is invalid: {url_or_filename!r} (no such file)')
    return path


def read_checkpoint(url_or_filename: str) -> dict:
    """Load a checkpoint file or URL with ``weights_only=True`` and return its dict."""
    path = resolve_checkpoint_path(url_or_filename)
    if os.path.isfile(os.path.join(path, '.metadata')):  # torch.distributed.checkpoint's directory layout
        raise CheckpointError(f'{path}: a sharded training checkpoint (checkpoint_format: sharded); '
                              f'`python -m engine.convert_checkpoint {path} OUT.pth` writes the one-file checkpoint '
                              f'to load here (training scripts --resume from the directory itself)')
    if os.path.isdir(path) or path.endswith('.safetensors'):
        try:  # HF transformers' BLIP files
            return {'model': read_hf_state_dict(path)}
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own error types, a bad index file, a missing shard
            raise CheckpointError(f'{path}: not a readable HF checkpoint ({type(e).__name__}: {e})') from None
    checkpoint = torch_load_checked(path)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{path}: expected a dict, got {type(checkpoint).__name__}')
    return dict(checkpoint)


def torch_load_checked(path: str | os.PathLike):
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file and say what is wrong
    with it (empty, truncated, foreign, or pickled objects that would run code)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f'{path}: the file is empty (0 bytes; a copy or download that did not finish?)')
    if not _looks_like_torch_save(path):
        raise CheckpointError(f'{path}: not a PyTorch checkpoint ({size} bytes, neither the zip archive that '
                              f'torch.save writes nor a legacy pickle): a wrong or damaged file?')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        offending = re.search(r'GLOBAL ([\w.]+)', str(e))
        if offending is None:  # not a disallowed class: a damaged pickle
            raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({size} bytes; its pickle is '
                                  f'damaged: {_weights_unpickler_reason(e)})') from None
        raise CheckpointError(
            f'{path}: refused to load: the file holds pickled Python objects ({offending.group(1)}) that would run '
            f'code when loaded. Only tensors, numbers, strings and containers of them are read; re-save a '
            f'file you trust as a plain dict of tensors.') from None
    except Exception as e:  # torch's own traceback adds nothing to the file name and its message
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({size} bytes; torch.load: '
                              f'{type(e).__name__}: {e}); truncated, or not a torch.save file?') from None
    return checkpoint


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
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
    sd = torch_load_checked(path)  # its errors name the file (pickled code, truncation)
    return dict(sd.get('model', sd)) if isinstance(sd, Mapping) else sd


def _looks_like_torch_save(path: str) -> bool:
    """torch.save's zip archive (perhaps truncated), or a legacy (pre-1.6) file: a pickle protocol byte first."""
    with open(path, 'rb') as f:
        head = f.read(4)
    return head == b'PK\x03\x04' or head[:1] == b'\x80'


def _weights_unpickler_reason(error: Exception) -> str:
    """The unpickler's own reason, without torch's advice to load with weights_only=False."""
    text = str(error)
    found = re.search(r'WeightsUnpickler error:\s*(.+?)(?:\n\n|$)', text, re.S)
    return ' '.join((found.group(1) if found else text.splitlines()[-1]).split())


def extract_state_dict(checkpoint: Mapping[str, Any], source: str = '') -> dict[str, torch.Tensor]:
    """``checkpoint['model']`` (our and the original's layout), else the dict itself; HF layouts converted."""
    state_dict = checkpoint.get('model', checkpoint)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: checkpoint['model'] is a {type(state_dict).__name__}, not a state dict")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f'{source}: checkpoint has no state dict of tensors (non-tensor keys {bad[:5]})')
    if any(k.startswith(('vision_model.', 'text_encoder.encoder.layer.0.crossattention.self.query')) for k in state_dict) \
            and not any(k.startswith('visual_encoder.') for k in state_dict):
        state_dict = hf_to_blip(state_dict)  # HF transformers' Blip* layout
    return dict(state_dict)


def resize_pos_embeds(state_dict: dict, model: nn.Module) -> dict:
    """Interpolate ``visual_encoder(_m).pos_embed`` to the model's image size (bicubic, CLS kept)."""
    state_dict = dict(state_dict)
    for name in ('visual_encoder', 'visual_encoder_m'):
        key = f'{name}.pos_embed'
        if key in state_dict and hasattr(model, name):
            state_dict[key] = interpolate_pos_embed(state_dict[key], getattr(model, name))
    return state_dict


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = '',
                            verbose: bool = True, fresh: frozenset = frozenset()) -> LoadResult:
    """Load with every difference accounted for: unused keys dropped and reported, bad shapes an error,
    non-finite weights refused. ``fresh``: keys the model initialises itself when the file lacks them (a new
    task head, VQA's decoder cross-attention K/V of a ViT-L pretrain file); they are reported apart from the
    missing ones, so the log's count of missing keys is the one a refusal then names."""
    own = model.state_dict()
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        shown = mismatched[:8] + ([f'... and {len(mismatched) - 8} more'] if len(mismatched) > 8 else [])
        raise CheckpointError(f'{source}: shape mismatch for {len(mismatched)} key(s) (a model of another size '
                              f"than the checkpoint's: check vit, image_size and med_config):\n  "
                              + '\n  '.join(shown))
    kept = {k: v for k, v in state_dict.items() if k in own}
    check_finite_state_dict(kept, source)
    result = model.load_state_dict(kept, strict=False)
    missing = sorted(result.missing_keys)
    lacking = [k for k in missing if k not in fresh]
    if verbose:
        print(f'load checkpoint from {source}: {len(kept)} keys loaded, {len(unexpected)} unused keys dropped'
              + (f' (e.g. {unexpected[:3]})' if unexpected else '')
              + f', {len(lacking)} missing' + (f' (e.g. {lacking[:3]})' if lacking else '')
              + (f', {len(missing) - len(lacking)} key(s) this model initialises afresh when absent'
                 if len(missing) > len(lacking) else ''))
    return LoadResult(missing, unexpected)


def load_checkpoint(model: nn.Module, url_or_filename: str, verbose: bool = True,
                    fresh: frozenset = frozenset()) -> tuple[nn.Module, LoadResult]:
    """Load an official BLIP (or our, or HF-format) checkpoint into ``model``.

    Returns:
        (model, msg) where ``msg.missing_keys`` lists parameters left at their initial values and
        ``msg.unexpected_keys`` lists checkpoint keys the model does not use (dropped).
    """
    state_dict = extract_state_dict(read_checkpoint(url_or_filename), str(url_or_filename))
    state_dict = resize_pos_embeds(state_dict, model)
    if hasattr(model, 'remap_checkpoint'):
        state_dict = model.remap_checkpoint(state_dict)
    return model, load_state_dict_checked(model, state_dict, str(url_or_filename), verbose, frozenset(fresh))

