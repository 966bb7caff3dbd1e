"""The layer-by-layer pipeline (framework §2): capture, per-layer Hessians, solve, replay quantized.

It knows nothing of any method: each linear goes to ``quantize_linear`` with the ``Binarizer`` it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..methods.base import Binarizer, Bits
from ..models.base import ArchAdapter
from ..progress import track
from .capture import capture_inputs, run_layer
from .hessian import HessianAccumulator
from .solver import LinearResult, quantize_linear


@dataclass
class LinearRecord:
    """Report slice for one quantized linear."""

    layer: int
    name: str
    shape: tuple[int, int]
    bits: Bits
    loss: float
    rel_err: float
    percdamp: float
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(
            layer=self.layer, name=self.name, shape=list(self.shape), bits=self.bits.to_dict(), loss=self.loss,
            rel_err=self.rel_err, percdamp=self.percdamp, seconds=self.seconds, stats=self.stats,
        )


@dataclass
class LayerRecord:
    index: int
    linears: list[LinearRecord]
    out_rel_err: float  # ‖layer_q(x) − layer_fp(x)‖² / ‖layer_fp(x)‖² on the calibration inputs
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(
            index=self.index, out_rel_err=self.out_rel_err, seconds=self.seconds,
            linears=[r.to_dict() for r in self.linears],
        )


LayerCallback = Callable[[int, nn.Module, LayerRecord, dict[str, LinearResult]], None]


@dataclass
class EngineOptions:
    blocksize: int = 128
    percdamp: float = 0.01
    compensate: bool = True
    true_sequential: bool = False
    device: str = "cpu"


def _collect_hessians(
    layer: nn.Module, linears: dict[str, nn.Linear], inputs: Tensor, call: Any, out: Tensor, device: str, desc: str
) -> dict[str, HessianAccumulator]:
    accs = {name: HessianAccumulator(lin.in_features, device) for name, lin in linears.items()}
    hooks = [lin.register_forward_hook(accs[name].hook) for name, lin in linears.items()]
    try:
        run_layer(layer, inputs, call, device, out=out, description=desc)
    finally:
        for h in hooks:
            h.remove()
    return accs


@torch.no_grad()
def quantize_model_layers(
    model: nn.Module,
    adapter: ArchAdapter,
    samples: Tensor,
    method: Binarizer,
    opts: EngineOptions,
    on_layer: LayerCallback | None = None,
) -> list[LayerRecord]:
    """Binarize every decoder linear of ``model`` in place (fake-quant weights), one layer at a time.

    Calibration activations stay on the CPU; each layer visits ``opts.device`` while it is processed.
    """
    inps, calls = capture_inputs(model, adapter, samples, opts.device)
    fp_out, q_out = torch.empty_like(inps), torch.empty_like(inps)
    layers = adapter.decoder_layers(model)
    records: list[LayerRecord] = []
    for idx in track(range(len(layers)), "quantize layers"):
        t0 = time.perf_counter()
        layer = layers[idx].to(opts.device)
        linears = adapter.linears(layer)
        names = list(linears)
        steps = [list(g.linears) for g in adapter.groups] if opts.true_sequential else [names]
        results: dict[str, LinearResult] = {}
        recs: list[LinearRecord] = []
        for s, group in enumerate(steps):
            # the first pass runs the still-full-precision layer: its outputs are the reference outputs
            accs = _collect_hessians(
                layer, {n: linears[n] for n in group}, inps, calls[idx], fp_out if s == 0 else q_out, opts.device,
                f"layer {idx}: hessians",
            )
            for name in group:
                t1 = time.perf_counter()
                lin = linears[name]
                res = quantize_linear(lin.weight, accs.pop(name).hessian, method, opts.blocksize, opts.percdamp, opts.compensate)
                lin.weight.data = res.q.to(lin.weight.dtype)
                results[name] = res
                recs.append(LinearRecord(
                    idx, name, tuple(lin.weight.shape), res.bits, res.loss, res.rel_err, res.percdamp,
                    time.perf_counter() - t1, res.stats,
                ))
        run_layer(layer, inps, calls[idx], opts.device, out=q_out, description=f"layer {idx}: replay")
        err = float((q_out - fp_out).float().square().sum() / fp_out.float().square().sum().clamp_min(1e-30))
        layers[idx] = layer.to("cpu")
        record = LayerRecord(idx, recs, err, time.perf_counter() - t0)
        records.append(record)
        if on_layer is not None:
            on_layer(idx, layer, record, results)
        inps, q_out = q_out, inps
    return records


def total_bits(records: list[LayerRecord]) -> Bits:
    total = Bits()
    for layer in records:
        for r in layer.linears:
            total = total + r.bits
    return total
