"""Parity on identical inputs: onebit's braq on the exact (W, H) the reference binarized, linear by linear.

The reference (DBellQuant's or BiLLM's ``bigptq.py``) is run once with a diagnostic dump added at the top of
``BRAGPTQ.fasterquant``, right after ``H = self.H`` — ``torch.save({"W": W.clone(), "H": H.clone()},
f"{DUMP}/ref_{n:02d}.pt")`` with n counting the linears — and its log kept. This script quantizes every dumped
linear with onebit (same block size and damping; ``proxy_order`` as given) and prints both losses:
what differs here is the binarizer, not the inputs. ``--fp32-params`` keeps μ, α unrounded as the reference
does (benchmarks/parity_fp32_params.py explains); by default they are the fp16 onebit stores.

    python benchmarks/parity_same_inputs.py DUMP_DIR reference.log [--proxy-order 1] [--fp32-params]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from onebit.engine.solver import quantize_linear
from onebit.methods.braq import Braq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dump", type=Path)
    ap.add_argument("log", type=Path)
    ap.add_argument("--proxy-order", type=int, default=1)
    ap.add_argument("--fp32-params", action="store_true")
    a = ap.parse_args()
    if a.fp32_params:
        from parity_fp32_params import _fp32_block
        Braq.quantize_block = _fp32_block
    lines = [l.strip() for l in a.log.read_text().splitlines()]
    names = [l for l in lines if re.fullmatch(r"\d+ \S+", l)]
    errors = [float(l.split()[1]) for l in lines if l.startswith("error ")]
    torch.set_num_threads(1)
    print(f"{'linear':26s} {'reference':>12s} {'onebit':>12s}   diff")
    for i, (name, ref) in enumerate(zip(names, errors)):
        d = torch.load(a.dump / f"ref_{i:02d}.pt")
        loss = quantize_linear(d["W"], d["H"], Braq(salient_metric="hessian", proxy_order=a.proxy_order), 128, 0.01).loss
        print(f"{name:26s} {ref:12.4f} {loss:12.4f} {100 * (loss / ref - 1):+6.2f}%")


if __name__ == "__main__":
    main()
