"""Perplexity exactly as GPTQ/BiLLM compute it (framework §5), run layer by layer to bound memory.

Non-overlapping windows of ``seqlen`` tokens from one tokenization of the whole test text, the tail
dropped, no BOS per window; per window the mean CE over seqlen−1 predictions is scaled by seqlen (the GPTQ
convention) and ppl = exp(Σ nll / (windows·seqlen)) = exp(mean window loss). CE is computed in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..engine.capture import ActivationBuffers, capture_inputs, run_layer
from ..engine.store import StreamedModel, layer_store
from ..errors import InputError
from ..models.base import find_module, get_module
from ..progress import track
from ..timing import timed


def windows(ids: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """(nwin, seqlen) non-overlapping windows of a (1, N) token tensor; the tail is dropped."""
    nwin = ids.numel() // seqlen
    if max_windows is not None:
        nwin = min(nwin, max_windows)
    if nwin == 0:
        raise InputError(f"test text has {ids.numel()} tokens, fewer than one window of {seqlen}",
                         hint="Lower the evaluation seqlen")
    return ids.reshape(-1)[: nwin * seqlen].reshape(nwin, seqlen)


@torch.no_grad()
@timed("evaluation")
def perplexity(
    model: nn.Module | StreamedModel,
    ids: Tensor,
    seqlen: int,
    device: str = "cpu",
    max_windows: int | None = None,
    buffers: ActivationBuffers | None = None,
) -> float:
    """Perplexity on token ids (1, N). Only one decoder layer is materialized and on ``device`` at a time,
    so a ``StreamedModel`` is evaluated without ever holding all its weights."""
    net, adapter, store = layer_store(model)
    win = windows(ids, seqlen, max_windows)
    store.materialize(adapter.pre_modules)
    hidden, calls = capture_inputs(net, adapter, win, device, alloc=buffers)
    store.dematerialize(adapter.pre_modules)
    for idx in track(range(len(adapter.decoder_layers(net))), "evaluate layers"):
        layer = store.load(idx).to(device)
        run_layer(layer, hidden, calls[idx], device, out=hidden)
        store.release(idx, layer.to("cpu"))
    tail = [p for p in (*adapter.post_modules, adapter.lm_head) if find_module(net, p) is not None]
    store.materialize(tail)
    mods = [get_module(net, p).to(device) for p in tail]
    nll = 0.0
    try:
        for j in range(win.shape[0]):
            h = hidden[j : j + 1].to(device)
            for m in mods:
                h = m(h)
            loss = F.cross_entropy(h[0].float()[:-1], win[j, 1:].to(device))
            nll += float(loss) * seqlen
    finally:
        for m in mods:
            m.to("cpu")
        store.dematerialize(tail)
    return math.exp(nll / (win.shape[0] * seqlen))
