"""BLIP for NLVR2 (``BLIP_NLVR``, reference 5.8): is a sentence true of a pair of images?

ViT encodes both images in one pass; the text encoder is the one MED module built with
``twin_cross_attention=True`` (the original's separate ``nlvr_encoder.py``, here a config flag):
every layer cross-attends to each image with its own attention (``self0``/``self1``) and output
projection (``dense0``/``dense1``), then averages the two (first half of the layers) or merges them
with a learned ``merge_layer`` (second half). ``cls_head`` classifies the ``[ENC]`` state.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.blip import init_tokenizer, load_med_config
from models.blip_pretrain import TextBatch
from models.layout import load_pretrained
from models.med import MED
from models.vit import create_vit

# (single cross-attention key fragment, its two NLVR2 copies): the original loader's string replaces
TWIN_SWAPS = (('crossattention.self.', ('crossattention.self0.', 'crossattention.self1.')),
              ('crossattention.output.dense.', ('crossattention.output.dense0.', 'crossattention.output.dense1.')))


def expand_twin_cross_attention(state_dict: Mapping[str, torch.Tensor], prefix: str = 'text_encoder.') -> dict:
    """Pretrain/retrieval layout -> NLVR2 layout: copy each cross-attention to both images.

    Every ``{prefix}...crossattention.self.*`` key becomes ``...self0.*`` and ``...self1.*``;
    every ``...crossattention.output.dense.*`` becomes ``dense0``/``dense1`` (``output.LayerNorm`` is
    shared and keeps its name). The single-image keys are consumed. A checkpoint already in NLVR2
    layout has no such keys and passes unchanged; existing twin keys are never overwritten.
    ``merge_layer`` has no counterpart and stays at its initialisation, as in the original.
    """
    out = dict(state_dict)
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        for single, twins in TWIN_SWAPS:
            if single in key:
                del out[key]
                for twin in twins:
                    out.setdefault(key.replace(single, twin), value)
    return out


class BLIP_NLVR(nn.Module):
    """ViT + twin-cross-attention MED encoder + 2-way classifier.

    Args:
        med_config: MED config (json path, dict or MEDConfig); ``twin_cross_attention`` is set here.
        image_size, vit, vit_grad_ckpt, vit_ckpt_layer: ViT options (drop path 0.1).
    """

    def __init__(self, med_config='configs/med_config.json', image_size: int = 480, vit='base',
                 vit_grad_ckpt: bool = False, vit_ckpt_layer: int = 0):
        super().__init__()
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer,
                                                       drop_path_rate=0.1)
        self.tokenizer = init_tokenizer()
        config = load_med_config(med_config, encoder_width=vision_width, twin_cross_attention=True)
        self.text_encoder = MED(config)
        H = config.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 2))

    def forward(self, image: torch.Tensor, text: Union[str, Sequence[str]], targets: torch.Tensor,
                train: bool = True) -> torch.Tensor:
        """Cross-entropy loss (train) or logits [B, 2] (class 1 = true).

        Args:
            image: ``cat([image0, image1])`` [2B, 3, S, S]: the B left images, then the B right ones.
            text: B sentences.
            targets: [B] labels (unused when ``train=False``).
        """
        tokens = self.tokenize(text, image.device)
        logits = self.logits(image, tokens.input_ids, tokens.attention_mask)
        return F.cross_entropy(logits, targets) if train else logits

    def tokenize(self, text: Union[str, Sequence[str]], device=None, length: Optional[int] = None):
        """The sentences' ids and mask, padded to the longest (as the original) or to ``length`` tokens: the fixed
        shape a replayed CUDA graph needs (same logits: padding is masked). A longer sentence is an error, never
        cut, so that the loss stays the original's."""
        tokens = self.tokenizer(text, padding='longest', return_tensors='pt')
        ids, mask = tokens.input_ids, tokens.attention_mask
        if length is not None:
            if ids.shape[1] > length:
                raise ValueError(f'a sentence has {ids.shape[1]} tokens, more than the fixed length {length}')
            ids = F.pad(ids, (0, length - ids.shape[1]), value=self.tokenizer.pad_token_id)
            mask = F.pad(mask, (0, length - mask.shape[1]), value=0)
        return TextBatch(ids.to(device), mask.to(device))

    def logits(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, 2] from ``cat([image0, image1])`` and tokenised sentences (``tokenize``); no host read."""
        if image.shape[0] % 2:
            raise ValueError(f'image must hold two images per example (cat([image0, image1])), got {image.shape[0]}')
        image0_embeds, image1_embeds = self.visual_encoder(image).chunk(2)              # each [B, N, Dv]
        ids = input_ids.clone()
        ids[:, 0] = self.tokenizer.enc_token_id
        out = self.text_encoder(ids, attention_mask=attention_mask, mode='multimodal',
                                encoder_hidden_states=[image0_embeds, image1_embeds],
                                encoder_attention_mask=[None, None])                    # image masks: all ones
        return self.cls_head(out.last_hidden_state[:, 0])                               # [B, 2]

    def losses(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
        """The training loss on tokenised sentences (``tokenize`` with a fixed ``length``: a CUDA graph's body)."""
        return F.cross_entropy(self.logits(image, input_ids, attention_mask), targets)

    def remap_checkpoint(self, state_dict: Mapping[str, torch.Tensor]) -> dict:
        """Called by ``load_checkpoint``: the twin expansion of a pretrain/retrieval checkpoint."""
        return expand_twin_cross_attention(state_dict)


def blip_nlvr(pretrained: str = '', **kwargs) -> BLIP_NLVR:
    """Build BLIP_NLVR, optionally loading a checkpoint (URL or local path; the original's loader
    could not read local paths, quirk 10.4.2).

    A pretrain/retrieval checkpoint leaves exactly ``merge_layer`` and ``cls_head`` at their
    initialisation; an NLVR2 checkpoint leaves nothing. Anything else missing is an error.
    """
    model = BLIP_NLVR(**kwargs)
    load_pretrained(model, pretrained, 'blip_nlvr')
    return model
