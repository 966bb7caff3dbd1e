"""Every bad input to the command line ends in one clear paragraph: non-zero exit (1, or 2 for usage errors),
no traceback unless --debug, and a message that names the offending file, option or tensor."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import save_tiny_model_dir, write_tiny_data
from onebit.cli import app

runner = CliRunner()
SMALL = ["--nsamples", "2", "--seqlen", "32", "--eval", "", "--no-fp-eval", "--device", "cpu"]


@dataclass(frozen=True)
class Env:
    root: Path
    model: Path
    data: Path

    def quantize(self, *extra: str) -> list[str]:
        return ["quantize", str(self.model), "--method", "sign", "--calib", "wikitext2", "--data-dir", str(self.data),
                *SMALL, *extra]


def _with_weight(src: Path, dst: Path, name: str, value: float) -> Path:
    """A copy of model directory ``src`` with one element of tensor ``name`` set to ``value``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state[name].view(-1)[7] = value
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("errors")
    model = save_tiny_model_dir(root / "model")
    data = write_tiny_data(root / "data")
    _with_weight(model, root / "nan-model", "model.layers.1.mlp.down_proj.weight", float("nan"))
    _with_weight(model, root / "nan-embedding", "model.embed_tokens.weight", float("nan"))
    weights = _with_weight(model, root / "truncated", "model.norm.weight", 1.0) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    (root / "latin1").mkdir()
    (root / "latin1" / "wikitext-2-raw").mkdir()
    (root / "latin1" / "wikitext-2-raw" / "wiki.valid.raw").write_bytes("café crème\n".encode("latin-1") * 50)
    (root / "short" / "wikitext-2-raw").mkdir(parents=True)
    (root / "short" / "wikitext-2-raw" / "wiki.valid.raw").write_text(" a short text \n")
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50).save_pretrained(root / "gpt2")
    (root / "bad-config").mkdir()
    (root / "bad-config" / "config.json").write_text('{"model_type": "llama",')
    (root / "no-weights").mkdir()
    (root / "no-weights" / "config.json").write_text((model / "config.json").read_text())
    (root / "a-file").write_text("not a directory")
    (root / "bad-report").mkdir()
    (root / "bad-report" / "report.json").write_text("{")
    return Env(root, model, data)


def _low_disk(monkeypatch) -> None:
    import shutil

    from onebit import checks

    monkeypatch.setattr(checks.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))


def _no_weight_check(monkeypatch) -> None:
    from onebit import checks

    monkeypatch.setattr(checks, "finite_weights", lambda tensors, where: None)


# (id, arguments, exit status, what the message must name, optional monkeypatch)
CASES: list[tuple[str, Callable[[Env], list[str]], int, str, Callable | None]] = [
    ("unsupported architecture", lambda e: ["quantize", str(e.root / "gpt2")], 1,
     "unsupported architecture 'gpt2'", None),
    ("missing data directory", lambda e: [*e.quantize(), "--data-dir", str(e.root / "nowhere")], 1,
     "data directory", None),
    ("model path without config.json", lambda e: ["quantize", str(e.data)], 1, "no config.json", None),
    ("model path that does not exist", lambda e: ["quantize", str(e.root / "nowhere")], 1, "does not exist", None),
    ("seqlen beyond the context", lambda e: [*e.quantize(), "--seqlen", "4096"], 1,
     "--seqlen 4096 exceeds the model's context of 256", None),
    ("eval seqlen beyond the context", lambda e: [*e.quantize(), "--eval-seqlen", "512"], 1,
     "--eval-seqlen 512 exceeds", None),
    ("unknown calibration set", lambda e: [*e.quantize(), "--calib", "imagenet"], 1, "unknown dataset 'imagenet'", None),
    ("unknown evaluation set", lambda e: [*e.quantize(), "--eval", "wikitext2,imagenet"], 1,
     "unknown dataset 'imagenet'", None),
    ("unknown calibration split", lambda e: [*e.quantize(), "--calib", "wikitext2:dev"], 1, "unknown split 'dev'", None),
    ("unknown data source", lambda e: [*e.quantize(), "--data-source", "ftp"], 1, "unknown data source 'ftp'", None),
    ("NaN weight", lambda e: ["quantize", str(e.root / "nan-model"), *e.quantize()[2:]], 1,
     "weight model.layers.1.mlp.down_proj.weight holds 1 NaN", None),
    ("truncated weights", lambda e: ["quantize", str(e.root / "truncated"), *e.quantize()[2:]], 1,
     "model.safetensors is truncated", None),
    ("Hessian from non-finite inputs", lambda e: ["quantize", str(e.root / "nan-embedding"), *e.quantize()[2:]], 1,
     "layer 0 self_attn.q_proj (0 of 160 input columns dead): the Hessian holds NaN/Inf", _no_weight_check),
    ("data file not UTF-8", lambda e: [*e.quantize(), "--data-dir", str(e.root / "latin1")], 1,
     "wiki.valid.raw is not UTF-8 text", None),
    ("data file missing", lambda e: [*e.quantize(), "--calib", "c4"], 1, "c4/c4-train.00000-of-01024.json.gz", None),
    ("too few tokens to calibrate", lambda e: [*e.quantize(), "--data-dir", str(e.root / "short")], 1,
     "wikitext2:valid has 15 tokens, too few", None),
    ("more eval windows than the text holds", lambda e: [*e.quantize(), "--eval", "ptb", "--eval-windows", "1000"], 1,
     "fewer than the --eval-windows 1000", None),
    ("--out names an existing file", lambda e: [*e.quantize(), "--out", str(e.root / "a-file")], 1,
     "is a file, not a directory", None),
    ("--out below a file", lambda e: [*e.quantize(), "--out", str(e.root / "a-file" / "run")], 1,
     "a-file is a file, not a directory", None),
    ("not enough disk space", lambda e: [*e.quantize(), "--out", str(e.root / "run-disk"), "--save"], 1,
     "not enough free disk space", _low_disk),
    ("--act-scales file missing", lambda e: [*e.quantize(), "--transform", "dbell", "--act-scales", str(e.root / "x")],
     1, "--act-scales", None),
    ("unknown method", lambda e: [*e.quantize(), "--method", "nope"], 2, "unknown method", None),
    ("--stream with a transform", lambda e: [*e.quantize(), "--stream", "--transform", "dbell", "--out",
                                             str(e.root / "r")], 2, "--stream", None),
    ("--save-packed with activation quantization", lambda e: [*e.quantize(), "--act-bits", "8", "--save-packed",
                                                              str(e.root / "p")], 2, "--act-bits", None),
    ("eval: malformed config.json", lambda e: ["eval", str(e.root / "bad-config")], 1, "config.json is not valid JSON", None),
    ("eval: no weight files", lambda e: ["eval", str(e.root / "no-weights")], 1, "no weight files", None),
    ("eval: unknown set", lambda e: ["eval", str(e.model), "--ppl", "imagenet", "--seqlen", "32", "--data-dir", str(e.data)], 1,
     "unknown dataset 'imagenet'", None),
    ("act-scales: --out is a directory", lambda e: ["act-scales", str(e.model), "--calib", "wikitext2", "--seqlen", "32",
                                                    "--data-dir", str(e.data), "--out", str(e.data)], 1,
     "is a directory", None),
    ("pack: not a run directory", lambda e: ["pack", str(e.data), "--out", str(e.root / "p")], 1, "no report.json", None),
    ("pack: truncated report.json", lambda e: ["pack", str(e.root / "bad-report"), "--out", str(e.root / "p")], 1,
     "report.json is not valid JSON", None),
    ("report: not a run directory", lambda e: ["report", str(e.data), "--out", str(e.root / "rep")], 1,
     "no report.json", None),
    ("report: --out is a file", lambda e: ["report", str(e.data), "--out", str(e.root / "a-file")], 1, "is a file", None),
    ("export-gguf: not a packed checkpoint", lambda e: ["export-gguf", str(e.model), str(e.root / "m.gguf")], 1,
     "no quantization_config", None),
]


@pytest.mark.parametrize("args, status, message, patch", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_message(env, monkeypatch, args, status, message, patch):
    if patch is not None:
        patch(monkeypatch)
    res = runner.invoke(app, args(env))
    assert res.exit_code == status, res.output
    assert "Traceback" not in res.output
    assert message in " ".join(res.output.split()), res.output  # rich may wrap usage errors


def test_debug_shows_the_traceback(env, monkeypatch):
    args = ["quantize", str(env.root / "gpt2")]
    for res in (runner.invoke(app, [*args, "--debug"]), runner.invoke(app, args, env={"ONEBIT_DEBUG": "1"})):
        assert res.exit_code == 1 and "unsupported architecture" in str(res.exception)


def test_unexpected_errors_keep_their_traceback_and_say_it_is_a_bug(env, monkeypatch):
    from onebit import checks

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(checks, "model_config", boom)
    res = runner.invoke(app, ["quantize", str(env.model)])
    assert res.exit_code == 1 and "Traceback" in res.output and "RuntimeError: boom" in res.output
    assert "bug in onebit" in res.output


def test_disk_full_leaves_no_partial_checkpoint_and_resume_continues(env, monkeypatch):
    import safetensors.torch

    out = env.root / "run-full"
    args = [*env.quantize(), "--out", str(out)]
    real = safetensors.torch.save_file

    def fill_up_at_layer_1(tensors, filename, metadata=None):
        if Path(filename).name.startswith(".layer_00001"):
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fill_up_at_layer_1)
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "no space left on the device while writing" in res.output and "layer_00001.safetensors" in res.output
    assert sorted(p.name for p in (out / "layers").iterdir()) == ["layer_00000.safetensors"]  # no partial file
    first = (out / "layers" / "layer_00000.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "layers").iterdir()) == ["layer_00000.safetensors", "layer_00001.safetensors"]
    assert (out / "layers" / "layer_00000.safetensors").stat().st_mtime_ns == first  # reused, not recomputed
    assert json.loads((out / "report.json").read_text())["data_source"] == str(env.data)


def test_report_records_data_source_and_calibration_overlap(env):
    out = env.root / "run-overlap"
    res = runner.invoke(app, [*env.quantize(), "--calib", "wikitext2:test", "--eval", "wikitext2,ptb",
                              "--eval-windows", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["calib_eval_overlap"] == ["wikitext2"] and rep["calibration"]["source"] == "wikitext2:test"


def test_truncated_packed_checkpoint_is_a_clear_error(env):
    out, packed = env.root / "run-packed", env.root / "packed"
    res = runner.invoke(app, [*env.quantize(), "--out", str(out), "--save-packed", str(packed)])
    assert res.exit_code == 0, res.output
    weights = packed / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    for args in (["eval", str(packed), "--data-dir", str(env.data), "--seqlen", "32"],
                 ["export-gguf", str(packed), str(env.root / "t.gguf")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert "truncated" in res.output, res.output
    assert not (env.root / "t.gguf").exists()
