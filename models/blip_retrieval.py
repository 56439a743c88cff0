"""BLIP for image-text retrieval fine-tuning (``BLIP_Retrieval``, reference 5.5).

ITC with momentum distillation, image-id-aware targets and queues (``image_queue``, ``text_queue``,
``idx_queue``, ``ptr_queue``) + ITM with hard negatives. Same factory, constructor, keys and
``forward(image, caption, alpha, idx) -> (loss_ita, loss_itm)`` as the original, plus:

  * one process needs no process group (the original always called ``torch.distributed``, 10.4.8);
  * ``negative_all_rank=True`` draws ITM negatives from every rank, with gradients flowing back to the
    rank that owns a negative image (``all_gather_with_grad``), as the original;
  * a row whose candidates all show its own image (e.g. a batch of captions of one image) has no valid
    ITM negative: instead of ``torch.multinomial`` failing (10.4.9) its negative pair is left out of the
    loss (label -100; see ``losses.sample_negatives``);
  * ``itc_all_rank`` as in ``BLIP_Pretrain`` (default False = original); ``negative_sampler`` hook;
  * ``remap_checkpoint`` drops the queues of a checkpoint whose ``queue_size`` differs (reported; the
    original dropped them silently through its shape filter);
  * a checkpoint without momentum encoders (BLIP_ITM layout) initialises them from the loaded online
    weights (the original left them at their random initialisation).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn as nn

from models.blip import init_tokenizer, load_med_config
from models.blip_pretrain import TextBatch
from models.layout import QUEUE_KEYS, load_pretrained, momentum_keys
from models.losses import itm_loss, itm_negative_weights, sample_negatives
from models.med import MED, select_cross_kv
from models.momentum import FeatureQueue, all_gather_no_grad, all_gather_with_grad, copy_params
from models.objectives import fp32, itm_first_tokens, momentum_itc
from models.vit import create_vit


def drop_mismatched_queues(state_dict: Mapping[str, torch.Tensor], queue_size: int) -> tuple[dict, list]:
    """Remove every queue buffer of a checkpoint whose queues do not hold ``queue_size`` entries.

    Returns:
        (state dict, dropped keys); nothing is dropped when the sizes agree.
    """
    sizes = {v.shape[-1] for k, v in state_dict.items() if k in ('image_queue', 'text_queue', 'idx_queue')}
    if not sizes or sizes == {queue_size}:
        return dict(state_dict), []
    dropped = sorted(k for k in state_dict if k in QUEUE_KEYS)
    return {k: v for k, v in state_dict.items() if k not in QUEUE_KEYS}, dropped


class BLIP_Retrieval(nn.Module):
    """ViT + MED encoder + ITC projections + ITM head, with momentum twins and id-aware queues.

    Args:
        med_config, image_size, vit, vit_grad_ckpt, vit_ckpt_layer: as the original (drop path 0).
        embed_dim, queue_size, momentum: ITC space width, queue length (multiple of the global batch),
            EMA coefficient.
        negative_all_rank: draw ITM negatives from the batches of all ranks (COCO) instead of the
            local batch (Flickr).
        itc_all_rank: in-batch ITC columns from all ranks (not in the original; see BLIP_Pretrain).
    """

    def __init__(self, med_config='configs/med_config.json', image_size: int = 384, vit='base',
                 vit_grad_ckpt: bool = False, vit_ckpt_layer: int = 0, embed_dim: int = 256,
                 queue_size: int = 57600, momentum: float = 0.995, negative_all_rank: bool = False,
                 itc_all_rank: bool = False):
        super().__init__()
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        self.tokenizer = init_tokenizer()
        config = load_med_config(med_config, encoder_width=vision_width)
        self.text_encoder = MED(config)
        text_width = config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

        self.visual_encoder_m, _ = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = MED(config)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.model_pairs = [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                            (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]
        copy_params(self.model_pairs)

        self.queue = FeatureQueue('image_queue', 'text_queue', 'ptr_queue', idx='idx_queue')
        self.queue.register(self, embed_dim, queue_size)
        self.queue_size, self.momentum = queue_size, momentum
        self.negative_all_rank, self.itc_all_rank = negative_all_rank, itc_all_rank
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.negative_sampler: Callable = sample_negatives

    def forward(self, image: torch.Tensor, caption: Union[str, Sequence[str]], alpha: float, idx: torch.Tensor):
        """Retrieval fine-tuning losses.

        Args:
            image: [B, 3, S, S]. caption: B strings. alpha: distillation weight.
            idx: [B] image ids: captions of the same image are positives of each other (ITC) and
                never ITM negatives.

        Returns:
            (loss_ita, loss_itm), fp32 scalars.
        """
        text = self.tokenize(caption, image.device)
        return self.losses(image, text.input_ids, text.attention_mask, alpha, idx)

    def tokenize(self, caption: Union[str, Sequence[str]], device=None) -> TextBatch:
        """The captions as the text encoder reads them: padded to the original's 35 tokens (a fixed shape)."""
        text = self.tokenizer(caption, padding='max_length', truncation=True, max_length=35, return_tensors='pt')
        return TextBatch(text.input_ids.to(device), text.attention_mask.to(device))

    def losses(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               alpha: Union[float, torch.Tensor], idx: torch.Tensor):
        """``forward`` on tokenised captions (``tokenize``). Nothing is read back to the host and every shape is
        fixed by the inputs, so the step can be recorded as a CUDA graph with ``alpha`` a 0-dim tensor."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        idx = idx.to(image.device).view(-1)
        image_embeds = self.visual_encoder(image)                                          # [B, N, Dv]
        text = TextBatch(input_ids, attention_mask)
        loss_ita, image_feat, text_feat, _, _ = momentum_itc(self, image_embeds, image, text, alpha, idx)
        ids = input_ids.clone()
        ids[:, 0] = self.tokenizer.enc_token_id
        loss_itm = self._itm(image_embeds, ids, attention_mask, image_feat, text_feat, idx)
        return loss_ita, loss_itm

    def _itm(self, image_embeds, ids, mask, image_feat, text_feat, idx):
        """ITM over B positives and 2B hard negatives (never of the same image id), reference 5.5."""
        B = ids.shape[0]
        if self.negative_all_rank:
            idx_world = all_gather_no_grad(idx)
            image_feat_world, text_feat_world = all_gather_no_grad(image_feat), all_gather_no_grad(text_feat)
            image_embeds_world = all_gather_with_grad(image_embeds)   # negatives send gradients home
            ids_world, mask_world = all_gather_no_grad(ids), all_gather_no_grad(mask)
        else:
            idx_world, image_feat_world, text_feat_world = idx, image_feat, text_feat
            image_embeds_world, ids_world, mask_world = image_embeds, ids, mask
        with torch.no_grad(), fp32(ids.device):
            positive = idx.view(-1, 1) == idx_world.view(1, -1)                             # [B, Bw]
            temp = self.temp.float()
            w_i2t = itm_negative_weights(image_feat.float() @ text_feat_world.float().T / temp, positive)
            w_t2i = itm_negative_weights(text_feat.float() @ image_feat_world.float().T / temp, positive)
            neg_image, valid_image = self.negative_sampler(w_t2i)   # a negative image for each text
            neg_text, valid_text = self.negative_sampler(w_i2t)     # a negative text for each image
        # each local image's cross-attention keys/values are projected once, for its text and its negative text
        image_kv = self.text_encoder.precompute_cross_kv(image_embeds)
        if self.negative_all_rank:  # negatives from other ranks: project just the B chosen ones
            neg_kv = self.text_encoder.precompute_cross_kv(image_embeds_world[neg_image])
        else:
            neg_kv = select_cross_kv(image_kv, neg_image)
        first = itm_first_tokens(self.text_encoder, image_kv, neg_kv, ids, mask, ids_world[neg_text],
                                 mask_world[neg_text])
        logits = self.itm_head(first)                                                       # [3B, 2]
        labels = torch.cat([torch.ones(B, dtype=torch.long, device=ids.device),
                            torch.zeros(2 * B, dtype=torch.long, device=ids.device)])
        labels[B:] = labels[B:].masked_fill(~torch.cat([valid_image, valid_text]), -100)
        return itm_loss(logits, labels)

    def remap_checkpoint(self, state_dict: Mapping[str, torch.Tensor]) -> dict:
        """Called by ``load_checkpoint``: drop (and report) queues of another ``queue_size``."""
        state_dict, dropped = drop_mismatched_queues(state_dict, self.queue_size)
        if dropped:
            print(f'BLIP_Retrieval: checkpoint queues do not hold queue_size={self.queue_size} entries; '
                  f'dropped {dropped} (they start fresh: random features, ids -100, pointer 0)')
        return state_dict


def blip_retrieval(pretrained: str = '', **kwargs) -> BLIP_Retrieval:
    """Build BLIP_Retrieval, optionally loading a pretrain, retrieval or ITM-layout checkpoint.

    Allowed gaps (reported): the queue buffers (a pretrain checkpoint has no ``idx_queue``/``ptr_queue``;
    queues of another size are dropped), ``temp`` (ITM layout) and all momentum encoders at once (ITM
    layout: they are copied from the loaded online weights). Anything else missing is an error.
    """
    model = BLIP_Retrieval(**kwargs)
    if momentum_keys(load_pretrained(model, pretrained, 'blip_retrieval')):
        copy_params(model.model_pairs)
        print('blip_retrieval: checkpoint has no momentum encoders; copied them from the online ones')
    return model
