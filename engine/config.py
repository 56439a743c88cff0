"""YAML configs: the original files unchanged, typed by a dataclass per script.

``load_config(path, Schema, options)`` reads the YAML, applies ``--options key=value`` overrides
(dotted keys reach into mappings, e.g. ``vit.drop_path_rate=0.1``), and builds ``Schema``. A key
the schema does not know is an error naming the key and the file, so a typo never silently falls
back to a default. The resolved config is written to ``output_dir/config.yaml``.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import io
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from ruamel.yaml import YAML

from engine.atomic import atomic_write_text

__all__ = ['CommonConfig', 'ConfigError', 'UsageError', 'add_common_args', 'load_config', 'refuse_unused_flags',
           'save_config', 'str2bool']


class ConfigError(ValueError):
    """A config file or override that cannot be used as written."""


@dataclass
class CommonConfig:
    """Keys every script accepts on top of its own (none of them is in the original YAMLs).

    ``amp``: '' picks bf16 on CUDA and none on the CPU; ``accum_steps``: micro-batches per optimizer
    step; ``clip_grad``: max grad norm (0 = off, the original); ``save_every_steps``: mid-epoch
    checkpoints for ``--resume`` (0 = epoch ends only); ``compile``: ``torch.compile`` each ViT block and MED
    layer (``models.compile``; decoding stays eager); ``parallel``: ``ddp`` (every rank holds the whole model) or
    ``fsdp`` (FSDP2: weights, gradients and AdamW moments sharded over the ranks, ``engine.parallel``);
    ``med_grad_ckpt``: activation checkpointing of every MED layer (the ViT's is the original ``vit_grad_ckpt``);
    ``checkpoint_format``: resume points (``checkpoint_last``) as one file (``full``) or as a
    torch.distributed.checkpoint directory every rank writes its shards into (``sharded``, ``engine.sharded_checkpoint``).
    """
    med_config: str = 'configs/med_config.json'
    toy_root: str = ''
    amp: str = ''
    accum_steps: int = 1
    clip_grad: float = 0.0
    num_workers: int = 4
    log_every: int = 50
    save_every_steps: int = 0
    skip_bad_samples: bool = False
    compile: bool = False
    parallel: str = 'ddp'
    med_grad_ckpt: bool = False
    checkpoint_format: str = 'full'

    # Mapping-style access: the data factories read configs as the original's dicts.
    def __contains__(self, key: str) -> bool:
        return key in self._names()

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self._names() else default

    def keys(self) -> list[str]:
        return list(self._names())

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def _names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


@dataclass
class VisionConfig(CommonConfig):
    """The image encoder's keys, as the original YAMLs name them, shared by every script that builds a model."""
    vit: object = 'base'
    vit_grad_ckpt: bool = False
    vit_ckpt_layer: int = 0
    image_size: int = 384

    def model_kwargs(self) -> dict:
        """What every model factory takes from the config: ViT size and checkpointing, image size, MED config."""
        return dict(image_size=self.image_size, vit=self.vit, vit_grad_ckpt=self.vit_grad_ckpt,
                    vit_ckpt_layer=self.vit_ckpt_layer, med_config=self.med_config)


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ('true', '1', 'yes'):
        return True
    if value.lower() in ('false', '0', 'no'):
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean, got {value!r}')


def add_common_args(parser: argparse.ArgumentParser, trains: bool = True,
                    evaluates: bool = True) -> argparse.ArgumentParser:
    """The original scripts' flags, plus ``--options`` overrides, ``--resume``, ``--overwrite`` and ``--debug``.

    ``trains=False`` (evaluation-only scripts): ``--resume``/``--overwrite`` are left out of ``--help`` and
    refused when given (``refuse_unused_flags``); ``evaluates=False`` (pretraining): the same for ``--evaluate``."""
    hidden = argparse.SUPPRESS
    parser.add_argument('--config', required=True, help='YAML config (the original files work unchanged)')
    parser.add_argument('--output_dir', default='output', help='checkpoints, logs, results and config.yaml')
    parser.add_argument('--evaluate', action='store_true',
                        help='evaluate only: no training, no checkpoint written' if evaluates and trains else hidden)
    parser.add_argument('--device', default='cuda', help="'cuda' (falls back to the CPU when absent) or 'cpu'")
    parser.add_argument('--seed', default=42, type=int,
                        help='seed of the training order, augmentation and initialisation (default 42); each rank '
                             'adds its rank')
    parser.add_argument('--world_size', default=1, type=int, help='number of processes (set by the launcher)')
    parser.add_argument('--dist_url', default='env://', help='process-group rendezvous')
    parser.add_argument('--distributed', default=True, type=str2bool, metavar='BOOL',
                        help='join a process group when started by torchrun/srun (default true); false runs '
                             'every launched process alone')
    parser.add_argument('--options', nargs='*', default=[], metavar='KEY=VALUE',
                        help='override config keys, e.g. batch_size=16 vit.drop_path_rate=0.1')
    parser.add_argument('--resume', default='', metavar='auto|PATH',
                        help="continue a run: 'auto' = the latest checkpoint in --output_dir, or a file"
                        if trains else hidden)
    parser.add_argument('--overwrite', action='store_true',
                        help='train into an --output_dir that holds checkpoints of an earlier run, replacing them'
                        if trains else hidden)
    parser.add_argument('--debug', action='store_true',
                        help='on an error, print the traceback too (also: environment variable BLIP_DEBUG=1)')
    return parser


class UsageError(ConfigError):
    """A command-line flag this script cannot honour (exit status 2, as argparse's own errors)."""


def refuse_unused_flags(args: argparse.Namespace, script: str, trains: bool = True, evaluates: bool = True) -> None:
    """Refuse flags that the script would otherwise ignore (see ``add_common_args``)."""
    if not evaluates and args.evaluate:
        raise UsageError(f'{script}: --evaluate is not supported: pretraining has no evaluation of its own. '
                         f'Evaluate a pretraining checkpoint zero-shot with train_retrieval.py --evaluate '
                         f'--options pretrained=CHECKPOINT (as the paper reports)')
    if not trains:
        given = [flag for flag, value in (('--resume', args.resume), ('--overwrite', args.overwrite)) if value]
        if given:
            raise UsageError(f"{script}: {' and '.join(given)} {'does' if len(given) == 1 else 'do'} not apply: it "
                             f"only evaluates and keeps no checkpoints to resume or replace")


def _read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'config file not found: {path}')
    try:
        data = YAML(typ='safe', pure=True).load(path.read_text())
    except Exception as e:  # ruamel raises many parser error types
        raise ConfigError(f'{path}: not valid YAML: {e}') from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: the top level must be a mapping of keys, got {type(data).__name__}')
    return data


def _parse_value(text: str) -> Any:
    """YAML scalar/list syntax for override values: ``3``, ``1e-5``, ``true``, ``[a, b]``, ``'x'``."""
    try:
        value = YAML(typ='safe', pure=True).load(text)
    except Exception:
        return text
    return '' if value is None and text.strip() in ('', "''", '""') else value


def apply_overrides(data: dict, options: Iterable[str], source: str) -> dict:
    data = dict(data)
    for option in options:
        if '=' not in option:
            raise ConfigError(f'--options {option!r}: expected KEY=VALUE')
        key, text = option.split('=', 1)
        parts = key.strip().split('.')
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--options {option!r}: {'.'.join(parts[:i + 1])} in {source} is not a mapping")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = _parse_value(text)
    return data


def _check_type(key: str, value: Any, hint: Any, source: str) -> Any:
    """Coerce int->float and check the basic types the schemas use; ``object`` accepts anything."""
    origin = typing.get_origin(hint) or hint
    if hint is Any or origin is object:
        return value
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list and isinstance(value, str):
        return [value]
    if origin is typing.Union:
        return value
    if origin in (bool, int, float, str, list, dict) and not isinstance(value, origin) \
            or origin is int and isinstance(value, bool):
        raise ConfigError(f'{source}: key {key!r} must be {origin.__name__}, got {value!r}')
    return value


# Smallest value that makes sense for numeric keys of the task configs; below it a run fails late (a division
# by zero at the first step, a reshape after a whole epoch) or does nothing at all and exits 0.
MINIMUM = {'batch_size': 1, 'batch_size_train': 1, 'batch_size_test': 1, 'image_size': 1, 'k_test': 1,
           'max_epoch': 1, 'log_every': 1, 'accum_steps': 1, 'warmup_steps': 0, 'num_workers': 0,
           'save_every_steps': 0, 'num_beams': 1, 'max_length': 1, 'min_length': 0, 'max_words': 1,
           'queue_size': 1, 'num_frm_test': 1, 'shard_size': 1, 'report_samples': 0, 'top_k': 0, 'init_lr': 0.0,
           'min_lr': 0.0, 'warmup_lr': 0.0, 'weight_decay': 0.0, 'clip_grad': 0.0, 'vit_ckpt_layer': 0,
           'repetition_penalty': 0.0, 'shard_wait_timeout_s': 0.0}


def _check_range(key: str, value: Any, source: str) -> None:
    low = MINIMUM.get(key)
    if low is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
        raise ConfigError(f'{source}: key {key!r} must be >= {low}, got {value!r}')


def key_source(key: str, path: str | os.PathLike, options: Optional[Iterable[str]] = None) -> str:
    """Where a top-level key's value came from, for error messages: the config file, or the command line."""
    overridden = {o.split('=', 1)[0].strip().split('.')[0] for o in options or []}
    return f'--options (config {path})' if key in overridden else str(path)


def load_config(path: str | os.PathLike, schema: type, options: Optional[Iterable[str]] = None):
    """Read ``path``, apply overrides, and build ``schema`` (a dataclass) from it.

    Raises ``ConfigError`` naming the file and the key for unknown keys, wrongly typed values and values below
    a key's ``MINIMUM``.
    """
    source = str(path)
    options = list(options or [])
    data = apply_overrides(_read_yaml(path), options, source)

    def where(key: str) -> str:
        return key_source(key, source, options)

    hints = typing.get_type_hints(schema)
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - known)
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hint = ''.join(f'; did you mean {m[0]!r} for {k!r}?' for k, m in close.items() if m)
        raise ConfigError(f"{where(unknown[0])}: unknown config key(s) {unknown} for {schema.__name__}{hint} "
                          f"(known keys: {sorted(known)})")
    values = {k: _check_type(k, v, hints[k], where(k)) for k, v in data.items()}
    for k, v in values.items():
        _check_range(k, v, where(k))
    return schema(**values)


def save_config(config, output_dir: str | os.PathLike, name: str = 'config.yaml') -> Path:
    """Write the resolved config (every key, defaults included) atomically."""
    out = Path(output_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    data = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
    buf = io.StringIO()
    yaml = YAML(typ='safe', pure=True)
    yaml.default_flow_style = False
    yaml.dump(data, buf)
    return atomic_write_text(out, buf.getvalue())
