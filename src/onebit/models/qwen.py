"""Qwen2, Qwen2.5 (model_type qwen2) and Qwen3: the LLaMA layout (Qwen3 adds q/k norms inside attention)."""

from dataclasses import replace

from .llama import LLAMA

QWEN = replace(LLAMA, family="qwen", model_types=("qwen2", "qwen3"))
