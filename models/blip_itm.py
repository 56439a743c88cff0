"""BLIP image-text matching scorer (``BLIP_ITM``, reference 5.6): ITM logits or ITC cosine similarities.

Same factory, constructor, keys and ``forward(image, caption, match_head='itm')`` as the original,
plus ``itm_first_token``: the original's 'itm' head feeds the text with ``[CLS]`` first, although ITM
was trained (pretraining, retrieval) and is evaluated (retrieval re-ranking) with ``[ENC]`` first
(quirk 10.4.3; LAVIS fixed it the same way). We default to ``'enc'``, the token the head was trained
with; ``itm_first_token='cls'`` reproduces the original (and transformers' ``BlipForImageTextRetrieval``)
exactly.

Similarity API (one call scores many pairs; the three scores users ask for):

    model = blip_itm(pretrained='model_base_retrieval_coco.pth').eval()
    scores = model.pair_scores(images, ['a dog on a beach', 'a red car'])   # image b with caption b
    scores.itc   # [B] cosine of the ITC embeddings, in [-1, 1]: fast, for ranking many candidates
    scores.itm   # [B] ITM match probability, in [0, 1]: "does this caption describe this image?"
    scores.sum   # [B] ITM match logit + ITC cosine: what the retrieval evaluation ranks by (original protocol)
    model.image_features(images) @ model.text_features(texts).T   # [B_img, B_txt] ITC cosines, all against all

A single image ``[1, 3, S, S]`` is scored against every caption (its ViT runs once).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from models.blip import init_tokenizer, load_med_config
from models.layout import load_pretrained
from models.med import MED
from models.objectives import fp32, project
from models.vit import create_vit

FIRST_TOKENS = ('enc', 'cls')
TEXT_MAX_LENGTH = 35


class PairScores(NamedTuple):
    """Scores of B (image, text) pairs, each ``[B]`` fp32."""
    itc: torch.Tensor   # cosine similarity of the ITC embeddings, in [-1, 1]
    itm: torch.Tensor   # ITM match probability, softmax(itm_head)[:, 1], in [0, 1]
    sum: torch.Tensor   # ITM match logit + ITC cosine: the retrieval protocol's ranking score


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

    # ------------------------------------------------------------------------------------ similarity API

    def _tokens(self, texts: Union[str, Sequence[str]], device: torch.device):
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, padding='max_length', truncation=True, max_length=TEXT_MAX_LENGTH,
                              return_tensors='pt').to(device)

    def image_features(self, image: torch.Tensor, image_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ITC image embeddings ``[B, embed_dim]``, unit norm, fp32 (``image_embeds``: precomputed ViT tokens)."""
        embeds = self.visual_encoder(image) if image_embeds is None else image_embeds
        return project(self.vision_proj, embeds[:, 0])

    def text_features(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """ITC text embeddings ``[T, embed_dim]``, unit norm, fp32 (unimodal text encoder, ``[CLS]`` first)."""
        text = self._tokens(texts, self.text_proj.weight.device)
        out = self.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text')
        return project(self.text_proj, out.last_hidden_state[:, 0])

    def pair_scores(self, image: torch.Tensor, texts: Union[str, Sequence[str]]) -> PairScores:
        """ITC cosine, ITM match probability and their retrieval sum for pairs (image b, text b).

        Args:
            image: ``[B, 3, S, S]``, or ``[1, 3, S, S]`` to score one image against every text.
            texts: B strings (or one).
        """
        text = self._tokens(texts, image.device)
        n = text.input_ids.shape[0]
        embeds = self.visual_encoder(image)
        if embeds.shape[0] == 1 and n > 1:
            embeds = embeds.expand(n, -1, -1)
        if embeds.shape[0] != n:
            raise ValueError(f'pair_scores: {embeds.shape[0]} images for {n} texts (give B of each, or one image)')
        text_out = self.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text')
        with fp32(image.device):
            text_feat = project(self.text_proj, text_out.last_hidden_state[:, 0])
            itc = (self.image_features(image, embeds) * text_feat).sum(-1)
        ids = text.input_ids.clone()
        if self.itm_first_token == 'enc':
            ids[:, 0] = self.tokenizer.enc_token_id
        out = self.text_encoder(ids, attention_mask=text.attention_mask, encoder_hidden_states=embeds,
                                mode='multimodal')
        logits = self.itm_head(out.last_hidden_state[:, 0]).float()
        return PairScores(itc=itc, itm=logits.softmax(-1)[:, 1], sum=logits[:, 1] + itc)


def blip_itm(pretrained: str = '', **kwargs) -> BLIP_ITM:
    """Build BLIP_ITM; a checkpoint (pretrain, retrieval or ITM layout) must provide every key.

    Momentum encoders, queues, ``temp`` and a pretrain decoder are unused and reported as dropped.
    """
    model = BLIP_ITM(**kwargs)
    load_pretrained(model, pretrained, 'blip_itm')
    return model
