"""Expected failures: bad input, missing or malformed files, unsupported models, numerical failures with a
known cause. The CLI prints them as one paragraph (what is wrong, where, what to do) and exits 1; anything
else is a bug and keeps its traceback. Each type also subclasses the builtin a library caller would catch."""

from __future__ import annotations


class OnebitError(Exception):
    """``message``: what is wrong and which file, option or tensor; ``hint``: what to do about it."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint

    def __str__(self) -> str:
        return f"{self.message}. {self.hint}" if self.hint else self.message


class InputError(OnebitError, ValueError):
    """An argument or input file whose value cannot work (unknown name, too long, too few tokens)."""


class MissingFileError(OnebitError, FileNotFoundError):
    """A file or directory the command needs is not there."""


class DataError(OnebitError, ValueError):
    """A file that is there but cannot be read as what it should be (encoding, JSON, gzip, download)."""


class UnsupportedModelError(OnebitError, ValueError):
    """A model whose architecture has no adapter."""


class NumericalError(OnebitError, RuntimeError):
    """A numerical failure whose cause is known (non-finite weights or inputs, a singular Hessian)."""


class OutputError(OnebitError, OSError):
    """An output that cannot be written: a file where a directory belongs, no permission, a full disk."""
