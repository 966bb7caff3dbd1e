"""The honest frontier: perplexity against storage bits per weight for any set of runs (``onebit report
--frontier``).

Runs that differ only in their calibration seed are one point: the median perplexity, with the min–max over
the seeds as a bar. Each point is drawn with its method family's marker (hollow = column-wise error
feedback, filled = block or none); the float model is a line; the lower-left Pareto front (no other point has
both fewer storage bits and a lower perplexity) is connected and its points ringed.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKERS = {"sign": "v", "braq": "o", "arb": "P", "arb-x": "X", "arb-rc": "D", "row-hbraq": "h", "col-hbraq": "H",
           "gptq": "s", "rtn": "p", "ternary": "^", "q1_0": "<", "tq1_0": ">", "tq2_0": "^", "q2_k": "d", "q4_0": "8",
           "q8_0": "*"}


@dataclass
class Point:
    """One frontier point: a configuration and its runs over calibration seeds."""

    name: str
    family: str
    feedback: str
    storage_bpw: float
    paper_bpw: float
    ppl: dict[str, list[float]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    layer_err: list[float] = field(default_factory=list)  # per run: mean tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of its linears

    def median(self, d: str) -> float:
        return statistics.median(self.ppl[d])


def _key(r: dict[str, Any]) -> str:
    """What makes two runs the same configuration: model, quantization config (defaults filled in, so runs
    recorded before a config field existed still match), calibration set and size, evaluation — not the seed."""
    from .config import QuantConfig

    try:
        cfg = QuantConfig.from_dict(r.get("config") or {}).to_dict()
    except (TypeError, ValueError):
        cfg = r.get("config")
    calib = {k: (r.get("calibration") or {}).get(k) for k in ("dataset", "nsamples", "seqlen")}
    return json.dumps([r.get("model"), cfg, calib, r.get("eval")], sort_keys=True)


def _family(r: dict[str, Any]) -> str:
    """The pre-pass and the method; a bit-budget run is ``budget`` (its linears' methods vary)."""
    cfg = r.get("config") or {}
    transform = cfg.get("transform") or "none"
    method = r.get("method", "?") if cfg.get("bpw_budget") is None else "budget"
    return ("" if transform == "none" else f"{transform}+") + method


def frontier_points(reports: list[dict[str, Any]]) -> list[Point]:
    """Group runs by configuration (seeds pooled), in the order first seen."""
    groups: dict[str, Point] = {}
    for r in reports:
        if r.get("storage_bpw") is None or not r.get("ppl"):
            continue
        p = groups.get(_key(r))
        if p is None:
            name = r.get("name", r.get("method", ""))
            seed = (r.get("calibration") or {}).get("seed", 0)
            name = name.removesuffix(f"-s{seed}")
            p = groups[_key(r)] = Point(name, _family(r), (r.get("config") or {}).get("feedback", "block"),
                                        r["storage_bpw"], r.get("paper_bpw", float("nan")))
        for d, v in r["ppl"].items():
            p.ppl.setdefault(d, []).append(v)
        p.seeds.append((r.get("calibration") or {}).get("seed", 0))
        errs = [x["rel_err"] for layer in r.get("layers") or [] for x in layer["linears"]]
        if errs:
            p.layer_err.append(sum(errs) / len(errs))
    return list(groups.values())


def pareto(points: list[Point], d: str) -> list[Point]:
    """The lower-left front on dataset ``d`` (median ppl), sorted by storage bpw."""
    front, best = [], float("inf")
    for p in sorted((p for p in points if d in p.ppl), key=lambda p: (p.storage_bpw, p.median(d))):
        if p.median(d) < best:
            front.append(p)
            best = p.median(d)
    return front


def frontier_markdown(points: list[Point], fp: dict[str, float]) -> str:
    """The frontier as a table, sorted by storage bpw; ★ marks the Pareto front of each dataset."""
    datasets = sorted({d for p in points for d in p.ppl})
    fronts = {d: {id(p) for p in pareto(points, d)} for d in datasets}
    head = ["point", "family", "feedback", "seeds", "storage bpw", "paper bpw", *[f"{d} ppl (median [min–max])" for d in datasets],
            "linear rel. err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if fp:
        lines.append("| fp32 | – | – | – | 32 | 32 | " + " | ".join(f"{fp[d]:.2f}" if d in fp else "–" for d in datasets) + " | 0 |")
    for p in sorted(points, key=lambda p: p.storage_bpw):
        cells = [p.name, p.family, p.feedback, str(len(p.seeds)), f"{p.storage_bpw:.3f}", f"{p.paper_bpw:.3f}"]
        for d in datasets:
            if d not in p.ppl:
                cells.append("–")
                continue
            v = p.ppl[d]
            spread = f" [{min(v):.4g}–{max(v):.4g}]" if len(v) > 1 else ""
            cells.append(f"{'★ ' if id(p) in fronts[d] else ''}{p.median(d):.4g}{spread}")
        cells.append(f"{statistics.median(p.layer_err):.4f}" if p.layer_err else "–")
        lines.append("| " + " | ".join(cells) + " |")
    one = [p.name for p in points if len(p.seeds) == 1]
    lines.append(f"\n★ = on the Pareto front (no point has both fewer storage bits and a lower median perplexity). "
                 f"Linear rel. err = mean over the decoder linears of tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) (median over seeds). "
                 f"Points with one calibration seed only: {', '.join(one) if one else 'none'}.")
    return "\n".join(lines)


def plot_frontier(points: list[Point], fp: dict[str, float], path: Path) -> Path:
    """One panel per dataset: median ppl (log) against storage bpw, min–max bars, the Pareto front ringed."""
    from .report import _pyplot

    plt = _pyplot()
    datasets = sorted({d for p in points for d in p.ppl})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.4 * len(datasets), 5.0), squeeze=False)
    families = sorted({p.family for p in points})
    colors = {f: f"C{i % 10}" for i, f in enumerate(families)}
    for ax, d in zip(axes[0], datasets):
        for p in (p for p in points if d in p.ppl):
            v, med = p.ppl[d], p.median(d)
            base = p.family.rpartition("+")[2]
            style = dict(marker=MARKERS.get(base, "o"), color=colors[p.family], markersize=7,
                         markerfacecolor="none" if p.feedback == "column" else colors[p.family])
            ax.errorbar([p.storage_bpw], [med], yerr=[[med - min(v)], [max(v) - med]], capsize=3, linestyle="none", **style)
            ax.annotate(p.name, (p.storage_bpw, med), textcoords="offset points", xytext=(5, 3), fontsize=7)
        front = pareto(points, d)
        ax.step([p.storage_bpw for p in front], [p.median(d) for p in front], where="post", color="k", alpha=0.5,
                linewidth=1.2, label="Pareto front")
        ax.scatter([p.storage_bpw for p in front], [p.median(d) for p in front], s=180, facecolors="none",
                   edgecolors="k", linewidths=1.0)
        if d in fp:
            ax.axhline(fp[d], color="k", linestyle="--", linewidth=1, label=f"fp32 ({fp[d]:.2f})")
        for f in families:
            ax.plot([], [], linestyle="none", marker=MARKERS.get(f.rpartition("+")[2], "o"), color=colors[f], label=f)
        ax.plot([], [], linestyle="none", marker="o", color="gray", markerfacecolor="none", label="hollow: column feedback")
        ax.set_xlabel("storage bits per weight (every stored bit / weights)")
        ax.set_ylabel(f"{d} perplexity (median over seeds, min–max bar)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
        ax.set_title(f"{d}: perplexity vs storage bpw")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fp_ppl(reports: list[dict[str, Any]]) -> dict[str, float]:
    """The float model's perplexities, from the first run that measured them."""
    return next((r["ppl_fp"] for r in reports if r.get("ppl_fp")), {})
