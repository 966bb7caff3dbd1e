"""Corpora built as the papers build them; sampling; clear errors for missing files."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch

from conftest import CharTokenizer, write_tiny_data
from onebit.data import calibration_samples, eval_ids
from onebit.data.corpora import resolve_data_dir


def test_wikitext2_test_is_rows_joined_with_blank_lines(tmp_path):
    root = write_tiny_data(tmp_path)
    raw = (root / "wikitext-2-raw" / "wiki.test.raw").read_text()
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    expected = CharTokenizer()("\n\n".join(rows)).input_ids
    assert eval_ids("wikitext2", CharTokenizer(), root).tolist() == [expected]


def test_ptb_test_is_stripped_sentences_joined_with_spaces(tmp_path):
    root = write_tiny_data(tmp_path)
    lines = (root / "ptb" / "ptb.test.txt").read_text().splitlines()
    expected = CharTokenizer()(" ".join(l.strip() for l in lines)).input_ids
    assert eval_ids("ptb", CharTokenizer(), root)[0].tolist() == expected


def test_calibration_windows_follow_the_seeded_recipe(tmp_path, caplog):
    root = write_tiny_data(tmp_path)
    samples, source = calibration_samples("wikitext2", CharTokenizer(), 5, 64, seed=0, data_dir=root)
    assert source == "wikitext2:valid" and "validation split" in caplog.text  # no train file here
    raw = (root / "wikitext-2-raw" / "wiki.valid.raw").read_text()
    ids = CharTokenizer()(" ".join(l if l.strip() else "" for l in raw.splitlines(keepends=True))).input_ids
    rng = random.Random(0)
    starts = [rng.randint(0, len(ids) - 64 - 1) for _ in range(5)]
    assert samples.tolist() == [ids[i : i + 64] for i in starts]


def test_c4_samples_only_documents_longer_than_seqlen(tmp_path):
    (tmp_path / "c4").mkdir()
    docs = ["short doc"] * 20 + ["x" * 300, "y" * 500]
    with gzip.open(tmp_path / "c4" / "c4-validation.00000-of-00008.json.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    samples, source = calibration_samples("c4", CharTokenizer(), 6, 100, data_dir=tmp_path)
    assert source == "c4:valid" and samples.shape == (6, 100)
    assert all(set(row.tolist()) <= {ord("x"), ord("y")} for row in samples)
    with pytest.raises(ValueError, match="no document longer"):
        calibration_samples("c4", CharTokenizer(), 1, 1000, data_dir=tmp_path)


def test_missing_file_names_the_file_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"wikitext-2-raw/wiki.test.raw.*--data-dir"):
        eval_ids("wikitext2", CharTokenizer(), tmp_path)
    with pytest.raises(FileNotFoundError, match="ptb/ptb.train.txt"):
        calibration_samples("ptb", CharTokenizer(), 1, 8, data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        eval_ids("imagenet", CharTokenizer(), tmp_path)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEBIT_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"


def test_shared_files_load(data_dir):
    """The real files: raw WikiText-2 test has the known size; C4 eval keeps the papers' 256-window cap."""
    ids = eval_ids("wikitext2", CharTokenizer(), data_dir)
    raw = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text()
    lines = raw.splitlines(keepends=True)
    blank_chars = sum(len(line) for line in lines if not line.strip())
    assert ids.numel() == len(raw) - blank_chars + 2 * (len(lines) - 1)  # blank rows become '', "\n\n" between
    c4 = eval_ids("c4", CharTokenizer(), data_dir, seqlen=64)
    assert c4.numel() == 256 * 64
    assert torch.is_tensor(eval_ids("shakespeare", CharTokenizer(), data_dir))
