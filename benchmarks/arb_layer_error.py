"""Output error of sign / braq / ARB variants on one real decoder layer (cheap stand-in for a full run).

Same measurement as ``hbllm_layer_error.py`` (whose capture it reuses): the Hessian-weighted relative error
Σ tr(ΔW H ΔWᵀ) / Σ tr(W H Wᵀ) over the layer's linears, paper and storage bpw, and seconds.

    .venv/bin/python benchmarks/arb_layer_error.py --layer 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hbllm_layer_error import layer_hessians  # noqa: E402

from onebit.data import calibration_samples  # noqa: E402
from onebit.engine.solver import quantize_linear  # noqa: E402
from onebit.methods import Bits, build_method  # noqa: E402
from onebit.models.loading import load_model  # noqa: E402

METHODS = [("sign", {}), ("braq", {}), ("arb", {}), ("arb", {"cgb": True}), ("arb-x", {"cgb": False}),
           ("arb-x", {}), ("arb-rc", {"cgb": False}), ("arb-rc", {})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, _ = load_model("smollm2")
    ids, source = calibration_samples("c4", tok, args.nsamples, args.seqlen, 0)
    mats = layer_hessians(model, args.layer, ids)
    print(f"layer {args.layer}, {len(mats)} linears, calibration {args.nsamples} × {args.seqlen} from {source}\n")
    print("| method | options | Σ tr(ΔW H ΔWᵀ) / Σ tr(W H Wᵀ) | paper bpw | storage bpw | seconds |")
    print("|---|---|---|---|---|---|")
    for name, opts in METHODS:
        method = build_method(name, **opts)
        t0, num, den, bits = time.perf_counter(), 0.0, 0.0, Bits()
        for w, h in mats.values():
            res = quantize_linear(w, h, method)
            dw = res.q - w
            num += float((dw @ h * dw).sum())
            den += float((w @ h * w).sum())
            bits = bits + res.bits
        label = " ".join(f"{k}={v}" for k, v in vars(method).items() if k in ("cgb",)) or "–"
        print(f"| {name} | {label} | {num / den:.4f} | {bits.paper_bpw:.3f} | {bits.storage_bpw:.3f} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
