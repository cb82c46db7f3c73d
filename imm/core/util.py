"""Two small helpers shared by the core modules: float64 promotion and per-sample broadcasting."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def f64(t) -> Tensor:
    """t as a float64 tensor (schedule quantities are computed in float64, spec section 6)."""
    return torch.as_tensor(t, dtype=torch.float64)


def bcast(coef: Tensor, x: Tensor) -> Tensor:
    """A scalar or per-sample [B] coefficient cast to x's dtype/device and shaped [B, 1, ..., 1]."""
    coef = torch.as_tensor(coef).to(device=x.device, dtype=x.dtype)
    if coef.dim() == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (x.dim() - 1)))
