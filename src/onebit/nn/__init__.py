"""Packed modules: ``OnebitLinear`` and its kernels."""

from .linear import OnebitLinear, packed_modules, set_dense_cache

__all__ = ["OnebitLinear", "packed_modules", "set_dense_cache"]
