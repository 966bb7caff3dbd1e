"""Fingerprints of the stored forms a quantization run produces: sha256 over every linear's block tensors
(names, dtypes, shapes, bytes) in order. Used to pin the default path bit-identical across refactors and
speed-ups (tests/test_bit_identity.py); ``python tests/stored_forms.py OUT.json`` records them."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from conftest import FAMILIES, random_ids, tiny_model

# (label, QuantConfig keyword arguments): every seed method on its default path
CASES = {
    "sign": dict(method="sign"),
    "braq": dict(method="braq"),
    "arb": dict(method="arb"),
    "arb-x": dict(method="arb-x"),
    "arb-rc": dict(method="arb-rc"),
    "row-hbraq": dict(method="row-hbraq"),
    "col-hbraq": dict(method="col-hbraq", method_options={"share_mean": True}),
    "dbell+braq": dict(method="braq", transform="dbell", ltdb_epochs=5),
    "braq-proxy1": dict(method="braq", method_options={"proxy_order": 1}),  # DBellQuant's column-count proxy
}


def fingerprint(family: str, case: str) -> str:
    import onebit
    from onebit.engine.pipeline import hash_stored_forms

    model = tiny_model(family)
    digest = hashlib.sha256()
    onebit.quantize(model, onebit.QuantConfig(**CASES[case]), random_ids(4, 64), on_layer=hash_stored_forms(digest))
    return digest.hexdigest()


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = {"cpu_capability": cpu_capability(), "torch": torch.__version__,
           "hashes": {f"{f}/{c}": fingerprint(f, c) for f in FAMILIES for c in CASES}}
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1) + "\n")
