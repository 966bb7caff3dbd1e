"""Declarative architecture adapters (GPTQModel style): where the layers, norms and linears live.

Module paths are dotted attribute paths from the causal-LM object (model level) or from one decoder
layer (layer level). ``groups`` lists a decoder layer's linears in execution order, each with the module
that feeds it: a norm (foldable per-channel transforms, DBellQuant) or a linear.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LinearGroup:
    name: str
    linears: tuple[str, ...]
    feeder: str
    feeder_kind: str  # "norm" | "linear"


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    model_types: tuple[str, ...]
    layers: str
    pre_modules: tuple[str, ...]  # run before the first decoder layer (embeddings, rotary)
    final_norm: str
    post_modules: tuple[str, ...]  # after the last layer, before lm_head, in order (final norm, projections)
    lm_head: str
    groups: tuple[LinearGroup, ...]

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model, self.layers)

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The layer's quantizable linears by relative name, in execution order."""
        return {name: get_module(layer, name) for g in self.groups for name in g.linears}


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return get_module(root, path)
    except AttributeError:
        return None
