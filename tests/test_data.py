"""Corpora built as the papers build them; where the text comes from; sampling; clear errors for bad files."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch

from conftest import CharTokenizer, write_tiny_data
from onebit.data import DataSource, calib_eval_overlap, calibration_samples, data_source, eval_ids
from onebit.data.corpora import BUNDLED, resolve_data_dir


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


def test_data_source_resolution(tmp_path, monkeypatch):
    """--data-dir > $ONEBIT_DATA > ../shared/data > the bundled text; a directory named explicitly must exist."""
    from onebit.data import corpora

    monkeypatch.setenv("ONEBIT_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    (tmp_path / "x").mkdir()
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    with pytest.raises(FileNotFoundError, match=r"data directory .*nope .*does not exist"):
        data_source(tmp_path / "nope")
    monkeypatch.delenv("ONEBIT_DATA")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(corpora, "__file__", str(tmp_path / "src" / "onebit" / "data" / "corpora.py"))  # a fresh clone
    assert data_source() == DataSource("bundled", BUNDLED)
    assert data_source(None, "hub") == DataSource("hub")
    with pytest.raises(ValueError, match="unknown data source"):
        data_source(None, "ftp")


def test_bundled_text_is_the_shared_files(data_dir):
    """The package's gzip copies give exactly the tokens of the shared files (so the README numbers hold)."""
    tok, bundled = CharTokenizer(), DataSource("bundled", BUNDLED)
    for name in ("wikitext2", "c4"):
        assert torch.equal(eval_ids(name, tok, bundled, 64), eval_ids(name, tok, data_dir, 64))
    a, source = calibration_samples("wikitext2:valid", tok, 4, 64, data_dir=bundled)
    assert source == "wikitext2:valid" and torch.equal(a, calibration_samples("wikitext2", tok, 4, 64, data_dir=data_dir)[0])
    assert (BUNDLED / "ATTRIBUTION.md").read_text().count("CC BY-SA") and "ODC-BY" in (BUNDLED / "ATTRIBUTION.md").read_text()


def test_hub_source_downloads_the_public_files_and_fails_clearly_offline(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "c4").mkdir()
    shard = tmp_path / "c4" / "shard.json.gz"
    with gzip.open(shard, "wt") as f:
        f.writelines(json.dumps({"text": "z" * 200}) + "\n" for _ in range(3))
    asked = []

    def fake_download(repo, filename, repo_type):
        asked.append((repo, filename, repo_type))
        return str(shard)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    hub = data_source(None, "hub")
    _, source = calibration_samples("c4", CharTokenizer(), 2, 100, data_dir=hub)
    assert source == "c4:train" and asked == [("allenai/c4", "en/c4-train.00000-of-01024.json.gz", "dataset")]
    assert eval_ids("c4", CharTokenizer(), hub, 100).numel() == 3 * 200 + 2

    def offline(*args, **kwargs):
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ValueError, match=r"cannot fetch Salesforce/wikitext/wikitext-2-raw-v1/test.*Offline\?"):
        eval_ids("wikitext2", CharTokenizer(), hub)
    with pytest.raises(FileNotFoundError, match="ptb/ptb.test.txt not found under the Hugging Face Hub"):
        eval_ids("ptb", CharTokenizer(), hub)


def test_split_can_be_pinned_and_overlap_is_named(tmp_path):
    root = write_tiny_data(tmp_path)
    assert calibration_samples("wikitext2:test", CharTokenizer(), 2, 16, data_dir=root)[1] == "wikitext2:test"
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        calibration_samples("wikitext2:dev", CharTokenizer(), 2, 16, data_dir=root)
    with pytest.raises(FileNotFoundError, match="tinyshakespeare/input.txt"):
        calibration_samples("shakespeare", CharTokenizer(), 2, 16, data_dir=root)
    assert calib_eval_overlap("wikitext2:valid", ["wikitext2", "c4"]) == []
    assert calib_eval_overlap("c4:valid", ["wikitext2", "c4"]) == ["c4"]  # C4 evaluates validation documents
    assert calib_eval_overlap("wikitext2-tok:test", ["wikitext2", "ptb"]) == ["wikitext2"]  # same articles


def test_unreadable_text_names_the_file(tmp_path):
    root = write_tiny_data(tmp_path)
    (root / "wikitext-2-raw" / "wiki.valid.raw").write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(ValueError, match=r"wiki.valid.raw is not UTF-8 text .*0xe9"):
        calibration_samples("wikitext2", CharTokenizer(), 1, 4, data_dir=root)
    (root / "ptb" / "ptb.test.txt.gz").write_bytes(b"not gzip")
    (root / "ptb" / "ptb.test.txt").unlink()
    with pytest.raises(ValueError, match="ptb.test.txt.gz is not a complete gzip file"):
        eval_ids("ptb", CharTokenizer(), root)


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
