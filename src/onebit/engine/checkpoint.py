"""Per-layer checkpoints: each finished layer is written at once, atomically, so a killed run resumes.

``RUN/layers/layer_00012.safetensors`` holds every block's stored parameters (``{linear}.blocks.{j}.{name}``,
what a packer needs) and, in the metadata, the layer's report slice and a fingerprint of the run (model,
method, engine and calibration settings). A linear's quantized weight is rebuilt from its blocks with its
method's ``decode_block`` (the method and block size its report slice records, else the run's plan: ``bind``);
it is stored (``{linear}.weight``, fp32) only when the blocks do not reproduce it bit-exactly. Bit planes are
stored packed (their shapes in the metadata), so a layer file holds about the storage bpw, not 32 bits per
weight plus the blocks.
A file is written to a temporary name, fsynced and renamed (``files.atomic_output``): a reader sees a whole
file or none, also when the disk fills up or the run is killed mid-write. On resume a
file that is unreadable, truncated or from another configuration is never reused: the run restarts at the
first layer without a valid file, and recomputes everything after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError
from ..files import atomic_output
from ..formats.bitpack import pack_bits, unpack_bits
from ..methods.base import decode_linear
from .plan import LinearPlan, Plan

log = logging.getLogger("onebit")

FORMAT = "onebit-layer-1"


def fingerprint(settings: dict[str, Any]) -> str:
    """Stable hash of everything that determines a layer's result."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def run_settings(model: str, config: dict[str, Any], calibration: dict[str, Any], onebit: str) -> dict[str, Any]:
    """What determines every layer of a run (its checkpoints' fingerprint): model, config, calibration, version."""
    calibration = {k: v for k, v in calibration.items() if k != "source"}
    return dict(model=model, config=config, calibration=calibration, onebit=onebit)


class LayerCheckpoint:
    def __init__(self, directory: str | Path, settings: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.fp = fingerprint(settings)
        self.plan: Plan | None = None

    def bind(self, plan: Plan) -> None:
        """The run's plan: the method and block size of linears whose report slice does not record them (the
        fingerprint pins it)."""
        self.plan = plan

    def linear_plan(self, idx: int, record: dict[str, Any]) -> LinearPlan | None:
        """A linear's method and block size: from its report slice ``record``, else from the bound plan."""
        if record.get("plan"):
            return LinearPlan.from_dict(record["plan"])
        return None if self.plan is None else self.plan.resolve(idx, record["name"], tuple(record["shape"]))

    def _decodes(self, w: Tensor, blocks: list[dict[str, Tensor]], plan: LinearPlan | None) -> bool:
        if plan is None or not blocks:
            return False
        try:
            q = decode_linear(plan.build(), blocks, tuple(w.shape), plan.block_size)
        except Exception:  # noqa: BLE001 - blocks that do not decode: store the weight itself
            return False
        return torch.equal(q.to("cpu", w.dtype), w.detach().cpu())

    def path(self, idx: int) -> Path:
        return self.dir / f"layer_{idx:05d}.safetensors"

    def save(self, idx: int, weights: dict[str, Tensor], blocks: dict[str, list[dict[str, Tensor]]], record: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        records = {r["name"]: r for r in record["linears"]}
        decoded = {name: str(w.dtype).removeprefix("torch.") for name, w in weights.items()
                   if self._decodes(w, blocks.get(name, []), self.linear_plan(idx, records[name]))}
        tensors = {f"{name}.weight": w.detach().cpu().contiguous() for name, w in weights.items() if name not in decoded}
        bool_shapes = {}  # safetensors spends a byte per bool: bit planes are stored packed (formats.bitpack)
        for name, bl in blocks.items():
            for j, params in enumerate(bl):
                for key, t in params.items():
                    k = f"{name}.blocks.{j}.{key}"
                    if t.dtype == torch.bool:
                        bool_shapes[k] = list(t.shape)
                        t = pack_bits(t.detach().cpu())
                    tensors[k] = t.detach().cpu().contiguous()
        # safetensors sorts keys: keep each linear's parameter order (it is the packed format's layout)
        order = {name: list(bl[0]) for name, bl in blocks.items() if bl}
        meta = {"format": FORMAT, "fingerprint": self.fp, "layer": str(idx), "record": json.dumps(record),
                "param_order": json.dumps(order), "decoded": json.dumps(decoded), "bool_shapes": json.dumps(bool_shapes)}
        with atomic_output(self.path(idx)) as tmp:
            save_file(tensors, tmp, metadata=meta)

    def load(self, idx: int, weights: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """(quantized weights by linear name, report slice) if layer ``idx`` has a valid file, else None.
        ``weights=False`` checks the file and reads the report slice only (weights: empty dict)."""
        path = self.path(idx)
        if not path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fp or meta.get("layer") != str(idx):
                    log.warning("%s was written by a different run configuration: recomputing layer %d", path, idx)
                    return None
                keys = [k for k in f.keys() if k.endswith(".weight") and ".blocks." not in k] if weights else []
                tensors = {k[: -len(".weight")]: f.get_tensor(k) for k in keys}
                record = json.loads(meta["record"])
                decoded = json.loads(meta.get("decoded", "{}")) if weights else {}
                records = {r["name"]: r for r in record["linears"]}
                for name, dtype in decoded.items():
                    plan = self.linear_plan(idx, records[name])
                    if plan is None:
                        raise RuntimeError("its weights are stored as blocks and no plan is bound to decode them")
                    w = decode_linear(plan.build(), _read_blocks(f, meta, name), tuple(records[name]["shape"]), plan.block_size)
                    tensors[name] = w.to(getattr(torch, dtype))
        except Exception as e:  # truncated or corrupt: never reuse
            log.warning("%s is unreadable (%s): recomputing layer %d", path, e, idx)
            return None
        return tensors, record

    def blocks(self, idx: int, name: str) -> list[dict[str, Tensor]]:
        """The stored block parameters of one linear (for packers)."""
        from safetensors import safe_open

        with safe_open(self.path(idx), framework="pt") as f:
            return _read_blocks(f, f.metadata() or {}, name)

    def weights(self, idx: int) -> dict[str, Tensor]:
        """Overrides for a streamed model: relative parameter names → quantized weights (after a finished run:
        a layer without a valid file is an error, never a silent fall-back to the float weights)."""
        got = self.load(idx)
        if got is None:
            raise DataError(f"{self.path(idx)}: no valid layer checkpoint (see the warning above)",
                            hint="Run the same quantize command again with --resume to recompute it")
        return {f"{k}.weight": v for k, v in got[0].items()}


def _read_blocks(f: Any, meta: dict[str, str], name: str) -> list[dict[str, Tensor]]:
    """One linear's block parameters from an open layer file (bit planes unpacked, the method's key order)."""
    out: dict[int, dict[str, Tensor]] = {}
    prefix = f"{name}.blocks."
    order = json.loads(meta.get("param_order", "{}")).get(name)
    bool_shapes = json.loads(meta.get("bool_shapes", "{}"))
    for k in f.keys():
        if k.startswith(prefix):
            j, key = k[len(prefix) :].split(".", 1)
            t = f.get_tensor(k)
            if k in bool_shapes:
                shape = bool_shapes[k]
                t = unpack_bits(t, math.prod(shape)).view(shape)
            out.setdefault(int(j), {})[key] = t
    blocks = [out[j] for j in sorted(out)]
    return blocks if order is None else [{key: b[key] for key in order} for b in blocks]


def set_weights(linears: dict[str, torch.nn.Linear], weights: dict[str, Tensor]) -> None:
    for name, lin in linears.items():
        lin.weight.data = weights[name].to(lin.weight.device, lin.weight.dtype)
