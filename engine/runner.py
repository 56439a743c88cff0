"""What every task script does around its own step and evaluation: one ``Run`` object.

A script is ``Run.start(argv, ConfigClass)`` -> datasets/loaders -> ``run.setup_model(model)`` ->
``for epoch in run.epochs(): run.train_epoch(...); evaluate; run.save/log; run.end_epoch(epoch)``.
Distributed set-up, seeding, the resolved config, AMP, DDP / FSDP (``engine.parallel``), the optimizer, resume
and atomic checkpoints live here and in the modules it calls, never in the scripts.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import create_dataset, create_loader, create_sampler
from data.image_check import check_images
from data.loading import BadSampleError
from engine import distributed as du
from engine import parallel
from engine.checkpoint_io import capture_rng_state, load_training_state, save_checkpoint
from engine.config import (CommonConfig, ConfigError, add_common_args, key_source, load_config, refuse_unused_flags,
                           save_config)
from engine.lock import lock_output_dir, release_output_dir
from engine.sharded_checkpoint import (CHECKPOINT_FORMATS, SHARDED_SUFFIX, find_resume_point, is_sharded_checkpoint,
                                       load_sharded_training_state, remove_sharded_checkpoints,
                                       save_sharded_checkpoint)
from engine.logging import JsonLogger, logs_to_resume_point
from engine.loop import AMP_DTYPES, EpochPlan, NonFiniteLossError, ResumableSampler, StepPlan, train_one_epoch
from engine.optim import cosine_lr, create_optimizer
from models.checkpoint import is_url
from models.compile import compile_layers

__all__ = ['CommonConfig', 'Run', 'StepContext', 'check_checkpoint_paths', 'check_output_dir', 'cosine_epoch_lr',
           'gather_objects', 'mid_epoch_start_step', 'progress', 'remove_earlier_run', 'trains_afresh']


def _remove_if_there(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def cosine_epoch_lr(epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> Callable[[int], float]:
    """The original's per-epoch cosine schedule (constant within an epoch) as a step -> lr function."""
    lr = cosine_lr(epoch, max_epoch, init_lr, min_lr)
    return lambda step: lr


def check_checkpoint_paths(args: argparse.Namespace, config) -> None:
    """Fail before any output is written when ``pretrained`` or ``--resume`` names a local file that is not
    there (a typo would otherwise surface after the output folder, its config.yaml and the data exist)."""
    named = [(f"{key_source('pretrained', args.config, args.options)}: pretrained", config.get('pretrained', '')),
             ('--resume', '' if getattr(args, 'resume', None) in (None, '', 'auto') else args.resume)]
    for what, location in named:
        if location and not is_url(location) and not Path(str(location).removeprefix('file://')).exists():
            raise ConfigError(f'{what}: no such checkpoint file {str(location)!r}')


def trains_afresh(args: argparse.Namespace) -> bool:
    """A training run that neither evaluates only nor continues an earlier run (``--resume``)."""
    return not (args.evaluate or getattr(args, 'resume', None))


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse to train over an earlier run's checkpoints unless told to continue it (``--resume``) or replace
    it (``--overwrite``): a second run with the same command used to replace checkpoint_best.pth and mix its
    epochs into log.txt."""
    if not trains_afresh(args) or getattr(args, 'overwrite', False):
        return
    found = sorted(p.name for p in [*Path(args.output_dir).glob('checkpoint_*.pth'),
                                    *Path(args.output_dir).glob(f'checkpoint_*{SHARDED_SUFFIX}')])
    if found:
        raise ConfigError(f"--output_dir {args.output_dir} holds checkpoints of an earlier run ({', '.join(found[:3])}"
                          f"{', ...' if len(found) > 3 else ''}): --resume auto continues it, --overwrite replaces "
                          f"it, or choose another --output_dir")


def remove_earlier_run(output_dir: str | Path) -> None:
    """``--overwrite``: the earlier run's checkpoints and logs go, so that none of them (a later epoch's
    checkpoint, its log lines) passes for the new run's."""
    out = Path(output_dir)
    for path in [*out.glob('checkpoint_*.pth'), out / 'log.txt', out / 'train_log.jsonl']:
        if path.is_file():
            path.unlink()
            print(f'--overwrite: removed {path}')
    for path in remove_sharded_checkpoints(out):
        print(f'--overwrite: removed {path}')


def mid_epoch_start_step(saved: dict, batch_size: int, world_size: int, steps: int) -> int:
    """The step of this run's epoch at which a mid-epoch resume point continues.

    The training sampler's order over the whole epoch depends on (seed, epoch) only, and rank r takes every
    world_size-th index of it, so after k steps of every rank the first k * batch_size * world_size samples
    are done whatever the number of ranks. A resume point saved by another number of ranks (or batch size)
    thus continues where that many samples are done; without the conversion it skipped its per-rank step
    count in the new split (other samples), or ran past the new epoch's end and hung in a collective.
    """
    samples = saved.get('samples')
    per_step = batch_size * world_size
    if samples is None or samples == saved['step'] * per_step:
        return int(saved['step'])
    step = min(samples // per_step, steps)
    again = samples - step * per_step
    print(f"mid-epoch resume point of epoch {saved['epoch']}: {samples} samples done by "
          f"{saved.get('world_size', '?')} rank(s) x batch {saved.get('batch_size', '?')}; with {world_size} x "
          f"{batch_size} the epoch continues at step {step} of {steps}"
          + (f' ({again} of those samples are seen again)' if again > 0 else ''))
    return step


def progress(iterable, desc: str):
    """tqdm on rank 0 only."""
    return tqdm(iterable, desc=desc, disable=not du.is_main_process(), dynamic_ncols=True, leave=False)


def gather_objects(items: list) -> list:
    """Concatenate a picklable list from every rank (identity without a process group)."""
    if not du.is_dist_avail_and_initialized():
        return list(items)
    gathered = [None] * du.get_world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


@dataclass
class StepContext:
    epoch: int
    step: int
    steps_per_epoch: int
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name.startswith('cuda') and not torch.cuda.is_available():
        print('CUDA is not available: running on the CPU')
        return torch.device('cpu')
    env = du.read_dist_env()
    if name.startswith('cuda') and env:  # one GPU per local process, under torchrun or SLURM (srun)
        device = torch.device('cuda', env['local_rank'])
        torch.cuda.set_device(device)  # streams, CUDA graphs and pinned memory use the current device
        return device
    return torch.device(name)


class Run:
    """State of one script invocation (see module docstring)."""

    def __init__(self, args, config, device: torch.device):
        self.args, self.config, self.device = args, config, device
        self.output_dir = Path(args.output_dir)
        self.result_dir = self.output_dir / 'result'
        self.is_main = du.is_main_process()
        self.distributed = du.is_dist_avail_and_initialized()
        amp = config.amp or ('bf16' if device.type == 'cuda' else 'none')
        if amp not in AMP_DTYPES:
            raise ValueError(f"{args.config}: amp must be one of {sorted(AMP_DTYPES)} or '', got {amp!r}")
        self.precision = amp
        self.amp_dtype = AMP_DTYPES[amp]
        self.logger = JsonLogger(self.output_dir) if self.is_main else None
        self.model = self.model_without_ddp = self.optimizer = self.scaler = None
        self.start_epoch, self.start_step = 0, 0
        self.cuda_graph = False  # the training step as CUDA graphs (setup_model decides)
        # what --resume restores besides weights and optimizer: best score / epoch, a cut epoch's loss totals, data
        # positions; saved in every checkpoint (under its 'progress' key, the name older checkpoints have)
        self.resume_state: dict = {}
        self._samplers: dict[int, object] = {}
        self._pending_saves: list[tuple[str, int]] = []  # FSDP: save() requests written at end_epoch / finish
        # called on every rank (collective allowed) before a resume point is saved, with its (epoch, step): data
        # sources that keep their own position put it into self.resume_state there (data.shards)
        self.resume_hooks: list[Callable[[tuple[int, int]], None]] = []

    @classmethod
    def start(cls, argv: Optional[Sequence[str]], schema: type, description: str = '', trains: bool = True,
              evaluates: bool = True) -> 'Run':
        """``trains=False``: an evaluation-only script; ``evaluates=False``: a script with no evaluation
        (pretraining). Flags that they would ignore are hidden from ``--help`` and refused."""
        parser = argparse.ArgumentParser(description=(description or '').strip().splitlines()[0] if description else None)
        add_common_args(parser, trains=trains, evaluates=evaluates)
        args = parser.parse_args(argv)
        refuse_unused_flags(args, parser.prog, trains, evaluates)
        if not trains:
            args.evaluate = True  # nothing of an earlier run in --output_dir is at stake
        config = load_config(args.config, schema, args.options or [])
        check_checkpoint_paths(args, config)
        if du.read_dist_env().get('rank', 0) == 0:  # one holder per run; refused at once while another run is live there
            lock_output_dir(args.output_dir)
        try:
            return cls._start_locked(args, config)
        except BaseException:
            release_output_dir(args.output_dir)
            raise

    @classmethod
    def _start_locked(cls, args: argparse.Namespace, config) -> 'Run':
        check_output_dir(args)
        du.init_distributed_mode(args)
        device = resolve_device(args.device)
        du.seed_everything(args.seed, du.get_rank())
        if du.is_main_process():
            if getattr(args, 'overwrite', False) and trains_afresh(args):
                remove_earlier_run(args.output_dir)
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)  # result/ appears with the first result file
            save_config(config, args.output_dir)
        du.barrier()
        if device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
        return cls(args, config, device)

    # ------------------------------------------------------------------------------------------ data
    def datasets(self, name: str, **kwargs):
        if self.config.get('own_data', ''):
            return self._own_datasets(name)
        if self.config.get('toy_root', ''):
            # rank 0 writes the toy dataset once; the others wait, then find it complete
            if self.is_main:
                from data.toy import ensure_toy_dataset
                ensure_toy_dataset(self.config.toy_root, exact=False)
            du.barrier()
        return create_dataset(name, self.config, **kwargs)

    def _own_datasets(self, name: str) -> tuple:
        """``own_data: PATH`` (a pairs list or tar shards) in place of the config's roots: every rank reads and checks
        it (a bad file stops all ranks alike), rank 0 writes the splits under ``output_dir/own_data``."""
        from data.own_data import FOLDER, own_datasets, own_task, plan_own_data, write_own_data
        task = own_task(name)
        plan = plan_own_data(self.config.own_data)
        folder = self.output_dir / FOLDER
        if self.is_main:
            counts = write_own_data(plan, folder)
            print(f'own_data {self.config.own_data}: {json.dumps(counts)}, written to {folder}', flush=True)
        du.barrier()
        return own_datasets(task, self.config, folder)

    def loaders(self, datasets: list, is_trains: list[bool], batch_sizes: list[int], collate_fns=None,
                distributed_eval: bool = True, persistent_train_workers: bool = False) -> list:
        """Loaders with DistributedSamplers when distributed (eval ones too unless ``distributed_eval=False``).

        ``persistent_train_workers``: training loaders keep their workers across epochs; only for datasets whose
        randomness does not come from the workers' RNGs, which are seeded per epoch when the workers start
        (``train_epoch``), and which pass the epoch to their workers through shared memory (pretraining's)."""
        n = len(datasets)
        self._check_evaluation_images([d for d, train in zip(datasets, is_trains) if not train])
        world, rank = du.get_world_size(), du.get_rank()
        # Training always goes through a seeded DistributedSampler (one replica when not distributed) so
        # that an epoch's order depends on (seed, epoch) only and a resumed epoch can skip what it did.
        made = create_sampler(datasets, is_trains, world, rank)
        samplers = []
        for sampler, train in zip(made, is_trains):
            if train:
                sampler.seed = self.args.seed
                samplers.append(ResumableSampler(sampler))
            else:
                samplers.append(sampler if self.distributed and distributed_eval else None)
        loaders = create_loader(datasets, samplers, batch_size=batch_sizes, num_workers=[self.config.num_workers] * n,
                                is_trains=is_trains, collate_fns=collate_fns or [None] * n,
                                persistent=[train and persistent_train_workers for train in is_trains])
        for dataset, train in zip(datasets, is_trains):
            if train and getattr(dataset, 'skip_bad_samples', False):
                # every worker appends the bad files it meets here; the epoch's log line gets their number
                fd, dataset.bad_sample_report = tempfile.mkstemp(prefix='blip_bad_samples_', suffix='.jsonl')
                os.close(fd)
                atexit.register(_remove_if_there, dataset.bad_sample_report)
        for loader, sampler in zip(loaders, samplers):
            self._samplers[id(loader)] = sampler
            # worker seeds come from this generator, not from the global RNG that resume restores
            loader.generator = torch.Generator()
        return loaders

    def _check_evaluation_images(self, datasets: list) -> None:
        """Every evaluation image opens, or the run stops now and not after its first training epoch. Rank 0
        checks; every rank raises the same error."""
        error = None
        if self.is_main:
            try:
                for dataset in datasets:
                    refs = dataset.image_files() if hasattr(dataset, 'image_files') else []
                    split = f"{type(dataset).__name__} ({refs[0][2] if refs else ''})"
                    check_images(refs, split)
            except BadSampleError as e:
                error = str(e)
        if self.distributed:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error is not None:
            raise BadSampleError(error)

    # ------------------------------------------------------------------------------------------ model
    def setup_model(self, model: torch.nn.Module, find_unused_parameters: bool = False,
                    graphed_step: bool = False) -> torch.nn.Module:
        """Move to the device, wrap for the ``parallel`` mode (DDP or FSDP, ``engine.parallel``), build the
        optimizer over the wrapped model's parameters, resume if asked.

        ``graphed_step``: the script can replay its training step as CUDA graphs (``engine.cuda_graph.TrainStep``);
        the ``cuda_graph`` key then decides (empty = on where the conditions hold), and ``self.cuda_graph`` tells
        the script. Other scripts' ``cuda_graph`` key concerns decoding only."""
        model = model.to(self.device)
        if self.device.type == 'cuda':
            model = model.to(memory_format=torch.channels_last)
        mode = self.config.get('parallel', 'ddp')
        if mode not in parallel.PARALLEL_MODES:
            raise ConfigError(f"{key_source('parallel', self.args.config, self.args.options)}: parallel must be one "
                              f"of {', '.join(parallel.PARALLEL_MODES)}, got {mode!r}")
        if self.config.get('checkpoint_format', 'full') not in CHECKPOINT_FORMATS:
            raise ConfigError(f"{key_source('checkpoint_format', self.args.config, self.args.options)}: "
                              f"checkpoint_format must be one of {', '.join(CHECKPOINT_FORMATS)}, got "
                              f"{self.config.get('checkpoint_format')!r}")
        graphed = self.cuda_graph = self._resolve_graphed_step() if graphed_step else False
        if graphed:
            if self.precision == 'fp16':
                raise ConfigError(f'{self.args.config}: cuda_graph replays the update without a loss scaler: use '
                                  f'amp bf16 or none, not fp16')
            if mode == 'fsdp' and self.distributed:
                raise ConfigError(f'{self.args.config}: cuda_graph keeps whole gradients in one buffer; with parallel '
                                  f'fsdp set cuda_graph: false')
            if self.device.type != 'cuda' and self.is_main:
                print('cuda_graph: no CUDA device, the step runs eagerly on the static buffers a graph would use')
            elif self.is_main:
                print(f'cuda_graph: forward+backward and the update each replayed as a CUDA graph after 3 eager steps'
                      f'{"; gradients averaged over ranks between them" if self.distributed else ""}')
        if mode == 'fsdp' and self.distributed and (self.config.compile or self.precision == 'fp16'):
            raise ConfigError(f"{self.args.config}: parallel fsdp runs without compile and without amp fp16 (its "
                              f"grad scaler does not see sharded gradients); use amp bf16 / none, compile false")
        self.model_without_ddp = model  # fully_shard works in place: the sharded model is this module too
        # the graphed step averages the gradients itself (engine.cuda_graph.TrainStep): no DDP wrapper, whose hooks
        # would fire inside a recorded backward
        self.model = parallel.wrap(model, mode, self.device, self.precision, find_unused_parameters,
                                    checkpoint_med=self.config.get('med_grad_ckpt', False), own_grad_sync=graphed)
        if mode == 'fsdp' and not parallel.is_sharded(model):
            print('parallel fsdp: one process, nothing to shard (the model trains whole)')
        # after wrapping: FSDP replaces the parameters by their shards, which the optimizer must hold
        self.optimizer = create_optimizer(self.model, self.config, capturable=graphed)
        if self.precision == 'fp16':
            self.scaler = torch.amp.GradScaler(self.device.type)
        self._maybe_resume()
        if self.is_main and not self.args.evaluate:
            # the logs continue exactly where the weights do: a fresh run (no checkpoint, so the logs are those
            # of a run that never saved) starts them anew
            logs_to_resume_point(self.output_dir, self.start_epoch, self.start_step)
        if self.config.compile:
            n = compile_layers(model)
            if self.is_main:
                print(f'compile: {n} ViT blocks / MED layers compiled with torch.compile (first steps compile)')
        return self.model

    @property
    def eval_model(self) -> torch.nn.Module:
        """The module evaluation calls (``generate``, retrieval scoring...), each rank on its own batches: the
        unwrapped model; under FSDP with its weights gathered until the next ``train_epoch`` (a collective the
        first time after training: every rank reads it, as the scripts' evaluation functions do)."""
        return parallel.eval_model(self.model)

    def _resolve_graphed_step(self) -> bool:
        """The ``cuda_graph`` key for the training step: as set, or (empty) on unless something rules it out."""
        value = self.config.get('cuda_graph', None)
        if value is not None:
            if not value and self.is_main:
                print('cuda_graph: false (set in the config): the training step runs eagerly')
            return value
        blockers = (([] if self.device.type == 'cuda' else ['no CUDA device']) +
                    (['amp fp16 (its loss scaler is not replayed)'] if self.precision == 'fp16' else []) +
                    (['vit_grad_ckpt (recomputation under capture not yet validated on GPUs)']
                     if self.config.get('vit_grad_ckpt', False) else []) +
                    (['parallel fsdp'] if self.config.get('parallel', 'ddp') == 'fsdp' else []) +
                    ([f'{du.get_world_size()} processes (the multi-process graph path is not yet validated on GPUs; '
                      f'cuda_graph: true enables it)'] if self.distributed else []))
        if self.is_main:
            print(f'cuda_graph (empty = auto): the training step runs '
                  f'{"as CUDA graphs" if not blockers else "eagerly: " + "; ".join(blockers)}')
        return not blockers

    def _maybe_resume(self) -> None:
        resume = getattr(self.args, 'resume', None)
        if not resume:
            return
        path = find_resume_point(self.output_dir) if resume == 'auto' else resume
        if path is None:
            print('--resume auto: no checkpoint yet, starting from scratch')
            return
        load = load_sharded_training_state if is_sharded_checkpoint(path) else load_training_state
        epoch, step = load(path, self.model_without_ddp, self.optimizer, self.scaler, rank=du.get_rank(),
                           world_size=du.get_world_size(), progress=self.resume_state)
        self.start_epoch, self.start_step = epoch, step
        print(f'resumed from {path}: epoch {epoch}, step {step}')
        if not self.args.evaluate and epoch >= self.config.max_epoch:
            print(f'{path} finished all {self.config.max_epoch} epochs (max_epoch): nothing left to train; '
                  f'raise max_epoch (--options max_epoch=N) to train on, or use another --output_dir')

    def epochs(self) -> range:
        if self.args.evaluate:
            return range(self.start_epoch, self.start_epoch + 1)
        return range(self.start_epoch, self.config.max_epoch)

    def train_epoch(self, epoch: int, loader, step_fn: Callable, lr_fn: Callable[[int], float],
                    save_before_eval: bool = True) -> dict:
        """One epoch of ``step_fn(model, batch, ctx) -> {loss_name: tensor}``; returns averaged metrics.

        ``save_before_eval``: the trained epoch is saved (``checkpoint_last.pth`` continuing at its end, where
        ``--resume`` goes straight to the evaluation) before the script evaluates it, so that a failing
        evaluation cannot lose it; scripts that do not evaluate after the epoch pass False."""
        sampler = self._samplers.get(id(loader))
        if sampler is not None and hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
        if hasattr(loader.dataset, 'set_epoch'):
            loader.dataset.set_epoch(epoch)
        report = getattr(loader.dataset, 'bad_sample_report', None)
        if report:
            open(report, 'w').close()
        if loader.generator is not None:
            loader.generator.manual_seed(self.args.seed * 100_003 + epoch * 1009 + du.get_rank())
        steps = len(loader)
        start_step = self.start_step if epoch == self.start_epoch else 0
        parallel.train_mode(self.model)  # an evaluation's gathered FSDP weights go back to shards
        self.model.train()

        def wrapped_step(model, batch, step):
            return step_fn(model, batch, StepContext(epoch, step, steps, self.device))

        def save_mid_epoch(step: int, totals: dict) -> None:
            # the epoch's loss sums so far go with the resume point: a resumed epoch logs the mean of all its steps;
            # and the samples it has seen, for a resume with another number of ranks or batch size
            world = du.get_world_size()
            self.resume_state['epoch_totals'] = {'epoch': epoch, 'step': step, 'world_size': world,
                                             'batch_size': loader.batch_size,
                                             'samples': step * loader.batch_size * world, **totals}
            try:
                self.save_resume_point(epoch, (epoch, step))
            finally:
                del self.resume_state['epoch_totals']

        saved = self.resume_state.pop('epoch_totals', None)  # restored by --resume from a mid-epoch checkpoint
        start_totals = None
        if saved and start_step and (saved['epoch'], saved['step']) == (epoch, start_step):
            start_totals = saved
            start_step = mid_epoch_start_step(saved, loader.batch_size, du.get_world_size(), steps)
        try:
            plan = StepPlan(wrapped_step, self.optimizer, lr_fn, precision=self.precision,
                            accum_steps=self.config.accum_steps, clip_grad=self.config.clip_grad, scaler=self.scaler,
                            updates_itself=self.cuda_graph)
            ep = EpochPlan(epoch, start_step=start_step, start_totals=start_totals, logger=self.logger,
                           log_every=self.config.log_every, save_fn=save_mid_epoch,
                           save_every_steps=self.config.save_every_steps, save_at_end=save_before_eval)
            stats = train_one_epoch(self.model, loader, plan, ep, self.device)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f'{e}; {self._checkpoints_on_disk()}') from None
        if report:
            stats['bad_samples'] = self._bad_samples_of_epoch(report, epoch)
        return stats

    def _bad_samples_of_epoch(self, report: str, epoch: int) -> int:
        """Distinct unreadable files every rank's workers met this epoch (``skip_bad_samples``), for log.txt."""
        with open(report, encoding='utf-8') as f:
            files = sorted({json.loads(line)['file'] for line in f if line.strip()})
        files = sorted(set(gather_objects(files)))
        if files and self.is_main:
            print(f'epoch {epoch}: {len(files)} unreadable training file(s) replaced by random other samples '
                  f'(skip_bad_samples), e.g. {files[:3]}')
        return len(files)

    def _checkpoints_on_disk(self) -> str:
        """What a stopped run leaves to continue from, said as it is (there may be none)."""
        latest = find_resume_point(self.output_dir)
        if latest is None:
            return (f'no checkpoint was written in {self.output_dir} yet; lower init_lr, set clip_grad or check the '
                    f'pretrained weights ({self.config.get("pretrained", "") or "none"})')
        return f'{latest} holds the last good weights (--resume auto continues from it)'

    # ------------------------------------------------------------------------------------------ outputs
    def save(self, name: str, epoch: int) -> None:
        """Atomic checkpoint in the original layout (model selection: best / per-epoch files); resuming from it
        starts epoch + 1. No collective under DDP (rank 0 writes), so it may be called inside ``if run.is_main``.
        Under FSDP the weights are gathered from every rank, which a rank-0-only call cannot do: the file is
        written at the next ``end_epoch`` (or ``finish``), where every rank is, with the weights as they are now."""
        if parallel.is_sharded(self.model_without_ddp):
            if self.is_main:
                self._pending_saves.append((name, epoch))
            return
        if self.is_main:
            save_checkpoint(self.output_dir / name, self.model_without_ddp, self.optimizer, self.config.to_dict(),
                            epoch, epoch + 1, 0, scaler=self.scaler, progress=self.resume_state)

    def _gathered_states(self) -> dict:
        """Under FSDP the whole model and optimizer states (collective; kept on rank 0), else {} (the writer
        reads the model's own)."""
        if not parallel.is_sharded(self.model_without_ddp):
            return {}
        return {'model_state': parallel.full_state_dict(self.model, keep=self.is_main),
                'optimizer_state': parallel.full_optimizer_state(self.model, self.optimizer, keep=self.is_main)}

    def _write_pending_saves(self) -> None:
        """FSDP: the files ``save`` was asked for on rank 0 (collective)."""
        if not parallel.is_sharded(self.model_without_ddp):
            return
        pending = [self._pending_saves]
        dist.broadcast_object_list(pending, src=0)
        self._pending_saves = []
        if not pending[0]:
            return
        states = self._gathered_states()
        if self.is_main:
            for name, epoch in pending[0]:
                save_checkpoint(self.output_dir / name, self.model_without_ddp, self.optimizer, self.config.to_dict(),
                                epoch, epoch + 1, 0, scaler=self.scaler, progress=self.resume_state, **states)

    def save_resume_point(self, epoch: int, resume: tuple[int, int]) -> None:
        """``checkpoint_last.pth`` (``checkpoint_format: sharded``: ``checkpoint_last.dcp/``) continuing at ``resume``
        = (epoch, step). Collective: every rank's RNG state is gathered so a resumed multi-process run continues each
        rank's random stream."""
        for hook in self.resume_hooks:
            hook(resume)
        rng = gather_objects([capture_rng_state()])
        if self.config.get('checkpoint_format', 'full') == 'sharded':  # every rank writes its own shards
            save_sharded_checkpoint(self.output_dir / f'checkpoint_last{SHARDED_SUFFIX}', self.model, self.optimizer,
                                    self.config.to_dict(), epoch, resume[0], resume[1], scaler=self.scaler, rng=rng,
                                    progress=self.resume_state)
            return
        states = self._gathered_states()
        if self.is_main:
            save_checkpoint(self.output_dir / 'checkpoint_last.pth', self.model_without_ddp, self.optimizer,
                            self.config.to_dict(), epoch, resume[0], resume[1], scaler=self.scaler, rng=rng,
                            progress=self.resume_state, **states)
        du.barrier()

    def improved(self, score: float, epoch: int) -> bool:
        """Whether ``score`` beats the best so far, which is then recorded; the best survives ``--resume``,
        so a resumed run does not overwrite ``checkpoint_best.pth`` with a worse epoch."""
        if score > self.resume_state.get('best', float('-inf')):
            self.resume_state.update(best=score, best_epoch=epoch)
            return True
        return False

    @property
    def best_epoch(self) -> int:
        return self.resume_state.get('best_epoch', 0)

    def log(self, stats: dict, filename: str = 'log.txt') -> None:
        if self.is_main:
            with open(self.output_dir / filename, 'a') as f:
                f.write(json.dumps(stats) + '\n')
            print(json.dumps(stats))

    def end_epoch(self, epoch: int) -> None:
        """Mark the epoch finished for ``--resume`` (next start: epoch + 1, step 0)."""
        self._write_pending_saves()
        if not self.args.evaluate:
            self.save_resume_point(epoch, (epoch + 1, 0))
        du.barrier()

    def finish(self) -> None:
        self._write_pending_saves()
        du.barrier()
        if self.distributed:
            dist.destroy_process_group()
        if self.is_main:
            release_output_dir(self.output_dir)
