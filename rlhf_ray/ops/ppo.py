"""PPO pieces on token tensors [B, T] with a response mask [B, T] (bool or 0/1 float): GAE, the
importance ratio, KL estimators, the value loss, entropy and logprobs, reward shaping and the KL
coefficient controllers. The objective that combines them, L = L_clip - beta * KL(pi_old || pi_theta) -
c1 * L_V, and the policy losses it can take are in ``losses.py``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .stats import masked_mean


def _zeros_like(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------- advantages

def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, loop-free.

    rewards, values: float [B, T]; mask: bool/0-1 [B, T], one contiguous block of response
    tokens per row (may start after 0 and end before T). The value after the last response
    token is 0 (episode ends). Returns (advantages, returns), float [B, T], 0 outside the mask;
    returns = advantages + values.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t and A_t = sum_{j>=t} (gamma*lam)^(j-t) delta_j
    over the span: with delta zeroed outside the (contiguous) span, a single upper-triangular
    [T, T] matrix of powers (gamma*lam)^(j-i) does the reversed discounted cumsum. The powers
    are taken directly (never divided), so T ~ 512 is fine numerically.
    Raises ValueError if a row's mask has a gap (the matrix sum would cross it).
    """
    m = mask.bool()
    # A gap would let the matrix sum cross it: refuse rather than be silently wrong (one sync).
    starts = (m[:, 1:] & ~m[:, :-1]).sum(-1) + m[:, 0]
    if bool((starts > 1).any()):
        raise ValueError("gae: mask must be one contiguous block per row")
    zero = _zeros_like(values)
    v = torch.where(m, values, zero)
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)  # V_{t+1} * m_{t+1}
    delta = torch.where(m, rewards + gamma * next_v - v, zero)
    T = values.shape[1]
    t = torch.arange(T, device=values.device)
    expo = t[None, :] - t[:, None]  # [i, j] -> j - i
    base = torch.tensor(gamma * lam, dtype=values.dtype, device=values.device)
    discount = torch.where(expo >= 0, base.pow(expo.clamp_min(0).to(values.dtype)), zero)  # 0^0 = 1
    adv = torch.where(m, delta @ discount.T, zero)
    return adv, torch.where(m, adv + v, zero)


# --------------------------------------------------------------------------- policy

def policy_ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """pi_theta / pi_old per token: exp(logprobs - old_logprobs). [B, T] -> [B, T]."""
    return torch.exp(logprobs - old_logprobs)


# --------------------------------------------------------------------------- KL estimators
# Schulman, "Approximating KL divergence": for x ~ p and r = q(x)/p(x), KL(p||q) = E_p[-log r].

def kl_k1(logp: Tensor, logq: Tensor) -> Tensor:
    """k1 = log p - log q: unbiased for KL(p||q) when x ~ p (p is the SAMPLING distribution),
    high variance, can be negative per token."""
    return logp - logq


def kl_k2(logp: Tensor, logq: Tensor) -> Tensor:
    """k2 = 0.5 (log p - log q)^2, x ~ p: low variance, biased (exact to 2nd order)."""
    return 0.5 * (logp - logq) ** 2


def kl_k3(logp: Tensor, logq: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = q/p, x ~ p (p is the sampling distribution):
    unbiased for KL(p||q) and >= 0 per token."""
    log_r = logq - logp
    return torch.exp(log_r) - 1 - log_r


_KL = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_old_new(old_logprobs: Tensor, logprobs: Tensor, mask: Tensor, estimator: str = "k3") -> Tensor:
    """KL(pi_old || pi_theta), masked mean over tokens sampled from pi_old (p = old, q = new).

    old_logprobs, logprobs, mask: [B, T]; estimator in {"k1", "k2", "k3"}. Returns a scalar.
    """
    if estimator not in _KL:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {sorted(_KL)}")
    return masked_mean(_KL[estimator](old_logprobs, logprobs), mask)


# --------------------------------------------------------------------------- value / entropy

def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float | None = None
) -> Tensor:
    """L_V = 0.5 * masked_mean((V - R)^2) (note the 0.5). All [B, T]; returns a scalar.

    With clip_eps (PPO2): V_clip = V_old + clip(V - V_old, -eps, eps) and the per-token error is
    max((V - R)^2, (V_clip - R)^2), so the value cannot profit from moving far from V_old.
    """
    err = (values - returns) ** 2
    if clip_eps is not None:
        v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        err = torch.maximum(err, (v_clip - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) along the last dim. logits: [B, T, V] -> float32 [B, T].

    H = logsumexp(z) - sum softmax(z) * z: no log of tiny probabilities. Assumes finite logits.
    """
    z = logits.float()
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels]. logits: [B, T, V], labels: long [B, T] -> float32 [B, T].

    Computed as z[label] - logsumexp(z) in float32 (bf16 log-probs are too coarse for ratios),
    without materialising the full [B, T, V] log-softmax.
    """
    z = logits.float()
    return z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)


# --------------------------------------------------------------------------- rewards / KL coef

def kl_penalized_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """InstructGPT per-token rewards: -kl_coef * (logprobs - ref_logprobs) on masked tokens,
    plus the sequence score on the LAST masked token of each row.

    scores: float [B]; logprobs, ref_logprobs, mask: [B, T]. Returns (rewards [B, T], kl [B, T]),
    kl = k1 per token, both 0 outside the mask (a row with no masked token gets no score).
    """
    m = mask.bool()
    kl = torch.where(m, logprobs - ref_logprobs, _zeros_like(logprobs))
    t = torch.arange(m.shape[1], device=m.device)
    last = torch.where(m, t, -1).amax(-1, keepdim=True)  # [B, 1], -1 if the row is empty
    rewards = -kl_coef * kl + scores[:, None].to(kl.dtype) * (t == last)
    return rewards, kl


def overlong_penalty(lengths: Tensor, max_tokens: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment of a response of ``lengths`` tokens: 0 up to max_tokens - buffer,
    then falling linearly to -penalty at max_tokens (a response cut there gets all of it).

    lengths: int/float [B] -> float32 [B]; ``buffer`` > 0.
    """
    if buffer <= 0:
        raise ValueError(f"overlong_penalty: buffer must be > 0, got {buffer}")
    over = (lengths.to(torch.float32) - (max_tokens - buffer)).clamp(min=0.0)
    return -penalty * over / buffer


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): steer the measured KL towards `target`.

    error = clip(kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target and horizon must be > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """Constant KL coefficient; update() is a no-op (same interface as AdaptiveKLController)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value
