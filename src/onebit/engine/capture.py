"""Capture and replay of decoder-layer inputs (framework §2), for calibration and layer-wise evaluation.

Every decoder layer is replaced by a recorder for one forward pass: the first recorder stores the hidden
states entering layer 0 for every sample, and on the first sample *every* layer's recorder stores the
keyword arguments the model passes it (attention mask, position ids, rotary position embeddings, cache
position, …). Keeping them per layer handles models that give different layers different masks
(sliding-window layers of Qwen2/Mistral). Samples have equal length, so the kwargs are the same for all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models.base import ArchAdapter, find_module
from ..progress import track

_DROP_KWARGS = ("cache", "past_key_values", "past_key_value")


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    def __init__(self, layer: nn.Module, index: int, state: dict[str, Any]) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self.state = state

    def __getattr__(self, name: str) -> Any:  # model code may read layer attributes (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        st = self.state
        if self.index == 0:
            if st["inputs"] is None:
                st["inputs"] = st["alloc"]("inputs", (st["n"], *hidden_states.shape[1:]), st["store_dtype"])
            st["inputs"][st["i"] : st["i"] + 1] = hidden_states.detach()
        if st["first"]:
            kw = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
            kw["use_cache"] = False
            st["kwargs"].append(kw)
            st["args"].append(args)
            if self.index == st["last"]:
                raise _StopForward
            return hidden_states
        raise _StopForward


class ActivationBuffers:
    """Allocates calibration/evaluation activations: in RAM, or as memory-mapped files under ``offload_dir``
    (``--offload-acts``) when they do not fit."""

    def __init__(self, offload_dir: str | os.PathLike | None = None) -> None:
        self.dir = Path(offload_dir) if offload_dir else None

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if self.dir is None:
            return torch.empty(shape, dtype=dtype)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{name}.bin"
        path.unlink(missing_ok=True)
        numel = math.prod(shape)
        return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)

    def like(self, name: str, t: Tensor) -> Tensor:
        return self(name, tuple(t.shape), t.dtype)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move tensors inside (nested) tuples/lists/dicts to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    adapter: ArchAdapter,
    samples: Sequence[Tensor] | Tensor,
    device: torch.device | str = "cpu",
    store_dtype: torch.dtype | None = None,
    alloc: ActivationBuffers | None = None,
) -> tuple[Tensor, list[tuple[tuple, dict[str, Any]]]]:
    """Hidden states entering layer 0, shape (nsamples, seqlen, hidden) on the CPU (allocated by ``alloc``),
    and each layer's (args, kwargs). ``samples`` are token-id rows of equal length. Only the pre-layer
    modules run (they must be materialized; the layers may live on the meta device)."""
    layers = adapter.decoder_layers(model)
    store_dtype = store_dtype or next(model.parameters()).dtype  # meta parameters carry a dtype too
    state: dict[str, Any] = dict(
        inputs=None, kwargs=[], args=[], first=True, last=len(layers) - 1, store_dtype=store_dtype,
        alloc=alloc or ActivationBuffers(), n=len(samples), i=0,
    )
    originals = list(layers)
    pre = [m for m in (find_module(model, p) for p in adapter.pre_modules) if m is not None]
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Recorder(layer, i, state)
        for m in pre:
            m.to(device)
        for ids in track(samples, "capture inputs", transient=True):
            try:
                model(ids.reshape(1, -1).to(device), use_cache=False)
            except _StopForward:
                pass
            state["first"] = False
            state["i"] += 1
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        for m in pre:
            m.to("cpu")
        model.config.use_cache = use_cache
    return state["inputs"], list(zip(state["args"], state["kwargs"]))


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    inputs: Tensor,
    call: tuple[tuple, dict[str, Any]],
    device: torch.device | str = "cpu",
    out: Tensor | None = None,
    description: str | None = None,
) -> Tensor:
    """Replay one decoder layer over all samples (batch 1 each). ``out`` may be ``inputs`` (in place)."""
    args, kwargs = to_device(call, device)
    out = torch.empty_like(inputs) if out is None else out
    idx = range(inputs.shape[0])
    for j in track(idx, description, transient=True) if description else idx:
        y = layer(inputs[j : j + 1].to(device), *args, **kwargs)
        y = y[0] if isinstance(y, (tuple, list)) else y
        out[j : j + 1] = y.to(out.device, out.dtype)
    return out
