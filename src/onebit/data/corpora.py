"""Corpora exactly as the papers build them (framework §1, §5), from local files.

The data directory is ``--data-dir``, else ``$ONEBIT_DATA``, else ``../shared/data`` when it exists (from
the working directory or the source checkout). Expected layout (the public releases' own file names):

    wikitext-2-raw/wiki.{train,valid,test}.raw      (or wikitext-2-raw-v1/{split}-*.parquet, HF layout)
    wikitext-2/{train,valid,test}.txt                (tokenized release: ``wikitext2-tok``)
    c4/c4-train.00000-of-01024.json.gz               (calibration; else the validation file below)
    c4/c4-validation.00000-of-00008*.json.gz         (evaluation: first 1,100 documents)
    ptb/ptb.{train,valid,test}.txt
    tinyshakespeare/input.txt                        (``shakespeare``: first 90 % calibration, last 10 % test)

Calibration uses the train split when its file is present, otherwise the validation split, and says so.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("onebit")

C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory: explicit, ``$ONEBIT_DATA``, or ``../shared/data`` if it exists."""
    if explicit:
        return Path(explicit)
    if os.environ.get("ONEBIT_DATA"):
        return Path(os.environ["ONEBIT_DATA"])
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path("data")


def _missing(corpus: str, what: str, root: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{corpus}: {what} not found under {root}. Put the file there, or point --data-dir / ONEBIT_DATA at the "
        f"directory that holds it (layout: see onebit.data.corpora)."
    )


def _lines(path: Path) -> list[str]:
    """Rows as Hugging Face's text builders yield them: each line with its newline, blank lines as ''."""
    with open(path, encoding="utf-8") as f:
        return [row if row.strip() else "" for row in f]


def _wikitext_rows(root: Path, folder: str, names: dict[str, str], split: str) -> list[str] | None:
    path = root / folder / names[split]
    if path.exists():
        return _lines(path)
    parquet = sorted((root / "wikitext-2-raw-v1").glob(f"{ {'valid': 'validation'}.get(split, split) }-*.parquet"))
    if folder == "wikitext-2-raw" and parquet:
        import pyarrow.parquet as pq  # only on machines that have the public parquet files

        return [t for p in parquet for t in pq.read_table(p).column("text").to_pylist()]
    return None


@dataclass(frozen=True)
class Corpus:
    """``text(root, split, joiner)`` → the split's text (rows joined with ``joiner``), or None if absent;
    ``missing_hint``: where each split's file belongs, for the error message."""

    name: str
    text: Callable[[Path, str, str], str | None]
    missing_hint: dict[str, str]


def _wikitext(folder: str, names: dict[str, str]) -> Callable[[Path, str, str], str | None]:
    def text(root: Path, split: str, joiner: str) -> str | None:
        rows = _wikitext_rows(root, folder, names, split)
        return None if rows is None else joiner.join(rows)

    return text


def _ptb(root: Path, split: str, joiner: str) -> str | None:
    path = root / "ptb" / f"ptb.{split}.txt"
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        return " ".join(line.strip() for line in f)  # ptb_text_only's `sentence` field, joined with " "


def _shakespeare(root: Path, split: str, joiner: str) -> str | None:
    path = root / "tinyshakespeare" / "input.txt"
    if not path.exists() or split == "valid":
        return None
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    return text[:cut] if split == "train" else text[cut:]


def _c4_docs(root: Path, split: str) -> list[str] | None:
    pattern = "c4-train.00000-of-01024*.json.gz" if split == "train" else "c4-validation.00000-of-00008*.json.gz"
    files = sorted((root / "c4").glob(pattern))
    if not files:
        return None
    with gzip.open(files[0], "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


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


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(CORPORA)}")
    return CORPORA[name]


def _tokenize(tokenizer, text: str) -> Tensor:
    return torch.tensor(tokenizer(text).input_ids, dtype=torch.long)


def eval_ids(name: str, tokenizer, data_dir: str | os.PathLike | None = None, seqlen: int = 2048) -> Tensor:
    """Token ids (1, N) of a test set, built as the papers do (wikitext2: rows joined with "\\n\\n";
    ptb: sentences joined with " "; c4: first 1,100 validation documents joined with " ", first 256·seqlen
    tokens)."""
    root = resolve_data_dir(data_dir)
    corpus = _corpus(name)
    if name == "c4":
        docs = _c4_docs(root, "valid")
        if docs is None:
            raise _missing(name, corpus.missing_hint["test"], root)
        if len(docs) < C4_EVAL_DOCS:
            log.warning("c4: %d validation documents available, the papers use the first %d", len(docs), C4_EVAL_DOCS)
        return _tokenize(tokenizer, " ".join(docs[:C4_EVAL_DOCS]))[: C4_EVAL_WINDOWS * seqlen].unsqueeze(0)
    text = corpus.text(root, "test", "\n\n")
    if text is None:
        raise _missing(name, corpus.missing_hint["test"], root)
    return _tokenize(tokenizer, text).unsqueeze(0)


def calibration_samples(
    name: str, tokenizer, nsamples: int = 128, seqlen: int = 2048, seed: int = 0, data_dir: str | os.PathLike | None = None
) -> tuple[Tensor, str]:
    """(nsamples, seqlen) token windows sampled exactly as GPTQ/BiLLM, and a note of the split used.

    c4: random documents with more than ``seqlen`` tokens, one random window each; others: random windows
    of the tokenized split (rows joined with " "). Python ``random`` seeded with ``seed``.
    """
    root = resolve_data_dir(data_dir)
    corpus = _corpus(name)
    rng = random.Random(seed)
    for split in ("train", "valid"):
        if name == "c4":
            docs = _c4_docs(root, split)
            if docs is not None:
                return _sample_docs(docs, tokenizer, nsamples, seqlen, rng, name), f"{name}:{split}"
        else:
            text = corpus.text(root, split, " ")
            if text is not None:
                ids = _tokenize(tokenizer, text)
                if ids.numel() <= seqlen + 1:
                    raise ValueError(f"{name}:{split} has {ids.numel()} tokens, too few for seqlen {seqlen}")
                starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
                return torch.stack([ids[i : i + seqlen] for i in starts]), f"{name}:{split}"
        if split == "train":
            log.warning("%s: no train split under %s; calibrating on the validation split", name, root)
    raise _missing(name, f"{corpus.missing_hint['train']} (or the validation split)", root)


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
                raise ValueError(f"{name}: no document longer than {seqlen} tokens; use a smaller --seqlen")
        i = rng.randint(0, cache[d].numel() - seqlen - 1)
        out.append(cache[d][i : i + seqlen])
    return torch.stack(out)
