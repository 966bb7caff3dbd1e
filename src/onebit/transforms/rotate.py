"""Rotation pre-pass (QuaRot / SpinQuant style), a float pre-pass that composes with any method.

1. ``fuse_norms``: every norm's weight γ goes into the linears that read it (W ← W·diag(γ)), a LayerNorm's
   bias β into their biases (b ← b + W·β); the norm becomes unit-weight. A norm whose readers have no bias
   (OPT's final LayerNorm → lm_head) keeps β ⊘ γ as its bias.
2. LayerNorm only (OPT): ``center_writers`` subtracts the mean over the hidden dimension from every tensor
   written to the residual stream (embeddings, positions, out_proj/fc2 rows and biases). A LayerNorm only
   sees the centered stream, so nothing changes, and afterwards the stream has zero mean: its LayerNorms
   compute RMSNorm (SliceGPT's LayerNorm → RMSNorm conversion, without changing the module class).
3. ``rotate_model``: residual stream x ← x·Q with Q orthogonal (a randomized Hadamard): E ← E·Q, readers
   W ← W·Q, writers W ← Qᵀ·W (and b ← Qᵀ·b), lm_head ← lm_head·Q (untied from the embedding first).
   RMSNorm(x·Q) = RMSNorm(x)·Q for a unit-weight norm; a LayerNorm also subtracts the mean, which commutes
   with Q only when Q·1 = 1, so OPT gets ``fix_mean_direction(Q)``.
4. Optional ``rotate_heads`` (per-head Hadamard between v_proj's rows and o_proj's columns, folded) and
   ``rotate_down`` (online Hadamard on down_proj's input: W ← W·H folded, x ← x·H by a forward pre-hook).

Everything is computed in float64 and cast back; the model stays the same transformers class.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..models.base import ArchAdapter, LinearGroup, find_module, get_module

HADAMARD_KIND = "random_hadamard"


@dataclass(frozen=True)
class RotateOptions:
    """``seed`` of the residual rotation (heads use seed + 1, the down projections seed + 2: ``down_spec``)."""

    seed: int = 0
    heads: bool = False
    down: bool = False


def sylvester(n: int) -> Tensor:
    """The ±1 Sylvester Hadamard matrix of order ``n`` (a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _orthogonal(n: int, gen: torch.Generator) -> Tensor:
    """Haar-random orthogonal: QR of a Gaussian, columns' signs fixed so that diag(R) > 0."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A seeded Haar-random orthogonal n × n matrix (float64)."""
    return _orthogonal(n, torch.Generator().manual_seed(seed))


@lru_cache(maxsize=16)
def _hadamard_factors(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """(±1 signs (n,), random orthogonal R_m of the odd part m of n), float64; read-only."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return signs, _orthogonal(n // (n & -n), gen).contiguous()


def random_hadamard(n: int, seed: int) -> Tensor:
    """Seeded orthogonal n × n (float64): diag(±1)·(H_{2^k}/√2^k ⊗ R_m) with 2^k the largest power of two
    dividing n and R_m a random orthogonal of the odd rest m (576 = 64·9, 1536 = 512·3; odd n: R_n alone)."""
    p = n & -n
    signs, rest = _hadamard_factors(n, seed)
    return signs[:, None] * torch.kron(sylvester(p) / math.sqrt(p), rest)


@lru_cache(maxsize=16)
def _factors_on(n: int, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return tuple(t.to(device, dtype) for t in _hadamard_factors(n, seed))


def apply_hadamard(x: Tensor, seed: int) -> Tensor:
    """x·random_hadamard(n, seed) over the last dim without the n × n matrix: signs, a fast Walsh–Hadamard
    transform over the 2^k factor (log2(2^k) butterfly stages), then R_m: O(n·(log 2^k + m)) per row."""
    n = x.shape[-1]
    p, m = n & -n, n // (n & -n)
    signs, rest = _factors_on(n, seed, x.device, x.dtype)
    y = (x * signs).reshape(-1, p, m)
    h = 1
    while h < p:  # Sylvester order: index = block·2h + half·h + j
        y = y.reshape(-1, p // (2 * h), 2, h, m)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), 2)
        h *= 2
    return ((y.reshape(-1, p, m) @ rest) / math.sqrt(p)).reshape(x.shape)


def fix_mean_direction(q: Tensor) -> Tensor:
    """Q·S, S the Householder reflection taking u = 1/√n to Qᵀu: orthogonal, and (Q·S)·1 = 1, so the
    rotation commutes with a LayerNorm's mean subtraction (it moves a single direction of Q)."""
    u = torch.full((q.shape[0],), q.shape[0] ** -0.5, dtype=q.dtype)
    w = u - q.T @ u
    ww = w @ w
    return q if ww < 1e-24 else q - 2 * torch.outer(q @ w, w) / ww


@torch.no_grad()
def _right(p: Tensor, m: Tensor) -> None:
    """p ← p·m (a weight's input columns)."""
    p.copy_((p.double() @ m.to(p.device)).to(p.dtype))


@torch.no_grad()
def _left(p: Tensor | None, m: Tensor) -> None:
    """p ← mᵀ·p (a weight's output rows, or a bias)."""
    if p is not None:
        p.copy_((m.T.to(p.device) @ p.double()).to(p.dtype))


def _readers(adapter: ArchAdapter) -> list[LinearGroup]:
    """Groups fed by a norm: they read the residual stream."""
    return [g for g in adapter.groups if g.feeder_kind == "norm"]


def _writers(adapter: ArchAdapter) -> list[str]:
    """The linears whose output is added to the residual stream (o_proj/down_proj; OPT out_proj/fc2): in
    the supported pre-norm layouts, the groups fed by another linear."""
    return [n for g in adapter.groups if g.feeder_kind == "linear" for n in g.linears]


def _group(adapter: ArchAdapter, name: str) -> LinearGroup:
    return next(g for g in adapter.groups if g.name == name)


def _embeddings(model: nn.Module, adapter: ArchAdapter) -> list[nn.Embedding]:
    """Token (and OPT's learned position) embeddings: their rows are written to the residual stream."""
    return [m for m in (find_module(model, p) for p in adapter.pre_modules) if isinstance(m, nn.Embedding)]


def check_rotatable(model: nn.Module, adapter: ArchAdapter) -> None:
    """Refuse layouts the fold does not cover: post-norm OPT, projections around the residual stream."""
    if getattr(model.config, "do_layer_norm_before", True) is False:
        raise ValueError("rotation needs pre-norm layers (OPT with do_layer_norm_before=False is post-norm)")
    for path in (*adapter.pre_modules, *adapter.post_modules):
        if isinstance(find_module(model, path), nn.Linear):
            raise ValueError(f"rotation does not support {path} (word_embed_proj_dim != hidden_size)")


def untie_lm_head(model: nn.Module, adapter: ArchAdapter) -> bool:
    """Give lm_head its own weight (the embedding and the head get different transforms), also in the
    config so that a reload keeps them apart. Returns whether they were tied."""
    head = get_module(model, adapter.lm_head)
    tied = head.weight is model.get_input_embeddings().weight
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return tied


@torch.no_grad()
def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    gamma = norm.weight.double()
    beta = norm.bias.double() if getattr(norm, "bias", None) is not None else None
    into_bias = beta is not None and all(lin.bias is not None for lin in readers)
    for lin in readers:
        if into_bias:
            lin.bias.add_((lin.weight.double() @ beta.to(lin.weight.device)).to(lin.bias.dtype))
        _right(lin.weight, torch.diag(gamma))
    if beta is not None:
        if not into_bias and bool(((gamma == 0) & (beta != 0)).any()):
            raise ValueError("a LayerNorm with γ = 0 and β ≠ 0 feeding bias-free linears cannot be folded")
        norm.bias.copy_(torch.zeros_like(beta) if into_bias else torch.where(gamma == 0, 0.0, beta / gamma))
    norm.weight.fill_(1)


def fuse_norms(model: nn.Module, adapter: ArchAdapter) -> int:
    """Fold every decoder norm into its readers and the final norm into lm_head. Returns the norms folded."""
    layers = adapter.decoder_layers(model)
    for layer in layers:
        for g in _readers(adapter):
            _fold_norm(get_module(layer, g.feeder), [get_module(layer, n) for n in g.linears])
    _fold_norm(get_module(model, adapter.final_norm), [get_module(model, adapter.lm_head)])
    return len(layers) * len(_readers(adapter)) + 1


@torch.no_grad()
def center_writers(model: nn.Module, adapter: ArchAdapter) -> None:
    """Subtract the hidden-dimension mean from everything written to the residual stream (W ← M·W with
    M = I − 11ᵀ/d): exact when every reader is a LayerNorm, and the stream becomes zero-mean."""
    d = model.config.hidden_size
    m = torch.eye(d, dtype=torch.float64) - 1 / d
    for emb in _embeddings(model, adapter):
        _right(emb.weight, m)
    for layer in adapter.decoder_layers(model):
        for name in _writers(adapter):
            lin = get_module(layer, name)
            _left(lin.weight, m)
            _left(lin.bias, m)


@torch.no_grad()
def rotate_model(model: nn.Module, adapter: ArchAdapter, q: Tensor) -> None:
    """Rotate the residual stream by ``q`` (norms already fused, lm_head untied)."""
    for emb in _embeddings(model, adapter):
        _right(emb.weight, q)
    for layer in adapter.decoder_layers(model):
        for g in _readers(adapter):
            for n in g.linears:
                _right(get_module(layer, n).weight, q)
        for n in _writers(adapter):
            lin = get_module(layer, n)
            _left(lin.weight, q)
            _left(lin.bias, q)
    _left(getattr(get_module(model, adapter.final_norm), "bias", None), q)
    _right(get_module(model, adapter.lm_head).weight, q)


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def rotate_heads(model: nn.Module, adapter: ArchAdapter, seed: int) -> int:
    """One Hadamard H of head_dim for every head: v_proj rows ← Hᵀ per kv head, o_proj columns ← ·H per
    query head (every query head sharing a kv head sees the same H). Returns head_dim."""
    d = head_dim(model.config)
    h = random_hadamard(d, seed)
    group = _group(adapter, "attn_out")
    for layer in adapter.decoder_layers(model):
        v, o = get_module(layer, group.feeder), get_module(layer, group.linears[0])
        per_v = torch.kron(torch.eye(v.out_features // d, dtype=h.dtype), h)
        _left(v.weight, per_v)
        _left(v.bias, per_v)
        _right(o.weight, torch.kron(torch.eye(o.in_features // d, dtype=h.dtype), h))
    return d


def _rotate_input(seed: int, module: nn.Module, args: tuple) -> tuple:
    return (apply_hadamard(args[0], seed), *args[1:])


def down_spec(seed: int) -> dict[str, Any]:
    """The online transform entry of the down projections for rotate seed ``seed`` (packed manifest form)."""
    return dict(kind=HADAMARD_KIND, seed=seed + 2)


def transform_seed(spec: dict[str, Any]) -> int:
    """The seed of an online transform entry (the only kind: ``random_hadamard``, applied by ``apply_hadamard``)."""
    if spec.get("kind") != HADAMARD_KIND:
        raise ValueError(f"unknown input_transform kind {spec.get('kind')!r}")
    return int(spec["seed"])


def down_input_transforms(adapter: ArchAdapter, names: Iterable[str], seed: int) -> dict[str, dict[str, Any]]:
    """{module: entry} for the down projections (the ``mlp_out`` group's linear) among full module ``names``."""
    rel = "." + _group(adapter, "mlp_out").linears[0]
    return {n: down_spec(seed) for n in names if n.endswith(rel)}


@torch.no_grad()
def rotate_down(model: nn.Module, adapter: ArchAdapter, seed: int) -> list[RemovableHandle]:
    """Online H = random_hadamard(n, seed) on every down projection's input: W ← W·H folded, x ← x·H by a
    forward pre-hook (registered now, so it runs before any activation fake quant). Returns the handles."""
    rel = _group(adapter, "mlp_out").linears[0]
    handles = []
    for layer in adapter.decoder_layers(model):
        lin = get_module(layer, rel)
        _right(lin.weight, random_hadamard(lin.in_features, seed))
        handles.append(lin.register_forward_pre_hook(partial(_rotate_input, seed)))
    return handles


def apply_rotation(model: nn.Module, adapter: ArchAdapter, opts: RotateOptions = RotateOptions()) -> dict[str, Any]:
    """The whole pre-pass in place (float function unchanged). Returns the report's stats."""
    t0 = time.perf_counter()
    check_rotatable(model, adapter)
    tied = untie_lm_head(model, adapter)
    layer_norm = isinstance(get_module(model, adapter.final_norm), nn.LayerNorm)
    norms = fuse_norms(model, adapter)
    if layer_norm:
        center_writers(model, adapter)
    hidden = model.config.hidden_size
    q = random_hadamard(hidden, opts.seed)
    rotate_model(model, adapter, fix_mean_direction(q) if layer_norm else q)
    p = hidden & -hidden
    stats: dict[str, Any] = dict(
        mode="rotate", seed=opts.seed, norms_fused=norms, residual=f"{HADAMARD_KIND} {hidden} = {p}·{hidden // p}",
        centered_layernorm=layer_norm, lm_head_untied=tied, folded=["residual"],
    )
    if opts.heads:
        stats["head_dim"] = rotate_heads(model, adapter, opts.seed + 1)
        stats["folded"].append("heads")
    if opts.down:
        spec = down_spec(opts.seed)
        n = len(rotate_down(model, adapter, spec["seed"]))
        stats["online"] = dict(spec, modules=n, linear=_group(adapter, "mlp_out").linears[0])
    stats["seconds"] = time.perf_counter() - t0
    return stats
