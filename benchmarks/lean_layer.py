"""Output error against storage bpw of the lean method (docs/lean.md) and the seed references on one random
linear whose Hessian looks real: correlated inputs with a few loud channels and a dead one
(``tests/test_feedback.py::real_hessian``). Prints ``layer_error.py``'s table for its ``lean`` set: sign,
braq, arb-rc+CGB, gptq 2-bit, then lean at ~1.1, ~1.2, ~1.5 (its defaults) and ~2.0 storage bpw.

    .venv/bin/python benchmarks/lean_layer.py --n 1024 --m 1024
    .venv/bin/python benchmarks/layer_error.py --set lean --layer 0   # the same set on SmolLM2's layer 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from layer_error import SETS, print_errors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_feedback import real_hessian  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="output features (rows)")
    ap.add_argument("--m", type=int, default=1024, help="input features (columns)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    w = torch.randn(args.n, args.m, generator=g) * (1 + torch.rand(args.m, generator=g))
    h = real_hessian(args.m, args.seed).float()
    print(f"random {args.n} × {args.m} linear, real-looking Hessian (seed {args.seed})\n")
    print_errors([(w, h)], SETS["lean"])


if __name__ == "__main__":
    main()
