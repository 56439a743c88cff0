"""Zero-shot text-video retrieval on MSRVTT (1k-A) with an image-text retrieval model.

Each video is ``num_frm_test`` frames: its ITC feature is the mean of the frames' features, and the ITM
re-rank attends to all frames' tokens concatenated (original eval_retrieval_video.py).

    torchrun --nproc_per_node=8 eval_retrieval_video.py --config configs/retrieval_msrvtt.yaml --output_dir output/msrvtt
    python eval_retrieval_video.py --config configs/toy/retrieval_video.yaml --output_dir output/toy_video
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from engine.config import VisionConfig
from engine.retrieval_eval import evaluation_retrieval_video, itm_eval_video
from engine.runner import Run
from models.blip_retrieval import blip_retrieval


@dataclass
class VideoRetrievalConfig(VisionConfig):
    video_root: str = ''
    ann_root: str = ''
    pretrained: str = ''
    batch_size: int = 64
    k_test: int = 128
    num_frm_test: int = 8
    queue_size: int = 57600


def main(argv: Optional[list[str]] = None) -> dict:
    run = Run.start(argv, VideoRetrievalConfig, description=__doc__, trains=False)
    config = run.config
    test_set = run.datasets('retrieval_msrvtt')
    test_set = test_set[0] if isinstance(test_set, (tuple, list)) else test_set
    (test_loader,) = run.loaders([test_set], [False], [config.batch_size], distributed_eval=False)
    model = blip_retrieval(pretrained=config.pretrained, queue_size=config.queue_size, **config.model_kwargs())
    model = model.to(run.device).eval()
    score_v2t, score_t2v = evaluation_retrieval_video(model, test_loader, model.tokenizer, run.device,
                                                      config.k_test, amp_dtype=run.amp_dtype)
    stats = itm_eval_video(score_v2t, score_t2v, test_set.txt2video, test_set.video2txt) if run.is_main else {}
    run.log(stats, 'test_result.txt')
    run.finish()
    return stats


if __name__ == '__main__':
    from engine.errors import run_script
    run_script(main, sys.argv[1:])  # a user error: one message, exit 2/1 (traceback with --debug)
