"""HBLLM (row-hbraq, col-hbraq): Haar transform, the two-group RMS band binarizer against a plain float64
reference, the neighbour fill, stored form and bit accounting against the spec's table, odd shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from onebit.engine.solver import quantize_linear
from onebit.methods import BlockContext, build_method, method_options
from onebit.methods.base import storage_bits
from onebit.methods.haar import haar_forward, haar_inverse
from onebit.methods.hbllm import decode_band, encode_band, fill_salient


def fp16_tol(x: torch.Tensor) -> float:
    return 2e-3 * float(x.abs().max())


# ---- Haar ----------------------------------------------------------------------------------------------
def test_haar_hand_pair():
    low, high = haar_forward(torch.tensor([[1.0, 3.0]]), 1)
    torch.testing.assert_close(low, torch.tensor([[4 / math.sqrt(2)]]))
    torch.testing.assert_close(high, torch.tensor([[-2 / math.sqrt(2)]]))


@pytest.mark.parametrize("shape", [(6, 10), (7, 9), (1, 5), (5, 1)])
@pytest.mark.parametrize("dim", [0, 1])
def test_haar_round_trip_exact(shape, dim):
    x = torch.randn(*shape)
    low, high = haar_forward(x, dim)
    n = shape[dim]
    assert low.shape[dim] == (n + 1) // 2 and high.shape[dim] == n // 2  # as many coefficients as entries
    assert (haar_inverse(low, high, dim) - x).abs().max() < 1e-6
    if n % 2 == 0:  # orthonormal: the error in coefficients is the error in weights
        torch.testing.assert_close(low.square().sum() + high.square().sum(), x.square().sum())


def test_haar_compat_shrinks_by_2cc():
    x = torch.randn(8, 12)
    c, c_inv = float(np.float32(1 / math.sqrt(2))), 0.70703125
    factor = 2 * c * c_inv
    assert factor == pytest.approx(0.9998932, abs=1e-7)
    for dim in (0, 1):
        y = haar_inverse(*haar_forward(x, dim), dim, compat=True)
        torch.testing.assert_close(y, x * factor, rtol=1e-6, atol=1e-7)
        assert (y - x).abs().max() > 1e-5  # the shrink is real, not within float noise


# ---- the band binarizer: plain float64 reference of hbllm.md §4–§5, one candidate at a time ----------
def ref_groups(x: np.ndarray, t: float, center: float | None) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros_like(x)
    outer = np.abs(x) >= t
    for g in (~outer, outer):
        if g.any():
            mu = x[g].mean() if center is None else center
            alpha = np.sqrt(np.mean((x[g] - mu) ** 2))
            out[g] = mu + alpha * np.where(x[g] - mu >= 0, 1.0, -1.0)
    return out, outer


def ref_band(x: np.ndarray, partition: str, centers: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    cen = [None] * len(x) if centers is None else list(centers)
    if partition == "row":
        rows = []
        for i, row in enumerate(x):
            best = None
            for t in np.quantile(np.abs(row), np.linspace(0.10, 0.90, 41)):
                out, outer = ref_groups(row, t, cen[i])
                err = np.sum((row - out) ** 2)
                if best is None or err < best[0]:
                    best = (err, out, outer)
            rows.append(best[1:])
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    best = None
    for t in np.quantile(np.abs(x).ravel(), np.linspace(0.10, 0.90, 81)):
        fits = [ref_groups(row, t, cen[i]) for i, row in enumerate(x)]
        err = sum(np.sum((row - f[0]) ** 2) for row, f in zip(x, fits))
        if best is None or err < best[0]:
            best = (err, np.stack([f[0] for f in fits]), np.stack([f[1] for f in fits]))
    return best[1], best[2]


@pytest.mark.parametrize("partition,shared", [("row", False), ("row", True), ("global", False), ("global", True)])
def test_band_binarizer_matches_float64_reference(partition, shared):
    torch.manual_seed(1)
    # heavy-tailed rows of different scale and offset: the split and the RMS-vs-mean|·| objective matter
    x = torch.distributions.Laplace(0.0, 1.0).sample((48, 64)) * torch.rand(48, 1) + 0.3 * torch.rand(48, 1)
    p = encode_band(x, partition, shared)
    centers = p["mu"][:, 0].double().numpy() if shared else None
    if shared:
        torch.testing.assert_close(p["mu"], x.mean(1, keepdim=True).half().float())  # shared μ = row mean
    q_ref, outer_ref = ref_band(x.double().numpy(), partition, centers)
    assert np.array_equal(p["groups"].numpy(), outer_ref)
    np.testing.assert_allclose(decode_band(p).double().numpy(), q_ref, atol=fp16_tol(x))


def test_groups_of_one_or_two_are_exact():
    # 4 entries per row: some candidate splits them into two pairs, which two (μ, α) reproduce exactly
    x = torch.tensor([[0.1, -0.2, 1.5, -3.0], [2.0, 2.5, -0.25, 0.75], [1.0, 1.0, 1.0, 4.0]])
    for rows in (x, x[:, :1], x[:, :2]):
        torch.testing.assert_close(decode_band(encode_band(rows, "row", False)), rows, atol=fp16_tol(x), rtol=0)


# ---- row-hbraq fill --------------------------------------------------------------------------------------
def test_fill_hand_cases():
    w = torch.arange(20.0).repeat(2, 1) ** 1.5
    sal = torch.zeros(20, dtype=torch.bool)
    sal[[0, 1, 2, 3, 5]] = True
    sal[10:18] = True
    f = fill_salient(w, sal)
    col = lambda *c: w[:, list(c)].mean(1)  # noqa: E731
    expect = {0: col(4), 1: col(4), 2: col(4), 3: col(4, 6), 5: col(4, 6, 7, 8),
              10: col(7, 8, 9), 11: col(8, 9), 12: col(9), 13: col(9), 14: col(9),  # 13, 14: nearest left
              15: col(18), 16: col(18, 19), 17: col(18, 19)}
    for c, v in expect.items():
        torch.testing.assert_close(f[:, c], v, msg=f"column {c}")
    torch.testing.assert_close(f[:, ~sal], w[:, ~sal])


# ---- the methods ------------------------------------------------------------------------------------------
def test_options_are_the_spec_flags():
    for name in ("row-hbraq", "col-hbraq"):
        expect = dict(salient_metric="l2", group_partition="row", share_mean=False, haar_compat=False)
        assert method_options(name) == expect
    with pytest.raises(ValueError):
        build_method("row-hbraq", salient_metric="nope")
    with pytest.raises(ValueError):
        build_method("col-hbraq", group_partition="column")


def block(n: int = 32, b: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(n, b) * (torch.rand(b) * 2 + 0.1)
    return w, BlockContext(d=torch.rand(b) + 0.5, h=torch.eye(b))


@pytest.mark.parametrize("name", ["row-hbraq", "col-hbraq"])
@pytest.mark.parametrize("share", [False, True])
def test_bits_match_the_spec_table_and_decode(name, share):
    n, b = 32, 128
    w, ctx = block(n, b)
    m = build_method(name, share_mean=share)
    r = m.quantize_block(w, ctx)
    k = int(r.params["salient_cols"].sum())
    assert 1 <= k < 50
    signs = n * (b + k) if name == "row-hbraq" else n * b
    floats = {("row-hbraq", False): 12, ("row-hbraq", True): 10, ("col-hbraq", False): 8, ("col-hbraq", True): 7}
    assert r.bits.sign == signs and r.bits.bitmap == signs + b
    assert r.bits.params == 16 * n * floats[name, share]
    assert r.bits.storage == storage_bits(r.params)
    assert r.bits.paper_bpw == pytest.approx(1 + k / b if name == "row-hbraq" else 1.0)
    spec = {("row-hbraq", False): 3.5 + 2 * k / b, ("row-hbraq", True): 3.25 + 2 * k / b,
            ("col-hbraq", False): 3.0, ("col-hbraq", True): 2.875}[name, share]
    assert r.bits.storage_bpw == pytest.approx(spec + 1 / n)  # + the column bitmap
    assert torch.equal(m.decode_block(r.params, (n, b)), r.q)


@pytest.mark.parametrize("name", ["row-hbraq", "col-hbraq"])
def test_share_mean_stores_three_floats_per_band_row(name):
    w, ctx = block()
    per_row = {}
    for share in (False, True):
        p = build_method(name, share_mean=share).quantize_block(w, ctx).params
        band_rows = 2 * w.shape[0] if name == "row-hbraq" else w.shape[0]  # L and H rows of the ns transform
        per_row[share] = (p["ns_mu"].numel() + p["ns_alpha"].numel()) / band_rows
        assert p["sal_mu"].shape == (w.shape[0], 2)  # the salient stage keeps its own means
    assert per_row == {False: 4, True: 3}


@pytest.mark.parametrize("k", [1, 3, 4])
def test_small_salient_sets_are_reconstructed_exactly(k):
    w, _ = block(16, 64, seed=k)
    sal = torch.zeros(64, dtype=torch.bool)
    sal[torch.randperm(64)[:k]] = True
    for name in ("row-hbraq", "col-hbraq"):
        m = build_method(name)
        q = m.decode_block(m.encode(w, sal), (16, 64))
        torch.testing.assert_close(q[:, sal], w[:, sal], atol=fp16_tol(w), rtol=0)


@pytest.mark.parametrize("name", ["row-hbraq", "col-hbraq"])
def test_odd_shapes_pad_cleanly(name):
    torch.manual_seed(3)
    n, m = 129, 255  # odd rows, last block 127 columns wide
    w = torch.randn(n, m)
    x = torch.randn(m, 600)
    method = build_method(name)
    res = quantize_linear(w, 2 * x @ x.T / 600, method)
    assert res.q.shape == (n, m) and torch.isfinite(res.q).all() and res.rel_err < 0.5
    assert res.bits.storage == sum(storage_bits(b) for b in res.blocks)
    for s, p in zip((0, 128), res.blocks):
        width = p["salient_cols"].numel()
        k = int(p["salient_cols"].sum())
        assert torch.equal(method.decode_block(p, (n, width)), res.q[:, s : s + width])
        assert p["ns_signs"].numel() + p["sal_signs"].numel() == n * (width + k if name == "row-hbraq" else width)
    # constant rows of odd length: a leaked pad value would break the exact reconstruction
    c = torch.randn(n, 1).expand(n, 127).contiguous()
    r = method.quantize_block(c, BlockContext(d=torch.ones(127), h=torch.eye(127)))
    torch.testing.assert_close(r.q, c, atol=fp16_tol(c), rtol=0)


@pytest.mark.parametrize("width", [1, 2, 30])
def test_narrow_blocks(width):
    w, ctx = block(9, width)
    for name in ("row-hbraq", "col-hbraq"):
        r = build_method(name).quantize_block(w, ctx)
        assert r.q.shape == (9, width) and torch.isfinite(r.q).all()
        assert r.bits.storage == storage_bits(r.params)


def test_row_hbraq_beats_braq_on_a_real_looking_layer():
    torch.manual_seed(5)
    m = 256
    mix = torch.randn(m, m) * 0.1 + torch.eye(m)  # correlated inputs, a few loud channels
    x = (torch.randn(1024, m) @ mix) * (torch.rand(m) * 2 + 0.2)
    x[:, :4] *= 8
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(96, m) * 0.02
    w[:, torch.randperm(m)[:6]] *= 5
    braq = quantize_linear(w, h, build_method("braq"))
    row = quantize_linear(w, h, build_method("row-hbraq"))
    assert row.rel_err < braq.rel_err
