"""MSRVTT-style video retrieval test set, decoded with PyAV."""
from __future__ import annotations

import random

import av
import numpy as np
import torch
from torchvision.transforms import v2

from data.loading import BadSampleError, RobustDataset, check_entries, join_root, load_json_list
from data.utils import ensure_annotation, pre_caption
from transform import CLIP_MEAN, CLIP_STD

SCHEMA = {'clip_name': str, 'caption': str}
STRATEGIES = ('uniform', 'rand', 'headtail')


def sample_frame_indices(vlen: int, num_frm: int, strategy: str) -> list[int]:
    """Frame indices to decode, as the original chooses them.

    'uniform' is ``np.arange(0, vlen, vlen / num_frm, dtype=int)``: numpy casts the step to an
    integer, so vlen 100 and 8 frames give 0, 12, ..., 84, and a clip shorter than ``num_frm``
    repeats frame 0. 'rand' is a sorted random sample; 'headtail' samples half from each half.

    Args:
        vlen: number of frames in the video.
        num_frm: number of frames wanted.
        strategy: 'uniform', 'rand' or 'headtail'.
    """
    if strategy == 'uniform':
        return np.arange(0, vlen, vlen / num_frm, dtype=int)[:num_frm].tolist()
    if strategy == 'rand':
        return sorted(random.sample(range(vlen), num_frm))
    if strategy == 'headtail':
        head = sorted(random.sample(range(vlen // 2), num_frm // 2))
        tail = sorted(random.sample(range(vlen // 2, vlen), num_frm // 2))
        return head + tail
    raise ValueError(f'unknown frame sampling strategy {strategy!r}; expected one of {STRATEGIES}')


def read_frames(path: str, num_frm: int, strategy: str, size: int) -> np.ndarray:
    """Decode ``num_frm`` frames of a video, each squashed to ``size x size`` RGB.

    Returns:
        uint8 array ``[num_frm, size, size, 3]``.
    """
    with av.open(path) as container:
        stream = container.streams.video[0]
        vlen = stream.frames or sum(1 for _ in container.decode(stream))
        if vlen == 0:
            raise ValueError('the video has no frames')
        indices = sample_frame_indices(vlen, num_frm, strategy)
        container.seek(0)
        wanted, needed, final = {}, set(indices), max(indices)
        for i, frame in enumerate(container.decode(stream)):
            if i in needed:
                wanted[i] = frame.to_ndarray(format='rgb24', width=size, height=size)
            if i >= final:
                break
    # The container's frame count can exceed what decodes; such indices take the last decoded frame.
    last = wanted[max(wanted)] if wanted else None
    if last is None:
        raise ValueError('no frame could be decoded')
    return np.stack([wanted.get(i, last) for i in indices])


class VideoDataset(RobustDataset):
    """``(frames [num_frm, 3, S, S] normalised with CLIP stats, clip_name)`` from ``msrvtt_test.jsonl``.

    Attributes:
        text: captions (``pre_caption(caption, 40)``), one per video.
        txt2video, video2txt: identity maps (one caption per video).

    Args:
        video_root: folder of the videos (``clip_name + video_fmt``).
        ann_root: folder with ``msrvtt_test.jsonl``.
        num_frm: frames per video.
        frm_sampling_strategy: 'uniform', 'rand' or 'headtail'.
        max_img_size: frames are resized to ``max_img_size x max_img_size``.
        video_fmt: file extension of the videos.
        skip_bad_samples: replace unreadable videos by the next readable one.
    """

    filename = 'msrvtt_test.jsonl'

    def __init__(self, video_root: str, ann_root: str, num_frm: int = 4, frm_sampling_strategy: str = 'rand',
                 max_img_size: int = 384, video_fmt: str = '.mp4', skip_bad_samples: bool = False):
        super().__init__(skip_bad_samples)
        if frm_sampling_strategy not in STRATEGIES:
            raise ValueError(f'unknown frame sampling strategy {frm_sampling_strategy!r}; expected one of {STRATEGIES}')
        self.ann_file = ensure_annotation(self.filename, ann_root)
        self.annotation = load_json_list(self.ann_file)
        check_entries(self.annotation, SCHEMA, self.ann_file)
        self.video_root, self.num_frm, self.frm_sampling_strategy = video_root, num_frm, frm_sampling_strategy
        self.max_img_size, self.video_fmt = max_img_size, video_fmt
        self.text = [pre_caption(ann['caption'], 40) for ann in self.annotation]
        self.txt2video = list(range(len(self.annotation)))
        self.video2txt = self.txt2video
        self.transform = v2.Normalize(CLIP_MEAN, CLIP_STD)

    def __len__(self) -> int:
        return len(self.annotation)

    def load_item(self, index: int):
        ann = self.annotation[index]
        path = join_root(self.video_root, ann['clip_name'] + self.video_fmt)
        try:
            frames = read_frames(path, self.num_frm, self.frm_sampling_strategy, self.max_img_size)
        except (OSError, ValueError, av.FFmpegError) as e:
            raise BadSampleError(f'cannot read video {path} (annotation index {index} of {self.ann_file}): '
                                 f'{type(e).__name__}: {e}', path=path) from e
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
        return self.transform(video), ann['clip_name']
