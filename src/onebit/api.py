"""The Python entry point: ``onebit.quantize(model, config, calib_data)``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .checks import context
from .config import QuantConfig
from .errors import InputError
from .engine.capture import ActivationBuffers
from .engine.checkpoint import LayerCheckpoint
from .engine.distributed import init_from_env, rank_world
from .engine.pipeline import LayerCallback, LayerRecord, linear_shapes, quantize_model_layers, total_bits
from .engine.plan import Plan
from .engine.store import StreamedModel, layer_store
from .methods.base import Bits
from .transforms.prepass import apply_prepass


@dataclass
class QuantResult:
    """What quantization did: per-layer records, bit totals over all quantized linears, wall seconds."""

    config: QuantConfig
    layers: list[LayerRecord]
    bits: Bits
    seconds: float
    transform: dict[str, Any] = field(default_factory=dict)  # pre-pass stats (dbell, rotate)
    transform_scales: dict[str, Tensor] = field(default_factory=dict, repr=False)  # {linear: T}, not serialized
    budget: dict[str, Any] | None = None  # the bit budget's summary (engine/budget.py), when the run had one

    @property
    def paper_bpw(self) -> float:
        return self.bits.paper_bpw

    @property
    def storage_bpw(self) -> float:
        return self.bits.storage_bpw

    def to_dict(self) -> dict[str, Any]:
        return dict(
            config=self.config.to_dict(), paper_bpw=self.paper_bpw, storage_bpw=self.storage_bpw,
            bits=self.bits.to_dict(), seconds=self.seconds, transform=self.transform,
            layers=[r.to_dict() for r in self.layers], **({"budget": self.budget} if self.budget else {}),
        )


def quantize(
    model: nn.Module | StreamedModel,
    config: QuantConfig | None = None,
    calib_data: Tensor | None = None,
    on_layer: LayerCallback | None = None,
    checkpoint: LayerCheckpoint | None = None,
    resume: bool = False,
    offload_acts: str | os.PathLike | None = None,
) -> QuantResult:
    """Binarize the decoder linears (fake-quantized weights, in place) and return the record.

    ``model``: a loaded causal LM, or a ``StreamedModel`` (layers read from disk one at a time; results go
    to ``checkpoint``). ``calib_data``: token ids (nsamples, seqlen), e.g. from
    ``onebit.data.calibration_samples``. ``checkpoint``/``resume``: write each finished layer, and skip the
    layers already written. ``offload_acts``: keep calibration activations in memory-mapped files there.
    Under ``torchrun`` the samples are split over the ranks (see ``engine.distributed``).
    """
    config = config or QuantConfig()
    if calib_data is None or calib_data.dim() != 2 or calib_data.shape[0] == 0:
        raise ValueError("calib_data must be a (nsamples, seqlen) tensor of token ids")
    net, adapter, store = layer_store(model)
    check_seqlen(net, calib_data.shape[1])
    init_from_env(config.device)
    rank, world = rank_world()
    if calib_data.shape[0] < world:
        raise InputError(f"{calib_data.shape[0]} calibration samples cannot be split over {world} processes",
                         hint="Use --nsamples of at least the number of processes")
    t0 = time.perf_counter()
    plan = start_plan(model, config)  # a bit budget's probes count in the run's seconds
    if isinstance(model, StreamedModel):
        if config.transform != "none" or config.act_bits is not None:
            raise InputError("transforms and activation quantization need the whole model in memory", hint="Drop --stream")
        scales, transform = {}, {}
    else:
        scales, transform = apply_prepass(net, adapter, config, calib_data)  # transform (dbell | rotate) + act quant hooks
    layers = quantize_model_layers(
        net, adapter, calib_data[rank::world], plan, config.engine_options(), on_layer,
        store=store, checkpoint=checkpoint, resume=resume, buffers=ActivationBuffers(offload_acts),
    )
    return QuantResult(config, layers, total_bits(layers), time.perf_counter() - t0, transform, scales, plan.summary())


def start_plan(model: nn.Module | StreamedModel, config: QuantConfig) -> Plan:
    """The run's plan, started on the model's linears: a bit budget measures its floors here and refuses a
    budget below them (``InputError``) before any work."""
    net, adapter, _ = layer_store(model)
    plan = config.plan()
    plan.start(linear_shapes(net, adapter))
    return plan


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    """A window longer than the model's context gives meaningless results: refuse it."""
    context(getattr(model.config, "max_position_embeddings", None), seqlen, "seqlen")
