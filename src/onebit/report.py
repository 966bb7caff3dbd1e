"""The run report: ``report.json`` (machine-readable) and a terminal table."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("onebit", "torch", "transformers", "safetensors", "accelerate", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write: a reader never sees a half-written report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def load_report(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no report.json (is this an `onebit quantize --out` directory?)")
    return json.loads(path.read_text())


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def summary_table(reports: list[dict[str, Any]]) -> Table:
    """One row per run: method, options, ppl (fp → binarized) per dataset, paper/storage bpw, seconds."""
    datasets = sorted({d for r in reports for d in (r.get("ppl") or {})})
    t = Table(title="onebit results")
    for col in ("run", "method", *[f"ppl {d} (fp → q)" for d in datasets], "paper bpw", "storage bpw", "quant s"):
        t.add_column(col)
    for r in reports:
        ppl, fp = r.get("ppl") or {}, r.get("ppl_fp") or {}
        t.add_row(
            r.get("name", ""), r["method"],
            *[f"{_fmt(fp.get(d))} → {_fmt(ppl.get(d))}" for d in datasets],
            _fmt(r.get("paper_bpw"), 3), _fmt(r.get("storage_bpw"), 3), _fmt(r.get("seconds"), 0),
        )
    return t


def markdown_table(reports: list[dict[str, Any]]) -> str:
    """The same rows as ``summary_table``, as GitHub markdown (for READMEs)."""
    datasets = sorted({d for r in reports for d in (r.get("ppl") or {})})
    head = ["run", "method", *[f"{d} ppl" for d in datasets], "paper bpw", "storage bpw", "quant s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp_row = next((r for r in reports if r.get("ppl_fp")), None)
    if fp_row:
        lines.append("| fp32 | – | " + " | ".join(_fmt(fp_row["ppl_fp"].get(d)) for d in datasets) + " | 32 | 32 | – |")
    for r in reports:
        ppl = r.get("ppl") or {}
        cells = [r.get("name", ""), r["method"], *[_fmt(ppl.get(d)) for d in datasets]]
        cells += [_fmt(r.get("paper_bpw"), 3), _fmt(r.get("storage_bpw"), 3), _fmt(r.get("seconds"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(reports: list[dict[str, Any]], console: Console | None = None) -> None:
    (console or Console()).print(summary_table(reports))
