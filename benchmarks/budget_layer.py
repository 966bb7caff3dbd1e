"""The components of issue #18 on one random decoder layer (docs/budget.md): lean tiers, rotation, the bit
budget, alone and combined, beside arb-rc + CGB (the best seed method), without a full-model run.

Seven linears shaped as SmolLM2-135M's (q, k, v, o: 576 or 192 × 576; gate, up: 1536 × 576; down: 576 ×
1536), random weights with uneven column scales, Hessians that look real (correlated inputs with a few loud
channels, ``tests/test_feedback.py::real_hessian``), shared as in the model (q/k/v, gate/up). A rotation
expresses an input space in a seeded randomized Hadamard basis (W·Q, QᵀHQ): "rotate + heads" the residual
stream (q/k/v, gate/up) and o_proj's input (--transform rotate --rotate-heads), "+ down" also down_proj's
(--rotate-down). Every linear is solved once per candidate of the budget's
``lean`` set (onebit/recipes.py); a "lean" row takes one candidate everywhere, a budget row lets
engine/budget.py choose (candidates numbered from 0 in the set's order). Prints
Σ tr(ΔW H ΔWᵀ) / Σ tr(W H Wᵀ) over the layer, storage bpw and the solve seconds of each row.

    .venv/bin/python benchmarks/budget_layer.py            # --seed S for another draw
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from onebit.engine.budget import BudgetPlan
from onebit.engine.solver import LinearResult, quantize_linear
from onebit.methods import build_method
from onebit.recipes import candidate_set
from onebit.transforms.rotate import random_hadamard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_feedback import real_hessian  # noqa: E402

# linear → (rows, input space); input spaces → width
LINEARS = {"q_proj": (576, "attn"), "k_proj": (192, "attn"), "v_proj": (192, "attn"), "o_proj": (576, "o"),
           "gate_proj": (1536, "mlp"), "up_proj": (1536, "mlp"), "down_proj": (576, "down")}
SPACES = {"attn": 576, "o": 576, "mlp": 576, "down": 1536}


ROTATIONS = {"": (), "rotate + heads + ": ("attn", "mlp", "o"), "rotate + heads + down + ": ("attn", "mlp", "o", "down")}


def layer(seed: int, rotate: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(W, H) of each linear; those reading a space in ``rotate`` expressed in a randomized Hadamard basis."""
    g = torch.Generator().manual_seed(seed)
    hs = {s: real_hessian(m, seed + i, tokens=2 * m) for i, (s, m) in enumerate(SPACES.items())}
    out = {}
    for name, (n, space) in LINEARS.items():
        m = SPACES[space]
        w = torch.randn(n, m, generator=g, dtype=torch.float64) * (1 + torch.rand(m, generator=g, dtype=torch.float64))
        h = hs[space]
        if space in rotate:
            q = random_hadamard(m, seed).double()
            w, h = w @ q, q.T @ h @ q
        out[name] = w.float(), h.float()
    return out


def solve(lin: dict[str, tuple[torch.Tensor, torch.Tensor]], method: str, options: dict, feedback: str) -> tuple[dict[str, LinearResult], float]:
    t0 = time.perf_counter()
    res = {n: quantize_linear(w, h, build_method(method, **options), 128, feedback=feedback) for n, (w, h) in lin.items()}
    return res, time.perf_counter() - t0


def row(label: str, lin: dict, res: dict[str, LinearResult], seconds: float) -> str:
    energy = sum(float((w.double() @ h.double() * w.double()).sum()) for w, h in lin.values())
    bits = sum(r.bits.storage for r in res.values())
    weights = sum(r.bits.weights for r in res.values())
    return f"| {label} | {sum(r.err for r in res.values()) / energy:.4f} | {bits / weights:.3f} | {seconds:.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", default="1.5,2.0")
    args = ap.parse_args()
    cands = candidate_set("lean")
    lines = ["| configuration | error | storage bpw | seconds |", "|---|---|---|---|"]
    for pre, spaces in ROTATIONS.items():
        lin = layer(args.seed, spaces)
        lines.append(row(f"{pre}arb-rc + CGB", lin, *solve(lin, "arb-rc", {"cgb": True}, "block")))
        solved = [solve(lin, c["method"], c["options"], "column") for c in cands]
        for k, c in enumerate(cands):
            lines.append(row(f"{pre}lean {c['options']}", lin, *solved[k]))
        for budget in map(float, args.budgets.split(",")):
            plan = BudgetPlan(budget, cands, 128)
            plan.start([(0, n, tuple(w.shape)) for n, (w, _) in lin.items()])
            choice = plan.choose(0, {n: [res[n] for res, _ in solved] for n in lin})
            picked = {n: solved[k][0][n] for n, k in choice.items()}
            tiers = " ".join(str(k) for k in choice.values())
            lines.append(row(f"{pre}budget {budget:g} (candidates of q k v o gate up down: {tiers})", lin, picked,
                             sum(s for _, s in solved)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
