"""Advantage estimators: the critic-free ones, on the sequence scores of groups of samples of one prompt
(GRPO, RLOO) or on per-token rewards (REINFORCE++), and the ``ESTIMATORS`` table that registers them
with GAE by name (verl's names: ``ppo.advantage_estimator``), each with what it needs declared beside
it. The config check, the learner, the advantage worker and the metrics read that table. Pure torch;
shapes in the docstrings.

``scores`` float [G, n]: G prompts x n samples each (``ppo.samples_per_prompt``), a sample's sequence
score (RM score plus reward functions). A group estimator's advantage of a sample is that of every
response token of it (:func:`sequence_to_tokens`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

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


def grpo_advantages(scores: Tensor, eps: float = 1e-4, scale: str = "group") -> Tensor:
    """GRPO (Shao et al. 2024), as TRL computes it: (s - mean) / (std + eps) within each group, std the
    unbiased one (n - 1); a group whose samples tie gets 0. ``scale`` (TRL's ``scale_rewards``): the
    group's std ("group"), the whole batch's ("batch", unbiased), or none ("none": s - mean, Dr. GRPO).

    scores: float [G, n], n >= 2 -> float [G, n].
    """
    _check_groups(scores, "grpo_advantages")
    centred = scores - scores.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    if scale == "group":
        std = scores.std(dim=1, keepdim=True)  # unbiased
    elif scale == "batch":
        std = scores.std()
    else:
        raise ValueError(f"grpo_advantages: scale must be 'group', 'batch' or 'none', got {scale!r}")
    return centred / (std + eps)


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


# --------------------------------------------------------------------------- advantage estimators


class AdvantageSettings(NamedTuple):
    """What the estimators read of the config (``ppo.*``), and nothing more."""

    n: int = 1  # samples per prompt: a prompt's samples are adjacent rows
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True  # gae: whiten the advantages over the batch
    scale_rewards: str = "group"  # grpo: divide by the group's std ("group"), the batch's ("batch"), or not ("none")


class Estimator(NamedTuple):
    fn: Callable[[Tensor, Tensor, Tensor, AdvantageSettings], tuple[Tensor, Tensor]]
    critic: bool  # reads a value head's values: the learner keeps one and trains c1 x L_V
    groups: bool  # compares the n samples of a prompt: ppo.samples_per_prompt >= 2
    summary: str


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str, *, critic: bool = False, groups: bool = False, summary: str = ""):
    """Register ``fn(rewards, values, mask, settings) -> (advantages, returns)`` (all [B, T]) as ``name``."""
    def register(fn):
        ESTIMATORS[name] = Estimator(fn, critic, groups, summary)
        return fn
    return register


def sequence_scores(rewards: Tensor, mask: Tensor, n: int) -> Tensor:
    """Each sample's summed token rewards (its score minus its KL penalty), grouped. [B, T] -> [B / n, n]."""
    if len(rewards) % n:
        raise ValueError(f"{len(rewards)} samples are not whole groups of ppo.samples_per_prompt={n}")
    return torch.where(mask.bool(), rewards, 0.0).sum(-1).view(-1, n)


@register_estimator("gae", critic=True, summary="GAE over the token rewards with the learner's values")
def _gae(rewards: Tensor, values: Tensor, mask: Tensor, s: AdvantageSettings) -> tuple[Tensor, Tensor]:
    adv, returns = gae(rewards, values, mask, s.gamma, s.lam)
    return (masked_whiten(adv, mask) if s.whiten else adv), returns


@register_estimator("grpo", groups=True, summary="a sample's score against its group's mean (and std)")
def _grpo(rewards: Tensor, values: Tensor, mask: Tensor, s: AdvantageSettings) -> tuple[Tensor, Tensor]:
    adv = sequence_to_tokens(grpo_advantages(sequence_scores(rewards, mask, s.n), scale=s.scale_rewards).reshape(-1),
                             mask)
    return adv, adv


@register_estimator("rloo", groups=True, summary="a sample's score against the mean of its group's others")
def _rloo(rewards: Tensor, values: Tensor, mask: Tensor, s: AdvantageSettings) -> tuple[Tensor, Tensor]:
    adv = sequence_to_tokens(rloo_advantages(sequence_scores(rewards, mask, s.n)).reshape(-1), mask)
    return adv, adv


@register_estimator("reinforce_plus_plus", summary="gamma-1 returns of the token rewards, whitened over the batch")
def _reinforce_pp(rewards: Tensor, values: Tensor, mask: Tensor, s: AdvantageSettings) -> tuple[Tensor, Tensor]:
    return reinforce_pp_advantages(rewards, mask)
