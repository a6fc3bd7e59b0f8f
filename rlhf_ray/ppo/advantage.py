"""AdvantageWorker: reference logprobs, per-token KL, rewards, GAE advantages and returns.

Reward rule (InstructGPT): every response token t gets -kl_coef * (log pi_old - log pi_ref)(t), and the
LAST response token also gets the sequence reward

    score = R(x, y) + sum_f w_f f(x, y) - truncation_penalty * [y was cut at max_new_tokens without EOS]
            + overlong_penalty(|y|)   (DAPO's soft punishment over the last ppo.overlong_buffer tokens)

(R the RM, if any; f the reward functions of ``ppo.reward_functions``: ``ScoredRollout.scores``).
Advantages then follow ``ppo.advantage_estimator`` (:func:`advantages`, the table
``rlhf_ray.ops.ESTIMATORS``): GAE with the learner's values, or a critic-free estimator (GRPO, RLOO,
REINFORCE++).

The truncated response is still scored by the RM (it sees the text that was written); the penalty
is what makes "ran out of tokens" worse than "finished". GAE (rlhf_ray.ops.gae) then runs over the
response span with the learner's values; the value after the last response token is 0.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from rlhf_ray.config import PPOConfig
from rlhf_ray.models.causal_lm import head_is_last, sequence_logprobs
from rlhf_ray.ops import (
    ESTIMATORS,
    AdaptiveKLController,
    AdvantageSettings,
    FixedKLController,
    kl_penalized_rewards,
    masked_mean,
    overlong_penalty,
)
from rlhf_ray.ppo.types import ScoredRollout, TrainBatch


def sequence_rewards(scores: np.ndarray, truncated: np.ndarray, truncation_penalty: float,
                     lengths: np.ndarray | None = None, max_new_tokens: int = 0, overlong_buffer: int = 0,
                     overlong_penalty_max: float = 1.0) -> np.ndarray:
    """Sequence reward placed on the last response token: the score minus the truncation penalty, and
    with ``overlong_buffer`` > 0 DAPO's soft overlong punishment of responses of ``lengths`` tokens
    (``rlhf_ray.ops.overlong_penalty``).

    scores: float [B]; truncated: bool [B]; lengths: int [B] -> float32 [B].
    """
    out = scores - truncation_penalty * truncated.astype(np.float32)
    if overlong_buffer > 0:
        out = out + overlong_penalty(torch.as_tensor(lengths), max_new_tokens, overlong_buffer,
                                     overlong_penalty_max).numpy()
    return out.astype(np.float32)


def advantages(cfg: PPOConfig, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by ``cfg.advantage_estimator`` (the table ``rlhf_ray.ops.ESTIMATORS``) from
    the KL-penalised token rewards. rewards, values, mask: [B, T], B = prompts x ppo.samples_per_prompt
    with each prompt's samples adjacent."""
    settings = AdvantageSettings(cfg.samples_per_prompt, cfg.gamma, cfg.lam, cfg.whiten_advantages, cfg.scale_rewards)
    return ESTIMATORS[cfg.advantage_estimator].fn(rewards, values, mask, settings)


def group_stats(rm_scores: np.ndarray, n: int) -> dict:
    """How sharply the RM separates a prompt's n samples: the listwise RM's P(y_i|x) = softmax of
    their RM scores, its largest value and its entropy (mean over the groups; uniform: 1/n and
    log n). rm_scores: float [G * n]. Empty for n = 1."""
    if n < 2:
        return {}
    p = torch.softmax(torch.tensor(rm_scores, dtype=torch.float64).view(-1, n), dim=-1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return {"group_rm_top_prob": float(p.max(-1).values.mean()), "group_rm_entropy": float(entropy.mean())}


class AdvantageWorker:
    """Holds a frozen copy of the initial policy (the reference) and the KL-coefficient controller.

    ``compute(scored, old)`` turns a scored rollout plus the learner's {"old_logprobs", "values"} into a
    TrainBatch. The reference forward needs only the rollout, so a pipeline can run
    ``reference(scored)`` first (while the learner is busy) and pass its result to ``compute``.
    Stateful only through the adaptive KL controller (one instance per job).

    What nothing reads is not computed: without a KL term (``PPOConfig.uses_reference``) no reference
    policy is loaded and the batch has no reference logprobs; with ``old`` None (pi_old taken from the
    training forward: ``PPOConfig.pi_old_from_train_forward``) the batch has no pi_old either.
    """

    def __init__(self, ref_model_path: str, ppo_cfg: PPOConfig, device: str = "cpu", chunk_tokens: int = 1024):
        """``chunk_tokens``: the reference's logits of at most that many tokens at a time
        (``learner.logits_chunk_tokens``; 0, or a model whose logits are more than its head of its last
        hidden state: each batch's whole logits)."""
        from transformers import AutoModelForCausalLM

        self.cfg, self.device = ppo_cfg, device
        self.ref, self.chunk_tokens = None, 0
        if ppo_cfg.uses_reference:
            self.ref = AutoModelForCausalLM.from_pretrained(str(ref_model_path), dtype=torch.float32).to(device)
            self.ref.eval().requires_grad_(False)
            self.chunk_tokens = chunk_tokens if chunk_tokens > 0 and head_is_last(self.ref) else 0
        if ppo_cfg.adaptive_kl:
            self.kl_ctl = AdaptiveKLController(ppo_cfg.kl_coef, ppo_cfg.target_kl, ppo_cfg.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(ppo_cfg.kl_coef)

    def set_kl_coef(self, value: float) -> None:
        """Set the reward's KL coefficient (a resumed run continues its controller from here)."""
        self.kl_ctl.value = float(value)

    def ref_logprobs(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                     score_mask: np.ndarray | None = None) -> np.ndarray:
        """float32 [B, T] reference-policy logprobs of each token (column 0 is 0; in chunks, only those of
        ``score_mask`` when given), at the sampling temperature ``ppo.temperature`` like the learner's."""
        ids, am = torch.tensor(input_ids, device=self.device), torch.tensor(attention_mask, device=self.device)
        sm = None if score_mask is None else torch.tensor(score_mask, device=self.device)
        return sequence_logprobs(self.ref, ids, am, temperature=self.cfg.temperature,
                                 chunk_tokens=self.chunk_tokens, score_mask=sm).numpy()

    def reference(self, scored: ScoredRollout) -> dict:
        """{"ref_logprobs": float32 [B, T] of the merged rollout (None without a reference), "seconds"}."""
        if self.ref is None:
            return {"ref_logprobs": None, "seconds": 0.0}
        start = time.perf_counter()
        ro = scored.rollout
        lp = self.ref_logprobs(ro.input_ids, ro.attention_mask, ro.response_mask)  # (only the responses are read)
        return {"ref_logprobs": lp, "seconds": time.perf_counter() - start}

    def compute(self, scored: ScoredRollout, old: dict | None, ref: dict | None = None) -> TrainBatch:
        """scored: merged rollout [B, T] with RM scores [B]; old: {"old_logprobs", "values"} float32 [B, T]
        from the learner (and optionally "seconds"), or None: no pi_old pass ran (critic-free, no KL in
        the reward); ref: :meth:`reference` of the same rollout (computed here when None). Returns the
        TrainBatch with stats."""
        ref = self.reference(scored) if ref is None else ref
        start = time.perf_counter()
        ro, cfg = scored.rollout, self.cfg
        # torch.tensor copies: arrays from the object store are read-only views.
        mask = torch.tensor(ro.response_mask)
        zeros = torch.zeros(mask.shape, dtype=torch.float32)
        old_lp = None if old is None else torch.tensor(old["old_logprobs"], dtype=torch.float32)
        values = zeros if old is None else torch.tensor(old["values"], dtype=torch.float32)
        ref_lp = None if ref["ref_logprobs"] is None else torch.tensor(ref["ref_logprobs"], dtype=torch.float32)
        if ref_lp is not None and ref_lp.shape != mask.shape:
            raise ValueError(f"ref logprobs {tuple(ref_lp.shape)} do not match the rollout {tuple(mask.shape)}")
        if (old_lp is None or ref_lp is None) and self.kl_ctl.value:
            raise ValueError("a KL penalty in the reward (ppo.kl_coef > 0) needs pi_old and reference logprobs")

        seq_reward = sequence_rewards(scored.scores, ro.truncated, cfg.truncation_penalty, ro.response_mask.sum(-1),
                                      cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        kl_coef = self.kl_ctl.value
        # (without a KL term the penalty is 0: kl_penalized_rewards then only places the scores)
        rewards, kl = kl_penalized_rewards(torch.tensor(seq_reward), zeros if old_lp is None else old_lp,
                                           zeros if ref_lp is None else ref_lp, mask, kl_coef)
        adv, returns = advantages(cfg, rewards, values, mask)

        # KL(pi_old || pi_ref) per sequence (sum of k1 over the response), the x-axis of reward-vs-KL plots.
        kl_seq = kl.sum(-1)
        measured_kl = old_lp is not None and ref_lp is not None
        if measured_kl:
            self.kl_ctl.update(kl_seq.mean().item(), n_steps=len(kl_seq))
        resp_len = ro.response_mask.sum(-1)
        stats = {
            **({} if scored.rm_scores is None else {"rm_score": float(scored.rm_scores.mean())}),
            **{k: float(np.nanmean(v)) if (~np.isnan(v)).any() else float("nan")
               for k, v in scored.function_scores.items()},
            "reward": float(seq_reward.mean()),
            **({"kl_ref": float(kl_seq.mean()), "kl_ref_per_token": float(masked_mean(kl, mask))} if measured_kl else {}),
            "kl_coef": float(kl_coef),
            "kl_coef_next": float(self.kl_ctl.value),
            "truncated_frac": float(ro.truncated.mean()),
            "response_len": float(resp_len.mean()),
            "value_mean": float(masked_mean(values, mask)),
            "return_mean": float(masked_mean(returns, mask)),
            **(group_stats(scored.rm_scores, cfg.samples_per_prompt) if scored.rm_scores is not None else {}),
            **scored.stats,  # RM inputs cut, dynamic sampling's rounds and dropped groups
            "batch_size": int(len(kl_seq)),
            "gen_seconds": float(ro.gen_seconds),
            "gen_tokens": int(ro.num_tokens),
            "score_seconds": float(scored.score_seconds),
            "evaluate_seconds": 0.0 if old is None else float(old.get("seconds", float("nan"))),
            "reference_seconds": float(ref["seconds"]),
            "total_tokens": int(ro.attention_mask.sum()),
            **({} if ro.episodes is None else ro.episodes.stats()),  # multi-turn: tool calls and failures
            **({} if "rollout_carried" not in ro.stats else {  # partial rollouts
                "rollout_resumed_frac": ro.stats["rollout_resumed"] / len(kl_seq),
                "rollout_carried": int(ro.stats["rollout_carried"])}),
            # multi-turn: the share of the later turns' context that vLLM's prefix cache served
            **({"tools/prefix_cache_hit": ro.stats["prefix_cached_tokens"] / ro.stats["prefix_prompt_tokens"]}
               if ro.stats.get("prefix_prompt_tokens") else {}),
        }
        stats["advantage_seconds"] = time.perf_counter() - start  # after the reference forward
        f32 = lambda t: t.numpy().astype(np.float32, copy=False)  # noqa: E731
        return TrainBatch(
            input_ids=ro.input_ids, attention_mask=ro.attention_mask, response_mask=ro.response_mask,
            old_logprobs=None if old_lp is None else f32(old_lp), ref_logprobs=None if ref_lp is None else f32(ref_lp),
            old_values=f32(values),
            rewards=f32(rewards), advantages=f32(adv), returns=f32(returns),
            policy_version=ro.policy_version, stats=stats, truncated=ro.truncated,
            behaviour_logprobs=np.asarray(ro.rollout_logprobs, dtype=np.float32))
