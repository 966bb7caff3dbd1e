"""The Python entry point: ``onebit.quantize(model, config, calib_data)``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .config import QuantConfig
from .engine.pipeline import LayerCallback, LayerRecord, quantize_model_layers, total_bits
from .methods.base import Bits
from .models import get_adapter


@dataclass
class QuantResult:
    """What quantization did: per-layer records, bit totals over all quantized linears, wall seconds."""

    config: QuantConfig
    layers: list[LayerRecord]
    bits: Bits
    seconds: float

    @property
    def paper_bpw(self) -> float:
        return self.bits.paper_bpw

    @property
    def storage_bpw(self) -> float:
        return self.bits.storage_bpw

    def to_dict(self) -> dict[str, Any]:
        return dict(
            config=self.config.to_dict(), paper_bpw=self.paper_bpw, storage_bpw=self.storage_bpw,
            bits=self.bits.to_dict(), seconds=self.seconds, layers=[r.to_dict() for r in self.layers],
        )


def quantize(
    model: nn.Module,
    config: QuantConfig | None = None,
    calib_data: Tensor | None = None,
    on_layer: LayerCallback | None = None,
) -> QuantResult:
    """Binarize ``model``'s decoder linears in place (fake-quantized weights) and return the record.

    ``calib_data``: token ids (nsamples, seqlen), e.g. from ``onebit.data.calibration_samples``.
    """
    config = config or QuantConfig()
    if calib_data is None or calib_data.dim() != 2 or calib_data.shape[0] == 0:
        raise ValueError("calib_data must be a (nsamples, seqlen) tensor of token ids")
    check_seqlen(model, calib_data.shape[1])
    adapter = get_adapter(model)
    t0 = time.perf_counter()
    layers = quantize_model_layers(model, adapter, calib_data, config.build_method(), config.engine_options(), on_layer)
    return QuantResult(config, layers, total_bits(layers), time.perf_counter() - t0)


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    """A window longer than the model's context gives meaningless results: refuse it."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise ValueError(f"seqlen {seqlen} exceeds the model's context of {limit} tokens (max_position_embeddings)")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
