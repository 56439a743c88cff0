"""VQA accuracy: the standard 10-annotator formula after the official answer normalisation, computed locally.

Called by train_vqa.py and eval_videoqa.py (``vqa_accuracy``); ``normalize_vqa_answer`` is the normalisation.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

__all__ = ['normalize_vqa_answer', 'vqa_accuracy']


# A documented subset of the official VQA answer normalisation (VQA v2 evaluation code's rules).
_NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_ARTICLES = frozenset({'a', 'an', 'the'})
_CONTRACTIONS = {'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldnt': "couldn't", 'didnt': "didn't",
                 'doesnt': "doesn't", 'dont': "don't", 'hadnt': "hadn't", 'hasnt': "hasn't", 'havent': "haven't",
                 'hes': "he's", 'im': "i'm", 'isnt': "isn't", 'itd': "it'd", 'itll': "it'll", "let's": "let's",
                 'shouldnt': "shouldn't", 'thats': "that's", 'theres': "there's", 'theyre': "they're",
                 'wasnt': "wasn't", 'werent': "weren't", 'whats': "what's", 'wont': "won't", 'wouldnt': "wouldn't",
                 'youre': "you're", 'youve': "you've"}
_PUNCT = r"""[;/\[\]"{}()=+\\_\-><@`,?!*#%&^|~:]"""
_DIGIT_COMMA = re.compile(r'(?<=\d),(?=\d)')
_PERIOD_NOT_DECIMAL = re.compile(r'(?<!\d)\.|\.(?!\d)')   # keeps decimal points only
_INNER_PUNCT = re.compile(rf'(?<=\w){_PUNCT}(?=\w)')
_ANY_PUNCT = re.compile(_PUNCT)


def normalize_vqa_answer(answer: str) -> str:
    """Lower-case; ``1,000`` -> ``1000``; periods dropped unless decimal points; punctuation inside a word ->
    space (``t-shirt`` -> ``t shirt``), elsewhere removed; number words zero..ten -> digits; articles a/an/the
    dropped; common apostrophe-less contractions restored (``dont`` -> ``don't``); whitespace collapsed.

    Unlike the official script, which normalises only when the annotators disagree, this is always applied
    (to the prediction and to every annotator answer): answers that differ only in these respects match.
    """
    s = answer.replace('\n', ' ').replace('\t', ' ').strip().lower()
    s = _DIGIT_COMMA.sub('', s)
    s = _PERIOD_NOT_DECIMAL.sub('', s)
    s = _INNER_PUNCT.sub(' ', s)
    s = _ANY_PUNCT.sub('', s)
    words = []
    for w in s.split():
        w = _NUMBER_WORDS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return ' '.join(words)


def _annotator_answers(entry: Mapping) -> list[str]:
    """An annotation's answers: a list of strings, a list of ``{'answer': ...}`` (official format) or one string."""
    raw = entry.get('answer', entry.get('answers'))
    if raw is None:
        raise KeyError(f"VQA annotation of question {entry.get('question_id')!r} has no 'answer'/'answers'")
    raw = [raw] if isinstance(raw, str) else raw
    answers = [a['answer'] if isinstance(a, Mapping) else a for a in raw]
    if not answers:
        raise ValueError(f"VQA annotation of question {entry.get('question_id')!r} has no answers")
    return answers


def _question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the leave-one-annotator-out subsets of ``min(1, matches / 3)`` (in [0, 1]).

    With a single answer there is no subset to leave one out of: the score is exact match (1 or 0).
    """
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    # leaving out a matching annotator removes one match; leaving out another one keeps them all
    per_subset = [min(1.0, (matches - (g == pred)) / 3.0) for g in gts]
    return sum(per_subset) / len(per_subset)


def vqa_accuracy(results: list, annotations: list) -> float:
    """Standard VQA accuracy (percent) of ``[{'question_id', 'answer'}]`` against annotations holding
    ``question_id`` and the annotators' ``answer`` list (as data/vqa_dataset.py and data/toy.py write them)."""
    by_id = {a['question_id']: a for a in annotations}
    if not results:
        raise ValueError('vqa_accuracy: no results')
    total = 0.0
    for r in results:
        qid = r['question_id']
        if qid not in by_id:
            raise KeyError(f'vqa_accuracy: question_id {qid!r} of the results is not in the annotations')
        total += _question_accuracy(str(r['answer']), _annotator_answers(by_id[qid]))
    return 100.0 * total / len(results)
