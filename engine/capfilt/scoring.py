"""CapFilt's models at work: the captioner's synthetic captions and the filter's score of every caption.

Per batch (``process_batch``) and per shard of a JSON list's images (``run_shard``).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data.loading import join_root
from data.utils import pre_caption
from engine.capfilt.config import CapFiltConfig, captions_per_image
from models.blip import blip_decoder
from models.blip_itm import blip_itm

def image_path(entry: dict) -> str:
    return entry['image'] if 'image' in entry else entry['url']


class ShardImages(Dataset):
    """The images of one shard: ``(index, image or None, error or None)``; a bad image is not fatal."""

    def __init__(self, entries: Sequence[dict], indices: Sequence[int], image_root: str, transform):
        self.entries, self.indices, self.image_root, self.transform = entries, list(indices), image_root, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        path = image_path(self.entries[index])
        try:
            if path.startswith(('http://', 'https://')):
                raise ValueError('remote URL: download the images first and point the entries at local files')
            with Image.open(join_root(self.image_root, path.removeprefix('file://'))) as im:
                image = self.transform(im.convert('RGB'))
            return index, image, None
        except Exception as e:  # any read/decode failure: name the file, keep going
            return index, None, f'{path}: {type(e).__name__}: {e}'


def collate_shard(batch):
    good = [(i, im) for i, im, _ in batch if im is not None]
    bad = [(i, err) for i, _, err in batch if err is not None]
    images = torch.stack([im for _, im in good]) if good else None
    return [i for i, _ in good], images, bad


@torch.no_grad()
def match_scores(filter_model, image_embeds: torch.Tensor, captions: list[str], rows_per_image: int,
                 config: CapFiltConfig) -> torch.Tensor:
    """Score ``rows_per_image`` consecutive captions per image.

    Args:
        image_embeds: [B, N, D] ViT tokens of the filter.
        captions: B * rows_per_image strings, grouped per image.

    Returns:
        [B * rows_per_image] fp32: ITM match probability (softmax[:, 1]) or ITC cosine similarity.
    """
    tok = filter_model.tokenizer
    # max_length 35 as BLIP_ITM / retrieval; padding to the longest caption gives the same scores, faster
    text = tok(captions, padding='longest', truncation=True, max_length=35, return_tensors='pt').to(image_embeds.device)
    if config.score == 'itc':
        text_out = filter_model.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode='text')
        text_feat = F.normalize(filter_model.text_proj(text_out.last_hidden_state[:, 0]).float(), dim=-1)
        image_feat = F.normalize(filter_model.vision_proj(image_embeds[:, 0]).float(), dim=-1)
        return (image_feat.repeat_interleave(rows_per_image, 0) * text_feat).sum(-1)
    ids = text.input_ids
    if config.itm_first_token == 'enc':
        ids = ids.clone()
        ids[:, 0] = tok.enc_token_id
    # text row j attends to image j // rows_per_image: each image's cross-attention K/V computed once
    out = filter_model.text_encoder(ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                    mode='multimodal')
    return filter_model.itm_head(out.last_hidden_state[:, 0]).float().softmax(-1)[:, 1]


@torch.no_grad()
def process_batch(captioner, filter_model, images: torch.Tensor, web_captions: list[str], config: CapFiltConfig,
                  amp_dtype) -> list[dict]:
    """Caption and score one batch.

    Returns:
        Per image ``{'w': web score, 's': [[synthetic caption, score], ...]}``.
    """
    n = captions_per_image(config)
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        synthetic = []
        if n:
            synthetic = captioner.generate(images, sample=config.sample, num_beams=config.num_beams,
                                           max_length=config.max_length, min_length=config.min_length,
                                           top_p=config.top_p, top_k=config.top_k,
                                           repetition_penalty=config.repetition_penalty,
                                           num_return_sequences=n, prompt=config.prompt,
                                           cuda_graph=config.cuda_graph)
            synthetic = [pre_caption(c, config.max_words) for c in synthetic]
        candidates = []
        for i, web in enumerate(web_captions):
            candidates += [web] + synthetic[i * n:(i + 1) * n]
        image_embeds = filter_model.visual_encoder(images)
        scores = match_scores(filter_model, image_embeds, candidates, n + 1, config).tolist()
    return [{'w': scores[i * (n + 1)],
             's': [[c, s] for c, s in zip(synthetic[i * n:(i + 1) * n], scores[i * (n + 1) + 1:(i + 1) * (n + 1)])]}
            for i in range(len(web_captions))]


def build_models(config: CapFiltConfig, device: torch.device):
    common = dict(image_size=config.image_size, vit=config.vit, med_config=config.med_config)
    captioner = None
    if captions_per_image(config):
        captioner = blip_decoder(pretrained=config.captioner, prompt=config.prompt, **common).to(device).eval()
    filter_model = blip_itm(pretrained=config.filter, itm_first_token=config.itm_first_token, **common)
    return captioner, filter_model.to(device).eval()


def run_shard(shard: int, indices: list[int], entries, captioner, filter_model, transform, config: CapFiltConfig,
              seed: int, device: torch.device, amp_dtype) -> dict:
    """Caption and score the images of one shard; returns its record (scores, bad images, time)."""
    start = time.time()
    torch.manual_seed(seed + shard)  # sampling depends on the shard only, not on the rank or on resumes
    loader = DataLoader(ShardImages(entries, indices, config.image_root, transform), batch_size=config.batch_size,
                        num_workers=config.num_workers, collate_fn=collate_shard, pin_memory=device.type == 'cuda')
    records, bad = [], []
    for batch_indices, images, batch_bad in loader:
        bad += [{'index': i, 'error': e} for i, e in batch_bad]
        if not batch_indices:
            continue
        web = [pre_caption(entries[i]['caption'], config.max_words) for i in batch_indices]
        results = process_batch(captioner, filter_model, images.to(device, non_blocking=True), web, config, amp_dtype)
        records += [{'i': i, **r} for i, r in zip(batch_indices, results)]
    return {'shard': shard, 'records': records, 'bad': bad, 'images': len(indices), 'seconds': time.time() - start}
