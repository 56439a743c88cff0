"""CapFilt: bootstrap a cleaner pretraining set with a captioner and a filter (BLIP paper, section 3.3).

For every web image the captioner (an image-grounded decoder fine-tuned on human captions, e.g.
``model_base_caption_capfilt_large.pth``) samples synthetic captions with nucleus sampling; the filter
(an image-grounded encoder fine-tuned with ITC+ITM, e.g. ``model_base_retrieval_coco.pth``) scores the
web caption and each synthetic one, and every caption whose ITM match probability is below the
threshold is removed (reference 11: captioner = COCO caption model, filter = COCO retrieval model).
Kept pairs plus the human-annotated pairs form the new pretraining set, written in the original
``[{'image', 'caption'}]`` format that ``pretrain.py`` reads with the same ``image_root``.

Work is cut into shards of ``shard_size`` web entries; shard ``s`` is done by rank ``s % world_size``
with the sampling RNG seeded by ``seed + s``, and written atomically (scores, not decisions) when it
completes. A killed run resumes by skipping finished shards; rank 0 waits for every shard and merges
them in order, so the output does not depend on the number of ranks or on interruptions. Because the
shards hold scores, ``threshold`` and ``keep`` can be changed and the output re-merged without
re-running the models. Unreadable images are counted and listed in the summary, never fatal.

Web pairs given as webdataset tar shards (``ann_shards``, img2dataset's layout) are worked on one input shard at
a time (the unit of resume), and the kept pairs are written as new tar shards ``web_shards/NNNNN.tar`` (same
keys, ``KEY_j`` for the j-th kept caption of image KEY, the image bytes copied) that ``pretrain.py`` reads as
``train_shards``; ``output_file`` then holds the human pairs only (``train_file``).

The work is done in ``engine/capfilt/`` (one module per job: config, scoring, selection, folder, report,
json_list, tar_shards); this script parses the command line and starts it.

Outputs in ``--output_dir``: ``output_file`` (the new annotation list), ``capfilt_summary.json``
(counts, score histograms, throughput), ``capfilt_report.html`` (a Figure-4-like page of examples),
``shards/`` (the per-shard scores) and ``config.yaml``.

    torchrun --nproc_per_node=8 capfilt.py --config configs/capfilt.yaml --output_dir output/capfilt
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from engine.capfilt.config import CapFiltConfig, validate
from engine.capfilt.folder import remove_earlier_capfilt
from engine.capfilt.json_list import run_over_json_list
from engine.capfilt.tar_shards import main_over_tar_shards
from engine.config import UsageError, add_common_args, load_config, save_config
from engine.cuda_graph import decoding_note
from engine.distributed import read_dist_env
from engine.lock import lock_output_dir, release_output_dir
from engine.loop import AMP_DTYPES
from engine.runner import resolve_device


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    config = load_config(args.config, CapFiltConfig, args.options)
    validate(config, args.config)
    env = read_dist_env()
    if env and env['world_size'] > 1 and not args.distributed:
        raise RuntimeError('launched with WORLD_SIZE>1 but --distributed False: drop one or the other')
    rank, world = (env['rank'], env['world_size']) if env else (0, 1)
    device = resolve_device(args.device)
    amp_dtype = AMP_DTYPES[config.amp or ('bf16' if device.type == 'cuda' else 'none')]
    output_dir = Path(args.output_dir)
    if args.resume or args.evaluate:
        raise UsageError(f"capfilt.py: {'--resume' if args.resume else '--evaluate'} does not apply: a rerun "
                         f"continues by itself (finished shards are kept); --overwrite starts over")
    if args.overwrite and world > 1:
        raise UsageError('capfilt.py --overwrite: run it with one process (the ranks share no process group to '
                         'agree on when the old shards are gone), or delete the folder first')
    if rank == 0:
        lock_output_dir(output_dir)  # a second CapFilt in this folder is refused at once
        if args.overwrite:
            remove_earlier_capfilt(output_dir, config)
        save_config(config, output_dir)
        print(decoding_note(config.cuda_graph, device))

    if config.toy_root:
        from data.toy import ensure_toy_dataset  # file-locked: concurrent ranks wait for the first
        ensure_toy_dataset(config.toy_root, exact=False)
    start = time.time()
    run = main_over_tar_shards if config.ann_shards else run_over_json_list
    try:
        return run(config, args, rank, world, device, amp_dtype, output_dir, start)
    finally:  # both sources: a caller running CapFilt twice in one process must not meet its own lock
        release_output_dir(output_dir)


if __name__ == '__main__':
    from engine.errors import run_script
    run_script(main, sys.argv[1:])  # a user error: one message, exit 2/1 (traceback with --debug)
