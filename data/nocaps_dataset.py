"""NoCaps validation/test images for caption generation."""
from __future__ import annotations

from typing import Callable

from data.loading import RobustDataset, check_entries, join_root, load_image, load_json_list
from data.utils import ensure_annotation

SCHEMA = {'image': str, 'img_id': (int, str)}


class nocaps_eval(RobustDataset):
    """``(image, int(img_id))`` from ``nocaps_{val,test}.json``.

    Args:
        transform: image transform.
        image_root: folder the ``image`` paths are relative to.
        ann_root: folder with the annotation files.
        split: 'val' or 'test'.
        skip_bad_samples: replace unreadable images by the next readable one.
    """

    filenames = {'val': 'nocaps_val.json', 'test': 'nocaps_test.json'}

    def __init__(self, transform: Callable, image_root: str, ann_root: str, split: str,
                 skip_bad_samples: bool = False):
        super().__init__(skip_bad_samples)
        if split not in self.filenames:
            raise ValueError(f'unknown split {split!r}; expected one of {sorted(self.filenames)}')
        self.ann_file = ensure_annotation(self.filenames[split], ann_root)
        self.annotation = load_json_list(self.ann_file)
        check_entries(self.annotation, SCHEMA, self.ann_file)
        self.transform, self.image_root = transform, image_root

    def __len__(self) -> int:
        return len(self.annotation)

    def load_item(self, index: int):
        ann = self.annotation[index]
        image = load_image(join_root(self.image_root, ann['image']), index, self.ann_file)
        return self.transform(image), int(ann['img_id'])
