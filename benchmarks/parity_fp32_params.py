"""Diagnostic for the DBellQuant/BiLLM parity runs (docs/dbellquant.md "Parity"): onebit's side of
``../shared/parity/onebit_side.py`` with braq's fitted parameters (μ, α) kept in fp32, as the reference
codes simulate them, instead of rounded to the fp16 that onebit stores. What is left between the two sides
after this is not a difference of algorithm. Never used for results: the stored form is fp16.

    REFRUNS=... REF_MODEL_DIR=CUT python benchmarks/parity_fp32_params.py braq salient_metric=hessian \
        proxy_order=1 --cfg transform=dbell ltdb_p=2 [act_bits=8] > ob_fp32.json
"""

from __future__ import annotations

import os
import runpy
import sys

import onebit.methods.binarize as binarize
from onebit.methods.base import BlockResult
from onebit.methods.braq import Braq

PARITY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "parity", "onebit_side.py")
_stored = Braq.quantize_block


def _fp32_block(self: Braq, w, ctx) -> BlockResult:
    """The stored block (fp16 parameters) with its dequantized weights replaced by the fp32 fit's."""
    res = _stored(self, w, ctx)
    q = sum(binarize.fit_group(w, m, order, rounded=False).recon for m, order in zip(self.masks(w, ctx), (1, 1, 2)))
    return BlockResult(q, res.params, res.bits, res.stats)


if __name__ == "__main__":
    Braq.quantize_block = _fp32_block
    sys.argv = [PARITY, *sys.argv[1:]]
    runpy.run_path(PARITY, run_name="__main__")
