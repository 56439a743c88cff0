"""Toy proof of CapFilt, offline on a CPU: does bootstrapping clean the noisy toy "web" pairs, and does
pretraining on the bootstrapped set retrieve better than pretraining on the noisy one?

Steps (each one a subprocess running an existing script; a finished step is reused unless --fresh):
  a. captioner: ``train_caption.py --config configs/toy/caption.yaml`` on the clean toy COCO pairs;
  b. filter:    ``train_retrieval.py --config configs/toy/retrieval.yaml`` on the same pairs (its last
                checkpoint filters, ``--filter_checkpoint``);
  c. CapFilt:   ``capfilt.py --config configs/toy/capfilt.yaml`` over ``pretrain_noisy.json``
                (human file: ``coco_karpathy_train.json``);
  d. precision/recall of the removal of noisy web pairs against ``pretrain_noisy_truth.json``;
  e. pretraining (``pretrain.py --config configs/toy/pretrain.yaml``) on (i) the noisy web pairs and
     (ii) the bootstrapped web pairs (kept web + kept synthetic captions), each plus the same
     ``--human_pairs`` human pairs, with the same budget: both lists are brought to the same number of
     pairs (the shorter one repeats its own entries cyclically), so with the same epochs and batch size
     both runs take the same number of optimizer steps; then zero-shot toy retrieval of both
     (``train_retrieval.py --evaluate --options pretrained=<checkpoint>``). Each set is pretrained once per
     ``--seeds`` seed and the means are compared: single toy pretraining runs of the same set differ by
     as much as the two sets do (mean recall 8-21 over runs of the noisy set).

     ``--human_pairs`` defaults to 0: in the paper web pairs outnumber human ones about ten to one,
     while the toy's human split (5 captions x 1000 images) is five times its web split; mixing all of
     it in makes the 300 noisy pairs 5% of the data, and the comparison then measures run-to-run noise.

Numbers are printed and written to ``<output_dir>/toy_capfilt_results.json``.

    python toy_capfilt.py --output_dir output/toy_capfilt
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent


def run_step(name: str, cmd: list[str], log: Path, done: Path, fresh: bool, env: dict,
             workdir: Optional[Path] = None) -> float:
    """Run ``cmd`` (logging to ``log``) unless ``done`` exists from a run of the same command; returns the
    seconds it took. A step whose command changed (other flags, another filter checkpoint) is redone, its
    ``workdir`` emptied first, so that results never pair new settings with old outputs."""
    stamp = log.with_name(log.name + '.cmd.json')
    same = stamp.exists() and json.loads(stamp.read_text()) == cmd
    if done.exists() and not fresh and same:
        print(f'[{name}] reusing {done}', flush=True)
        return 0.0
    if done.exists() and not fresh:
        print(f'[{name}] its command changed since {done} was made: redoing it', flush=True)
    changed = stamp.exists() and not same
    if workdir is not None and workdir.exists() and (fresh or changed):  # else: an interrupted run resumes there
        shutil.rmtree(workdir)
    print(f'[{name}] {" ".join(cmd)}', flush=True)
    start = time.time()
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not done.exists():
        tail = log.read_text(errors='replace').replace('\r', '\n').splitlines()[-30:]
        raise RuntimeError(f'[{name}] failed (exit {proc.returncode}); last lines of {log}:\n' + '\n'.join(tail))
    stamp.write_text(json.dumps(cmd))
    seconds = time.time() - start
    print(f'[{name}] done in {seconds:.0f} s', flush=True)
    return seconds


def last_json_line(path: Path) -> dict:
    return json.loads([line for line in path.read_text().splitlines() if line.strip()][-1])


def noise_removal(noisy: list[dict], truth: list[bool], kept_pairs: list[dict], bad: set[int]) -> dict:
    """Precision/recall of removing noisy web pairs (a pair is removed when it is absent from the output)."""
    kept = {(p.get('image', p.get('url')), p['caption']) for p in kept_pairs}
    removed = [(e['image'], e['caption']) not in kept for e in noisy]
    tp = sum(r and t for r, t in zip(removed, truth))
    n_removed, n_noisy = sum(removed), sum(truth)
    return {'web_pairs': len(noisy), 'noisy_pairs': n_noisy, 'removed': n_removed, 'removed_noisy': tp,
            'removed_clean': n_removed - tp, 'unreadable_images': len(bad),
            'precision': tp / n_removed if n_removed else None, 'recall': tp / n_noisy if n_noisy else None,
            'chance_precision': n_noisy / len(noisy)}


def web_score_auc(capfilt_dir: Path, truth: list[bool]) -> Optional[float]:
    """Probability that a clean web pair scores above a noisy one (ties count half), from CapFilt's shards.

    Unlike precision/recall at the threshold, this does not depend on how the filter's ITM probabilities
    are calibrated around 0.5, which varies between toy training runs far more than the ranking does.
    """
    scores = {}
    for path in sorted((capfilt_dir / 'shards').glob('shard_*.json')):
        scores.update((r['i'], r['w']) for r in json.loads(path.read_text())['records'])
    clean = sorted(scores[i] for i, t in enumerate(truth) if i in scores and not t)
    noisy = [scores[i] for i, t in enumerate(truth) if i in scores and t]
    if not clean or not noisy:
        return None
    # for each noisy score: clean scores above it + half the ties
    wins = sum(len(clean) - bisect.bisect_right(clean, n) + 0.5 * (bisect.bisect_right(clean, n) -
               bisect.bisect_left(clean, n)) for n in noisy)
    return wins / (len(clean) * len(noisy))


def equal_size(a: list, b: list) -> tuple[list, list]:
    """Bring both lists to the longer length by repeating the shorter one's entries cyclically."""
    n = max(len(a), len(b))
    pad = lambda x: x + [x[i % len(x)] for i in range(n - len(x))]  # noqa: E731
    return pad(a), pad(b)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].replace('\n', ' '))  # the whole first sentence
    parser.add_argument('--output_dir', default='output/toy_capfilt')
    parser.add_argument('--toy_root', default='output/toy_data')
    parser.add_argument('--caption_epochs', type=int, default=1)
    parser.add_argument('--retrieval_epochs', type=int, default=4)
    parser.add_argument('--filter_checkpoint', choices=['last', 'best'], default='last',
                        help="the filter run's checkpoint: 'best' is picked by recall on 30 toy validation images, "
                             "which says little about filtering (it was sometimes the poorer filter)")
    parser.add_argument('--pretrain_epochs', type=int, default=6)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2],
                        help='pretraining seeds: each set is pretrained and evaluated once per seed (means reported)')
    parser.add_argument('--human_pairs', type=int, default=0,
                        help='human pairs (the first N of coco_karpathy_train.json) added to both pretraining sets')
    parser.add_argument('--num_workers', type=int, default=0)
    parser.add_argument('--threads', type=int, default=0, help='torch threads per subprocess (0 = torch default)')
    parser.add_argument('--fresh', action='store_true', help='redo every step even when its output exists')
    parser.add_argument('--capfilt_options', nargs='*', default=[], help='extra capfilt.py --options')
    args = parser.parse_args(argv)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    toy = Path(args.toy_root)
    ann, images = toy / 'annotation', toy / 'images'
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    if args.threads:
        env['OMP_NUM_THREADS'] = str(args.threads)
    py = [sys.executable]
    common = ['--device', 'cpu']
    # a training step cut off before its done-file resumes where it was; a changed one starts over (run_step
    # empties its workdir), so a training script never meets another run's checkpoints
    train = common + ['--resume', 'auto']
    data_opts = [f'toy_root={toy}', f'image_root={images}', f'num_workers={args.num_workers}']
    seconds = {}

    # a. captioner and b. filter, trained on the clean toy COCO pairs
    captioner_dir, filter_dir = out / 'captioner', out / 'filter'
    seconds['captioner'] = run_step('a. captioner', py + ['train_caption.py', '--config', 'configs/toy/caption.yaml',
                                    '--output_dir', str(captioner_dir), *train, '--options', *data_opts,
                                    f'ann_root={ann}', f'coco_gt_root={ann}/coco_gt', f'max_epoch={args.caption_epochs}'],
                                    out / 'captioner.log', captioner_dir / 'checkpoint_best.pth', args.fresh, env,
                                    workdir=captioner_dir)
    seconds['filter'] = run_step('b. filter', py + ['train_retrieval.py', '--config', 'configs/toy/retrieval.yaml',
                                 '--output_dir', str(filter_dir), *train, '--options', *data_opts,
                                 f'ann_root={ann}', f'max_epoch={args.retrieval_epochs}'],
                                 out / 'filter.log', filter_dir / 'checkpoint_last.pth', args.fresh, env,
                                 workdir=filter_dir)
    filter_ckpt = filter_dir / f'checkpoint_{args.filter_checkpoint}.pth'

    # c. CapFilt over the noisy web pairs
    capfilt_dir = out / 'capfilt'
    seconds['capfilt'] = run_step('c. capfilt', py + ['capfilt.py', '--config', 'configs/toy/capfilt.yaml',
                                  '--output_dir', str(capfilt_dir), *common, '--options', *data_opts,
                                  f'ann_file=[{ann}/pretrain_noisy.json]',
                                  f'human_ann_file=[{ann}/coco_karpathy_train.json]',
                                  f'captioner={captioner_dir}/checkpoint_best.pth',
                                  f'filter={filter_ckpt}', *args.capfilt_options],
                                  out / 'capfilt.log', capfilt_dir / 'capfilt_summary.json', args.fresh, env,
                                  workdir=capfilt_dir)
    summary = json.loads((capfilt_dir / 'capfilt_summary.json').read_text())

    # d. noise removal against the truth
    noisy = json.loads((ann / 'pretrain_noisy.json').read_text())
    truth = json.loads((ann / 'pretrain_noisy_truth.json').read_text())
    bootstrapped = json.loads((capfilt_dir / 'capfilt_annotations.json').read_text())
    removal = noise_removal(noisy, truth, bootstrapped, {b['index'] for b in summary['bad_image_errors']})
    removal['web_score_auc'] = web_score_auc(capfilt_dir, truth)
    print(f"[d. noise removal] precision {removal['precision']} recall {removal['recall']} "
          f"(chance precision {removal['chance_precision']:.2f}), clean-vs-noisy score AUC "
          f"{removal['web_score_auc']}", flush=True)

    # e. pretraining on noisy vs bootstrapped pairs, same number of pairs and steps, then zero-shot retrieval
    human = [{'image': e['image'], 'caption': e['caption']}
             for e in json.loads((ann / 'coco_karpathy_train.json').read_text())[:args.human_pairs]]
    # capfilt.py appends every human pair of human_ann_file after the kept web/synthetic pairs
    boot_web = bootstrapped[:len(bootstrapped) - summary['human_pairs']]
    noisy_set, boot_set = equal_size(human + noisy, human + boot_web)
    sets = {'noisy': noisy_set, 'bootstrapped': boot_set}
    sizes = {'noisy': len(human) + len(noisy), 'bootstrapped': len(human) + len(boot_web), 'human': len(human),
             'trained_pairs': len(noisy_set)}
    retrieval = {}
    for name, pairs in sets.items():
        train_file = out / f'pretrain_{name}.json'
        train_file.write_text(json.dumps(pairs))
        runs = []
        for seed in args.seeds:  # one toy pretraining run is noisy: compare means over seeds
            tag = f'{name}_seed{seed}'
            pre_dir, eval_dir = out / f'pretrain_{tag}', out / f'zeroshot_{tag}'
            seconds[f'pretrain_{tag}'] = run_step(
                f'e. pretrain {tag}', py + ['pretrain.py', '--config', 'configs/toy/pretrain.yaml', '--output_dir',
                                            str(pre_dir), *train, '--seed', str(seed), '--options', *data_opts,
                                            f'train_file=[{train_file}]', f'max_epoch={args.pretrain_epochs}'],
                out / f'pretrain_{tag}.log', pre_dir / 'checkpoint_last.pth', args.fresh, env, workdir=pre_dir)
            seconds[f'zeroshot_{tag}'] = run_step(
                f'e. zero-shot retrieval {tag}', py + ['train_retrieval.py', '--config', 'configs/toy/retrieval.yaml',
                                                       '--output_dir', str(eval_dir), '--evaluate', *common,
                                                       '--options', *data_opts, f'ann_root={ann}',
                                                       f'pretrained={pre_dir}/checkpoint_last.pth'],
                out / f'zeroshot_{tag}.log', eval_dir / 'evaluate.txt', args.fresh, env)
            stats = last_json_line(eval_dir / 'evaluate.txt')
            runs.append({'seed': seed, **{k: v for k, v in stats.items() if k.startswith('test_')}})
        steps = last_json_line(out / f'pretrain_{name}_seed{args.seeds[0]}' / 'train_log.jsonl').get('steps')
        means = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0] if k.startswith('test_')}
        retrieval[name] = {'pretrain_steps_per_epoch': steps, **means, 'runs': runs}

    results = {'capfilt_summary': {k: v for k, v in summary.items() if not isinstance(v, (list,))},
               'noise_removal': removal, 'pretrain_sizes': sizes, 'pretrain_epochs': args.pretrain_epochs,
               'zero_shot_retrieval': retrieval, 'seconds': seconds, 'human_pairs': args.human_pairs,
               'epochs': {'caption': args.caption_epochs, 'retrieval': args.retrieval_epochs},
               'filter_checkpoint': args.filter_checkpoint, 'seeds': args.seeds}
    (out / 'toy_capfilt_results.json').write_text(json.dumps(results, indent=2))
    print(json.dumps({'noise_removal': removal, 'pretrain_sizes': sizes, 'zero_shot_retrieval': retrieval},
                     indent=2), flush=True)
    return results


if __name__ == '__main__':
    from engine.errors import run_script
    run_script(main, sys.argv[1:])  # a user error: one message, exit 2/1 (traceback with --debug)
