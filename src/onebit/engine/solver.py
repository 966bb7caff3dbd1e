"""Per-linear solver: dead columns, damping, the upper Cholesky factor of H⁻¹, and the block loop with
BiLLM's block-only error compensation (framework §3–4). Method-agnostic: a block goes to a ``Binarizer``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import NumericalError
from ..methods.base import Binarizer, BlockContext, Bits
from ..timing import stage, timed

log = logging.getLogger(__name__)


@dataclass
class LinearResult:
    """``q``: the dequantized weight; ``blocks``: per-block stored tensors (for packers); ``bits``: totals;
    ``loss``: Σ (Wb − Qb)² / d² / 2 over blocks (the references' log line); ``rel_err``: tr(ΔW H ΔWᵀ) /
    tr(W H Wᵀ) with the original W and H (the output error the layer actually sees, relative); ``err``: the
    numerator tr(ΔW H ΔWᵀ) itself (absolute, in the linear's output units: what a bit budget compares;
    NaN in a result rebuilt from a checkpoint)."""

    q: Tensor
    blocks: list[dict[str, Tensor]]
    bits: Bits
    loss: float
    rel_err: float
    percdamp: float
    stats: dict[str, float] = field(default_factory=dict)
    err: float = float("nan")

    @classmethod
    def from_saved(cls, q: Tensor, blocks: list[dict[str, Tensor]], record: Any) -> "LinearResult":
        """Rebuild a result from a layer checkpoint (``record``: its ``LinearRecord``)."""
        return cls(q, blocks, record.bits, record.loss, record.rel_err, record.percdamp, dict(record.stats))


@timed("cholesky")
def inverse_factor(h: Tensor, percdamp: float, max_tries: int = 6, where: str = "linear") -> tuple[Tensor, float]:
    """U upper-triangular with H_damped⁻¹ = Uᵀ U. On Cholesky failure, damping grows ×10 and is logged.
    A Hessian with NaN/Inf (from non-finite inputs) fails at once; ``where`` names the linear in errors."""
    if not bool(torch.isfinite(h).all()):
        raise NumericalError(f"{where}: the Hessian holds NaN/Inf: the linear's inputs (calibration activations) "
                             f"contain NaN/Inf", hint="Check the model's weights and the layers before this one "
                                                      "(run `onebit eval` on the float model); the calibration text "
                                                      "cannot cause this")
    mean_diag = torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = percdamp
    for _ in range(max_tries):
        l, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(l), upper=True)
            if int(info) == 0:
                return u, damp
        log.warning("Cholesky failed at percdamp=%g; retrying with %g", damp, damp * 10)
        damp *= 10
    raise NumericalError(f"{where}: Hessian not positive definite even at percdamp={damp / 10:g} (inputs finite)",
                         hint="Calibrate on more tokens (--nsamples, --seqlen); if that does not help, it is a bug")


FEEDBACK = ("block", "column", "none")


def check_feedback(method: Binarizer, feedback: str, act_order: bool) -> None:
    """Refuse feedback settings the method cannot run (column feedback needs ``fit_block``)."""
    if feedback not in FEEDBACK:
        raise ValueError(f"feedback must be one of {FEEDBACK}, got {feedback!r}")
    if feedback == "column" and not hasattr(method, "fit_block"):
        raise ValueError(f"method {method.name!r} cannot assign single columns (its stored form is not per column, "
                         f"e.g. HBLLM's Haar bands): use feedback block or none")
    if act_order and getattr(method, "column_group", 1) > 1:
        raise ValueError(f"method {method.name!r} codes {method.column_group} adjacent columns together: act_order "
                         f"would split them (drop --act-order)")
    if act_order and feedback != "column":
        raise ValueError("act_order needs column feedback (--feedback column)")


def quantize_linear(
    weight: Tensor,
    hessian: Tensor,
    method: Binarizer,
    blocksize: int = 128,
    percdamp: float = 0.01,
    feedback: str = "block",
    act_order: bool = False,
    dtype: torch.dtype = torch.float32,
    name: str = "linear",
) -> LinearResult:
    """Quantize one linear's weight (n × m) given its Hessian (m × m), in ``dtype`` on the weight's device;
    ``name`` (e.g. ``layer 3 self_attn.q_proj``) identifies the linear in errors.

    ``feedback``: ``block`` — BiLLM's block-only compensation: each block is quantized whole, its error
    pushed to the later blocks through the Cholesky factor; ``column`` — GPTQ's: the method fits the block's
    parameters (``fit_block``), then the block's columns are assigned one by one, each column's error pushed
    to the block's remaining columns, the block's errors to the later blocks at once (GPTQ's lazy batch);
    ``none`` — every block quantized as it is (RTN). ``act_order`` (column feedback only, static as
    llm-compressor's): every block's parameters are fitted first on the original weights, then the columns
    are assigned in descending order of diag(H) in batches of ``blocksize``. The stored layout never changes:
    blocks stay contiguous column ranges in the original order.
    """
    check_feedback(method, feedback, act_order)
    fixed = getattr(method, "block_size", None)
    if fixed is not None and (blocksize != fixed or weight.shape[1] % fixed):
        raise ValueError(f"method {method.name!r} stores blocks of {fixed} columns: it needs blocksize {fixed} and "
                         f"in_features divisible by it (got {blocksize}, {weight.shape[1]}; engine/plan.py falls back)")
    w = weight.detach().to(dtype).clone()
    h = hessian.to(w.device, dtype).clone()
    w_orig, h_orig = w.clone(), h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    n, m = w.shape
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
    where = f"{name} ({int(dead.sum())} of {len(dead)} input columns dead)"
    u, damp = inverse_factor(h if perm is None else h[perm][:, perm], percdamp, where=where)
    dj = torch.diag(u) if perm is None else torch.diag(u)[torch.argsort(perm)]  # per original column
    starts = list(range(0, m, blocksize))
    prepare = getattr(method, "prepare_linear", None)  # per-linear choices (e.g. a channel set) before the blocks
    state = prepare(w, BlockContext(d=dj, h=h)) if prepare else None
    ctx = [BlockContext(d=dj[s : s + blocksize], h=h[s : s + blocksize, s : s + blocksize], start=s, linear=state)
           for s in starts]
    if feedback == "column":
        q, err, results = _column_feedback(w, u, method, ctx, blocksize, perm)
    else:
        q, err, results = _block_feedback(w, u, method, ctx, blocksize, feedback == "block")
    bits, stats = Bits(), {}
    for res in results:
        bits = bits + res.bits
        for k, v in res.stats.items():
            stats[k] = stats.get(k, 0.0) + v
    dw = q - w_orig
    out_err = (dw @ h_orig * dw).sum()
    rel = float(out_err / (w_orig @ h_orig * w_orig).sum().clamp_min(1e-30))
    loss = sum(float(err[:, s : s + blocksize].square().sum()) / 2 for s in starts)  # per block, as the references log
    return LinearResult(q.float(), [r.params for r in results], bits, loss, rel, damp, stats, float(out_err))


def _block_feedback(
    w: Tensor, u: Tensor, method: Binarizer, ctx: list[BlockContext], blocksize: int, compensate: bool
) -> tuple[Tensor, Tensor, list]:
    """Each block quantized whole; with ``compensate`` its error goes to the later blocks (BiLLM)."""
    m = w.shape[1]
    q, err, results = torch.zeros_like(w), torch.zeros_like(w), []
    for c in ctx:
        s, e = c.start, min(c.start + blocksize, m)
        res = method.quantize_block(w[:, s:e], c)
        err[:, s:e] = (w[:, s:e] - res.q) / c.d
        q[:, s:e] = res.q
        if compensate and e < m:
            with stage("error feedback"):
                w[:, e:] -= err[:, s:e] @ u[s:e, e:]
        results.append(res)
    return q, err, results


def _column_feedback(
    w: Tensor, u: Tensor, method: Binarizer, ctx: list[BlockContext], blocksize: int, perm: Tensor | None
) -> tuple[Tensor, Tensor, list]:
    """GPTQ's column loop in batches of ``blocksize`` (positions in ``perm`` order when given; ``u`` is the
    factor of the permuted Hessian then). Without ``perm`` a block is fitted when its batch starts, on the
    weights as compensated so far; with ``perm`` every block is fitted up front (static act-order). A fit with
    ``group`` > 1 (a vector code) assigns that many columns at once (``assign_group(j, x, u)``, u the group's
    block of the factor) and pushes their error on as block LDL: E = (x − q)·u⁻¹."""
    m = w.shape[1]
    order = torch.arange(m, device=w.device) if perm is None else perm
    wp = w[:, order]
    q, err = torch.zeros_like(w), torch.zeros_like(w)
    fits = [method.fit_block(w[:, c.start : c.start + blocksize], c) for c in ctx] if perm is not None else []
    cols = order.tolist()
    for s in range(0, m, blocksize):
        e = min(s + blocksize, m)
        if perm is None:
            fits.append(method.fit_block(wp[:, s:e], ctx[s // blocksize]))
        ub = u[s:e, s:e]
        with stage("error feedback"):  # the column loop: each column's level assignment and its error pushed on
            fit = fits[-1] if perm is None else None
            group = getattr(fit, "group", 1)
            for p in range(s, e, group):
                if group > 1:  # a vector code: ``group`` columns at once, their error pushed on as block LDL
                    i, k = p - s, p - s + group
                    x = wp[:, p : p + group]
                    qg = fit.assign_group(i, x, ub[i:k, i:k])
                    eg = torch.linalg.solve_triangular(ub[i:k, i:k], x - qg, upper=True, left=False)
                    wp[:, p + group : e] -= eg @ ub[i:k, k:]
                    q[:, p : p + group], err[:, p : p + group] = qg, eg
                    continue
                c = cols[p]
                x = wp[:, p]
                qc = fits[c // blocksize].assign(c % blocksize, x)
                ec = (x - qc) / ub[p - s, p - s]
                wp[:, p + 1 : e] -= ec[:, None] * ub[p - s, p - s + 1 :][None]
                q[:, c], err[:, p] = qc, ec
            if e < m:
                wp[:, e:] -= err[:, s:e] @ u[s:e, e:]
    results = [f.result() for f in fits]
    for c, r in zip(ctx, results):  # the decoder must reproduce exactly what was fed back
        s = c.start
        if not torch.equal(r.q.to(q.dtype), q[:, s : s + r.q.shape[1]]):
            raise RuntimeError(f"{method.name}: decoded block at column {s} differs from the assigned columns")
    return q, err, results
