"""Scale: streamed layers, bounded memory, kill-and-resume, torchrun calibration."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import random_ids, save_tiny_model_dir, write_tiny_data
from onebit import QuantConfig, quantize
from onebit.engine.checkpoint import LayerCheckpoint
from onebit.engine.store import StreamedModel, save_streamed
from onebit.eval import perplexity

BIN = Path(sys.executable).parent


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run / "layers").glob("layer_*.safetensors")):
        out.update({f"{f.stem}.{k}": v for k, v in load_file(f).items()})
    return out


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamed_run_equals_in_memory_run(tmp_path, family):
    path = save_tiny_model_dir(tmp_path / "m", family, layers=3)
    ids, ev = random_ids(4, 32), random_ids(1, 96, seed=5)
    mem = AutoModelForCausalLM.from_pretrained(path)
    assert perplexity(StreamedModel(path), ev, 32) == perplexity(mem, ev, 32)  # fp, streamed vs loaded
    ck_mem, ck_st = LayerCheckpoint(tmp_path / "a", {}), LayerCheckpoint(tmp_path / "b", {})
    r_mem = quantize(mem, QuantConfig(), ids, checkpoint=ck_mem)
    r_st = quantize(StreamedModel(path), QuantConfig(), ids, checkpoint=ck_st)
    assert r_mem.storage_bpw == r_st.storage_bpw and r_mem.paper_bpw == r_st.paper_bpw
    for i in range(3):
        a, b = ck_mem.load(i)[0], ck_st.load(i)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    streamed_q = StreamedModel(path, overrides=ck_st.weights)
    assert perplexity(streamed_q, ev, 32) == perplexity(mem, ev, 32)
    save_streamed(streamed_q, tmp_path / "saved")  # one layer at a time → a normal HF checkpoint
    assert perplexity(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), ev, 32) == perplexity(mem, ev, 32)


def test_streaming_holds_one_layer_at_a_time(tmp_path):
    path = save_tiny_model_dir(tmp_path / "m", "llama", layers=6)
    model = StreamedModel(path)
    layers = model.adapter.decoder_layers(model.model)
    seen = []

    def count(idx, layer, record, results):
        seen.append(sum(any(p.device.type != "meta" for p in l.parameters()) for l in layers))

    quantize(model, QuantConfig(method="sign"), random_ids(2, 16), on_layer=count,
             checkpoint=LayerCheckpoint(tmp_path / "ck", {}))
    assert seen == [1] * 6
    assert all(p.device.type == "meta" for l in layers for p in l.parameters())


def _cli(*args: str) -> list[str]:
    return [str(BIN / "onebit"), "quantize", *args]


def _run_args(model: Path, data: Path, out: Path, method: str = "braq") -> list[str]:
    return [str(model), "--method", method, "--calib", "wikitext2", "--eval", "wikitext2", "--nsamples", "4",
            "--seqlen", "64", "--eval-windows", "2", "--data-dir", str(data), "--out", str(out), "--device", "cpu",
            "--no-fp-eval"]


def _report(run: Path) -> dict:
    r = json.loads((run / "report.json").read_text())
    return dict(ppl=r["ppl"], paper=r["paper_bpw"], storage=r["storage_bpw"],
                layers=[(l["out_rel_err"], [x["rel_err"] for x in l["linears"]]) for l in r["layers"]])


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    model = save_tiny_model_dir(tmp_path / "m", "llama", layers=8)
    data = write_tiny_data(tmp_path / "d")
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cli(*_run_args(model, data, ref), "--stream"), check=True, capture_output=True)
    proc = subprocess.Popen(_cli(*_run_args(model, data, run), "--stream"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (run / "layers" / "layer_00001.safetensors").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list((run / "layers").glob("layer_*.safetensors")))
    assert 2 <= written < 8 and not (run / "report.json").exists()
    # a truncated later file must be detected and recomputed, never reused
    victim = run / "layers" / f"layer_{written - 1:05d}.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    res = subprocess.run(_cli(*_run_args(model, data, run), "--stream", "--resume"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "unreadable" in res.stderr
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _report(ref) == _report(run)


def test_layer_file_from_another_config_is_not_reused(tmp_path, caplog):
    path = save_tiny_model_dir(tmp_path / "m", "llama", layers=2)
    ids = random_ids(3, 16)
    ck = LayerCheckpoint(tmp_path / "ck", {"method": "sign"})
    quantize(AutoModelForCausalLM.from_pretrained(path), QuantConfig(method="sign"), ids, checkpoint=ck)
    other = LayerCheckpoint(tmp_path / "ck", {"method": "braq"})
    assert other.load(0) is None and "different run configuration" in caplog.text
    m = AutoModelForCausalLM.from_pretrained(path)
    quantize(m, QuantConfig(method="braq"), ids, checkpoint=other, resume=True)
    assert max(len(torch.unique(r)) for r in m.model.layers[0].mlp.down_proj.weight[:, :128]) > 2  # braq, not sign


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    model = save_tiny_model_dir(tmp_path / "m", "llama", layers=2)
    data = write_tiny_data(tmp_path / "d")
    one, two = tmp_path / "one", tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # same matmul kernels in both runs
    subprocess.run(_cli(*_run_args(model, data, one)), check=True, capture_output=True, env=env)
    res = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", "29533", str(BIN / "onebit"),
                          "quantize", *_run_args(model, data, two)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    # partial Hessians are summed in float64, so H — and with it every mask, sign and scale — is the same
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = _report(one), _report(two)
    assert ra["paper"] == rb["paper"] and ra["storage"] == rb["storage"]
    assert ra["ppl"]["wikitext2"] == pytest.approx(rb["ppl"]["wikitext2"], rel=1e-4)


def test_layer_files_hold_blocks_not_weights(tmp_path, caplog):
    """Weights are rebuilt from the stored blocks (bit-exact), not stored again in fp32, with the method and block
    size each linear's record names (a record without them, written before per-linear plans, needs the run's
    plan: a reader without it refuses the file); weights the blocks do not reproduce are stored as they are."""
    from safetensors import safe_open

    path = save_tiny_model_dir(tmp_path / "m", "llama", layers=2)
    m = AutoModelForCausalLM.from_pretrained(path)
    ck = LayerCheckpoint(tmp_path / "ck", {"method": "braq"})
    quantize(m, QuantConfig(method="braq"), random_ids(3, 16), checkpoint=ck)
    with safe_open(ck.path(0), framework="pt") as f:
        assert not [k for k in f.keys() if ".blocks." not in k]
    weights, record = ck.load(0)
    modules = dict(m.model.layers[0].named_modules())
    assert weights and all(torch.equal(w, modules[n].weight) for n, w in weights.items())
    # the file ≈ the layer's storage bits (packed bit planes, fp16 scales) plus the safetensors header
    storage = sum(r["bits"]["sign"] + r["bits"]["bitmap"] + r["bits"]["params"] for r in record["linears"])
    assert ck.path(0).stat().st_size * 8 < 1.3 * storage
    unbound = LayerCheckpoint(tmp_path / "ck", {"method": "braq"})
    assert all(torch.equal(unbound.load(0)[0][n], w) for n, w in weights.items())
    blocks = {n: ck.blocks(0, n) for n in weights}
    ck.save(0, weights, blocks, {**record, "linears": [{k: v for k, v in r.items() if k != "plan"} for r in record["linears"]]})
    assert unbound.load(0) is None and "no plan is bound" in caplog.text
    assert all(torch.equal(ck.load(0)[0][n], w) for n, w in weights.items())
    odd = {n: w + 1 for n, w in weights.items()}
    ck.save(0, odd, blocks, record)
    got, _ = ck.load(0)
    assert all(torch.equal(got[n], odd[n]) for n in odd)
