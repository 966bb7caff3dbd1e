"""Small, JSON-serializable configuration (torchao style): what to quantize with, how to calibrate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .engine.pipeline import EngineOptions
from .methods import build_method
from .methods.base import Binarizer


@dataclass
class QuantConfig:
    """``method`` and its ``method_options`` (see ``onebit methods``), plus the engine's knobs:
    ``blocksize`` (column block = group size), ``percdamp`` (relative damping), ``gptq`` (block-only error
    compensation; False = the references' ``--disable_gptq``), ``true_sequential``, ``device``."""

    method: str = "braq"
    method_options: dict[str, Any] = field(default_factory=dict)
    blocksize: int = 128
    percdamp: float = 0.01
    gptq: bool = True
    true_sequential: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise ValueError("blocksize must be positive")
        if not 0 < self.percdamp < 1:
            raise ValueError("percdamp must be in (0, 1)")
        self.build_method()  # validates the method name and options early

    def build_method(self) -> Binarizer:
        return build_method(self.method, **self.method_options)

    def engine_options(self) -> EngineOptions:
        return EngineOptions(self.blocksize, self.percdamp, self.gptq, self.true_sequential, self.device)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method_options"] = dataclasses.asdict(self.build_method())  # defaults made explicit
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        return cls(**d)


@dataclass
class CalibConfig:
    """Calibration set: ``dataset`` name, ``nsamples`` windows of ``seqlen`` tokens, ``seed``."""

    dataset: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
