"""BLIP's image encoder: timm's VisionTransformer with BLIP's key names and no head.

timm's ViT already names its parameters exactly as BLIP's checkpoints do (``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``), so we subclass it instead of copying it: the only additions are "return every token"
and BLIP's "checkpoint the last K blocks".
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch.utils.checkpoint import checkpoint

# width, depth, heads, patch size. 'base'/'large' are the original's; 'tiny' is for tests and the
# toy dataset (CPU-sized).
VIT_PRESETS: dict[str, dict[str, int]] = {
    'base': dict(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    'large': dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16),
    'tiny': dict(embed_dim=64, depth=2, num_heads=2, patch_size=8),
}


class VisionTransformer(TimmVisionTransformer):
    """ViT returning all tokens after the final LayerNorm: ``[B, 1 + (H/p)*(W/p), width]``.

    Args:
        ckpt_layer: with ``use_grad_checkpointing``, the last ``ckpt_layer`` blocks recompute their
            activations in the backward pass (BLIP's ``vit_ckpt_layer``). Keys are unchanged.
    """

    def __init__(self, use_grad_checkpointing: bool = False, ckpt_layer: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        depth = len(self.blocks)
        self.ckpt_from = depth - ckpt_layer if use_grad_checkpointing and ckpt_layer > 0 else depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.norm_pre(x)
        recompute = self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute and i >= self.ckpt_from:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


def create_vit(vit: str | Mapping[str, int], image_size: int, use_grad_checkpointing: bool = False,
               ckpt_layer: int = 0, drop_path_rate: float = 0) -> tuple[VisionTransformer, int]:
    """Build BLIP's ViT.

    Args:
        vit: 'base', 'large', 'tiny' or a dict with embed_dim/depth/num_heads/patch_size.
        image_size: input side in pixels (the position embedding is sized for it).
        drop_path_rate: stochastic depth; for 'large' the original always uses 0.1
            (its ``0.1 or drop_path_rate`` expression), which we keep for reproduction.

    Returns:
        (module, vision_width)
    """
    if isinstance(vit, str):
        if vit not in VIT_PRESETS:
            raise ValueError(f"vit must be one of {sorted(VIT_PRESETS)} or a dict, got {vit!r}")
        size = dict(VIT_PRESETS[vit])
    else:
        size = dict(vit)
        keys = {'embed_dim', 'depth', 'num_heads', 'patch_size'}
        if set(size) != keys:
            raise ValueError(f'vit dict needs exactly the keys {sorted(keys)}; missing {sorted(keys - set(size))}, '
                             f'unknown {sorted(set(size) - keys)}')
    if vit == 'large':
        drop_path_rate = 0.1 or drop_path_rate  # the original's quirk: ViT-L always uses 0.1
    if image_size <= 0 or image_size % size['patch_size']:
        raise ValueError(f"image_size {image_size} is not a positive multiple of patch size {size['patch_size']}")
    model = VisionTransformer(
        img_size=image_size, num_classes=0, global_pool='', mlp_ratio=4, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=drop_path_rate,
        use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer, **size)
    return model, size['embed_dim']


def interpolate_pos_embed(pos_embed_checkpoint: torch.Tensor, visual_encoder: nn.Module) -> torch.Tensor:
    """Resize a checkpoint's position embedding to ``visual_encoder``'s grid (bicubic, CLS kept).

    Same result as the original's ``interpolate_pos_embed`` (F.interpolate bicubic,
    align_corners=False, no antialiasing); square grids only.
    """
    num_patches = visual_encoder.patch_embed.num_patches
    num_extra = visual_encoder.pos_embed.shape[-2] - num_patches
    orig_size = int(math.sqrt(pos_embed_checkpoint.shape[-2] - num_extra))
    new_size = int(math.sqrt(num_patches))
    if orig_size == new_size:
        return pos_embed_checkpoint
    print(f'reshape position embedding from {orig_size ** 2} to {new_size ** 2}')
    return resample_abs_pos_embed(pos_embed_checkpoint.float(), [new_size, new_size], [orig_size, orig_size],
                                  num_prefix_tokens=num_extra, interpolation='bicubic',
                                  antialias=False).to(pos_embed_checkpoint.dtype)
