"""A recorder of the operators a block dispatches (below autograd: backward ops are recorded too)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class DispatchedOps(TorchDispatchMode):
    """``with DispatchedOps() as seen: ...`` then ``seen.ops``: operator names in call order (``addmm``,
    ``_to_copy``, ``_scaled_dot_product_flash_attention_for_cpu``), ``seen.shapes``: each one's first
    argument's shape (None where it is not a tensor)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.shapes: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        first = args[0] if args else None
        self.shapes.append(tuple(first.shape) if isinstance(first, torch.Tensor) else None)
        return func(*args, **(kwargs or {}))
