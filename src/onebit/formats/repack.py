"""``onebit pack``: a packed checkpoint from a fake-quantized model, where the weights determine the stored form.

A fake-quantized weight keeps only Ŵ. For ``sign`` every row of a block takes two values μ ± α, so
(signs, μ, α) are recovered and checked bit-exact against Ŵ. The other methods cannot be packed after the
fact: their stored form holds a partition (salient columns, group bits, a second plane) that Ŵ does not
determine (two groups can share a value, a salient column can look like any other) — quantize them with
``--save-packed`` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..methods.base import method_class
from .packed import PackedFormatError, PackedLinear


def recover_sign(wb: Tensor) -> dict[str, Tensor]:
    """(signs, μ, α) of a two-valued-per-row block: μ = (max + min)/2, α = (max − min)/2 in fp16."""
    hi, lo = wb.max(1, keepdim=True).values, wb.min(1, keepdim=True).values
    mu, alpha = ((hi + lo) / 2).half(), ((hi - lo) / 2).half()
    return {"signs": wb > mu.float(), "mu": mu, "alpha": alpha}


RECOVERABLE: dict[str, Callable[[Tensor], dict[str, Tensor]]] = {"sign": recover_sign}
WHY_NOT = ("its stored form (salient columns, group bitmaps, second sign plane) is not determined by the "
           "dequantized weights; re-run `onebit quantize ... --save-packed DIR`")


def repack_linear(method: str, weight: Tensor, block_size: int, name: str = "linear") -> PackedLinear:
    """Recover a linear's blocks from its fake-quantized weight and verify decode(blocks) == weight exactly."""
    if method not in RECOVERABLE:
        raise PackedFormatError(f"method {method!r} cannot be packed from fake-quantized weights: {WHY_NOT}")
    w = weight.detach().float()
    decoder = method_class(method)()
    blocks = []
    for s in range(0, w.shape[1], block_size):
        wb = w[:, s : s + block_size]
        params = RECOVERABLE[method](wb)
        if not torch.equal(decoder.decode_block(params, tuple(wb.shape)).float(), wb):
            raise PackedFormatError(f"{name}: columns {s}..{s + wb.shape[1]} are not a {method!r} block (was it "
                                    f"quantized with {method!r} and block size {block_size}?)")
        blocks.append(params)
    return PackedLinear.from_blocks(method, blocks, tuple(w.shape), block_size)
