"""Writing packed checkpoint directories (docs/format.md): a Hugging Face model directory whose quantized
linears are ``OnebitLinear`` tensors and whose config.json carries the ``quantization_config``.

Each linear is packed with the method and block size its plan gave it (engine/plan.py), read from its
report slice; ``formats.packed`` holds the layout, ``formats.checkpoint`` reads it back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..engine.checkpoint import LayerCheckpoint
from ..engine.pipeline import LayerRecord, LinearRecord
from ..engine.plan import LinearPlan
from ..engine.solver import LinearResult
from ..engine.store import StreamedModel
from ..files import atomic_output
from ..formats.checkpoint import WEIGHTS_FILE
from ..formats.packed import PackedFormatError, PackedLinear, quantization_config
from ..methods.base import Bits
from ..models.base import ArchAdapter


def pack_linear(plan: LinearPlan, blocks: list[dict[str, Any]], shape: tuple[int, int]) -> PackedLinear:
    return PackedLinear.from_blocks(plan.method, blocks, shape, plan.block_size, plan.options)


class PackCollector:
    """``on_layer`` callback for ``onebit.quantize``: packs each linear's blocks as its layer finishes."""

    def __init__(self, adapter: ArchAdapter) -> None:
        self.adapter = adapter
        self.packed: dict[str, PackedLinear] = {}

    def __call__(self, idx: int, layer: nn.Module, record: LayerRecord, results: dict[str, LinearResult]) -> None:
        records: dict[str, LinearRecord] = {r.name: r for r in record.linears}
        for name, res in results.items():
            self.packed[f"{self.adapter.layers}.{idx}.{name}"] = pack_linear(records[name].plan, res.blocks, tuple(res.q.shape))


def packed_from_layers(ckpt: LayerCheckpoint, prefix: str, num_layers: int) -> dict[str, PackedLinear]:
    """Every linear's packed form, from a run's layer checkpoints (their stored block parameters; ``ckpt``
    bound to the run's plan for layer files that predate per-linear plans)."""
    out: dict[str, PackedLinear] = {}
    for idx in range(num_layers):
        got = ckpt.load(idx, weights=False)
        if got is None:
            raise PackedFormatError(f"{ckpt.path(idx)}: missing, unreadable or from another run: cannot pack layer {idx}")
        for lin in got[1]["linears"]:
            plan = ckpt.linear_plan(idx, lin)
            out[f"{prefix}.{idx}.{lin['name']}"] = pack_linear(plan, ckpt.blocks(idx, lin["name"]), tuple(lin["shape"]))
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
                   bits: Bits | None, input_transforms: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` of a packed checkpoint, with the run's bpw report when given."""
    report = None if bits is None else dict(storage_bpw=bits.storage_bpw, paper_bpw=bits.paper_bpw)
    return quantization_config(method, method_options, block_size, packed, bits_report=report,
                               input_transforms=input_transforms)


def replace_linears(model: nn.Module, packed: dict[str, PackedLinear],
                    input_transforms: dict[str, dict[str, Any]] | None = None) -> None:
    """Swap each packed linear of ``model`` for an ``OnebitLinear`` holding its packed tensors (in place);
    ``input_transforms`` replace the online hooks of the linears they name."""
    from ..nn.linear import OnebitLinear

    for name, p in packed.items():
        old = model.get_submodule(name)
        if tuple(old.weight.shape) != p.shape:
            raise PackedFormatError(f"{name}: model weight {tuple(old.weight.shape)} != packed {p.shape}")
        parent_name, _, child = name.rpartition(".")
        new = OnebitLinear.from_packed(p, old.bias)
        new.set_input_transform((input_transforms or {}).get(name))
        setattr(model.get_submodule(parent_name), child, new)


def save_packed(
    model: nn.Module, out_dir: str | Path, packed: dict[str, PackedLinear], method: str, method_options: dict[str, Any],
    block_size: int, bits: Bits | None = None, tokenizer: Any = None,
    input_transforms: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write a packed checkpoint of ``model`` (its packed linears replaced in place); returns the config block.
    ``input_transforms``: {module: online transform entry} (rotate's ``--rotate-down``)."""
    from ..integrations.transformers import OnebitConfig

    qc = _packed_config(packed, method, method_options, block_size, bits, input_transforms)
    replace_linears(model, packed, input_transforms)
    model.config.quantization_config = OnebitConfig(**qc)
    save_model_dir(model, out_dir, tokenizer)
    return qc


def save_model_dir(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> None:
    """``save_pretrained`` of the model (and tokenizer) into ``out_dir``, atomically."""
    with atomic_output(out_dir) as out:
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
