"""Binarization methods. Importing this package registers every built-in method."""

from . import arb, braq, ggml, hbllm, lean, sign, ternary, uniform, vq  # noqa: F401  (registration side effects)
from .base import BlockContext, BlockResult, Binarizer, Bits, available_methods, build_method, method_options

__all__ = ["BlockContext", "BlockResult", "Binarizer", "Bits", "available_methods", "build_method", "method_options"]
