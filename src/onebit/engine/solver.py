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

log = logging.getLogger(__name__)


@dataclass
class LinearResult:
    """``q``: the dequantized weight; ``blocks``: per-block stored tensors (for packers); ``bits``: totals;
    ``loss``: Σ (Wb − Qb)² / d² / 2 over blocks (the references' log line); ``rel_err``: tr(ΔW H ΔWᵀ) /
    tr(W H Wᵀ) with the original W and H (the output error the layer actually sees, relative)."""

    q: Tensor
    blocks: list[dict[str, Tensor]]
    bits: Bits
    loss: float
    rel_err: float
    percdamp: float
    stats: dict[str, float] = field(default_factory=dict)


    @classmethod
    def from_saved(cls, q: Tensor, blocks: list[dict[str, Tensor]], record: Any) -> "LinearResult":
        """Rebuild a result from a layer checkpoint (``record``: its ``LinearRecord``)."""
        return cls(q, blocks, record.bits, record.loss, record.rel_err, record.percdamp, dict(record.stats))


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


def quantize_linear(
    weight: Tensor,
    hessian: Tensor,
    method: Binarizer,
    blocksize: int = 128,
    percdamp: float = 0.01,
    compensate: bool = True,
    name: str = "linear",
) -> LinearResult:
    """Quantize one linear's weight (n × m) given its Hessian (m × m). Works in fp32 on the weight's device.
    ``name`` (e.g. ``layer 3 self_attn.q_proj``) identifies the linear in errors."""
    w = weight.detach().to(torch.float32).clone()
    h = hessian.to(w.device, torch.float32).clone()
    w_orig, h_orig = w.clone(), h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u, damp = inverse_factor(h, percdamp, where=f"{name} ({int(dead.sum())} of {len(dead)} input columns dead)")
    dj = torch.diag(u)
    n, m = w.shape
    q = torch.zeros_like(w)
    blocks, bits, loss = [], Bits(), 0.0
    stats: dict[str, float] = {}
    for s in range(0, m, blocksize):
        e = min(s + blocksize, m)
        wb = w[:, s:e]
        res = method.quantize_block(wb, BlockContext(d=dj[s:e], h=h[s:e, s:e], start=s))
        err = (wb - res.q) / dj[s:e]
        q[:, s:e] = res.q
        if compensate and e < m:
            w[:, e:] -= err @ u[s:e, e:]
        loss += float(err.square().sum()) / 2
        blocks.append(res.params)
        bits = bits + res.bits
        for k, v in res.stats.items():
            stats[k] = stats.get(k, 0.0) + v
    dw = q - w_orig
    rel = float((dw @ h_orig * dw).sum() / (w_orig @ h_orig * w_orig).sum().clamp_min(1e-30))
    return LinearResult(q, blocks, bits, loss, rel, damp, stats)
