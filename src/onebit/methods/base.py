"""The one interface between the engine and a binarization method.

The engine walks a linear layer in column blocks (framework §4). For each block it hands the method the
current, already error-compensated weights and the block's Hessian factors; the method returns the
dequantized block, the tensors a packer needs to store it, and an exact count of the bits those tensors
take. The engine never imports a method: methods register themselves by name here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

PARAM_DTYPE = torch.float16
"""Storage dtype of every per-row scale/mean. Stored parameters are rounded to it *before* the dequantized
weights are formed, so error compensation and evaluation see exactly what a decoder reconstructs."""
PARAM_BITS = 16


def to_storage(x: Tensor) -> Tensor:
    """Round parameters to their storage dtype, returned in the working dtype."""
    return x.to(PARAM_DTYPE).to(x.dtype)


@dataclass
class Bits:
    """Exact bit counts of what a decoder needs for some weights.

    ``sign``: sign-plane bits (the papers' "weight bits": paper bpw = sign / weights).
    ``bitmap``: group and column membership bits.  ``params``: bits of stored fp16 scales/means/vectors.
    """

    sign: int = 0
    bitmap: int = 0
    params: int = 0
    weights: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Bits":
        return cls(**{k: int(d[k]) for k in ("sign", "bitmap", "params", "weights")})

    @property
    def storage(self) -> int:
        return self.sign + self.bitmap + self.params

    @property
    def paper_bpw(self) -> float:
        return self.sign / max(self.weights, 1)

    @property
    def storage_bpw(self) -> float:
        return self.storage / max(self.weights, 1)

    def __add__(self, other: "Bits") -> "Bits":
        return Bits(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def to_dict(self) -> dict[str, float]:
        d: dict[str, float] = dataclasses.asdict(self)
        d.update(storage=self.storage, paper_bpw=self.paper_bpw, storage_bpw=self.storage_bpw)
        return d


@dataclass
class BlockContext:
    """What the engine knows about the block being quantized.

    ``d``: diag of the upper Cholesky factor U of the damped H⁻¹ for these columns (d_j = U_jj, framework §3);
    ``h``: the (undamped, dead-column-fixed) Hessian block H[J, J] = (2/N)·Σ x_J x_Jᵀ;
    ``start``: index of the block's first column in the linear.
    """

    d: Tensor
    h: Tensor
    start: int = 0


@dataclass
class BlockResult:
    """``q``: dequantized block (n × B), equal to ``decode_block(params, (n, B))``.
    ``params``: the block's stored form, method-specific names. Convention: a bool tensor is stored as one
    bit per element (sign planes: True = +1), a floating tensor as fp16 — so ``bits.storage`` equals
    ``storage_bits(params)`` and a packer needs to know nothing about the method.
    ``bits``: the same count split into sign / bitmap / parameter bits."""

    q: Tensor
    params: dict[str, Tensor]
    bits: Bits
    stats: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Binarizer(Protocol):
    """A binarization method: a small config dataclass with ``quantize_block``."""

    name: ClassVar[str]

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult: ...

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        """Dequantize a block from its stored form (the inverse a packed checkpoint relies on)."""
        ...


def block_widths(in_features: int, block_size: int) -> list[int]:
    """Each column block's width: ``block_size`` columns, the last block narrower."""
    return [min(block_size, in_features - s) for s in range(0, in_features, block_size)]


def decode_linear(method: Binarizer, blocks: list[dict[str, Tensor]], shape: tuple[int, int], block_size: int) -> Tensor:
    """A linear's dense fp32 weight from its per-block stored forms (blocks of ``block_size`` columns, the last
    narrower), decoded with the method's own ``decode_block``."""
    n, m = shape
    widths = block_widths(m, block_size)
    if len(widths) != len(blocks):
        raise ValueError(f"{len(blocks)} blocks for a {shape} weight in blocks of {block_size} (needs {len(widths)})")
    return torch.cat([method.decode_block(b, (n, w)).float() for b, w in zip(blocks, widths)], 1)


def storage_bits(params: dict[str, Tensor]) -> int:
    """Bits of a block's stored form under the BlockResult convention (bool → 1 bit, float → fp16)."""
    return sum(t.numel() * (1 if t.dtype == torch.bool else PARAM_BITS) for t in params.values())


def signs_to_bits(b: Tensor) -> Tensor:
    """±1 sign plane → bool (True = +1)."""
    return b > 0


def bits_to_signs(bits: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """bool plane → ±1."""
    return bits.to(dtype) * 2 - 1


_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a method available to ``build_method`` under ``name``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}") from None


def method_options(name: str) -> dict[str, Any]:
    """The options a method accepts, with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(method_class(name))}


def build_method(name: str, **options: Any) -> Binarizer:
    """Instantiate a registered method; unknown options raise with the list of valid ones."""
    cls = method_class(name)
    valid = method_options(name)
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(f"method {name!r} does not take {bad}; its options: {sorted(valid)}")
    return cls(**options)
