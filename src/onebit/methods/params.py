"""Stored-parameter codecs (``param_dtype``): how a method writes its float parameters (scales, means).

The seed methods store every scale and mean in fp16, about 0.9 bpw at a 128-column block; a lean method
can store them in 8 bits instead (storage-and-ecosystem.md §1.4 rule 3). A parameter tensor ``x`` named
``name`` is written under the ``BlockResult`` convention (bool = 1 bit, float = fp16) as

- ``fp16``: ``{name}`` itself;
- ``int8``: GPTQ's asymmetric 8-bit grid (``UniformGrid``): code planes ``{name}_i8_0`` … ``_7`` (x's shape),
  an fp16 step ``{name}_i8_scale`` and the 8-bit zero point ``{name}_i8_zero0`` … ``7``;
- ``fp8``: the float8 e4m3 bit patterns (``torch.float8_e4m3fn``) of x / s in planes ``{name}_f8_0`` … ``_7``,
  with the fp16 scale s = max |x| / 448 in ``{name}_f8_scale``.

The 8-bit codecs share one scale (and zero) per row of a 2-D ``x`` (``scope="row"``, rows × 1) or one for the
whole tensor (``scope="tensor"``, 1 × 1); an empty ``x`` stores no scale. The decoder reads the codec from the
names, so it needs no option. A method reconstructs from ``decode_param`` of what it stores: the decoder's
values, bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .uniform import UniformGrid, from_planes, to_planes

PARAM_DTYPES = ("fp16", "int8", "fp8")
PARAM_SCOPES = ("row", "tensor")
FP8_MAX = 448.0  # the largest finite float8 e4m3fn value


def _rows(x: Tensor, scope: str) -> Tensor:
    """x as the 2-D tensor whose rows share one scale."""
    return x.reshape(x.shape[0], -1) if scope == "row" and x.dim() == 2 else x.reshape(1, -1)


def encode_param(name: str, x: Tensor, dtype: str, scope: str) -> dict[str, Tensor]:
    """The stored form of the parameter tensor ``x`` (float, any shape) in ``dtype`` (see the module doc)."""
    if dtype == "fp16":
        return {name: x.half()}
    if dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype must be one of {PARAM_DTYPES}, got {dtype!r}")
    x2 = _rows(x.float(), scope) if x.numel() else x.float().new_zeros(0, 1)  # nothing stored: no scale
    if dtype == "int8":
        grid = UniformGrid.fit(x2, 8, sym=False)
        codes = grid.codes(x2).long().reshape(x.shape)
        return {**to_planes(codes, 8, f"{name}_i8_"), f"{name}_i8_scale": grid.scale.half(),
                **to_planes(grid.zero.long(), 8, f"{name}_i8_zero")}
    scale = (x2.abs().amax(1, keepdim=True) / FP8_MAX).half().float().clamp_min(2.0**-24)
    codes = (x2 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).long()
    return {**to_planes(codes.reshape(x.shape), 8, f"{name}_f8_"), f"{name}_f8_scale": scale.half()}


def has_param(params: dict[str, Tensor], name: str) -> bool:
    return name in params or f"{name}_i8_0" in params or f"{name}_f8_0" in params


def decode_param(params: dict[str, Tensor], name: str) -> Tensor:
    """The fp32 values of parameter ``name`` from a stored form written by ``encode_param``."""
    if name in params:
        return params[name].float()
    kind = "i8" if f"{name}_i8_0" in params else "f8"
    codes = from_planes(params, 8, f"{name}_{kind}_")
    scale = params[f"{name}_{kind}_scale"].float()
    if codes.numel() == 0:
        return torch.zeros(codes.shape, device=codes.device)
    c2 = codes.reshape(scale.shape[0], -1)
    if kind == "i8":
        x = UniformGrid(scale, from_planes(params, 8, f"{name}_i8_zero").float(), 255).dequant(c2.float())
    else:
        x = c2.to(torch.uint8).view(torch.float8_e4m3fn).float() * scale
    return x.reshape(codes.shape)
