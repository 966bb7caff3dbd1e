"""The one interface between the engine and a binarization method.

The engine walks a linear layer in column blocks (framework §4). For each block it hands the method the
current, already error-compensated weights and the block's Hessian factors; the method returns the
dequantized block, the tensors a packer needs to store it, and an exact count of the bits those tensors
take. The engine never imports a method: methods register themselves by name here.
"""

from __future__ import annotations

import dataclasses
import itertools
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
    ``start``: index of the block's first column in the linear;
    ``linear``: what the method's optional ``prepare_linear`` returned for the whole linear (None without one).
    """

    d: Tensor
    h: Tensor
    start: int = 0
    linear: Any = None


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
    """A binarization method: a small config dataclass with ``quantize_block``.

    Optional, for column-wise error feedback (``--feedback column``): ``fit_block(w, ctx) -> ColumnFit``, the
    block's parameters fitted as ``quantize_block`` fits them, with each column then assigned by the engine.
    Optional ``default_feedback`` ("block" | "column" | "none"): what the method's paper does (default block).
    Optional ``prepare_linear(w, ctx) -> state``: called once per linear before its blocks, with the whole
    linear's (dead-column-fixed) weight and a ``BlockContext`` covering all its columns; every block's
    ``ctx.linear`` is then ``state`` (per-linear choices, e.g. a salient channel set). Whatever a block needs
    to decode must still be in its own stored form.
    """

    name: ClassVar[str]

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult: ...

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        """Dequantize a block from its stored form (the inverse a packed checkpoint relies on)."""
        ...


class ColumnFit(Protocol):
    """A block whose parameters (masks, scales, means, grids) are fixed, whose columns are assigned one at a
    time: ``assign(j, x)`` picks column j's codes for the current values ``x`` (n,) and returns the dequantized
    column; ``result()`` is the block's ``BlockResult`` from the codes assigned so far (every column once).
    A vector code sets ``group`` = g > 1 and provides ``assign_group(j, x, u)`` instead: columns j … j+g−1 at once
    (x: their current values, n × g; u: their g × g block of the Cholesky factor; vq.py), the engine then pushing
    their error on as block LDL."""

    def assign(self, j: int, x: Tensor) -> Tensor: ...

    def result(self) -> BlockResult: ...


class LevelFit:
    """``ColumnFit`` by nearest level: ``levels`` (n × B × L, or broadcastable: n × 1 × L) are the values each
    weight can take with the fitted parameters; a column's codes are the indices of the nearest levels (ties to
    the lowest). ``encode(codes)`` (codes n × B, long) gives the stored form; the decoder then reproduces the
    chosen levels, so ``result().q`` is what the engine fed back."""

    def __init__(self, method: Binarizer, base: BlockResult, levels: Tensor, encode: Callable[[Tensor], dict[str, Tensor]]) -> None:
        self.method, self.base, self.levels, self.encode = method, base, levels, encode
        n, b = base.q.shape
        self.codes = torch.zeros(n, b, dtype=torch.long, device=base.q.device)

    def assign(self, j: int, x: Tensor) -> Tensor:
        lv = self.levels[:, min(j, self.levels.shape[1] - 1)].expand(x.shape[0], -1)
        idx = (lv - x[:, None]).abs().argmin(-1)
        self.codes[:, j] = idx
        return lv.gather(1, idx[:, None])[:, 0]

    def assign_block(self, w: Tensor) -> BlockResult:
        """Every column at once from ``w`` (no feedback between them)."""
        self.codes = (self.levels.expand(*w.shape, -1) - w[..., None]).abs().argmin(-1)
        return self.result()

    def result(self) -> BlockResult:
        params = self.encode(self.codes)
        q = self.method.decode_block(params, tuple(self.base.q.shape)).to(self.base.q.dtype)
        return BlockResult(q, params, self.base.bits, dict(self.base.stats))


def sign_plane_fit(method: Binarizer, w: Tensor, ctx: BlockContext, planes: tuple[str, ...]) -> LevelFit:
    """Column fit of a method whose stored form is fitted parameters plus the sign planes ``planes`` (bool,
    True = +1; a plane may cover a subset of the columns, e.g. ``signs2`` on the salient ones): the parameters
    come from ``quantize_block``; the level of each weight under every sign combination is decoded by the
    method itself with the planes set constant, so the levels are exactly what the decoder can produce."""
    base = method.quantize_block(w, ctx)
    n, b = w.shape
    combos = list(itertools.product((False, True), repeat=len(planes)))  # (−,−), (−,+), (+,−), (+,+), …

    def with_planes(bits: tuple[bool, ...]) -> dict[str, Tensor]:
        return {**base.params, **{p: torch.full_like(base.params[p], v) for p, v in zip(planes, bits)}}

    levels = torch.stack([method.decode_block(with_planes(c), (n, b)).to(w.dtype) for c in combos], -1)
    table = torch.tensor(combos, device=w.device)  # L × planes

    def encode(codes: Tensor) -> dict[str, Tensor]:
        chosen = table[codes]  # n × B × planes
        out = dict(base.params)
        for k, p in enumerate(planes):
            plane = chosen[..., k]
            # a plane narrower than the block covers the columns where it matters (braq's salient columns)
            out[p] = plane if base.params[p].shape == plane.shape else plane[:, base.params["salient_cols"]]
        return out

    return LevelFit(method, base, levels, encode)


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
