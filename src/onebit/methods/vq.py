"""Vector-quantized weights (``vq``, issue #18, docs/vq.md): every ``dim`` consecutive weights of a row are one
code of ``bits`` bits into a fixed Gaussian codebook, times a row scale — 1.0 to 2.0 bits per weight with no
bitmaps and one 8-bit scale per row per block.

After the rotation pre-pass a row's weights are close to Gaussian; a Lloyd codebook for N(0, 1) in 8
dimensions at 12 bits (1.5 bits per weight) has a mean squared error of 0.17 per unit variance, where one bit
per weight (sign × optimal scale) has 0.36 and two bits per weight (Lloyd–Max) 0.12 — the space-filling and
shape gains of vector quantization that QuIP# (E8 lattice) and AQLM (learned codebooks) use at 2 bits.

Stored form of a block (n × b, b a multiple of ``dim``): the code planes ``c0`` … ``c{bits−1}`` (n × b/dim
bool each, bit 0 first) and the row scale ``alpha`` (n × 1, ``param_dtype``); the codebook is the package's
(``codebooks``: a format constant), found from ``dim`` = b / the planes' width and ``bits`` = their number.
Ŵ_i,[dim·v, dim·v+dim) = α_i · C[code_iv].

Fitting: α_i = the row's RMS over the block (the codebook's unit variance), rounded to its stored dtype. Column
feedback (the default) assigns ``dim`` columns at a time (``group``): the code minimizing the exact GPTQ
loss of the group, ‖(x − α·c) U_g⁻¹‖² with U_g the group's block of the Cholesky factor of H⁻¹, and the
group's error goes on to the later columns as block LDL feedback (QuIP#'s BlockLDLQ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import BlockContext, BlockResult, Bits, register, storage_bits
from .codebooks import codebook
from .params import PARAM_DTYPES, PARAM_SCOPES, decode_param, encode_param
from .uniform import from_planes, to_planes


def count_code_planes(params: dict[str, Tensor]) -> int:
    """The code bits of a stored block: its planes ``c0``, ``c1``, …"""
    return sum(1 for key in params if key[:1] == "c" and key[1:].isdigit())


@register("vq")
@dataclass
class VQ:
    """Row scale × Gaussian codebook vectors. Options: ``dim`` (weights per code: 8 or 4), ``bits`` (bits
    per code: 8…12 at dim 8, 6…8 at dim 4; bits / dim per weight), ``param_dtype`` (fp16 | int8 | fp8) and
    ``param_scope`` (row | tensor) of the row scales."""

    dim: int = 8
    bits: int = 12
    param_dtype: str = "int8"
    param_scope: str = "tensor"

    default_feedback: ClassVar[str] = "column"

    def __post_init__(self) -> None:
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"vq: param_dtype must be one of {PARAM_DTYPES}")
        if self.param_scope not in PARAM_SCOPES:
            raise ValueError(f"vq: param_scope must be one of {PARAM_SCOPES}")
        codebook(self.dim, self.bits)  # refuses a codebook the package does not ship

    @property
    def column_group(self) -> int:
        """Columns coded together (the engine keeps them in order: no act-order)."""
        return self.dim

    def fit_block(self, w: Tensor, ctx: BlockContext) -> "VQFit":
        n, b = w.shape
        if b % self.dim:
            raise ValueError(f"vq: a block of {b} columns is not a multiple of dim {self.dim} (choose a --blocksize "
                             f"and a dim that divide every linear's in_features)")
        rms = w.square().mean(1, keepdim=True).sqrt()  # a zero row gets α = 0: decoded as zeros exactly
        params = encode_param("alpha", rms, self.param_dtype, self.param_scope)
        params.update(to_planes(torch.zeros(n, b // self.dim, dtype=torch.long, device=w.device), self.bits, "c"))
        return VQFit(self, params, (n, b), w.dtype)

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        return self.fit_block(w, ctx).assign_block(w)

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        n, b = shape
        bits = count_code_planes(params)
        dim = b // params["c0"].shape[1]
        book = codebook(dim, bits).to(params["c0"].device)
        alpha = decode_param(params, "alpha")
        return alpha * book[from_planes(params, bits, "c")].reshape(n, b)


def with_norms(book: Tensor) -> Tensor:
    """The book with each code's squared norm as one more column (K × (dim + 1))."""
    return torch.cat([book, book.square().sum(1, keepdim=True)], 1)


class VQFit:
    """``ColumnFit`` of ``group`` = dim columns at a time with the row scales fixed; the codes chosen are
    decoded with the decoder's own formula, so ``result().q`` is what the engine fed back."""

    def __init__(self, method: VQ, params: dict[str, Tensor], shape: tuple[int, int], dtype: torch.dtype) -> None:
        self.method, self.params, self.shape, self.dtype = method, params, shape, dtype
        self.group = method.dim
        self.alpha = decode_param(params, "alpha").to(dtype)
        self.book = codebook(method.dim, method.bits).to(device=self.alpha.device, dtype=dtype)
        self.codes = torch.zeros(shape[0], shape[1] // method.dim, dtype=torch.long, device=self.alpha.device)

    def _nearest(self, x: Tensor, book_sq: Tensor) -> Tensor:
        """Per row, the code c minimizing ‖x − α·book_c‖² (x and the book in the same coordinates; ``book_sq``:
        ``with_norms(book)``): for α ≥ 0 the largest x·c − (α/2)‖c‖², one product of x with one extra column."""
        return (torch.cat([x, -self.alpha / 2], 1) @ book_sq.T).argmax(1)

    def assign_group(self, j: int, x: Tensor, u: Tensor) -> Tensor:
        """Codes for columns j … j+dim−1 (x: n × dim, their current values), minimizing ‖(x − α·c) u⁻¹‖²
        (u: the group's upper Cholesky block of H⁻¹); returns the dequantized columns."""
        def times_u_inv(a: Tensor) -> Tensor:
            return torch.linalg.solve_triangular(u, a, upper=True, left=False)

        idx = self._nearest(times_u_inv(x), with_norms(times_u_inv(self.book)))
        self.codes[:, j // self.group] = idx
        return self.alpha * self.book[idx]

    def assign_block(self, w: Tensor) -> BlockResult:
        """Every group by plain Euclidean distance (no feedback)."""
        n, b = self.shape
        x = w.reshape(n, b // self.group, self.group)
        book_sq = with_norms(self.book)  # the same book for every group
        for v in range(b // self.group):
            self.codes[:, v] = self._nearest(x[:, v], book_sq)
        return self.result()

    def result(self) -> BlockResult:
        n, b = self.shape
        params = {**self.params, **to_planes(self.codes, self.method.bits, "c")}
        code = n * (b // self.group) * self.method.bits
        bits = Bits(sign=code, bitmap=0, params=storage_bits(params) - code, weights=n * b)
        return BlockResult(self.method.decode_block(params, (n, b)).to(self.dtype), params, bits)
