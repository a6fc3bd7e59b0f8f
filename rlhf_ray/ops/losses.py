"""Policy losses and their aggregations as registered pure functions (verl's ``core_algos.py``): the
``LOSS_TYPES`` table, with what an entry needs declared beside it, is read by the config check, the
learner and the metrics; nothing else names a loss type (the estimators' table: ``estimators.ESTIMATORS``).

The names are TRL's ``GRPOConfig.loss_type`` (``ppo.loss_type``): a loss type is a per-token policy
objective and an aggregation of it. Every tensor is [B, T] with a response mask [B, T] unless said
otherwise; the terms are to be MAXIMISED (the learner minimises the negative of the total).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .stats import masked_mean

# --------------------------------------------------------------------------- ratios and policy objectives

def log_importance_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """log pi_theta / pi_old: per token ("token", PPO), or each sequence's mean over its response tokens
    broadcast to them ("sequence", GSPO: the length-normalised sequence ratio). [B, T] -> [B, T]."""
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level != "sequence":
        raise ValueError(f"importance sampling level: expected 'token' or 'sequence', got {level!r}")
    m = mask.to(log_ratio.dtype)
    per_seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)
    return per_seq.expand_as(log_ratio)


class ClipRange(NamedTuple):
    low: float  # ppo.clip_eps: the ratio's floor is 1 - low
    high: float  # ppo.clip_eps_high (clip-higher); for cispo the truncation of the IS weight itself


def clip_objective(log_ratio: Tensor, logprobs: Tensor, advantages: Tensor, clip: ClipRange) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate per token: min(r A, clip(r, 1 - low, 1 + high) A), r = exp(log_ratio); and
    where the clipped branch is the strictly smaller one (A > 0 and r > 1 + high, or A < 0 and
    r < 1 - low). -> (surrogate [B, T], clipped float [B, T])."""
    ratio = torch.exp(log_ratio)
    surr = torch.minimum(ratio * advantages, ratio.clamp(1 - clip.low, 1 + clip.high) * advantages)
    clipped = ((advantages > 0) & (ratio > 1 + clip.high)) | ((advantages < 0) & (ratio < 1 - clip.low))
    return surr, clipped.to(surr.dtype)


def cispo_objective(log_ratio: Tensor, logprobs: Tensor, advantages: Tensor, clip: ClipRange) -> tuple[Tensor, Tensor]:
    """CISPO (MiniMax-M1): the importance weight truncated at ``clip.high`` and detached, times A times
    log pi_theta: every token keeps a gradient, however far its ratio moved (as TRL computes it).
    -> (objective [B, T], truncated float [B, T]: A > 0 and r > high)."""
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(max=clip.high).detach()
    return weight * advantages * logprobs, ((advantages > 0) & (ratio > clip.high)).to(logprobs.dtype)


# --------------------------------------------------------------------------- aggregations

def token_mean(x: Tensor, mask: Tensor, max_tokens: int = 0) -> Tensor:
    """Mean over every response token of the batch (DAPO's; the seed's L_clip). [B, T] -> scalar."""
    return masked_mean(x, mask)


def sequence_mean(x: Tensor, mask: Tensor, max_tokens: int = 0) -> Tensor:
    """Mean over each sequence's response tokens, then over sequences (GRPO's). [B, T] -> scalar."""
    m = mask.to(x.dtype)
    return ((x * m).sum(-1) / m.sum(-1).clamp_min(1.0)).mean()


def sequence_sum_over_max(x: Tensor, mask: Tensor, max_tokens: int = 0) -> Tensor:
    """Sum over each sequence's response tokens / max_tokens (``ppo.max_new_tokens``), mean over
    sequences (Dr. GRPO: no length normalisation bias). [B, T] -> scalar."""
    if max_tokens <= 0:
        raise ValueError("sequence_sum_over_max: needs max_tokens > 0 (ppo.max_new_tokens)")
    return (x * mask.to(x.dtype)).sum() / (x.shape[0] * max_tokens)


class Aggregation(NamedTuple):
    fn: Callable[[Tensor, Tensor, int], Tensor]
    # What a rank of a learner group weighs its loss by so that the ranks' mean gradient is the
    # minibatch's: its share of the response tokens ("tokens") or of the sequences ("sequences").
    unit: str


AGGREGATIONS = {"token_mean": Aggregation(token_mean, "tokens"), "sequence_mean": Aggregation(sequence_mean, "sequences"),
                "sequence_sum_over_max": Aggregation(sequence_sum_over_max, "sequences")}


class LossType(NamedTuple):
    objective: Callable[[Tensor, Tensor, Tensor, ClipRange], tuple[Tensor, Tensor]]
    aggregation: str  # a key of AGGREGATIONS
    summary: str


LOSS_TYPES: dict[str, LossType] = {}


def register_loss_type(name: str, objective, aggregation: str, summary: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss type {name}: unknown aggregation {aggregation!r}")
    LOSS_TYPES[name] = LossType(objective, aggregation, summary)


register_loss_type("dapo", clip_objective, "token_mean", "PPO-clip, mean over every response token of the batch (the "
                   "seed's L_clip; TRL's default)")
register_loss_type("bnpo", clip_objective, "token_mean", "PPO-clip, mean over the response tokens of each optimizer "
                   "step's batch (as dapo here: one step is one minibatch)")
register_loss_type("grpo", clip_objective, "sequence_mean", "PPO-clip, mean over each sequence's tokens, then over "
                   "sequences")
register_loss_type("dr_grpo", clip_objective, "sequence_sum_over_max", "PPO-clip, each sequence's sum / "
                   "max_new_tokens, mean over sequences")
register_loss_type("cispo", cispo_objective, "token_mean", "the truncated, detached IS weight x A x log pi, mean over "
                   "tokens (ppo.clip_eps_high truncates the weight: about 5)")


class PolicyTerms(NamedTuple):
    """Detached statistics of :func:`policy_loss`."""
    objective: Tensor  # the aggregated policy term (to maximise)
    clip_frac: Tensor  # share of response tokens whose ratio was clipped (truncated, for cispo)


def policy_loss(loss_type: str, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip: ClipRange, level: str = "token", weights: Tensor | None = None,
                max_tokens: int = 0) -> tuple[Tensor, PolicyTerms]:
    """The policy term of ``loss_type`` (to MAXIMISE): its per-token objective at the importance ratio
    of ``level`` ("token" | "sequence"), times ``weights`` [B, T] (truncated importance weights pi_old /
    pi_behaviour: :func:`rlhf_ray.ops.truncated_is_weights`) when given, aggregated by its aggregation
    (``max_tokens``: ppo.max_new_tokens, for dr_grpo). -> (objective scalar, PolicyTerms)."""
    lt = LOSS_TYPES[loss_type]
    per_token, clipped = lt.objective(log_importance_ratio(logprobs, old_logprobs, mask, level), logprobs,
                                      advantages, clip)
    if weights is not None:
        per_token = per_token * weights
    value = AGGREGATIONS[lt.aggregation].fn(per_token, mask, max_tokens)
    return value, PolicyTerms(value.detach(), masked_mean(clipped, mask).detach())


def aggregate(loss_type: str, per_token: Tensor, mask: Tensor, max_tokens: int = 0) -> Tensor:
    """``per_token`` [B, T] aggregated as ``loss_type`` aggregates its policy term (the KL terms go the
    same way, as in TRL). -> scalar."""
    return AGGREGATIONS[LOSS_TYPES[loss_type].aggregation].fn(per_token, mask, max_tokens)
