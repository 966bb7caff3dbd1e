"""Writing and reading packed checkpoint directories (a Hugging Face model directory whose quantized
linears are ``OnebitLinear`` tensors and whose config.json carries the ``quantization_config``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.checkpoint import LayerCheckpoint
from ..errors import MissingFileError
from ..files import atomic_output
from ..engine.pipeline import LayerRecord
from ..engine.store import StreamedModel
from ..engine.solver import LinearResult
from ..methods.base import Bits
from ..models.base import ArchAdapter
from .packed import PackedFormatError, PackedLinear, check_config, check_packable, packed_from_tensors, quantization_config

WEIGHTS_FILE = "model.safetensors"


class PackCollector:
    """``on_layer`` callback for ``onebit.quantize``: packs each linear's blocks as its layer finishes."""

    def __init__(self, adapter: ArchAdapter, method: str, block_size: int) -> None:
        check_packable(method)
        self.adapter, self.method, self.block_size = adapter, method, block_size
        self.packed: dict[str, PackedLinear] = {}

    def __call__(self, idx: int, layer: nn.Module, record: LayerRecord, results: dict[str, LinearResult]) -> None:
        for name, res in results.items():
            self.packed[f"{self.adapter.layers}.{idx}.{name}"] = PackedLinear.from_blocks(
                self.method, res.blocks, tuple(res.q.shape), self.block_size
            )


def packed_from_layers(ckpt: LayerCheckpoint, prefix: str, num_layers: int, method: str, block_size: int) -> dict[str, PackedLinear]:
    """Every linear's packed form, from a run's layer checkpoints (their stored block parameters)."""
    check_packable(method)
    out: dict[str, PackedLinear] = {}
    for idx in range(num_layers):
        got = ckpt.load(idx, weights=False)
        if got is None:
            raise PackedFormatError(f"{ckpt.path(idx)}: missing, unreadable or from another run: cannot pack layer {idx}")
        for lin in got[1]["linears"]:
            out[f"{prefix}.{idx}.{lin['name']}"] = PackedLinear.from_blocks(
                method, ckpt.blocks(idx, lin["name"]), tuple(lin["shape"]), block_size)
    return out


def save_packed_streamed(
    model: StreamedModel, out_dir: str | Path, packed: dict[str, PackedLinear], method: str,
    method_options: dict[str, Any], block_size: int, bits: Bits | None = None, tokenizer: Any = None,
) -> dict[str, Any]:
    """Write a packed checkpoint without materializing the model: the packed tensors plus every other tensor
    read from the original files (embeddings, norms, head, biases). Peak memory ≈ the packed model."""
    from safetensors.torch import save_file

    qc = _packed_config(packed, method, method_options, block_size, bits)
    quantized = {f"{name}.weight" for name in packed}
    head = f"{model.adapter.lm_head}.weight"
    tied = getattr(model.config, "tie_word_embeddings", False)
    keep = [n for n, _ in model.model.named_parameters() if n not in quantized and not (tied and n == head)]
    tensors = {k: v.contiguous() for k, v in model.read(keep).items()}
    for name, p in packed.items():
        tensors.update(p.tensors(name))
    with atomic_output(out_dir) as out:
        out.mkdir()
        save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
        model.config.quantization_config = qc
        model.config.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    return qc


def _packed_config(packed: dict[str, PackedLinear], method: str, method_options: dict[str, Any], block_size: int,
                   bits: Bits | None) -> dict[str, Any]:
    """The ``quantization_config`` of a packed checkpoint, with the run's bpw report when given."""
    report = None if bits is None else dict(storage_bpw=bits.storage_bpw, paper_bpw=bits.paper_bpw)
    return quantization_config(method, method_options, block_size, packed, bits_report=report)


def replace_linears(model: nn.Module, packed: dict[str, PackedLinear]) -> None:
    """Swap each packed linear of ``model`` for an ``OnebitLinear`` holding its packed tensors (in place)."""
    from ..nn.linear import OnebitLinear

    for name, p in packed.items():
        old = model.get_submodule(name)
        if tuple(old.weight.shape) != p.shape:
            raise PackedFormatError(f"{name}: model weight {tuple(old.weight.shape)} != packed {p.shape}")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, OnebitLinear.from_packed(p, old.bias))


def save_packed(
    model: nn.Module, out_dir: str | Path, packed: dict[str, PackedLinear], method: str, method_options: dict[str, Any],
    block_size: int, bits: Bits | None = None, tokenizer: Any = None,
) -> dict[str, Any]:
    """Write a packed checkpoint of ``model`` (its packed linears replaced in place); returns the config block."""
    from ..integrations.transformers import OnebitConfig

    qc = _packed_config(packed, method, method_options, block_size, bits)
    replace_linears(model, packed)
    model.config.quantization_config = OnebitConfig(**qc)
    save_model_dir(model, out_dir, tokenizer)
    return qc


def save_model_dir(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> None:
    """``save_pretrained`` of the model (and tokenizer) into ``out_dir``, atomically."""
    with atomic_output(out_dir) as out:
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise MissingFileError(f"{model_dir}: no config.json", hint="Pass a packed checkpoint directory "
                                                                  "(onebit quantize --save-packed DIR, or onebit pack)")
    qc = json.loads(path.read_text()).get("quantization_config")
    if qc is None:
        raise PackedFormatError(f"{model_dir}: config.json has no quantization_config (not a packed onebit model)")
    check_config(qc)
    return qc


def load_packed(model_dir: str | Path) -> tuple[dict[str, Any], dict[str, PackedLinear]]:
    """(quantization_config, verified PackedLinear per module) straight from the safetensors file."""
    from safetensors import safe_open

    qc = read_config(model_dir)
    path = Path(model_dir) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys if ".packed_" in k}
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise PackedFormatError(f"{path}: unreadable safetensors file (truncated or corrupted?): {e}") from None
    return qc, {name: packed_from_tensors(qc, name, tensors) for name in qc["modules"]}


def measured_bpw(model_dir: str | Path) -> dict[str, float]:
    """Storage bpw recomputed from the bytes of the packed tensors in the file."""
    from .packed import storage_summary

    qc, packed = load_packed(model_dir)
    out = storage_summary(packed)
    out["file_bytes"] = (Path(model_dir) / WEIGHTS_FILE).stat().st_size
    return out


def dequantized_state(packed: dict[str, PackedLinear]) -> dict[str, torch.Tensor]:
    """{module.weight: dense fp32 Ŵ} for every packed linear."""
    return {f"{name}.weight": p.dequantize() for name, p in packed.items()}
