"""Small, JSON-serializable configuration (torchao style): what to quantize with, how to calibrate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .engine.budget import OBJECTIVES, BudgetPlan
from .engine.pipeline import EngineOptions
from .engine.plan import Plan, default_fallback, fixed_block
from .engine.solver import FEEDBACK, check_feedback
from .methods import build_method
from .methods.base import Binarizer, method_class
from .recipes import candidate_set

TRANSFORMS = ("none", "dbell", "rotate")


@dataclass
class QuantConfig:
    """``method`` and its ``method_options`` (see ``onebit methods``), plus the engine's knobs:
    ``blocksize`` (column block = group size), ``percdamp`` (relative damping), ``gptq`` (error compensation;
    False = the references' ``--disable_gptq``, i.e. ``feedback="none"``), ``true_sequential``, ``device``,
    ``feedback`` ("block" | "column" | "none"; "auto" = the method's paper: block for the seed methods, column
    for gptq, none for rtn), ``act_order`` (static act-order with column feedback; None = the method's
    default: on for gptq only) and ``fallback``: for a method with a fixed block (a GGUF block type, whose
    block size replaces ``blocksize``), the method of linears whose in_features that block does not divide
    ("auto" = the method's own, q4_0 for the 1–2-bit types as llama.cpp; None = refuse such linears).
    ``bpw_budget`` (docs/budget.md): a storage-bpw bound over all quantized linears; each linear then tries
    every one of ``budget_candidates`` (a set's name in ``onebit.recipes.CANDIDATES``, or a list of
    ``{"method", "options"}``) and keeps the choice of engine/budget.py; ``method`` and ``method_options``
    become the first candidate's (the nominal method: labels, feedback and act-order defaults);
    ``budget_objective`` what the choice minimizes: "weight" (Σ tr(ΔW H ΔWᵀ)) or "output" (each linear's term
    weighted by its measured effect on the layer's output)."""

    method: str = "braq"
    method_options: dict[str, Any] = field(default_factory=dict)
    blocksize: int = 128
    percdamp: float = 0.01
    gptq: bool = True
    true_sequential: bool = False
    device: str = "cpu"
    # DBellQuant (docs/dbellquant.md): float pre-pass ``transform`` ("none" | "dbell") and activation fake
    # quantization ``act_bits`` (8 | 6 | 4; None = A16), H from quantized inputs or not, LTDB knobs,
    # ``ltdb_opt`` = what OPT (LayerNorm with bias) gets: "ltdb" or the release's plain "smoothquant",
    # ``act_scales``: a safetensors file from ``onebit act-scales`` (None = computed from the calibration set).
    transform: str = "none"
    act_bits: int | None = None
    hessian_from_quantized_acts: bool = True
    ltdb_epochs: int = 200
    ltdb_lr: float = 0.01
    ltdb_p: float = 1.0
    ltdb_opt: str = "ltdb"
    act_scales: str | None = None
    feedback: str = "auto"
    act_order: bool | None = None
    # Rotation pre-pass (transform "rotate", docs/rotation.md): seed of the randomized Hadamards, per-head
    # rotation between v_proj and o_proj (folded), online Hadamard on down_proj's input (a forward hook).
    rotate_seed: int = 0
    rotate_heads: bool = False
    rotate_down: bool = False
    fallback: str | None = "auto"
    bpw_budget: float | None = None
    budget_candidates: str | list[dict[str, Any]] = "lean"
    budget_objective: str = "weight"

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise ValueError("blocksize must be positive")
        if not 0 < self.percdamp < 1:
            raise ValueError("percdamp must be in (0, 1)")
        self._validate_dbell()
        self._validate_rotate()
        self._resolve_budget()
        method = self.build_method()  # validates the method name and options early
        self._resolve_feedback(method)
        self._resolve_fallback()
        for c in self.budget_candidates[1:] if self.bpw_budget is not None else []:
            try:
                check_feedback(build_method(c["method"], **c["options"]), self.feedback, self.act_order)
            except ValueError as e:
                raise ValueError(f"budget candidate {c['method']} {c['options']}: {e}") from None

    def _resolve_budget(self) -> None:
        """Make ``budget_candidates`` an explicit list, each candidate checked; the nominal method is the first."""
        if self.budget_objective not in OBJECTIVES:
            raise ValueError(f"budget_objective must be one of {', '.join(OBJECTIVES)}, got {self.budget_objective!r}")
        if self.bpw_budget is None:
            if self.budget_candidates != "lean" or self.budget_objective != "weight":
                raise ValueError("budget_candidates and budget_objective need bpw_budget")
            return
        if not self.bpw_budget > 0:
            raise ValueError(f"bpw_budget must be positive, got {self.bpw_budget}")
        cands = self.budget_candidates
        cands = candidate_set(cands) if isinstance(cands, str) else cands
        if not isinstance(cands, list) or not cands or not all(isinstance(c, dict) and "method" in c for c in cands):
            raise ValueError("budget_candidates must be a set's name or a non-empty list of {method, options}")
        self.budget_candidates = [dict(method=c["method"], options=dict(c.get("options") or {})) for c in cands]
        for c in self.budget_candidates:
            build_method(c["method"], **c["options"])
        self.method, self.method_options = self.budget_candidates[0]["method"], dict(self.budget_candidates[0]["options"])

    def _resolve_feedback(self, method: Binarizer) -> None:
        """Make ``feedback`` and ``act_order`` explicit (the report then records what ran)."""
        if self.feedback not in ("auto", *FEEDBACK):
            raise ValueError(f"feedback must be auto, {', '.join(FEEDBACK)}; got {self.feedback!r}")
        if not self.gptq:
            if self.feedback not in ("auto", "none"):
                raise ValueError(f"--no-gptq turns error feedback off; it contradicts feedback={self.feedback!r}")
            self.feedback = "none"
        if self.feedback == "auto":
            self.feedback = getattr(method, "default_feedback", "block")
        self.gptq = self.feedback != "none"
        if self.act_order is None:
            self.act_order = self.feedback == "column" and getattr(method, "default_act_order", False)
        check_feedback(method, self.feedback, self.act_order)

    def _resolve_fallback(self) -> None:
        """Make ``fallback`` explicit: a method name, or None (no fixed block, or refused)."""
        fixed = fixed_block(self.method)
        if self.fallback == "auto":
            self.fallback = default_fallback(self.method) if fixed else None
        if self.fallback in (None, "none"):
            self.fallback = None
            return
        if fixed is None:
            raise ValueError(f"fallback applies to methods with a fixed block (GGUF types); {self.method!r} "
                             f"takes any block size")
        if self.feedback == "column" and not hasattr(method_class(self.fallback), "fit_block"):
            raise ValueError(f"fallback method {self.fallback!r} cannot assign single columns: use feedback block")

    def plan(self) -> Plan:
        """Each linear's method and block size (engine/plan.py), or its choice under the bit budget."""
        if self.bpw_budget is not None:
            return BudgetPlan(self.bpw_budget, self.budget_candidates, self.blocksize, self.budget_objective)
        return Plan(self.method, self.method_options, self.blocksize, self.fallback)

    def _validate_dbell(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)} (a single pre-pass: dbell's scales "
                             f"live in the norms that rotate fuses away), got {self.transform!r}")
        if self.act_bits == 16:
            self.act_bits = None
        if self.act_bits not in (None, 4, 6, 8):
            raise ValueError(f"act_bits must be 8, 6, 4 or None (16 = A16), got {self.act_bits}")
        if self.ltdb_epochs < 0 or self.ltdb_lr <= 0 or self.ltdb_p <= 0:
            raise ValueError("ltdb_epochs must be >= 0, ltdb_lr and ltdb_p positive")
        if self.ltdb_opt not in ("ltdb", "smoothquant"):
            raise ValueError(f"ltdb_opt must be 'ltdb' or 'smoothquant', got {self.ltdb_opt!r}")
        if self.act_scales is not None and self.transform != "dbell":
            raise ValueError("act_scales is only used by transform='dbell'")

    def _validate_rotate(self) -> None:
        if (self.rotate_heads or self.rotate_down) and self.transform != "rotate":
            raise ValueError("rotate_heads and rotate_down need transform='rotate'")
        if self.rotate_down and self.act_bits is not None and not self.hessian_from_quantized_acts:
            raise ValueError("rotate_down with a raw-input Hessian (hessian_from_quantized_acts=False) would miss the "
                             "online Hadamard, which runs as a pre-hook before activation quantization")

    def build_method(self) -> Binarizer:
        return build_method(self.method, **self.method_options)

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            self.percdamp, self.feedback, self.act_order, self.true_sequential, self.device,
            hessian_raw_inputs=self.act_bits is not None and not self.hessian_from_quantized_acts,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method_options"] = dataclasses.asdict(self.build_method())  # defaults made explicit
        for key in ("fallback", "bpw_budget"):  # absent = none: runs written before them keep their fingerprints
            if d[key] is None:
                del d[key]
        if "bpw_budget" not in d:
            del d["budget_candidates"]
        if d["budget_objective"] == "weight":  # the objective before there was a choice
            del d["budget_objective"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        return cls(**d)


@dataclass
class CalibConfig:
    """Calibration set: ``dataset`` name, ``nsamples`` windows of ``seqlen`` tokens, ``seed``."""

    dataset: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
