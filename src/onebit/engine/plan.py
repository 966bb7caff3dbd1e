"""Per-linear plan: which method, with which options and column block size, quantizes each linear.

A run names one method and one ``--blocksize``; most linears simply get them. A method whose stored form is a
fixed-size block type (``block_size`` class attribute: a GGUF block, e.g. q2_k's 256) takes its own block, and
a linear whose in_features that block does not divide cannot hold it: it gets the fallback method, resolved
the same way (llama.cpp's quantizer does this per tensor: Q2_K/TQ1_0/TQ2_0 → Q4_0, and F16 when even the
32-block fallback does not divide the row). The result is recorded per linear (report, layer checkpoints,
packed manifest), so decoding never guesses.

A plan may also give a linear several ``candidates``: the pipeline solves each, the plan's ``choose`` keeps
one per linear of a group, and ``observe`` sees every finished linear (solved or resumed). The plain plan
has one candidate; the per-linear bit budget (engine/budget.py) is a plan with several.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..methods.base import Binarizer, build_method, method_class

if TYPE_CHECKING:
    from torch import Tensor

    from .pipeline import LinearRecord
    from .solver import LinearResult

Shapes = list[tuple[int, str, tuple[int, int]]]
"""Every decoder linear of a model: (layer, name, weight shape)."""
Probe = Callable[[str, "Tensor"], float]


@dataclass(frozen=True)
class LinearPlan:
    """How one linear is quantized: a registered ``method``, its ``options``, its column ``block_size``."""

    method: str
    block_size: int
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Binarizer:
        return build_method(self.method, **self.options)

    def to_dict(self) -> dict[str, Any]:
        return dict(method=self.method, block_size=self.block_size, options=dict(self.options))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LinearPlan":
        return cls(d["method"], int(d["block_size"]), dict(d.get("options") or {}))


def fixed_block(method: str) -> int | None:
    """The block size a method's stored form fixes (a GGUF block type), or None (any block size)."""
    return getattr(method_class(method), "block_size", None)


def default_fallback(method: str) -> str | None:
    """What a fixed-block method falls back to where its block does not divide a row (None: no fallback)."""
    return getattr(method_class(method), "fallback", None)


class Plan:
    """The plan of a run: ``method`` with ``options`` at ``blocksize``; a fixed-block method at its own block,
    and where that block does not divide a linear's in_features, ``fallback`` (None: such linears are refused),
    itself resolved the same way, then its own ``fallback`` attribute (e.g. q4_0 → f16)."""

    def __init__(self, method: str, options: dict[str, Any], blocksize: int, fallback: str | None = None) -> None:
        self.method, self.options, self.blocksize, self.fallback = method, dict(options), blocksize, fallback

    def resolve(self, layer: int, name: str, shape: tuple[int, int]) -> LinearPlan:
        """The plan of linear ``name`` (e.g. ``self_attn.q_proj``) of decoder layer ``layer``, weight ``shape``."""
        method, options, fallback = self.method, self.options, self.fallback
        seen = []
        while True:
            block = fixed_block(method)
            if block is None:
                return LinearPlan(method, self.blocksize, options)
            if shape[1] % block == 0:
                return LinearPlan(method, block, options)
            seen.append(f"{method} ({block})")
            if fallback is None:
                raise ValueError(f"layer {layer} {name}: in_features {shape[1]} is not a multiple of the block of "
                                 f"{' → '.join(seen)} and no fallback method is set")
            method, options = fallback, {}
            fallback = default_fallback(method)

    def start(self, shapes: Shapes) -> None:
        """Called once with every linear of the model before any is solved: refuses a linear a candidate cannot
        code (a vector code's ``column_group`` must divide in_features and the block; a budget also checks itself)."""
        for layer, name, shape in shapes:
            for lp in self.candidates(layer, name, shape):
                group = getattr(lp.build(), "column_group", 1)
                if shape[1] % group or lp.block_size % group:
                    raise InputError(f"layer {layer} {name}: {lp.method} {lp.options} codes {group} columns together: in_features "
                                     f"{shape[1]} and the block size {lp.block_size} must both be multiples of {group}",
                                     hint=f"Use a --blocksize that is a multiple of {group}, or another method")

    def candidates(self, layer: int, name: str, shape: tuple[int, int]) -> list[LinearPlan]:
        """The plans linear ``name`` is solved with; ``choose`` keeps one of them."""
        return [self.resolve(layer, name, shape)]

    wants_probe = False
    """Whether ``choose`` needs ``probe``: the pipeline then measures what a weight does to the layer's output."""

    def choose(self, layer: int, solved: dict[str, list["LinearResult"]], probe: Probe | None = None) -> dict[str, int]:
        """Which candidate each linear of a group keeps, given every candidate's result (in ``candidates`` order);
        ``probe(name, weight)`` (when ``wants_probe``): how much the layer's output error on a few calibration
        samples grows when linear ``name`` alone takes ``weight``."""
        return {name: 0 for name in solved}

    def observe(self, records: list["LinearRecord"]) -> None:
        """Every finished linear's record, solved or resumed from a checkpoint."""

    def summary(self) -> dict[str, Any] | None:
        """What the plan decided, for the report (None: nothing beyond each linear's plan)."""
        return None
