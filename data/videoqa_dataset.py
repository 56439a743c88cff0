"""MSRVTT-QA / MSVD-QA style video question answering test set: ``(frames, question, question_id)``.

The published QA files are JSON lists (or JSON lines) of ``{"video_id", "question", "answer"}`` entries,
``"id"`` or ``"question_id"`` optional (default: the entry's index). The video of an entry is
``video_root / video_name.format(video_id) + video_fmt`` (MSRVTT-QA: ``video7010.mp4``); MSVD-QA numbers
its videos and ships ``youtube_mapping.txt`` (``-4wsuPCjDBc_5_15 vid1`` per line), which ``video_mapping``
names so that video 1 is read from ``-4wsuPCjDBc_5_15.avi``. Frames are decoded and sampled exactly as the
retrieval video set does (``data.video_dataset.read_frames``).
"""
from __future__ import annotations

import os

import av
import torch
from torchvision.transforms import v2

from data.loading import AnnotationError, BadSampleError, RobustDataset, check_entries, join_root, load_json_list
from data.utils import pre_question
from data.video_dataset import STRATEGIES, read_frames
from transform import CLIP_MEAN, CLIP_STD

SCHEMA = {'video_id': (int, str), 'question': str, 'answer': str}


def read_video_mapping(path: str) -> dict[str, str]:
    """``youtube_mapping.txt`` (``NAME vidN`` per line) -> ``{'vidN': NAME}``."""
    mapping = {}
    with open(path, encoding='utf-8') as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise AnnotationError(f'{path}: line {line_no} should be "NAME vidN", got {line.strip()!r}')
            mapping[parts[1]] = parts[0]
    return mapping


class videoqa_dataset(RobustDataset):
    """Video QA items ``(frames [num_frm, 3, S, S] CLIP-normalised, question, question_id)``.

    Attributes:
        annotation: the QA entries, each with a ``question_id`` (its ``id``/``question_id`` or its index).
        answer_list: the candidate answers ranked by ``inference: rank`` (empty when not given).

    Args:
        ann_file: the QA file (``.json`` list or ``.jsonl``).
        video_root: folder of the videos.
        answer_list: JSON list of candidate answers ('' = none: ``inference: generate`` only).
        num_frm: frames per video (the paper: 16 for QA).
        frm_sampling_strategy: 'uniform' (evaluation), 'rand' or 'headtail'.
        max_img_size: frames are resized to ``max_img_size x max_img_size``.
        video_fmt: file extension of the videos ('.mp4', MSVD: '.avi').
        video_name: ``str.format`` pattern of a video's file stem from its ``video_id``.
        video_mapping: MSVD's ``youtube_mapping.txt`` ('' = none).
    """

    def __init__(self, ann_file: str, video_root: str, answer_list: str = '', num_frm: int = 16,
                 frm_sampling_strategy: str = 'uniform', max_img_size: int = 384, video_fmt: str = '.mp4',
                 video_name: str = 'video{}', video_mapping: str = ''):
        super().__init__(False)   # an evaluation split: a replaced video would be scored under another's id
        if frm_sampling_strategy not in STRATEGIES:
            raise ValueError(f'unknown frame sampling strategy {frm_sampling_strategy!r}; expected one of {STRATEGIES}')
        for what, path in (('QA file', ann_file), ('answer_list', answer_list), ('video_mapping', video_mapping)):
            if path and not os.path.isfile(path):
                raise FileNotFoundError(f'{what} {path} does not exist')
        self.ann_file = ann_file
        self.annotation = load_json_list(ann_file)
        check_entries(self.annotation, SCHEMA, ann_file)
        for i, ann in enumerate(self.annotation):
            ann['question_id'] = ann.get('question_id', ann.get('id', i))
        ids = [ann['question_id'] for ann in self.annotation]
        if len(set(ids)) != len(ids):
            raise AnnotationError(f'{ann_file}: question ids (the "id"/"question_id" keys) are not unique')
        self.answer_list = [str(a) for a in load_json_list(answer_list)] if answer_list else []
        self.mapping = read_video_mapping(video_mapping) if video_mapping else None
        self.video_root, self.video_fmt, self.video_name = video_root, video_fmt, video_name
        self.num_frm, self.frm_sampling_strategy, self.max_img_size = num_frm, frm_sampling_strategy, max_img_size
        self.transform = v2.Normalize(CLIP_MEAN, CLIP_STD)

    def __len__(self) -> int:
        return len(self.annotation)

    def video_path(self, index: int) -> str:
        video_id = self.annotation[index]['video_id']
        if self.mapping is not None:
            key = f'vid{video_id}' if not str(video_id).startswith('vid') else str(video_id)
            if key not in self.mapping:
                raise AnnotationError(f'{self.ann_file}: entry {index} video_id {video_id!r} is not in the '
                                      f'video_mapping file')
            stem = self.mapping[key]
        else:
            stem = self.video_name.format(video_id)
        return join_root(self.video_root, stem + self.video_fmt)

    def load_item(self, index: int):
        ann = self.annotation[index]
        path = self.video_path(index)
        try:
            frames = read_frames(path, self.num_frm, self.frm_sampling_strategy, self.max_img_size)
        except (OSError, ValueError, av.FFmpegError) as e:
            raise BadSampleError(f'cannot read video {path} (entry {index} of {self.ann_file}): '
                                 f'{type(e).__name__}: {e}') from e
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
        return self.transform(video), pre_question(ann['question']), ann['question_id']


def videoqa_collate_fn(batch: list) -> tuple[torch.Tensor, list, list]:
    """``(videos [B, F, 3, S, S], questions, question ids)``; ids stay Python values (int or str)."""
    videos, questions, ids = zip(*batch)
    return torch.stack(videos), list(questions), list(ids)
