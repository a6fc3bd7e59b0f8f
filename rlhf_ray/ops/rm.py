"""Listwise reward-model loss and its calibration metric.

Model: P(y_i | x) = exp(R(x, y_i)) / sum_j exp(R(x, y_j)) over the K candidates of a prompt
(Plackett-Luce top-1; Bradley-Terry when K = 2). Training maximises log P(y_best | x).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _masked_log_softmax(rewards: Tensor, valid: Tensor) -> Tensor:
    # Mask to -inf BEFORE the softmax so padding gets exactly zero probability.
    # masked_fill's backward sends 0 to filled slots, and log_softmax's backward there is
    # 0 - softmax(=0) * sum, so padded slots get 0 gradient (no NaN) as long as a row
    # has at least one valid entry.
    return F.log_softmax(rewards.masked_fill(~valid.bool(), float("-inf")), dim=-1)


def listwise_probs(rewards: Tensor, valid: Tensor) -> Tensor:
    """P(y_i | x): softmax of rewards over valid candidates.

    rewards: float [B, Kmax]; valid: bool [B, Kmax]. Returns float [B, Kmax], 0 at padding
    (and all 0 for a row without valid entries).
    """
    p = _masked_log_softmax(rewards, valid).exp()
    return torch.where(valid.bool(), p, torch.zeros((), dtype=p.dtype, device=p.device))


def listwise_rm_loss(rewards: Tensor, valid: Tensor, best: Tensor) -> Tensor:
    """Mean over B of -log P(y_best | x), the softmax taken over valid candidates only.

    rewards: float [B, Kmax]; valid: bool [B, Kmax]; best: long [B] (index of the labelled best).
    Returns a scalar. d loss / d R_i = (P_i - 1[i = best]) / B, 0 at padding.
    Raises ValueError if a row has no valid entry or best is out of range / not valid.
    """
    K, valid = rewards.shape[-1], valid.bool()
    if bool(((best < 0) | (best >= K)).any()):
        raise ValueError(f"best out of range [0, {K})")
    if not bool(valid.any(-1).all()):
        raise ValueError("a row has no valid candidate")
    if not bool(valid.gather(1, best[:, None]).all()):
        raise ValueError("best points at a padded (invalid) candidate")
    logp = _masked_log_softmax(rewards, valid)
    return -logp.gather(1, best[:, None]).squeeze(1).mean()


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 10) -> float:
    """ECE with n_bins equal-width bins on [0, 1].

    probs: float [N] in [0, 1] (P(y_i|x) over all valid candidates, flattened);
    labels: {0,1} [N] (1 where i was the labelled best).
    ECE = sum_b |bin_b|/N * |mean(probs in b) - mean(labels in b)| = sum_b |sum p - sum y| / N.
    Bins are [k/n, (k+1)/n); probs == 1.0 goes into the last bin. Returns a Python float.
    """
    probs, labels = probs.reshape(-1).double(), labels.reshape(-1).double()
    if probs.numel() == 0:
        raise ValueError("ECE of an empty set")
    idx = (probs * n_bins).long().clamp_(0, n_bins - 1)
    gap = torch.zeros(n_bins, dtype=torch.float64, device=probs.device)
    gap.index_add_(0, idx, probs - labels)  # per bin: sum p - sum y
    return (gap.abs().sum() / probs.numel()).item()
