"""The lean method (docs/lean.md) and the stored-parameter codecs: exact storage accounting, decode = fake
quant bit for bit, hand-checked int8/fp8 rounding, column feedback, the salient channel choice against a
float64 reference, the bits formula."""

from __future__ import annotations

import pytest
import torch

from onebit.engine.solver import quantize_linear
from onebit.formats.packed import PackedLinear
from onebit.methods import build_method
from onebit.methods.base import BlockContext, decode_linear, storage_bits
from onebit.methods.lean import stored_bits
from onebit.methods.params import decode_param, encode_param
from test_feedback import real_hessian

OPTIONS = [
    {},
    {"param_dtype": "fp16", "salient_frac": 0.1, "salient_bits": 3},
    {"param_dtype": "fp8", "param_scope": "row", "param_group": 32, "mean": True},
    {"salient_frac": [0.05, 0.1, 0.2], "salient_bits": [4, 3, 2], "salient_structure": "block"},
    {"salient_frac": 0, "salient_metric": "hessian"},
    {"salient_frac": 1.0, "salient_bits": 2, "salient_metric": "hdiag"},
]


def layer(n: int = 24, m: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=g) * (1 + torch.rand(m, generator=g)), real_hessian(m, seed).float()


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("feedback", ["block", "column"])
def test_storage_bits_equal_packed_bytes_and_decode_is_exact(opts, feedback):
    w, h = layer()
    res = quantize_linear(w, h, build_method("lean", **opts), 64, feedback=feedback)
    assert res.bits.storage == sum(storage_bits(b) for b in res.blocks)
    assert torch.equal(decode_linear(build_method("lean"), res.blocks, tuple(w.shape), 64), res.q)  # no option needed
    packed = PackedLinear.from_blocks("lean", res.blocks, tuple(w.shape), 64)
    assert packed.exact_bits() == res.bits.storage
    assert 0 <= packed.payload_bytes() * 8 - res.bits.storage < 8
    assert torch.equal(packed.dequantize(), res.q)


def test_bits_formula_and_no_per_weight_bitmap():
    """n = 32, m = 256, blocks of 128, 1/8 of the channels at 4 bits, int8 parameters (one scale per tensor):
    per block 32·(128 + 3·k) code bits, 2·128 width bits, α 8·32 + 24, α^c 8·128 + 24 (k salient columns)."""
    w, h = layer(32, 256)
    res = quantize_linear(w, h, build_method("lean", salient_frac=0.125, salient_bits=4), 128, feedback="column")
    ks = [int((stored_bits(b, 128) > 1).sum()) for b in res.blocks]
    assert sum(ks) == 32 == res.stats["salient_cols"] and res.stats["salient_code_bits"] == 4 * 32
    want = sum(32 * (128 + 3 * k) + 2 * 128 + (8 * 32 + 24) + (8 * 128 + 24) for k in ks)
    assert res.bits.storage == want
    assert res.bits.sign == 32 * (256 + 3 * 32) and res.bits.bitmap == 2 * 256
    for block in res.blocks:  # bits outside the code planes: per column or per row, never per weight
        other = sum(t.numel() for k, t in block.items() if t.dtype == torch.bool and not k.startswith("q"))
        assert other == 2 * 128 + 8 * 32 + 8 + 8 * 128 + 8


def obs_reference(w: torch.Tensor, h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """float64: d = diag of the upper Cholesky factor of the damped H⁻¹, score_j = Σ_i w_ij² / d_j²."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    d = torch.diag(torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True))
    ww = w.double().clone()
    ww[:, dead] = 0
    return ww.square().sum(0) / d.square()


@pytest.mark.parametrize("metric", ["obs", "hessian"])
def test_salient_channels_match_a_float64_reference(metric):
    """One channel set per linear: the top 5 % take 4 bits and the next 20 % 2 bits, by the float64 score
    (OBS: Σ w²/d²; hessian: H_jj · ‖W_:j‖²), across blocks."""
    w, h = layer(16, 200, seed=3)
    opts = dict(salient_frac=[0.05, 0.2], salient_bits=[4, 2], salient_metric=metric)
    res = quantize_linear(w, h, build_method("lean", **opts), 64)
    got = torch.cat([stored_bits(b, b["q0"].shape[1]) for b in res.blocks])
    score = obs_reference(w, h) if metric == "obs" else torch.diag(h).double() * w.double().square().sum(0)
    order = torch.argsort(score, descending=True)
    want = torch.ones(200, dtype=torch.long)
    want[order[:10]], want[order[10:50]] = 4, 2
    assert torch.equal(got, want)


def test_int8_and_fp8_rounding_by_hand():
    x = torch.tensor([[0.0, 0.05, 1.0, 3.984375], [-1.0, 0.0, 0.5, 1.0]])
    # int8, one grid per row: row 0 in [0, 255/64]: step 1/64, zero 0 → 0.05 → code 3 (0.046875);
    # row 1 in [−1, 1]: step fp16(2/255) = 1028·2⁻¹⁷, zero round(1/step) = 128, codes 0, 128, 192, 255
    s1 = 1028 * 2.0**-17
    want = torch.tensor([[0.0, 3 / 64, 1.0, 3.984375], [-128 * s1, 0.0, 64 * s1, 127 * s1]])
    stored = encode_param("a", x, "int8", "row")
    assert torch.equal(decode_param(stored, "a"), want)
    assert storage_bits(stored) == 8 * 8 + 2 * 16 + 2 * 8
    # fp8 over the tensor: s = 28/448 = 1/16; x/s = 448, −16, 4.8 → 5 (e4m3 step 0.5 in [4, 8)), 80
    y = torch.tensor([28.0, -1.0, 0.3, 5.0])
    stored = encode_param("b", y, "fp8", "tensor")
    assert torch.equal(decode_param(stored, "b"), torch.tensor([28.0, -1.0, 0.3125, 5.0]))
    assert storage_bits(stored) == 4 * 8 + 16
    assert torch.equal(decode_param(encode_param("c", y, "fp16", "row"), "c"), y.half().float())


def test_decode_by_hand():
    """Block of 2 × 3: column 0 at 2 bits (width plane 1), columns 1, 2 signs; α = [1, 2] (fp16), c = [0.5, 1, 2]:
    levels of column 0 are α·c·{−3, −1, 1, 3}; codes 3 and 0 → 1.5, −3; signs → ±α·c."""
    method = build_method("lean", param_dtype="fp16")
    params = {
        "width0": torch.tensor([True, False, False]),
        "q0": torch.tensor([[True, True, False], [False, False, True]]),
        "q1": torch.tensor([[True], [False]]),
        "alpha": torch.tensor([[1.0], [2.0]]).half(),
        "alpha_c": torch.tensor([0.5, 1.0, 2.0]).half(),
    }
    want = torch.tensor([[1.5, 1.0, -2.0], [-3.0, -2.0, 4.0]])
    assert torch.equal(method.decode_block(params, (2, 3)), want)


def test_column_feedback_beats_block_feedback():
    gains = []
    for seed in range(10):
        w, h = layer(32, 256, seed)
        q = build_method("lean")
        block = quantize_linear(w, h, q, 128, feedback="block")
        column = quantize_linear(w, h, q, 128, feedback="column")
        gains.append(1 - column.rel_err / block.rel_err)
    assert sum(g > 0 for g in gains) >= 9, gains


def test_assigned_columns_keep_the_fitted_parameters():
    """Column feedback moves only the codes: widths and every scale stay what the fit stored."""
    w, h = layer(16, 128, seed=4)
    ctx = BlockContext(d=torch.ones(128), h=h)
    lean = build_method("lean", mean=True)
    fit = lean.fit_block(w, ctx)
    for j in range(128):
        fit.assign(j, w[:, j] + 0.3 * torch.randn(16))
    res, base = fit.result(), lean.quantize_block(w, ctx)
    for k in base.params:
        if not k.startswith("q"):
            assert torch.equal(res.params[k], base.params[k]), k
    assert res.bits == base.bits


def test_param_groups_and_their_limits():
    w, h = layer(8, 256)
    res = quantize_linear(w, h, build_method("lean", param_group=48, param_dtype="fp16"), 128)
    assert [b["alpha"].shape for b in res.blocks] == [(8, 3), (8, 3)]  # ⌈128 / 48⌉ near-equal groups
    row = quantize_linear(w, h, build_method("lean", param_group="row", param_dtype="fp16"), 256)
    assert row.blocks[0]["alpha"].shape == (8, 1)
    with pytest.raises(ValueError, match="one block per linear"):
        quantize_linear(w, h, build_method("lean", param_group="row"), 128)
    with pytest.raises(ValueError, match="wider than the 128-column block"):
        quantize_linear(w, h, build_method("lean", param_group=256), 128)


@pytest.mark.parametrize("opts,match", [
    ({"salient_bits": 5}, "salient_bits"), ({"salient_frac": [0.6, 0.5]}, "summing"),
    ({"salient_frac": [0.1, 0.1, 0.1]}, "tiers"), ({"param_dtype": "int4"}, "param_dtype"),
    ({"param_group": "col"}, "param_group"), ({"salient_structure": "row"}, "salient_structure"),
])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        build_method("lean", **opts)


def test_packed_model_roundtrip(tmp_path):
    """A tiny llama through the pipeline with non-default options (their decoder needs none): the packed
    checkpoint's measured bpw equals the report and its logits equal the fake-quant model's exactly."""
    from conftest import assert_packed_logits, random_ids, tiny_model
    from onebit import QuantConfig, quantize
    from onebit.export.packed import PackCollector, save_packed
    from onebit.models import get_adapter

    model, ids = tiny_model("llama", 1), random_ids(2, 24)
    opts = dict(salient_frac=[0.05, 0.2], salient_bits=[3, 2], param_dtype="fp8", mean=True, param_group=64)
    col = PackCollector(get_adapter(model))
    res = quantize(model, QuantConfig(method="lean", method_options=opts), ids, on_layer=col)
    with torch.no_grad():
        logits = model(ids).logits
    save_packed(model, tmp_path, col.packed, "lean", opts, 128, res.bits)
    assert_packed_logits(tmp_path, ids, logits, res.bits.storage_bpw)


def test_cli_method_options():
    from onebit.cli import method_options_from_flags

    opts = method_options_from_flags("lean", {}, ["salient_frac=[0.05,0.2]", "salient_bits=[4,2]", "param_group=row"])
    assert build_method("lean", **opts).tiers == [(0.05, 4), (0.2, 2)] and opts["param_group"] == "row"
