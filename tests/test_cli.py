"""The command line end to end on a tiny model directory (bad input: test_cli_errors.py)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from onebit import QuantConfig, quantize
from onebit.cli import app
from onebit.models import get_adapter

runner = CliRunner()


def test_quantize_writes_report_and_fake_quant_model(cli_setup):
    model_dir, data, root = cli_setup
    out = root / "run"
    args = ["quantize", str(model_dir), "--method", "braq", "--calib", "wikitext2", "--eval", "wikitext2,ptb",
            "--nsamples", "4", "--seqlen", "64", "--eval-windows", "3", "--data-dir", str(data), "--out", str(out),
            "--save", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    for key in ("method", "config", "ppl", "ppl_fp", "paper_bpw", "storage_bpw", "seconds", "layers", "versions"):
        assert key in rep
    assert set(rep["ppl"]) == {"wikitext2", "ptb"} and rep["calibration"]["source"] == "wikitext2:valid"
    assert rep["config"]["method_options"] == {"salient_metric": "hessian", "up_lim": 50, "proxy_order": 2}
    assert 1 < rep["paper_bpw"] < 1.5 < rep["storage_bpw"]
    assert len(rep["layers"]) == 2 and all("out_rel_err" in l for l in rep["layers"])
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    w = saved.model.layers[0].mlp.down_proj.weight
    assert max(len(torch.unique(r)) for r in w[:, :128]) <= 8  # binarized rows survive the save
    table = runner.invoke(app, ["table", str(out), "--markdown"])
    assert table.exit_code == 0 and "| braq |" in table.output


def test_method_flags_are_checked(cli_setup):
    model_dir, data, _ = cli_setup
    res = runner.invoke(app, ["quantize", str(model_dir), "--method", "braq", "--iters", "3", "--data-dir", str(data)])
    assert res.exit_code != 0 and "does not apply" in res.output
    res = runner.invoke(app, ["quantize", str(model_dir), "--method", "nope", "--data-dir", str(data)])
    assert res.exit_code != 0 and "unknown method" in res.output


def test_unsupported_architecture_names_the_supported_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*llama.*qwen2.*opt"):
        quantize(model, QuantConfig(), torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="unsupported"):
        get_adapter(model)


def test_config_round_trip():
    cfg = QuantConfig(method="braq", method_options={"salient_metric": "magnitude"}, blocksize=64)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert QuantConfig.from_dict(d) == QuantConfig(method="braq", method_options={"salient_metric": "magnitude", "up_lim": 50, "proxy_order": 2}, blocksize=64)
    with pytest.raises(ValueError, match="does not take"):
        QuantConfig(method="sign", method_options={"iters": 3})


def test_save_packed_in_memory_streamed_and_after_the_fact_agree(cli_setup):
    """--save-packed from the in-memory run, from a --stream run (built from the layer checkpoints) and
    `onebit pack RUN` afterwards: the same packed tensors, and each loads back to the fake-quant logits."""
    import onebit  # noqa: F401 - registers the quantizer
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir, data, root = cli_setup
    base = ["quantize", str(model_dir), "--method", "braq", "--calib", "wikitext2", "--nsamples", "4", "--seqlen", "64",
            "--eval", "", "--no-fp-eval", "--data-dir", str(data), "--device", "cpu"]
    runs = {}
    for name, extra in (("mem", ["--save"]), ("stream", ["--stream"])):
        res = runner.invoke(app, [*base, "--out", str(root / f"p-{name}"), "--save-packed", str(root / f"packed-{name}"), *extra])
        assert res.exit_code == 0, res.output
        assert "measured from bytes" in res.output
        runs[name] = root / f"packed-{name}"
    res = runner.invoke(app, ["pack", str(root / "p-stream"), "--out", str(root / "packed-after")])
    assert res.exit_code == 0, res.output
    runs["after"] = root / "packed-after"

    ref = load_file(runs["mem"] / "model.safetensors")
    packed_keys = {k for k in ref if ".packed_" in k}
    assert len(packed_keys) == 2 * 7 * 3
    ids = torch.randint(0, 60, (2, 20), generator=torch.Generator().manual_seed(1))
    fake = AutoModelForCausalLM.from_pretrained(root / "p-mem" / "model")
    with torch.no_grad():
        want = fake(ids).logits
    for name, d in runs.items():
        got = load_file(d / "model.safetensors")
        assert set(got) == set(ref), name
        for k in ref:
            assert torch.equal(got[k], ref[k]), (name, k)
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(d)(ids).logits
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_pack_refuses_activation_quantized_runs(cli_setup, tmp_path):
    model_dir, data, _ = cli_setup
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", str(model_dir), "--method", "sign", "--calib", "wikitext2", "--nsamples", "2",
                              "--seqlen", "32", "--eval", "", "--no-fp-eval", "--act-bits", "8", "--data-dir", str(data),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["pack", str(out), "--out", str(tmp_path / "p")])
    assert res.exit_code != 0 and "act-bits" in res.output
