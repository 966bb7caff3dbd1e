"""The vq method (docs/vq.md): the shipped codebooks' distortion on N(0, 1), group-wise (block LDL) column
feedback against a plain float64 reference, exact storage accounting, decode = fake quant bit for bit, clear
refusals."""

from __future__ import annotations

import math

import pytest
import torch

from onebit.engine.plan import Plan
from onebit.engine.solver import quantize_linear
from onebit.errors import InputError
from onebit.formats.packed import PackedLinear
from onebit.methods import build_method
from onebit.methods.base import decode_linear, storage_bits
from onebit.methods.codebooks import SHIPPED, codebook
from onebit.methods.params import decode_param
from test_feedback import real_hessian

SIGN_MSE = 1 - 2 / math.pi  # sign × the optimal scale on N(0, 1): 1 bit per weight
LLOYD_MAX_2BIT = 0.1175  # the optimal 4-level scalar quantizer of N(0, 1) (Max 1960): 2 bits per weight


def layer(n: int = 24, m: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=g), real_hessian(m, seed).float()


@pytest.mark.parametrize("dim,bits", SHIPPED)
def test_codebooks_beat_scalar_quantizers_at_their_rate(dim, bits):
    """Mean squared error per unit variance on fresh N(0, 1) vectors: below sign's 0.363 at 1 bit per weight,
    decreasing with the rate, below the 2-bit Lloyd–Max quantizer at 2 bits per weight (vector quantization's
    space-filling gain)."""
    book = codebook(dim, bits).double()
    x = torch.randn(8192 * 8 // dim, dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    mse = float((x - book[torch.cdist(x, book).argmin(1)]).square().mean())
    rate = bits / dim
    assert book.shape == (2**bits, dim)
    assert mse < SIGN_MSE * 0.93 ** ((rate - 1) / 0.125), (rate, mse)  # ≥ 7 % less per eighth of a bit
    if rate == 2:
        assert mse < LLOYD_MAX_2BIT


def ref_block_ldlq(w: torch.Tensor, h: torch.Tensor, dim: int, bits: int, block: int, percdamp: float = 0.01):
    """Plain float64 block LDL quantization with fp16 row scales (dead inputs zeroed): per block α = the rows' RMS (fp16-rounded),
    then per group of ``dim`` columns the code minimizing ‖(x − α c) U_g⁻¹‖², found by trying every code, its
    error pushed to every later column at once."""
    w, h = w.double().clone(), h.double().clone()
    m = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.diag(h).mean() * torch.eye(m, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    book = codebook(dim, bits).double()
    q = torch.zeros_like(w)
    for s in range(0, m, block):
        alpha = w[:, s : s + block].square().mean(1, keepdim=True).sqrt().half().double()
        for p in range(s, min(s + block, m), dim):
            ug_inv = torch.linalg.inv(u[p : p + dim, p : p + dim])
            x = w[:, p : p + dim]
            best = [int((((row - a * book) @ ug_inv).square().sum(1)).argmin()) for row, a in zip(x, alpha[:, 0])]
            q[:, p : p + dim] = alpha * book[best]
            w[:, p + dim :] -= (x - q[:, p : p + dim]) @ ug_inv @ u[p : p + dim, p + dim :]
    return q


@pytest.mark.parametrize("dim,bits", [(8, 8), (4, 6)])
def test_column_feedback_matches_a_float64_block_ldl_reference(dim, bits):
    w, h = layer(12, 96)  # input 7 is dead
    res = quantize_linear(w, h, build_method("vq", dim=dim, bits=bits, param_dtype="fp16"), 32, feedback="column",
                          dtype=torch.float64)
    assert torch.equal(res.q, ref_block_ldlq(w, h, dim, bits, 32).float())


def test_group_feedback_lowers_the_output_error():
    """Block LDL feedback against none, and the 12-bit code (1.56 storage bpw) against lean's default tiers
    (1.51) and sign with column feedback (1.25): tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on a real-looking Hessian."""
    w, h = layer(64, 256)
    rel = {fb: quantize_linear(w, h, build_method("vq"), 128, feedback=fb).rel_err for fb in ("column", "none")}
    lean = quantize_linear(w, h, build_method("lean"), 128, feedback="column").rel_err
    sign = quantize_linear(w, h, build_method("sign"), 128, feedback="column").rel_err
    assert rel["column"] < 0.8 * rel["none"]
    assert rel["column"] < lean < sign


@pytest.mark.parametrize("opts", [{}, {"bits": 9, "param_dtype": "fp8", "param_scope": "row"}, {"dim": 4, "bits": 7}])
@pytest.mark.parametrize("feedback", ["block", "column", "none"])
def test_storage_bits_equal_packed_bytes_and_decode_is_exact(opts, feedback):
    w, h = layer(20, 96)
    method = build_method("vq", **opts)
    res = quantize_linear(w, h, method, 64, feedback=feedback)
    dim, bits = method.dim, method.bits
    alpha = {"int8": 8 * 20 + 16 + 8, "fp8": (8 + 16) * 20}[method.param_dtype]
    assert res.bits.storage == sum(storage_bits(b) for b in res.blocks) == 20 * 96 * bits // dim + 2 * alpha
    assert res.bits.sign == 20 * 96 * bits // dim and res.bits.paper_bpw == bits / dim
    assert torch.equal(decode_linear(build_method("vq"), res.blocks, (20, 96), 64), res.q)  # no option needed
    packed = PackedLinear.from_blocks("vq", res.blocks, (20, 96), 64)
    assert packed.exact_bits() == res.bits.storage
    assert torch.equal(packed.dequantize(), res.q)


@pytest.mark.parametrize("opts,kw,match", [
    ({"bits": 13}, {}, "no codebook for dim 8, 13 bits"),
    ({"dim": 3}, {}, "no codebook for dim 3"),
    ({"param_dtype": "int4"}, {}, "param_dtype"),
    ({}, {"act_order": True, "feedback": "column"}, "act_order would split"),
    ({}, {"blocksize": 60}, "not a multiple of dim 8"),
])
def test_refusals(opts, kw, match):
    w, h = layer(8, 120)
    kw = {"blocksize": 64, **kw}
    with pytest.raises(ValueError, match=match):
        quantize_linear(w, h, build_method("vq", **opts), kw.pop("blocksize"), **kw)


@pytest.mark.parametrize("shape,block", [((8, 100), 64), ((8, 128), 60)])
def test_plan_refuses_unfit_linears_before_any_work(shape, block):
    with pytest.raises(InputError, match="codes 8 columns together"):
        Plan("vq", {}, block).start([(0, "mlp.down_proj", shape)])
    Plan("vq", {}, 64).start([(0, "mlp.down_proj", (8, 128))])  # fits


def test_a_zero_row_decodes_to_zeros():
    w, h = layer(6, 64)
    w[2] = 0
    res = quantize_linear(w, h, build_method("vq", bits=9), 64, feedback="column")
    assert torch.equal(res.q[2], torch.zeros(64)) and res.q[1].abs().sum() > 0
