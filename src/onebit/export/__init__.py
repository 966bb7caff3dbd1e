"""Exports to other runtimes (GGUF Q1_0)."""
