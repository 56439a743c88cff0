"""BLIP's tokenizer, feature extractor (``BLIP_Base``) and captioner (``BLIP_Decoder``).

Same factories, constructor arguments and methods as the original ``models/blip.py``, so code
written against it runs unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from transformers import BertTokenizer

from models import generation
from models.checkpoint import load_checkpoint  # noqa: F401  (original import path)
from models.layout import load_pretrained
from models.med import MED, MEDConfig, MEDLMHeadModel
from models.vit import create_vit, interpolate_pos_embed  # noqa: F401  (original import path)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VOCAB = Path(__file__).resolve().parent / 'vocab' / 'bert-base-uncased-vocab.txt'
BERT_VOCAB_SIZE = 30522


def init_tokenizer(source: Optional[str] = None) -> BertTokenizer:
    """bert-base-uncased WordPiece plus ``[DEC]`` (bos, 30522) and ``[ENC]`` (30523).

    Args:
        source: None for the vocabulary shipped with the project (works offline), a ``vocab.txt``
            path, a tokenizer folder, or a hub name.

    Raises:
        RuntimeError: if the vocabulary did not load (transformers 5 silently builds a 5-token
            tokenizer from a bad source; that would turn every word into [UNK]).
    """
    if source is None or os.path.isfile(str(source)):
        path = str(source or DEFAULT_VOCAB)
        tokenizer = BertTokenizer(vocab=path, do_lower_case=True)
        with open(path, encoding='utf-8') as f:
            expected = sum(1 for _ in f)
    else:
        tokenizer = BertTokenizer.from_pretrained(source)
        expected = None
    if (expected is not None and len(tokenizer) != expected) or len(tokenizer) < 1000 \
            or tokenizer.convert_tokens_to_ids('the') == tokenizer.unk_token_id:
        raise RuntimeError(f'tokenizer from {source or DEFAULT_VOCAB} did not load its vocabulary '
                           f'({len(tokenizer)} tokens)')
    # transformers 4.15's decode joined "man ' s" back to "man's" (clean_up_tokenization_spaces defaulted to
    # True); transformers 5 defaults to False, which changes the original's caption and answer strings
    tokenizer.clean_up_tokenization_spaces = True
    tokenizer.add_special_tokens({'bos_token': '[DEC]'})
    tokenizer.add_special_tokens({'additional_special_tokens': ['[ENC]']})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids('[ENC]')
    return tokenizer


def load_med_config(med_config: Union[str, dict, MEDConfig], **changes) -> MEDConfig:
    """A MEDConfig from a config object, a dict, or a json path (relative to the cwd or the repo)."""
    if isinstance(med_config, MEDConfig):
        cfg = med_config
    elif isinstance(med_config, dict):
        cfg = MEDConfig.from_dict(med_config)
    else:
        path = Path(med_config)
        if not path.is_file() and (REPO_ROOT / path).is_file():
            path = REPO_ROOT / path
        if not path.is_file():
            raise FileNotFoundError(f'med_config file not found: {med_config}')
        cfg = MEDConfig.from_json_file(str(path))
    return cfg.replace(**changes) if changes else cfg


class BLIP_Base(nn.Module):
    """ViT + MED encoder; features for images, texts, or image-grounded texts (not contrastively aligned)."""

    def __init__(self, med_config='configs/med_config.json', image_size: int = 224, vit='base',
                 vit_grad_ckpt: bool = False, vit_ckpt_layer: int = 0):
        super().__init__()
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        self.tokenizer = init_tokenizer()
        self.text_encoder = MED(load_med_config(med_config, encoder_width=vision_width))

    def forward(self, image: torch.Tensor, caption: Union[str, Sequence[str]], mode: str) -> torch.Tensor:
        """mode 'image' -> [B,N,Dv] image tokens; 'text' -> [B,L,H]; 'multimodal' -> [B,L,H] grounded on the image."""
        if mode not in ('image', 'text', 'multimodal'):
            raise ValueError(f"mode must be 'image', 'text' or 'multimodal', got {mode!r}")
        if mode == 'image':
            return self.visual_encoder(image)
        text = self.tokenizer(caption, return_tensors='pt', padding=True).to(image.device)
        if mode == 'text':
            return self.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text').last_hidden_state
        image_embeds = self.visual_encoder(image)
        ids = text.input_ids.clone()
        ids[:, 0] = self.tokenizer.enc_token_id
        return self.text_encoder(ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                 mode='multimodal').last_hidden_state


class BLIP_Decoder(nn.Module):
    """Image captioner: ViT + image-grounded MED decoder, trained with LM loss after a prompt."""

    def __init__(self, med_config='configs/med_config.json', image_size: int = 384, vit='base',
                 vit_grad_ckpt: bool = False, vit_ckpt_layer: int = 0, prompt: str = 'a picture of '):
        super().__init__()
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        self.tokenizer = init_tokenizer()
        self.text_decoder = MEDLMHeadModel(load_med_config(med_config, encoder_width=vision_width))
        self.prompt = prompt
        self.prompt_length = len(self.tokenizer(self.prompt).input_ids) - 1  # without [SEP]

    def forward(self, image: torch.Tensor, caption: Sequence[str]) -> torch.Tensor:
        """LM loss (mean, label smoothing 0.1) of ``caption`` (already prefixed with the prompt)."""
        text = self.tokenize(caption, image.device)
        return self.losses(image, text.input_ids, text.attention_mask)

    def tokenize(self, caption: Sequence[str], device=None, static: bool = False):
        """The captions as the decoder reads them (at most 40 tokens); ``static``: padded to 40, the fixed shape a
        replayed CUDA graph needs (the same loss: padding is masked)."""
        return self.tokenizer(list(caption), padding='max_length' if static else 'longest', truncation=True,
                              max_length=40, return_tensors='pt').to(device)

    def losses(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``forward`` on tokenised captions (``tokenize``); no host read, so it can be recorded as a CUDA graph."""
        image_embeds = self.visual_encoder(image)
        ids = input_ids.clone()
        ids[:, 0] = self.tokenizer.bos_token_id
        targets = ids.masked_fill(ids == self.tokenizer.pad_token_id, -100)
        targets[:, :self.prompt_length] = -100  # no loss on the prompt
        out = self.text_decoder(ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                labels=targets, loss_only=True)
        return out.loss

    def prompt_ids(self, batch_size: int, device, prompt: Optional[str] = None) -> torch.Tensor:
        """``[DEC] a picture of`` for every image ([B, P]): the tokenised prompt without its [SEP]."""
        ids = self.tokenizer([prompt or self.prompt] * batch_size, return_tensors='pt').input_ids.to(device)
        ids[:, 0] = self.tokenizer.bos_token_id
        return ids[:, :-1]

    @torch.no_grad()
    def generate(self, image: torch.Tensor, sample: bool = False, num_beams: int = 3, max_length: int = 30,
                 min_length: int = 10, top_p: float = 0.9, repetition_penalty: float = 1.0,
                 num_return_sequences: int = 1, top_k: int = 50, prompt: Optional[str] = None,
                 cuda_graph: Optional[bool] = None) -> list[str]:
        """Caption a batch of images.

        Beam search by default; ``sample=True`` is nucleus sampling with top-k 50 and, as in the
        original, a fixed repetition penalty of 1.1. ``max_length``/``min_length`` count the prompt
        tokens. ``cuda_graph`` replays each decode step as one CUDA graph on a GPU (same captions;
        304 vs 119-166 img/s at batch 32 in bf16 on an H100, BENCHMARKS.md); None (default): on for CUDA
        images, False: eager. Returns
        ``B * num_return_sequences`` strings, grouped per image.
        """
        if cuda_graph is None:
            cuda_graph = image.is_cuda
        image_embeds = self.visual_encoder(image)
        prompt = prompt if prompt is not None else self.prompt
        ids = generation.generate(
            self.text_decoder, self.prompt_ids(image.shape[0], image.device, prompt), image_embeds, None,
            sample=sample, num_beams=1 if sample else num_beams, max_length=max_length, min_length=min_length,
            top_p=top_p, top_k=top_k, repetition_penalty=1.1 if sample else repetition_penalty,
            num_return_sequences=num_return_sequences, eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id, cuda_graph=cuda_graph)
        return [self.tokenizer.decode(row, skip_special_tokens=True)[len(prompt):] for row in ids.tolist()]


def blip_decoder(pretrained: str = '', **kwargs) -> BLIP_Decoder:
    model = BLIP_Decoder(**kwargs)
    load_pretrained(model, pretrained, 'blip_decoder')
    return model


def blip_feature_extractor(pretrained: str = '', **kwargs) -> BLIP_Base:
    model = BLIP_Base(**kwargs)
    load_pretrained(model, pretrained, 'blip_feature_extractor')
    return model
