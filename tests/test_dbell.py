"""DBellQuant: the dual-bell transform (fold exactness, losses, early stop), act fake quant, act scales."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

from onebit import QuantConfig, quantize
from onebit.engine.actquant import fake_quant_per_token, install_act_quant
from onebit.engine.hessian import HessianAccumulator
from onebit.models import get_adapter
from onebit.transforms import (
    LTDBOptions, apply_dbell, compute_act_scales, dual_bell_losses, load_act_scales, optimize_blocks, save_act_scales,
)


def _reference_losses(v: torch.Tensor, p: float) -> tuple[float, float]:
    """L_DTNP and L_DTMD of one block, element by element in float64, straight from the spec's formulas."""
    rows, n = v.shape
    np_sum = md_sum = 0.0
    for i in range(rows):
        row = [float(x) for x in v[i]]
        mu = sum(row) / n
        beta = sum(abs(x - mu) for x in row) / n
        for x in row:
            dp, dm = abs(x - (mu + beta)), abs(x - (mu - beta))
            t = mu + beta if dp < dm else mu - beta
            np_sum += (abs(x - t) / abs(t)) ** p
            md_sum += min(dp, dm)
    return 100 * np_sum / (rows * n), md_sum / (rows * n)


def _autograd_losses(v: torch.Tensor, p: float) -> torch.Tensor:
    """Plain autograd form of L_DTNP for one block (float64), for the closed-form gradient check."""
    mu = v.mean(-1, keepdim=True)
    beta = (v - mu).abs().mean(-1, keepdim=True)
    tp, tm = mu + beta, mu - beta
    t = torch.where((v - tp).abs() < (v - tm).abs(), tp, tm)
    return 100 * ((v - t).abs() / t.abs()).pow(p).mean()


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_losses_match_float64_reference(p):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(5, 12, generator=g, dtype=torch.float64) * 0.05 + 0.01
    dtnp, dtmd, grad = dual_bell_losses(v, p, with_grad=True)
    ref_np, ref_md = _reference_losses(v, p)
    assert float(dtnp) == pytest.approx(ref_np, rel=1e-12)
    assert float(dtmd) == pytest.approx(ref_md, rel=1e-12)
    vv = v.clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(_autograd_losses(vv, p), vv)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    # homogeneity (spec §1.4): DTNP of degree 0, DTMD of degree 1
    dtnp3, dtmd3, _ = dual_bell_losses(3 * v, p)
    assert float(dtnp3) == pytest.approx(float(dtnp), rel=1e-10)
    assert float(dtmd3) == pytest.approx(3 * float(dtmd), rel=1e-10)


def _reference_ltdb(w: torch.Tensor, t0: torch.Tensor, epochs: int, lr: float, p: float) -> tuple[torch.Tensor, int]:
    """The released loop for one block: autograd SGD on DTNP, stop before the step whose DTMD rose."""
    t = t0.clone().requires_grad_(True)
    prev = best = float("inf")
    keep, steps = t0.clone(), 0
    for _ in range(epochs):
        v = w * t
        vd = v.detach()
        mu = vd.mean(-1, keepdim=True)
        beta = (vd - mu).abs().mean(-1, keepdim=True)
        dtmd = float(torch.minimum((vd - mu - beta).abs(), (vd - mu + beta).abs()).mean())
        if dtmd > prev:
            break
        prev = dtmd
        loss = _autograd_losses(v, p)
        (grad,) = torch.autograd.grad(loss, t)
        with torch.no_grad():
            t -= lr * grad
        if float(loss.detach()) < best:
            best, keep = float(loss.detach()), t.detach().clone()
        steps += 1
    return keep, steps


def test_early_stop_fires_exactly_when_dtmd_rises():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 64, 16, generator=g, dtype=torch.float64)
    t0 = torch.rand(3, 16, generator=g, dtype=torch.float64) + 0.5
    t, steps = optimize_blocks(w, t0, LTDBOptions(epochs=300, lr=0.01, p=1.0))
    assert steps.tolist()[:2] == [1, 1] and 1 < steps[2] < 300  # both an immediate and a later stop
    for b in range(3):  # batched blocks behave exactly as the plain one-block loop
        ref_t, ref_steps = _reference_ltdb(w[b], t0[b], 300, 0.01, 1.0)
        assert steps[b] == ref_steps
        torch.testing.assert_close(t[b], ref_t, rtol=1e-9, atol=1e-12)
    # never stopping: all epochs used, the last iterate kept
    _, steps_short = optimize_blocks(w[2:], t0[2:], LTDBOptions(epochs=5, lr=0.01))
    assert steps_short.tolist() == [5]


def test_fold_keeps_logits(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = random_ids(2, 24)
    with torch.no_grad():
        ref = model(ids).logits
    before = model.get_submodule(f"{adapter.layers}.0.{adapter.groups[0].linears[0]}").weight.clone()
    scales, stats = apply_dbell(model, adapter, compute_act_scales(model, adapter, ids), LTDBOptions(epochs=10))
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    name = f"{adapter.layers}.0.{adapter.groups[0].linears[0]}"
    after = model.get_submodule(name).weight
    assert not torch.allclose(after, before)  # the weights really changed
    torch.testing.assert_close(after, before * scales[name])
    assert stats["groups"] == 2 * 2


def test_opt_smoothquant_mode_divides_layernorm_bias():
    model = tiny_model("opt")
    adapter = get_adapter(model)
    ids = random_ids(2, 24)
    ln = model.model.decoder.layers[0].self_attn_layer_norm
    with torch.no_grad():
        ln.bias.normal_()  # a non-zero bias: dividing only γ would break the identity
        ref = model(ids).logits
    bias = ln.bias.clone()
    act = compute_act_scales(model, adapter, ids)
    scales, _ = apply_dbell(model, adapter, act, mode="smoothquant")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)
    t = scales["model.decoder.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(ln.bias, bias / t)


@pytest.mark.parametrize(
    "bits, codes",
    [(8, [127, -19, 3, 70]), (6, [31, -5, 1, 17]), (4, [7, -1, 0, 4])],
)
def test_fake_quant_per_token_hand_computed(bits, codes):
    # x/Δ with Δ = 2/qmax: 8 bits [127, −19.05, 3.175, 69.85]; 6 bits [31, −4.65, 0.775, 17.05];
    # 4 bits [7, −1.05, 0.175, 3.85]
    x = torch.tensor([[2.0, -0.3, 0.05, 1.1], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.5 / 3, 0.0, 0.25]])
    q = fake_quant_per_token(x, bits)
    qmax = 2 ** (bits - 1) - 1
    torch.testing.assert_close(q[0], torch.tensor(codes, dtype=torch.float32) * 2 / qmax)
    assert torch.equal(q[1], torch.zeros(4)) and not q.isnan().any()
    assert float(q[2, 0]) == pytest.approx(-1.0)  # the absmax element is exact, negative or not
    torch.testing.assert_close(fake_quant_per_token(q, bits), q)  # idempotent


def test_act_quant_hooks_and_raw_hessian_inputs():
    model = tiny_model("llama", layers=1)
    install_act_quant(model, get_adapter(model), 4)
    lin = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, 320)
    raw, quant = HessianAccumulator(320), HessianAccumulator(320)
    lin.register_forward_pre_hook(raw.pre_hook, prepend=True)
    lin.register_forward_hook(quant.hook)
    y = lin(x)
    xq = fake_quant_per_token(x, 4)
    torch.testing.assert_close(y, torch.nn.functional.linear(xq, lin.weight, lin.bias))
    xf, xqf = x.reshape(-1, 320), xq.reshape(-1, 320)
    torch.testing.assert_close(raw.hessian, xf.T @ xf, rtol=1e-5, atol=1e-5)  # 2/N with N = 2 sequences
    torch.testing.assert_close(quant.hessian, xqf.T @ xqf, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(raw.hessian, quant.hessian)


def test_act_scales_values_and_round_trip(tmp_path):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = random_ids(3, 16)
    scales = compute_act_scales(model, adapter, ids)
    assert len(scales) == 2 * 7
    with torch.no_grad():  # layer 0's q/k/v input is the input norm of the embeddings
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    torch.testing.assert_close(scales["model.layers.0.self_attn.q_proj"], x.abs().amax((0, 1)))
    path = tmp_path / "scales.safetensors"
    save_act_scales(scales, path)
    back = load_act_scales(path)
    assert back.keys() == scales.keys() and all(torch.equal(back[k], scales[k]) for k in scales)


def test_quantize_with_dbell_and_act_bits_keeps_hooks():
    model = tiny_model("qwen2", layers=1)
    ids = random_ids(1, 16)
    res = quantize(model, QuantConfig(transform="dbell", act_bits=6, ltdb_epochs=5), ids)
    assert res.transform["groups"] == 2 and res.to_dict()["config"]["act_bits"] == 6
    q = model.model.layers[0].mlp.down_proj
    assert len(q._forward_pre_hooks) == 1  # fake quant stays on for evaluation
    with pytest.raises(ValueError):
        QuantConfig(act_bits=5)
    with pytest.raises(ValueError):
        QuantConfig(act_scales="x.safetensors")  # without the transform
    assert QuantConfig(act_bits=16).act_bits is None
    raw = QuantConfig(act_bits=8, hessian_from_quantized_acts=False).engine_options()
    assert raw.hessian_raw_inputs and not QuantConfig(act_bits=8).engine_options().hessian_raw_inputs


def test_resume_with_dbell_replays_the_same_model(tmp_path):
    """A --resume of a dbell + act-quant run (layer 0 from its file, layer 1 recomputed) ends with the same
    weights, norms and logits as the uninterrupted run: the pre-pass is recomputed identically."""
    from onebit.engine.checkpoint import LayerCheckpoint

    ids = random_ids(2, 16)
    cfg = QuantConfig(transform="dbell", act_bits=8, ltdb_epochs=5)
    full = tiny_model("llama", layers=2)
    quantize(full, cfg, ids, checkpoint=LayerCheckpoint(tmp_path / "a", {"run": 1}))
    ck = LayerCheckpoint(tmp_path / "a", {"run": 1})
    ck.path(1).unlink()  # as if killed after layer 0
    resumed = tiny_model("llama", layers=2)
    quantize(resumed, cfg, ids, checkpoint=ck, resume=True)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, resumed(ids).logits, atol=0, rtol=0)


def test_dbellquant_recipe_is_the_release_and_cli_refuses_what_it_sets(cli_setup):
    """--recipe dbellquant = the release: braq with the order-1 column-count proxy, the L2 (p = 2) loss, the
    dbell transform; options the recipe sets cannot be given again (exit 2, one message)."""
    import json

    from typer.testing import CliRunner

    from onebit.cli import app
    from onebit.recipes import recipe

    cfg = QuantConfig(**recipe("dbellquant"))
    assert (cfg.method, cfg.method_options, cfg.transform, cfg.ltdb_p) == ("braq", {"proxy_order": 1}, "dbell", 2.0)
    assert cfg.build_method().proxy_order == 1 and QuantConfig().build_method().proxy_order == 2
    path, data, root = cli_setup
    runner = CliRunner()
    base = ["quantize", str(path), "--calib", "wikitext2", "--nsamples", "2", "--seqlen", "32", "--eval", "",
            "--data-dir", str(data), "--device", "cpu", "--ltdb-epochs", "3"]
    res = runner.invoke(app, [*base, "--recipe", "dbellquant", "--salient-metric", "magnitude", "--out", str(root / "dq")])
    assert res.exit_code == 0, res.output
    rep = json.loads((root / "dq" / "report.json").read_text())
    assert rep["name"] == "dbellquant" and rep["config"]["transform"] == "dbell" and rep["config"]["ltdb_p"] == 2.0
    opts = rep["config"]["method_options"]
    assert opts["proxy_order"] == 1 and opts["salient_metric"] == "magnitude"
    for extra, msg in ((["--method", "arb"], "sets --method braq"), (["-m", "proxy_order=2"], "sets the method options"),
                       (["--transform", "rotate"], "sets --transform")):
        res = runner.invoke(app, [*base, "--recipe", "dbellquant", *extra])
        assert res.exit_code == 2 and msg in res.output, res.output
