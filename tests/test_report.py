"""`onebit quantize --tasks` and `onebit report` end to end on two small runs of a tiny model."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("lm_eval", reason="the optional extra `eval` (lm-eval) is not installed")
pytest.importorskip("matplotlib", reason="the optional extra `plots` (matplotlib) is not installed")

from conftest import save_tiny_model_dir, write_tiny_data  # noqa: E402
from onebit.cli import app  # noqa: E402
from onebit.report import comparison_markdown, load_report, ppl_points  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "zeroshot"
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("report")
    model = save_tiny_model_dir(root / "model")
    tok = AutoTokenizer.from_pretrained(model)
    tok.eos_token = "<unk>"  # lm-eval needs a BOS or EOS id
    tok.save_pretrained(model)
    data = write_tiny_data(root / "data")
    shutil.copytree(FIXTURES, data, dirs_exist_ok=True)
    common = ["--calib", "wikitext2", "--eval", "wikitext2,ptb", "--nsamples", "4", "--seqlen", "64", "--eval-windows", "2",
              "--data-dir", str(data), "--device", "cpu"]
    a = runner.invoke(app, ["quantize", str(model), "--method", "braq", *common, "--out", str(root / "braq"),
                            "--tasks", "piqa,hellaswag", "--limit", "2", "--batch-size", "4", "--save"])
    assert a.exit_code == 0, a.output
    b = runner.invoke(app, ["quantize", str(model), "--method", "sign", *common, "--out", str(root / "sign"), "--no-fp-eval"])
    assert b.exit_code == 0, b.output
    return root, data


def test_quantize_stores_zeroshot(runs):
    root, _ = runs
    rep = load_report(root / "braq")
    for key in ("zeroshot", "zeroshot_fp"):
        z = rep[key]
        assert set(z["tasks"]) == {"piqa", "hellaswag"} and z["limit"] == 2
        assert all(z["tasks"][t]["n"] == 2 for t in z["tasks"])
        assert z["average_metric"] == {"piqa": "acc", "hellaswag": "acc_norm"}
        assert z["average"] == pytest.approx((z["tasks"]["piqa"]["acc"] + z["tasks"]["hellaswag"]["acc_norm"]) / 2)
        assert z["lm_eval_version"] == "0.4.13" and z["config"]["hellaswag"]["task"] == "hellaswag"
    assert "zeroshot" not in load_report(root / "sign")


def test_report_table_and_plots(runs, tmp_path):
    root, _ = runs
    res = runner.invoke(app, ["report", str(root / "braq"), str(root / "sign"), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    reps = [load_report(root / n) for n in ("braq", "sign")]
    md = (tmp_path / "report.md").read_text()
    assert md.strip() == comparison_markdown(reps).strip() and md.strip() in res.output
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["run", "fp", "braq", "sign"]
    assert "piqa (acc)" in rows[0] and "hellaswag (acc_norm)" in rows[0] and "avg" in rows[0]
    for r in reps:  # both bpw figures of every run
        row = next(x for x in rows if x.split("|")[1].strip() == r["name"])
        assert f"{r['paper_bpw']:.3f}" in row and f"{r['storage_bpw']:.3f}" in row
        assert f"{r['ppl']['ptb']:.2f}" in row
    braq_row = next(x for x in rows if x.split("|")[1].strip() == "braq")
    assert f"{100 * reps[0]['zeroshot']['average']:.1f}" in braq_row
    assert "limit: 2" in md
    pts = ppl_points(reps)
    assert {p[0] for p in pts["wikitext2"]} == {reps[0]["storage_bpw"], reps[1]["storage_bpw"]}
    for png in ("ppl_vs_bpw.png", "layer_error.png"):
        head = (tmp_path / png).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] > 300


def test_eval_run_dir_zeroshot_only(runs):
    root, data = runs
    res = runner.invoke(app, ["eval", str(root / "braq"), "--tasks", "piqa", "--limit", "2", "--data-dir", str(data),
                              "--batch-size", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "ppl" not in out and out["zeroshot"]["tasks"]["piqa"] == load_report(root / "braq")["zeroshot"]["tasks"]["piqa"]


def test_missing_task_file_fails_before_quantizing(runs, tmp_path):
    root, _ = runs
    res = runner.invoke(app, ["quantize", str(root / "model"), "--tasks", "boolq", "--data-dir", str(tmp_path)])
    assert res.exit_code == 1 and "boolq/val.jsonl" in res.output and "Traceback" not in res.output
