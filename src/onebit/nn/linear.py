"""``OnebitLinear``: a linear layer that keeps its weight in the packed storage form.

Forward paths, chosen per call:
* packed kernel (C++ on the CPU, ``kernels.py``; Triton on CUDA, ``triton_gemv.py``) for the layouts in
  ``kernels.KERNEL_LAYOUTS`` (sign, braq, arb/arb-x with or without CGB, arb-rc; Triton: sign, braq): y = Ŵx
  straight from the bit and fp16 streams, no dense weight built. Any token count by default
  (``kernel_max_tokens`` = None): on the AVX-512 CPU it was measured on, it beats dense fp32 ``torch.matmul``
  from 1 to 2048 tokens (benchmarks/packed_matmul.py), so decoding and prefill both use it. The Triton
  kernel is a GEMV: on CUDA it takes at most ``gpu_kernel_max_tokens`` (16), prefill runs dense;
* an optional online ``input_transform`` T (rotate's ``--rotate-down`` randomized Hadamard) multiplies the
  input first, y = Ŵ·(x·T): applied from its manifest entry (kind, seed) by a fast Walsh–Hadamard
  transform, nothing stored;
* dense: Ŵ decoded with the method's own ``decode_block`` (``PackedLinear.dequantize``) then ``F.linear``
  — the pure-PyTorch reference, used for other methods, above ``kernel_max_tokens`` and when the extension
  is missing. With ``dense_cache`` on, the decoded Ŵ is kept for that path (fast, fp32 memory).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..formats.packed import PackedLinear
from . import kernels


class OnebitLinear(nn.Module):
    """Packed 1-bit linear. Buffers ``packed_bits``/``packed_fp16``/``packed_index`` are the checkpoint's
    tensors of the same names; ``bias`` stays a float parameter."""

    kernel_max_tokens: int | None = None
    gpu_kernel_max_tokens = 16  # the Triton kernel is a GEMV (one program per token); prefill goes to cuBLAS

    def __init__(
        self, in_features: int, out_features: int, bias: bool, method: str, block_size: int,
        layout: list[list[str]], bits_bytes: int, fp16_count: int, blocks: int,
        dtype: torch.dtype | None = None, device: Any = None, options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.block_size, self.layout, self.options = method, block_size, layout, dict(options or {})
        self.register_buffer("packed_bits", torch.zeros(bits_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("packed_fp16", torch.zeros(fp16_count, dtype=torch.float16, device=device))
        self.register_buffer("packed_index", torch.zeros(blocks, len(layout), 3, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.dense_cache = False
        self.use_kernel = True
        self._dense: Tensor | None = None
        self._table: Tensor | None = None
        self._layout_id: int | None = None
        self._gpu_tables: tuple[Tensor, Tensor] | None = None  # Triton: (block table, column ranks) on the device
        self.input_transform: dict[str, Any] | None = None  # manifest entry of an online x ← x·T
        self._transform_seed: int | None = None

    @classmethod
    def from_packed(cls, packed: PackedLinear, bias: Tensor | None = None) -> "OnebitLinear":
        n, m = packed.shape
        mod = cls(m, n, bias is not None, packed.method, packed.block_size, packed.layout, packed.bits.numel(),
                  packed.fp16.numel(), packed.index.shape[0], dtype=None if bias is None else bias.dtype,
                  options=packed.options)
        mod.packed_bits.copy_(packed.bits)
        mod.packed_fp16.copy_(packed.fp16)
        mod.packed_index.copy_(packed.index)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        mod.prepare()
        return mod

    def set_input_transform(self, spec: dict[str, Any] | None) -> None:
        """x ← x·T before the weight, T from a manifest ``input_transform`` entry (None: no transform)."""
        from ..transforms.rotate import transform_seed

        self.input_transform = spec
        self._transform_seed = None if spec is None else transform_seed(spec)

    def _transform_input(self, x: Tensor) -> Tensor:
        from ..transforms.rotate import apply_hadamard

        return x if self._transform_seed is None else apply_hadamard(x, self._transform_seed)

    def packed(self) -> PackedLinear:
        return PackedLinear(self.method, (self.out_features, self.in_features), self.block_size, self.layout,
                            self.packed_bits, self.packed_fp16, self.packed_index, self.options)

    def prepare(self) -> None:
        """After (re)loading the buffers: normalise dtypes and build the kernel's block table."""
        self.packed_fp16 = self.packed_fp16.to(torch.float16)
        self._dense = None
        self._gpu_tables = None
        self._layout_id = kernels.kernel_layout(self.method, self.layout, self.packed_index.cpu(), self.out_features)
        if self._layout_id is not None:
            self._table = kernels.block_table(self.packed_index.cpu(), self.layout, self.block_size, self.in_features)

    def dequantize(self) -> Tensor:
        """The dense fp32 weight Ŵ (exactly what fake quantization produced)."""
        if self._dense is not None:
            return self._dense
        w = self.packed().dequantize().to(self.packed_bits.device)
        if self.dense_cache:
            self._dense = w
        return w

    def kernel_ok(self, tokens: int, x: Tensor) -> bool:
        limit = self.kernel_max_tokens
        if not (self.use_kernel and self._layout_id is not None and (limit is None or tokens <= limit)
                and self._dense is None):
            return False
        if x.device.type == "cuda":
            return (kernels.triton_available() and self._layout_id in kernels.TRITON_LAYOUTS
                    and tokens <= self.gpu_kernel_max_tokens)
        return x.device.type == "cpu" and kernels.extension() is not None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel_ok(x2.shape[0], x2):
            x2 = self._transform_input(x2)
            y = self._triton(x2) if x2.is_cuda else kernels.packed_gemm(
                x2.float(), self.packed_bits, self.packed_fp16, self._table, self.out_features, self._layout_id)
            y = y.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*shape[:-1], self.out_features)
        return self.reference_forward(x)

    def _triton(self, x: Tensor) -> Tensor:
        from .triton_gemv import column_ranks, packed_gemm_triton

        dev = self.packed_bits.device
        if self._gpu_tables is None or self._gpu_tables[0].device != dev:
            ranks = column_ranks(self._table, self.packed_bits, self.in_features)
            self._gpu_tables = (self._table.to(dev), ranks.to(dev))
        table, ranks = self._gpu_tables
        return packed_gemm_triton(x, self.packed_bits, self.packed_fp16, table, ranks, self.out_features,
                                  self._layout_id, self.block_size)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Pure PyTorch: decode Ŵ with the method's ``decode_block`` and multiply (the tests' reference)."""
        return F.linear(self._transform_input(x), self.dequantize().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        transform = "" if self.input_transform is None else f", input_transform={self.input_transform}"
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}{transform}"


def set_dense_cache(model: nn.Module, on: bool = True) -> None:
    """Keep (or drop) each OnebitLinear's decoded fp32 weight: fast batch prefill at fp32 memory cost."""
    for mod in model.modules():
        if isinstance(mod, OnebitLinear):
            mod.dense_cache = on
            mod._dense = None


def packed_modules(model: nn.Module) -> dict[str, OnebitLinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, OnebitLinear)}
