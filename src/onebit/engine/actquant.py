"""Activation fake quantization (DBellQuant §2): dynamic per-token symmetric absmax, round to nearest.

Installed as forward pre-hooks on every decoder linear, so the hooks stay on the model for calibration
(the Hessian hooks see x̂, as the reference, unless the engine is told to read inputs first) and for
evaluation. Embeddings, lm_head, the residual stream and attention matmuls are not quantized.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..models.base import ArchAdapter

ACT_BITS = (4, 6, 8)


def fake_quant_per_token(x: Tensor, bits: int) -> Tensor:
    """x̂ = Δ·round(x/Δ) with Δ = max_j |x_j| / (2^(b−1) − 1) per token (last dim); zero rows stay zero."""
    xf = x.float()
    qmax = 2 ** (bits - 1) - 1
    delta = (xf.abs().amax(-1, keepdim=True) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.round(xf / delta) * delta).to(x.dtype)


def _pre_hook(bits: int, module: nn.Module, args: tuple) -> tuple:
    return (fake_quant_per_token(args[0], bits), *args[1:])


def install_act_quant(model: nn.Module, adapter: ArchAdapter, bits: int) -> list[RemovableHandle]:
    """Fake-quantize the input of every decoder linear to ``bits``; returns the handles (``.remove()``)."""
    if bits not in ACT_BITS:
        raise ValueError(f"act_bits must be one of {ACT_BITS}, got {bits}")
    hook = partial(_pre_hook, bits)
    return [
        lin.register_forward_pre_hook(hook)
        for layer in adapter.decoder_layers(model)
        for lin in adapter.linears(layer).values()
    ]
