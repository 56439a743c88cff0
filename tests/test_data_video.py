"""VideoDataset on a real mp4 written with PyAV; the original's frame sampling."""
import json
import random

import av
import numpy as np
import pytest
import torch

from data import create_dataset
from data.loading import BadSampleError
from data.video_dataset import VideoDataset, sample_frame_indices
from transform import CLIP_MEAN, CLIP_STD


def write_mp4(path, frames=10, size=32):
    """Frame t is a flat grey of level 20*t, so decoded frames reveal their index."""
    with av.open(str(path), mode='w') as container:
        stream = container.add_stream('mpeg4', rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = 'yuv420p'
        stream.codec_context.options = {'qscale': '1'}
        for t in range(frames):
            frame = np.full((size, size, 3), 20 * t, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_uniform_sampling_uses_an_integer_step():
    assert sample_frame_indices(100, 8, 'uniform') == [0, 12, 24, 36, 48, 60, 72, 84]
    assert sample_frame_indices(3, 8, 'uniform') == [0] * 8
    assert sample_frame_indices(10, 4, 'uniform') == [0, 2, 4, 6]


def test_random_strategies():
    random.seed(0)
    rand = sample_frame_indices(50, 6, 'rand')
    assert rand == sorted(rand) and len(set(rand)) == 6
    head_tail = sample_frame_indices(50, 6, 'headtail')
    assert all(i < 25 for i in head_tail[:3]) and all(i >= 25 for i in head_tail[3:])
    with pytest.raises(ValueError, match='unknown frame sampling'):
        sample_frame_indices(50, 6, 'middle')


@pytest.fixture
def msrvtt(tmp_path):
    (tmp_path / 'videos').mkdir()
    write_mp4(tmp_path / 'videos' / 'video7010.mp4')
    (tmp_path / 'videos' / 'video7011.mp4').write_bytes(b'\x00' * 100)
    lines = [{'clip_name': 'video7010', 'caption': 'A red circle, moving!'},
             {'clip_name': 'video7011', 'caption': 'broken'}]
    (tmp_path / 'msrvtt_test.jsonl').write_text('\n'.join(json.dumps(x) for x in lines) + '\n')
    return tmp_path


def test_video_item(msrvtt):
    ds = VideoDataset(str(msrvtt / 'videos'), str(msrvtt), num_frm=4, frm_sampling_strategy='uniform',
                      max_img_size=16)
    assert ds.text == ['a red circle, moving', 'broken'] and ds.txt2video == [0, 1] == ds.video2txt
    video, name = ds[0]
    assert name == 'video7010' and video.shape == (4, 3, 16, 16)
    # uniform picks frames 0, 2, 4, 6 of 10; undo the normalisation to read their grey levels.
    grey = video[:, 0].mean(dim=(1, 2)) * CLIP_STD[0] + CLIP_MEAN[0]
    assert torch.allclose(grey * 255, torch.tensor([0.0, 40.0, 80.0, 120.0]), atol=6)


def test_corrupt_video_error_and_skip(msrvtt):
    ds = VideoDataset(str(msrvtt / 'videos'), str(msrvtt), num_frm=2, frm_sampling_strategy='uniform',
                      max_img_size=8)
    with pytest.raises(BadSampleError, match=r'video7011\.mp4.*annotation index 1'):
        ds[1]
    config = {'video_root': str(msrvtt / 'videos'), 'ann_root': str(msrvtt), 'num_frm_test': 2, 'image_size': 8,
              'skip_bad_samples': True}
    # the video set is an evaluation gallery: a replaced clip would be scored under another id, so it stops
    evaluation = create_dataset('retrieval_msrvtt', config)
    with pytest.raises(BadSampleError, match=r'video7011\.mp4'):
        evaluation[1]
    skipping = VideoDataset(str(msrvtt / 'videos'), str(msrvtt), num_frm=2, frm_sampling_strategy='uniform',
                            max_img_size=8, skip_bad_samples=True)
    assert skipping[1][1] == 'video7010' and skipping.num_bad_samples == 1
