"""Zero-shot scoring through lm-eval on local task files, against log-likelihoods computed here directly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval", reason="the optional extra `eval` (lm-eval) is not installed")

from conftest import save_tiny_model_dir  # noqa: E402
from onebit.eval.zeroshot import LOCAL_TASKS, TASKS, local_docs, summarize, task_config, zeroshot  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "zeroshot"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _hs_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def expected_requests(task: str) -> list[tuple[list[tuple[str, str]], int, list[str]]]:
    """Per document: [(context, continuation)] per choice, the gold index, the choice texts (for acc_norm).

    The prompts are written out here plainly from lm-eval's task definitions, on the raw fixture files."""
    out = []
    if task == "piqa":
        labels = [int(x) for x in (FIXTURES / "piqa/valid-labels.lst").read_text().split()]
        for d, y in zip(_jsonl(FIXTURES / "piqa/valid.jsonl"), labels):
            ch = [d["sol1"], d["sol2"]]
            out.append(([(f"Question: {d['goal']}\nAnswer:", " " + c) for c in ch], y, ch))
    elif task == "boolq":
        for d in _jsonl(FIXTURES / "boolq/val.jsonl"):
            ctx = f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"
            out.append(([(ctx, " no"), (ctx, " yes")], int(d["label"] == "true"), ["no", "yes"]))
    elif task in ("arc_easy", "arc_challenge", "openbookqa"):
        f = {"arc_easy": "arc/ARC-Easy/ARC-Easy-Test.jsonl", "arc_challenge": "arc/ARC-Challenge/ARC-Challenge-Test.jsonl",
             "openbookqa": "openbookqa/Main/test.jsonl"}[task]
        for d in _jsonl(FIXTURES / f):
            q = d["question"]
            ctx = q["stem"] if task == "openbookqa" else f"Question: {q['stem']}\nAnswer:"
            ch = [c["text"] for c in q["choices"]]
            gold = [c["label"] for c in q["choices"]].index(d["answerKey"].strip())
            out.append(([(ctx, " " + c) for c in ch], gold, ch))
    elif task == "winogrande":
        for d in _jsonl(FIXTURES / "winogrande/winogrande_xl_validation.jsonl"):
            i = d["sentence"].index("_")
            ctxs = [d["sentence"][:i] + o for o in (d["option1"], d["option2"])]
            out.append(([(c, " " + d["sentence"][i + 1 :].strip()) for c in ctxs], int(d["answer"]) - 1, ctxs))
    elif task == "hellaswag":
        for d in _jsonl(FIXTURES / "hellaswag/hellaswag_val.jsonl"):
            ctx = _hs_clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
            ch = [_hs_clean(e) for e in d["endings"]]
            out.append(([(ctx, " " + c) for c in ch], int(d["label"]), ch))
    return out


@torch.no_grad()
def loglik(model, tok, context: str, continuation: str) -> float:
    """Σ log p(continuation | context) in float64, one forward pass; trailing context spaces move to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    k = len(tok(context, add_special_tokens=False).input_ids)
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(k, len(whole))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = save_tiny_model_dir(tmp_path_factory.mktemp("zs") / "model")
    tok = AutoTokenizer.from_pretrained(d)
    tok.eos_token = "<unk>"  # lm-eval needs a BOS or EOS id (the prefix for empty contexts); no fixture context is empty
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), tok


@pytest.fixture(scope="module")
def scored(tiny):
    model, tok = tiny
    return zeroshot(model, tok, TASKS, data_dir=FIXTURES, batch_size=4, per_doc=True)


@pytest.mark.parametrize("task", TASKS)
def test_scores_match_direct_loglikelihoods(tiny, scored, task):
    model, tok = tiny
    docs = expected_requests(task)
    got = scored["docs"][task]
    assert len(got) == len(docs) == 3
    accs, norms = [], []
    for (reqs, gold, choices), g in zip(docs, got):
        lls = np.array([loglik(model, tok, c, x) for c, x in reqs])
        np.testing.assert_allclose(g["lls"], lls, rtol=1e-4, atol=1e-3)
        accs.append(float(np.argmax(lls) == gold))
        norms.append(float(np.argmax(lls / np.array([len(c) for c in choices])) == gold))
        assert g["acc"] == accs[-1]
        if "acc_norm" in g:
            assert g["acc_norm"] == norms[-1]
    r = scored["tasks"][task]
    assert r["n"] == 3 and r["acc"] == pytest.approx(np.mean(accs))
    if task not in ("boolq", "winogrande"):
        assert r["acc_norm"] == pytest.approx(np.mean(norms))


def test_average_uses_acc_norm_for_hellaswag_arc_c_obqa(scored):
    metric = scored["average_metric"]
    assert {t for t, m in metric.items() if m == "acc_norm"} == {"hellaswag", "arc_challenge", "openbookqa"}
    expected = np.mean([scored["tasks"][t][metric[t]] for t in TASKS])
    assert scored["average"] == pytest.approx(expected)
    assert scored["lm_eval_version"] == "0.4.13" and scored["limit"] is None and scored["add_bos_token"]
    assert scored["config"]["piqa"]["doc_to_text"] == "Question: {{goal}}\nAnswer:"


def test_summarize_by_hand():
    res = {"results": {"boolq": {"acc,none": 0.5, "alias": "boolq"}, "hellaswag": {"acc,none": 0.2, "acc_norm,none": 0.4}},
           "n-samples": {"boolq": {"effective": 4}, "hellaswag": {"effective": 5}}}
    s = summarize(res, ["boolq", "hellaswag"])
    assert s["average"] == pytest.approx((0.5 + 0.4) / 2) and s["tasks"]["boolq"] == {"acc": 0.5, "n": 4}


def test_limit_keeps_the_first_documents(tiny, scored):
    model, tok = tiny
    z = zeroshot(model, tok, ["piqa", "arc_easy"], data_dir=FIXTURES, limit=2, batch_size=4, per_doc=True)
    assert z["limit"] == 2 and all(z["tasks"][t]["n"] == 2 for t in ("piqa", "arc_easy"))
    assert z["docs"]["piqa"][1]["lls"] == pytest.approx(scored["docs"]["piqa"][1]["lls"], rel=1e-5)


def test_missing_task_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"winogrande/winogrande_xl_validation\.jsonl.*--task-data hub"):
        local_docs("winogrande", tmp_path)


@pytest.mark.parametrize("task", TASKS)
def test_local_loader_matches_official_task(data_dir, task):
    """Official item count, and lm-eval's own task builds on the local copy and renders its first documents."""
    from lm_eval.api.task import ConfigurableTask

    docs = local_docs(task, data_dir)
    assert len(docs) == LOCAL_TASKS[task].items
    official_fields = {
        "piqa": {"goal", "sol1", "sol2", "label"}, "boolq": {"question", "passage", "idx", "label"},
        "openbookqa": {"id", "question_stem", "choices", "answerKey"}, "winogrande": {"sentence", "option1", "option2", "answer"},
        "arc_easy": {"id", "question", "choices", "answerKey"}, "arc_challenge": {"id", "question", "choices", "answerKey"},
        "hellaswag": {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type", "label"},
    }[task]
    assert set(docs[0]) == official_fields
    t = ConfigurableTask(config=task_config(task, data_dir))
    ev = list(t.eval_docs)
    assert len(ev) == LOCAL_TASKS[task].items
    for doc in ev[:50]:
        choices = t.doc_to_choice(doc)
        target = t.doc_to_text(doc) if task == "winogrande" else t.doc_to_target(doc)
        assert isinstance(target, int) and 0 <= target < len(choices), (doc, target)

