"""What ``onebit.quantize`` does to the float model before the layer loop: transform, then act quant hooks."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..engine.actquant import install_act_quant
from ..models.base import ArchAdapter
from ..timing import timed
from .act_scales import compute_act_scales, load_act_scales
from .dbell import LTDBOptions, apply_dbell
from .rotate import RotateOptions, apply_rotation

if TYPE_CHECKING:
    from ..config import QuantConfig

log = logging.getLogger("onebit")


@timed("transform")
def apply_prepass(
    model: nn.Module, adapter: ArchAdapter, config: QuantConfig, calib_data: Tensor
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Apply ``config.transform`` (dbell: act scales from ``config.act_scales`` or from ``calib_data``;
    rotate: its online hooks first), then install the ``config.act_bits`` fake-quant hooks; all hooks stay on
    the model. Returns ({linear: T} for dbell, stats)."""
    scales: dict[str, Tensor] = {}
    stats: dict[str, Any] = {}
    if config.transform == "dbell":
        if config.act_scales is not None:
            act = load_act_scales(config.act_scales)
        else:
            log.info("computing act scales from the %d calibration windows", calib_data.shape[0])
            act = compute_act_scales(model, adapter, calib_data, config.device)
        mode = config.ltdb_opt if adapter.family == "opt" else "ltdb"
        opts = LTDBOptions(epochs=config.ltdb_epochs, lr=config.ltdb_lr, p=config.ltdb_p)
        scales, stats = apply_dbell(model, adapter, act, opts, mode)
    elif config.transform == "rotate":
        stats = apply_rotation(model, adapter, RotateOptions(config.rotate_seed, config.rotate_heads, config.rotate_down))
    if config.act_bits is not None:
        install_act_quant(model, adapter, config.act_bits)
    return scales, stats
