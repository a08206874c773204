"""Device-side performance switches: channels-last memory format and autocast precision."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from psp_core.options import Precision


def to_channels_last(module: nn.Module) -> nn.Module:
    """Put every 4-D parameter and buffer in channels-last layout (5-D modulated weights stay)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.ndim == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module


def autocast(device: torch.device | str, precision: Precision) -> ContextManager:
    """Autocast for `precision` on `device`: bf16 on CPU or GPU, fp16 on GPU only, fp32 = no-op."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type, dtype=dtype)
