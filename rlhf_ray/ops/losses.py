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

from .ppo import kl_k3, value_loss
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


# --------------------------------------------------------------------------- importance weights

def truncated_is_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance weights min(pi_old / pi_behaviour, cap) per token, detached ([B, T] -> [B, T]).

    pi_behaviour is the policy that sampled the tokens as the engine computed it; pi_old the one PPO's
    ratio is taken against, as the learner computes it. They differ by the engine/learner mismatch
    (kernels, precision: truncated importance sampling, Yao et al. 2025) and, for stale rollouts
    (one-step-off), by the updates in between (decoupled PPO, Hilton et al. 2022): one correction for
    both, ``ppo.tis_cap``. Truncating at ``cap`` bounds the variance (as in IMPALA's V-trace).
    """
    return torch.exp(old_logprobs - behaviour_logprobs).clamp(max=cap).detach()


def mismatch_kl(behaviour_logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """KL(pi_behaviour || pi_old) over the sampled tokens (k3, x ~ pi_behaviour): how far the engine's
    sampling distribution is from the learner's. [B, T] -> detached scalar."""
    return masked_mean(kl_k3(behaviour_logprobs, old_logprobs), mask).detach()


# --------------------------------------------------------------------------- the objective

def clipped_surrogate(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float,
                      weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The derivation's L_clip (to MAXIMISE) and the clip fraction: masked_mean(w * min(r A, clip(r, 1 -
    eps, 1 + eps) A)), w = 1 unless ``weights`` are given; ``policy_loss("dapo", ...)`` at a symmetric
    clip range. All [B, T] -> (scalar, detached scalar)."""
    value, terms = policy_loss("dapo", logprobs, old_logprobs, advantages, mask, ClipRange(clip_eps, clip_eps),
                               weights=weights)
    return value, terms.clip_frac


class PPOStats(NamedTuple):
    """Detached scalars of one ppo_objective call."""
    objective: Tensor
    l_clip: Tensor  # the loss type's policy term
    kl: Tensor
    value_loss: Tensor
    clip_frac: Tensor
    entropy: Tensor
    kl_ref: Tensor  # k3 KL(pi_theta || pi_ref) of the response tokens (0 without reference logprobs)


def ppo_objective(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    values: Tensor | None,
    old_values: Tensor | None,
    returns: Tensor | None,
    mask: Tensor,
    clip_eps: float,
    beta: float,
    c1: float,
    value_clip_eps: float | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    weights: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    kl_loss_coef: float = 0.0,
    *,
    loss_type: str = "dapo",
    clip_eps_high: float | None = None,
    importance_sampling_level: str = "token",
    max_tokens: int = 0,
    shares: dict[str, float] | None = None,
) -> tuple[Tensor, PPOStats]:
    """L = P - beta * KL_k3(pi_old || pi_theta) - c1 * L_V - kl_loss_coef * KL_k3(pi_theta || pi_ref)
    (+ entropy_coef * masked_mean(H)), P the policy term of ``loss_type`` (:func:`policy_loss`; "dapo"
    with a symmetric clip range is the derivation's L_clip), the two KL terms aggregated as P is, L_V as
    in :func:`value_loss` (0.5 * squared error) and the entropy as token means.

    All tensors [B, T] (entropy: per-token [B, T] or None). ``values`` None (a critic-free estimator): no
    value loss, whatever c1. ``ref_logprobs``: the reference policy's, for the KL loss term (GRPO's; its k3
    with the samples taken as pi_theta's). ``weights``: truncated IS weights of P's tokens
    (:func:`truncated_is_weights`). ``clip_eps_high`` (None: ``clip_eps``): the ratio's ceiling is 1 +
    clip_eps_high (DAPO's clip-higher; for cispo, the IS weight's own ceiling). ``max_tokens``:
    ppo.max_new_tokens, for dr_grpo. ``shares``: a learner rank's factor per aggregation unit ("tokens",
    "sequences") so that the ranks' mean gradient is the minibatch's (1 when absent).
    Returns (loss = -L scaled by the shares, PPOStats unscaled); stats.entropy is 0 when entropy is None.
    """
    shares = shares or {}
    token = shares.get("tokens", 1.0)
    unit = shares.get(AGGREGATIONS[LOSS_TYPES[loss_type].aggregation].unit, 1.0)
    clip = ClipRange(clip_eps, clip_eps if clip_eps_high is None else clip_eps_high)
    l_clip, terms = policy_loss(loss_type, logprobs, old_logprobs, advantages, mask, clip, importance_sampling_level,
                                weights, max_tokens)
    kl = aggregate(loss_type, kl_k3(old_logprobs, logprobs), mask, max_tokens)
    objective, scaled = l_clip - beta * kl, unit * (l_clip - beta * kl)
    zero = torch.zeros((), dtype=l_clip.dtype, device=l_clip.device)
    l_v = kl_ref = ent = zero
    if values is not None:
        l_v = value_loss(values, old_values, returns, mask, value_clip_eps)
        objective, scaled = objective - c1 * l_v, scaled - token * c1 * l_v
    if ref_logprobs is not None:
        kl_ref = aggregate(loss_type, kl_k3(logprobs, ref_logprobs), mask, max_tokens)
        objective, scaled = objective - kl_loss_coef * kl_ref, scaled - unit * kl_loss_coef * kl_ref
    if entropy is not None:
        ent = masked_mean(entropy, mask)
        objective, scaled = objective + entropy_coef * ent, scaled + token * entropy_coef * ent
    stats = PPOStats(*(s.detach() for s in (objective, l_clip, kl, l_v, terms.clip_frac, ent, kl_ref)))
    return -scaled, stats
