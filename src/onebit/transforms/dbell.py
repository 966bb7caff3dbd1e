"""DBellQuant's LTDB (Learnable Transformation for Dual-Bell), a float pre-pass that composes with any method.

y = W x = (W·diag(T))·(x ⊘ T): one positive scale per input channel, shared by the linears a norm feeds
(q/k/v, gate/up; OPT: q/k/v, fc1). T⁻¹ is folded into the norm (LayerNorm: weight **and** bias), T into
the weights, so the float model is unchanged. T starts from SmoothQuant's activation-aware rule and is
then learned per (linear, 128-column block) so that every block row of W·diag(T) becomes bimodal around
μ ± β (the "dual bell" a 1-bit sign·scale code fits well). See docs/dbellquant.md.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DataError, UnsupportedModelError
from ..models.base import ArchAdapter, get_module
from ..progress import track
from ..timing import one_thread_each

MODES = ("ltdb", "smoothquant")


@dataclass(frozen=True)
class LTDBOptions:
    """``epochs`` max SGD steps per block, ``lr``, loss exponent ``p`` (release 2, paper ablation 1),
    ``alpha`` of T⁰, LTDB ``block`` width (fixed at 128 in the reference, independent of the method's),
    ``loss_scale`` (×100), ``eps`` guarding |t*| → 0 in the DTNP denominator."""

    epochs: int = 200
    lr: float = 0.01
    p: float = 1.0
    alpha: float = 0.85
    block: int = 128
    loss_scale: float = 100.0
    eps: float = 1e-12


def init_scales(weight: Tensor, act_max: Tensor, alpha: float = 0.85) -> Tensor:
    """T⁰_j = c_j^α / (max_i |W_ij|)^(1−α), both clamped at 1e-5 as SmoothQuant (fp32)."""
    w_max = weight.detach().abs().amax(0).float().clamp_min(1e-5)
    return (act_max.float().pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)


def dual_bell_losses(
    v: Tensor, p: float = 1.0, scale: float = 100.0, eps: float = 1e-12, with_grad: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(L_DTNP, L_DTMD, ∂ΣL_DTNP/∂v or None) per block of ``v`` (..., rows, width): targets t± = μ ± β per
    row (μ row mean, β row mean absolute deviation), each element assigned to the nearer one (ties → t⁻).
    L_DTNP = scale·mean(|v − t*|/|t*|)^p (scale invariant; the trained loss),
    L_DTMD = mean min(|v − t⁺|, |v − t⁻|) (degree 1 in T; the stopping signal).
    The gradient is the closed form of what autograd gives through μ, β and t* (half autograd's cost):
    ∂/∂v_k = g_k·sgn(e_k)/b_k − mean(u) − (s_k − mean(s))·mean(u·σ), with e = v − t*, b = |t*|,
    σ = ±1 the chosen target, s = sgn(v − μ), g = scale·p·r^(p−1)/(rows·width), r = |e|/b and
    u = g·(sgn(e) + r·sgn(t*))/b."""
    rows, n = v.shape[-2:]
    mu = v.mean(-1, keepdim=True)
    c = v - mu
    beta = c.abs().mean(-1, keepdim=True)
    sigma = torch.where(c > 0, 1.0, -1.0)  # |c − β| < |c + β| ⇔ c > 0 (β > 0); c = 0 is a tie → t⁻
    e = c - sigma * beta
    t_star = mu + sigma * beta
    b = t_star.abs().clamp_min(eps)
    dist = e.abs()
    r = dist / b
    dtnp = scale * r.pow(p).mean((-2, -1))
    dtmd = dist.mean((-2, -1))
    if not with_grad:
        return dtnp, dtmd, None
    g = scale / (rows * n) * p * r.pow(p - 1) if p != 1 else torch.full_like(r, scale / (rows * n))
    se = e.sign()
    u = g * (se + r * t_star.sign()) / b
    s = c.sign()
    grad = g * se / b - u.mean(-1, keepdim=True) - (s - s.mean(-1, keepdim=True)) * (u * sigma).mean(-1, keepdim=True)
    return dtnp, dtmd, grad


def optimize_blocks(w: Tensor, t0: Tensor, opts: LTDBOptions) -> tuple[Tensor, Tensor]:
    """The released per-block procedure, batched over independent blocks ``w`` (nb, rows, width), ``t0``
    (nb, width): plain SGD on L_DTNP; a block stops (frozen) at the first step whose L_DTMD exceeds the
    previous step's, before applying it. Kept, as the release: the post-step t of the step with the lowest
    pre-step L_DTNP. Returns (T (nb, width), steps taken per block)."""
    dtype = torch.promote_types(w.dtype, torch.float32)  # fp32 (the release), fp64 kept for tests
    w = w.detach().to(dtype)
    t = t0.detach().to(dtype).clone()
    inf = torch.full((w.shape[0],), float("inf"), dtype=dtype)
    prev, best, keep = inf.clone(), inf.clone(), t.clone()
    active = torch.ones(w.shape[0], dtype=torch.bool)
    steps = torch.zeros(w.shape[0], dtype=torch.long)
    for _ in range(opts.epochs):
        dtnp, dtmd, grad_v = dual_bell_losses(w * t.unsqueeze(-2), opts.p, opts.loss_scale, opts.eps, with_grad=True)
        active &= ~(dtmd > prev)
        if not active.any():
            break
        prev = torch.where(active, dtmd, prev)
        t = torch.where(active[:, None], t - opts.lr * (grad_v * w).sum(-2), t)
        better = active & (dtnp < best)
        best = torch.where(better, dtnp, best)
        keep = torch.where(better[:, None], t, keep)
        steps += active
    return keep, steps


def ltdb_linear(weight: Tensor, t0: Tensor, opts: LTDBOptions) -> tuple[Tensor, Tensor]:
    """Learned T [in_features] for one linear: its full 128-column blocks batched, the narrower tail alone."""
    w = weight.detach().float()
    rows, cols = w.shape
    nfull = cols // opts.block
    parts, steps = [], []
    if nfull:
        wb = w[:, : nfull * opts.block].reshape(rows, nfull, opts.block).transpose(0, 1)
        t, s = optimize_blocks(wb, t0[: nfull * opts.block].reshape(nfull, opts.block), opts)
        parts.append(t.reshape(-1))
        steps.append(s)
    if cols % opts.block:
        t, s = optimize_blocks(w[None, :, nfull * opts.block :], t0[None, nfull * opts.block :], opts)
        parts.append(t[0])
        steps.append(s)
    return torch.cat(parts), torch.cat(steps)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """LTDB is thousands of small dependent steps: intra-op threads only add barrier waits (measured 60×
    slower with 2 threads on a busy 2-core machine), so it runs on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def merge_max_abs(scales: list[Tensor]) -> Tensor:
    """Per channel, the entry of largest |T| over the group's linears (sign kept)."""
    stacked = torch.stack(scales)
    return stacked.gather(0, stacked.abs().argmax(0, keepdim=True))[0]


@torch.no_grad()
def fold_scales(norm: nn.Module, linears: list[nn.Linear], t: Tensor) -> None:
    """γ ← γ ⊘ T (and β ← β ⊘ T for LayerNorm), W ← W·diag(T): the float function is unchanged."""
    t = t.to(norm.weight.dtype)
    norm.weight.div_(t.to(norm.weight.device))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(t.to(norm.bias.device))
    for lin in linears:
        lin.weight.mul_(t.to(lin.weight.device, lin.weight.dtype))


def group_scales(
    weights: list[Tensor], act_max: Tensor, mode: str, opts: LTDBOptions
) -> tuple[Tensor, Tensor]:
    """One group's merged T and the LTDB steps per block (empty for ``smoothquant``)."""
    if mode == "smoothquant":  # the release's OPT path: T from the group's max |W| per column, no learning
        w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp_min(1e-5)
        return (act_max.float().pow(opts.alpha) / w_max.pow(1 - opts.alpha)).clamp_min(1e-5), torch.zeros(0)
    with single_thread():
        learned = [ltdb_linear(w, init_scales(w, act_max, opts.alpha), opts) for w in weights]
    return merge_max_abs([t for t, _ in learned]), torch.cat([s for _, s in learned])


@torch.no_grad()
def apply_dbell(
    model: nn.Module,
    adapter: ArchAdapter,
    act_scales: dict[str, Tensor],
    opts: LTDBOptions = LTDBOptions(),
    mode: str = "ltdb",
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Transform every norm-fed linear group of ``model`` in place. Returns ({full linear name: T} — the
    columns' multipliers, for plots — and summary stats). ``act_scales`` are keyed by the full name of the
    group's first linear (its input is the norm's output, shared by the group)."""
    if mode not in MODES:
        raise ValueError(f"transform mode must be one of {MODES}, got {mode!r}")
    if getattr(model.config, "do_layer_norm_before", True) is False:
        raise UnsupportedModelError("the dual-bell fold needs pre-norm layers (OPT with do_layer_norm_before=False is "
                                    "post-norm)", hint="Drop --transform dbell for this model")
    t_start = time.perf_counter()
    applied: dict[str, Tensor] = {}
    all_t, all_steps = [], []
    layers = adapter.decoder_layers(model)
    jobs = []  # (layer index, group, its linears, its act-scales key), act scales checked before any work
    for idx, layer in enumerate(layers):
        for group in (g for g in adapter.groups if g.feeder_kind == "norm"):
            key = f"{adapter.layers}.{idx}.{group.linears[0]}"
            if key not in act_scales:
                raise DataError(f"act scales have no entry {key!r} (computed for another model?)",
                                hint="Compute them for this model: onebit act-scales MODEL --out FILE")
            jobs.append((idx, group, [get_module(layer, n) for n in group.linears], key))

    def learn(job: tuple[int, Any, list[nn.Linear], str]) -> tuple[Tensor, Tensor]:
        _, _, linears, key = job
        return group_scales([lin.weight for lin in linears], act_scales[key], mode, opts)

    # independent jobs (each reads only its own linears until all are learned): T at a time with T threads
    learned = track(one_thread_each(learn, jobs, cost=lambda job: sum(lin.weight.numel() for lin in job[2])),
                    f"{mode} transform", total=len(jobs))
    for (idx, group, linears, _), (t, steps) in zip(jobs, learned):
        fold_scales(get_module(layers[idx], group.feeder), linears, t)
        applied.update({f"{adapter.layers}.{idx}.{n}": t for n in group.linears})
        all_t.append(t)
        all_steps.append(steps)
    t_cat, s_cat = torch.cat(all_t), torch.cat(all_steps).float()
    stats = dict(
        mode=mode, seconds=time.perf_counter() - t_start, groups=len(all_t),
        frac_inv_below_1=float((t_cat.abs() > 1).float().mean()),
        mean_steps=float(s_cat.mean()) if s_cat.numel() else 0.0,
        frac_blocks_stopped_early=float((s_cat < opts.epochs).float().mean()) if s_cat.numel() else 0.0,
    )
    return applied, stats
