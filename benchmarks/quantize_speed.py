"""Seconds per linear for braq on a 4096×4096 layer with a random SPD Hessian, the searches' share of it,
and the same searches written as a per-candidate loop (the reference's structure) for comparison.

    .venv/bin/python benchmarks/quantize_speed.py [--n 4096] [--m 4096] [--blocks 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from onebit.engine.solver import quantize_linear
from onebit.methods import build_method
from onebit.methods.binarize import residual_error
from onebit.methods.salient import salient_columns, salient_metric, split_threshold


def loop_searches(t: torch.Tensor) -> None:
    """The reference's shape: one binarization per candidate, quantiles through NumPy on the CPU."""
    b = t.shape[1]
    cand = torch.topk(t.abs().sum(0), min(50, b)).indices
    best = None
    for k in range(1, min(50, b)):
        s = torch.zeros(b, dtype=torch.bool, device=t.device)
        s[cand[:k]] = True
        err = float(residual_error(t, s, 2) + residual_error(t, ~s, 2))
        if best is None or err < best[0]:
            best = (err, s)
    sal = best[1].expand_as(t)
    mag = (t * ~sal).abs()
    best = None
    for p in np.quantile(mag.flatten().cpu().numpy(), np.linspace(0.1, 0.9, 81)):
        c = ~sal & (mag < float(p))
        err = float(residual_error(t, c, 1) + residual_error(t, ~sal & ~c, 1))
        if best is None or err < best:
            best = err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--blocks", type=int, default=4, help="blocks timed for the per-candidate loop (it is slow)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    w = torch.randn(a.n, a.m, device=dev) * 0.02
    x = torch.randn(a.m, 2 * a.m, device=dev)
    h = 2 * x @ x.T / x.shape[1]
    braq = build_method("braq")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    res = quantize_linear(w, h, braq)
    sync()
    total = time.perf_counter() - t0

    d = torch.rand(128, device=dev) + 0.5
    blocks = [salient_metric(w[:, s : s + 128], d, "hessian") for s in range(0, a.m, 128)]
    t0 = time.perf_counter()
    for t in blocks:
        split_threshold(t, salient_columns(t))
    sync()
    search = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in blocks[: a.blocks]:
        loop_searches(t)
    sync()
    loop = (time.perf_counter() - t0) / a.blocks * len(blocks)

    print(f"braq on {a.n}×{a.m} ({len(blocks)} blocks of 128), device {dev}, torch threads {torch.get_num_threads()}")
    print(f"| what | seconds per linear | ratio |\n|---|---|---|")
    print(f"| braq, whole linear (searches + fits + compensation) | {total:.2f} | 1.00 |")
    print(f"| of which searches, batched (onebit) | {search:.2f} | {search / total:.2f} of total |")
    print(f"| searches as a per-candidate loop (reference structure, {a.blocks} blocks timed, scaled) | {loop:.2f} | {loop / search:.1f}× slower than batched |")
    print(f"paper bpw {res.bits.paper_bpw:.3f}, storage bpw {res.bits.storage_bpw:.3f}, rel. output error {res.rel_err:.4f}")


if __name__ == "__main__":
    main()
