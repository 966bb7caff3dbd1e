"""Reading packed checkpoint directories (a Hugging Face model directory whose config.json carries the
``quantization_config`` and whose safetensors file holds each quantized linear's three tensors). The
writers are in ``onebit.export.packed``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import MissingFileError
from .packed import PackedFormatError, PackedLinear, check_config, packed_from_tensors, storage_summary

WEIGHTS_FILE = "model.safetensors"


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
    qc, packed = load_packed(model_dir)
    out = storage_summary(packed)
    out["file_bytes"] = (Path(model_dir) / WEIGHTS_FILE).stat().st_size
    return out


def dequantized_state(packed: dict[str, PackedLinear]) -> dict[str, torch.Tensor]:
    """{module.weight: dense fp32 Ŵ} for every packed linear."""
    return {f"{name}.weight": p.dequantize() for name, p in packed.items()}
