"""GGUF export in llama.cpp's Q1_0 type: a lossy projection of a packed onebit checkpoint.

Q1_0 (GGML type 41) stores 128 weights along a row as an fp16 scale d and 128 sign bits (LSB-first);
w = d·(2·bit − 1). Our methods keep several groups, means and a second plane per block, which Q1_0 cannot
express, so each 128-block of the dequantized Ŵ is projected onto its nearest d·sign (L2): bit = Ŵ > 0,
d = mean |Ŵ|. Embeddings, norms and lm_head are written as F32. Architecture: llama family (llama,
mistral), whose q/k rows llama.cpp expects permuted for its rotary layout (same permutation as
llama.cpp's converter). ``read_q1_gguf`` decodes a written file back to HF tensors for perplexity checks.

Q1_0 blocks run along a row, so a linear whose in_features is not a multiple of 128 has no Q1_0 form (GGML
refuses such tensors). Such a model is refused, unless ``f16_fallback``: those linears are then written as
F16 copies of Ŵ (16 bits per weight, not 1-bit) and the summary counts the weights in each type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, UnsupportedModelError
from ..files import atomic_output

QK = 128
BLOCK_BYTES = 2 + QK // 8
LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}


def quantize_q1_0(w: Tensor) -> np.ndarray:
    """(n, m) float → uint8 (n, m/128·18) Q1_0 rows: per block fp16 d = mean|w| then 16 bytes of sign bits."""
    n, m = w.shape
    if m % QK:
        raise ValueError(f"Q1_0 needs in_features divisible by {QK}, got {m}")
    blocks = w.float().reshape(n, m // QK, QK)
    d = blocks.abs().mean(-1).to(torch.float16).numpy()
    bits = np.packbits((blocks > 0).numpy(), axis=-1, bitorder="little")
    out = np.concatenate([d[..., None].view(np.uint8), bits], -1)
    return out.reshape(n, -1)


def dequantize_q1_0(raw: np.ndarray, n: int, m: int) -> Tensor:
    """Inverse of ``quantize_q1_0``: uint8 rows → float32 (n, m)."""
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, m // QK, BLOCK_BYTES)
    d = b[..., :2].copy().view(np.float16).astype(np.float32)
    bits = np.unpackbits(b[..., 2:], axis=-1, bitorder="little").astype(np.float32)
    return torch.from_numpy((d * (2 * bits - 1)).reshape(n, m))


def permute_qk(w: Tensor, n_head: int, inverse: bool = False) -> Tensor:
    """llama.cpp's rotary row order for q/k (``inverse`` undoes it)."""
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

    vocab = gguf.vocab.BpeVocab(model_dir)
    tokens, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text)
        types.append(ttype)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def export_q1_gguf(model_dir: str | Path, out_path: str | Path, f16_fallback: bool = False) -> dict[str, Any]:
    """Write ``out_path`` from a packed checkpoint; returns a summary (tensors, bytes, bpw)."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig

    from ..formats.checkpoint import WEIGHTS_FILE, load_packed

    model_dir = Path(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type not in ("llama", "mistral"):
        raise UnsupportedModelError(f"{model_dir}: GGUF export supports the llama family (llama, mistral), not "
                                    f"{cfg.model_type!r}")
    _, packed = load_packed(model_dir)
    odd = sorted(k for k, p in packed.items() if p.shape[1] % QK)
    if odd and not f16_fallback:
        raise InputError(f"Q1_0 needs in_features divisible by {QK}; {len(odd)} linears are not (e.g. {odd[0]}: "
                         f"{packed[odd[0]].shape[1]})",
                         hint="Pass f16_fallback (CLI: --f16-fallback) to write those as F16 copies of Ŵ")
    with safe_open(str(model_dir / WEIGHTS_FILE), framework="pt") as f:
        plain = {k: f.get_tensor(k).float() for k in f.keys() if ".packed_" not in k}
    with atomic_output(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
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
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q1_0)
        _write_tokenizer(writer, model_dir)
        q1_bytes = q1_weights = f16_weights = 0
        for hf, name in GLOBAL_TENSORS.items():
            if hf in plain:
                writer.add_tensor(name, plain[hf].numpy())
        for i in range(cfg.num_hidden_layers):
            for module, short in LAYER_TENSORS.items():
                key = f"model.layers.{i}.{module}"
                if key in packed:
                    w = packed[key].dequantize()
                    heads = _heads(cfg, module)
                    if heads is not None:
                        w = permute_qk(w, heads)
                    if w.shape[1] % QK:
                        writer.add_tensor(f"blk.{i}.{short}.weight", w.half().numpy())
                        f16_weights += w.numel()
                        continue
                    raw = quantize_q1_0(w)
                    writer.add_tensor(f"blk.{i}.{short}.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q1_0)
                    q1_bytes += raw.nbytes
                    q1_weights += w.numel()
                else:
                    writer.add_tensor(f"blk.{i}.{short}.weight", plain[f"{key}.weight"].numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return dict(q1_tensors_bytes=q1_bytes, q1_weights=q1_weights, q1_bpw=q1_bytes * 8 / max(q1_weights, 1),
                f16_fallback_weights=f16_weights, q1_fraction=q1_weights / max(q1_weights + f16_weights, 1),
                file_bytes=Path(out_path).stat().st_size)


def read_q1_gguf(path: str | Path, cfg: Any) -> dict[str, Tensor]:
    """HF-named float tensors of every decoder linear in a Q1_0 GGUF, Q1_0 or F16 fallback (q/k rows
    un-permuted)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    short_to_module = {v: k for k, v in LAYER_TENSORS.items()}
    out = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] != "blk" or "norm" in parts[2]:
            continue
        _, layer, short, _ = parts
        m, n = (int(x) for x in t.shape[:2])  # GGUF lists dims innermost first
        module = short_to_module[short]
        if t.tensor_type == gguf.GGMLQuantizationType.Q1_0:
            w = dequantize_q1_0(np.asarray(t.data), n, m)
        else:
            w = torch.from_numpy(np.asarray(t.data).astype(np.float32).reshape(n, m))
        heads = _heads(cfg, module)
        if heads is not None:
            w = permute_qk(w, heads, inverse=True)
        out[f"model.layers.{layer}.{module}.weight"] = w
    return out
