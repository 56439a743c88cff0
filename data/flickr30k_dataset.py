"""Flickr30k (Karpathy splits): retrieval training and evaluation, same schemas as COCO."""
from __future__ import annotations

from data.coco_karpathy_dataset import coco_karpathy_retrieval_eval, coco_karpathy_train


class flickr30k_train(coco_karpathy_train):
    """``(image, prompt + caption, dense image index)`` from ``flickr30k_train.json``."""

    filename = 'flickr30k_train.json'


class flickr30k_retrieval_eval(coco_karpathy_retrieval_eval):
    """``(image, index)`` from ``flickr30k_{val,test}.json`` with ``text``/``txt2img``/``img2txt``."""

    filenames = {'val': 'flickr30k_val.json', 'test': 'flickr30k_test.json'}
