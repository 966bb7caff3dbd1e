"""The per-linear bit budget (docs/budget.md): never above its bound, more bits never more error on the same
Hessians, the exact per-group choice, every linear's recorded plan packs and decodes, refusals before any
work, and the recipes."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_packed_logits, random_ids, tiny_model
from onebit import QuantConfig, quantize
from onebit.cli import app
from onebit.engine.budget import best_choice, output_weight
from onebit.engine.pipeline import PROBE_SAMPLES, output_probe
from onebit.errors import InputError
from onebit.recipes import RECIPES, candidate_set, recipe

BUDGETS = (1.3, 1.6, 2.2, 4.0)


@pytest.fixture(scope="module")
def runs():
    """A two-layer tiny llama quantized under each budget (same model, same calibration)."""
    out = {}
    for b in BUDGETS:
        model = tiny_model("llama", 2)
        out[b] = quantize(model, QuantConfig(bpw_budget=b), random_ids(4, 32))
    return out


@pytest.mark.parametrize("budget", BUDGETS)
def test_budget_is_never_exceeded(runs, budget):
    res = runs[budget]
    assert res.storage_bpw <= budget
    assert res.budget["storage_bpw"] == res.storage_bpw and res.budget["bpw_budget"] == budget
    assert res.budget["floor_bpw"] <= res.storage_bpw
    cands = candidate_set("lean")
    for layer in res.layers:
        for rec in layer.linears:  # each linear's plan is one of the candidates, recorded as chosen
            assert {"method": rec.plan.method, "options": rec.plan.options} in cands
    chosen = {(d["layer"], d["name"]): d for d in res.budget["linears"]}
    for layer in res.layers:
        for rec in layer.linears:
            d = chosen[(rec.layer, rec.name)]
            assert d["candidates"][d["choice"]][0] == rec.bits.storage
            assert rec.plan.options == cands[d["choice"]]["options"]


def test_more_bits_never_more_error_on_the_same_hessians(runs):
    """Layer 0 sees the same calibration inputs under every budget, and its share grows with the budget: its
    summed error cannot grow (later layers' Hessians depend on earlier choices, so the model total may)."""
    errs = [sum(d["candidates"][d["choice"]][1] for d in runs[b].budget["linears"] if d["layer"] == 0) for b in BUDGETS]
    assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1]
    assert runs[4.0].storage_bpw < 4.0  # a loose budget takes the least-error candidate everywhere
    assert all(d["choice"] == len(candidate_set("lean")) - 1 for d in runs[4.0].budget["linears"])


def test_best_choice_is_the_exact_optimum():
    rng = random.Random(0)
    for _ in range(200):
        items = [[(rng.randint(1, 20), rng.random() * 10) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 5))]
        cap = sum(min(b for b, _ in o) for o in items) + rng.randint(0, 40)
        choice = best_choice(items, cap)
        assert sum(items[i][k][0] for i, k in enumerate(choice)) <= cap
        best = min(sum(items[i][k][1] for i, k in enumerate(c)) for c in itertools.product(*map(lambda o: range(len(o)), items))
                   if sum(items[i][k][0] for i, k in enumerate(c)) <= cap)
        assert sum(items[i][k][1] for i, k in enumerate(choice)) == pytest.approx(best, abs=1e-12)
    with pytest.raises(ValueError, match="no choice fits"):
        best_choice([[(5, 1.0)], [(3, 0.0)]], 7)


@pytest.mark.parametrize("candidates", ["lean", "vq"])
def test_budget_run_packs_and_decodes(tmp_path, candidates):
    """Lean at several tier settings in one model (``vq``: vector codes and lean settings): the packed checkpoint
    carries each module's own method and layout, its measured bpw equals the report's and its logits equal the
    fake-quant model's exactly."""
    from onebit.export.packed import PackCollector, save_packed
    from onebit.models import get_adapter

    model, ids = tiny_model("llama", 2), random_ids(4, 32)
    col = PackCollector(get_adapter(model))
    cfg = QuantConfig(bpw_budget=1.6, budget_candidates=candidates)
    res = quantize(model, cfg, ids, on_layer=col)
    assert len({json.dumps(r.plan.to_dict()) for layer in res.layers for r in layer.linears}) > 1
    if candidates == "vq":
        assert {r.plan.method for layer in res.layers for r in layer.linears} == {"vq", "lean"}
    with torch.no_grad():
        logits = model(ids).logits
    qc = save_packed(model, tmp_path, col.packed, cfg.method, cfg.method_options, cfg.blocksize, res.bits)
    assert qc["format_version"] == 3 and any("layout" in e for e in qc["modules"].values())
    for layer in res.layers:
        for r in layer.linears:
            entry = qc["modules"][f"model.layers.{r.layer}.{r.name}"]
            assert entry["options"] == r.plan.options and entry["method"] == r.plan.method
    assert_packed_logits(tmp_path, ids, logits, res.storage_bpw)


def test_a_budget_below_the_floor_is_refused_before_any_work():
    model = tiny_model("llama", 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    with pytest.raises(InputError, match=r"--bpw-budget 1 is below .* cheapest .*Raise the budget to at least 1\.\d+"):
        quantize(model, QuantConfig(bpw_budget=1.0, transform="rotate"), random_ids(2, 16), on_layer=lambda *a: calls.append(a))
    assert not calls and all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not even rotated


def test_a_floor_whose_storage_depends_on_the_weights_is_refused():
    cands = [{"method": "arb-rc", "options": {}}]  # its salient columns, hence its bits, follow the weights
    with pytest.raises(InputError, match="depends on the weights"):
        quantize(tiny_model("llama", 1), QuantConfig(bpw_budget=8.0, budget_candidates=cands, feedback="block"),
                 random_ids(2, 16))


def test_config_checks_and_round_trip():
    cfg = QuantConfig(bpw_budget=1.5, budget_candidates=[{"method": "sign"}, {"method": "gptq", "options": {"bits": 2}}])
    assert (cfg.method, cfg.method_options, cfg.feedback) == ("sign", {}, "block")  # the nominal: the first candidate
    assert cfg.budget_candidates[1] == {"method": "gptq", "options": {"bits": 2}}
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert not {"bpw_budget", "budget_candidates", "budget_objective"} & set(QuantConfig().to_dict())
    out = QuantConfig(bpw_budget=1.5, budget_objective="output")
    assert QuantConfig.from_dict(out.to_dict()) == out and out.to_dict()["budget_objective"] == "output"
    for bad, match in (({"bpw_budget": 0}, "positive"), ({"budget_candidates": "lean2"}, "need bpw_budget"),
                       ({"bpw_budget": 2, "budget_candidates": "nope"}, "unknown budget candidate set"),
                       ({"bpw_budget": 2, "budget_candidates": [{"options": {}}]}, "list of"),
                       ({"bpw_budget": 2, "budget_candidates": [{"method": "lean", "options": {"x": 1}}]}, "x"),
                       ({"budget_objective": "output"}, "need bpw_budget"),
                       ({"bpw_budget": 2, "budget_objective": "loss"}, "budget_objective must be one of")):
        with pytest.raises(ValueError, match=match):
            QuantConfig(**bad)


def test_recipes_expand_to_their_documented_config():
    for name, bound, cands, nominal in (("lean2", 2.0, "vq", "vq"), ("lean15", 1.5, "vq", "vq")):
        cfg = QuantConfig(**recipe(name))
        assert cfg.bpw_budget == bound and cfg.transform == "rotate" and cfg.rotate_heads and not cfg.rotate_down
        assert cfg.budget_candidates == candidate_set(cands) and cfg.method == nominal and cfg.feedback == "column"
        assert cfg.budget_objective == "output" and not cfg.act_order
    lean, vq = candidate_set("lean"), candidate_set("vq")
    assert candidate_set("lean-rich")[:7] == lean and candidate_set("wide")[3:9] == lean[1:]
    assert [(c["options"].get("dim", 8), c["options"]["bits"]) for c in vq[:7]] == [(8, 8), (8, 9), (8, 10), (8, 11),
                                                                                     (8, 12), (4, 7), (4, 8)]
    assert vq[7:] == lean[5:] + candidate_set("lean-rich")[7:]
    with pytest.raises(ValueError, match="act_order would split"):
        QuantConfig(**recipe("lean15"), act_order=True)
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("lean1")


def test_cli_budget_and_recipe(cli_setup):
    path, data, root = cli_setup
    runner = CliRunner()
    base = ["quantize", str(path), "--calib", "wikitext2", "--nsamples", "2", "--seqlen", "32", "--eval", "",
            "--data-dir", str(data), "--device", "cpu"]
    res = runner.invoke(app, [*base, "--recipe", "lean15", "--out", str(root / "r")])
    assert res.exit_code == 0, res.output
    rep = json.loads((root / "r" / "report.json").read_text())
    assert rep["name"] == "lean15" and rep["storage_bpw"] <= 1.5 and rep["budget"]["bpw_budget"] == 1.5
    assert rep["config"]["transform"] == "rotate"
    assert {r["plan"]["method"] for l in rep["layers"] for r in l["linears"]} <= {"vq", "lean"}
    assert rep["budget"]["objective"] == "output" and all("weight" in d for d in rep["budget"]["linears"])
    res = runner.invoke(app, [*base, "--bpw-budget", "1.0"])
    assert res.exit_code == 1 and "is below what the cheapest budget candidates store" in res.output
    res = runner.invoke(app, [*base, "--recipe", "lean2", "--transform", "dbell"])
    assert res.exit_code == 2 and "--recipe lean2 sets --transform" in res.output
    res = runner.invoke(app, [*base, "--bpw-budget", "2", "--method", "braq"])
    assert res.exit_code == 2 and "drop --method" in res.output
    listing = runner.invoke(app, ["recipes"])
    assert listing.exit_code == 0 and all(f"recipe {n}:" in listing.output for n in RECIPES)


def test_resume_counts_the_resumed_layers_and_keeps_their_choices(cli_setup):
    """A killed budget run continued with --resume: the resumed layer's bits enter the budget, the result is
    the uninterrupted run's, and `onebit pack` builds the mixed-layout checkpoint from the layer files."""
    path, data, root = cli_setup
    out = root / "resumed"
    args = ["quantize", str(path), "--calib", "wikitext2", "--nsamples", "2", "--seqlen", "32", "--eval", "", "--data-dir",
            str(data), "--device", "cpu", "--bpw-budget", "1.6", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    whole = json.loads((out / "report.json").read_text())
    (out / "layers" / "layer_00001.safetensors").unlink()
    assert CliRunner().invoke(app, [*args, "--resume"]).exit_code == 0
    rep = json.loads((out / "report.json").read_text())
    def chosen(r):
        return [(x["plan"], x["bits"]) for layer in r["layers"] for x in layer["linears"]]

    assert chosen(rep) == chosen(whole)
    assert rep["storage_bpw"] == whole["storage_bpw"] == rep["budget"]["storage_bpw"] <= 1.6
    assert [d["layer"] for d in rep["budget"]["linears"]] == [1] * 7  # layer 0 was resumed: no candidates listed
    res = CliRunner().invoke(app, ["pack", str(out), "--out", str(root / "resumed-packed")])
    assert res.exit_code == 0 and "measured from bytes" in res.output


def test_beyond_rows_pass_the_cli_checks(tmp_path):
    """Every row of ``benchmarks/results.py beyond`` is a valid command: it gets past option checking to the
    model check (a missing directory here; the set itself runs on SmolLM2)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import results

    names = [name for name, _ in results.rows("beyond", ("", []), 0)]
    assert names[1:3] == ["lean2", "lean15"] and "dbell+arb-rc+cgb" in names and len(set(names)) == len(names)
    for name, args in results.rows("beyond", ("", []), 0):
        res = CliRunner().invoke(app, results.command(name, args, False, str(tmp_path / "absent"))[1:])
        assert res.exit_code == 1 and "does not exist" in res.output, (name, res.output)


def test_output_weight_is_the_worst_candidates_output_error_over_its_own():
    class R:  # the two fields output_weight reads
        def __init__(self, err: float, q: torch.Tensor) -> None:
            self.err, self.q = err, q

    seen = []

    def probe(name: str, q: torch.Tensor) -> float:
        seen.append((name, float(q[0])))
        return 6.0

    results = [R(1.0, torch.tensor([1.0])), R(4.0, torch.tensor([2.0])), R(float("nan"), torch.tensor([3.0]))]
    assert output_weight(results, probe, "v") == 6.0 / 4.0 and seen == [("v", 2.0)]
    assert output_weight([R(0.0, torch.tensor([0.0]))], probe, "v") == 0.0  # no error anywhere: nothing to weigh


def test_output_probe_measures_one_linear_alone_and_restores_it():
    """The probe's growth of the layer's output error equals a replay written out in the test; the layer's
    weights are left as they were."""
    from onebit.engine.capture import capture_inputs, run_layer
    from onebit.models import get_adapter

    model = tiny_model("llama", 1)
    adapter = get_adapter(model)
    inps, calls = capture_inputs(model, adapter, random_ids(6, 16), "cpu")
    layer = adapter.decoder_layers(model)[0]
    linears = adapter.linears(layer)
    ref = run_layer(layer, inps, calls[0])
    probe = output_probe(layer, linears, inps, calls[0], ref, "cpu")
    v = linears["self_attn.v_proj"]
    w0 = v.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    w1 = w0 + 0.05 * torch.randn(w0.shape, generator=g)
    got = probe("self_attn.v_proj", w1)
    assert torch.equal(v.weight, w0)
    v.weight.data = w1
    out = run_layer(layer, inps[:PROBE_SAMPLES], calls[0])
    v.weight.data = w0
    want = float((out - ref[:PROBE_SAMPLES]).double().square().sum())
    assert got == pytest.approx(want, rel=1e-12) and got > 0
    assert probe("self_attn.v_proj", w0) == 0.0


def test_output_objective_run_keeps_the_budget_and_reports_weights():
    res = quantize(tiny_model("llama", 2), QuantConfig(bpw_budget=1.6, budget_objective="output"), random_ids(4, 32))
    assert res.storage_bpw <= 1.6 and res.budget["objective"] == "output"
    ws = [d["weight"] for d in res.budget["linears"]]
    assert len(ws) == 14 and all(w >= 0 for w in ws) and any(w > 0 for w in ws)
    for step in res.budget["steps"]:  # each layer's reported error is its choice's weighted sum
        chosen = [d for d in res.budget["linears"] if d["layer"] == step["layer"]]
        assert step["err"] == pytest.approx(sum(d["candidates"][d["choice"]][1] for d in chosen))
