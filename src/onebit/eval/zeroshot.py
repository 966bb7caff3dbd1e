"""Zero-shot accuracy through lm-evaluation-harness on the in-memory model (framework §6).

lm-eval's own task definitions (prompt, choices, target, metrics) are used unchanged; only where the
documents come from is replaced: with ``source="local"`` (the default) each task reads the local copy of
the split it evaluates from the data directory, mapped to the fields the official Hugging Face dataset
has, through the task's ``custom_dataset`` hook. Nothing is downloaded (the HF offline switches are set).
``source="hub"`` leaves the official task untouched (its dataset comes from the Hub, on a networked machine).

The local copies hold only the evaluated split, so the other splits are switched off in the task config;
few-shot examples are not available offline (these papers use ``num_fewshot = 0``).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from ..data.corpora import resolve_data_dir
from ..errors import DataError, InputError, MissingFileError

TASKS = ("piqa", "boolq", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag")
# The metric that enters the average (common convention; both are reported).
AVERAGE_METRIC = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
LM_EVAL_VERSION = "0.4.13"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def _piqa(valid: Path, labels: Path) -> list[dict[str, Any]]:
    """baber/piqa: goal, sol1, sol2, label (int); the labels live in a separate file."""
    docs, lab = _jsonl(valid), _labels(labels)
    if len(docs) != len(lab):
        raise DataError(f"{valid} has {len(docs)} items but {labels} has {len(lab)} labels",
                        hint="Restore both files from the same PIQA release")
    return [dict(goal=d["goal"], sol1=d["sol1"], sol2=d["sol2"], label=y) for d, y in zip(docs, lab)]


def _boolq(path: Path) -> list[dict[str, Any]]:
    """super_glue/boolq: question, passage, idx, label (0 = False, 1 = True)."""
    to_int = {"false": 0, "true": 1, False: 0, True: 1, 0: 0, 1: 1}
    return [dict(question=d["question"], passage=d["passage"], idx=d["idx"], label=to_int[d["label"]]) for d in _jsonl(path)]


def _ai2_choices(d: dict[str, Any]) -> dict[str, list[str]]:
    """AI2's list of {text, label} as the HF datasets store it: {text: [...], label: [...]}."""
    ch = d["question"]["choices"]
    return dict(text=[c["text"] for c in ch], label=[c["label"] for c in ch])


def _arc(path: Path) -> list[dict[str, Any]]:
    """allenai/ai2_arc: id, question (the stem), choices {text, label}, answerKey."""
    return [dict(id=d["id"], question=d["question"]["stem"], choices=_ai2_choices(d), answerKey=d["answerKey"])
            for d in _jsonl(path)]


def _openbookqa(path: Path) -> list[dict[str, Any]]:
    """allenai/openbookqa (main): id, question_stem, choices {text, label}, answerKey."""
    return [dict(id=d["id"], question_stem=d["question"]["stem"], choices=_ai2_choices(d), answerKey=d["answerKey"])
            for d in _jsonl(path)]


def _winogrande(path: Path) -> list[dict[str, Any]]:
    """allenai/winogrande (winogrande_xl): sentence, option1, option2, answer ("1" | "2")."""
    return [dict(sentence=d["sentence"], option1=d["option1"], option2=d["option2"], answer=str(d["answer"]))
            for d in _jsonl(path)]


def _hellaswag(path: Path) -> list[dict[str, Any]]:
    """Rowan/hellaswag: the original fields; ``label`` is a string there."""
    return [dict(d, label=str(d["label"])) for d in _jsonl(path)]


@dataclass(frozen=True)
class LocalTask:
    """Where a task's evaluated split lives under the data directory, and how it maps to the official fields."""

    files: tuple[str, ...]
    split: str  # the split the official task evaluates (its test split if it has one, else validation)
    load: Callable[..., list[dict[str, Any]]]
    items: int  # the official split's size


LOCAL_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask(("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation", _piqa, 1838),
    "boolq": LocalTask(("boolq/val.jsonl",), "validation", _boolq, 3270),
    "openbookqa": LocalTask(("openbookqa/Main/test.jsonl",), "test", _openbookqa, 500),
    "winogrande": LocalTask(("winogrande/winogrande_xl_validation.jsonl",), "validation", _winogrande, 1267),
    "arc_easy": LocalTask(("arc/ARC-Easy/ARC-Easy-Test.jsonl",), "test", _arc, 2376),
    "arc_challenge": LocalTask(("arc/ARC-Challenge/ARC-Challenge-Test.jsonl",), "test", _arc, 1172),
    "hellaswag": LocalTask(("hellaswag/hellaswag_val.jsonl",), "validation", _hellaswag, 10042),
}


def local_paths(task: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The local files of ``task``; a missing one is an error that says which file to put where."""
    if task not in LOCAL_TASKS:
        raise InputError(f"no local data for task {task!r}", hint=f"Local tasks: {', '.join(LOCAL_TASKS)}; "
                                                                  f"others need --task-data hub")
    spec, root = LOCAL_TASKS[task], resolve_data_dir(data_dir)
    paths = [root / f for f in spec.files]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MissingFileError(
            f"{task}: missing {', '.join(missing)}",
            hint=f"Put the file(s) {', '.join(spec.files)} under the data directory {root} (--data-dir / ONEBIT_DATA; "
                 f"formats in the data README), or use --task-data hub on a networked machine to read the official dataset",
        )
    return paths


def local_docs(task: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The evaluated split of ``task`` from the data directory, with the official dataset's fields."""
    return LOCAL_TASKS[task].load(*local_paths(task, data_dir))


def set_offline() -> None:
    """HF offline switches (they take effect for libraries imported after this call): no Hub access by mistake."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")


@functools.cache
def task_manager():
    """lm-eval's task index, built once per process (scanning its task folder takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_config(task: str, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """lm-eval's official config of ``task`` with its documents read from the local copy."""
    from datasets import Dataset, DatasetDict
    from lm_eval.tasks._yaml_loader import load_yaml

    docs = local_docs(task, data_dir)  # fail early, before any model work
    split = LOCAL_TASKS[task].split
    cfg = load_yaml(task_manager().task_index[task].yaml_path, resolve_func=True)
    evaluated = cfg.get("test_split") or cfg.get("validation_split")
    if evaluated != split:
        raise ValueError(f"{task}: lm-eval {lm_eval_version()} evaluates split {evaluated!r}, the local copy is {split!r}")
    for key in ("training_split", "validation_split", "test_split"):
        if cfg.get(key) != split:
            cfg[key] = None
    cfg["custom_dataset"] = lambda **_: DatasetDict({split: Dataset.from_list(docs)})
    cfg.setdefault("metadata", {})["local_files"] = [str(resolve_data_dir(data_dir) / f) for f in LOCAL_TASKS[task].files]
    return cfg


def lm_eval_version() -> str:
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return "absent"


def bos_prepended(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front when asked for special tokens (what lm-eval's add_bos_token does)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


def summarize(results: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """acc / acc_norm (and their stderr) per task and the average of each task's AVERAGE_METRIC (else acc)."""
    per_task: dict[str, dict[str, float]] = {}
    for t in tasks:
        r = results["results"][t]
        per_task[t] = {k.split(",")[0]: float(v) for k, v in r.items() if k.split(",")[0] in
                       ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr") and isinstance(v, (int, float))}
        per_task[t]["n"] = int(results.get("n-samples", {}).get(t, {}).get("effective", 0))
    metric = {t: AVERAGE_METRIC[t] if AVERAGE_METRIC.get(t) in per_task[t] else "acc" for t in tasks}
    average = sum(per_task[t][metric[t]] for t in tasks) / len(tasks)
    return dict(tasks=per_task, average=average, average_metric=metric)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def zeroshot(
    model: nn.Module,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = TASKS,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    source: str = "local",
    per_doc: bool = False,
) -> dict[str, Any]:
    """Zero-shot acc / acc_norm of the in-memory ``model`` on lm-eval ``tasks``, plus the average.

    BOS: ``add_bos_token=True`` (framework §6), i.e. the tokenizer's own BOS is prepended where it defines one
    (Llama-2, Mistral, OPT); tokenizers without one (SmolLM2, Qwen) are left as they are, the same rule as the
    perplexity evaluation. ``limit`` keeps the first N documents of each task. ``per_doc`` adds each
    document's choice log-likelihoods and scores under ``docs``.
    """
    if source not in ("local", "hub"):
        raise ValueError(f"source must be 'local' or 'hub', got {source!r}")
    tasks = list(tasks)
    if source == "local":
        set_offline()
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError("zero-shot evaluation needs lm-eval: pip install 'onebit[eval]' (lm-eval==0.4.13)") from e
    from lm_eval.models.huggingface import HFLM

    tm = task_manager()
    unknown = [t for t in tasks if t not in tm.task_index]
    if unknown:
        raise InputError(f"unknown lm-eval task(s) {unknown}", hint="See lm-eval's task list (lm-eval --tasks list)")
    specs = [task_config(t, data_dir) if source == "local" else t for t in tasks]
    model.to(device)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=True, device=device)
        res = lm_eval.simple_evaluate(model=lm, tasks=specs, num_fewshot=0, limit=limit, task_manager=tm,
                                      log_samples=per_doc, bootstrap_iters=1000)
    finally:
        model.to("cpu")
    out = summarize(res, tasks)
    out.update(limit=limit, source=source, data_dir=str(resolve_data_dir(data_dir)) if source == "local" else None,
               num_fewshot=0, add_bos_token=True, bos_prepended=bos_prepended(tokenizer), batch_size=batch_size,
               lm_eval_version=lm_eval_version(),
               config={t: _jsonable({k: v for k, v in res["configs"][t].items() if k != "custom_dataset"}) for t in tasks},
               versions=_jsonable(res.get("versions", {})))
    if per_doc:
        out["docs"] = {t: [dict(doc_id=s["doc_id"], lls=[float(r[0]) for r in s["filtered_resps"]],
                                **{m: float(s[m]) for m in ("acc", "acc_norm") if m in s})
                           for s in sorted(res["samples"][t], key=lambda s: s["doc_id"])] for t in tasks}
    return out


def markdown(z: dict[str, Any]) -> str:
    """One row per task (acc, acc_norm, the metric in the average) and the average."""
    lines = ["| task | n | acc | acc_norm | in average |", "|---|---|---|---|---|"]
    for t, r in z["tasks"].items():
        norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "–"
        lines.append(f"| {t} | {r['n']} | {r['acc']:.4f} | {norm} | {z['average_metric'][t]} |")
    lines.append(f"| **average** | | | | **{z['average']:.4f}** |")
    return "\n".join(lines)
