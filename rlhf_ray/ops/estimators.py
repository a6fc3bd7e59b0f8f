"""Critic-free advantage estimators, on the sequence scores of groups of samples of one prompt (GRPO,
RLOO) or on per-token rewards (REINFORCE++). Pure torch; shapes in the docstrings.

``scores`` float [G, n]: G prompts x n samples each (``ppo.samples_per_prompt``), a sample's sequence
score (RM score plus reward functions). A group estimator's advantage of a sample is that of every
response token of it (:func:`sequence_to_tokens`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .ppo import gae
from .stats import masked_whiten


def _check_groups(scores: Tensor, name: str) -> None:
    if scores.dim() != 2:
        raise ValueError(f"{name}: scores must be [G prompts, n samples], got shape {tuple(scores.shape)}")
    if scores.shape[1] < 2:
        raise ValueError(f"{name}: needs at least 2 samples per prompt to compare them "
                         f"(ppo.samples_per_prompt={scores.shape[1]})")


def grpo_advantages(scores: Tensor, eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al. 2024), as TRL computes it: (s - mean) / (std + eps) within each group, std the
    unbiased one (n - 1). A group whose samples tie gets 0.

    scores: float [G, n], n >= 2 -> float [G, n].
    """
    _check_groups(scores, "grpo_advantages")
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, keepdim=True)  # unbiased
    return (scores - mean) / (std + eps)


def rloo_advantages(scores: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024): each sample's score minus the mean of the other n - 1 of its group.

    scores: float [G, n], n >= 2 -> float [G, n]; each group's advantages sum to 0.
    """
    _check_groups(scores, "rloo_advantages")
    n = scores.shape[1]
    others = (scores.sum(dim=1, keepdim=True) - scores) / (n - 1)
    return scores - others


def sequence_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """A sequence's advantage on every response token of it.

    advantages: float [B]; mask: bool/0-1 [B, T] -> float [B, T], 0 outside the mask.
    """
    return torch.where(mask.bool(), advantages[:, None].to(torch.float32), torch.zeros((), dtype=torch.float32))


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """R_t = sum_{j >= t} gamma^(j - t) r_j over each row's response tokens: :func:`gae` with zero
    values and lambda = 1 (its advantages are then exactly these returns).

    rewards: float [B, T]; mask: bool/0-1 [B, T], one contiguous block per row -> float [B, T], 0
    outside the mask.
    """
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return returns


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): per-token rewards (the sequence score on the last response token minus
    the reference-KL penalty on every token: ``kl_penalized_rewards``), returns with gamma = 1, and
    advantages = the returns whitened over the whole batch's response tokens.

    rewards: float [B, T]; mask: bool/0-1 [B, T] -> (advantages, returns), float [B, T], 0 outside the mask.
    """
    returns = discounted_returns(rewards, mask, 1.0)
    return masked_whiten(returns, mask, eps=eps), returns
