"""`onebit report --frontier`: seeds pooled into one point, the Pareto front, the table and the figure; and
the CLI end to end with the new baselines and column feedback on a tiny model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import save_tiny_model_dir, write_tiny_data
from onebit.cli import app
from onebit.frontier import frontier_markdown, frontier_points, pareto


def rep(name: str, method: str, bpw: float, ppl: float, seed: int = 0, feedback: str = "block") -> dict:
    return dict(name=name, method=method, model="m", config={"method": method, "feedback": feedback}, storage_bpw=bpw,
                paper_bpw=1.0, calibration={"dataset": "c4", "seed": seed, "source": "x"}, eval={"windows": 8},
                ppl={"wikitext2": ppl}, ppl_fp={"wikitext2": 20.0})


def test_seeds_pool_into_one_point_with_median_and_spread():
    reports = [rep("braq", "braq", 2.95, 100.0), rep("braq-s1", "braq", 2.95, 300.0, 1), rep("braq-s2", "braq", 2.95, 160.0, 2)]
    (p,) = frontier_points(reports)
    assert p.name == "braq" and sorted(p.seeds) == [0, 1, 2] and p.median("wikitext2") == 160.0
    assert "160 [100–300]" in frontier_markdown([p], {"wikitext2": 20.0})


def test_pareto_front_by_hand():
    """(bpw, ppl): a (1.1, 900), b (2.0, 300), c (2.9, 400) dominated by b, d (4.1, 40), e (4.1, 45) dominated by d."""
    pts = frontier_points([rep("a", "sign", 1.1, 900), rep("b", "ternary", 2.0, 300, feedback="column"),
                           rep("c", "braq", 2.9, 400), rep("d", "gptq", 4.1, 40), rep("e", "rtn", 4.1, 45)])
    assert [p.name for p in pareto(pts, "wikitext2")] == ["a", "b", "d"]
    md = frontier_markdown(pts, {"wikitext2": 20.0})
    assert "★ 300" in md and "| 400 |" in md
    assert "★ 400" not in md and "★ 45" not in md


@pytest.mark.parametrize("method,extra", [("gptq", ["--bits", "3"]), ("ternary", []), ("braq", ["--feedback", "column"])])
def test_cli_baselines_and_column_feedback_then_frontier(tmp_path, method, extra):
    pytest.importorskip("matplotlib")
    runner = CliRunner()
    model = save_tiny_model_dir(tmp_path / "model")
    data = write_tiny_data(tmp_path / "data")
    common = ["--calib", "wikitext2", "--eval", "wikitext2", "--nsamples", "4", "--seqlen", "64", "--eval-windows", "2",
              "--data-dir", str(data), "--device", "cpu"]
    r = runner.invoke(app, ["quantize", str(model), "--method", method, *extra, *common, "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    expected = {"gptq": "column", "ternary": "column", "braq": "column"}[method]
    assert report["config"]["feedback"] == expected
    assert report["config"]["act_order"] == (method == "gptq")
    r = runner.invoke(app, ["report", str(tmp_path / "run"), "--frontier", "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cmp" / "frontier.png").stat().st_size > 10_000
    assert "storage bpw" in (tmp_path / "cmp" / "frontier.md").read_text()


def test_column_feedback_refused_for_haar_methods(tmp_path):
    r = CliRunner().invoke(app, ["quantize", "x", "--method", "row-hbraq", "--feedback", "column"])
    assert r.exit_code != 0 and "cannot assign single columns" in r.output
