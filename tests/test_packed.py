"""Packed checkpoints: bit packing, pack → unpack exactness for every method, packed forward (C++ kernel and
reference) against the dense product, clear errors for damaged checkpoints, transformers round trip (GGUF: tests/test_gguf.py)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from conftest import random_ids, tiny_model
from onebit import QuantConfig, quantize
from onebit.engine.solver import quantize_linear
from onebit.formats.bitpack import pack_bits, unpack_bits
from onebit.engine.plan import fixed_block
from onebit.export.packed import PackCollector, save_packed
from onebit.formats.checkpoint import load_packed, measured_bpw
from onebit.formats.packed import UNPACKABLE, PackedFormatError, PackedLinear, check_packable, from_tiles, to_tiles
from onebit.formats.repack import repack_linear
from onebit.methods import available_methods, build_method
from onebit.methods.base import storage_bits
from onebit.models import get_adapter
from onebit.nn import OnebitLinear, kernels, packed_modules, set_dense_cache

PACKABLE = [m for m in available_methods() if m not in UNPACKABLE]
FAST = settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def block_and_width(method: str, m: int, block: int) -> tuple[int, int]:
    """A fixed-block method (a GGUF type) takes its own block and whole blocks only: 1 or 2 of them."""
    fixed = fixed_block(method)
    if fixed is None:  # a vector code (vq) takes whole groups of columns
        return block, m - m % getattr(build_method(method), "column_group", 1)
    return fixed, fixed * (1 + m % 2)


@lru_cache(maxsize=None)
def quantized(method: str, n: int, m: int, block: int, seed: int = 0, options: tuple = ()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, m, generator=g)
    x = torch.randn(4 * m, m, generator=g)
    return quantize_linear(w, x.T @ x / x.shape[0], build_method(method, **dict(options)), block)


# case → (method, options, the kernel layout its stored form gets): every layout, every method that has one
KERNEL_CASES = {
    "sign": ("sign", (), 0), "braq": ("braq", (), 1), "arb": ("arb", (), 1), "arb-x-nocgb": ("arb-x", (("cgb", False),), 1),
    "arb-rc": ("arb-rc", (), 2), "arb-cgb": ("arb", (("cgb", True),), 3), "arb-x": ("arb-x", (), 3),
}


# ---- bit packing ----------------------------------------------------------------------------------------
def test_pack_bits_is_lsb_first():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [0b00000001, 0b10000010, 0b00000001]


@FAST
@given(st.integers(0, 200), st.integers(0, 2**31))
def test_pack_unpack_bits_roundtrip(n, seed):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    packed = pack_bits(bits)
    assert packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), bits)


def test_row_tiles_by_hand():
    """Row-wise tensors are stored in 16-row tiles, column-major inside a tile, the short last tile likewise."""
    n, d = 20, 3
    t = torch.arange(n * d).view(n, d)
    flat = to_tiles(t)
    # tile 0: column 0 of rows 0..15, then column 1, ...; tile 1 (rows 16..19): column 0, column 1, ...
    want = [r * d + c for c in range(d) for r in range(16)] + [r * d + c for c in range(d) for r in range(16, 20)]
    assert flat.tolist() == want
    assert torch.equal(from_tiles(flat, n, d), t)
    for shape in ((0, 3), (20, 0), (32, 0), (16, 2)):  # empty tensors (a block without salient columns)
        e = torch.ones(shape, dtype=torch.bool)
        assert torch.equal(from_tiles(to_tiles(e), *shape), e)


# ---- pack → unpack is exact for every method -------------------------------------------------------------
@pytest.mark.parametrize("method", PACKABLE)
@FAST
@given(n=st.integers(1, 25), m=st.integers(16, 200), block=st.sampled_from([128, 64, 40]))
def test_pack_unpack_bit_exact(method, n, m, block):
    block, m = block_and_width(method, m, block)
    res = quantized(method, n, m, block)
    packed = PackedLinear.from_blocks(method, res.blocks, (n, m), block)
    assert torch.equal(packed.dequantize(), res.q)
    for got, want in zip(packed.blocks(), res.blocks):
        assert list(got) == list(want)
        for k in want:
            assert got[k].dtype == (torch.bool if want[k].dtype == torch.bool else torch.float16)
            assert torch.equal(got[k].float(), want[k].float())
    assert packed.exact_bits() == res.bits.storage == sum(storage_bits(b) for b in res.blocks)
    assert 0 <= packed.payload_bytes() * 8 - packed.exact_bits() < 8  # one bit stream: < 1 byte of padding


def test_packed_linear_keeps_its_method_options():
    """rtn at 2 bits decodes with its options (the manifest records them per module), not rtn's default 4."""
    res = quantized("rtn", 21, 200, 64, options=(("bits", 2),))
    packed = PackedLinear.from_blocks("rtn", res.blocks, (21, 200), 64, {"bits": 2})
    assert packed.manifest()["options"] == {"bits": 2}
    assert torch.equal(packed.dequantize(), res.q)
    assert torch.equal(OnebitLinear.from_packed(packed).dequantize(), res.q)


def test_identity_is_not_packable():
    with pytest.raises(PackedFormatError, match="cannot be packed"):
        check_packable("identity")


# ---- packed forward ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", PACKABLE)
def test_packed_forward_equals_dense(method):
    block, m = block_and_width(method, 200, 64)
    n = 21
    res = quantized(method, n, m, block)
    bias = torch.randn(n)
    mod = OnebitLinear.from_packed(PackedLinear.from_blocks(method, res.blocks, (n, m), block), bias)
    for tokens in (1, 7, 16, 33):  # the packed kernel where the layout has one, else the dense path
        x = torch.randn(2, tokens, m)
        ref = (x.double() @ res.q.double().T + bias.double()).float()  # float64 reference of y = Ŵx + b
        torch.testing.assert_close(mod(x), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mod.reference_forward(x), ref, atol=1e-4, rtol=1e-4)


def test_token_limit_and_dense_cache():
    """Above ``kernel_max_tokens`` the reference path runs; with the dense cache on it keeps the decoded Ŵ,
    and later calls (any size) reuse it."""
    res = quantized("braq", 21, 200, 64)
    mod = OnebitLinear.from_packed(PackedLinear.from_blocks("braq", res.blocks, (21, 200), 64))
    mod.kernel_max_tokens = 4
    set_dense_cache(mod)
    x = torch.randn(9, 200)
    assert not mod.kernel_ok(9, x) and mod._dense is None
    torch.testing.assert_close(mod(x), (x.double() @ res.q.double().T).float(), atol=1e-4, rtol=1e-4)
    assert torch.equal(mod._dense, res.q)
    assert not mod.kernel_ok(1, x[:1])  # cached Ŵ: the dense product from now on
    set_dense_cache(mod, False)
    assert mod._dense is None


@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
@pytest.mark.parametrize("n, m, block", [(21, 200, 64), (48, 256, 128), (40, 384, 128)])
def test_kernel_is_used_and_matches(case, n, m, block):
    """Odd shapes (unaligned words), whole 16-row tiles at aligned offsets (one-load words) and a short last
    tile, for 1 to 16 tokens (token passes of 8, 4 and 1)."""
    if kernels.extension() is None:
        pytest.skip("C++ extension could not be built here")
    method, options, layout_id = KERNEL_CASES[case]
    res = quantized(method, n, m, block, options=options)
    mod = OnebitLinear.from_packed(PackedLinear.from_blocks(method, res.blocks, (n, m), block))
    assert mod._layout_id == layout_id
    for tokens in (1, 3, 13, 16):
        x = torch.randn(tokens, m)
        assert mod.kernel_ok(tokens, x)
        y = kernels.packed_gemm(x, mod.packed_bits, mod.packed_fp16, mod._table, n, mod._layout_id)
        torch.testing.assert_close(y, (x.double() @ res.q.double().T).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_portable_kernel_matches(case):
    """The non-AVX-512 build (what machines without AVX-512 compile) against the dense product."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable build targets x86-64-v2")
    ext = kernels.build("x86-64-v2")
    assert not ext.has_avx512()
    method, options, _ = KERNEL_CASES[case]
    res = quantized(method, 19, 333, 128, options=options)
    mod = OnebitLinear.from_packed(PackedLinear.from_blocks(method, res.blocks, (19, 333), 128))
    for tokens in (1, 5, 13):
        x = torch.randn(tokens, 333)
        y = ext.packed_gemm(x, mod.packed_bits, mod.packed_fp16, mod._table, 19, mod._layout_id)
        torch.testing.assert_close(y, F.linear(x, res.q), atol=1e-4, rtol=1e-4)


def test_kernel_refuses_row_tile_collision():
    """arb-rc's per-column ``alpha_c`` is 2 × (w − k): in a 2-row linear the format stores it in row tiles,
    which the kernel does not read that way, so such a linear takes the reference path (still exact)."""
    res = quantized("arb-rc", 2, 200, 64)
    mod = OnebitLinear.from_packed(PackedLinear.from_blocks("arb-rc", res.blocks, (2, 200), 64))
    assert mod._layout_id is None
    three = quantized("arb-rc", 3, 200, 64)  # 3 rows: no collision, the kernel
    assert OnebitLinear.from_packed(PackedLinear.from_blocks("arb-rc", three.blocks, (3, 200), 64))._layout_id == 2
    x = torch.randn(3, 200)
    torch.testing.assert_close(mod(x), (x.double() @ res.q.double().T).float(), atol=1e-4, rtol=1e-4)


def test_kernel_reads_any_parameter_order():
    """Checkpoints whose blocks list the parameters in another order (e.g. sorted by name) still use the
    kernel, which finds every stream by name, and give the same product."""
    if kernels.extension() is None:
        pytest.skip("C++ extension could not be built here")
    res = quantized("braq", 21, 200, 64)
    shuffled = [dict(sorted(b.items())) for b in res.blocks]
    assert list(shuffled[0]) != list(res.blocks[0])
    mod = OnebitLinear.from_packed(PackedLinear.from_blocks("braq", shuffled, (21, 200), 64))
    x = torch.randn(2, 200)
    assert mod.kernel_ok(2, x)
    torch.testing.assert_close(mod(x), F.linear(x, res.q), atol=1e-4, rtol=1e-4)


TRITON_CHECK = r"""
import sys, torch
from torch.nn import functional as F
from onebit.engine.solver import quantize_linear
from onebit.formats.packed import PackedLinear
from onebit.methods import build_method
from onebit.nn import OnebitLinear
from onebit.nn.triton_gemv import column_ranks, packed_gemm_triton

method = sys.argv[1]
g = torch.Generator().manual_seed(0)
for n, m, block, tokens in ((19, 333, 128, 1), (40, 200, 64, 3)):
    w, xs = torch.randn(n, m, generator=g), torch.randn(4 * m, m, generator=g)
    res = quantize_linear(w, xs.T @ xs / xs.shape[0], build_method(method), block)
    mod = OnebitLinear.from_packed(PackedLinear.from_blocks(method, res.blocks, (n, m), block))
    x = torch.randn(tokens, m, generator=g)
    ranks = column_ranks(mod._table, mod.packed_bits, m)
    y = packed_gemm_triton(x, mod.packed_bits, mod.packed_fp16, mod._table, ranks, n, mod._layout_id, block, 16)
    torch.testing.assert_close(y, F.linear(x, res.q), atol=1e-4, rtol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("method", sorted(m for m, opts, lid in KERNEL_CASES.values()
                                           if lid in kernels.TRITON_LAYOUTS and not opts))
def test_triton_kernel_matches(method):
    """The CUDA kernel's code, run by Triton's interpreter on CPU tensors (a fresh process: the interpreter
    must be chosen before triton is first imported), against the dense product."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", TRITON_CHECK, method], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


# ---- checkpoints ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    """A packed braq checkpoint of a tiny llama, with the fake-quant model's logits."""
    model = tiny_model("llama", 1)
    ids = random_ids(2, 24)
    col = PackCollector(get_adapter(model))
    res = quantize(model, QuantConfig(method="braq"), ids, on_layer=col)
    with torch.no_grad():
        logits = model(ids).logits
    d = tmp_path_factory.mktemp("packed")
    save_packed(model, d, col.packed, "braq", {}, 128, res.bits)
    return d, ids, logits, res


def test_from_pretrained_roundtrip(packed_dir):
    from transformers import AutoModelForCausalLM

    d, ids, logits, _ = packed_dir
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, OnebitLinear) and not hasattr(q, "weight")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, atol=2e-4, rtol=1e-4)  # the packed kernel
        for mod in packed_modules(model).values():
            mod.use_kernel = False
        torch.testing.assert_close(model(ids).logits, logits, atol=0, rtol=0)  # reference path: exact
    out = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_measured_bpw_equals_report(packed_dir):
    d, _, _, res = packed_dir
    m = measured_bpw(d)
    assert m["storage_bpw_measured"] == pytest.approx(res.bits.storage_bpw, abs=0)
    assert m["padding_bits"] == 0
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "onebit" and qc["format_version"] == 2 and qc["method"] == "braq"
    assert qc["storage"]["storage_bpw_report"] == res.bits.storage_bpw


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _load(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d)


def _assert_refused(d: Path, match: str) -> None:
    """Both readers (``load_packed`` and transformers' loader) refuse ``d`` with a message matching ``match``."""
    for read in (load_packed, _load):
        with pytest.raises(PackedFormatError, match=match):
            read(d)


def test_truncated_checkpoint_is_refused(packed_dir, tmp_path):
    d = _copy(packed_dir[0], tmp_path / "t")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _assert_refused(d, "truncated")


def test_corrupted_checkpoint_is_refused(packed_dir, tmp_path):
    from safetensors import safe_open

    d = _copy(packed_dir[0], tmp_path / "c")
    f = d / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        key = "model.layers.0.mlp.down_proj.packed_bits"
        target = h.get_tensor(key)[:16].numpy().tobytes()
    raw = bytearray(f.read_bytes())
    pos = raw.find(target)
    raw[pos + 3] ^= 0x10  # one flipped bit in a sign plane
    f.write_bytes(bytes(raw))
    _assert_refused(d, "CRC32")


def test_wrong_version_is_refused(packed_dir, tmp_path):
    d = _copy(packed_dir[0], tmp_path / "v")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    _assert_refused(d, "format version 99")


def test_shape_mismatch_is_refused(packed_dir, tmp_path):
    d = _copy(packed_dir[0], tmp_path / "s")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PackedFormatError, match="shape mismatch"):
        _load(d)


# ---- onebit pack (after the fact) --------------------------------------------------------------------------
def test_repack_sign_exact_and_braq_refused():
    res = quantized("sign", 21, 200, 64)
    packed = repack_linear("sign", res.q, 64)
    assert torch.equal(packed.dequantize(), res.q)
    assert packed.exact_bits() == res.bits.storage
    with pytest.raises(PackedFormatError, match="save-packed"):
        repack_linear("braq", quantized("braq", 21, 200, 64).q, 64)
