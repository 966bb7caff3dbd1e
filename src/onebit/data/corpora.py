"""Corpora exactly as the papers build them (framework §1, §5), from local files or the Hugging Face Hub.

Where the text comes from (``data_source``): ``--data-dir``, else ``$ONEBIT_DATA``, else ``../shared/data``
when it exists (from the working directory or the source checkout), else the files bundled with the package
(``onebit/data/bundled``: WikiText-2 raw valid and test, the first 1,025 C4 validation documents; licences in
its ATTRIBUTION.md); or, with ``--data-source hub``, the public files downloaded once into the Hub cache.
Expected layout (the public releases' own file names; any file may also be gzip-compressed, ``NAME.gz``):

    wikitext-2-raw/wiki.{train,valid,test}.raw      (or wikitext-2-raw-v1/{split}-*.parquet, HF layout)
    wikitext-2/{train,valid,test}.txt                (tokenized release: ``wikitext2-tok``)
    c4/c4-train.00000-of-01024.json.gz               (calibration; else the validation file below)
    c4/c4-validation.00000-of-00008*.json.gz         (evaluation: first 1,100 documents)
    ptb/ptb.{train,valid,test}.txt
    tinyshakespeare/input.txt                        (``shakespeare``: first 90 % calibration, last 10 % test)

Calibration (``NAME`` or ``NAME:SPLIT``) uses the train split when its file is present, otherwise the
validation split, and says so. Evaluation reads the test split (C4: validation); ``calib_eval_overlap``
names the evaluation sets whose text the calibration split shares.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DataError, InputError, MissingFileError
from ..files import read_lines, read_text, reading

log = logging.getLogger("onebit")

C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256
BUNDLED = Path(__file__).resolve().with_name("bundled")
SOURCES = ("local", "hub")

# Hub files standing in for the local layout (``--data-source hub``): local path → (dataset repo, file)
HUB_FILES = {
    **{f"wikitext-2-raw-v1/{s}-00000-of-00001.parquet": ("Salesforce/wikitext", f"wikitext-2-raw-v1/{s}-00000-of-00001.parquet")
       for s in ("train", "validation", "test")},
    "c4/c4-train.00000-of-01024.json.gz": ("allenai/c4", "en/c4-train.00000-of-01024.json.gz"),
    "c4/c4-validation.00000-of-00008.json.gz": ("allenai/c4", "en/c4-validation.00000-of-00008.json.gz"),
}


@dataclass(frozen=True)
class DataSource:
    """A directory in the layout above (``root``), or the Hub (``root`` None). ``label``, for the report:
    the directory, ``bundled`` or ``hub``."""

    label: str
    root: Path | None = None

    def find(self, pattern: str) -> Path | None:
        """The first file matching the relative glob ``pattern``, plain or gzip-compressed; None if absent."""
        if self.root is None:
            return next((_hub_download(*HUB_FILES[k]) for k in HUB_FILES if fnmatch.fnmatch(k, pattern)), None)
        return next((hits[0] for p in (pattern, pattern + ".gz") if (hits := sorted(self.root.glob(p)))), None)

    def where(self) -> str:
        return "the Hugging Face Hub" if self.root is None else str(self.root)


def _hub_download(repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    log.info("data: %s/%s from the Hugging Face Hub (downloaded once, then read from its cache)", repo, filename)
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset"))
    except Exception as e:  # noqa: BLE001 - offline, not cached, HTTP errors: all mean the file is not available
        raise DataError(f"--data-source hub: cannot fetch {repo}/{filename} ({type(e).__name__}: {e})",
                        hint="Offline? Run once on a machine with network access (the file is then cached), or use "
                             "local files: --data-source local with --data-dir") from None


def data_source(data_dir: str | os.PathLike | DataSource | None = None, source: str = "local") -> DataSource:
    """Where corpus text comes from: ``data_dir`` (or ``$ONEBIT_DATA``), which must exist; else
    ``../shared/data`` if it exists; else the bundled files. ``source="hub"``: the public files online."""
    if isinstance(data_dir, DataSource):
        return data_dir
    if source not in SOURCES:
        raise InputError(f"unknown data source {source!r}", hint=f"Use one of: {', '.join(SOURCES)}")
    if source == "hub":
        return DataSource("hub")
    explicit = data_dir or os.environ.get("ONEBIT_DATA")
    if explicit:
        root = Path(explicit)
        if not root.is_dir():
            raise MissingFileError(f"data directory {root} (--data-dir / ONEBIT_DATA) does not exist",
                                   hint="Point --data-dir or ONEBIT_DATA at an existing directory, or set neither to "
                                        "use ../shared/data or the text bundled with onebit")
        return DataSource(str(root), root)
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return DataSource(str(cand), cand)
    return DataSource("bundled", BUNDLED)


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The local data directory (see ``data_source``)."""
    root = data_source(explicit).root
    assert root is not None  # a local source always has a directory
    return root


def _missing(corpus: str, what: str, src: DataSource) -> MissingFileError:
    return MissingFileError(
        f"{corpus}: {what} not found under {src.where()}",
        hint="Put the file there, or point --data-dir / ONEBIT_DATA at the directory that holds it (layout: see "
             "onebit.data.corpora)",
    )


def _rows(path: Path) -> list[str]:
    """Rows as Hugging Face's text builders yield them: each line with its newline, blank lines as ''."""
    return [row if row.strip() else "" for row in read_lines(path)]


def _wikitext_rows(src: DataSource, folder: str, names: dict[str, str], split: str) -> list[str] | None:
    path = src.find(f"{folder}/{names[split]}")
    if path is not None:
        return _rows(path)
    parquet = src.find(f"wikitext-2-raw-v1/{ {'valid': 'validation'}.get(split, split) }-*.parquet")
    if folder == "wikitext-2-raw" and parquet is not None:
        try:
            import pyarrow.parquet as pq  # only where parquet files are read (the Hub, or their local copy)
        except ImportError:
            raise DataError(f"{parquet}: reading parquet needs pyarrow", hint="pip install pyarrow") from None
        return pq.read_table(parquet).column("text").to_pylist()
    return None


@dataclass(frozen=True)
class Corpus:
    """``text(source, split, joiner)`` → the split's text (rows joined with ``joiner``), or None if absent;
    ``missing_hint``: where each split's file belongs, for the error message."""

    name: str
    text: Callable[[DataSource, str, str], str | None]
    missing_hint: dict[str, str]


def _wikitext(folder: str, names: dict[str, str]) -> Callable[[DataSource, str, str], str | None]:
    def text(src: DataSource, split: str, joiner: str) -> str | None:
        rows = _wikitext_rows(src, folder, names, split)
        return None if rows is None else joiner.join(rows)

    return text


def _ptb(src: DataSource, split: str, joiner: str) -> str | None:
    path = src.find(f"ptb/ptb.{split}.txt")
    # ptb_text_only's `sentence` field, joined with " "
    return None if path is None else " ".join(line.strip() for line in read_lines(path))


def _shakespeare(src: DataSource, split: str, joiner: str) -> str | None:
    path = src.find("tinyshakespeare/input.txt")
    if path is None or split == "valid":
        return None
    text = read_text(path)
    cut = int(len(text) * 0.9)
    return text[:cut] if split == "train" else text[cut:]


def _c4_docs(src: DataSource, split: str) -> list[str] | None:
    pattern = "c4-train.00000-of-01024*.json.gz" if split == "train" else "c4-validation.00000-of-00008*.json.gz"
    path = src.find(f"c4/{pattern}")
    if path is None:
        return None
    with reading(path) as f:
        try:
            return [json.loads(line)["text"] for line in f]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not C4 JSON lines with a 'text' field ({type(e).__name__}: {e})",
                            hint="Use the C4 release's json.gz files unchanged") from None


RAW = {"train": "wiki.train.raw", "valid": "wiki.valid.raw", "test": "wiki.test.raw"}
TOK = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}

CORPORA: dict[str, Corpus] = {
    "wikitext2": Corpus("wikitext2", _wikitext("wikitext-2-raw", RAW), {s: f"wikitext-2-raw/{f}" for s, f in RAW.items()}),
    "wikitext2-tok": Corpus("wikitext2-tok", _wikitext("wikitext-2", TOK), {s: f"wikitext-2/{f}" for s, f in TOK.items()}),
    "ptb": Corpus("ptb", _ptb, {s: f"ptb/ptb.{s}.txt" for s in ("train", "valid", "test")}),
    "shakespeare": Corpus("shakespeare", _shakespeare, {s: "tinyshakespeare/input.txt" for s in ("train", "test")}),
    "c4": Corpus("c4", lambda r, s, j: None, {
        "train": "c4/c4-train.00000-of-01024.json.gz", "valid": "c4/c4-validation.00000-of-00008.json.gz",
        "test": "c4/c4-validation.00000-of-00008.json.gz",
    }),
}
SPLITS = ("train", "valid", "test")
EVAL_SPLIT = {"c4": "valid"}  # evaluation reads the test split, except C4's (validation documents)
SAME_TEXT = {"wikitext2-tok": "wikitext2"}  # the tokenized release of the same articles


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise InputError(f"unknown dataset {name!r}", hint=f"Available: {', '.join(CORPORA)}")
    return CORPORA[name]


def parse_calib(calib: str) -> tuple[str, tuple[str, ...]]:
    """``NAME`` or ``NAME:SPLIT`` → (corpus name, splits to try in order): train, else valid, by default."""
    name, _, split = calib.partition(":")
    _corpus(name)
    if split and split not in SPLITS:
        raise InputError(f"unknown split {split!r} in calibration set {calib!r}", hint=f"Use NAME or NAME:SPLIT with "
                                                                                      f"SPLIT one of {', '.join(SPLITS)}")
    return name, (split,) if split else ("train", "valid")


def calib_eval_overlap(calib_source: str, eval_sets: list[str]) -> list[str]:
    """The evaluation sets whose text the calibration split (``NAME:SPLIT``, as ``calibration_samples``
    reports it) shares: the same corpus (or release of it) and the split that set evaluates on."""
    name, _, split = calib_source.partition(":")
    return [e for e in eval_sets
            if SAME_TEXT.get(e, e) == SAME_TEXT.get(name, name) and EVAL_SPLIT.get(e, "test") == split]


def _tokenize(tokenizer, text: str) -> Tensor:
    return torch.tensor(tokenizer(text).input_ids, dtype=torch.long)


def eval_ids(name: str, tokenizer, data_dir: str | os.PathLike | DataSource | None = None, seqlen: int = 2048) -> Tensor:
    """Token ids (1, N) of a test set, built as the papers do (wikitext2: rows joined with "\\n\\n";
    ptb: sentences joined with " "; c4: first 1,100 validation documents joined with " ", first 256·seqlen
    tokens). ``data_dir``: a directory or a ``DataSource`` (see ``data_source``)."""
    corpus = _corpus(name)
    src = data_source(data_dir)
    if name == "c4":
        docs = _c4_docs(src, "valid")
        if docs is None:
            raise _missing(name, corpus.missing_hint["test"], src)
        if len(docs) < C4_EVAL_DOCS:
            log.warning("c4: %d validation documents available, the papers use the first %d", len(docs), C4_EVAL_DOCS)
        return _tokenize(tokenizer, " ".join(docs[:C4_EVAL_DOCS]))[: C4_EVAL_WINDOWS * seqlen].unsqueeze(0)
    text = corpus.text(src, "test", "\n\n")
    if text is None:
        raise _missing(name, corpus.missing_hint["test"], src)
    return _tokenize(tokenizer, text).unsqueeze(0)


def calibration_samples(
    name: str, tokenizer, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
    data_dir: str | os.PathLike | DataSource | None = None,
) -> tuple[Tensor, str]:
    """(nsamples, seqlen) token windows sampled exactly as GPTQ/BiLLM, and the split used (``NAME:SPLIT``).

    ``name``: a corpus, or ``NAME:SPLIT`` to pin the split (default: train, else valid). c4: random documents
    with more than ``seqlen`` tokens, one random window each; others: random windows of the tokenized split
    (rows joined with " "). Python ``random`` seeded with ``seed``.
    """
    name, splits = parse_calib(name)
    corpus = CORPORA[name]
    src = data_source(data_dir)
    rng = random.Random(seed)
    for split in splits:
        source = f"{name}:{split}"
        if name == "c4":
            docs = _c4_docs(src, split)
            if docs is not None:
                return _sample_docs(docs, tokenizer, nsamples, seqlen, rng, source), source
        else:
            text = corpus.text(src, split, " ")
            if text is not None:
                ids = _tokenize(tokenizer, text)
                if ids.numel() <= seqlen + 1:
                    raise InputError(f"{source} has {ids.numel()} tokens, too few for one calibration window of "
                                     f"--seqlen {seqlen}", hint="Lower --seqlen or calibrate on a larger corpus")
                if ids.numel() < nsamples * seqlen:
                    log.warning("%s has %d tokens, fewer than %d × %d: the calibration windows overlap", source,
                                ids.numel(), nsamples, seqlen)
                starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
                return torch.stack([ids[i : i + seqlen] for i in starts]), source
        if split == "train" and len(splits) > 1:
            log.warning("%s: no train split under %s; calibrating on the validation split", name, src.where())
    raise _missing(name, " or ".join(corpus.missing_hint.get(s, f"a {s} split") for s in splits), src)


def _sample_docs(docs: list[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random, name: str) -> Tensor:
    cache: dict[int, Tensor] = {}
    out = []
    for _ in range(nsamples):
        while True:
            d = rng.randint(0, len(docs) - 1)
            if d not in cache:
                cache[d] = _tokenize(tokenizer, docs[d])
            if cache[d].numel() > seqlen:
                break
            if len(cache) == len(docs) and all(v.numel() <= seqlen for v in cache.values()):
                raise InputError(f"{name}: no document longer than --seqlen {seqlen} tokens",
                                 hint="Use a smaller --seqlen")
        i = rng.randint(0, cache[d].numel() - seqlen - 1)
        out.append(cache[d][i : i + seqlen])
    return torch.stack(out)
