"""Peak resident memory (RSS) and wall time of quantization: streamed (one layer at a time) vs fully
loaded, on the embedded SmolLM2-135M, and on random 7B-shaped LLaMA models with few layers written to disk
(to show the streamed peak does not grow with depth). Each measurement runs in its own process.

    .venv/bin/python benchmarks/memory.py [--method sign] [--skip-7b]

Memory is what is measured: ``sign`` has the same per-layer footprint (weights, Hessians, activations)
as braq and finishes quickly; pass ``--method braq`` for braq's wall times.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
from onebit import QuantConfig, quantize
from onebit.engine.checkpoint import LayerCheckpoint
from onebit.engine.store import StreamedModel
from transformers import AutoModelForCausalLM
path, stream, method, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
t0 = time.perf_counter()
model = StreamedModel(path) if stream else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
ids = torch.randint(0, 1000, (4, 512), generator=torch.Generator().manual_seed(0))
trace = []
def on_layer(*_):  # resident now and peak so far, after each layer
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    trace.append((round(now), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
quantize(model, QuantConfig(method=method), ids, checkpoint=LayerCheckpoint(out, {}), on_layer=on_layer)
print(json.dumps(dict(wall=time.perf_counter() - t0, rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      trace=trace)))
"""


def measure(path: str, stream: bool, method: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        res = subprocess.run([sys.executable, "-c", CHILD, path, "1" if stream else "0", method, out],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_7b_shaped(path: Path, layers: int) -> float:
    """A random LLaMA-7B-shaped model with ``layers`` decoder layers, fp16 safetensors, one layer in RAM at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=2048, dtype="float16")
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).half()

    index = {}
    base = {"model.embed_tokens.weight": rand(32000, 4096), "lm_head.weight": rand(32000, 4096),
            "model.norm.weight": torch.ones(4096, dtype=torch.float16)}
    save_file(base, path / "base.safetensors")
    index.update({k: "base.safetensors" for k in base})
    shapes = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
              "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
              "mlp.down_proj": (4096, 11008)}
    for i in range(layers):
        t = {f"model.layers.{i}.{n}.weight": rand(*s) for n, s in shapes.items()}
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(4096, dtype=torch.float16)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(4096, dtype=torch.float16)
        save_file(t, path / f"layer{i}.safetensors")
        index.update({k: f"layer{i}.safetensors" for k in t})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


SHAPES = {  # hidden, intermediate, layers, vocab, kv heads / heads
    "LLaMA-2-7B": (4096, 11008, 32, 32000, 1.0),
    "LLaMA-2-70B": (8192, 28672, 80, 32000, 0.125),
    "LLaMA-3.1-405B": (16384, 53248, 126, 128256, 0.0625),
}


def braq_rate() -> tuple[float, float]:
    """Measured: braq on one random 4096×4096 linear (searches, fits, compensation): seconds per weight, and
    its storage bpw (what a layer checkpoint holds per weight)."""
    import torch

    from onebit.engine.solver import quantize_linear
    from onebit.methods import build_method

    torch.manual_seed(0)
    w = torch.randn(4096, 4096) * 0.02
    x = torch.randn(4096, 8192)
    h = 2 * x @ x.T / 8192
    t0 = time.perf_counter()
    res = quantize_linear(w, h, build_method("braq"))
    return (time.perf_counter() - t0) / w.numel(), res.bits.storage_bpw


def plan(sec_per_weight: float, bpw: float, nsamples: int = 128, seqlen: int = 2048) -> None:
    """Peak RAM and time per layer of a streamed run, from the shapes and the measured solve rate."""
    print(f"\nmemory plan, streamed, {nsamples} × {seqlen} calibration tokens, fp32 layer and activations")
    print("| model | layer weights fp32 (GiB) | Hessians + solve working set (GiB) | activations 3 × N×L×h fp32 (GiB) | "
          "peak RAM ≈ (GiB) | braq layer checkpoints on disk (GiB) | braq solve per layer, this CPU (min) |\n|---|---|---|---|---|---|---|")
    for name, (h, ff, layers, vocab, kv) in SHAPES.items():
        linears = [(h, h), (int(h * kv), h), (int(h * kv), h), (h, h), (ff, h), (ff, h), (h, ff)]
        weights = sum(n * m for n, m in linears)
        layer = weights * 4 / 2**30
        # Hessian sums alive after the pass (q/k/v and gate/up share one), float64: 3h² + ff²; solving
        # down_proj adds ~5 ff² fp32 (damped copy, original for the error figure, Cholesky factor, inverse, U)
        hess = ((3 * h**2 + ff**2) * 8 + 5 * ff**2 * 4) / 2**30
        acts = 3 * nsamples * seqlen * h * 4 / 2**30  # the CLI computes in fp32
        emb = vocab * h * 4 / 2**30  # embeddings, materialized during capture only
        peak = layer + hess + acts + emb
        disk = weights * layers * bpw / 8 / 2**30  # RUN/layers: the block parameters, bit planes packed
        print(f"| {name} | {layer:.2f} | {hess:.2f} | {acts:.2f} | {peak:.1f} | {disk:.1f} | "
              f"{sec_per_weight * weights / 60:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="sign")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--layers", default="1,3", help="7B-shaped depths to measure, comma-separated")
    ap.add_argument("--plan-only", action="store_true", help="only measure braq's solve rate and print the plan")
    a = ap.parse_args()
    if a.plan_only:
        rate, bpw = braq_rate()
        print(f"braq on this CPU (4096×4096 linear): {rate * 1e6:.2f} s per million weights, storage {bpw:.3f} bpw")
        plan(rate, bpw)
        return
    from onebit.models.loading import default_model_dir

    smol = str(default_model_dir())
    rows = []
    full = measure(smol, False, a.method)
    streamed = measure(smol, True, a.method)
    rows.append(("SmolLM2-135M (30 layers, fp32)", "fully loaded", full))
    rows.append(("SmolLM2-135M (30 layers, fp32)", "streamed", streamed))
    if not a.skip_7b:
        with tempfile.TemporaryDirectory() as tmp:
            for layers in map(int, a.layers.split(",")):
                p = Path(tmp) / f"l{layers}"
                size = write_7b_shaped(p, layers)
                rows.append((f"7B-shaped, {layers} layers ({size:.0f} MiB fp16 on disk)", "streamed", measure(str(p), True, a.method)))
    print(f"method {a.method}, calibration 4 × 512 tokens, CPU\n")
    print("| model | mode | peak RSS (MiB) | wall (s) | after each layer: RSS / peak so far (MiB) |\n|---|---|---|---|---|")
    for model, mode, r in rows:
        trace = " ".join(f"{now}/{peak}" for now, peak in r["trace"][:8]) + (" …" if len(r["trace"]) > 8 else "")
        print(f"| {model} | {mode} | {r['rss_mb']:.0f} | {r['wall']:.1f} | {trace} |")
    print(f"\nstreamed / fully loaded peak RSS on SmolLM2: {streamed['rss_mb'] / full['rss_mb']:.2f}")


if __name__ == "__main__":
    main()
