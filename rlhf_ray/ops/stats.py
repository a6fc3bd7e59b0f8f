"""Masked reductions over token tensors.

Masks are bool or 0/1 float. Entries outside the mask are dropped with torch.where before
any arithmetic that could mix them in, so NaN/inf garbage in padding changes neither the
results nor the gradients of these functions (masked-out entries get exactly 0 gradient).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _select(x: Tensor, mask: Tensor) -> Tensor:
    # where() instead of x * mask: 0 * nan = nan, and padding may hold anything.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over masked entries. x: float [...], mask: bool/0-1 [...] (same shape)."""
    s = _select(x, mask)
    return s.sum() if dim is None else s.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over masked entries. x, mask: [...]; reduces over all entries or `dim`.

    An empty mask (no selected entry) gives 0, not NaN: count is clamped to >= 1.
    """
    m = mask.bool()
    n = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / n.clamp_min(1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all masked entries (scalar). x, mask: [...].

    unbiased=True applies Bessel's n/(n-1); with n <= 1 the variance is 0.
    """
    m = mask.bool()
    # select before squaring: a nan at padding would otherwise give 0 * nan = nan gradients
    var = masked_mean(_select(x - masked_mean(x, m), m) ** 2, m)
    if unbiased:
        n = m.sum().to(x.dtype)
        var = var * n / (n - 1).clamp_min(1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten x with the mean and (unbiased) variance of its masked entries. x, mask: [...].

    Rule: masked entries -> (x - mean) / sqrt(var + eps) (+ mean again if not shift_mean);
    entries outside the mask are returned as 0.
    """
    m = mask.bool()
    mean, var = masked_mean(x, m), masked_var(x, m)
    out = _select(x - mean, m) * torch.rsqrt(var + eps)
    return out if shift_mean else _select(out + mean, m)
