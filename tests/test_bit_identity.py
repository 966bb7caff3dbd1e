"""The default path stays bit-identical: every seed method's stored forms (signs, masks, fp16 parameters) on
a tiny model of each family hash to what the code produced before column feedback and the baselines landed
(commit 9a061e7, recorded with ``python tests/stored_forms.py tests/fixtures/stored_forms.json``).

Float results depend on the CPU's vector width and the thread count (matmul blocking), so the fingerprints are
taken on one thread and compared only on the CPU capability and torch version they were recorded with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES
from stored_forms import CASES, cpu_capability, fingerprint

RECORDED = json.loads((Path(__file__).parent / "fixtures" / "stored_forms.json").read_text())
FAST_FAMILIES = ("llama", "opt")


def _threads(count: int):
    if RECORDED["cpu_capability"] != cpu_capability() or RECORDED["torch"] != torch.__version__:
        pytest.skip(f"fingerprints recorded on {RECORDED['cpu_capability']} / torch {RECORDED['torch']}")
    n = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    yield from _threads(1)


@pytest.fixture
def two_threads():
    yield from _threads(2)


@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f in FAST_FAMILIES else pytest.mark.slow) for f in FAMILIES])
@pytest.mark.parametrize("case", list(CASES))
def test_stored_forms_unchanged(one_thread, family, case):
    assert fingerprint(family, case) == RECORDED["hashes"][f"{family}/{case}"]


@pytest.mark.parametrize("case", ["braq", "arb-rc", "row-hbraq", "dbell+braq"])
def test_two_threads_store_what_one_thread_stores(two_threads, case):
    """At T > 1 threads the linears are solved T at a time, each on one thread (issue #16): the stored forms
    equal the one-thread fingerprints (before, splitting the solves' reductions over threads changed them)."""
    assert fingerprint("llama", case) == RECORDED["hashes"][f"llama/{case}"]
