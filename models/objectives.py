"""ITC and ITM objectives applied to a model's encoders, shared by pretraining, retrieval and ITM.

Projection to the contrastive space, momentum-distilled ITC against the feature queues, and the ITM rows of
positives and hard negatives.

The loss formulas themselves are pure functions in ``models/losses.py``; here they are applied to a model's
encoders, momentum twins and queues (the attributes ``BLIP_Pretrain`` and ``BLIP_Retrieval`` both have).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.losses import itc_loss, soft_targets
from models.med import MED
from models.momentum import all_gather_no_grad, get_rank, momentum_update


def fp32(device: torch.device):
    """Context with autocast off: contrastive similarities and their softmaxes stay in fp32."""
    return torch.autocast(device.type, enabled=False)


def project(proj: nn.Linear, cls: torch.Tensor) -> torch.Tensor:
    """L2-normalised fp32 projection of a [CLS] state: [B, D] -> [B, embed_dim]."""
    return F.normalize(proj(cls).float(), dim=-1)


def itm_first_tokens(text_encoder: MED, image_kv: list, neg_image_kv: list, ids, mask, neg_ids, neg_mask):
    """[3B, H] first-token states of the ITM rows, in the original's order: (image i, text i),
    (negative image of text i, text i), (image i, negative text of image i).

    ``image_kv``: per layer, the batch images' cross-attention keys/values (``MED.precompute_cross_kv``);
    ``neg_image_kv``: those of each text's negative image. An image's two rows (its text and its negative
    text) attend to its keys/values together, folded into one attention call (``models.med.Attention``),
    so neither the image tokens nor their keys/values are copied per row. Same function as the original's
    one pass over [3B] copies of the image tokens."""
    B = ids.shape[0]
    pair_ids = torch.stack([ids, neg_ids], 1).flatten(0, 1)                           # [2B, L], image-major
    pair_mask = torch.stack([mask, neg_mask], 1).flatten(0, 1)
    pair = text_encoder(pair_ids, attention_mask=pair_mask, cross_kv=image_kv, mode='multimodal')
    pair = pair.last_hidden_state[:, 0].view(B, 2, -1)
    swapped = text_encoder(ids, attention_mask=mask, cross_kv=neg_image_kv, mode='multimodal').last_hidden_state[:, 0]
    return torch.cat([pair[:, 0], swapped, pair[:, 1]])


def momentum_itc(model: nn.Module, image_embeds: torch.Tensor, image: torch.Tensor, text,
                 alpha: Union[float, torch.Tensor],
                 idx: Optional[torch.Tensor] = None):
    """ITC with momentum distillation and feature queues (reference 5.4 steps 2-5, 5.5), shared by
    BLIP_Pretrain and BLIP_Retrieval; updates the momentum encoders and enqueues as a side effect.

    Online features of the local batch are scored against ``[in-batch momentum features; queue]``:
    in-batch columns are the local batch (original) or every rank's (``model.itc_all_rank``). Hard
    targets are the diagonal, or with ``idx`` [B] every column showing the same image id (normalised).

    Returns:
        (loss_ita, image_feat [B,E], text_feat [B,E], sim_i2t [B,B], sim_t2i [B,B]) where the last two
        are the online-vs-momentum similarities of the local batch (detached; pretraining ITM weights).
    """
    image_feat = project(model.vision_proj, image_embeds[:, 0])                             # [B, E]
    text_out = model.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text')
    text_feat = project(model.text_proj, text_out.last_hidden_state[:, 0])                   # [B, E]
    B = image.shape[0]
    with torch.no_grad():
        momentum_update(model.model_pairs, model.momentum)
        image_feat_m = project(model.vision_proj_m, model.visual_encoder_m(image)[:, 0])
        text_out_m = model.text_encoder_m(text.input_ids, attention_mask=text.attention_mask, mode='text')
        text_feat_m = project(model.text_proj_m, text_out_m.last_hidden_state[:, 0])
        idx_cols = idx.view(-1, 1) if idx is not None else None
        if model.itc_all_rank:
            image_feat_m, text_feat_m = all_gather_no_grad(image_feat_m), all_gather_no_grad(text_feat_m)
            idx_cols = all_gather_no_grad(idx_cols) if idx is not None else None
        offset = get_rank() * B if model.itc_all_rank else 0          # column of this rank's first sample
        image_queue, text_queue = model.queue.features(model)
        image_feat_m_all = torch.cat([image_feat_m.T, image_queue], 1)                      # [E, Bc+Q]
        text_feat_m_all = torch.cat([text_feat_m.T, text_queue], 1)
        if idx is None:
            hard = torch.zeros(B, image_feat_m_all.shape[1], device=image.device)
            hard[:, offset:offset + B].fill_diagonal_(1)
        else:
            idx_all = torch.cat([idx_cols.T, model.queue.ids(model)], 1)                      # [1, Bc+Q]
            positive = (idx.view(-1, 1) == idx_all).float()
            hard = positive / positive.sum(1, keepdim=True)
    local = slice(offset, offset + B)
    with fp32(image.device):
        temp = model.temp.float()
        with torch.no_grad():
            targets_i2t = soft_targets(image_feat_m[local] @ text_feat_m_all / temp, hard, alpha)
            targets_t2i = soft_targets(text_feat_m[local] @ image_feat_m_all / temp, hard, alpha)
        sim_i2t = image_feat @ text_feat_m_all / temp                                        # [B, Bc+Q]
        sim_t2i = text_feat @ image_feat_m_all / temp
        loss_ita = itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)
    model.queue.enqueue(model, image_feat_m, text_feat_m, idx_cols if idx is not None else None,
                        gathered=model.itc_all_rank)
    return loss_ita, image_feat, text_feat, sim_i2t[:, local].detach(), sim_t2i[:, local].detach()
