"""Per-channel activation maxima max_t |x_tj| of every decoder linear's input (DBellQuant §4).

Computed layer by layer on the float model from calibration windows (no download), keyed by the full
module name (``model.layers.{i}.self_attn.q_proj``), stored as safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..engine.capture import capture_inputs, run_layer
from ..files import atomic_output
from ..models.base import ArchAdapter
from ..progress import track


@torch.no_grad()
def compute_act_scales(
    model: nn.Module, adapter: ArchAdapter, samples: Tensor, device: str = "cpu"
) -> dict[str, Tensor]:
    """{module name: float32 CPU tensor [in_features]} of the running max of |input| over all tokens."""
    scales: dict[str, Tensor] = {}

    def record(key: str, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        m = x.abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()
        scales[key] = torch.maximum(scales[key], m) if key in scales else m

    inps, calls = capture_inputs(model, adapter, samples, device)
    layers = adapter.decoder_layers(model)
    for idx in track(range(len(layers)), "act scales"):
        layer = layers[idx].to(device)
        hooks = [
            lin.register_forward_pre_hook(lambda mod, args, key=f"{adapter.layers}.{idx}.{name}": record(key, mod, args))
            for name, lin in adapter.linears(layer).items()
        ]
        try:
            run_layer(layer, inps, calls[idx], device, out=inps)
        finally:
            for h in hooks:
                h.remove()
            layers[idx] = layer.to("cpu")
    return scales


def save_act_scales(scales: dict[str, Tensor], path: str | Path) -> None:
    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in scales.items()}, str(tmp))


def load_act_scales(path: str | Path) -> dict[str, Tensor]:
    return load_file(str(path))
