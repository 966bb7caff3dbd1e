"""The layer-by-layer pipeline (framework §2): capture, per-layer Hessians, solve, replay quantized.

It knows nothing of any method: each linear goes to ``quantize_linear`` with the method and block size its
``Plan`` gives it (engine/plan.py), once per candidate plan when it has several (a bit budget), the plan's
choice recorded in the linear's report slice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..methods.base import Bits
from ..models.base import ArchAdapter
from ..progress import track
from ..timing import one_thread_each, stage
from .capture import ActivationBuffers, capture_inputs, run_layer
from .checkpoint import LayerCheckpoint, set_weights
from .distributed import all_reduce_, broadcast_object, is_main, rank_world
from .hessian import HessianAccumulator
from .plan import LinearPlan, Plan, Probe, Shapes
from .solver import LinearResult, quantize_linear
from .store import InMemoryLayers, LayerStore


@dataclass
class LinearRecord:
    """Report slice for one quantized linear (``plan``: its method, options and block size; None in reports
    written before per-linear plans, where the run's method and block size apply)."""

    layer: int
    name: str
    shape: tuple[int, int]
    bits: Bits
    loss: float
    rel_err: float
    percdamp: float
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)
    plan: LinearPlan | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LinearRecord":
        bits = Bits.from_dict(d["bits"])
        plan = LinearPlan.from_dict(d["plan"]) if d.get("plan") else None
        return cls(d["layer"], d["name"], tuple(d["shape"]), bits, d["loss"], d["rel_err"], d["percdamp"], d["seconds"],
                   d["stats"], plan)

    def to_dict(self) -> dict[str, Any]:
        out = dict(
            layer=self.layer, name=self.name, shape=list(self.shape), bits=self.bits.to_dict(), loss=self.loss,
            rel_err=self.rel_err, percdamp=self.percdamp, seconds=self.seconds, stats=self.stats,
        )
        if self.plan is not None:
            out["plan"] = self.plan.to_dict()
        return out


@dataclass
class LayerRecord:
    index: int
    linears: list[LinearRecord]
    out_rel_err: float  # ‖layer_q(x) − layer_fp(x)‖² / ‖layer_fp(x)‖² on the calibration inputs
    seconds: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerRecord":
        return cls(d["index"], [LinearRecord.from_dict(r) for r in d["linears"]], d["out_rel_err"], d["seconds"])

    def to_dict(self) -> dict[str, Any]:
        return dict(
            index=self.index, out_rel_err=self.out_rel_err, seconds=self.seconds,
            linears=[r.to_dict() for r in self.linears],
        )


LayerCallback = Callable[[int, nn.Module, LayerRecord, dict[str, LinearResult]], None]


def hash_stored_forms(digest: Any) -> LayerCallback:
    """An ``on_layer`` callback feeding every stored block tensor (layer, linear, block, key, dtype, shape,
    bytes) to ``digest`` (a hashlib object): a fingerprint of what a run stores (bit-identity checks)."""

    def on_layer(idx: int, layer: nn.Module, record: LayerRecord, results: dict[str, LinearResult]) -> None:
        for name, res in results.items():
            for b, block in enumerate(res.blocks):
                for key, t in block.items():
                    t = t.detach().contiguous().cpu()
                    digest.update(f"{idx}.{name}.{b}.{key}:{t.dtype}:{tuple(t.shape)}".encode())
                    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    return on_layer


@dataclass
class EngineOptions:
    percdamp: float = 0.01
    feedback: str = "block"  # block | column | none (engine/solver.py)
    act_order: bool = False
    true_sequential: bool = False
    device: str = "cpu"
    hessian_raw_inputs: bool = False  # H from the linears' inputs before their pre-hooks (act fake quant) run


def _collect_hessians(
    layer: nn.Module, linears: dict[str, nn.Linear], inputs: Tensor, call: Any, out: Tensor, device: str, desc: str,
    raw_inputs: bool = False, shared: list[tuple[str, ...]] = (),
) -> dict[str, HessianAccumulator]:
    """Hessians of ``linears`` over one pass of the layer. Linears listed together in ``shared`` read the same
    input (q/k/v, gate/up): they share one accumulator, hooked on the first of them."""
    accs: dict[str, HessianAccumulator] = {}
    hooks = []
    for names in [g for g in shared if g[0] in linears] + [(n,) for n in linears if not any(n in g for g in shared)]:
        acc = HessianAccumulator(linears[names[0]].in_features, device)
        accs.update({n: acc for n in names if n in linears})
        lin = linears[names[0]]
        hooks.append(lin.register_forward_pre_hook(acc.pre_hook, prepend=True) if raw_inputs else lin.register_forward_hook(acc.hook))
    try:
        with stage("calibration forward"):
            run_layer(layer, inputs, call, device, out=out, description=desc)
    finally:
        for h in hooks:
            h.remove()
    return accs


def _run_jobs(
    jobs: list[tuple[str, int]], linears: dict[str, nn.Linear], accs: dict[str, HessianAccumulator],
    cands: dict[str, list[LinearPlan]], opts: EngineOptions, idx: int,
) -> list[tuple[LinearResult, float]]:
    """Solve each (linear, candidate) job → (result, seconds). With T > 1 torch threads the jobs run T at a
    time, each on one thread: a one-thread solve stores exactly what a one-thread run stores, so the stored
    forms do not depend on T (splitting each operation over the threads changed them), at about the same speed
    (README, "Quantization speed")."""

    def solve(job: tuple[str, int]) -> tuple[LinearResult, float]:
        name, k = job
        t1 = time.perf_counter()
        p = cands[name][k]
        res = quantize_linear(linears[name].weight, accs[name].hessian, p.build(), p.block_size, opts.percdamp,
                              opts.feedback, opts.act_order, name=f"layer {idx} {name}")
        return res, time.perf_counter() - t1

    with stage("fit"):
        return list(one_thread_each(solve, jobs, cost=lambda job: linears[job[0]].weight.numel()))


PROBE_SAMPLES = 4  # calibration samples a budget's output probe replays the layer on


def output_probe(layer: nn.Module, linears: dict[str, nn.Linear], inputs: Tensor, call: Any, ref: Tensor,
                 device: str) -> Probe:
    """``probe(name, weight)``: the growth of the layer's summed squared output error (against ``ref``, the
    float layer's outputs) on the first PROBE_SAMPLES samples when linear ``name`` alone takes ``weight``
    (summed over the ranks). The layer is left as it was."""
    x, y = inputs[:PROBE_SAMPLES], ref[:PROBE_SAMPLES]
    base: list[float] = []

    def error() -> float:
        out = run_layer(layer, x, call, device)
        return float(all_reduce_(torch.tensor([float((out - y).double().square().sum())], dtype=torch.float64))[0])

    def probe(name: str, weight: Tensor) -> float:
        with stage("budget probe"):
            if not base:
                base.append(error())
            lin = linears[name]
            saved = lin.weight.data
            lin.weight.data = weight.to(saved.device, saved.dtype)
            try:
                return error() - base[0]
            finally:
                lin.weight.data = saved

    return probe


def _solve_group(
    group: list[str], linears: dict[str, nn.Linear], accs: dict[str, HessianAccumulator], plan: Plan,
    opts: EngineOptions, idx: int, probe: Probe | None = None,
) -> tuple[dict[str, LinearResult], list[LinearRecord]]:
    """Quantize a group's linears, each with every candidate its plan gives it (one unless a budget), the
    solves split over the ranks (round robin) and broadcast from their solver; the plan keeps one result per
    linear (a linear's seconds count all its candidates)."""
    cands = {name: plan.candidates(idx, name, tuple(linears[name].weight.shape)) for name in group}
    jobs = [(name, k) for name in group for k in range(len(cands[name]))]
    rank, world = rank_world()
    for acc in {id(a): a for a in accs.values()}.values():  # partial Hessians of all ranks summed
        all_reduce_(acc.xtx)
        acc.nsamples = int(all_reduce_(torch.tensor([acc.nsamples], device=acc.xtx.device)).item())
    own = [job for pos, job in enumerate(jobs) if pos % world == rank]  # this rank's solves (round robin)
    mine = dict(zip(own, _run_jobs(own, linears, accs, cands, opts, idx)))
    accs.clear()
    solved = {job: broadcast_object(mine.get(job), pos % world) for pos, job in enumerate(jobs)}
    choice = plan.choose(idx, {name: [solved[(name, k)][0] for k in range(len(cands[name]))] for name in group}, probe)
    results: dict[str, LinearResult] = {}
    recs: list[LinearRecord] = []
    for name in group:
        res = solved[(name, choice[name])][0]
        lin = linears[name]
        lin.weight.data = res.q.to(lin.weight.device, lin.weight.dtype)
        results[name] = res
        secs = sum(solved[(name, k)][1] for k in range(len(cands[name])))
        recs.append(LinearRecord(idx, name, tuple(lin.weight.shape), res.bits, res.loss, res.rel_err, res.percdamp, secs,
                                 res.stats, cands[name][choice[name]]))
    plan.observe(recs)
    return results, recs


def linear_shapes(model: nn.Module, adapter: ArchAdapter) -> Shapes:
    """Every decoder linear's (layer, name, weight shape), layer by layer (a model on the meta device too)."""
    return [(i, name, tuple(lin.weight.shape)) for i, layer in enumerate(adapter.decoder_layers(model))
            for name, lin in adapter.linears(layer).items()]


@torch.no_grad()
def quantize_model_layers(
    model: nn.Module,
    adapter: ArchAdapter,
    samples: Tensor,
    plan: Plan,
    opts: EngineOptions,
    on_layer: LayerCallback | None = None,
    store: LayerStore | None = None,
    checkpoint: LayerCheckpoint | None = None,
    resume: bool = False,
    buffers: ActivationBuffers | None = None,
) -> list[LayerRecord]:
    """Binarize every decoder linear in place (fake-quant weights), one layer at a time, each as ``plan`` says.

    Calibration activations stay on the CPU (or in ``buffers``' memory-mapped files); each layer visits
    ``opts.device`` while it is processed. ``store`` supplies the layers (default: ``model``'s own, in RAM).
    With ``checkpoint`` every finished layer is written at once; with ``resume`` the layers whose files are
    valid are not solved again, only replayed with their saved weights to rebuild the next layer's inputs.
    Under torchrun, ``samples`` are this rank's share.
    """
    store = store or InMemoryLayers(model, adapter)
    buffers = buffers or ActivationBuffers()
    if checkpoint is not None:
        checkpoint.bind(plan)
    store.materialize(adapter.pre_modules)
    with stage("calibration forward"):
        inps, calls = capture_inputs(model, adapter, samples, opts.device, alloc=buffers)
    store.dematerialize(adapter.pre_modules)
    fp_out, q_out = buffers.like("fp_out", inps), buffers.like("q_out", inps)
    records: list[LayerRecord] = []
    for idx in track(range(len(adapter.decoder_layers(model))), "quantize layers"):
        t0 = time.perf_counter()
        layer = store.load(idx).to(opts.device)
        linears = adapter.linears(layer)
        saved = checkpoint.load(idx) if resume and checkpoint is not None else None
        if saved is not None:
            set_weights(linears, saved[0])
            record = LayerRecord.from_dict(saved[1])
            results = {n: LinearResult.from_saved(saved[0][n], checkpoint.blocks(idx, n), r) for n, r in zip(linears, record.linears)}
            plan.observe(record.linears)
            with stage("layer replay"):
                run_layer(layer, inps, calls[idx], opts.device, out=q_out, description=f"layer {idx}: replay (resumed)")
        else:
            resume = False  # every later layer depends on this one: recompute them all
            steps = [list(g.linears) for g in adapter.groups] if opts.true_sequential else [list(linears)]
            results, recs = {}, []
            for s, group in enumerate(steps):
                # the first pass runs the still-full-precision layer: its outputs are the reference outputs
                accs = _collect_hessians(
                    layer, {n: linears[n] for n in group}, inps, calls[idx], fp_out if s == 0 else q_out, opts.device,
                    f"layer {idx}: hessians", opts.hessian_raw_inputs, [g.linears for g in adapter.groups],
                )
                probe = output_probe(layer, linears, inps, calls[idx], fp_out, opts.device) if plan.wants_probe else None
                res_g, recs_g = _solve_group(group, linears, accs, plan, opts, idx, probe)
                results.update(res_g)
                recs += recs_g
            with stage("layer replay"):
                run_layer(layer, inps, calls[idx], opts.device, out=q_out, description=f"layer {idx}: replay")
                num = all_reduce_(torch.tensor([float((q_out - fp_out).double().square().sum()), float(fp_out.double().square().sum())]))
            record = LayerRecord(idx, recs, float(num[0] / num[1].clamp_min(1e-30)), time.perf_counter() - t0)
            if checkpoint is not None and is_main():
                checkpoint.save(idx, {n: l.weight for n, l in linears.items()}, {n: r.blocks for n, r in results.items()}, record.to_dict())
        records.append(record)
        if on_layer is not None:
            on_layer(idx, layer, record, results)
        store.release(idx, layer.to("cpu"))
        inps, q_out = q_out, inps
    return records


def total_bits(records: list[LayerRecord]) -> Bits:
    total = Bits()
    for layer in records:
        for r in layer.linears:
            total = total + r.bits
    return total


def plan_summary(records: list[LayerRecord]) -> dict[str, dict[str, Any]]:
    """Per method and block size (``method/block``): linears, weights and storage bpw, fallbacks counted with
    their own bits."""
    out: dict[str, dict[str, Any]] = {}
    for r in (r for layer in records for r in layer.linears if r.plan is not None):
        g = out.setdefault(f"{r.plan.method}/{r.plan.block_size}", dict(linears=0, weights=0, storage_bits=0))
        g["linears"] += 1
        g["weights"] += r.bits.weights
        g["storage_bits"] += r.bits.storage
    for g in out.values():
        g["storage_bpw"] = g["storage_bits"] / max(g["weights"], 1)
    return out
