"""CapFilt's config (the keys of configs/capfilt.yaml) and the checks that name a key whose value cannot be used."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from engine.config import CommonConfig, ConfigError
from engine.loop import AMP_DTYPES
from models.blip_itm import FIRST_TOKENS

@dataclass
class CapFiltConfig(CommonConfig):
    ann_file: list = field(default_factory=list)        # web pairs: JSON lists or JSON lines
    ann_shards: list = field(default_factory=list)      # or web pairs as webdataset tar shards (brace patterns)
    human_ann_file: list = field(default_factory=list)  # human-annotated pairs, copied to the output
    image_root: str = ''                                 # prefix of relative image paths (both lists)
    captioner: str = ''                                  # checkpoint (path or URL) of a BLIP_Decoder
    filter: str = ''                                     # checkpoint of a BLIP_Retrieval / BLIP_ITM
    vit: object = 'base'
    image_size: int = 384
    num_captions: int = 1            # synthetic captions per image
    sample: bool = True              # nucleus sampling (paper); False = beam search
    top_p: float = 0.9
    top_k: int = 50                  # the original's sampling also had HF's default top-k 50 (reference 5.3)
    num_beams: int = 3               # beam search only (num_captions <= num_beams)
    repetition_penalty: float = 1.0  # beam search only; sampling uses the original's fixed 1.1
    max_length: int = 30
    min_length: int = 5
    prompt: str = 'a picture of '
    cuda_graph: Optional[bool] = None  # replay each decode step as one CUDA graph (empty: on with a GPU; bf16 may
                                       # differ in last bits)
    threshold: float = 0.5           # keep a caption when its score >= threshold
    score: str = 'itm'               # 'itm' (softmax match probability) or 'itc' (cosine similarity)
    itm_first_token: str = 'enc'     # the token ITM was trained with; 'cls' = the original BLIP_ITM demo
    keep: str = 'both'               # 'web', 'synthetic' or 'both'
    batch_size: int = 32
    shard_size: int = 1024
    max_words: int = 30              # captions are cleaned with pre_caption(caption, max_words) as in pretraining
    report_samples: int = 48
    output_file: str = 'capfilt_annotations.json'  # '.jsonl' writes JSON lines
    shard_wait_timeout_s: float = 7200.0  # rank 0 stops waiting for other ranks' shards after this long without one


def validate(config: CapFiltConfig, source: str) -> None:
    """Errors naming the key for values the script cannot use."""
    choices = [('score', config.score, ('itm', 'itc')), ('keep', config.keep, ('web', 'synthetic', 'both')),
               ('itm_first_token', config.itm_first_token, FIRST_TOKENS)]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f'{source}: {key} must be one of {allowed}, got {value!r}')
    if not config.ann_file and not config.ann_shards:
        raise ConfigError(f'{source}: ann_file (or ann_shards) must name at least one annotation file (shard)')
    if config.ann_file and config.ann_shards:
        raise ConfigError(f'{source}: give the web pairs as ann_file or as ann_shards, not both')
    if not config.filter:
        raise ConfigError(f'{source}: filter must name a retrieval/ITM checkpoint')
    if config.keep != 'web' and not config.captioner:
        raise ConfigError(f"{source}: captioner must name a caption checkpoint (or set keep: 'web')")
    if config.keep != 'web' and config.num_captions < 1:
        raise ConfigError(f'{source}: num_captions must be >= 1, got {config.num_captions}')
    if not config.sample and config.num_captions > config.num_beams:
        raise ConfigError(f'{source}: beam search returns at most num_beams={config.num_beams} captions, '
                          f'num_captions is {config.num_captions}')
    if config.score == 'itm' and not 0.0 <= config.threshold <= 1.0:
        raise ConfigError(f'{source}: threshold must be in [0, 1] for ITM scores, got {config.threshold}')
    if config.score == 'itc' and not -1.0 <= config.threshold <= 1.0:
        raise ConfigError(f'{source}: threshold must be in [-1, 1] for ITC cosine similarities, got {config.threshold}')
    if config.shard_size < 1 or config.batch_size < 1:
        raise ConfigError(f'{source}: shard_size and batch_size must be >= 1')
    if config.amp not in ('', *AMP_DTYPES):
        raise ConfigError(f"{source}: amp must be one of {sorted(AMP_DTYPES)} or '', got {config.amp!r}")


def captions_per_image(config: CapFiltConfig) -> int:
    """Synthetic captions generated per image (none when only web captions are kept)."""
    return 0 if config.keep == 'web' else config.num_captions
