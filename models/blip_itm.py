"""BLIP image-text matching scorer (``BLIP_ITM``, reference 5.6): ITM logits or ITC cosine similarities.

Same factory, constructor, keys and ``forward(image, caption, match_head='itm')`` as the original,
plus ``itm_first_token``: the original's 'itm' head feeds the text with ``[CLS]`` first, although ITM
was trained (pretraining, retrieval) and is evaluated (retrieval re-ranking) with ``[ENC]`` first
(quirk 10.4.3; LAVIS fixed it the same way). We default to ``'enc'``, the token the head was trained
with; ``itm_first_token='cls'`` reproduces the original (and transformers' ``BlipForImageTextRetrieval``)
exactly.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from models.blip import init_tokenizer, load_med_config
from models.layout import load_pretrained
from models.med import MED
from models.objectives import fp32, project
from models.vit import create_vit

FIRST_TOKENS = ('enc', 'cls')


class BLIP_ITM(nn.Module):
    """ViT + MED encoder with ITC projections and the ITM head.

    Args:
        med_config, image_size, vit, vit_grad_ckpt, vit_ckpt_layer, embed_dim: as the original.
        itm_first_token: 'enc' (default, as in training) or 'cls' (the original's BLIP_ITM).
    """

    def __init__(self, med_config='configs/med_config.json', image_size: int = 384, vit='base',
                 vit_grad_ckpt: bool = False, vit_ckpt_layer: int = 0, embed_dim: int = 256,
                 itm_first_token: str = 'enc'):
        super().__init__()
        if itm_first_token not in FIRST_TOKENS:
            raise ValueError(f'itm_first_token must be one of {FIRST_TOKENS}, got {itm_first_token!r}')
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        self.tokenizer = init_tokenizer()
        config = load_med_config(med_config, encoder_width=vision_width)
        self.text_encoder = MED(config)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(config.hidden_size, embed_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.itm_first_token = itm_first_token

    def forward(self, image: torch.Tensor, caption: Union[str, Sequence[str]], match_head: str = 'itm',
                itm_first_token: Optional[str] = None) -> torch.Tensor:
        """Score image-text pairs.

        Args:
            image: [B, 3, S, S]. caption: B strings (pair b is image b with caption b).
            match_head: 'itm' -> ITM logits [B, 2] (softmax[:, 1] = match probability);
                'itc' -> cosine similarities [B_img, B_txt] of the projected [CLS] features (no temperature).
            itm_first_token: overrides the constructor's choice for this call.
        """
        if match_head not in ('itm', 'itc'):
            raise ValueError(f"match_head must be 'itm' or 'itc', got {match_head!r}")
        first = itm_first_token or self.itm_first_token
        if first not in FIRST_TOKENS:
            raise ValueError(f'itm_first_token must be one of {FIRST_TOKENS}, got {first!r}')
        image_embeds = self.visual_encoder(image)                                          # [B, N, Dv]
        text = self.tokenizer(caption, padding='max_length', truncation=True, max_length=35,
                              return_tensors='pt').to(image.device)
        if match_head == 'itm':
            ids = text.input_ids
            if first == 'enc':
                ids = ids.clone()
                ids[:, 0] = self.tokenizer.enc_token_id
            out = self.text_encoder(ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                    mode='multimodal')
            return self.itm_head(out.last_hidden_state[:, 0]).float()                      # [B, 2]
        text_out = self.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text')
        image_feat = project(self.vision_proj, image_embeds[:, 0])
        text_feat = project(self.text_proj, text_out.last_hidden_state[:, 0])
        with fp32(image.device):
            return image_feat @ text_feat.T                                                # [B_img, B_txt]


def blip_itm(pretrained: str = '', **kwargs) -> BLIP_ITM:
    """Build BLIP_ITM; a checkpoint (pretrain, retrieval or ITM layout) must provide every key.

    Momentum encoders, queues, ``temp`` and a pretrain decoder are unused and reported as dropped.
    """
    model = BLIP_ITM(**kwargs)
    load_pretrained(model, pretrained, 'blip_itm')
    return model
