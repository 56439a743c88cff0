"""Mixed precision: the autocast context for a run's precision, one helper for training, evaluation and scripts."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Union

import torch

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}


def autocast(device: torch.device, amp: Union[str, Optional[torch.dtype]]) -> ContextManager:
    """Autocast on ``device`` to ``amp`` (a dtype, or a precision name of ``AMP_DTYPES``), or nothing when it is
    None / 'none' (fp32, the original)."""
    dtype = AMP_DTYPES[amp] if isinstance(amp, str) else amp
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
