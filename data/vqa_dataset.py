"""VQA v2 / Visual Genome QA: training with weighted answers, test with question ids."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from data.loading import AnnotationError, RobustDataset, check_entries, join_root, load_image, load_json_list
from data.utils import ensure_annotation, pre_question

TRAIN_SCHEMA = {'image': str, 'question': str, 'answer': (list, str), 'dataset': str}
TEST_SCHEMA = {'image': str, 'question': str, 'question_id': (int, str)}
# A Visual Genome answer counts as one annotator out of five (reference 7.3).
VG_ANSWER_WEIGHT = 0.2


def answer_weights(answers: list) -> tuple[list, list]:
    """Distinct answers and their weights ``count / len(answers)``, in order of first appearance."""
    weights: dict = {}
    for answer in answers:
        weights[answer] = weights.get(answer, 0.0) + 1 / len(answers)
    return list(weights), list(weights.values())


class vqa_dataset(RobustDataset):
    """VQA items.

    train: ``(image, question, answers, weights)``; test: ``(image, question, question_id)``.

    Args:
        transform: image transform.
        ann_root: folder with the annotation files.
        vqa_root: image root of 'vqa' entries (COCO images).
        vg_root: image root of 'vg' entries (Visual Genome images).
        train_files: annotation file stems for training, e.g. ``['vqa_train', 'vqa_val', 'vg_qa']``.
        split: 'train' or 'test' (test reads ``vqa_test.json`` and ``answer_list.json``).
        skip_bad_samples: replace unreadable images by the next readable one.
    """

    def __init__(self, transform: Callable, ann_root: str, vqa_root: str, vg_root: str,
                 train_files: Sequence[str] = (), split: str = 'train', skip_bad_samples: bool = False):
        super().__init__(skip_bad_samples)
        if split not in ('train', 'test'):
            raise ValueError(f"unknown VQA split {split!r}; expected 'train' or 'test'")
        self.split, self.transform = split, transform
        self.vqa_root, self.vg_root = vqa_root, vg_root
        # (file, index within file) of every entry, for error messages.
        self.annotation, self.sources = [], []
        files = [f'{name}.json' for name in train_files] if split == 'train' else ['vqa_test.json']
        for filename in files:
            path = ensure_annotation(filename, ann_root)
            entries = load_json_list(path)
            check_entries(entries, TRAIN_SCHEMA if split == 'train' else TEST_SCHEMA, path)
            if split == 'train':
                _check_datasets(entries, path)
            self.annotation += entries
            self.sources += [(path, i) for i in range(len(entries))]
        if split == 'test':
            self.answer_list = load_json_list(ensure_annotation('answer_list.json', ann_root))

    def __len__(self) -> int:
        return len(self.annotation)

    def image_path(self, ann: dict) -> str:
        root = self.vg_root if ann.get('dataset') == 'vg' else self.vqa_root
        return join_root(root, ann['image'])

    def image_files(self) -> list[tuple[str, int, str]]:
        return [(self.image_path(ann), file_index, path) for ann, (path, file_index) in zip(self.annotation, self.sources)]

    def load_item(self, index: int):
        ann = self.annotation[index]
        path, file_index = self.sources[index]
        image = self.transform(load_image(self.image_path(ann), file_index, path))
        question = pre_question(ann['question'])
        if self.split == 'test':
            return image, question, ann['question_id']
        if ann['dataset'] == 'vqa':
            answers, weights = answer_weights(ann['answer'])
        else:
            answers, weights = [ann['answer']], [VG_ANSWER_WEIGHT]
        return image, question, answers, weights


def _check_datasets(entries: list, path: str) -> None:
    for i, ann in enumerate(entries):
        if ann['dataset'] not in ('vqa', 'vg'):
            raise AnnotationError(f"{path}: entry {i} key 'dataset' has value {ann['dataset']!r}, "
                                  f"expected 'vqa' or 'vg'")
        if ann['dataset'] == 'vqa' and (not isinstance(ann['answer'], list) or not ann['answer']):
            raise AnnotationError(f"{path}: entry {i} ('vqa') key 'answer' must be a non-empty list, "
                                  f"got {ann['answer']!r}")


def vqa_collate_fn(batch: list) -> tuple[torch.Tensor, list, list, torch.Tensor, list]:
    """Stack images and flatten the per-question answer lists.

    Returns:
        ``(images [B, 3, H, W], questions, answers (flattened), weights [sum(n)], n)`` where ``n``
        is the number of answers of each question.
    """
    images, questions, answers, weights, n = [], [], [], [], []
    for image, question, answer, weight in batch:
        images.append(image)
        questions.append(question)
        answers += answer
        weights += weight
        n.append(len(answer))
    return torch.stack(images, dim=0), questions, answers, torch.tensor(weights, dtype=torch.float), n
