"""Function-preserving float pre-passes applied before the layer loop (DBellQuant's dual-bell transform)."""

from .act_scales import compute_act_scales, load_act_scales, save_act_scales
from .dbell import LTDBOptions, apply_dbell, dual_bell_losses, init_scales, optimize_blocks

__all__ = [
    "LTDBOptions", "apply_dbell", "compute_act_scales", "dual_bell_losses", "init_scales", "load_act_scales",
    "optimize_blocks", "save_act_scales",
]
