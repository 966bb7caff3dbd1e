"""The packed checkpoint format (docs/format.md): one linear = three plain tensors, generic over methods.

Every method returns each block's stored form as a dict of tensors (``BlockResult.params``: bool = one bit
per element, float = fp16). A linear is stored as

* ``{module}.packed_bits``  uint8: every bool tensor of every block, flattened, concatenated in
  (block, parameter) order into one bit stream, packed LSB-first (``bitpack``);
* ``{module}.packed_fp16``  float16: every float tensor, same order;
* ``{module}.packed_index`` int32 (blocks, parameters, 3): each tensor's (ndim, dim0, dim1).

A tensor is flattened row-major, except a row-wise one (2-D with one row per output feature): its rows go in
tiles of ``TILE`` = 16, each tile column-major, so the 16 rows' bits of one column are one 16-bit word and
their scales one 16-vector (what the packed kernels load; ``to_tiles``). The last tile holds the remaining
rows. No padding: the streams hold exactly the method's bits.

The parameter names and kinds come from ``quantization_config.param_layout[method]``, or from the module's
own ``layout`` where its options give it another (a budget run's lean linears at different tiers); a
per-module manifest (``quantization_config.modules``) records method, its options, block size, shape, stream
sizes and CRC32s (linears of one checkpoint may differ in method, options and block size: engine/plan.py), so
a reader can check a checkpoint before trusting it. Nothing is pickled.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import OnebitError
from ..methods.base import PARAM_DTYPE, block_widths, build_method, decode_linear, storage_bits
from .bitpack import pack_bits, packed_nbytes, unpack_bits

QUANT_METHOD = "onebit"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 3: a module may carry its own ``layout`` or an online ``input_transform``; written
                            # only then (a version-2 reader would ignore either and decode wrong outputs), so that
                            # older readers keep reading every checkpoint that does not need it
TILE = 16
SUFFIXES = ("packed_bits", "packed_fp16", "packed_index")
UNPACKABLE = {"identity": "it stores the full-precision weight (it only checks the engine); there is nothing to pack"}


class PackedFormatError(OnebitError, ValueError):
    """A packed checkpoint that cannot be trusted: truncated, corrupted, wrong version or wrong shapes."""


def check_packable(method: str) -> None:
    if method in UNPACKABLE:
        raise PackedFormatError(f"method {method!r} cannot be packed: {UNPACKABLE[method]}")


def param_layout(block: dict[str, Tensor]) -> list[list[str]]:
    """[[name, "bits" | "fp16"], ...] in the block's dict order (the stream order)."""
    out = []
    for name, t in block.items():
        if t.dtype == torch.bool:
            out.append([name, "bits"])
        elif t.is_floating_point():
            out.append([name, "fp16"])
        else:
            raise PackedFormatError(f"block parameter {name!r} has dtype {t.dtype}; only bool and float can be stored")
    return out


def crc32(t: Tensor) -> int:
    return zlib.crc32(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())


def to_tiles(t: Tensor) -> Tensor:
    """(n, d) → flat (n·d,): rows in tiles of ``TILE``, each tile column-major (the last tile may be shorter)."""
    n, d = t.shape
    full = n - n % TILE
    head = t[:full].reshape(full // TILE, TILE, d).transpose(1, 2).reshape(-1)
    return torch.cat([head, t[full:].T.reshape(-1)])


def from_tiles(flat: Tensor, n: int, d: int) -> Tensor:
    """Inverse of ``to_tiles``: flat (n·d,) → (n, d)."""
    full = n - n % TILE
    head = flat[: full * d].view(full // TILE, d, TILE).transpose(1, 2).reshape(full, d)
    return torch.cat([head, flat[full * d :].view(d, n - full).T])


def row_wise(t_shape: tuple[int, ...], out_features: int) -> bool:
    """Stored in row tiles: a 2-D tensor with one row per output feature."""
    return len(t_shape) == 2 and t_shape[0] == out_features


@dataclass
class PackedLinear:
    """One linear's stored form (see module docstring). ``shape`` = (out_features, in_features);
    ``options``: the method's options (what its decoder needs, e.g. rtn's bits)."""

    method: str
    shape: tuple[int, int]
    block_size: int
    layout: list[list[str]]
    bits: Tensor
    fp16: Tensor
    index: Tensor
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_blocks(
        cls, method: str, blocks: list[dict[str, Tensor]], shape: tuple[int, int], block_size: int,
        options: dict[str, Any] | None = None,
    ) -> "PackedLinear":
        """Pack a linear's per-block stored forms (``LinearResult.blocks``)."""
        check_packable(method)
        layout = param_layout(blocks[0])
        names = [n for n, _ in layout]
        index = torch.zeros(len(blocks), len(layout), 3, dtype=torch.int32)
        bit_parts, fp_parts = [], []
        for j, block in enumerate(blocks):
            if list(block) != names:
                raise PackedFormatError(f"block {j} has parameters {list(block)}, block 0 has {names}")
            for p, (name, kind) in enumerate(layout):
                t = block[name].detach().cpu()
                if t.dim() > 2:
                    raise PackedFormatError(f"block parameter {name!r} has {t.dim()} dims; at most 2 are stored")
                dims = list(t.shape) + [1] * (2 - t.dim())
                index[j, p] = torch.tensor([t.dim(), *dims], dtype=torch.int32)
                flat = to_tiles(t) if row_wise(tuple(t.shape), shape[0]) else t.reshape(-1)
                if kind == "bits":
                    bit_parts.append(flat)
                else:
                    if t.to(PARAM_DTYPE).float().ne(t.float()).any():
                        raise PackedFormatError(f"block {j} parameter {name!r} is not representable in fp16")
                    fp_parts.append(flat.to(PARAM_DTYPE))
        bits = pack_bits(torch.cat(bit_parts)) if bit_parts else torch.zeros(0, dtype=torch.uint8)
        fp16 = torch.cat(fp_parts) if fp_parts else torch.zeros(0, dtype=PARAM_DTYPE)
        packed = cls(method, (int(shape[0]), int(shape[1])), block_size, layout, bits, fp16, index, dict(options or {}))
        packed.validate()
        return packed

    # -- accounting -------------------------------------------------------------------------------------
    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]

    def exact_bits(self) -> int:
        """Σ stored bits without byte padding (= the report's ``Bits.storage`` of this linear)."""
        return self.nbits() + self.fp16.numel() * 16

    def nbits(self) -> int:
        sizes = self.index[..., 1].long() * self.index[..., 2].long()
        kinds = torch.tensor([k == "bits" for _, k in self.layout])
        return int(sizes[:, kinds].sum())

    def payload_bytes(self) -> int:
        """Bytes of the two data tensors (the index is reported apart as format overhead)."""
        return self.bits.numel() + 2 * self.fp16.numel()

    # -- decoding ---------------------------------------------------------------------------------------
    def blocks(self) -> list[dict[str, Tensor]]:
        """The per-block stored forms, exactly as the method produced them."""
        flat = unpack_bits(self.bits, self.nbits())
        bo = fo = 0
        out = []
        for j in range(self.index.shape[0]):
            block = {}
            for p, (name, kind) in enumerate(self.layout):
                ndim, d0, d1 = self.index[j, p].tolist()
                shape = (d0, d1)[:ndim]
                size = d0 * d1
                if kind == "bits":
                    part, bo = flat[bo : bo + size], bo + size
                else:
                    part, fo = self.fp16[fo : fo + size], fo + size
                block[name] = from_tiles(part, d0, d1) if row_wise(shape, self.shape[0]) else part.view(shape)
            out.append(block)
        return out

    def dequantize(self) -> Tensor:
        """The dense fp32 weight, decoded block by block with the method's own ``decode_block``."""
        return decode_linear(build_method(self.method, **self.options), self.blocks(), self.shape, self.block_size)

    # -- validation -------------------------------------------------------------------------------------
    def validate(self, entry: dict[str, Any] | None = None, name: str = "linear") -> None:
        """Check internal consistency, and against a manifest entry (shape, sizes, CRC32) when given."""
        if self.index.dim() != 3 or self.index.shape[1:] != (len(self.layout), 3):
            raise PackedFormatError(f"{name}: index has shape {tuple(self.index.shape)}, expected (blocks, {len(self.layout)}, 3)")
        if (self.index[..., 0] < 0).any() or (self.index[..., 0] > 2).any() or (self.index[..., 1:] < 0).any():
            raise PackedFormatError(f"{name}: index holds invalid dimensions (corrupted checkpoint?)")
        nfp = self.index[..., 1].long() * self.index[..., 2].long()
        kinds = torch.tensor([k == "fp16" for _, k in self.layout])
        if self.bits.numel() != packed_nbytes(self.nbits()) or self.fp16.numel() != int(nfp[:, kinds].sum()):
            raise PackedFormatError(
                f"{name}: streams hold {self.bits.numel()} bytes / {self.fp16.numel()} floats but the index needs "
                f"{packed_nbytes(self.nbits())} / {int(nfp[:, kinds].sum())} (truncated or corrupted checkpoint)"
            )
        nblocks = len(block_widths(self.shape[1], self.block_size))
        if self.index.shape[0] != nblocks:
            raise PackedFormatError(
                f"{name}: {self.index.shape[0]} blocks stored, a {self.shape} weight in blocks of {self.block_size} "
                f"has {nblocks} (shape mismatch)"
            )
        if entry is None:
            return
        if tuple(entry["shape"]) != self.shape:
            raise PackedFormatError(f"{name}: manifest shape {tuple(entry['shape'])} != stored shape {self.shape}")
        for key, t in (("crc_bits", self.bits), ("crc_fp16", self.fp16), ("crc_index", self.index)):
            if crc32(t) != entry[key]:
                raise PackedFormatError(f"{name}: {key[4:]} stream fails its CRC32 check (corrupted checkpoint)")

    def manifest(self) -> dict[str, Any]:
        return dict(
            method=self.method, options=self.options, shape=list(self.shape), block_size=self.block_size,
            blocks=int(self.index.shape[0]), bits_bytes=self.bits.numel(),
            fp16_count=self.fp16.numel(), crc_bits=crc32(self.bits), crc_fp16=crc32(self.fp16), crc_index=crc32(self.index),
        )

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.{s}": t for s, t in zip(SUFFIXES, (self.bits, self.fp16, self.index))}


def quantization_config(
    method: str, method_options: dict[str, Any], block_size: int, packed: dict[str, PackedLinear],
    overrides: dict[str, dict[str, Any]] | None = None, bits_report: dict[str, float] | None = None,
    input_transforms: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json (also the loader's manifest). ``input_transforms``:
    {module: online transform entry} (rotate's down_proj Hadamard), stored in those modules' entries."""
    transforms = input_transforms or {}
    layouts: dict[str, list[list[str]]] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, p in packed.items():
        own = layouts.setdefault(p.method, p.layout) != p.layout
        modules[name] = {**p.manifest(), **({"layout": p.layout} if own else {}),
                         **({"input_transform": transforms[name]} if name in transforms else {})}
    needs_v3 = any("layout" in e or "input_transform" in e for e in modules.values())
    version = FORMAT_VERSION if needs_v3 else READABLE_VERSIONS[0]
    return dict(
        quant_method=QUANT_METHOD, format_version=version, method=method, method_options=method_options,
        block_size=block_size, param_layout=layouts, overrides=overrides or {}, modules=modules,
        storage=storage_summary(packed, bits_report),
    )


def storage_summary(packed: dict[str, PackedLinear], bits_report: dict[str, float] | None = None) -> dict[str, float]:
    """Storage bpw measured from the bytes written, next to the exact bit count (and the run's report)."""
    weights = sum(p.weights for p in packed.values())
    payload = sum(p.payload_bytes() for p in packed.values())
    exact = sum(p.exact_bits() for p in packed.values())
    index = sum(p.index.numel() * 4 for p in packed.values())
    out = dict(
        linear_weights=weights, payload_bytes=payload, index_bytes=index,
        storage_bpw_measured=payload * 8 / max(weights, 1), storage_bpw_exact=exact / max(weights, 1),
        padding_bits=payload * 8 - exact, index_bpw=index * 8 / max(weights, 1),
    )
    if bits_report is not None:
        out["storage_bpw_report"] = bits_report["storage_bpw"]
        out["paper_bpw"] = bits_report["paper_bpw"]
    return out


def check_config(qc: dict[str, Any]) -> None:
    """Refuse a config this reader does not understand."""
    if qc.get("quant_method") != QUANT_METHOD:
        raise PackedFormatError(f"quant_method is {qc.get('quant_method')!r}, not {QUANT_METHOD!r}")
    if qc.get("format_version") not in READABLE_VERSIONS:
        raise PackedFormatError(
            f"packed format version {qc.get('format_version')!r} is not supported (this onebit reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); re-pack the model with a matching onebit"
        )
    for key in ("method", "block_size", "param_layout", "modules"):
        if key not in qc:
            raise PackedFormatError(f"quantization_config lacks {key!r}")


def module_method(qc: dict[str, Any], name: str) -> str:
    """A module's method: its manifest entry, else the first matching override regex, else the default."""
    if name in qc.get("modules", {}):
        return qc["modules"][name]["method"]
    for pattern, opts in qc.get("overrides", {}).items():
        if re.fullmatch(pattern, name):
            return opts.get("method", qc["method"])
    return qc["method"]


def module_options(qc: dict[str, Any], name: str) -> dict[str, Any]:
    """A module's method options: its manifest entry's, else (checkpoints written before per-module options)
    the checkpoint's when it uses the checkpoint's method."""
    entry = qc["modules"][name]
    if "options" in entry:
        return entry["options"]
    return qc.get("method_options", {}) if entry["method"] == qc["method"] else {}


def module_layout(qc: dict[str, Any], name: str) -> list[list[str]]:
    """A module's parameter layout: its manifest entry's own, else its method's."""
    entry = qc["modules"][name]
    return entry.get("layout") or qc["param_layout"][entry["method"]]


def packed_from_tensors(qc: dict[str, Any], name: str, tensors: dict[str, Tensor]) -> PackedLinear:
    """Rebuild and verify one linear from its three tensors and its manifest entry."""
    entry = qc["modules"][name]
    missing = [s for s in SUFFIXES if f"{name}.{s}" not in tensors]
    if missing:
        raise PackedFormatError(f"{name}: checkpoint lacks {missing} (truncated or not a onebit checkpoint)")
    bits, fp16, index = (tensors[f"{name}.{s}"] for s in SUFFIXES)
    packed = PackedLinear(
        entry["method"], tuple(entry["shape"]), entry["block_size"], module_layout(qc, name), bits.to(torch.uint8),
        fp16.to(PARAM_DTYPE), index.to(torch.int32), module_options(qc, name),
    )
    packed.validate(entry, name)
    return packed


def check_exact(packed: PackedLinear, blocks: list[dict[str, Tensor]]) -> None:
    """Storage accounting invariant: packed bits == Σ storage_bits(block)."""
    expected = sum(storage_bits(b) for b in blocks)
    if packed.exact_bits() != expected:
        raise PackedFormatError(f"packed {packed.exact_bits()} bits, blocks need {expected}")
