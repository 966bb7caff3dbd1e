"""Calibration and evaluation corpora, read from a local data directory (no downloads)."""

from .corpora import CORPORA, calibration_samples, eval_ids, resolve_data_dir

__all__ = ["CORPORA", "calibration_samples", "eval_ids", "resolve_data_dir"]
