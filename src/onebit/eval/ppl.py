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

from ..engine.capture import capture_inputs, run_layer
from ..models.base import ArchAdapter, find_module, get_module
from ..progress import track


def windows(ids: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """(nwin, seqlen) non-overlapping windows of a (1, N) token tensor; the tail is dropped."""
    nwin = ids.numel() // seqlen
    if max_windows is not None:
        nwin = min(nwin, max_windows)
    if nwin == 0:
        raise ValueError(f"test text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids.reshape(-1)[: nwin * seqlen].reshape(nwin, seqlen)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    adapter: ArchAdapter,
    ids: Tensor,
    seqlen: int,
    device: str = "cpu",
    max_windows: int | None = None,
) -> float:
    """Perplexity of ``model`` on token ids (1, N); only one decoder layer is on ``device`` at a time."""
    win = windows(ids, seqlen, max_windows)
    hidden, calls = capture_inputs(model, adapter, win, device)
    for idx, layer in enumerate(track(adapter.decoder_layers(model), "evaluate layers")):
        layer.to(device)
        run_layer(layer, hidden, calls[idx], device, out=hidden)
        layer.to("cpu")
    post = [m for m in (find_module(model, p) for p in adapter.post_modules) if m is not None]
    head = get_module(model, adapter.lm_head)
    for m in (*post, head):
        m.to(device)
    nll = 0.0
    try:
        for j in range(win.shape[0]):
            h = hidden[j : j + 1].to(device)
            for m in post:
                h = m(h)
            logits = head(h)[0].float()
            loss = F.cross_entropy(logits[:-1], win[j, 1:].to(device))
            nll += float(loss) * seqlen
    finally:
        for m in (*post, head):
            m.to("cpu")
    return math.exp(nll / (win.shape[0] * seqlen))
