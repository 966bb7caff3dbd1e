"""Calibration and evaluation corpora: from a data directory, the text bundled with onebit, or the Hub."""

from .corpora import CORPORA, DataSource, calib_eval_overlap, calibration_samples, data_source, eval_ids, resolve_data_dir

__all__ = ["CORPORA", "DataSource", "calib_eval_overlap", "calibration_samples", "data_source", "eval_ids", "resolve_data_dir"]
