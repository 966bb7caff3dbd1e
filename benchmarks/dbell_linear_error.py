"""Does the dual-bell transform lower braq's output error on real linears of the embedded model?

For the first linear of each norm-fed group of one decoder layer (q_proj ← input norm, gate_proj ← post-
attention norm): the linear's real float inputs X from C4 windows, then the relative output error
‖X̂_s·Q(W·diag(s))ᵀ − X·Wᵀ‖² / ‖X·Wᵀ‖² with braq (Hessian from the inputs it sees), for s = 1 (plain braq),
s = T⁰ (activation-aware init only) and s = T (LTDB), at A16 and A8/A6 (X̂_s = fake_quant(X ⊘ s)).
Usage: python benchmarks/dbell_linear_error.py [--layer 5] [--nsamples 4] [--seqlen 512]
"""

from __future__ import annotations

import argparse

import torch

from onebit.data import calibration_samples
from onebit.engine.actquant import fake_quant_per_token
from onebit.engine.capture import capture_inputs, run_layer
from onebit.engine.solver import quantize_linear
from onebit.methods import build_method
from onebit.models import get_adapter
from onebit.models.loading import load_model
from onebit.transforms.dbell import LTDBOptions, group_scales, init_scales, merge_max_abs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    model, tok, _ = load_model("smollm2")
    adapter = get_adapter(model)
    ids, _ = calibration_samples("c4", tok, args.nsamples, args.seqlen, 0, None)
    hidden, calls = capture_inputs(model, adapter, ids)
    layers = adapter.decoder_layers(model)
    for i in range(args.layer):
        run_layer(layers[i], hidden, calls[i], out=hidden)
    layer = layers[args.layer]
    inputs: dict[str, torch.Tensor] = {}
    groups = [g for g in adapter.groups if g.feeder_kind == "norm"]
    hooks = [layer.get_submodule(g.linears[0]).register_forward_pre_hook(
        lambda m, a, n=g.linears[0]: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for g in groups]
    with torch.no_grad():
        run_layer(layer, hidden, calls[args.layer])
    for h in hooks:
        h.remove()
    braq = build_method("braq")
    print(f"layer {args.layer}, {hidden.shape[0]}×{hidden.shape[1]} C4 tokens; relative output error of braq")
    print("| linear | transform | A16 | A8 | A6 | act-quant err A8 | T⁻¹<1 |")
    print("|---|---|---|---|---|---|---|")
    for g in groups:
        name = g.linears[0]
        x = torch.cat(inputs[name]).float()
        weights = [layer.get_submodule(n).weight.detach().float() for n in g.linears]
        c = x.abs().amax(0)
        t0 = merge_max_abs([init_scales(w, c) for w in weights])
        t_ltdb, _ = group_scales(weights, c, "ltdb", LTDBOptions())
        w = weights[0]
        y = x @ w.T
        for label, s in (("none (braq)", torch.ones_like(c)), ("T⁰ only", t0), ("LTDB (dbell)", t_ltdb)):
            errs = []
            for bits in (None, 8, 6):
                xs = x / s
                xq = xs if bits is None else fake_quant_per_token(xs, bits)
                h = 2 * xq.T @ xq / args.nsamples
                q = quantize_linear(w * s, h, braq, 128, 0.01, "block").q
                errs.append(float((xq @ q.T - y).square().sum() / y.square().sum()))
            aq = float((fake_quant_per_token(x / s, 8) * s - x).square().sum() / x.square().sum())
            inv = float((s > 1).float().mean())
            print(f"| {name} | {label} | {errs[0]:.4f} | {errs[1]:.4f} | {errs[2]:.4f} | {aq:.2e} | {inv:.2f} |")


if __name__ == "__main__":
    main()
