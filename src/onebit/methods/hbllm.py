"""HBLLM (``row-hbraq``, ``col-hbraq``): Haar-wavelet binarization with per-row two-group mean + RMS scales.

Per block (hbllm.md §2–§7): BiLLM's salient-column search (l2 column score by default); the non-salient
part goes through a one-level Haar transform — along the row (pairs of columns) after filling the salient
columns from their neighbours (row-hbraq), or along the column (pairs of output rows) after dropping them
(col-hbraq) — and each coefficient row of each band is split by |coefficient| into an inner and an outer
group (best of 41 per-row quantiles, or of 81 band-wide ones with ``group_partition="global"``), each
binarized as μ + α·sign(x − μ) with α the RMS deviation. The salient residual (row-hbraq: the weights minus
the non-salient reconstruction; col-hbraq: the salient weights) gets the same binarizer after a column
Haar transform. The bands of one transform are binarized independently (the reference's "residual" high
band equals the original high band, §1).

Stored form of a block (n × B, k salient columns; "ns" = non-salient transform, "sal" = salient residual),
bands concatenated along the transform axis (L first), see ``BlockResult``:
``salient_cols`` (B bits); ``{ns,sal}_signs`` and ``{ns,sal}_groups`` (one sign bit and one group bit per
coefficient, True = +1 / outer group); ``{ns,sal}_mu`` and ``{ns,sal}_alpha`` (fp16, per coefficient row:
inner and outer μ — one shared μ with ``share_mean`` — and inner and outer α). Coefficients: row-hbraq
n × B (ns) + n × k (sal), col-hbraq n × (B−k) + n × k. Floats per weight row: row-hbraq 8 (6 shared) + 4,
col-hbraq 4 (3 shared) + 4. Storage bpw at B = 128: 3.5 + 2k/B (row), 3.25 + 2k/B (row, shared),
3.0 (col), 2.875 (col, shared), plus B/n for the column bitmap. Paper bpw (sign planes): 1 + k/B and 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import PARAM_BITS, BlockContext, BlockResult, Bits, bits_to_signs, register, signs_to_bits, to_storage
from .binarize import SortedRows, fit_rms_group
from .haar import haar_forward, haar_inverse
from .salient import SPLIT_QUANTILES, salient_columns, salient_metric

ROW_QUANTILES = torch.linspace(0.10, 0.90, 41, dtype=torch.float64)
HBLLM_METRICS = ("l2", "l1", "hessian", "magnitude")
FILL_HALF_WINDOW = 3  # row-hbraq fill window 7
UP_LIM = 50


def band_thresholds(x: Tensor, partition: str, center: Tensor | None) -> Tensor:
    """Per-row |coefficient| threshold (r × 1, float64) of the best inner/outer split of a band.

    Candidates: 41 per-row quantiles of |x| (``row``) or 81 quantiles of the whole band (``global``, one
    threshold chosen on the band's total error). Inner = |x| < t, outer = |x| ≥ t, both binarized with an
    RMS scale around their mean or ``center``; all candidates are scored at once from one sort per row.
    Ties keep the lower quantile (first minimum)."""
    r, m = x.shape
    mag = x.abs().double()
    if partition == "row":
        qs = torch.quantile(mag, ROW_QUANTILES.to(x.device), dim=1).T.contiguous()
    else:
        qs = torch.quantile(mag.flatten(), SPLIT_QUANTILES.to(x.device)).unsqueeze(0).expand(r, -1).contiguous()
    rows = SortedRows(x)
    lo, hi = rows.index(-qs, right=True), rows.index(qs)
    zero, end = torch.zeros_like(lo), torch.full_like(lo, m)
    err = rows.rms_error([(lo, hi)], center) + rows.rms_error([(zero, lo), (hi, end)], center)
    if partition == "row":
        return qs.gather(1, err.argmin(1, keepdim=True))
    return qs[:, int(err.sum(0).argmin())].unsqueeze(1)


def encode_band(x: Tensor, partition: str, shared: bool) -> dict[str, Tensor]:
    """Two-group RMS binarization of every row of one band (hbllm.md §4–§5) → its stored form."""
    r, m = x.shape
    if x.numel() == 0:  # no coefficients (e.g. no salient column, or the high band of one row)
        empty = x.new_zeros(r, m, dtype=torch.bool)
        return {"signs": empty, "groups": empty, "mu": x.new_zeros(r, (1 if shared else 2) if m else 0),
                "alpha": x.new_zeros(r, 2 if m else 0)}
    center = to_storage(x.mean(1, keepdim=True)) if shared else None
    outer = x.abs().double() >= band_thresholds(x, partition, center)
    fi, fo = fit_rms_group(x, ~outer, center), fit_rms_group(x, outer, center)
    return {
        "signs": signs_to_bits(torch.where(outer, fo.signs[0], fi.signs[0])),
        "groups": outer,
        "mu": center if shared else torch.cat([fi.mu, fo.mu], 1),
        "alpha": torch.cat([fi.alphas[0], fo.alphas[0]], 1),
    }


def decode_band(p: dict[str, Tensor]) -> Tensor:
    """Inverse of ``encode_band``: μ_g + α_g·b with g the stored group (a shared μ is one column)."""
    s, g = bits_to_signs(p["signs"], p["mu"].dtype), p["groups"]
    mu, alpha = p["mu"], p["alpha"]
    return torch.where(g, mu[:, -1:] + alpha[:, 1:2] * s, mu[:, :1] + alpha[:, :1] * s)


def encode_haar(x: Tensor, dim: int, partition: str, shared: bool) -> dict[str, Tensor]:
    """Haar-transform ``x`` along ``dim``, binarize both bands; stored tensors concatenated along ``dim``."""
    bands = [encode_band(c, partition, shared) for c in haar_forward(x, dim)]
    return {k: torch.cat([b[k] for b in bands], dim) for k in bands[0]}


def decode_haar(p: dict[str, Tensor], dim: int, shared: bool, compat: bool) -> Tensor:
    """Inverse of ``encode_haar`` (with ``compat``: the reference's fp16 inverse constant)."""
    length = p["signs"].shape[dim]
    halves = ((length + 1) // 2, length // 2)
    per_band = {"mu": 1 if shared else 2, "alpha": 2}
    parts: list[dict[str, Tensor]] = [{}, {}]
    for key, t in p.items():
        sizes = halves if dim == 0 or key not in per_band else tuple(per_band[key] if h else 0 for h in halves)
        for part, piece in zip(parts, t.split(sizes, dim)):
            part[key] = piece.float() if t.is_floating_point() else piece
    low, high = (decode_band(part) for part in parts)
    return haar_inverse(low, high, dim, compat)


def fill_salient(w: Tensor, salient: Tensor, half: int = FILL_HALF_WINDOW) -> Tensor:
    """row-hbraq fill (§3): each salient column becomes the per-row mean of the non-salient columns within
    ±``half``, using the original values; with none there, the nearest non-salient column on the left,
    else on the right. One B × B mixing matrix for the whole block."""
    b = salient.numel()
    idx = torch.arange(b, device=w.device)
    keep = ~salient
    win = ((idx[:, None] - idx[None, :]).abs() <= half) & keep[:, None]  # [source j, target c]
    cnt = win.sum(0)
    left = torch.cummax(torch.where(keep, idx, -1), 0).values
    right = torch.cummin(torch.where(keep, idx, b).flip(0), 0).values.flip(0)
    near = torch.where(left >= 0, left, right).clamp_max(b - 1)
    mix = win.to(w.dtype) / cnt.clamp_min(1)
    mix[near, idx] += (cnt == 0).to(w.dtype)
    return torch.where(salient, w @ mix, w)


def hbllm_bits(params: dict[str, Tensor], weights: int) -> Bits:
    """Signs, group bits + column bitmap, fp16 floats of an HBLLM block."""
    sign = sum(params[f"{p}_signs"].numel() for p in ("ns", "sal"))
    groups = sum(params[f"{p}_groups"].numel() for p in ("ns", "sal"))
    floats = sum(params[f"{p}_{f}"].numel() for p in ("ns", "sal") for f in ("mu", "alpha"))
    return Bits(sign=sign, bitmap=groups + params["salient_cols"].numel(), params=floats * PARAM_BITS, weights=weights)


@dataclass
class HBraq:
    """Shared by both variants; ``fill`` (ClassVar) picks row-hbraq (fill + row Haar) or col-hbraq."""

    salient_metric: str = "l2"
    group_partition: str = "row"
    share_mean: bool = False
    haar_compat: bool = False

    fill: ClassVar[bool]

    def __post_init__(self) -> None:
        if self.salient_metric not in HBLLM_METRICS:
            raise ValueError(f"salient_metric must be one of {HBLLM_METRICS}, got {self.salient_metric!r}")
        if self.group_partition not in ("row", "global"):
            raise ValueError(f"group_partition must be row or global, got {self.group_partition!r}")

    def salient(self, w: Tensor, ctx: BlockContext) -> Tensor:
        """Salient column mask (B,): BiLLM's search on T = w²/d² (w for ``magnitude``), l2 or l1 score."""
        metric = "magnitude" if self.salient_metric == "magnitude" else "hessian"
        t = salient_metric(w, ctx.d, metric)
        return salient_columns(t, UP_LIM, 2, "l2" if self.salient_metric == "l2" else "l1")

    def encode(self, w: Tensor, salient: Tensor) -> dict[str, Tensor]:
        """Stored form of block ``w`` for a given salient column mask."""
        params = {"salient_cols": salient.clone()}
        if self.fill:
            ns = encode_haar(fill_salient(w, salient), 1, self.group_partition, self.share_mean)
            resid = w[:, salient] - decode_haar(ns, 1, self.share_mean, self.haar_compat)[:, salient]
        else:
            ns = encode_haar(w[:, ~salient], 0, self.group_partition, self.share_mean)
            resid = w[:, salient]
        sal = encode_haar(resid, 0, self.group_partition, False)
        params.update({f"ns_{k}": v for k, v in ns.items()}, **{f"sal_{k}": v for k, v in sal.items()})
        return {k: v.half() if v.is_floating_point() else v for k, v in params.items()}

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        salient = self.salient(w, ctx)
        params = self.encode(w, salient)
        q = self.decode_block(params, tuple(w.shape)).to(w.dtype)
        return BlockResult(q, params, hbllm_bits(params, w.numel()), {"salient_cols": int(salient.sum())})

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        salient = params["salient_cols"]
        part = {p: {k[len(p) + 1 :]: v for k, v in params.items() if k.startswith(p + "_")} for p in ("ns", "sal")}
        if self.fill:
            q = decode_haar(part["ns"], 1, self.share_mean, self.haar_compat)
        else:
            q = torch.zeros(shape, device=salient.device)
            q[:, ~salient] = decode_haar(part["ns"], 0, self.share_mean, self.haar_compat)
        q[:, salient] += decode_haar(part["sal"], 0, False, self.haar_compat)
        return q


@register("row-hbraq")
@dataclass
class RowHBraq(HBraq):
    fill: ClassVar[bool] = True


@register("col-hbraq")
@dataclass
class ColHBraq(HBraq):
    fill: ClassVar[bool] = False
