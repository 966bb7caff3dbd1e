"""GGUF export: GGUF-type methods (methods/ggml.py) written bit-exactly (checked against gguf's own numpy
decoder), the per-linear fallback plan, transformers reloading the file to the same logits, the Q1_0
projection of other methods, atomic writes and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_tiny_data
from onebit.cli import app
from onebit.config import QuantConfig
from onebit.engine.plan import LinearPlan, Plan
from onebit.engine.solver import quantize_linear
from onebit.formats.ggml import dequantize, dequantize_q1_0, to_gguf_bytes
from onebit.methods import build_method

GGUF_METHODS = ("q1_0", "tq1_0", "tq2_0", "q2_k", "q4_0", "q8_0", "f16")
BPW = {"q1_0": 1.125, "tq1_0": 1.6875, "tq2_0": 2.0625, "q2_k": 2.625, "q4_0": 4.5, "q8_0": 8.5, "f16": 16.0}
runner = CliRunner()


def hessian(m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * m, m, generator=g) * torch.exp(torch.randn(m, generator=g))
    return 2 * x.T @ x / x.shape[0]


def same_bits(a: np.ndarray, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of float32 arrays (the sign of zero included)."""
    return np.array_equal(np.ascontiguousarray(a, dtype=np.float32).view(np.uint32), b.float().numpy().view(np.uint32))


# ---- each type: stored form → bytes → gguf's decoder, bit-exact ----------------------------------------------
@pytest.mark.parametrize("method", GGUF_METHODS)
@pytest.mark.parametrize("feedback", ["block", "column"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bytes_decode_to_the_quantized_weights(method, feedback, seed):
    m_obj = build_method(method)
    block = getattr(m_obj, "block_size", None) or 64
    g = torch.Generator().manual_seed(seed)
    n, nblocks = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
    w = torch.randn(n, nblocks * block, generator=g) * 0.02
    w[0, : block // 2] = 0  # a zero run: zero scales and zero codes
    res = quantize_linear(w, hessian(w.shape[1], seed), m_obj, block, feedback=feedback)
    raw = to_gguf_bytes(m_obj.gguf_type, res.blocks)
    assert same_bits(dequantize(raw, m_obj.gguf_type).reshape(w.shape), res.q)
    assert raw.nbytes * 8 == res.bits.storage  # onebit's stored bits are the GGUF bytes
    assert res.bits.storage_bpw == BPW[method]


def test_q1_0_block_layout_by_hand():
    """Bit j % 8 of byte 2 + j // 8 is weight j's sign (set: +d), after the fp16 d; both decoders agree."""
    signs = torch.zeros(1, 128, dtype=torch.bool)
    signs[0, [0, 9, 127]] = True
    d = torch.tensor([[0.375]], dtype=torch.float16)
    raw = to_gguf_bytes("Q1_0", [{"signs": signs, "d": d}])
    expected = bytearray(np.float16(0.375).tobytes()) + bytearray(16)
    expected[2 + 0] |= 1
    expected[2 + 1] |= 1 << 1
    expected[2 + 15] |= 1 << 7
    assert raw.tobytes() == bytes(expected)
    want = torch.where(signs, 0.375, -0.375)
    assert same_bits(dequantize_q1_0(raw), want)
    assert same_bits(dequantize(raw, "Q1_0"), want)  # gguf's decoder where it has one, else onebit's


@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0"])
def test_trit_packing_matches_gguf_quantizer(qtype):
    """For ternary values d·{−1, 0, 1}, gguf's own quantizer writes the same bytes as onebit's stored form."""
    method = build_method(qtype.lower())
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 3, (5, 256), generator=g)
    codes[:, 0] = 2  # max |w| = d: gguf's d is then exactly ours
    params = method.encode(codes, torch.full((5, 1), 0.25, dtype=torch.float16))
    import gguf

    want = gguf.quants.quantize((0.25 * (codes - 1)).float().numpy(), gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(to_gguf_bytes(qtype, [params]), want)


# ---- the per-linear plan --------------------------------------------------------------------------------------
def test_plan_falls_back_as_llama_cpp():
    plan = QuantConfig(method="q2_k").plan()
    assert plan.fallback == "q4_0"
    assert plan.resolve(0, "mlp.down_proj", (576, 1536)) == LinearPlan("q2_k", 256)
    assert plan.resolve(0, "self_attn.q_proj", (576, 576)) == LinearPlan("q4_0", 32)  # SmolLM2's width
    assert plan.resolve(0, "x", (8, 600)) == LinearPlan("f16", 128)  # not even 32 divides 600: F16
    assert QuantConfig(method="q1_0", fallback="q8_0").plan().resolve(0, "x", (8, 576)) == LinearPlan("q8_0", 32)
    assert QuantConfig(method="q1_0", fallback="f16", blocksize=64).plan().resolve(0, "x", (8, 576)) == LinearPlan("f16", 64)
    with pytest.raises(ValueError, match="no fallback"):
        QuantConfig(method="tq2_0", fallback="none").plan().resolve(3, "x", (8, 576))
    braq = QuantConfig(method="braq", blocksize=64)
    assert braq.plan().resolve(0, "x", (8, 576)) == LinearPlan("braq", 64, braq.method_options)
    assert "fallback" not in braq.to_dict()  # earlier runs keep their fingerprints
    with pytest.raises(ValueError, match="fixed block"):
        QuantConfig(method="braq", fallback="q4_0")
    with pytest.raises(ValueError, match="blocksize 256"):
        quantize_linear(torch.randn(4, 256), torch.eye(256), build_method("q2_k"), 128)
    assert Plan("rtn", {"bits": 2}, 32).resolve(0, "x", (4, 40)) == LinearPlan("rtn", 32, {"bits": 2})


# ---- end to end: a tiny llama through `onebit quantize` and `onebit export-gguf` -------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-layer llama, hidden 256 (every 256-/128-block type divides it), intermediate 288 (down_proj falls
    back to q4_0), with a byte-level BPE tokenizer (what GGUF's gpt2 vocabulary needs); a tiny data dir."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("gguf")
    tk = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=288, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(root / "model")
    return root / "model", write_tiny_data(root / "data"), root


def quantize_run(setup, name: str, *args: str) -> Path:
    model_dir, data, root = setup
    out = root / name
    res = runner.invoke(app, ["quantize", str(model_dir), "--calib", "wikitext2", "--nsamples", "4", "--seqlen", "64",
                              "--eval", "", "--no-fp-eval", "--data-dir", str(data), "--device", "cpu", "--out", str(out),
                              *args])
    assert res.exit_code == 0, res.output
    return out


def export(src: Path, out: Path, *args: str) -> str:
    res = runner.invoke(app, ["export-gguf", str(src), str(out), *args])
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())  # rich wraps long lines


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", ["q1_0", "tq1_0", "tq2_0", "q2_k"])
def test_export_is_the_measured_model(setup, method):
    """Every linear of the GGUF decodes (gguf's decoder) to the run's fake-quant weight bit for bit; transformers
    loads the file to the same logits (Q1_0: gguf 0.19 cannot decode it, so onebit's reader loads it)."""
    from transformers import AutoModelForCausalLM

    from onebit.export.gguf import load_gguf_model, read_gguf

    run = quantize_run(setup, method, "--method", method, "--save")
    out = run / f"{method}.gguf"
    text = export(run, out)
    assert "mlp.down_proj (in 288): Q4_0 (q4_0, block 32) ×2" in text
    assert f"self_attn.q_proj (in 256): {build_method(method).gguf_type} ({method}" in text
    fake = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    got = read_gguf(out, fake.config)
    for name, w in fake.state_dict().items():
        assert same_bits(got[name].numpy(), w), name
    if method == "q1_0":
        with pytest.raises(NotImplementedError, match="Q1_0"):
            AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name)
        gguf_model = load_gguf_model(out, run / "model")
    else:
        gguf_model = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(gguf_model), logits(fake), rtol=1e-5, atol=1e-5)


def test_packed_checkpoint_exports_the_same_tensors(setup, tmp_path):
    """A q2_k run (block feedback) packed with --save-packed (per-module method, block and options in the
    manifest) exports the same GGUF tensors as the run directory itself."""
    import gguf

    run = quantize_run(setup, "q2k-packed", "--method", "q2_k", "--feedback", "block", "--save-packed",
                       str(tmp_path / "packed"))
    export(run, tmp_path / "a.gguf")
    export(tmp_path / "packed", tmp_path / "b.gguf")
    a, b = (gguf.GGUFReader(str(tmp_path / f"{x}.gguf")) for x in "ab")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type and np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name


def test_transformed_run_exports_its_folded_norms(setup, tmp_path):
    """A --transform dbell run folds scales into the norms: refused without --save, else the GGUF carries the
    run's norms (not the original model's) and reloads to the run's logits."""
    from transformers import AutoModelForCausalLM

    args = ("--method", "tq2_0", "--transform", "dbell", "--ltdb-epochs", "2")
    res = runner.invoke(app, ["export-gguf", str(quantize_run(setup, "dbell-nosave", *args)), str(tmp_path / "x.gguf")])
    assert res.exit_code != 0 and "--save" in res.output and not (tmp_path / "x.gguf").exists()
    run = quantize_run(setup, "dbell", *args, "--save")
    export(run, tmp_path / "d.gguf")
    fake = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    orig = AutoModelForCausalLM.from_pretrained(setup[0])
    key = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(fake.state_dict()[key], orig.state_dict()[key])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="d.gguf", dtype=torch.float32).eval()
    assert torch.equal(loaded.state_dict()[key], fake.state_dict()[key])
    torch.testing.assert_close(logits(loaded), logits(fake), rtol=1e-5, atol=1e-5)


def test_seed_method_is_projected_with_its_measured_perplexity(setup, tmp_path):
    """braq has no GGUF type: Q1_0 projection of Ŵ (F16 where 128 does not divide the row), a warning with
    the projection's perplexity, measured on the reloaded file."""
    from transformers import AutoModelForCausalLM

    from onebit.export.gguf import project_q1_0, read_gguf

    run = quantize_run(setup, "braq", "--method", "braq", "--save")
    text = export(run, tmp_path / "p.gguf", "--eval", "wikitext2", "--eval-seqlen", "32", "--eval-windows", "1",
                  "--data-dir", str(setup[1]), "--device", "cpu")
    assert "warning" in text and "projected onto Q1_0/F16" in text and "the projection's perplexity: wikitext2" in text
    fake = AutoModelForCausalLM.from_pretrained(run / "model")
    got = read_gguf(tmp_path / "p.gguf", fake.config)
    for i in range(2):
        w = fake.state_dict()[f"model.layers.{i}.mlp.up_proj.weight"]
        assert same_bits(dequantize_q1_0(project_q1_0(w)), got[f"model.layers.{i}.mlp.up_proj.weight"])
        down = fake.state_dict()[f"model.layers.{i}.mlp.down_proj.weight"]
        assert torch.equal(got[f"model.layers.{i}.mlp.down_proj.weight"], down.half().float())


# ---- safety ---------------------------------------------------------------------------------------------------
def test_failed_export_leaves_no_file(setup, tmp_path, monkeypatch):
    """A write that dies half way leaves neither a partial .gguf nor a temporary file; an existing file stays."""
    import gguf

    run = quantize_run(setup, "atomic", "--method", "q4_0")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")

    def die(self, *a, **k):
        self.fout[0].write(b"partial tensor data")
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", die)
    res = runner.invoke(app, ["export-gguf", str(run), str(out)])
    assert res.exit_code != 0 and "disk full" in res.output
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_bad_input_is_one_clear_message(setup, tmp_path):
    for src, msg in ((tmp_path, "neither a run directory"),
                     (quantize_run(setup, "a8", "--method", "q4_0", "--act-bits", "8"), "act-bits")):
        res = runner.invoke(app, ["export-gguf", str(src), str(tmp_path / "x.gguf")])
        assert res.exit_code != 0 and msg in res.output and "Traceback" not in res.output
        assert not (tmp_path / "x.gguf").exists()
