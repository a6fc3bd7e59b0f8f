"""Scoring rollouts for PPO: merge the chunks of N rollout workers into one batch and give every
response its sequence score: the RM reward R(x, y) plus the weighted values of the reward functions
(``ppo.reward_functions``, TRL's convention; see ``rlhf_ray.reward.functions``). Held-out samples
are scored by the RM and by the evaluation function (``ppo.eval_reward``) alone.

The RM is either in-process (``rlhf_ray.reward.scorer.RewardScorer``, the default), the Ray Serve
deployment (a handle from ``rlhf_ray.reward.service.deploy_rm``; its ``score_pairs`` method), or none:
then the reward functions alone score the responses (GRPO with a verifier needs no RM).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from rlhf_ray.data.chat import is_chat
from rlhf_ray.ppo.types import Rollout, ScoredRollout, ToolTrace
from rlhf_ray.reward.functions import RewardFunction, TrainerState, call_reward_function, column_lists


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
        gen_seconds=max(c.gen_seconds for c in chunks), num_tokens=sum(c.num_tokens for c in chunks),
        columns=[x for c in chunks for x in (c.columns or [{}] * len(c.prompts))],
        sources=[x for c in chunks for x in (c.sources or ["?"] * len(c.prompts))],
        episodes=None if chunks[0].episodes is None else ToolTrace.concat([c.episodes for c in chunks]),
        versions=None if all(c.versions is None for c in chunks) else np.concatenate(
            [np.full(len(c.prompts), c.policy_version, np.int64) if c.versions is None else c.versions
             for c in chunks]),
        stats={k: sum(c.stats.get(k, 0) for c in chunks) for k in dict.fromkeys(k for c in chunks for k in c.stats)})


def merge_scored(parts: list[ScoredRollout]) -> ScoredRollout:
    """Scored rollouts one after the other (:func:`merge_rollouts`), their scores too; gen_seconds and
    score_seconds summed (they ran one after the other)."""
    if len(parts) == 1:
        return parts[0]
    cat = lambda xs: np.concatenate(xs)  # noqa: E731
    merged = merge_rollouts([p.rollout for p in parts])
    merged.gen_seconds = sum(p.rollout.gen_seconds for p in parts)
    rows = [len(p.scores) for p in parts]
    return ScoredRollout(merged, cat([p.scores for p in parts]),
                         None if parts[0].rm_scores is None else cat([p.rm_scores for p in parts]),
                         sum(p.score_seconds for p in parts),
                         {k: cat([p.function_scores.get(k, np.full(len(p.scores), np.nan, np.float32)) for p in parts])
                          for k in dict.fromkeys(k for p in parts for k in p.function_scores)},
                         {k: float(np.average([p.stats[k] for p in parts], weights=rows)) for k in parts[0].stats})


def completions(ro: Rollout) -> list:
    """The responses in TRL's form: text for plain prompts, an assistant message list for chats; a
    multi-turn rollout's messages (assistant turns with their tool_calls, tool messages) as TRL gives them."""
    if ro.episodes is not None:
        return [list(m) for m in ro.episodes.messages]
    return [[{"role": "assistant", "content": r}] if is_chat(p) else r for p, r in zip(ro.prompts, ro.responses)]


def completion_ids(ro: Rollout) -> list[list[int]]:
    """The generated token ids of each response (its stop token included)."""
    return [ro.input_ids[b][ro.response_mask[b]].tolist() for b in range(len(ro.prompts))]


def function_values(fn: RewardFunction, ro: Rollout, max_steps: int = 0) -> np.ndarray:
    """``fn``'s values on the rollout, float64 [B], NaN where it returned None; its ``trainer_state``:
    the sampling policy's version as global_step, ``max_steps`` (ppo.iterations)."""
    return call_reward_function(fn.name, fn.fn, list(ro.prompts), completions(ro), completion_ids(ro),
                                column_lists(ro.columns or [{}] * len(ro.prompts)),
                                ro.sources or ["?"] * len(ro.prompts), TrainerState(ro.policy_version, max_steps))


class RolloutScorer:
    """Scores rollouts with the RM (in-process from ``rm_dir``, through a Serve ``handle``, or none of
    them: the reward functions alone) and the reward functions.

    ``reward_functions``: RewardFunctions (``rlhf_ray.reward.functions.load_reward_functions``);
    ``eval_function``: the one for held-out samples (None: none); ``chat_template``: how the
    in-process RM renders chats (``rlhf_ray.data.chat``)."""

    def __init__(self, rm_dir: str | Path | None = None, max_length: int | None = None, handle=None,
                 max_pairs: int = 4096, reward_functions: list[RewardFunction] = (),
                 eval_function: RewardFunction | None = None, chat_template: str = "auto", max_steps: int = 0,
                 environment_rewards: bool = False):
        """``max_pairs``: the most (prompt, response) pairs one request to the service may carry (its
        serve.max_prompts x serve.max_responses); bigger batches go as several concurrent requests.
        ``environment_rewards``: the rollouts' environments own a reward (``get_reward``), added with
        weight 1 as TRL adds it."""
        if rm_dir is not None and handle is not None:
            raise ValueError("RolloutScorer: give one of rm_dir (in-process) or handle (Serve), not both")
        if (rm_dir is None and handle is None and not any(f.weight for f in reward_functions)
                and not environment_rewards):
            raise ValueError("RolloutScorer: no RM (rm_dir or handle) and no reward function of weight > 0: "
                             "nothing would score the responses")
        self.handle, self.scorer, self.max_pairs = handle, None, max(1, int(max_pairs))
        if handle is not None:  # (unpickling the handle imported Ray Serve, which set its logger to INFO)
            from rlhf_ray.runtime import quiet_serve_logger

            quiet_serve_logger()
        self.functions, self.eval_function, self.max_steps = list(reward_functions), eval_function, max_steps
        if rm_dir is not None:
            from rlhf_ray.reward.scorer import RewardScorer

            self.scorer = RewardScorer(rm_dir, max_length=max_length, chat_template=chat_template)

    @property
    def has_rm(self) -> bool:
        return self.handle is not None or self.scorer is not None

    def rm_scores(self, prompts: list, responses: list[str]) -> np.ndarray | None:
        """R(x_i, y_i), float32 [B]; None without an RM."""
        scored = self._rm(prompts, responses)
        return None if scored is None else scored[0]

    def _rm(self, prompts: list, responses: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """(R(x_i, y_i) float32 [B], whether each input was cut at the RM's max length, bool [B]); None
        without an RM."""
        if not self.has_rm:
            return None
        if self.handle is not None:
            n = self.max_pairs
            calls = [self.handle.score_pairs.remote(list(prompts[i:i + n]), list(responses[i:i + n]))
                     for i in range(0, len(prompts), n)]
            answers = [c.result() for c in calls]
            return (np.asarray([r for a in answers for r in a["rewards"]], dtype=np.float32),
                    np.asarray([t for a in answers for t in a["truncated"]], dtype=bool))
        out = self.scorer.score_flat(list(prompts), list(responses))
        return out.rewards.astype(np.float32), np.asarray(out.truncated, dtype=bool)

    def score(self, *rollouts: Rollout) -> ScoredRollout:
        """Merge the chunks (one per rollout worker), then score every (prompt, response): RM reward
        (0 without an RM) plus sum_f weight_f * f (a None from f adds nothing)."""
        start = time.perf_counter()
        merged = merge_rollouts(list(rollouts))
        scored = self._rm(merged.prompts, merged.responses)
        rm = None if scored is None else scored[0]
        total = np.zeros(len(merged.prompts)) if rm is None else rm.astype(np.float64)
        values = {}
        for fn in self.functions:
            v = function_values(fn, merged, self.max_steps)
            values[fn.key] = v.astype(np.float32)
            if fn.weight:
                total = total + fn.weight * np.nan_to_num(v, nan=0.0)
        # An environment's get_reward(), as TRL takes it: one more reward function of weight 1, named after
        # its class (NaN where the episode's environment is another).
        for name, v in ({} if merged.episodes is None else merged.episodes.env_rewards).items():
            values[f"rewards/{name}"] = v.astype(np.float32)
            total = total + np.nan_to_num(v.astype(np.float64), nan=0.0)
        # The share of (prompt, response) inputs the RM saw cut at its max length (from the front: BOS, then
        # the last tokens), so that a too short rm.max_length shows.
        stats = {} if scored is None else {"rm_truncated_frac": float(scored[1].mean())}
        return ScoredRollout(rollout=merged, scores=total.astype(np.float32), rm_scores=rm,
                             score_seconds=time.perf_counter() - start, function_scores=values, stats=stats)

    def summary(self, *rollouts: Rollout, examples: int = 2) -> dict:
        """The held-out evaluation in small numbers: mean RM reward (absent without an RM) and eval
        reward (NaN without an eval function, or when it returned None for every sample), response
        length, truncation, and a couple of example responses."""
        merged = merge_rollouts(list(rollouts))
        rm = self.rm_scores(merged.prompts, merged.responses)
        evaluated = function_values(self.eval_function, merged, self.max_steps) if self.eval_function else \
            np.full(len(merged.prompts), np.nan)
        known = evaluated[~np.isnan(evaluated)]
        show = lambda p: p if isinstance(p, str) else p[-1]["content"]  # noqa: E731  (a chat: its last message)
        return {"eval_reward": float(known.mean()) if known.size else float("nan"),
                **({} if rm is None else {"rm_score": float(rm.mean())}),
                "response_len": float(merged.response_mask.sum(-1).mean()),
                "truncated_frac": float(merged.truncated.mean()), "n": len(merged.prompts),
                "policy_version": merged.policy_version,
                **({} if merged.episodes is None else {"tool_calls": float(merged.episodes.tool_calls.mean())}),
                "examples": [f"{show(p)} {r.strip()}" for p, r in zip(merged.prompts[:examples], merged.responses[:examples])]}
