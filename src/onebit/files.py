"""File input and output with clear failures: text files (plain or gzip) decoded as UTF-8 with the file named
on error, and atomic outputs (a reader, or ``--resume``, sees a whole file or directory or none of it)."""

from __future__ import annotations

import errno
import gzip
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from .errors import DataError, OutputError


def open_text(path: Path) -> TextIO:
    """``path`` opened for reading UTF-8 text; gzip-compressed when its name ends in ``.gz``."""
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


@contextmanager
def reading(path: Path) -> Iterator[TextIO]:
    """``open_text`` whose decoding and decompression failures name the file."""
    try:
        with open_text(path) as f:
            yield f
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x})",
                        hint="Convert it to UTF-8 (e.g. iconv -t utf-8) or point --data-dir at the original files") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path} is not a complete gzip file ({e})", hint="Download or copy it again") from None


def read_text(path: Path) -> str:
    with reading(path) as f:
        return f.read()


def read_lines(path: Path) -> list[str]:
    """The file's lines as iterating over it yields them (each with its newline)."""
    with reading(path) as f:
        return list(f)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def disk_full(e: BaseException) -> bool:
    """ENOSPC or a quota, as an OSError or as the message of a writer that wraps it (safetensors)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(os.strerror(code) in str(e) for code in (errno.ENOSPC, errno.EDQUOT))


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file or a directory); it replaces ``path`` only once
    the block finished. On any failure the partial output is removed; a full disk becomes an ``OutputError``
    naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if path.is_dir() and tmp.is_dir():
            _remove(path)
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if disk_full(e):
            raise OutputError(f"no space left on the device while writing {path} (nothing partial was kept)",
                              hint="Free space there or write elsewhere, then run the command again (a quantize run "
                                   "continues at its first unfinished layer with --resume)") from e
        raise
