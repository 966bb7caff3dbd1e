"""Packed 1-bit GEMV/GEMM vs dense fp32 ``torch.matmul`` on the CPU, and end-to-end decoding.

    python benchmarks/packed_matmul.py kernels                 # 4096×4096 and 4096×11008, batch 1 and 16
                                                               # (+ Triton vs fp16 when CUDA is present)
    python benchmarks/packed_matmul.py kernels --batches 256,2048   # prefill-sized token counts
    ONEBIT_KERNEL_MARCH=x86-64-v3 python benchmarks/packed_matmul.py kernels   # what AVX2 CPUs get (-march)
    python benchmarks/packed_matmul.py e2e PACKED_DIR FP_DIR   # tokens/s and resident memory, packed vs fp

Kernel timings use synthetic packed weights (random bits, 8 % salient columns; arb-x and arb-rc as
quantized by default: num_p = 1 with CGB): the kernel's work
depends on the layout and the salient fraction, not on the values. Dense and packed runs alternate, so
machine load hits both alike; each figure is the median of ``--reps`` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def synth_blocks(method: str, n: int, m: int, block: int = 128, salient: float = 0.08, seed: int = 0):
    """Per-block stored forms with the method's layout and random content."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, m, block):
        w = min(block, m - s)
        bits = lambda *shape: torch.rand(*shape, generator=g) < 0.5  # noqa: E731
        floats = lambda *shape: (torch.rand(*shape, generator=g) * 0.02).half()  # noqa: E731
        if method == "sign":
            out.append({"signs": bits(n, w), "mu": floats(n, 1), "alpha": floats(n, 1)})
            continue
        k = max(1, round(salient * w))
        cols = torch.zeros(w, dtype=torch.bool)
        cols[torch.randperm(w, generator=g)[:k]] = True
        planes = {"salient_cols": cols, "signs": bits(n, w), "signs2": bits(n, k), "sparse": bits(n, w - k)}
        if method == "arb-rc":
            out.append({**planes, "sal_sparse": bits(n, k), "alpha_r": floats(n, 6), "alpha_c": floats(2, w - k),
                        "alpha_c_sal": floats(4, k)})
        elif method == "arb-x":  # with CGB (its default): a salient zone bit, 4 means and 6 scales per row
            out.append({**planes, "sal_sparse": bits(n, k), "mu": floats(n, 4), "alpha": floats(n, 6)})
        else:
            out.append({**planes, "mu": floats(n, 3), "alpha": floats(n, 4)})
    return out


def paired_median(f, g, reps: int) -> tuple[float, float]:
    for _ in range(3):
        f(), g()
    tf, tg = [], []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        tf.append(time.perf_counter() - t)
        t = time.perf_counter()
        g()
        tg.append(time.perf_counter() - t)
    return statistics.median(tf), statistics.median(tg)


def kernels(reps: int, batches: list[int]) -> list[dict]:
    from onebit.formats.packed import PackedLinear
    from onebit.nn import OnebitLinear
    from onebit.nn.kernels import extension

    ext = extension()
    kind = None if ext is None else "AVX-512" if ext.has_avx512() else "vector extensions (no AVX-512)"
    kind = f"{kind}, -march={os.environ.get('ONEBIT_KERNEL_MARCH', 'native')}"
    print(f"threads {torch.get_num_threads()}, extension {kind}, "
          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    rows = []
    for n, m in ((4096, 4096), (4096, 11008)):
        w = torch.randn(n, m)
        for method in ("sign", "braq", "arb-x", "arb-rc"):
            blocks = synth_blocks(method, n, m)
            packed = PackedLinear.from_blocks(method, blocks, (n, m), 128)
            # the papers' figure: sign planes only (signs, and signs2 on the salient columns)
            paper = sum(b[k].numel() for b in blocks for k in ("signs", "signs2") if k in b) / (n * m)
            mod = OnebitLinear.from_packed(packed)
            for batch in batches:
                x = torch.randn(batch, m)
                torch.testing.assert_close(mod(x), mod.reference_forward(x), atol=1e-3, rtol=1e-3)
                td, tp = paired_median(lambda: torch.matmul(x, w.T), lambda: mod(x), reps)
                rows.append(dict(shape=f"{n}×{m}", method=method, batch=batch, dense_ms=td * 1e3, packed_ms=tp * 1e3,
                                 speedup=td / tp, dense_MiB=w.numel() * 4 / 2**20,
                                 packed_MiB=(packed.payload_bytes() + packed.index.numel() * 4) / 2**20,
                                 paper_bpw=paper, storage_bpw=packed.payload_bytes() * 8 / (n * m)))
                print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def gpu_kernels(reps: int, batches: list[int]) -> list[dict]:
    """Triton packed GEMV vs dense fp16 ``torch.matmul`` on CUDA (run when a GPU is present)."""
    from onebit.formats.packed import PackedLinear
    from onebit.nn import OnebitLinear

    def timed(f):
        def run():
            f()
            torch.cuda.synchronize()
        return run

    rows = []
    for n, m in ((4096, 4096), (4096, 11008)):
        w = torch.randn(n, m, device="cuda", dtype=torch.float16)
        for method in ("sign", "braq"):
            mod = OnebitLinear.from_packed(PackedLinear.from_blocks(method, synth_blocks(method, n, m), (n, m), 128)).cuda()
            for batch in batches:
                x = torch.randn(batch, m, device="cuda")
                torch.testing.assert_close(mod(x), mod.reference_forward(x), atol=1e-3, rtol=1e-3)
                xh = x.half()
                td, tp = paired_median(timed(lambda: torch.matmul(xh, w.T)), timed(lambda: mod(x)), reps)
                rows.append(dict(device=torch.cuda.get_device_name(), shape=f"{n}×{m}", method=method, batch=batch,
                                 fp16_ms=td * 1e3, packed_ms=tp * 1e3, speedup=td / tp))
                print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def e2e_one(model_dir: str, new_tokens: int, reps: int) -> dict:
    """(run in a fresh process) load, then time greedy decoding of ``new_tokens`` after an 8-token prompt."""
    import onebit  # noqa: F401  (registers the packed loader)
    from transformers import AutoModelForCausalLM

    from onebit.nn import OnebitLinear

    base = rss_mib()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = rss_mib()
    lin_bytes = weights = kernel = packed = 0
    for mod in model.modules():
        if isinstance(mod, OnebitLinear):
            packed += 1
            kernel += mod.kernel_ok(1, torch.zeros(1, mod.in_features))
            lin_bytes += sum(b.numel() * b.element_size() for b in (mod.packed_bits, mod.packed_fp16, mod.packed_index))
            weights += mod.in_features * mod.out_features
        elif isinstance(mod, torch.nn.Linear) and mod.weight is not model.get_input_embeddings().weight:
            if ".layers." in next(n for n, m in model.named_modules() if m is mod):
                lin_bytes += mod.weight.numel() * mod.weight.element_size()
                weights += mod.weight.numel()
    ids = torch.arange(1, 9)[None]
    times = []
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - t)
    assert out.shape[1] == 8 + new_tokens
    # after decoding: memory-mapped fp weights are resident only once touched, so RSS right after loading
    # undercounts them
    decoded = rss_mib()
    return dict(model=model_dir, tokens_per_s=new_tokens / statistics.median(times), rss_loaded_MiB=loaded,
                rss_after_decode_MiB=decoded, rss_model_MiB=decoded - base, decoder_linear_MiB=lin_bytes / 2**20,
                decoder_linear_weights=weights,
                decoder_linear_bpw=lin_bytes * 8 / max(weights, 1), packed_linears_on_kernel=f"{kernel}/{packed}")


def e2e(dirs: list[str], new_tokens: int, reps: int) -> list[dict]:
    rows = []
    for d in dirs:  # one fresh process per model, so resident memory is its own
        cmd = [sys.executable, __file__, "_e2e_one", d, "--new-tokens", str(new_tokens), "--reps", str(reps),
               "--threads", str(torch.get_num_threads())]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["kernels", "e2e", "_e2e_one"])
    p.add_argument("dirs", nargs="*", help="e2e: model directories (packed and fp)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--batches", default="1,16", help="kernels: token counts, comma-separated")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads for dense and packed alike")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.what == "kernels":
        batches = [int(b) for b in a.batches.split(",")]
        print(markdown(kernels(a.reps, batches)))
        if torch.cuda.is_available():
            print(markdown(gpu_kernels(a.reps, batches)))
    elif a.what == "e2e":
        print(markdown(e2e(a.dirs, a.new_tokens, a.reps)))
    else:
        print(json.dumps(e2e_one(a.dirs[0], a.new_tokens, a.reps)))


if __name__ == "__main__":
    main()
