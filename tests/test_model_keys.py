"""State-dict key names, shapes, dtypes and order of every model at the real ViT-B size equal the original's.

tests/reference_keys/*.txt were dumped from the original code (ViT-B, image_size 224, queue_size 8).
Models are built on the meta device: no memory, no init cost.
"""
from pathlib import Path

import pytest
import torch

from models.blip import BLIP_Base, BLIP_Decoder
from models.blip_itm import BLIP_ITM
from models.blip_pretrain import BLIP_Pretrain
from models.blip_retrieval import BLIP_Retrieval

REF = Path(__file__).parent / 'reference_keys'


def reference(name: str) -> list:
    return [tuple(line.rstrip('\n').split('\t')) for line in open(REF / f'{name}.txt') if not line.startswith('#')]


def ours(module) -> list:
    return [(k, str(list(v.shape)), str(v.dtype).replace('torch.', '')) for k, v in module.state_dict().items()]


BUILDERS = {
    'pretrain': lambda: BLIP_Pretrain(image_size=224, queue_size=8),
    'retrieval': lambda: BLIP_Retrieval(image_size=224, queue_size=8),
    'itm': lambda: BLIP_ITM(image_size=224),
    'base': lambda: BLIP_Base(image_size=224),
    'decoder': lambda: BLIP_Decoder(image_size=224),
}


@pytest.mark.parametrize('name', sorted(BUILDERS))
def test_keys_shapes_dtypes_and_order_equal_original(name):
    with torch.device('meta'):
        model = BUILDERS[name]()
    assert ours(model) == reference(name)


def test_vit_large_cross_attention_reads_1024_wide_image_tokens():
    with torch.device('meta'):
        decoder = BLIP_Decoder(image_size=224, vit='large')
    layer = decoder.text_decoder.bert.encoder.layer[0].crossattention.self.state_dict()
    assert layer['key.weight'].shape == (768, 1024) and layer['value.weight'].shape == (768, 1024)
    assert layer['query.weight'].shape == (768, 768)
