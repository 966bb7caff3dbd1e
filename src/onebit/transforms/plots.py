"""Weight histograms before/after the dual-bell transform (needs the optional extra ``plots``: matplotlib)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor


def standardized_block_rows(w: Tensor, block: int = 128) -> Tensor:
    """All values of all (row, column-block) pieces of ``w``, each as (v − μ)/β: a dual bell shows up as
    two modes at ±1, a single bell as one mode at 0. Full blocks only."""
    w = w.detach().float()
    n = w.shape[1] // block * block
    v = w[:, :n].reshape(w.shape[0], -1, block)
    mu = v.mean(-1, keepdim=True)
    beta = (v - mu).abs().mean(-1, keepdim=True).clamp_min(1e-12)
    return ((v - mu) / beta).reshape(-1)


def plot_weight_histograms(before: dict[str, Tensor], scales: dict[str, Tensor], out_dir: str | Path) -> list[Path]:
    """One PNG per linear: W vs W·diag(T), (left) one row's first block, (right) every block row standardized."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, w in before.items():
        after = w.float() * scales[name].float()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        row = int(after.abs().sum(1).argmax())
        for label, m in (("before", w.float()), ("after", after)):
            r = m[row, :128]
            axes[0].hist(((r - r.mean()) / r.std()).numpy(), bins=40, alpha=0.55, label=label)
        axes[0].set_title(f"row {row}, columns 0–127 (standardized)")
        for label, m in (("before", w), ("after", after)):
            z = standardized_block_rows(m)
            axes[1].hist(z[z.abs() <= 4].numpy(), bins=161, alpha=0.55, density=True, label=label)
        axes[1].set_title("all 128-column block rows, (v − μ)/β")
        for ax in axes:
            ax.legend()
        fig.suptitle(name)
        fig.tight_layout()
        path = out_dir / f"hist-{name.replace('.', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def pick_plot_linears(names: list[str], layers: int) -> list[str]:
    """A few representative linears: q_proj/gate (first input linear of each group) of the first, middle
    and last layer."""
    keep = {0, layers // 2, layers - 1}
    out = []
    for n in names:
        parts = n.split(".")
        idx = next(int(p) for p in parts if p.isdigit())
        if idx in keep and any(s in n for s in ("q_proj", "gate_proj", "fc1")):
            out.append(n)
    return out

