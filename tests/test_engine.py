"""Engine: capture/replay, Hessians, inverse factor, block compensation, end-to-end on every adapter."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from conftest import random_ids, tiny_model
from onebit import QuantConfig, quantize
from onebit.engine.hessian import HessianAccumulator
from onebit.engine.solver import inverse_factor, quantize_linear
from onebit.errors import NumericalError
from onebit.eval.ppl import perplexity
from onebit.methods import build_method
from onebit.models import get_adapter


def test_identity_replay_reproduces_logits(family):
    model = tiny_model(family)
    ids = random_ids(3, 24)
    with torch.no_grad():
        ref = model(ids).logits
    quantize(model, QuantConfig(method="identity"), ids)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_layerwise_perplexity_equals_direct_computation(family):
    model = tiny_model(family)
    ids = random_ids(1, 100, seed=3)
    win = ids[:, :96].reshape(3, 32)
    with torch.no_grad():
        losses = [F.cross_entropy(model(w[None]).logits[0, :-1].double(), w[1:]) for w in win]
    direct = math.exp(float(torch.stack(losses).mean()))
    assert perplexity(model, ids, 32) == pytest.approx(direct, rel=1e-5)


def test_pipeline_end_to_end_braq(family):
    model = tiny_model(family)
    before = {n: p.clone() for n, p in model.named_parameters()}
    res = quantize(model, QuantConfig(method="braq"), random_ids(4, 32))
    ppl = perplexity(model, random_ids(1, 64, seed=1), 32)
    assert math.isfinite(ppl)
    layer = get_adapter(model).decoder_layers(model)[0]
    for name, lin in get_adapter(model).linears(layer).items():
        w = lin.weight
        assert not torch.equal(w, before[f"{get_adapter(model).layers}.0.{name}.weight"])
        # braq represents each row of a 128-column block with at most 8 values (4 non-salient + 4 salient)
        assert max(len(torch.unique(row)) for row in w[:, :128]) <= 8
    n_lin = sum(len(get_adapter(model).linears(l)) for l in get_adapter(model).decoder_layers(model))
    assert sum(len(l.linears) for l in res.layers) == n_lin
    assert 1.0 < res.paper_bpw < res.storage_bpw


def test_true_sequential_differs_and_runs():
    ids = random_ids(4, 32)
    a, b = tiny_model("llama"), tiny_model("llama")
    quantize(a, QuantConfig(method="braq"), ids)
    quantize(b, QuantConfig(method="braq", true_sequential=True), ids)
    wa = a.model.layers[0].mlp.down_proj.weight
    wb = b.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(wa, wb)  # down_proj saw inputs from the quantized attention and MLP-in linears


def test_hessian_accumulation_matches_direct_sum():
    lin = torch.nn.Linear(12, 5)
    acc = HessianAccumulator(12)
    handle = lin.register_forward_hook(acc.hook)
    xs = [torch.randn(1, 7, 12) for _ in range(4)]
    for x in xs:
        lin(x)
    handle.remove()
    direct = sum(x[0].double().T @ x[0].double() for x in xs) * 2 / len(xs)
    torch.testing.assert_close(acc.hessian.double(), direct, rtol=1e-5, atol=1e-6)


def test_inverse_factor_identities():
    torch.manual_seed(0)
    x = torch.randn(64, 200, dtype=torch.float64)
    h = (2 / 200) * x @ x.T
    u, damp = inverse_factor(h, 0.01)
    hd = h + damp * h.diag().mean() * torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(hd))
    for q in (0, 17, 63):  # U_qq² = [(H_F)⁻¹]_qq with F = {q, …, m−1}
        assert float(u[q, q] ** 2) == pytest.approx(float(torch.linalg.inv(hd[q:, q:])[0, 0]), rel=1e-8)


def test_inverse_factor_raises_damping_when_cholesky_fails(caplog):
    h = -torch.eye(4)  # never positive definite at small damping
    h[0, 0] = 5.0
    with pytest.raises(RuntimeError, match="not positive definite"):
        inverse_factor(h, 0.01, max_tries=2)
    assert "retrying" in caplog.text


def test_hessian_failures_name_the_linear_and_the_cause():
    """Non-finite inputs fail at once (no damping retries); a Hessian that stays indefinite names the linear,
    says its inputs were finite and counts the dead columns."""
    w, sign = torch.randn(4, 3), build_method("sign")
    h = torch.eye(3)
    h[1, 2] = h[2, 1] = float("inf")
    with pytest.raises(NumericalError, match=r"^layer 2 mlp.up_proj \(0 of 3 input columns dead\): the Hessian holds "
                                             r"NaN/Inf: the linear's inputs .* contain NaN/Inf"):
        quantize_linear(w, h, sign, name="layer 2 mlp.up_proj")
    h = torch.diag(torch.tensor([0.0, 1.0, -1e6]))
    with pytest.raises(NumericalError, match=r"\(1 of 3 input columns dead\): Hessian not positive definite even at "
                                             r"percdamp=1000 \(inputs finite\)"):
        quantize_linear(w, h, sign, name="layer 2 mlp.up_proj")


def test_block_compensation_with_identity_leaves_weights_unchanged():
    torch.manual_seed(1)
    w = torch.randn(9, 300)
    x = torch.randn(300, 500)
    res = quantize_linear(w, x @ x.T / 250, build_method("identity"), blocksize=128)
    torch.testing.assert_close(res.q, w)
    assert res.rel_err == pytest.approx(0.0, abs=1e-10)


def test_dead_columns_are_zeroed():
    torch.manual_seed(2)
    w = torch.randn(6, 40)
    x = torch.randn(40, 100)
    x[5] = 0  # input feature 5 is always zero
    res = quantize_linear(w, x @ x.T, build_method("identity"), blocksize=16)
    assert torch.all(res.q[:, 5] == 0) and torch.equal(res.q[:, 6:], w[:, 6:])


def test_gptq_compensation_lowers_output_error():
    torch.manual_seed(3)
    w = torch.randn(64, 256)
    x = torch.randn(256, 1024)
    x = x + 0.8 * x.roll(1, 0)  # correlated inputs: compensation has something to exploit
    h = 2 * x @ x.T / 1024
    braq = build_method("braq")
    with_comp = quantize_linear(w, h, braq, feedback="block")
    without = quantize_linear(w, h, braq, feedback="none")
    assert with_comp.rel_err < without.rel_err
