"""Architecture adapters and model loading."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import ArchAdapter, LinearGroup, find_module, get_module
from .llama import LLAMA
from .opt import OPT
from .qwen import QWEN

ADAPTERS: tuple[ArchAdapter, ...] = (LLAMA, QWEN, OPT)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for a causal LM, chosen by ``config.model_type`` (never by the path's name)."""
    return adapter_for_type(getattr(getattr(model, "config", None), "model_type", None))


def adapter_for_type(model_type: str | None, where: str = "") -> ArchAdapter:
    """The adapter for ``config.model_type``; ``where`` (e.g. the config file) goes into the error."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    families = "; ".join(f"{a.family}: {', '.join(a.model_types)}" for a in ADAPTERS)
    raise UnsupportedModelError(f"unsupported architecture {model_type!r}{f' ({where})' if where else ''}",
                                hint=f"Supported model types — {families}")


__all__ = ["ADAPTERS", "ArchAdapter", "adapter_for_type", "LinearGroup", "find_module", "get_adapter", "get_module", "supported_model_types"]
