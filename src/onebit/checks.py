"""Pre-flight checks: what a command can verify before it loads a model, calibrates or solves for hours —
the model directory, its config and family, the context length, outputs (a directory, writable, enough free
disk for what the run will write) and non-finite weights. Each failure is an ``OnebitError`` that names the
file, option or tensor and says what to do."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import DataError, InputError, MissingFileError, NumericalError, OutputError
from .files import read_text
from .models import adapter_for_type
from .models.loading import resolve_model_path

# Upper estimate of what a layer checkpoint or packed linear stores per weight (storage bpw is 1.3–3.8 bits
# plus the block index): used for the free-space check only.
PACKED_BYTES_PER_WEIGHT = 0.5
FLOAT_BYTES = 4  # onebit loads, saves and offloads in fp32


def model_config(model_path: str) -> tuple[Path, dict[str, Any]]:
    """(model directory, its config.json) for a directory (or ``smollm2``) with a readable config of a
    supported family and weight files — without loading any weight."""
    path = resolve_model_path(model_path)
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(read_text(cfg_file))
    except json.JSONDecodeError as e:
        raise DataError(f"{cfg_file} is not valid JSON ({e})", hint="Restore the model's original config.json") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{cfg_file} holds no JSON object", hint="Restore the model's original config.json")
    adapter_for_type(cfg.get("model_type"), where=str(cfg_file))
    shards = sorted(path.glob("*.safetensors"))
    if not shards and not any(path.glob("*.bin")):
        raise MissingFileError(f"{path}: no weight files (*.safetensors or *.bin)",
                               hint="Download the model's weights into that directory")
    for shard in shards:
        _safetensors_shapes(shard)  # headers only: a truncated download fails here, not after hours
    return path, cfg


def context(max_positions: int | None, seqlen: int, option: str) -> None:
    """A window longer than the model's context gives meaningless results: refuse it."""
    if max_positions is not None and seqlen > max_positions:
        raise InputError(f"{option} {seqlen} exceeds the model's context of {max_positions} tokens "
                         f"(max_position_embeddings)", hint=f"Use {option} {max_positions} or less")


def input_file(path: Path, option: str) -> None:
    if not path.is_file():
        raise MissingFileError(f"{option} {path} does not exist or is not a file", hint="Check the path")


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def output(path: Path, option: str, kind: str = "dir") -> None:
    """``path`` can become the ``kind`` ("dir" or "file") an option names: not the other kind already,
    under a directory this process can write in."""
    if kind == "dir" and path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a directory", hint=f"Give {option} a new or existing directory")
    if kind == "file" and path.is_dir():
        raise OutputError(f"{option} {path} is a directory", hint=f"Give {option} a file name")
    base = _existing(path if kind == "dir" else path.parent)
    if not base.is_dir():
        raise OutputError(f"{option} {path}: {base} is a file, not a directory", hint=f"Choose another {option}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: no permission to write in {base}", hint=f"Choose another {option}")


def free_space(needs: dict[Path, int]) -> None:
    """Enough free disk for ``needs`` (bytes each output will take), summed per filesystem."""
    per_device: dict[int, tuple[Path, int, list[Path]]] = {}
    for path, need in needs.items():
        base = _existing(path)
        dev = base.stat().st_dev
        _, total, paths = per_device.get(dev, (base, 0, []))
        per_device[dev] = (base, total + need, [*paths, path])
    for base, need, paths in per_device.values():
        free = shutil.disk_usage(base).free
        if free < need:
            raise OutputError(f"not enough free disk space: {', '.join(map(str, paths))} will take about "
                              f"{_size(need)}, {_size(free)} are free there", hint="Free space, or write to another disk")


def _size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number at 1 or more."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:,.0f} bytes" if i == 0 else f"{n:,.1f} {units[i]}"


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (no tensor data read); a damaged or truncated file is an error."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else {}
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = 8 + n + max((v["data_offsets"][1] for v in tensors.values()), default=0)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})",
                        hint="Download or copy it again") from None
    if size < end:
        raise DataError(f"{path} is truncated: {size} bytes where its header needs {end}", hint="Download or copy it again")
    return {k: v["shape"] for k, v in tensors.items()}


def weight_counts(model_dir: Path, model_type: str) -> tuple[int, int] | None:
    """(decoder-linear weights, all other weights) from the safetensors headers; None without safetensors."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    adapter = adapter_for_type(model_type)
    suffixes = tuple(f".{n}.weight" for g in adapter.groups for n in g.linears)
    linear = other = 0
    for f in files:
        for name, shape in _safetensors_shapes(f).items():
            numel = int(torch.Size(shape).numel())
            if ".layers." in name and name.endswith(suffixes):
                linear += numel
            else:
                other += numel
    return linear, other


def packed_bytes(counts: tuple[int, int]) -> int:
    """About the size of a packed checkpoint: packed linears plus fp32 copies of everything else."""
    linear, other = counts
    return int(linear * PACKED_BYTES_PER_WEIGHT + other * FLOAT_BYTES)


def finite_weights(tensors: Iterable[tuple[str, Tensor]], where: str) -> None:
    """No NaN/Inf in any floating-point weight: binarizing such a model fails later (a NaN Hessian) or gives
    a NaN perplexity, so name the tensor now."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise NumericalError(f"{where}: weight {name} holds {nan} NaN and {inf} Inf values",
                                 hint="The checkpoint is damaged or comes from a diverged training run; restore "
                                      "or re-download it")


def checkpoint_tensors(model_dir: Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of a model directory's safetensors files, one at a time (for ``finite_weights``)."""
    from safetensors import safe_open

    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
