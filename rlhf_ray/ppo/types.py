"""Typed messages between the PPO actors. Arrays are numpy so that the object store hands them
over zero-copy (read-only); every [B, T] array uses the same token layout:

    column:   0 .. P_b-1            P_b .. P_b+R_b-1          P_b+R_b .. T-1
    content:  prompt tokens         response tokens           padding (right)

``response_mask[b, t]`` is True on response tokens. Per-token quantities (logprobs, values, rewards,
advantages) are aligned with the token they describe: ``old_logprobs[b, t]`` is log pi(token_t | tokens_<t).
In a multi-turn rollout the response span also holds the tool turns' tokens (in ``attention_mask``, not
in ``response_mask``): the mask then has gaps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rlhf_ray.data.chat import Prompt


@dataclass
class ToolTrace:
    """What a multi-turn rollout adds per sample (``rlhf_ray.ppo.episodes``)."""

    messages: list[list[dict]]  # the completion as messages: assistant (with tool_calls), tool, ..., assistant
    tool_calls: np.ndarray  # int64 [B] tool calls answered
    tool_failures: np.ndarray  # int64 [B] of them answered with an error (exception, timeout, unknown tool)
    malformed: np.ndarray  # int64 [B] turns with a <tool_call> that did not parse (read as text)
    env_rewards: dict[str, np.ndarray] = field(default_factory=dict)  # class name -> float32 [B], NaN: not its

    def take(self, rows: np.ndarray) -> "ToolTrace":
        return ToolTrace([self.messages[i] for i in rows], self.tool_calls[rows], self.tool_failures[rows],
                         self.malformed[rows], {k: v[rows] for k, v in self.env_rewards.items()})

    def stats(self) -> dict:
        """TRL's tool metrics (calls per sample, failures per call) and malformed turns per sample."""
        calls, n = int(self.tool_calls.sum()), max(len(self.messages), 1)
        return {"tools/call_frequency": calls / n,
                "tools/failure_frequency": int(self.tool_failures.sum()) / calls if calls else 0.0,
                "tools/malformed_frequency": int(self.malformed.sum()) / n}

    @staticmethod
    def concat(parts: list["ToolTrace"]) -> "ToolTrace":
        """The traces one after the other; an environment reward a part lacks is NaN there."""
        names = list(dict.fromkeys(k for p in parts for k in p.env_rewards))
        nan = lambda p: np.full(len(p.messages), np.nan, dtype=np.float32)  # noqa: E731
        return ToolTrace([m for p in parts for m in p.messages], np.concatenate([p.tool_calls for p in parts]),
                         np.concatenate([p.tool_failures for p in parts]), np.concatenate([p.malformed for p in parts]),
                         {k: np.concatenate([p.env_rewards.get(k, nan(p)) for p in parts]) for k in names})


@dataclass
class Rollout:
    """What one RolloutWorker returns for a chunk of prompts."""

    input_ids: np.ndarray  # int64 [B, T]
    attention_mask: np.ndarray  # bool [B, T] prompt + response
    response_mask: np.ndarray  # bool [B, T]
    rollout_logprobs: np.ndarray  # float32 [B, T] the engine's sampled-token logprobs (0 off-response)
    truncated: np.ndarray  # bool [B] cut at max_new_tokens without EOS
    prompts: list[Prompt]  # as given: text, or a chat (list of messages)
    responses: list[str]  # decoded response text (special tokens removed)
    policy_version: int  # version of the weights that generated this chunk
    worker_id: int
    gen_seconds: float
    num_tokens: int  # response tokens generated
    columns: list[dict] = field(default_factory=list)  # per prompt: its record's other fields ([] = none)
    sources: list[str] = field(default_factory=list)  # per prompt: where it came from ("file:line")
    # Multi-turn rollouts (ppo.tools, ppo.environment): the episodes' messages and tool counts; their
    # tool turns are in input_ids and attention_mask, not in response_mask. None: one turn per prompt.
    episodes: ToolTrace | None = None
    # Partial rollouts (rlhf_ray.ppo.partial): int64 [B] the version of the weights that sampled each
    # response's first token (None: policy_version, all of it); counts of the samples resumed from an
    # earlier call and carried to the next ("rollout_resumed", "rollout_carried").
    versions: np.ndarray | None = None
    stats: dict = field(default_factory=dict)

    def take(self, rows: np.ndarray) -> "Rollout":
        """The rollout's rows ``rows`` (int [b]), in that order."""
        pick = lambda xs: [xs[i] for i in rows] if xs else xs  # noqa: E731
        return Rollout(self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows],
                       self.rollout_logprobs[rows], self.truncated[rows], pick(self.prompts), pick(self.responses),
                       self.policy_version, self.worker_id, self.gen_seconds, int(self.response_mask[rows].sum()),
                       pick(self.columns), pick(self.sources),
                       None if self.episodes is None else self.episodes.take(rows),
                       None if self.versions is None else self.versions[rows], dict(self.stats))


@dataclass
class ScoredRollout:
    """Rollouts from all workers merged into one batch, with the sequence score of every response."""

    rollout: Rollout  # merged (worker_id = -1, policy_version = the oldest of the chunks)
    scores: np.ndarray  # float32 [B] the score PPO maximises: R(x, y) (if an RM) + the weighted reward functions
    rm_scores: np.ndarray | None  # float32 [B] RM reward R(x, y); None when the run has no RM
    score_seconds: float
    # Each reward function's values by metric name ("rewards/<name>"), float32 [B], NaN where it returned None.
    function_scores: dict[str, np.ndarray] = field(default_factory=dict)
    # What scoring and sampling measured (the share of RM inputs cut at their max length; dynamic
    # sampling's rounds and groups: rlhf_ray.ppo.dynamic), merged into the iteration's metrics.
    stats: dict = field(default_factory=dict)

    def take(self, rows: np.ndarray) -> "ScoredRollout":
        """The rows ``rows`` (int [b]) of the scored rollout, in that order."""
        return ScoredRollout(self.rollout.take(rows), self.scores[rows],
                             None if self.rm_scores is None else self.rm_scores[rows], self.score_seconds,
                             {k: v[rows] for k, v in self.function_scores.items()}, dict(self.stats))


@dataclass
class TrainBatch:
    """Everything the learner needs for PPO epochs on one batch."""

    input_ids: np.ndarray  # int64 [B, T]
    attention_mask: np.ndarray  # bool [B, T]
    response_mask: np.ndarray  # bool [B, T]
    # float32 [B, T] log pi_old (learner recomputation) of the response tokens (0 elsewhere); None: the
    # training forward's own, detached (one optimizer step per batch: PPOConfig.pi_old_from_train_forward)
    old_logprobs: np.ndarray | None
    # float32 [B, T] of the response tokens (0 elsewhere); None when no KL term reads them (PPOConfig.uses_reference)
    ref_logprobs: np.ndarray | None
    old_values: np.ndarray  # float32 [B, T] (0 without a value head)
    rewards: np.ndarray  # float32 [B, T] per-token rewards (score on last response token, minus KL penalty)
    advantages: np.ndarray  # float32 [B, T] (whitened if configured)
    returns: np.ndarray  # float32 [B, T]
    policy_version: int
    stats: dict = field(default_factory=dict)  # scalars: reward means, KL to reference, ...
    behaviour_logprobs: np.ndarray | None = None  # float32 [B, T] the engines' (the sampling policy's)
    truncated: np.ndarray | None = None  # bool [B] cut at max_new_tokens without EOS (ppo.mask_truncated_completions)
