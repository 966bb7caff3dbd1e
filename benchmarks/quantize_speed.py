"""Quantization speed, two views.

Default: seconds per linear for braq on a 4096×4096 layer with a random SPD Hessian, the searches' share of
it, and the same searches written as a per-candidate loop (the reference's structure) for comparison.

    .venv/bin/python benchmarks/quantize_speed.py [--n 4096] [--m 4096] [--blocks 4] [--device cpu]

``--whole-run``: a whole ``quantize`` + evaluation of the embedded model (demo setting: 16 × 1024 C4
calibration tokens; WikiText-2 perplexity on ``--eval-windows`` windows of 2048), once per thread count,
with the exclusive seconds of every stage (``onebit.timing``: calibration forward passes, Hessian
accumulation, Cholesky, searches, refinement, error feedback, the rest of the fits, layer replay, transform,
evaluation), so a change shows where the time went. Run it on a quiet machine, before and after a change.

    .venv/bin/python benchmarks/quantize_speed.py --whole-run --method arb-rc --cgb --threads 1,2 [--layers 4]

``--compare-before``: each thread count twice in the same process, first as before issue #16
(``onebit.timing.baseline``: every column-search candidate evaluated directly; the linears solved one after
another, each with all torch threads; LTDB learning one linear at a time), then as onebit
runs; prints the speed-ups and whether the stored forms (sha256 over every block tensor) are identical (at more
than one thread they are not: the "before" solves split their reductions over the threads, see the README).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
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


STAGES = ("transform", "calibration forward", "hessian accumulation", "cholesky", "searches", "refinement", "fit",
          "error feedback", "layer replay", "evaluation")


def whole_run(a: argparse.Namespace) -> None:
    """One quantize + evaluation per thread count (and variant: before issue #16 / now); a table of stage seconds side by side."""
    from onebit import QuantConfig, quantize
    from onebit.cli import method_options_from_flags
    from onebit.data.corpora import calibration_samples, eval_ids
    from onebit.engine.pipeline import hash_stored_forms
    from onebit.eval.ppl import perplexity
    from onebit.models.loading import load_model
    from onebit.timing import baseline, record

    opts = method_options_from_flags(a.method, {"cgb": True if a.cgb else None}, a.method_option)  # as the CLI reads them
    cfg = QuantConfig(method=a.method, method_options=opts, transform=a.transform)
    columns: list[tuple[str, dict[str, float], float, float, str]] = []
    variants = ("before", "onebit") if a.compare_before else ("onebit",)
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        for variant in variants:
            model, tok, _ = load_model(a.model)
            if a.layers:
                model.model.layers = model.model.layers[: a.layers]
                model.config.num_hidden_layers = a.layers
            calib, _ = calibration_samples("c4", tok, 16, 1024, 0, a.data_dir)
            ids = eval_ids("wikitext2", tok, a.data_dir, 2048)
            digest = hashlib.sha256()
            with record() as secs, (baseline() if variant == "before" else contextlib.nullcontext()):
                t0 = time.perf_counter()
                quantize(model, cfg, calib, on_layer=hash_stored_forms(digest))
                ppl = perplexity(model, ids, 2048, "cpu", a.eval_windows)
                wall = time.perf_counter() - t0
            label = f"{threads} thread{'s' * (threads > 1)}" + (f", {variant}" if a.compare_before else "")
            columns.append((label, dict(secs), wall, ppl, digest.hexdigest()))
    names = [s for s in STAGES if any(s in c[1] for c in columns)] + sorted({k for c in columns for k in c[1]} - set(STAGES))
    print(f"{a.method} {json.dumps(opts)} transform={a.transform}, {a.model}"
          f"{f' (first {a.layers} layers)' if a.layers else ''}, torch {torch.__version__}")
    print("| stage | " + " | ".join(f"{label}: s | share" for label, *_ in columns) + " |")
    print("|---|" + "---|---|" * len(columns))
    rows = [(n, [secs.get(n, 0.0) for _, secs, *_ in columns]) for n in names]
    rows.append(("other (untimed)", [wall - sum(secs.values()) for _, secs, wall, *_ in columns]))
    for n, values in rows:
        cells = [f"{v:.1f} | {v / c[2]:.0%}" for v, c in zip(values, columns)]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("| **whole run** | " + " | ".join(f"**{c[2]:.1f}** | 100%" for c in columns) + " |")
    if a.compare_before:
        for i in range(0, len(columns), 2):
            (l0, s0, w0, _, h0), (l1, s1, w1, _, h1) = columns[i : i + 2]
            q0, q1 = w0 - s0.get("evaluation", 0.0), w1 - s1.get("evaluation", 0.0)
            searches = (f", searches {s0['searches'] / s1['searches']:.2f}x" if s0.get("searches") and s1.get("searches")
                        else "")  # (solves in worker threads count as "fit")
            print(f"{l1}: whole run {w0 / w1:.2f}x, quantization alone {q0 / q1:.2f}x{searches} faster than {l0}; "
                  f"stored forms {'identical' if h0 == h1 else 'DIFFERENT'} (sha256 {h1[:16]}"
                  f"{', as at the first thread count' if i and h1 == columns[1][4] else ''})")
    print("WikiText-2 ppl (" + str(a.eval_windows) + " windows): " + ", ".join(f"{c[0]} {c[3]:.2f}" for c in columns))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--blocks", type=int, default=4, help="blocks timed for the per-candidate loop (it is slow)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--whole-run", action="store_true", help="time a whole quantize + evaluation by stage")
    ap.add_argument("--method", default="braq")
    ap.add_argument("--method-option", "-m", action="append", default=[], help="key=value (whole run)")
    ap.add_argument("--cgb", action="store_true")
    ap.add_argument("--transform", default="none")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (whole run)")
    ap.add_argument("--compare-before", action="store_true",
                    help="whole run: also run as before issue #16 (every search candidate evaluated directly, solves "
                         "in one thread with all torch threads) and compare seconds and stored-form hashes")
    ap.add_argument("--layers", type=int, default=0, help="only the first N decoder layers (0 = all)")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args()
    if a.whole_run:
        whole_run(a)
        return
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
