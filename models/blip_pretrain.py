"""BLIP pretraining model (``BLIP_Pretrain``, reference 5.4): ITC + ITM + LM over one ViT and one MED.

Same factory, constructor arguments, state-dict keys and ``forward(image, caption, alpha)`` as the
original. Differences, all behind the same interface:

  * Construction never downloads anything: every weight starts random. The original's download-based
    initialisation (DeiT/AugReg ViT, bert-base-uncased for encoder and decoder; reference 2.5, 3.5) is
    ``init_from_pretrained(model, vit_source, bert_source)``, which also takes local files.
  * Encoder and decoder share embeddings, cross-attention and FFN by sharing module instances
    (``share_encoder_decoder``); the state dict still lists both key paths.
  * Works in one process without a process group (the all-gathers become the identity) and under DDP.
  * Similarities, softmaxes and losses are computed in fp32 under bf16/fp16 autocast.
  * ``itc_all_rank=True`` (not in the original) takes the in-batch ITC columns from every rank's
    momentum features (the same tensors the queue receives, so no extra communication): the losses
    then no longer depend on how the global batch is split over GPUs. The default (False) keeps the
    original's local in-batch columns.
  * A row without any valid ITM negative (only possible with a local batch of 1) does not crash
    ``torch.multinomial``: its negative pair is ignored by the loss (``losses.sample_negatives``).
  * ``forward`` also takes the captions already tokenised (a ``TextBatch``; ``TokenizingCollate`` makes them
    in the data loader's workers), with the losses of the strings.
  * ``negative_sampler`` is an attribute (``losses.sample_negatives`` by default): tests swap in a
    deterministic one.
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from models.blip import init_tokenizer, load_med_config
from models.checkpoint import CheckpointError
from models.losses import itm_loss, itm_negative_weights, sample_negatives
from models.med import MED, MEDLMHeadModel, resize_token_embeddings, select_cross_kv, share_encoder_decoder
from models.momentum import FeatureQueue, copy_params
from models.objectives import itm_first_tokens, momentum_itc
from models.vit import create_vit


class TextBatch(NamedTuple):
    """Tokenised captions: [B, L] ids and attention mask (the fields of a tokenizer's output the models read)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def tokenize_captions(tokenizer, caption: Union[str, Sequence[str]]) -> TextBatch:
    """Captions as ``BLIP_Pretrain`` reads them: [B, 30] ids and mask, padded to 30 (the original's length)."""
    text = tokenizer(caption, padding='max_length', truncation=True, max_length=30, return_tensors='pt')
    return TextBatch(text.input_ids, text.attention_mask)


class TokenizingCollate:
    """A DataLoader ``collate_fn`` for (image, caption) samples that also tokenises the captions.

    Returns ``(images, captions, TextBatch)``. Tokenising 64 captions costs ~3-5 ms of host time; in the loader's
    worker processes it overlaps the training step instead of sitting between two steps (on a GPU whose step
    is one CUDA graph replay, that gap would leave the device idle)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples: Sequence[tuple]) -> tuple:
        image, caption = torch.utils.data.default_collate(samples)
        return image, caption, tokenize_captions(self.tokenizer, caption)


class BLIP_Pretrain(nn.Module):
    """ViT + unimodal/image-grounded MED encoder + image-grounded decoder, with momentum twins and queues.

    Args:
        med_config: MED config for encoder and decoder (json path, dict or MEDConfig); the vocabulary
            is resized to the tokenizer's 30524 entries ([DEC], [ENC]) whatever the file says.
        image_size, vit, vit_grad_ckpt, vit_ckpt_layer: ViT options (drop path 0, as the original).
        embed_dim: width of the ITC space. queue_size: momentum-feature queue length (a multiple of
            the global batch size). momentum: EMA coefficient of the momentum encoders.
        itc_all_rank: in-batch ITC columns from all ranks (see module docstring); False = original.
    """

    def __init__(self, med_config='configs/bert_config.json', image_size: int = 224, vit='base',
                 vit_grad_ckpt: bool = False, vit_ckpt_layer: int = 0, embed_dim: int = 256,
                 queue_size: int = 57600, momentum: float = 0.995, itc_all_rank: bool = False):
        super().__init__()
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer, 0)
        self.tokenizer = init_tokenizer()
        config = load_med_config(med_config, encoder_width=vision_width)
        self.text_encoder = MED(config)
        resize_token_embeddings(self.text_encoder, len(self.tokenizer))
        text_width = config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

        # momentum encoders (ALBEF): frozen EMA twins of the ITC branch
        self.visual_encoder_m, _ = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer, 0)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = MED(self.text_encoder.config)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.model_pairs = [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                            (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

        self.queue = FeatureQueue('image_queue', 'text_queue', 'queue_ptr')
        self.queue.register(self, embed_dim, queue_size)
        self.queue_size, self.momentum, self.itc_all_rank = queue_size, momentum, itc_all_rank
        self.temp = nn.Parameter(0.07 * torch.ones([]))

        self.text_decoder = MEDLMHeadModel(config)
        resize_token_embeddings(self.text_decoder, len(self.tokenizer))
        # reference 3.5: everything but self-attention is one set of weights (the LM head is tied to
        # the word embeddings inside MEDLMHeadModel, hence to the encoder's too)
        share_encoder_decoder(self.text_encoder, self.text_decoder.bert)
        copy_params(self.model_pairs)
        self.negative_sampler: Callable = sample_negatives

    # ------------------------------------------------------------------------------------------ ITM

    def _itm(self, image_kv: list, ids, mask, sim_i2t, sim_t2i):
        """ITM over B positives and 2B hard negatives drawn within the local batch (reference 5.4 step 6).

        ``image_kv``: the batch images' cross-attention keys/values (``precompute_cross_kv``): each image is
        projected once, not once per row (the original projects 3B copies of the image tokens)."""
        B = ids.shape[0]
        with torch.no_grad():
            diagonal = torch.eye(B, dtype=torch.bool, device=ids.device)
            neg_image, valid_image = self.negative_sampler(itm_negative_weights(sim_t2i, diagonal, 1e-4))
            neg_text, valid_text = self.negative_sampler(itm_negative_weights(sim_i2t, diagonal, 1e-4))
        first = itm_first_tokens(self.text_encoder, image_kv, select_cross_kv(image_kv, neg_image), ids, mask,
                                 ids[neg_text], mask[neg_text])
        logits = self.itm_head(first)                                                      # [3B, 2]
        labels = torch.cat([torch.ones(B, dtype=torch.long, device=ids.device),
                            torch.zeros(2 * B, dtype=torch.long, device=ids.device)])
        labels[B:] = labels[B:].masked_fill(~torch.cat([valid_image, valid_text]), -100)
        return itm_loss(logits, labels)

    # ------------------------------------------------------------------------------------------ forward

    def tokenize(self, caption: Union[str, Sequence[str]], device=None) -> 'TextBatch':
        """The captions as the model reads them: [B, 30] ids and mask (padded to 30, as the original)."""
        text = tokenize_captions(self.tokenizer, caption)
        return TextBatch(text.input_ids.to(device), text.attention_mask.to(device))

    def forward(self, image: torch.Tensor, caption: Union[str, Sequence[str], TextBatch], alpha: float):
        """Pretraining losses of a batch.

        Args:
            image: [B, 3, S, S]. caption: B strings, or the same captions already tokenised (``tokenize``;
                pretrain.py tokenises in its data-loader workers). alpha: momentum-distillation weight of the
                ITC targets.

        Returns:
            (loss_ita, loss_itm, loss_lm), fp32 scalars; the training objective is their sum.
        """
        if isinstance(caption, TextBatch):
            text = TextBatch(caption.input_ids.to(image.device, non_blocking=True),
                             caption.attention_mask.to(image.device, non_blocking=True))
        else:
            text = self.tokenize(caption, image.device)
        return self.losses(image, text.input_ids, text.attention_mask, alpha)

    def losses(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               alpha: Union[float, torch.Tensor]):
        """``forward`` on tokenised captions (``tokenize``).

        Nothing here needs a device value on the host while a CUDA graph is recorded (the LM loss then keeps
        static shapes), so every input, ``alpha`` included as a 0-dim tensor, can be a static buffer that is
        refilled before each replay (``engine.cuda_graph``)."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.visual_encoder(image)                                          # [B, N, Dv]
        text = TextBatch(input_ids, attention_mask)
        loss_ita, _, _, sim_i2t, sim_t2i = momentum_itc(self, image_embeds, image, text, alpha)

        enc_ids = text.input_ids.clone()
        enc_ids[:, 0] = self.tokenizer.enc_token_id
        # the encoder and the decoder share their cross-attention modules (reference 3.5), so one projection
        # of each image's tokens serves the ITM rows and the LM rows
        image_kv = self.text_encoder.precompute_cross_kv(image_embeds)
        loss_itm = self._itm(image_kv, enc_ids, text.attention_mask, sim_i2t, sim_t2i)

        dec_ids = text.input_ids.clone()
        dec_ids[:, 0] = self.tokenizer.bos_token_id
        targets = dec_ids.masked_fill(dec_ids == self.tokenizer.pad_token_id, -100)
        loss_lm = self.text_decoder(dec_ids, attention_mask=text.attention_mask, cross_kv=image_kv,
                                    labels=targets, loss_only=True).loss
        return loss_ita, loss_itm, loss_lm


def blip_pretrain(**kwargs) -> BLIP_Pretrain:
    """Build BLIP_Pretrain with random weights (see ``init_from_pretrained`` for the original's initialisation)."""
    return BLIP_Pretrain(**kwargs)


# ---------------------------------------------------------------------------------------------- initialisation

# The original's sources (reference 2.5): DeiT-B/16 (ImageNet-1k) for base, AugReg ViT-L/16 (ImageNet-21k)
# for large (timm >= 0.9 names it vit_large_patch16_224.augreg_in21k); bert-base-uncased for the text.
DEFAULT_VIT_SOURCES = {
    'base': 'https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth',
    'large': 'vit_large_patch16_224.augreg_in21k',
}
DEFAULT_BERT_SOURCE = 'bert-base-uncased'
# keys of a BERT checkpoint that BLIP's MED has no use for
_BERT_UNUSED = ('embeddings.token_type_embeddings.', 'pooler.', 'cls.seq_relationship.', 'embeddings.position_ids')


def _vit_state_dict(source: str) -> dict:
    """A ViT state dict from a local .pth/.npz file, a URL, or a timm model name (downloaded by timm)."""
    from models.checkpoint import extract_state_dict, read_checkpoint, is_url
    if os.path.isfile(source) and source.endswith('.npz'):
        from timm.models.vision_transformer import _load_weights, VisionTransformer
        import numpy as np
        with np.load(source) as w:  # size the ViT from the file, then let timm convert JAX -> torch
            width, depth = w['embedding/kernel'].shape[-1], sum(k.endswith('MlpBlock_3/Dense_0/kernel') for k in w)
            patch = w['embedding/kernel'].shape[0]
            grid = int(round((w['Transformer/posembed_input/pos_embedding'].shape[1] - 1) ** 0.5))
            heads = w['Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel'].shape[1]
        vit = VisionTransformer(img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth,
                                num_heads=heads, num_classes=0)
        _load_weights(vit, source)
        return vit.state_dict()
    if os.path.isfile(source) or is_url(source):
        return extract_state_dict(read_checkpoint(source), source)
    import timm
    try:
        return timm.create_model(source, pretrained=True).state_dict()
    except Exception as e:  # unknown name, no network, offline hub: say which source failed
        raise CheckpointError(f'could not load ViT weights from timm model {source!r} (pretrained=True): '
                              f'{type(e).__name__}: {e}. Pass a local .pth/.npz file instead when offline.') from e


def load_vit_weights(visual_encoder: nn.Module, source: str) -> list:
    """Load pretrained ViT weights (DeiT/timm/AugReg) into ``visual_encoder``; returns the dropped keys.

    The classifier (``head``, ``head_dist``, ``dist_token``, ``fc_norm``) is dropped; ``pos_embed`` is
    resized to the model's grid; every parameter of ``visual_encoder`` must be found.
    """
    from models.vit import interpolate_pos_embed
    sd = _vit_state_dict(source)
    own = visual_encoder.state_dict()
    if 'pos_embed' in sd:
        sd['pos_embed'] = interpolate_pos_embed(sd['pos_embed'], visual_encoder)
    dropped = sorted(k for k in sd if k not in own)
    missing = sorted(k for k in own if k not in sd)
    if missing:
        raise CheckpointError(f'ViT source {source!r} lacks {len(missing)} key(s), e.g. {missing[:5]}')
    bad = [f'{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}' for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise CheckpointError(f'ViT source {source!r} does not fit the model: ' + '; '.join(bad[:5]))
    visual_encoder.load_state_dict({k: sd[k] for k in own})
    return dropped


def _bert_state_dict(source: str) -> dict:
    """BERT weights (HF ``BertForMaskedLM``/``BertModel`` layout) from a folder, a hub name or a state-dict file."""
    if os.path.isfile(source):
        from models.checkpoint import extract_state_dict, read_checkpoint
        sd = extract_state_dict(read_checkpoint(source), source)
    else:
        from transformers import BertForMaskedLM
        try:
            sd = BertForMaskedLM.from_pretrained(source).state_dict()
        except Exception as e:  # offline hub, missing folder, wrong format: name the source
            raise CheckpointError(f'could not load BERT weights from {source!r} with transformers '
                                  f'BertForMaskedLM.from_pretrained: {type(e).__name__}: {e}') from e
    # TF-converted files name LayerNorm parameters gamma/beta
    return {k.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias'): v
            for k, v in sd.items()}


def bert_to_blip(bert: dict, model_state: dict) -> tuple[dict, list]:
    """Map BERT keys onto BLIP_Pretrain's encoder and decoder (both self-attentions start from BERT's).

    ``bert.X`` (or ``X``) -> ``text_encoder.X`` and ``text_decoder.bert.X``; ``cls.predictions.*`` ->
    ``text_decoder.cls.predictions.*``; token-type embeddings, pooler and NSP head are dropped; the
    vocabulary is padded to the model's (new rows keep their N(0, 0.02) init, new output biases 0, as
    HF's ``resize_token_embeddings``). Cross-attention is not in BERT and stays random.

    Returns:
        (state dict of model keys, dropped BERT keys)
    """
    out, dropped = {}, []
    for key, value in bert.items():
        name = key[len('bert.'):] if key.startswith('bert.') else key
        if name.startswith(_BERT_UNUSED) or name == 'cls.predictions.decoder.weight':  # tied to the embeddings
            dropped.append(key)
            continue
        targets = ([f'text_decoder.{name}'] if name.startswith('cls.predictions.')
                   else [f'text_encoder.{name}', f'text_decoder.bert.{name}'])
        for target in targets:
            if target not in model_state:
                raise CheckpointError(f'BERT key {key!r} has no place in the model ({target!r})')
            own = model_state[target]
            if name.endswith(('word_embeddings.weight', 'predictions.bias', 'predictions.decoder.bias')) \
                    and value.shape[0] < own.shape[0]:
                grown = own.clone() if 'embeddings' in name else torch.zeros_like(own)
                grown[:value.shape[0]] = value
                value = grown
            if value.shape != own.shape:
                raise CheckpointError(f'BERT key {key!r}: shape {tuple(value.shape)} does not fit {target!r} '
                                      f'{tuple(own.shape)} (is the MED config the BERT one?)')
            out[target] = value
    return out, dropped


def init_from_pretrained(model: BLIP_Pretrain, vit_source: Optional[str] = None,
                         bert_source: Optional[str] = None, verbose: bool = True) -> BLIP_Pretrain:
    """The original pretraining initialisation, made explicit (reference 2.5, 3.5).

    Args:
        vit_source: a timm model name (downloaded by timm), a URL, a local .pth (``{'model': sd}`` or a
            bare state dict, DeiT style) or .npz (JAX/AugReg) file; 'default' for the original's source
            of the model's ViT size; None to keep the ViT as it is.
        bert_source: a folder or hub name loadable by transformers' ``BertForMaskedLM.from_pretrained``
            or a state-dict file with BERT keys; 'default' for bert-base-uncased; None to skip.

    The momentum encoders are copied from the online ones at the end. Raises CheckpointError naming
    the source when it cannot be read (e.g. offline) or does not fit.
    """
    if vit_source == 'default':
        width = model.visual_encoder.embed_dim
        vit_source = DEFAULT_VIT_SOURCES['large' if width == 1024 else 'base']
    if bert_source == 'default':
        bert_source = DEFAULT_BERT_SOURCE
    if vit_source:
        dropped = load_vit_weights(model.visual_encoder, vit_source)
        if verbose:
            print(f'init visual_encoder from {vit_source} (unused: {dropped})')
    if bert_source:
        model_state = model.state_dict()
        mapped, dropped = bert_to_blip(_bert_state_dict(bert_source), model_state)
        not_set = sorted(k for k in model_state if k.startswith(('text_encoder.', 'text_decoder.'))
                         and k not in mapped and '.crossattention.' not in k
                         and k not in ('text_decoder.cls.predictions.decoder.weight',
                                       'text_encoder.embeddings.position_ids', 'text_decoder.bert.embeddings.position_ids'))
        if not_set:
            raise CheckpointError(f'BERT source {bert_source!r} lacks {len(not_set)} text key(s), e.g. {not_set[:5]}')
        model.load_state_dict(mapped, strict=False)
        if verbose:
            print(f'init text_encoder/text_decoder from {bert_source} ({len(mapped)} keys; unused: {dropped}; '
                  f'cross-attention stays random)')
    copy_params(model.model_pairs)
    return model
