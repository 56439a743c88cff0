"""Process-group set-up from the launcher's environment, and the collective helpers the models use.

A plain ``python script.py`` runs as one process without any process group; every helper here
then degrades to the identity, so no caller needs an ``if distributed`` branch.
"""
from __future__ import annotations

import builtins
import itertools
import os
import random
import subprocess
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ['init_distributed_mode', 'is_dist_avail_and_initialized', 'get_rank', 'get_world_size',
           'is_main_process', 'barrier', 'all_gather_no_grad', 'all_gather_with_grad', 'all_reduce_sum',
           'seed_everything', 'DistEnv', 'read_dist_env']


class DistEnv(dict):
    """rank, world_size, local_rank as read from the environment (``{}`` = not distributed)."""


def _slurm_master_addr() -> str:
    """First host of the job's node list (``scontrol`` expands ranges like ``node[01-04]``)."""
    nodelist = os.environ.get('SLURM_JOB_NODELIST') or os.environ.get('SLURM_NODELIST', '')
    try:
        hosts = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], check=True, capture_output=True,
                               text=True).stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    return os.environ.get('SLURM_LAUNCH_NODE_IPADDR', '127.0.0.1')


def read_dist_env(environ: dict | None = None) -> DistEnv:
    """Rank/world size from torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or SLURM.

    The original kept ``world_size`` at its argparse default under SLURM (so multi-node SLURM jobs
    hung); here it is the srun step's ``SLURM_STEP_NUM_TASKS`` and the local rank is ``SLURM_LOCALID``.
    """
    env = os.environ if environ is None else environ
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return DistEnv(rank=int(env['RANK']), world_size=int(env['WORLD_SIZE']),
                       local_rank=int(env.get('LOCAL_RANK', 0)))
    # srun sets SLURM_STEP_NUM_TASKS for the tasks it starts; a batch script's own shell has SLURM_PROCID=0 and
    # SLURM_NTASKS of the whole allocation but no step variables, and a plain `python` there is one process
    if 'SLURM_PROCID' in env and 'SLURM_STEP_NUM_TASKS' in env:
        return DistEnv(rank=int(env['SLURM_PROCID']), world_size=int(env['SLURM_STEP_NUM_TASKS']),
                       local_rank=int(env.get('SLURM_LOCALID', 0)), slurm=True)
    return DistEnv()


def _setup_for_distributed(is_master: bool) -> None:
    """Silence ``print`` on every rank but 0 (``print(..., force=True)`` still prints)."""
    builtin_print = builtins.print

    def print_(*args: Any, **kwargs: Any) -> None:
        if kwargs.pop('force', False) or is_master:
            builtin_print(*args, **kwargs)

    builtins.print = print_


def init_distributed_mode(args) -> None:
    """Set ``args.rank / world_size / gpu / distributed`` and start the process group when needed.

    One process (no launcher, ``--distributed False``, or a world of 1) starts no process group.
    The backend is NCCL when CUDA is used, gloo otherwise (CPU runs under torchrun work too).
    """
    env = read_dist_env()
    wanted = getattr(args, 'distributed', True)
    if not env or not wanted or env['world_size'] == 1:
        if env and env['world_size'] > 1:
            raise RuntimeError('launched with WORLD_SIZE>1 but --distributed False: drop one or the other')
        print('Not using distributed mode')
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        return
    args.rank, args.world_size, args.gpu = env['rank'], env['world_size'], env['local_rank']
    if env.get('slurm') and args.dist_url == 'env://':
        os.environ.setdefault('MASTER_ADDR', _slurm_master_addr())
        os.environ.setdefault('MASTER_PORT', '29500')
        os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world_size), LOCAL_RANK=str(args.gpu))
    use_cuda = torch.cuda.is_available() and str(getattr(args, 'device', 'cuda')).startswith('cuda')
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    args.distributed = True
    args.dist_backend = 'nccl' if use_cuda else 'gloo'
    print(f'| distributed init (rank {args.rank}/{args.world_size}, {args.dist_backend}): {args.dist_url}', flush=True)
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url, world_size=args.world_size,
                            rank=args.rank, **({'device_id': torch.device('cuda', args.gpu)} if use_cuda else {}))
    dist.barrier()
    _setup_for_distributed(args.rank == 0)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when there is a group (the original called it unconditionally and crashed)."""
    if is_dist_avail_and_initialized():
        dist.barrier()


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Every rank takes rank ``src``'s parameters and buffers (what DDP does when it wraps a model)."""
    if not is_dist_avail_and_initialized():
        return
    for t in itertools.chain(module.parameters(), module.buffers()):
        dist.broadcast(t.data, src)


@torch.no_grad()
def all_gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank on dim 0, without gradient (the original ``concat_all_gather``)."""
    if get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


class _GatherLayer(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, t):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank on dim 0, keeping the gradient path to this rank's part."""
    if get_world_size() == 1:
        return t
    return torch.cat(_GatherLayer.apply(t), dim=0)


def all_reduce_sum(values: list[float], device: torch.device | str = 'cpu') -> list[float]:
    """Sum a list of numbers over ranks (float64)."""
    if get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def seed_everything(seed: int, rank: int = 0) -> None:
    """``seed + rank`` for torch, numpy and random, as the original."""
    s = seed + rank
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
