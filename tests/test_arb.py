"""ARB-LLM (arb, arb-x, arb-rc): monotone updates, float64 references of the spec, memory, stored form."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from onebit.engine.solver import quantize_linear
from onebit.methods import BlockContext, build_method, method_options
from onebit.methods import arb as A
from onebit.methods.base import storage_bits
from onebit.methods.binarize import fit_group
from onebit.methods.braq import braq_decode


def _block(n: int = 24, b: int = 128, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, b, generator=g) * (torch.rand(b, generator=g) * 2 + 0.1) + 0.3 * torch.randn(n, 1, generator=g)
    x = torch.randn(b, 300, generator=g) * torch.linspace(3, 0.5, b)[:, None] + torch.randn(1, 300, generator=g)
    h = 2 * x @ x.T / 300
    return w.to(dtype), h.to(dtype), (torch.rand(b, generator=g) + 0.5).to(dtype)


def _werr(w, q, mask):
    return float(((w - q) * mask).square().sum())


def _xerr(w, q, mask, s):
    r = (w - q) * mask
    return float(torch.trace(r @ s @ r.T))


# ---- monotone updates (Theorem 1 and its X / RC analogues), float64 -----------------------------------
@pytest.mark.parametrize("order", [1, 2])
def test_every_update_is_non_increasing(order):
    w, h, _ = _block(32, 64, seed=order, dtype=torch.float64)
    mask = torch.rand(32, 64, generator=torch.Generator().manual_seed(9)) < 0.6
    mask[3] = False  # an empty row must stay harmless
    tol = 1e-12 * float(w.square().sum())

    f = A.arb_init(w, mask, order)
    hist = [_werr(w, f.recon(mask), mask)]
    for _ in range(15):
        for step in (A.mean_step, A.scale_step, A.sign_step):
            step(w, mask, f)
            hist.append(_werr(w, f.recon(mask), mask))
    assert all(b <= a + tol for a, b in zip(hist, hist[1:])) and hist[-1] < hist[0]

    xh = [_xerr(w, f.recon(mask), mask, h)]
    for _ in range(15):
        A.x_mean_step(w, mask, f, h)
        xh.append(_xerr(w, f.recon(mask), mask, h))
        A.x_scale_step(w, mask, f, h)
        xh.append(_xerr(w, f.recon(mask), mask, h))
    assert all(b <= a + tol * 100 for a, b in zip(xh, xh[1:])) and xh[-1] < xh[0]

    f = A.rc_init(w, mask, order)
    rh = [_werr(w, f.recon(mask), mask)]
    for _ in range(15):
        for k in range(order):
            A.rc_pair_step(w, mask, f, k)
            rh.append(_werr(w, f.recon(mask), mask))
        if order == 2:
            A.sign_step(w, mask, f)
            rh.append(_werr(w, f.recon(mask), mask))
    assert all(b <= a + tol for a, b in zip(rh, rh[1:])) and rh[-1] < rh[0]
    assert all(torch.isfinite(t).all() for t in (f.alpha, f.col, f.signs))


@pytest.mark.parametrize("name", ["arb", "arb-x", "arb-rc"])
def test_ends_at_or_below_braq_on_braq_masks(name):
    w, h, d = _block(48, 128, seed=3)
    ctx = BlockContext(d=d, h=h)
    conc, sparse, sal = build_method("braq").masks(w, ctx)
    m = build_method(name)
    err = _xerr if name == "arb-x" else lambda w, q, mask, s: _werr(w, q, mask)
    for zone, order in ((conc, 1), (sparse, 1), (sal, 2)):
        braq = fit_group(w, zone, order, rounded=False).recon
        ours = m.fit(w, zone, order, ctx).recon(zone)
        assert err(w, ours, zone, h) <= err(w, braq, zone, h)


def test_arb_x_with_identity_s_equals_arb_mean_and_scale_updates():
    w, _, _ = _block(16, 40, dtype=torch.float64)
    mask = torch.rand(16, 40, generator=torch.Generator().manual_seed(1)) < 0.5
    for order in (1, 2):
        f, g = A.arb_init(w, mask, order), A.arb_init(w, mask, order)
        A.x_mean_step(w, mask, f, torch.eye(40, dtype=torch.float64))
        A.x_scale_step(w, mask, f, torch.eye(40, dtype=torch.float64))
        A.mean_step(w, mask, g)
        A.scale_step(w, mask, g)
        torch.testing.assert_close(f.mu[mask.any(1)], g.mu[mask.any(1)])
        torch.testing.assert_close(f.alpha[:, mask.any(1)], g.alpha[:, mask.any(1)])


def test_sign_step_picks_the_nearest_of_four_levels_ties_low():
    # levels μ ± α₁ ± α₂ with μ = 0, α = (2, 0.5): −2.5, −1.5, 1.5, 2.5 (indices 0…3)
    f = A.GroupState(torch.zeros(1, 1), torch.tensor([2.0, 0.5]).view(2, 1, 1), torch.ones(2, 1, 1), torch.ones(2, 1, 5))
    w = torch.tensor([[-3.0, -1.4, 0.0, 2.1, 2.0]])
    A.sign_step(w, torch.ones_like(w, dtype=torch.bool), f)
    want = [(-1, -1), (-1, 1), (-1, 1), (1, 1), (1, -1)]  # 0.0 is equidistant to ±1.5 → lower index (−,+)
    assert f.signs[:, 0].T.tolist() == [list(map(float, p)) for p in want]


# ---- float64 references of the spec, one block per variant ------------------------------------------------
def ref_braq(x, m, order):
    m = m.astype(float)
    cnt = np.maximum(m.sum(1), 1)
    r = np.zeros_like(x)
    for _ in range(order):
        d = (x - r) * m
        mu = d.sum(1) / cnt
        alpha = (np.abs(d - mu[:, None]) * m).sum(1) / cnt
        r = r + (alpha[:, None] * np.where(d - mu[:, None] >= 0, 1.0, -1.0) + mu[:, None]) * m
    return r


def ref_arb(w, mask, order, iters, s=None, iters_x=0):
    """arb-llm.md §1–§3 for every row: BiLLM init, ARB rounds, then (with S) the X rounds, B frozen."""
    out = np.zeros_like(w)
    for i in range(w.shape[0]):
        idx = np.flatnonzero(mask[i])
        if idx.size == 0:
            continue
        x, mus, al, bs, r = w[i, idx], [], [], [], np.zeros(idx.size)
        for _ in range(order):
            d = x - r
            mus.append(d.mean())
            al.append(np.abs(d - mus[-1]).mean())
            bs.append(np.where(d - mus[-1] >= 0, 1.0, -1.0))
            r = r + al[-1] * bs[-1] + mus[-1]
        mu = sum(mus)
        for _ in range(iters):
            mu = np.mean(x - sum(a * b for a, b in zip(al, bs)))
            for k in range(order):
                rest = sum(al[j] * bs[j] for j in range(order) if j != k)
                al[k] = np.sum(bs[k] * (x - mu - rest)) / np.sum(bs[k] ** 2)
            if order == 1:
                bs = [np.where(x - mu >= 0, 1.0, -1.0)]
            else:
                cands = [(-1, -1), (-1, 1), (1, -1), (1, 1)]
                v = np.array([c0 * al[0] + c1 * al[1] for c0, c1 in cands])
                best = np.argmin(np.abs(x[None] - mu - v[:, None]), 0)
                bs = [np.array([cands[j][k] for j in best], float) for k in range(2)]
        if iters_x:
            sj = s[np.ix_(idx, idx)]  # m_i S m_iᵀ restricted to the row's group
            one = np.ones(idx.size)
            for _ in range(iters_x):
                mu = (x - sum(a * b for a, b in zip(al, bs))) @ sj @ one / (one @ sj @ one)
                for k in range(order):
                    rest = sum(al[j] * bs[j] for j in range(order) if j != k)
                    al[k] = bs[k] @ sj @ (x - mu - rest) / (bs[k] @ sj @ bs[k])
        out[i, idx] = mu + sum(a * b for a, b in zip(al, bs))
    return out


def ref_rc(w, mask, order, iters):
    """arb-llm.md §4: α^r ⊗ α^c scales, no mean, B₁ = sign(W) fixed for order 1."""
    m = mask.astype(float)
    ar, ac, bs, r = [], [], [], w * m
    for _ in range(order):
        a = np.abs(r).sum(1) / np.maximum(m.sum(1), 1)
        ok = m * (a[:, None] > 0)
        c = (np.abs(r) / np.where(a > 0, a, 1)[:, None] * ok).sum(0) / np.maximum(ok.sum(0), 1)
        b = np.where(r >= 0, 1.0, -1.0)
        r = (r - a[:, None] * c[None] * b) * m
        ar, ac, bs = ar + [a], ac + [c], bs + [b]

    def pair(k):
        return np.outer(ar[k], ac[k]) * bs[k]

    def div(num, den, prev):
        return np.where(den > 0, num / np.where(den > 0, den, 1), prev)

    for _ in range(iters):
        for k in range(order):
            t = (w - sum(pair(j) for j in range(order) if j != k)) * m
            u = ac[k][None] * bs[k] * m
            ar[k] = div((u * t).sum(1), (u * u).sum(1), ar[k])
            v = ar[k][:, None] * bs[k] * m
            ac[k] = div((v * t).sum(0), (v * v).sum(0), ac[k])
        if order == 2:
            c0, c1 = np.outer(ar[0], ac[0]), np.outer(ar[1], ac[1])
            v = np.stack([-c0 - c1, -c0 + c1, c0 - c1, c0 + c1])
            best = np.argmin(np.abs(w[None] - v), 0)
            bs = [np.where(best >= 2, 1.0, -1.0), np.where(best % 2 == 1, 1.0, -1.0)]
    return sum(pair(k) for k in range(order)) * m


def ref_masks(w, dj, s, cgb, xsplit, iters):
    """arb-llm.md §5 with num_p = 1: BiLLM salient columns, CGB split (order-2 error on the non-zero |T|
    quantiles), non-salient split (weight-space, or X-weighted with the salient part fixed to ARB₂(T))."""
    t = w**2 / dj[None, :] ** 2
    b = w.shape[1]
    cand = np.argsort(-np.abs(t).sum(0), kind="stable")[: min(50, b)]
    best, cols = np.inf, None
    for k in range(1, min(50, b)):
        sc = np.zeros(b, bool)
        sc[cand[:k]] = True
        e = np.sum((t - ref_braq(t, np.broadcast_to(sc, t.shape), 2) - ref_braq(t, ~np.broadcast_to(sc, t.shape), 2)) ** 2)
        if e < best:
            best, cols = e, sc
    sal = np.broadcast_to(cols, t.shape)
    zones = [sal]
    if cgb:
        v = np.abs(t * sal).ravel()
        best = np.inf
        for p in np.quantile(v[v != 0], np.linspace(0.10, 0.90, 81)):
            c, sp = sal & (np.abs(t) < p), sal & (np.abs(t) >= p)
            e = np.sum((t - ref_braq(t, c, 2) - ref_braq(t, sp, 2)) ** 2 * sal)
            if e < best:
                best, zones = e, [c, sp]
    g3 = ref_arb(t, sal, 2, iters)
    best = np.inf
    for p in np.quantile(np.abs(t * ~sal).ravel(), np.linspace(0.10, 0.90, 81)):
        c, sp = ~sal & (np.abs(t) < p), ~sal & (np.abs(t) >= p)
        r = t - g3 - ref_braq(t, c, 1) - ref_braq(t, sp, 1)
        e = np.trace(r @ s @ r.T) if xsplit else np.sum(r**2)
        if e < best:
            best, split = e, [c, sp]
    return cols, split, zones


@pytest.mark.parametrize("name", ["arb", "arb-x", "arb-rc"])
def test_block_matches_float64_reference(name):
    w, h, d = _block(24, 128, seed=14)  # a block where the X-weighted split and its salient fit matter
    iters, iters_x = 3, 2  # few rounds, so that a wrong update or start point shows
    m = build_method(name, iters=iters, iters_x=iters_x) if name == "arb-x" else build_method(name, iters=iters)
    wd, hd = w.double().numpy(), h.double().numpy()
    cols, ns, sz = ref_masks(wd, d.double().numpy(), hd, m.cgb, name == "arb-x", iters)
    got_cols, got_ns, got_s = m.zones(w, BlockContext(d=d, h=h))
    assert np.array_equal(got_cols.numpy(), cols)
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(got_ns, ns))
    assert len(got_s) == len(sz) and all(np.array_equal(a.numpy(), b) for a, b in zip(got_s, sz))

    def fit(mask, order):
        if name == "arb-rc":
            return ref_rc(wd, mask, order, iters)
        return ref_arb(wd, mask, order, iters, hd, iters_x if name == "arb-x" else 0)

    q_ref = sum(fit(z, 1) for z in ns) + sum(fit(z, 2) for z in sz)
    q = m.quantize_block(w, BlockContext(d=d, h=h)).q.double().numpy()
    np.testing.assert_allclose(q, q_ref, rtol=2e-3, atol=2e-3 * float(w.abs().max()))


# ---- memory: arb-x keeps only B × B Hessian blocks --------------------------------------------------------
def test_arb_x_keeps_nothing_that_grows_with_nsamples():
    torch.manual_seed(2)
    w = torch.randn(32, 200)
    seen: dict[int, set] = {}

    class Spy(A.ArbX):
        def quantize_block(self, w, ctx):
            seen[n].update(tuple(t.shape) for t in (ctx.d, ctx.h))
            seen[n].update(tuple(t.shape) for t in vars(self).values() if isinstance(t, torch.Tensor))
            return super().quantize_block(w, ctx)

    results = {}
    for n in (64, 1024):
        seen[n] = set()
        x = torch.randn(200, n)
        results[n] = quantize_linear(w, 2 * x @ x.T / n, Spy(iters=3, iters_x=3), blocksize=128)
    assert seen[64] == seen[1024] == {(128,), (128, 128), (72,), (72, 72)}
    assert all(t.shape[-1] <= 128 for p in results[64].blocks for t in p.values())


def test_arb_x_uses_s_up_to_scale():
    """The reference's S = mean_b X_bᵀX_b differs from the Hessian block by a constant: same result."""
    w, h, d = _block(24, 96, seed=5)
    m = build_method("arb-x", iters=4, iters_x=4)
    a = m.quantize_block(w, BlockContext(d=d, h=h))
    b = m.quantize_block(w, BlockContext(d=d, h=h * 256))  # a power of two: exact in floating point
    assert torch.equal(a.q, b.q)


# ---- stored form and bit accounting -----------------------------------------------------------------------
CASES = [("arb", {}), ("arb", {"cgb": True}), ("arb-x", {}), ("arb-x", {"cgb": False}), ("arb-rc", {}),
         ("arb-rc", {"cgb": False}), ("arb", {"num_p": 3, "cgb": True, "iters": 2}), ("arb-rc", {"num_p": 2, "iters": 2})]


@pytest.mark.parametrize("name,opts", CASES)
def test_decode_and_storage_bits(name, opts):
    w, h, d = _block(20, 100, seed=11)
    m = build_method(name, iters_x=3, **opts) if name == "arb-x" else build_method(name, **opts)
    r = m.quantize_block(w, BlockContext(d=d, h=h))
    assert torch.equal(m.decode_block(r.params, (20, 100)), r.q)
    assert r.bits.storage == storage_bits(r.params)
    n, b, k = 20, 100, int(r.params["salient_cols"].sum())
    zones = m.num_p + 1
    planes = max(1, (zones - 1).bit_length())
    s_zones = zones if m.cgb else 1
    floats = (zones + 2 * s_zones) + (0 if m.rc else zones + s_zones)
    col = zones * (b - k) + 2 * s_zones * k if m.rc else 0
    hand = n * (b + k) + b + planes * n * (b - k) + (planes * n * k if m.cgb else 0) + 16 * (n * floats + col)
    assert r.bits.storage == hand and r.bits.sign == n * (b + k)


def test_paper_floats_per_row():
    """Storage table: ARB-LLM_X 10 fp16 per row per block, ARB-RC 4 α^r (+6 with CGB), braq layout 7."""
    n, b, k = 4096, 128, 10
    bits = {name: build_method(name, **o).bits(n, b, k).params // 16 for name, o in
            [("arb", {}), ("arb-x", {}), ("arb-rc", {"cgb": False}), ("arb-rc", {})]}
    assert bits["arb"] == 7 * n and bits["arb-x"] == 10 * n
    assert bits["arb-rc"] == 6 * n + 2 * (b - k) + 4 * k
    assert build_method("arb-rc", cgb=False).bits(n, b, k).params // 16 == 4 * n + 2 * b


def test_arb_without_cgb_stores_braq_layout():
    w, h, d = _block(16, 128, seed=4)
    r = build_method("arb").quantize_block(w, BlockContext(d=d, h=h))
    assert torch.equal(braq_decode(r.params, (16, 128)), r.q)
    r0 = build_method("arb", iters=0).quantize_block(w, BlockContext(d=d, h=h))
    rb = build_method("braq").quantize_block(w, BlockContext(d=d, h=h))
    assert all(torch.equal(r0.params[k], rb.params[k]) for k in rb.params if r0.params[k].dtype == torch.bool)


def test_options_and_defaults():
    assert method_options("arb") == dict(iters=15, cgb=False, num_p=1, salient_metric="hessian", up_lim=50)
    assert method_options("arb-x") == dict(iters=15, cgb=True, num_p=1, salient_metric="hessian", up_lim=50, iters_x=15)
    assert method_options("arb-rc")["cgb"] is True and "iters_x" not in method_options("arb-rc")
    with pytest.raises(ValueError):
        build_method("arb", num_p=0)


def test_empty_block_regions_are_harmless():
    w = torch.zeros(8, 16)
    w[:, 0] = 1.0
    for name in ("arb", "arb-x", "arb-rc"):
        m = build_method(name)
        r = m.quantize_block(w, BlockContext(d=torch.ones(16), h=torch.eye(16)))
        assert torch.isfinite(r.q).all() and torch.equal(m.decode_block(r.params, (8, 16)), r.q)
        assert float((r.q - w).abs().max()) < 1e-3
