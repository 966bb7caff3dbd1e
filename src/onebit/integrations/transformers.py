"""transformers glue: ``quant_method: "onebit"`` configs load through ``AutoModelForCausalLM.from_pretrained``.

Registered when ``onebit`` is imported. Before the weights load, every linear named in the config's
manifest becomes an ``OnebitLinear`` whose buffers have the checkpoint tensors' shapes; after loading, each
one is verified (sizes, CRC32, shape) and its kernel table is built. Only safetensors tensors are read.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..formats.packed import QUANT_METHOD, SUFFIXES, PackedFormatError, check_config, module_layout, module_options
from ..nn.linear import OnebitLinear


@register_quantization_config(QUANT_METHOD)
class OnebitConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a packed onebit checkpoint (see ``formats.packed.quantization_config``)."""

    def __init__(self, **fields: Any) -> None:
        fields.setdefault("quant_method", QUANT_METHOD)
        check_config(fields)
        for key, value in fields.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _get_parent(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def check_checkpoint_files(files: list[str] | None, qc: OnebitConfig) -> None:
    """Before loading: every manifest tensor is present in the safetensors files with the expected size."""
    if not files:
        return
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise PackedFormatError(f"{path}: unreadable safetensors file (truncated or corrupted?): {e}") from None
    qd = qc.to_dict()
    for name, entry in qc.modules.items():
        expected = (entry["bits_bytes"],), (entry["fp16_count"],), (entry["blocks"], len(module_layout(qd, name)), 3)
        for suffix, shape in zip(SUFFIXES, expected):
            got = shapes.get(f"{name}.{suffix}")
            if got != shape:
                raise PackedFormatError(f"{name}.{suffix}: checkpoint has shape {got}, the manifest says {shape}")


@register_quantizer(QUANT_METHOD)
class OnebitHfQuantizer(HfQuantizer):
    """Loads packed onebit checkpoints (pre-quantized only: quantize with ``onebit quantize --save-packed``)."""

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("onebit models are quantized with `onebit quantize`, not at load time")

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None, **kwargs: Any) -> None:
        qc = self.quantization_config
        check_checkpoint_files(checkpoint_files, qc)
        qd = qc.to_dict()
        for name, entry in qc.modules.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise PackedFormatError(f"checkpoint packs {name!r}, which this architecture does not have") from None
            n, m = entry["shape"]
            if (old.out_features, old.in_features) != (n, m):
                raise PackedFormatError(
                    f"{name}: model expects ({old.out_features}, {old.in_features}), the checkpoint stores ({n}, {m}) "
                    "(shape mismatch: wrong config.json for these weights?)"
                )
            new = OnebitLinear(
                m, n, old.bias is not None, entry["method"], entry["block_size"], module_layout(qd, name),
                entry["bits_bytes"], entry["fp16_count"], entry["blocks"], dtype=old.weight.dtype, device=old.weight.device,
                options=module_options(qd, name),
            )
            parent, child = _get_parent(model, name)
            setattr(parent, child, new)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> None:
        qc = self.quantization_config
        for name, entry in qc.modules.items():
            mod = model.get_submodule(name)
            mod.packed_fp16 = mod.packed_fp16.to(torch.float16)
            if any(t.is_meta for t in (mod.packed_bits, mod.packed_fp16, mod.packed_index)):
                raise PackedFormatError(f"{name}: packed tensors missing from the checkpoint")
            mod.packed().validate(entry, name)
            mod.prepare()
            mod.set_input_transform(entry.get("input_transform"))

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
