"""The README's full-model result tables, each from one command.

Runs `onebit quantize` once per row, strictly one after another (several full-model jobs on a 2-core
machine starve each other), then prints the comparison (`onebit report`: ppl, zero-shot, paper and storage
bpw, seconds) and writes it with its plots to RUNS/<set>/. Rows shared by several sets (braq) run once.
A row whose run directory already holds a report for the same command is reused; a killed row continues
from its last finished layer (`--resume`), so re-running the command after an interruption loses nothing.

    .venv/bin/python benchmarks/results.py arb        # issue #4: sign, braq, arb, arb-x+CGB, arb-rc+CGB
    .venv/bin/python benchmarks/results.py hbllm      # issue #5: braq, row/col-hbraq, each ± --share-mean
    .venv/bin/python benchmarks/results.py dbell      # issue #6: W1A16/A8/A6 for braq, DBellQuant (--recipe
                                                      # dbellquant, the release), dbell+BEST
    .venv/bin/python benchmarks/results.py zeroshot   # issue #8: fp, braq, BEST on the seven tasks
    .venv/bin/python benchmarks/results.py frontier   # issue #17: seed methods and k-bit/ternary baselines,
                                                      # block and column feedback, ppl vs storage bpw
    .venv/bin/python benchmarks/results.py gguf       # issue #19: q1_0, tq1_0, tq2_0, q2_k (block/column
                                                      # feedback, ± rotation) exported to GGUF and reloaded
                                                      # by transformers; braq / arb-rc's Q1_0 projection
    .venv/bin/python benchmarks/results.py beyond     # issue #18: the recipes lean2/lean15, each component
                                                      # (rotation, lean metadata, salient tiers, bit budget)
                                                      # alone and combined, beside the best seed method
    .venv/bin/python benchmarks/results.py beyond --dry-run   # list a set's commands without running them
    .venv/bin/python benchmarks/results.py dbell --only dbellquant,dbellquant-a8   # just these rows of the set

Every row uses the demo setting (16 × 1024 C4 calibration tokens; perplexity on the first 8 windows of
2048 tokens of WikiText-2 and C4), so rows of different sets are comparable.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from onebit.report import write_report

SETS = ("arb", "hbllm", "dbell", "zeroshot", "frontier", "gguf", "beyond")
COMMON = ["--calib", "c4", "--nsamples", "16", "--seqlen", "1024", "--eval-seqlen", "2048"]
PPL = ["--eval", "wikitext2,c4", "--eval-windows", "8"]
ACT_BITS = (16, 8, 6)


def rows(which: str, best: tuple[str, list[str]], limit: int, seeds: int = 3) -> list[tuple[str, list[str]]]:
    """(run name, onebit quantize arguments) of each row of a set; the first row also evaluates fp.
    ``best``: (name, arguments) of the best weight-only method, for the dbell and zeroshot sets."""
    if which == "arb":
        return [("braq", ["--method", "braq"]), ("sign", ["--method", "sign"]), ("arb", ["--method", "arb"]),
                ("arb-x+cgb", ["--method", "arb-x", "--cgb"]), ("arb-rc+cgb", ["--method", "arb-rc", "--cgb"])]
    if which == "hbllm":
        return [("braq", ["--method", "braq"])] + [
            (f"{m}{'+share-mean' if sm else ''}", ["--method", m, "--share-mean" if sm else "--no-share-mean"])
            for m in ("row-hbraq", "col-hbraq") for sm in (False, True)]
    if which == "dbell":
        out = []
        for label, args in (("braq", ["--method", "braq"]), ("dbellquant", ["--recipe", "dbellquant"]),
                            (f"dbell+{best[0]}", [*best[1], "--transform", "dbell"])):
            out += [(label if a == 16 else f"{label}-a{a}", args + ([] if a == 16 else ["--act-bits", str(a)]))
                    for a in ACT_BITS]
        return out
    if which == "zeroshot":
        zs = ["--eval", "", "--tasks", "all", "--limit", str(limit)]
        return [(f"zs-braq-l{limit}", ["--method", "braq", *zs]), (f"zs-{best[0]}-l{limit}", [*best[1], *zs])]
    if which == "frontier":
        return frontier_rows(seeds)
    if which == "gguf":
        return gguf_rows()
    if which == "beyond":
        return BEYOND
    raise SystemExit(f"unknown set {which!r}: {', '.join(SETS)}")


ARC = ["--method", "arb-rc", "--cgb"]
FRONTIER = [  # (name, arguments, seeds): the most telling points first, so a partial run is still useful
    ("gptq-w4", ["--method", "gptq", "--bits", "4"], 1),
    ("gptq-w3", ["--method", "gptq", "--bits", "3"], 3),
    ("gptq-w2", ["--method", "gptq", "--bits", "2"], 3),
    ("ternary", ["--method", "ternary"], 3),
    ("braq", ["--method", "braq"], 3),
    ("braq+col", ["--method", "braq", "--feedback", "column"], 3),
    ("arb-rc+cgb", ARC, 3),
    ("arb-rc+cgb+col", [*ARC, "--feedback", "column"], 3),
    ("sign", ["--method", "sign"], 1),
    ("sign+col", ["--method", "sign", "--feedback", "column"], 1),
    ("row-hbraq+share-mean", ["--method", "row-hbraq", "--share-mean"], 1),
    ("dbell+arb-rc+cgb", [*ARC, "--transform", "dbell"], 1),
    ("dbell+arb-rc+cgb+col", [*ARC, "--transform", "dbell", "--feedback", "column"], 1),
    ("ternary+block", ["--method", "ternary", "--feedback", "block"], 1),
    ("gptq-w2+block", ["--method", "gptq", "--bits", "2", "--feedback", "block"], 1),
    ("gptq-w3+block", ["--method", "gptq", "--bits", "3", "--feedback", "block"], 1),
]


def frontier_rows(max_seeds: int = 3) -> list[tuple[str, list[str]]]:
    """Every frontier point at calibration seed 0 first, then the extra seeds of the spread points
    (``--seeds`` caps them: 1 = seed 0 only)."""
    out = [(name, args) for name, args, _ in FRONTIER]
    for seed in range(1, max_seeds):
        out += [(f"{name}-s{seed}", [*args, "--seed", str(seed)]) for name, args, seeds in FRONTIER if seed < seeds]
    return out


ROT = ["--transform", "rotate", "--rotate-heads"]  # the recipes' rotation (folded: --save and GGUF keep it)
OUT = ["--budget-objective", "output"]  # the recipes' budget objective
LEAN2 = ["--method", "lean", "-m", "salient_frac=[0.05,0.15,0.4]", "-m", "salient_bits=[4,3,2]"]  # ≈ 1.93 bpw
BEYOND = [  # docs/budget.md: the first row also evaluates fp, then the recipes, then the ablation
    ("rotate-heads+budget2", [*ROT, "--bpw-budget", "2.0"]),  # lean2's first form: lean candidates, weight objective
    ("lean2", ["--recipe", "lean2"]),
    ("lean15", ["--recipe", "lean15"]),
    ("lean2-s1", ["--recipe", "lean2", "--seed", "1"]),  # a second calibration seed each: the recipes' spread
    ("lean15-s1", ["--recipe", "lean15", "--seed", "1"]),
    ("lean15-s2", ["--recipe", "lean15", "--seed", "2"]),  # and a third for the harder bound
    ("rotate-heads+vq10", ["--method", "vq", "-m", "bits=10", *ROT]),  # the recipes' vector codes alone (≈ 1.31)
    ("vq10", ["--method", "vq", "-m", "bits=10"]),  # … without rotation
    ("budget1.5-output-vq", ["--bpw-budget", "1.5", *OUT, "--budget-candidates", "vq"]),  # lean15 without rotation
    ("rotate-heads+budget1.5-vq", [*ROT, "--bpw-budget", "1.5", "--budget-candidates", "vq"]),  # … with the weight objective
    ("rotate-heads-down+budget1.5-output-vq",  # lean15 with an online Hadamard on down_proj's input
     [*ROT, "--rotate-down", "--bpw-budget", "1.5", *OUT, "--budget-candidates", "vq"]),
    ("rotate-heads+budget2-output-wide", [*ROT, "--bpw-budget", "2.0", *OUT, "--budget-candidates", "wide"]),
    ("rotate-heads+budget1.5-output-rich", [*ROT, "--bpw-budget", "1.5", *OUT, "--budget-candidates", "lean-rich"]),
    ("rotate-heads+budget1.5-output-rich-s1",  # lean15's third form (scalar codes only) and its second seed
     [*ROT, "--bpw-budget", "1.5", *OUT, "--budget-candidates", "lean-rich", "--seed", "1"]),
    ("dbell+arb-rc+cgb", [*ARC, "--transform", "dbell"]),  # the best seed method (the frontier's row)
    ("arb-rc+cgb", ARC),
    ("rotate-heads+arb-rc+cgb", [*ARC, *ROT]),  # rotation alone
    ("sign+col", ["--method", "sign", "--feedback", "column"]),  # the frontier's 1-bit reference
    ("lean-1bit", ["--method", "lean", "-m", "salient_frac=0"]),  # lean metadata alone (≈ 1.08)
    ("lean", ["--method", "lean"]),  # + structured salient channels (≈ 1.49)
    ("lean-2.0", LEAN2),
    ("rotate-heads+lean", ["--method", "lean", *ROT]),  # lean15's second form: lean's default tiers everywhere
    ("rotate-heads+lean-2.0", [*LEAN2, *ROT]),
    ("rotate-heads-down+lean", ["--method", "lean", *ROT, "--rotate-down"]),  # + online Hadamard on down_proj's input
    ("rotate-heads+budget1.5", [*ROT, "--bpw-budget", "1.5"]),  # lean15's first form: all seven lean candidates
    ("rotate-heads+budget1.5-output", [*ROT, "--bpw-budget", "1.5", *OUT]),  # the output objective alone
    ("rotate-heads+budget1.5-output-wide", [*ROT, "--bpw-budget", "1.5", *OUT, "--budget-candidates", "wide"]),
    ("budget1.5", ["--bpw-budget", "1.5"]),  # the bit budget alone (lean candidates)
    ("budget2", ["--bpw-budget", "2.0"]),
]

GGUF_TYPES = ("q1_0", "tq1_0", "tq2_0", "q2_k")


def rotation_available() -> bool:
    """Whether this onebit has the rotation pre-pass (``--transform rotate``, its own issue)."""
    from onebit.config import QuantConfig

    try:
        QuantConfig(transform="rotate")
    except ValueError:
        return False
    return True


def gguf_rows() -> list[tuple[str, list[str]]]:
    """braq first (fp eval, shared with the arb set; exported as the Q1_0 projection), each GGUF type with column
    (its default) and block feedback, with and without rotation (it changes tensors outside the linears: --save
    keeps them for the export); arb-rc + CGB (the frontier's) is projected too."""
    rots = (False, True) if rotation_available() else (False,)
    typed = [(f"gguf-{t}{'+block' if fb == 'block' else ''}{'+rot' if rot else ''}",
              ["--method", t, "--feedback", fb, *(["--transform", "rotate", "--save"] if rot else [])])
             for rot in rots for t in GGUF_TYPES for fb in ("column", "block")]
    typed.sort(key=lambda row: row[0].endswith("+block+rot"))  # the least telling combination last
    return [("braq", ["--method", "braq"]), ("arb-rc+cgb", ARC), *typed]


def export_gguf(run_dir: Path) -> dict:
    """``onebit export-gguf RUN RUN/model.gguf --eval wikitext2,c4`` (the run's eval windows): its summary,
    reused while newer than the run's report."""
    out, saved = run_dir / "model.gguf", run_dir / "gguf.json"
    if out.exists() and saved.exists() and saved.stat().st_mtime > (run_dir / "report.json").stat().st_mtime:
        return json.loads(saved.read_text())
    cmd = [str(Path(sys.executable).parent / "onebit"), "export-gguf", str(run_dir), str(out), "--eval", "wikitext2,c4"]
    print(f"[results] {shlex.join(cmd)}", flush=True)
    summary = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
    saved.write_text(json.dumps(summary))
    return summary


def gguf_table(dirs: list[Path], summaries: list[dict]) -> str:
    """One row per run: onebit's perplexity, the reloaded GGUF's, storage bpw (onebit's checkpoint), the GGUF
    linears' bpw (fallbacks included) and the file size."""
    head = ["run", "GGUF types (linears)", "onebit wikitext2", "GGUF wikitext2", "onebit c4", "GGUF c4", "storage bpw",
            "GGUF linear bpw", "file MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, s in zip(dirs, summaries):
        rep = json.loads((d / "report.json").read_text())
        types = ", ".join(f"{t} ({g['linears']})" for t, g in s["by_type"].items())
        ppl, gg = rep.get("ppl") or {}, s.get("ppl_gguf") or {}
        cells = [rep.get("name", d.name), types]
        for k in ("wikitext2", "c4"):
            cells += [f"{x.get(k, float('nan')):.2f}" for x in (ppl, gg)]
        cells += [f"{rep['storage_bpw']:.4f}", f"{s['linear_bpw']:.4f}", f"{s['file_bytes'] / 2**20:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def projection_reports(dirs: list[Path], summaries: list[dict], out: Path) -> list[Path]:
    """For the frontier figure: a report per projected export (a seed method's Q1_0 projection) with the GGUF
    linears' bpw and the reloaded file's perplexity, marked as a configuration of its own."""
    made = []
    for d, s in zip(dirs, summaries):
        if s["exact"]:
            continue
        rep = json.loads((d / "report.json").read_text())
        rep.update(name=f"{rep.get('name', d.name)} → Q1_0 projection", storage_bpw=s["linear_bpw"], ppl=s["ppl_gguf"],
                   config={**rep["config"], "export": "gguf-q1_0-projection"}, layers=[])
        rep.pop("paper_bpw", None)
        (out / d.name).mkdir(parents=True, exist_ok=True)
        (out / d.name / "report.json").write_text(json.dumps(rep))
        made.append(out / d.name)
    return made


def best_method(runs: Path) -> tuple[str, list[str]]:
    """The arb/hbllm row (other than braq and sign) with the lowest WikiText-2 perplexity measured so far."""
    rows_ = dict(rows("arb", ("", []), 0) + rows("hbllm", ("", []), 0))
    scores = {}
    for name in rows_.keys() - {"braq", "sign"}:
        rep = runs / name / "report.json"
        if rep.exists():
            scores[name] = json.loads(rep.read_text())["ppl"]["wikitext2"]
    if not scores:
        raise SystemExit("no arb/hbllm results yet to pick the best method from: run those sets first, or pass --best")
    name = min(scores, key=scores.get)
    print(f"[results] best weight-only method so far: {name} (wikitext2 ppl {scores[name]:.2f})", flush=True)
    return name, rows_[name]


def command(name: str, args: list[str], fp: bool, model: str) -> list[str]:
    """The ``onebit quantize`` command of a row (without its --out and --resume)."""
    return [str(Path(sys.executable).parent / "onebit"), "quantize", model, *COMMON,
            *([] if "--eval" in args else PPL), *args, "--name", name, "--fp-eval" if fp else "--no-fp-eval"]


def run(name: str, args: list[str], runs: Path, fp: bool, model: str) -> Path:
    out = runs / name
    cmd = command(name, args, fp, model)
    stamp = out / "command.json"
    if (out / "report.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == cmd[1:]:
        print(f"[results] {name}: reusing {out}/report.json", flush=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(cmd[1:]))
    (out / "report.json").unlink(missing_ok=True)
    print(f"[results] {name}: {shlex.join(cmd)} --out {out} --resume", flush=True)
    subprocess.run([*cmd, "--out", str(out), "--resume"], check=True)
    return out


def frontier_with(dirs: list[Path], runs: Path, seeds: int) -> list[Path]:
    """``dirs`` and the frontier set's finished runs (each once): the frontier figure with a set's points on it."""
    done = [runs / name for name, _ in frontier_rows(seeds) if (runs / name / "report.json").exists()]
    return list(dict.fromkeys([*dirs, *done]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("set", choices=SETS)
    p.add_argument("--best", default="auto",
                   help="for the dbell and zeroshot sets: a method with its flags, e.g. 'row-hbraq --share-mean', or "
                        "'auto' = the arb/hbllm row with the lowest WikiText-2 perplexity")
    p.add_argument("--limit", type=int, default=100, help="zero-shot: first N documents per task")
    p.add_argument("--seeds", type=int, default=3, help="frontier: calibration seeds of the spread points")
    p.add_argument("--runs", type=Path, default=Path("runs/results"))
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dry-run", action="store_true", help="print each row's command and run nothing")
    p.add_argument("--only", default="", help="comma-separated row names: run (and report) just those rows")
    a = p.parse_args()
    best: tuple[str, list[str]] = ("", [])
    if a.set in ("dbell", "zeroshot"):
        flags = shlex.split(a.best)
        best = best_method(a.runs) if a.best == "auto" else ("-".join(flags), ["--method", *flags])
    todo = list(enumerate(rows(a.set, best, a.limit, a.seeds)))  # row 0 also evaluates fp, with --only too
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    if only - {name for _, (name, _) in todo}:
        raise SystemExit(f"--only: no such row in {a.set}: {', '.join(sorted(only - {n for _, (n, _) in todo}))}")
    todo = [(i, row) for i, row in todo if not only or row[0] in only]
    if a.dry_run:
        for i, (name, args) in todo:
            print(f"{name}: {shlex.join(command(name, args, i == 0, a.model))} --out {a.runs / name} --resume")
        return
    dirs, summaries = [], []
    for i, (name, args) in todo:  # a gguf row is exported as soon as it is measured: a partial set is usable
        dirs.append(run(name, args, a.runs, i == 0, a.model))
        if a.set == "gguf":
            summaries.append(export_gguf(dirs[-1]))
    if a.set == "gguf":
        table = gguf_table(dirs, summaries)
        (a.runs / "gguf").mkdir(parents=True, exist_ok=True)
        (a.runs / "gguf" / "gguf.md").write_text(table + "\n")
        print(table)
        dirs += projection_reports(dirs, summaries, a.runs / "gguf" / "projections")
    md, paths = write_report(dirs, a.runs / a.set, frontier=a.set in ("frontier", "gguf"))
    if a.set == "beyond":  # the ablation table above (ppl, bpw, seconds); the points on the frontier figure
        paths += write_report(frontier_with(dirs, a.runs, a.seeds), a.runs / a.set / "frontier", frontier=True)[1]
    print(md)
    print("wrote " + ", ".join(str(x) for x in paths))


if __name__ == "__main__":
    main()
