"""Per-linear bit budget (``--bpw-budget B``, issue #18, docs/budget.md).

Every linear is solved with each candidate configuration (a method and its options); the plan keeps, for each
group of linears solved together (a layer; a linear group with ``--true-sequential``), the candidates that
minimize the group's summed output error Σ tr(ΔW H ΔWᵀ) (absolute, on the layer's calibration Hessian) within
the group's share of the bits. With the ``output`` objective each linear's term is weighted by how much of it
reaches the layer's output (``output_weight``: the layer replayed on a few samples with that linear alone
quantized), so a linear whose error the layer damps (q/k through the softmax) stops drawing bits from the
ones whose error goes straight to the residual stream. The choice is exact (a multiple-choice knapsack:
``best_choice``), so a larger share never gives a group more error. Methods are only names here: any
registered method can be a candidate.

The share: the bits the linears before the group left under B (B × their weights, unspent bits carried
over), and never more than leaves the cheapest candidate ("floor") of every later linear within B × all
weights. The floors are measured before any work by a probe solve per shape and candidate, so a budget below
them is refused at once; a floor candidate's storage must follow from the shape alone (checked on two probes
and against each real solve), and then the run's storage bpw cannot exceed B (also checked at the end).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from ..methods.base import build_method
from .plan import LinearPlan, Plan, Probe, Shapes, default_fallback, fixed_block
from .solver import LinearResult, quantize_linear

if TYPE_CHECKING:
    from .pipeline import LinearRecord

OBJECTIVES = ("weight", "output")


@lru_cache(maxsize=None)
def _probe_bits(method: str, options: str, block_size: int, shape: tuple[int, int], seed: int) -> int:
    """Storage bits of ``method`` (JSON ``options``) on a random weight of ``shape`` with a random diagonal
    Hessian, no feedback: what the candidate costs when its storage follows from the shape alone."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    h = torch.diag(torch.rand(shape[1], generator=g) + 0.5)
    return quantize_linear(w, h, build_method(method, **json.loads(options)), block_size, feedback="none").bits.storage


def probe_bits(plan: LinearPlan, shape: tuple[int, int], seed: int = 0) -> int:
    return _probe_bits(plan.method, json.dumps(plan.options, sort_keys=True), plan.block_size, shape, seed)


def best_choice(options: list[list[tuple[int, float]]], cap: int) -> list[int]:
    """The choice (one option per item, options as (bits, err)) of least summed error whose summed bits fit
    ``cap`` (ties: fewer bits). Exact: the Pareto front of partial sums is carried item by item (a sum is kept
    only if every cheaper one has more error), without sums that leave too few bits for the later items'
    cheapest options."""
    after = [sum(min(b for b, _ in opts) for opts in options[i + 1:]) for i in range(len(options))]
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for i, opts in enumerate(options):
        sums = sorted((b + ob, e + oe, ks + (k,)) for b, e, ks in front for k, (ob, oe) in enumerate(opts)
                      if b + ob + after[i] <= cap)
        front = []
        for b, e, ks in sums:
            if not front or e < front[-1][1]:
                front.append((b, e, ks))
        if not front:
            raise ValueError(f"no choice fits {cap} bits: the cheapest options need more")
    return list(front[-1][2])


class BudgetPlan(Plan):
    """A ``Plan`` whose linears each try every candidate (``candidates``: [{method, options}], the first the
    run's nominal method) and keep, group by group, the least-error choice that holds the whole model at or
    below ``budget`` storage bpw."""

    def __init__(self, budget: float, candidates: list[dict[str, Any]], blocksize: int, objective: str = "weight") -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"budget objective must be one of {OBJECTIVES}, got {objective!r}")
        first = candidates[0]
        super().__init__(first["method"], first.get("options") or {}, blocksize, _fallback(first["method"]))
        self.budget, self.objective = budget, objective
        self.wants_probe = objective == "output"
        self.plans = [Plan(c["method"], c.get("options") or {}, blocksize, _fallback(c["method"])) for c in candidates]
        self.floors: dict[tuple[int, str], tuple[int, int]] | None = None  # (layer, name) → (candidate, bits)
        self.steps: list[dict[str, Any]] = []
        self.linears: list[dict[str, Any]] = []

    def candidates(self, layer: int, name: str, shape: tuple[int, int]) -> list[LinearPlan]:
        return [p.resolve(layer, name, shape) for p in self.plans]

    def start(self, shapes: Shapes) -> None:
        """Measure every linear's floor; refuse a budget below the floors' total, or a floor candidate whose
        storage depends on the weights (a later linear could then cost more than was set aside for it)."""
        super().start(shapes)
        self.weights = sum(s[0] * s[1] for _, _, s in shapes)
        self.allowance = _bits_under(self.budget, self.weights)
        self.floors = {}
        for layer, name, shape in shapes:
            plans = self.candidates(layer, name, shape)
            bits = [probe_bits(p, shape) for p in plans]
            k = min(range(len(bits)), key=bits.__getitem__)
            if probe_bits(plans[k], shape, seed=1) != bits[k]:
                raise InputError(f"budget candidate {plans[k].method} {plans[k].options} is the cheapest for a {shape} "
                                 f"linear, but its storage depends on the weights: it cannot bound a budget",
                                 hint="Add a cheaper candidate whose storage follows from the shape (e.g. lean, sign, gptq)")
            self.floors[(layer, name)] = (k, bits[k])
        self.floor_left = sum(b for _, b in self.floors.values())
        if self.floor_left > self.allowance:
            need = self.floor_left / self.weights
            raise InputError(f"--bpw-budget {self.budget:g} is below what the cheapest budget candidates store: "
                             f"{need:.4f} bpw over the model's {self.weights} linear weights",
                             hint=f"Raise the budget to at least {math.ceil(need * 1e4) / 1e4:.4f} or add a cheaper "
                                  f"candidate (--budget-candidates)")
        self.spent = self.seen = 0

    def choose(self, layer: int, solved: dict[str, list[LinearResult]], probe: Probe | None = None) -> dict[str, int]:
        if self.floors is None:
            raise RuntimeError("BudgetPlan.start was not called with the model's linears")
        names = list(solved)
        weight = {n: 1.0 for n in names}
        if self.objective == "output":
            if probe is None:
                raise RuntimeError("the output objective needs the pipeline's probe")
            weight = {n: output_weight(solved[n], probe, n) for n in names}
        options = [[(r.bits.storage, r.err * weight[n] if math.isfinite(r.err) else math.inf) for r in solved[n]]
                   for n in names]
        for n, opts in zip(names, options):
            k, bits = self.floors[(layer, n)]
            if opts[k][0] != bits:
                raise RuntimeError(f"layer {layer} {n}: the floor candidate stores {opts[k][0]} bits, its probe {bits}: "
                                   f"its storage depends on the weights")
        floor = sum(self.floors[(layer, n)][1] for n in names)
        weights = sum(solved[n][0].bits.weights for n in names)
        hard = self.allowance - self.spent - (self.floor_left - floor)
        pace = _bits_under(self.budget, self.seen + weights) - self.spent
        cap = min(hard, max(pace, floor))
        choice = best_choice(options, cap)
        bits = sum(opts[k][0] for opts, k in zip(options, choice))
        assert bits <= hard, (bits, hard)
        self.steps.append(dict(layer=layer, linears=names, cap_bits=cap, bits=bits, weights=weights,
                               err=sum(opts[k][1] for opts, k in zip(options, choice))))
        self.linears += [dict(layer=layer, name=n, choice=k, candidates=[[b, e] for b, e in opts], weight=weight[n])
                         for n, opts, k in zip(names, options, choice)]
        return dict(zip(names, choice))

    def observe(self, records: list["LinearRecord"]) -> None:
        for r in records:
            self.spent += r.bits.storage
            self.seen += r.bits.weights
            self.floor_left -= self.floors[(r.layer, r.name)][1]
        if self.seen == self.weights and self.spent > self.allowance:
            raise RuntimeError(f"bit budget broken: {self.spent} bits > {self.allowance} (a bug)")

    def summary(self) -> dict[str, Any]:
        """B, the achieved storage bpw, the floor, each group's share, bits and error, and each solved linear's
        choice among its candidates' [storage bits, tr(ΔW H ΔWᵀ)] (linears resumed from checkpoints: not listed)."""
        return dict(bpw_budget=self.budget, objective=self.objective, storage_bpw=self.spent / max(self.seen, 1),
                    storage_bits=self.spent, weights=self.seen, allowance_bits=self.allowance,
                    floor_bpw=sum(b for _, b in self.floors.values()) / max(self.weights, 1),
                    candidates=[dict(method=p.method, options=p.options) for p in self.plans],
                    steps=self.steps, linears=self.linears)


def output_weight(results: list[LinearResult], probe: Probe, name: str) -> float:
    """How much of a linear's tr(ΔW H ΔWᵀ) reaches its layer's output: the output error its worst candidate
    causes alone (``probe``) over that candidate's own error; 0 if no candidate has any error. Linearized: the
    other candidates' output errors are taken to scale with their tr(ΔW H ΔWᵀ)."""
    errs = [r.err if math.isfinite(r.err) else -1.0 for r in results]
    k = max(range(len(errs)), key=errs.__getitem__)
    if errs[k] <= 0:
        return 0.0
    return max(probe(name, results[k].q), 0.0) / errs[k]


def _fallback(method: str) -> str | None:
    return default_fallback(method) if fixed_block(method) else None


def _bits_under(budget: float, weights: int) -> int:
    """The most whole bits that keep ``weights`` weights at or below ``budget`` bpw (exact: no float rounding)."""
    return math.floor(Fraction(budget) * weights)
