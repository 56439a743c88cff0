"""Text cleaning exactly as the original BLIP (reference 7.2), annotation downloads."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

# Characters the original removes from captions and questions (reference 7.2). Commas,
# apostrophes, '?', '-' and '/' are deliberately kept.
_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
_WHITESPACE_RUN = re.compile(r'\s{2,}')

ANNOTATION_BASE_URL = 'https://storage.googleapis.com/sfr-vision-language-research/datasets/'


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Normalise a caption the way the original does.

    Lower-case, replace each of ``. ! " ( ) * # : ; ~`` by a space, collapse runs of two or more
    whitespace characters into one space, strip, and keep the first ``max_words`` words.

    Args:
        caption: raw caption text.
        max_words: number of space-separated words kept.

    Returns:
        The cleaned caption.
    """
    caption = _PUNCTUATION.sub(' ', caption.lower())
    caption = _WHITESPACE_RUN.sub(' ', caption)
    caption = caption.rstrip('\n').strip(' ')
    words = caption.split(' ')
    if len(words) > max_words:
        caption = ' '.join(words[:max_words])
    return caption


def pre_question(question: str, max_ques_words: int = 50) -> str:
    """Normalise a VQA question the way the original does.

    Lower-case, delete (no replacement) each of ``. ! " ( ) * # : ; ~``, strip trailing spaces and
    keep the first ``max_ques_words`` words. Whitespace runs are *not* collapsed, and '?' is kept.

    Args:
        question: raw question text.
        max_ques_words: number of space-separated words kept.

    Returns:
        The cleaned question.
    """
    question = _PUNCTUATION.sub('', question.lower()).rstrip(' ')
    words = question.split(' ')
    if len(words) > max_ques_words:
        question = ' '.join(words[:max_ques_words])
    return question


def download_url(url: str, root: str) -> None:
    """Fetch ``url`` into folder ``root`` (torchvision's downloader, as the original uses)."""
    from torchvision.datasets.utils import download_url as tv_download_url

    tv_download_url(url, root)


def ensure_annotation(filename: str, ann_root: str) -> str:
    """Return ``ann_root/filename``, downloading it from BLIP's dataset bucket when missing.

    The original downloads every annotation file on construction; a file already present is used
    as is, so offline runs work once the files are in place.

    Args:
        filename: annotation file name, e.g. ``coco_karpathy_train.json``.
        ann_root: folder holding the annotation files.

    Returns:
        The local path of the file.
    """
    path = os.path.join(ann_root, filename)
    if not os.path.isfile(path):
        url = ANNOTATION_BASE_URL + filename
        folder = Path(ann_root or '.').absolute()
        made = next((d for d in reversed([folder, *folder.parents]) if not d.exists()), None)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            download_url(url, ann_root)
        except Exception as e:  # offline, a proxy, a typo in ann_root: name the local file, not only the URL
            if made is not None:  # a mistyped ann_root leaves no folders behind
                shutil.rmtree(made, ignore_errors=True)
            raise FileNotFoundError(f'annotation file {path} is missing and downloading {url} failed '
                                    f'({type(e).__name__}: {e}); put the file there or check ann_root') from None
        if not os.path.isfile(path):
            raise FileNotFoundError(f'annotation file {path} is missing and downloading '
                                    f'{ANNOTATION_BASE_URL + filename} did not produce it')
    return path
