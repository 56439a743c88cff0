"""Tiny model sizes and weights shared by the tests (CPU-fast, same code paths as the real sizes)."""
from pathlib import Path
from typing import Sequence

import torch

TINY_VIT = {'embed_dim': 32, 'depth': 2, 'num_heads': 2, 'patch_size': 8}
TINY_IMAGE = 32
TINY_MED = {'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2, 'intermediate_size': 64,
            'vocab_size': 30524, 'max_position_embeddings': 64, 'encoder_width': 32}
# stands in for ViT-L: a vision tower wider than the text side (48 vs 32, as ViT-L's 1024 vs 768), 3 heads
WIDE_VIT = {'embed_dim': 48, 'depth': 2, 'num_heads': 3, 'patch_size': 8}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights that move the outputs: the default init leaves tiny models' logits nearly flat, and HF initialises
    the ViT with std 1e-10. Norm scales near 1, everything else N(0, 0.2); returns the model in eval mode."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if 'norm' in name.lower() and name.endswith('weight'):
            p.copy_(1 + 0.1 * torch.randn_like(p))
        else:
            p.normal_(0, 0.2)
    return model.eval()


def save_tiny(model: torch.nn.Module, path: Path, vit: dict = TINY_VIT, image_size: int = TINY_IMAGE,
              drop: Sequence[str] = ()) -> Path:
    """``model`` as a checkpoint file with the config the exporters read its sizes from (``vit``, ``image_size``,
    ``med_config``); ``drop``: keys left out (a checkpoint the exporters must refuse)."""
    config = {'vit': dict(vit), 'image_size': image_size, 'med_config': dict(TINY_MED)}
    state = {k: v for k, v in model.state_dict().items() if k not in set(drop)}
    torch.save({'model': state, 'config': config}, path)
    return path
