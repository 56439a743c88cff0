"""COCO caption metrics (Bleu_1-4, METEOR, ROUGE_L, CIDEr, SPICE) of a result file, with pycocoevalcap.

SPICE is optional: its CoreNLP models are downloaded on first use, impossible offline, so a failing SPICE
is reported as None with one warning while the other metrics are still returned.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import warnings
from typing import Any, Callable, Optional, Sequence

__all__ = ['coco_caption_eval', 'CAPTION_SCORERS', 'OPTIONAL_CAPTION_METRICS']


def _bleu():
    from pycocoevalcap.bleu.bleu import Bleu
    return Bleu(4)


def _meteor():
    from pycocoevalcap.meteor.meteor import Meteor
    return Meteor()


def _rouge():
    from pycocoevalcap.rouge.rouge import Rouge
    return Rouge()


def _cider():
    from pycocoevalcap.cider.cider import Cider
    return Cider()


def _spice():
    from pycocoevalcap.spice.spice import Spice
    # the constructor downloads Stanford CoreNLP (~400 MB) when missing: bound the wait on a dead network
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        return Spice()
    finally:
        socket.setdefaulttimeout(previous)


# (factory, metric names it returns). Module-level so tests (or users without SPICE) can replace entries.
CAPTION_SCORERS: list[tuple[Callable[[], Any], tuple[str, ...]]] = [
    (_bleu, ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4')),
    (_meteor, ('METEOR',)),
    (_rouge, ('ROUGE_L',)),
    (_cider, ('CIDEr',)),
    (_spice, ('SPICE',)),
]
# Metrics reported as None (with a warning) when their scorer fails, instead of failing the evaluation.
OPTIONAL_CAPTION_METRICS = frozenset({'SPICE'})
# Optional scorers that failed in this process, and why: not retried (SPICE's CoreNLP download was attempted and
# warned about 8 times per run), warned about once.
_FAILED_OPTIONAL: dict[tuple, str] = {}  # (factory, names) -> why


@contextlib.contextmanager
def _quiet_stdout():
    """pycocotools and the scorers print progress ('loading annotations into memory...', 'creating index...',
    Bleu's lengths, SPICE's download notice): ~40 lines per evaluation, kept out of the run's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _require_java() -> None:
    """PTBTokenizer, METEOR and SPICE are Java programs: fail early with the fix rather than deep inside."""
    if shutil.which('java') is None:
        raise RuntimeError('coco_caption_eval needs Java on PATH (pycocoevalcap runs the Stanford PTB tokenizer '
                           'and METEOR as Java programs): install a JRE, e.g. `apt-get install -y '
                           'default-jre-headless`')


def _load_caption_pairs(gt_file: str, results_file: str) -> tuple[dict, dict]:
    """GT and result captions per image id, restricted to the images present in the results."""
    from pycocotools.coco import COCO
    with open(results_file) as f:
        results = json.load(f)
    if not results:
        raise ValueError(f'coco_caption_eval: {results_file} holds no captions')
    with _quiet_stdout():
        coco = COCO(gt_file)
    missing = sorted({r['image_id'] for r in results} - set(coco.getImgIds()))
    if missing:
        raise ValueError(f'coco_caption_eval: image ids {missing[:10]} of {results_file} are not in {gt_file}')
    with _quiet_stdout():
        coco_res = coco.loadRes(results_file)
    img_ids = coco_res.getImgIds()
    gts = {i: coco.imgToAnns[i] for i in img_ids}
    res = {i: coco_res.imgToAnns[i] for i in img_ids}
    return gts, res


def _run_scorer(factory: Callable[[], Any], names: Sequence[str], gts: dict, res: dict) -> dict:
    """One scorer's corpus-level metrics as plain floats."""
    with _quiet_stdout():
        scorer = factory()
        score, _ = scorer.compute_score(gts, res)
    values = score if len(names) > 1 else [score]
    return {name: float(v) for name, v in zip(names, values)}


def coco_caption_eval(gt_file: str, results_file: str,
                      scorers: Optional[Sequence[tuple[Callable[[], Any], Sequence[str]]]] = None) -> dict:
    """COCO caption metrics of ``results_file`` (``[{"image_id", "caption"}]``) against a COCO-format GT file.

    Only the images present in the results are scored. Every scorer runs on its own (rather than through
    ``COCOEvalCap``) so that an optional metric (SPICE, which needs a CoreNLP download on first use) that
    fails is reported as None with a warning while the other metrics are still returned.

    Args:
        scorers: ``[(factory, metric names)]``; default ``CAPTION_SCORERS``.

    Returns:
        ``{'Bleu_1'..'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE'}`` -> float (or None for a failed optional one).
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    _require_java()
    gts, res = _load_caption_pairs(gt_file, results_file)
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    metrics: dict = {}
    for factory, names in (CAPTION_SCORERS if scorers is None else scorers):
        names = tuple(names)
        optional = set(names) <= OPTIONAL_CAPTION_METRICS
        if optional and (factory, names) in _FAILED_OPTIONAL:  # failed before in this run: not tried (nor warned) again
            metrics.update({name: None for name in names})
            continue
        try:
            metrics.update(_run_scorer(factory, names, gts, res))
        except Exception as e:  # noqa: BLE001 - any failure of an optional metric is reported, not fatal
            if not optional:
                raise
            _FAILED_OPTIONAL[factory, names] = f'{type(e).__name__}: {e}'
            warnings.warn(f'{"/".join(names)} unavailable ({type(e).__name__}: {e}); reported as None for the '
                          f'rest of this run', RuntimeWarning, stacklevel=2)
            metrics.update({name: None for name in names})
    for name, value in metrics.items():
        print(f'{name}: {"n/a" if value is None else f"{value:.3f}"}')
    return metrics
