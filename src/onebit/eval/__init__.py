"""Evaluation: perplexity exactly as the papers compute it."""

from .ppl import perplexity

__all__ = ["perplexity"]
