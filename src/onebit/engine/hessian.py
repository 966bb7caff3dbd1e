"""Per-linear Hessian accumulation H = (2/N)·Σ x xᵀ (framework §3), fed by forward hooks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..timing import timed


class HessianAccumulator:
    """Accumulates Σ x xᵀ over the inputs of one linear; N counts sequences (as the references).

    Each batch's x xᵀ is an fp32 matmul; the running sum is float64, so the Hessian handed to the solver
    (fp32) does not depend on the order in which batches are added: one process and several torchrun
    ranks (partial sums all-reduced) give the same H, hence the same masks and signs.
    ``token_mask`` (same leading shape as x without the feature dim) excludes padding tokens from XᵀX.
    The raw sum and N are kept so partial Hessians from several processes can simply be added.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.nsamples = 0

    @timed("hessian accumulation")
    def add_batch(self, x: Tensor, token_mask: Tensor | None = None) -> None:
        batch = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.device, torch.float32)
        if token_mask is not None:
            x = x[token_mask.reshape(-1).to(x.device)]
        self.xtx += (x.t() @ x).double()
        self.nsamples += batch

    @property
    def hessian(self) -> Tensor:
        """(2/N)·Σ x xᵀ in fp32."""
        return (self.xtx * (2.0 / max(self.nsamples, 1))).float()

    def hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.add_batch(inputs[0].detach())

    def pre_hook(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        """As a forward pre-hook registered with ``prepend=True``: sees the input before other pre-hooks
        (e.g. activation fake quantization) change it."""
        self.add_batch(inputs[0].detach())
