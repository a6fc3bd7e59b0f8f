"""DAPO's dynamic sampling: a group whose samples all got the same task reward has no advantage to
learn from under a group estimator (GRPO, RLOO), so it is dropped and more prompts are sampled until
the batch has ``ppo.prompts_per_iteration`` groups that differ, at most
``ppo.dynamic_sampling_max_rounds`` extra rounds; a batch still short then is filled with dropped
groups (their advantages are 0), so every batch keeps its size.

The rounds run in a Ray task (:func:`fill_groups`), not in the driver: it waits for each round's
scores and starts the next, while the driver goes on submitting work (in one-step-off mode the learner
trains meanwhile). The filter reads the task's raw reward (``ScoredRollout.scores``: RM plus reward
functions), not the shaped one (truncation and overlong penalties, KL).
"""

from __future__ import annotations

import numpy as np

from rlhf_ray.ppo.types import ScoredRollout


def group_spread(scores: np.ndarray, n: int) -> np.ndarray:
    """Whether each group's rewards differ: float [G * n] (a group's n samples adjacent) -> bool [G]."""
    g = np.asarray(scores, dtype=np.float64).reshape(-1, n)
    return g.max(1) - g.min(1) > 1e-12 * np.maximum(1.0, np.abs(g).max(1))


def select_groups(parts: list[ScoredRollout], n: int, groups: int) -> ScoredRollout:
    """``groups`` groups of the scored rollouts ``parts``: those whose rewards differ first (in order),
    then, while short, dropped ones; merged into one ScoredRollout with ``sampling`` stats (rounds,
    groups dropped, groups kept that differ)."""
    from rlhf_ray.ppo.scoring import merge_scored

    merged = merge_scored(parts)
    spread = group_spread(merged.scores, n)
    order = [*np.flatnonzero(spread), *np.flatnonzero(~spread)][:groups]
    rows = np.concatenate([np.arange(g * n, (g + 1) * n) for g in sorted(order)])
    chosen = merged.take(rows)
    chosen.stats.update(sampling_rounds=len(parts) - 1, groups_dropped=int((~spread).sum()),
                        groups_without_spread=int(len(order) - min(int(spread.sum()), groups)))
    return chosen


def fill_groups(first: ScoredRollout, scorer, workers: list, extra_prompts: list[list], ppo, seeds: list[int]
                ) -> ScoredRollout:
    """Dynamic sampling of one iteration, given its scored rollout ``first``: while fewer than
    ppo.prompts_per_iteration of its groups differ, the next batch of ``extra_prompts`` (each already
    repeated samples_per_prompt times) is generated on ``workers`` with its seed and scored by
    ``scorer``. Runs in a Ray task (``fill_groups_task``)."""
    import ray

    from rlhf_ray.ppo.pool import generate_on

    n, groups, parts = ppo.samples_per_prompt, ppo.prompts_per_iteration, [first]
    have = int(group_spread(first.scores, n).sum())
    for prompts, seed in zip(extra_prompts, seeds):
        if have >= groups:
            break
        scored = ray.get(scorer.score.remote(*generate_on(workers, prompts, ppo, seed)))
        parts.append(scored)
        have += int(group_spread(scored.scores, n).sum())
    return select_groups(parts, n, groups)
