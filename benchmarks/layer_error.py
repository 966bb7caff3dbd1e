"""Output error of binarization methods on one real decoder layer (a cheap stand-in for full-model runs).

Captures the fp inputs of every linear of one decoder layer of the embedded model on the demo calibration
set, then quantizes each linear with each method (block loop with compensation, as the pipeline does) and
prints, per method, the Hessian-weighted relative error Σ tr(ΔW H ΔWᵀ) / Σ tr(W H Wᵀ) over the layer's
linears, paper and storage bpw, and seconds. For layer 0 these Hessians are exactly what the pipeline uses.

    .venv/bin/python benchmarks/layer_error.py --set arb --layer 0
    .venv/bin/python benchmarks/layer_error.py --set hbllm --layer 0
"""

from __future__ import annotations

import argparse
import time

import torch

from onebit.data import calibration_samples
from onebit.engine.hessian import HessianAccumulator
from onebit.engine.solver import quantize_linear
from onebit.methods import Bits, build_method
from onebit.models import get_adapter
from onebit.models.loading import load_model

SETS = {
    "arb": [("sign", {}), ("braq", {}), ("arb", {}), ("arb", {"cgb": True}), ("arb-x", {"cgb": False}),
            ("arb-x", {}), ("arb-rc", {"cgb": False}), ("arb-rc", {})],
    "hbllm": [("braq", {}), ("row-hbraq", {}), ("row-hbraq", {"share_mean": True}), ("col-hbraq", {}),
              ("col-hbraq", {"share_mean": True})],
    # docs/lean.md: the seed references, then lean at ~1.1, ~1.2, ~1.5 (its defaults) and ~2.0 storage bpw
    "lean": [("sign", {}), ("braq", {}), ("arb-rc", {}), ("gptq", {"bits": 2}), ("lean", {"salient_frac": 0}),
             ("lean", {"salient_frac": [0.02, 0.08]}), ("lean", {}),
             ("lean", {"salient_frac": [0.05, 0.15, 0.4], "salient_bits": [4, 3, 2]})],
}


class _Stop(Exception):
    pass


def layer_hessians(model, layer_index: int, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight, H) of every linear of one decoder layer, H from the fp model's inputs."""
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[layer_index]
    linears = adapter.linears(layer)
    accs = {name: HessianAccumulator(lin.in_features) for name, lin in linears.items()}
    hooks = [lin.register_forward_pre_hook(accs[name].pre_hook) for name, lin in linears.items()]

    def stop(*_: object) -> None:
        raise _Stop

    hooks.append(layer.register_forward_hook(stop))
    with torch.no_grad():
        for row in ids:
            try:
                model(row[None])
            except _Stop:
                pass
    for h in hooks:
        h.remove()
    return {name: (lin.weight.detach().float(), accs[name].hessian) for name, lin in linears.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=sorted(SETS), default="arb")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=1024)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, _ = load_model("smollm2")
    ids, source = calibration_samples("c4", tok, args.nsamples, args.seqlen, 0)
    mats = layer_hessians(model, args.layer, ids)
    print(f"layer {args.layer}, {len(mats)} linears, calibration {args.nsamples} × {args.seqlen} from {source}\n")
    print_errors(list(mats.values()), SETS[args.set])


def print_errors(mats: list[tuple[torch.Tensor, torch.Tensor]], runs: list[tuple[str, dict]]) -> None:
    """One table row per (method, options): Σ tr(ΔW H ΔWᵀ) / Σ tr(W H Wᵀ) over the (weight, H) pairs, each
    method with its own default feedback (as ``onebit quantize --feedback auto``) and act-order."""
    print("| method | options | feedback | Σ tr(ΔW H ΔWᵀ) / Σ tr(W H Wᵀ) | paper bpw | storage bpw | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, opts in runs:
        method = build_method(name, **opts)
        feedback = getattr(method, "default_feedback", "block")
        act_order = getattr(method, "default_act_order", False) and feedback == "column"
        t0, num, den, bits = time.perf_counter(), 0.0, 0.0, Bits()
        for w, h in mats:
            res = quantize_linear(w, h, method, feedback=feedback, act_order=act_order)
            dw = res.q - w
            num += float((dw @ h * dw).sum())
            den += float((w @ h * w).sum())
            bits = bits + res.bits
        label = " ".join(f"{k}={v}" for k, v in opts.items()) or "–"
        print(f"| {name} | {label} | {feedback} | {num / den:.4f} | {bits.paper_bpw:.3f} | {bits.storage_bpw:.3f} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
