"""GGML block layouts: a GGUF-type method's stored block (``methods/ggml.py``) → the type's bytes.

``to_gguf_bytes(gguf_type, params)`` takes one block's stored form (n rows) and returns an (n, type size)
uint8 array, byte for byte what llama.cpp's quantizer would write for those codes and parameters (ggml's
``block_q1_0``, ``block_tq1_0``, ``block_tq2_0``, ``block_q2_K``, ``block_q4_0``, ``block_q8_0``; little
endian); F16 is a plain fp16 array. The bytes come from the stored codes, never from re-quantizing Ŵ.
``dequantize`` reads them back with gguf's numpy reference, or for Q1_0 (which gguf 0.19 cannot decode) with
``dequantize_q1_0`` below, written from the block definition.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..methods.uniform import from_planes

QK_K = 256


def _fp16(t: Tensor) -> np.ndarray:
    """(n, 1) fp16 → (n, 2) little-endian bytes."""
    return t.detach().cpu().to(torch.float16).numpy().astype("<f2").view(np.uint8).reshape(t.shape[0], 2)


def _u8(t: Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.uint8).numpy()


def _crumbs(codes: Tensor) -> Tensor:
    """(n, 256) 2-bit codes → (n, 64) bytes as TQ2_0 and Q2_K pack them: byte 32·c + l holds, in bits 2k..2k+1,
    element 128·c + 32·k + l."""
    n = codes.shape[0]
    q = codes.reshape(n, 2, 4, 32) << (2 * torch.arange(4, device=codes.device)).view(1, 1, 4, 1)
    return q.sum(2).reshape(n, 64)


def _nibbles(codes: Tensor) -> Tensor:
    """(n, 32) 4-bit codes → (n, 16) bytes as Q4_0 packs them: element j low nibble, element j + 16 high."""
    return codes[:, :16] | codes[:, 16:] << 4


def q1_0(p: dict[str, Tensor]) -> np.ndarray:
    n = p["signs"].shape[0]
    return np.concatenate([_fp16(p["d"]), np.packbits(p["signs"].cpu().numpy().reshape(n, 128), -1, "little")], 1)


def tq2_0(p: dict[str, Tensor]) -> np.ndarray:
    codes = 1 + torch.where(p["nonzero"], p["signs"].long() * 2 - 1, 0)
    return np.concatenate([_u8(_crumbs(codes)), _fp16(p["alpha"])], 1)


def tq1_0(p: dict[str, Tensor]) -> np.ndarray:
    return np.concatenate([_u8(from_planes(p, 8, "t")), _fp16(p["alpha"])], 1)


def q2_k(p: dict[str, Tensor]) -> np.ndarray:
    scales = from_planes(p, 4, "s") | from_planes(p, 4, "m") << 4
    return np.concatenate([_u8(scales), _u8(_crumbs(from_planes(p, 2, "q"))), _fp16(p["d"]), _fp16(p["dmin"])], 1)


def q4_0(p: dict[str, Tensor]) -> np.ndarray:
    return np.concatenate([_fp16(p["scale"]), _u8(_nibbles(from_planes(p, 4, "q")))], 1)


def q8_0(p: dict[str, Tensor]) -> np.ndarray:
    return np.concatenate([_fp16(p["scale"]), _u8(from_planes(p, 8, "q") ^ 0x80)], 1)  # code − 128 as int8


def f16(p: dict[str, Tensor]) -> np.ndarray:
    return p["w"].detach().cpu().to(torch.float16).numpy()


BLOCK_WRITERS: dict[str, Callable[[dict[str, Tensor]], np.ndarray]] = {
    "Q1_0": q1_0, "TQ2_0": tq2_0, "TQ1_0": tq1_0, "Q2_K": q2_k, "Q4_0": q4_0, "Q8_0": q8_0, "F16": f16,
}


def to_gguf_bytes(gguf_type: str, blocks: list[dict[str, Tensor]]) -> np.ndarray:
    """A linear's blocks (in column order) → its GGUF tensor data: (n, row bytes) uint8, or (n, m) fp16 for F16."""
    return np.concatenate([BLOCK_WRITERS[gguf_type](b) for b in blocks], 1)


def dequantize_q1_0(raw: np.ndarray) -> np.ndarray:
    """Q1_0 rows (n, k·18 bytes) → float32 (n, k·128): per block fp16 d then 16 bytes of sign bits, LSB first;
    w = +d where the bit is set, else −d."""
    n = raw.shape[0]
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, -1, 18)
    d = b[..., :2].copy().view("<f2").astype(np.float32)
    bits = np.unpackbits(b[..., 2:], axis=-1, bitorder="little").astype(np.float32)
    return (d * (2 * bits - 1)).reshape(n, -1)


def dequantize(raw: np.ndarray, gguf_type: str) -> np.ndarray:
    """GGUF tensor data → float32, with gguf's numpy reference (``onebit``'s own Q1_0 decoder where gguf has none)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[gguf_type]
    try:
        return gguf.quants.dequantize(raw, qtype)
    except NotImplementedError:
        if gguf_type != "Q1_0":
            raise
        return dequantize_q1_0(raw)
