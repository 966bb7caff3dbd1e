"""GGUF export for llama.cpp: lossless for linears quantized with a GGUF block type, a projection otherwise.

A linear whose method stores a GGML block type (methods/ggml.py: q1_0, tq1_0, tq2_0, q2_k and the fallbacks
q4_0, q8_0, f16) is written in that type, its bytes built from the stored codes and parameters
(``formats.ggml``), and checked against gguf's numpy decoder (``gguf.quants.dequantize``; onebit's own for
Q1_0, which gguf 0.19 cannot decode): the file holds exactly the weights the run measured. A linear of any
other method (braq, arb, …: groups, means, a second plane) has no GGML type; its dequantized Ŵ is projected
onto Q1_0 per 128-block (d = mean |Ŵ|, bits = Ŵ > 0), or written as F16 where 128 does not divide its rows:
lossy, and the summary says so per tensor.

Embeddings and lm_head are written in ``float_type`` ("auto": F16 where every value is exactly an fp16, else
F32 — no loss either way); norms in F32 (llama.cpp keeps 1-D tensors in F32). Architecture: the llama family
(llama, mistral), q/k rows permuted to llama.cpp's rotary layout (as its converter does); tokenizer: byte-level
BPE (``tokenizer.json``, e.g. SmolLM2, Llama-3, Qwen). The file is written to a temporary name, fsynced and
renamed: a failed or killed export never leaves a partial file. ``read_gguf`` decodes a file back to HF
tensors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, MissingFileError, UnsupportedModelError
from ..files import atomic_output
from ..engine.plan import LinearPlan
from ..formats.ggml import dequantize, to_gguf_bytes
from ..methods.base import method_class

QK1 = 128
LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
FLOAT_TYPES = ("auto", "f32", "f16", "q8_0")


@dataclass
class ExportLinear:
    """A quantized linear to export: HF module ``name``, its ``plan``, ``shape``, and readers of its stored
    ``blocks`` and of the ``weight`` Ŵ the model computes with."""

    name: str
    plan: LinearPlan
    shape: tuple[int, int]
    blocks: Callable[[], list[dict[str, Tensor]]]
    weight: Callable[[], Tensor]

    @property
    def gguf_type(self) -> str | None:
        return getattr(method_class(self.plan.method), "gguf_type", None)


@dataclass
class ExportSource:
    """What an export reads: ``model_dir`` (config.json, tokenizer), the quantized ``linears`` by HF name,
    ``read`` for every other tensor by HF name, and the run's ``report`` (None for a packed checkpoint)."""

    model_dir: Path
    linears: dict[str, ExportLinear]
    read: Callable[[list[str]], dict[str, Tensor]]
    report: dict[str, Any] | None = None


def run_source(run_dir: str | Path) -> ExportSource:
    """A finished ``onebit quantize --out RUN``: linears from its layer checkpoints (each with the method and
    block size it was quantized with), other tensors from the run's saved model (``--save``: needed when a
    transform folded scales into norms or weights) or else the original model."""
    from ..config import QuantConfig
    from ..engine.checkpoint import LayerCheckpoint, run_settings
    from ..engine.store import StreamedModel
    from ..report import load_report

    run_dir = Path(run_dir)
    report = load_report(run_dir)
    cfg = report["config"]
    if cfg.get("act_bits") is not None:
        raise InputError(f"{run_dir}: the run quantized activations (--act-bits {cfg['act_bits']}); GGUF holds weights "
                         "only, so the exported model would not be the one measured")
    if cfg.get("rotate_down"):
        raise InputError(f"{run_dir}: --rotate-down needs an online Hadamard on down_proj's input, which GGUF cannot "
                         "express: quantize without --rotate-down to export")
    saved = run_dir / "model"
    if cfg.get("transform", "none") != "none" and not (saved / "config.json").exists():
        raise InputError(f"{run_dir}: a --transform {cfg['transform']} run changed tensors outside the linears (norms); "
                         "export needs the run's saved model (quantize with --save)")
    model_dir = saved if (saved / "config.json").exists() else Path(report["model"])
    streamed = StreamedModel(model_dir)
    ckpt = LayerCheckpoint(run_dir / "layers", run_settings(report["model"], cfg, report["calibration"],
                                                             report["versions"]["onebit"]))
    ckpt.bind(QuantConfig.from_dict(cfg).plan())

    def load(idx: int, weights: bool) -> tuple[dict[str, Tensor], dict[str, Any]]:
        got = ckpt.load(idx, weights)
        if got is None:
            raise MissingFileError(f"{ckpt.path(idx)}: missing, unreadable or from another run: cannot export layer {idx}")
        return got

    layer_weights = lru_cache(maxsize=1)(lambda idx: load(idx, True)[0])  # the export walks layer by layer
    linears = {}
    prefix = streamed.adapter.layers
    for idx in range(len(streamed.adapter.decoder_layers(streamed.model))):
        for rec in load(idx, False)[1]["linears"]:
            name = rec["name"]
            linears[f"{prefix}.{idx}.{name}"] = ExportLinear(
                f"{prefix}.{idx}.{name}", ckpt.linear_plan(idx, rec), tuple(rec["shape"]),
                lambda idx=idx, name=name: ckpt.blocks(idx, name), lambda idx=idx, name=name: layer_weights(idx)[name])
    return ExportSource(model_dir, linears, streamed.read, report)


def packed_source(model_dir: str | Path) -> ExportSource:
    """A packed checkpoint (``--save-packed`` / ``onebit pack``): linears from its packed tensors."""
    from safetensors import safe_open

    from ..formats.checkpoint import WEIGHTS_FILE, load_packed

    model_dir = Path(model_dir)
    qc, packed = load_packed(model_dir)
    online = [k for k, e in qc["modules"].items() if "input_transform" in e]
    if online:
        raise InputError(f"{len(online)} linears (e.g. {online[0]}) need an online input transform (--rotate-down), "
                         "which GGUF cannot express: quantize without --rotate-down to export")
    linears = {name: ExportLinear(name, LinearPlan(p.method, p.block_size, p.options), p.shape, p.blocks, p.dequantize)
               for name, p in packed.items()}

    def read(names: list[str]) -> dict[str, Tensor]:
        with safe_open(str(model_dir / WEIGHTS_FILE), framework="pt") as f:
            keys = set(f.keys())
            return {n: f.get_tensor(n).float() for n in names if n in keys}

    return ExportSource(model_dir, linears, read)


def open_source(path: str | Path) -> ExportSource:
    """A run directory (report.json + layers/) or a packed checkpoint (config.json with a quantization_config)."""
    path = Path(path)
    if (path / "report.json").exists() and (path / "layers").is_dir():
        return run_source(path)
    if (path / "config.json").exists():
        return packed_source(path)
    raise MissingFileError(f"{path} is neither a run directory (report.json and layers/ from `onebit quantize --out`) "
                            "nor a packed checkpoint (`onebit quantize --save-packed`)")


def project_q1_0(w: Tensor) -> np.ndarray:
    """Q1_0 projection of a dense (n, m) weight: per 128-block fp16 d = mean |w|, sign bits of w > 0."""
    n, m = w.shape
    blocks = w.float().reshape(n, m // QK1, QK1)
    d = blocks.abs().mean(-1).to(torch.float16).numpy().astype("<f2")
    bits = np.packbits((blocks > 0).numpy(), axis=-1, bitorder="little")
    return np.concatenate([d[..., None].view(np.uint8), bits], -1).reshape(n, -1)


def permute_qk(w: Any, n_head: int, inverse: bool = False) -> Any:
    """llama.cpp's rotary row order for q/k rows (``inverse`` undoes it); torch or numpy, rows first."""
    rows = w.shape[0]
    shape = (n_head, rows // n_head // 2, 2) if inverse else (n_head, 2, rows // n_head // 2)
    return w.reshape(*shape, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(cfg: Any, module: str) -> int | None:
    if module == "self_attn.q_proj":
        return cfg.num_attention_heads
    if module == "self_attn.k_proj":
        return cfg.num_key_value_heads or cfg.num_attention_heads
    return None


def _write_tokenizer(writer: Any, model_dir: Path) -> None:
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(model_dir)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
        raise InputError(f"{model_dir}: GGUF export needs a byte-level BPE tokenizer (tokenizer.json or vocab.json; "
                         f"SmolLM2, Llama-3, Qwen): {e}") from None
    tokens, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text)
        types.append(ttype)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def _write_metadata(writer: Any, cfg: Any, file_type: str) -> None:
    import gguf

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(cfg.model_type)  # transformers reads a llama-architecture file named "mistral" as mistral
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{file_type}"])


def _float_tensor(t: Tensor, float_type: str) -> tuple[np.ndarray, Any, str]:
    """(data, raw dtype or None, type name) of an embedding/head tensor in ``float_type``."""
    import gguf

    if float_type == "auto":
        float_type = "f16" if torch.equal(t.half().float(), t.float()) else "f32"
    if float_type == "q8_0":
        return gguf.quants.quantize(t.float().numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0, "Q8_0"
    return (t.half().numpy(), None, "F16") if float_type == "f16" else (t.float().numpy(), None, "F32")


def _linear_tensor(lin: ExportLinear) -> tuple[np.ndarray, str, bool]:
    """(GGUF data, type name, exact) of one linear: its own type, verified bit-exact against gguf's decoder
    and the model's Ŵ; or, for a method without a GGML type, the Q1_0 (or F16) projection of Ŵ."""
    w = lin.weight().float()
    if lin.gguf_type is None:
        return (project_q1_0(w), "Q1_0", False) if lin.shape[1] % QK1 == 0 else (w.half().numpy(), "F16", False)
    raw = to_gguf_bytes(lin.gguf_type, lin.blocks())
    back = dequantize(raw, lin.gguf_type).reshape(lin.shape)
    if not np.array_equal(back.view(np.uint32), w.numpy().view(np.uint32)):
        raise RuntimeError(f"{lin.name}: the {lin.gguf_type} bytes decode to other weights than the model's "
                           f"(max |Δ| {np.abs(back - w.numpy()).max():.3g}); not exported")
    return raw, lin.gguf_type, True


def export_gguf(source: ExportSource, out_path: str | Path, float_type: str = "auto") -> dict[str, Any]:
    """Write ``out_path`` (atomically) from ``source``; returns a summary: one row per linear (type, method,
    block, exact or projected), bytes and bpw of the linears as written, the file size."""
    import gguf
    from transformers import AutoConfig

    if float_type not in FLOAT_TYPES:
        raise InputError(f"float type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    cfg = AutoConfig.from_pretrained(source.model_dir)
    if cfg.model_type not in ("llama", "mistral"):
        raise UnsupportedModelError(f"GGUF export supports the llama family (llama, mistral), not {cfg.model_type!r}")
    out_path = Path(out_path)
    types = Counter()
    for lin in source.linears.values():
        types[lin.gguf_type or "Q1_0"] += lin.shape[0] * lin.shape[1]
    writer = gguf.GGUFWriter(None, "llama")
    _write_metadata(writer, cfg, types.most_common(1)[0][0] if types else "F16")
    _write_tokenizer(writer, source.model_dir)
    rows: list[dict[str, Any]] = []
    floats: dict[str, str] = {}
    tied = getattr(cfg, "tie_word_embeddings", False)
    names = [k for k in GLOBAL_TENSORS if not (tied and k == "lm_head.weight")]
    names += [f"model.layers.{i}.{m}.weight" for i in range(cfg.num_hidden_layers) for m in LAYER_TENSORS
              if f"model.layers.{i}.{m}" not in source.linears]
    plain = source.read(names)
    for hf, name in GLOBAL_TENSORS.items():
        if hf not in plain:
            continue
        t = plain[hf]
        data, raw_dtype, floats[name] = _float_tensor(t, float_type) if t.dim() == 2 else (t.float().numpy(), None, "F32")
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    for i in range(cfg.num_hidden_layers):
        for module, short in LAYER_TENSORS.items():
            key, name = f"model.layers.{i}.{module}", f"blk.{i}.{short}.weight"
            if key not in source.linears:
                writer.add_tensor(name, plain[f"{key}.weight"].float().numpy())  # norms, unquantized linears: F32
                floats[name] = "F32"
                continue
            lin = source.linears[key]
            data, qtype, exact = _linear_tensor(lin)
            heads = _heads(cfg, module)
            if heads is not None:
                data = permute_qk(data, heads)
            writer.add_tensor(name, data, raw_dtype=None if qtype == "F16" else gguf.GGMLQuantizationType[qtype])
            rows.append(dict(name=key, gguf=name, type=qtype, method=lin.plan.method, block_size=lin.plan.block_size,
                             shape=list(lin.shape), exact=exact, bytes=int(data.nbytes)))
    _write_atomic(writer, out_path)
    return summarize(rows, floats, out_path.stat().st_size)


def _write_atomic(writer: Any, out_path: Path) -> None:
    """Header, metadata and tensors through ``files.atomic_output``: a whole file or none (a failure removes
    the temporary file and leaves any earlier file in place)."""
    try:
        with atomic_output(out_path) as tmp:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    finally:
        writer.close()


def summarize(rows: list[dict[str, Any]], floats: dict[str, str], file_bytes: int) -> dict[str, Any]:
    """Per GGUF type of the linears: count, weights, bytes, bpw; which were exact; file size."""
    by_type: dict[str, dict[str, Any]] = {}
    for r in rows:
        t = by_type.setdefault(f"{r['type']}{'' if r['exact'] else ' (projection)'}",
                               dict(linears=0, weights=0, bytes=0, methods=set()))
        t["linears"] += 1
        t["weights"] += r["shape"][0] * r["shape"][1]
        t["bytes"] += r["bytes"]
        t["methods"].add(r["method"])
    for t in by_type.values():
        t["bpw"] = t["bytes"] * 8 / max(t["weights"], 1)
        t["methods"] = sorted(t["methods"])
    weights = sum(t["weights"] for t in by_type.values())
    nbytes = sum(t["bytes"] for t in by_type.values())
    return dict(linears=rows, by_type=by_type, float_tensors=floats, linear_weights=weights, linear_bytes=nbytes,
                linear_bpw=nbytes * 8 / max(weights, 1), exact=all(r["exact"] for r in rows),
                projected_linears=sum(not r["exact"] for r in rows), file_bytes=file_bytes)


def load_gguf_model(path: str | Path, model_dir: str | Path) -> torch.nn.Module:
    """The HF model of ``model_dir``'s config with every weight from the GGUF (``read_gguf``): for types that
    transformers' GGUF loader cannot decode (it uses gguf's numpy reference, which has no Q1_0 in gguf 0.19)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(read_gguf(path, cfg), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise ValueError(f"{path}: tensors missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def read_gguf(path: str | Path, cfg: Any) -> dict[str, Tensor]:
    """Every tensor of a llama GGUF as HF-named float32 tensors (q/k rows un-permuted), decoded with gguf's
    numpy reference (onebit's for Q1_0)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {v: k for k, v in GLOBAL_TENSORS.items()}
    names.update({f"blk.{i}.{short}.weight": f"model.layers.{i}.{module}.weight"
                  for i in range(cfg.num_hidden_layers) for module, short in LAYER_TENSORS.items()})
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        w = torch.from_numpy(np.array(dequantize(np.asarray(t.data), t.tensor_type.name), np.float32).reshape(shape))
        hf = names[t.name]
        module = hf.split(".", 3)[-1].removesuffix(".weight")
        heads = _heads(cfg, module)
        out[hf] = permute_qk(w, heads, inverse=True) if heads is not None else w
    return out
