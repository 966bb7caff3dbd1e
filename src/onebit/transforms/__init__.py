"""Function-preserving float pre-passes applied before the layer loop (DBellQuant's dual-bell transform,
QuaRot-style rotation)."""

from .act_scales import compute_act_scales, load_act_scales, save_act_scales
from .dbell import LTDBOptions, apply_dbell, dual_bell_losses, init_scales, optimize_blocks
from .rotate import RotateOptions, apply_rotation, random_hadamard, random_orthogonal

__all__ = [
    "LTDBOptions", "RotateOptions", "apply_dbell", "apply_rotation", "compute_act_scales", "dual_bell_losses",
    "init_scales", "load_act_scales", "optimize_blocks", "random_hadamard", "random_orthogonal", "save_act_scales",
]
