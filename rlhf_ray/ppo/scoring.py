"""Scoring rollouts for PPO: merge the chunks of N rollout workers into one batch and attach the RM
score (and, for the synthetic task, the hidden gold reward, for evaluation only) to every response.

The RM is either in-process (``rlhf_ray.reward.scorer.RewardScorer``, the default) or the Ray Serve
deployment (a handle from ``rlhf_ray.reward.serve.deploy_rm``; its ``score_pairs`` method).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from rlhf_ray.data import synthetic
from rlhf_ray.ppo.types import Rollout, ScoredRollout


def merge_rollouts(chunks: list[Rollout]) -> Rollout:
    """Concatenate chunks along B, right-padding T to the longest chunk.

    Padding: input_ids 0 (never attended), masks False, logprobs 0. The merged chunk has worker_id
    -1, the OLDEST policy_version of its chunks, and gen_seconds of the slowest chunk (the workers
    ran in parallel).
    """
    if not chunks:
        raise ValueError("merge_rollouts: no chunks")
    if len(chunks) == 1:
        return chunks[0]
    T = max(c.input_ids.shape[1] for c in chunks)

    def cat(name: str, fill) -> np.ndarray:
        parts = []
        for c in chunks:
            a = getattr(c, name)
            parts.append(np.pad(a, ((0, 0), (0, T - a.shape[1])), constant_values=fill))
        return np.concatenate(parts)

    return Rollout(
        input_ids=cat("input_ids", 0), attention_mask=cat("attention_mask", False),
        response_mask=cat("response_mask", False), rollout_logprobs=cat("rollout_logprobs", 0.0),
        truncated=np.concatenate([c.truncated for c in chunks]),
        prompts=[p for c in chunks for p in c.prompts], responses=[r for c in chunks for r in c.responses],
        policy_version=min(c.policy_version for c in chunks), worker_id=-1,
        gen_seconds=max(c.gen_seconds for c in chunks), num_tokens=sum(c.num_tokens for c in chunks))


def gold_rewards(prompts: list[str], responses: list[str]) -> np.ndarray:
    """synthetic.gold_reward where the prompt is one of the synthetic task's, else NaN; float32 [B]."""
    return np.array([synthetic.gold_reward(p, r) if synthetic.product_of(p) else math.nan
                     for p, r in zip(prompts, responses)], dtype=np.float32)


class RolloutScorer:
    """Scores rollouts with the RM: in-process from ``rm_dir`` or through a Serve ``handle``."""

    def __init__(self, rm_dir: str | Path | None = None, max_length: int = 64, handle=None,
                 max_pairs: int = 4096):
        """``max_pairs``: the most (prompt, response) pairs one request to the service may carry (its
        serve.max_prompts x serve.max_responses); bigger batches go as several concurrent requests."""
        if (rm_dir is None) == (handle is None):
            raise ValueError("RolloutScorer: give exactly one of rm_dir (in-process) or handle (Serve)")
        self.handle, self.scorer, self.max_pairs = handle, None, max(1, int(max_pairs))
        if handle is None:
            from rlhf_ray.reward.scorer import RewardScorer

            self.scorer = RewardScorer(rm_dir, max_length=max_length)

    def rm_scores(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """R(x_i, y_i), float32 [B]."""
        if self.handle is not None:
            n = self.max_pairs
            calls = [self.handle.score_pairs.remote(list(prompts[i:i + n]), list(responses[i:i + n]))
                     for i in range(0, len(prompts), n)]
            return np.asarray([r for c in calls for r in c.result()["rewards"]], dtype=np.float32)
        return self.scorer.score_pairs(list(prompts), list(responses)).astype(np.float32)

    def score(self, *rollouts: Rollout) -> ScoredRollout:
        """Merge the chunks (one per rollout worker) and score every (prompt, response)."""
        start = time.perf_counter()
        merged = merge_rollouts(list(rollouts))
        scores = self.rm_scores(merged.prompts, merged.responses)
        return ScoredRollout(rollout=merged, scores=scores, gold=gold_rewards(merged.prompts, merged.responses),
                             score_seconds=time.perf_counter() - start)

    def summary(self, *rollouts: Rollout, examples: int = 2) -> dict:
        """Score and return only small numbers (the held-out evaluation): mean gold and RM reward,
        response length, truncation, and a couple of example responses."""
        scored = self.score(*rollouts)
        ro = scored.rollout
        return {"gold": scored.gold_mean, "rm_score": float(scored.scores.mean()),
                "response_len": float(ro.response_mask.sum(-1).mean()), "truncated_frac": float(ro.truncated.mean()),
                "n": len(ro.prompts), "policy_version": ro.policy_version,
                "examples": [f"{p} {r.strip()}" for p, r in zip(ro.prompts[:examples], ro.responses[:examples])]}
