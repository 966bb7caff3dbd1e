"""The run report: ``report.json`` (machine-readable) and a terminal table."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .errors import DataError, MissingFileError
from .files import atomic_output, read_text


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
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def load_report(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if not path.exists():
        raise MissingFileError(f"{run_dir}: no report.json", hint="Pass a run directory written by "
                                                                  "`onebit quantize --out RUN`")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e})", hint="Was the run interrupted? Run it again") from None


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def summary_table(reports: list[dict[str, Any]]) -> Table:
    """One row per run: method, ppl (fp → binarized) per dataset, paper/storage bpw, quantization seconds
    (calibration passes + solving) and wall seconds of the whole command (loading and evaluation included)."""
    datasets = sorted({d for r in reports for d in (r.get("ppl") or {})})
    t = Table(title="onebit results")
    for col in ("run", "method", *[f"ppl {d} (fp → q)" for d in datasets], "paper bpw", "storage bpw", "quant s", "wall s"):
        t.add_column(col)
    for r in reports:
        ppl, fp = r.get("ppl") or {}, r.get("ppl_fp") or {}
        t.add_row(
            r.get("name", ""), r["method"],
            *[f"{_fmt(fp.get(d))} → {_fmt(ppl.get(d))}" for d in datasets],
            _fmt(r.get("paper_bpw"), 3), _fmt(r.get("storage_bpw"), 3), _fmt(r.get("seconds"), 0),
            _fmt(r.get("wall_seconds"), 0),
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


# ---- comparison across runs: `onebit report` ---------------------------------------------------------------

def _zs_tasks(reports: list[dict[str, Any]]) -> list[str]:
    from .eval.zeroshot import TASKS

    seen = {t for r in reports for key in ("zeroshot", "zeroshot_fp") for t in (r.get(key) or {}).get("tasks", {})}
    return [t for t in TASKS if t in seen] + sorted(seen - set(TASKS))


def _zs_cells(z: dict[str, Any] | None, tasks: list[str]) -> list[str]:
    """Each task's averaged metric (acc_norm for HellaSwag, ARC-c, OBQA; acc otherwise) in %, and the average."""
    if not z:
        return ["–"] * (len(tasks) + 1 if tasks else 0)
    cells = [_fmt(100 * z["tasks"][t][z["average_metric"][t]], 1) if t in z["tasks"] else "–" for t in tasks]
    return cells + [_fmt(100 * z["average"], 1)]


def comparison_markdown(reports: list[dict[str, Any]]) -> str:
    """One table across runs: method, transform, act bits, paper/storage bpw, ppl per set, zero-shot, seconds."""
    datasets = sorted({d for r in reports for d in (r.get("ppl") or {})})
    tasks = _zs_tasks(reports)
    zs = next((r.get("zeroshot") or r.get("zeroshot_fp") for r in reports if r.get("zeroshot") or r.get("zeroshot_fp")), None)
    metric = (zs or {}).get("average_metric", {})
    head = ["run", "method", "transform", "act bits", "paper bpw", "storage bpw", *[f"{d} ppl" for d in datasets],
            *[f"{t} ({metric.get(t, 'acc')})" for t in tasks], *(["avg"] if tasks else []), "quant s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp = next((r for r in reports if r.get("ppl_fp") or r.get("zeroshot_fp")), None)
    if fp:
        cells = ["fp", "–", "–", "–", "32", "32", *[_fmt((fp.get("ppl_fp") or {}).get(d)) for d in datasets],
                 *_zs_cells(fp.get("zeroshot_fp"), tasks), "–"]
        lines.append("| " + " | ".join(cells) + " |")
    for r in reports:
        cfg, ppl = r.get("config") or {}, r.get("ppl") or {}
        cells = [r.get("name", ""), r.get("method", ""), cfg.get("transform") or "none", str(cfg.get("act_bits") or 16),
                 _fmt(r.get("paper_bpw"), 3), _fmt(r.get("storage_bpw"), 3), *[_fmt(ppl.get(d)) for d in datasets],
                 *_zs_cells(r.get("zeroshot"), tasks), _fmt(r.get("seconds"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    if zs:
        lines.append(f"\nZero-shot accuracy in %, 0-shot, lm-eval {zs.get('lm_eval_version')}, documents: {zs.get('source')}, "
                     f"limit: {zs.get('limit') or 'none (full sets)'} per task; the metric in each header enters the average.")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ppl_points(reports: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, str]]]:
    """Per ppl dataset: (storage bpw, ppl, run name) of every run that has both."""
    datasets = sorted({d for r in reports for d in (r.get("ppl") or {})})
    return {d: [(r["storage_bpw"], r["ppl"][d], r.get("name", r.get("method", ""))) for r in reports
                if d in (r.get("ppl") or {}) and r.get("storage_bpw") is not None] for d in datasets}


def plot_ppl_vs_bpw(reports: list[dict[str, Any]], path: Path) -> Path:
    """Perplexity against storage bits per weight, one point per run and dataset (log scale), fp as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (d, pts) in enumerate(ppl_points(reports).items()):
        color = f"C{i}"
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=f"{d}")
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        fp = next(((r.get("ppl_fp") or {}).get(d) for r in reports if d in (r.get("ppl_fp") or {})), None)
        if fp is not None:
            ax.axhline(fp, color=color, linestyle="--", linewidth=1, label=f"{d} fp")
    ax.set_xlabel("storage bits per weight (all stored bits / weights)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Perplexity vs storage bpw")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_error(reports: list[dict[str, Any]], path: Path) -> Path:
    """Per-layer error by layer index, one line per run: the layer output's relative error on the calibration
    inputs, and the mean relative error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of the layer's linears."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in reports:
        layers = r.get("layers") or []
        idx = [l["index"] for l in layers]
        name = r.get("name", r.get("method", ""))
        a.plot(idx, [l["out_rel_err"] for l in layers], marker=".", label=name)
        b.plot(idx, [sum(x["rel_err"] for x in l["linears"]) / max(len(l["linears"]), 1) for l in layers], marker=".", label=name)
    a.set_title("layer output relative error")
    b.set_title("mean linear relative error (H-weighted)")
    for ax in (a, b):
        ax.set_xlabel("layer index")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dirs: list[str | Path], out_dir: Path, frontier: bool = False) -> tuple[str, list[Path]]:
    """``out_dir/report.md`` (the comparison table) and the two PNGs; returns the table and the written paths.
    With ``frontier`` the table and the first plot are the frontier (``onebit.frontier``): runs that differ
    only in calibration seed pooled into one point, the Pareto front marked."""
    reports = [load_report(d) for d in run_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    if frontier:
        from .frontier import fp_ppl, frontier_markdown, frontier_points, plot_frontier

        points, fp = frontier_points(reports), fp_ppl(reports)
        md = frontier_markdown(points, fp)
        (out_dir / "frontier.md").write_text(md + "\n")
        return md, [out_dir / "frontier.md", plot_frontier(points, fp, out_dir / "frontier.png")]
    md = comparison_markdown(reports)
    (out_dir / "report.md").write_text(md + "\n")
    paths = [out_dir / "report.md"]
    if any(r.get("ppl") for r in reports):
        paths.append(plot_ppl_vs_bpw(reports, out_dir / "ppl_vs_bpw.png"))
    if any(r.get("layers") for r in reports):
        paths.append(plot_layer_error(reports, out_dir / "layer_error.png"))
    return md, paths
