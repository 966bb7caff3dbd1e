"""Named configurations, in one place: budget candidate sets (``--budget-candidates NAME``) and recipes
(``--recipe NAME``: QuantConfig fields, ``method`` and ``method_options`` included). ``onebit recipes`` lists
both; docs/budget.md and docs/dbellquant.md say what backs each.

The candidate set ``lean`` spans lean's tier settings from plain 1-bit to three tiers on 60 % of the input
channels (storage bpw at the default 128-column blocks and int8 parameters, 576-wide rows; docs/budget.md
measures them). Its first entry is the cheapest: a budget's floor and the run's nominal method.
"""

from __future__ import annotations

from typing import Any

CANDIDATES: dict[str, list[dict[str, Any]]] = {
    "lean": [
        {"method": "lean", "options": {"salient_frac": 0}},                                               # ≈ 1.08 bpw
        {"method": "lean", "options": {"salient_frac": [0.01, 0.05, 0.12], "salient_bits": [4, 3, 2]}},    # ≈ 1.33
        {"method": "lean", "options": {"salient_frac": [0.02, 0.35], "salient_bits": [4, 2]}},             # ≈ 1.49
        {"method": "lean", "options": {"salient_frac": [0.02, 0.08, 0.2], "salient_bits": [4, 3, 2]}},     # ≈ 1.50
        {"method": "lean", "options": {"salient_frac": [0.03, 0.1, 0.3], "salient_bits": [4, 3, 2]}},      # ≈ 1.67
        {"method": "lean", "options": {"salient_frac": [0.05, 0.15, 0.4], "salient_bits": [4, 3, 2]}},     # ≈ 1.93
        {"method": "lean", "options": {"salient_frac": [0.1, 0.3, 0.6], "salient_bits": [4, 3, 2]}},       # ≈ 2.58
    ],
}
RICH = [  # two richer settings for the linears whose errors the layer's output feels most (v_proj, k_proj)
    {"method": "lean", "options": {"salient_frac": [0.2, 0.4, 0.4], "salient_bits": [4, 3, 2]}},         # ≈ 2.9
    {"method": "lean", "options": {"salient_frac": [1.0], "salient_bits": [4]}},                         # ≈ 4.08
]
# lean15's: lean's seven settings and the two richer ones (README "beyond": 500 / 458 at 1.500 with the output
# objective, against 597 / 524 for the seven alone and 782 / 599 for "wide").
CANDIDATES["lean-rich"] = CANDIDATES["lean"] + RICH
# lean2's before vq: also two finer cheap settings and 8-bit GPTQ (never chosen on SmolLM2 at 2.0).
CANDIDATES["wide"] = [
    CANDIDATES["lean"][0],
    {"method": "lean", "options": {"salient_frac": [0.02], "salient_bits": [4]}},                        # ≈ 1.14
    {"method": "lean", "options": {"salient_frac": [0.01, 0.1], "salient_bits": [4, 2]}},                # ≈ 1.21
    *CANDIDATES["lean"][1:], *RICH,
    {"method": "gptq", "options": {"bits": 8}},                                                           # ≈ 8.25
]
# lean2's and lean15's: vector codes (methods/vq.py) from 1.06 to 2.06 storage bpw, then lean's two richest tier
# settings and the two richer ones (README "beyond", output objective: at 1.5 301 / 285 against 500 / 458 for
# "lean-rich"; at 2.0 83 / 93 against 126 / 143 for "wide").
CANDIDATES["vq"] = [
    *({"method": "vq", "options": {"bits": k}} for k in (8, 9, 10, 11, 12)),                           # ≈ 1.06 … 1.56
    *({"method": "vq", "options": {"dim": 4, "bits": k}} for k in (7, 8)),                              # ≈ 1.81, 2.06
    *CANDIDATES["lean"][5:], *RICH,
]

# Measured on the embedded model by benchmarks/results.py beyond (README "Beyond the seed methods").
RECIPES: dict[str, dict[str, Any]] = {
    "lean2": {"transform": "rotate", "rotate_heads": True, "bpw_budget": 2.0, "budget_candidates": "vq",
              "budget_objective": "output"},
    "lean15": {"transform": "rotate", "rotate_heads": True, "bpw_budget": 1.5, "budget_candidates": "vq",
               "budget_objective": "output"},
    # DBellQuant exactly as released (ZijianYY/DBellQuant @ 6bc3e86, docs/dbellquant.md "Parity"): the L2 loss
    # and braq with the order-1 non-salient proxy in its column-count search (BiLLM's is order 2).
    "dbellquant": {"method": "braq", "method_options": {"proxy_order": 1}, "transform": "dbell", "ltdb_p": 2.0},
}


def candidate_set(name: str) -> list[dict[str, Any]]:
    if name not in CANDIDATES:
        raise ValueError(f"unknown budget candidate set {name!r}: {', '.join(CANDIDATES)} (or a JSON list of "
                         f"{{method, options}})")
    return [dict(c, options=dict(c["options"])) for c in CANDIDATES[name]]


def recipe(name: str) -> dict[str, Any]:
    """A recipe's QuantConfig fields."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: {', '.join(RECIPES)}")
    return dict(RECIPES[name])
