"""Helpers the test modules share (instead of importing one another): PPO rollouts built with a
tokenizer (no engine), and recorders and checks of a PPO run's batches."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from rlhf_ray.ppo.types import Rollout


def make_rollout(tokenizer, prompts: list[str], responses: list[str], truncated: list[bool], version: int = 0,
                 worker_id: int = 0) -> Rollout:
    """A Rollout in the RolloutWorker's layout, built with the tokenizer (no engine): a truncated
    response has no EOS."""
    rows = []
    for p, r, cut in zip(prompts, responses, truncated):
        pid = tokenizer(p)["input_ids"]
        rid = tokenizer(" " + r, add_special_tokens=False)["input_ids"] + ([] if cut else [tokenizer.eos_token_id])
        rows.append((pid, rid))
    B, T = len(rows), max(len(p) + len(r) for p, r in rows)
    ids = np.full((B, T), tokenizer.pad_token_id, np.int64)
    am, rm = np.zeros((B, T), bool), np.zeros((B, T), bool)
    for b, (p, r) in enumerate(rows):
        ids[b, :len(p) + len(r)] = p + r
        am[b, :len(p) + len(r)] = True
        rm[b, len(p):len(p) + len(r)] = True
    return Rollout(ids, am, rm, np.zeros((B, T), np.float32), np.array(truncated), list(prompts), list(responses),
                   version, worker_id, 0.1, int(rm.sum()))


@contextlib.contextmanager
def in_process_worker(*args, **kwargs):
    """A RolloutWorker(*args, **kwargs) in this process, shut down after. In-process vLLM sets the host's
    torch threads and seeds its global RNGs: undone for the other tests."""
    import random

    import torch

    from rlhf_ray.ppo.rollout import RolloutWorker

    threads = torch.get_num_threads()
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    w = RolloutWorker(*args, **kwargs)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    try:
        yield w
    finally:
        w.shutdown()
        torch.set_num_threads(threads)


def last_response_index(mask: np.ndarray) -> np.ndarray:
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)


PROMPTS = ["review of the lamp :", "review of the kettle :", "review of the chair :", "tell me a story"]
RESPONSES = ["the bulb is great .", "the spout is awful and the fan is ok .", "the seat is", "once upon"]
TRUNCATED = [False, False, True, True]


def batch_recorder():
    """An on_iteration callback that records each iteration's (rm_score metric, scored batch); returns
    (callback, the records)."""
    import ray

    batches = []

    def record(m, ctx):
        batches.append((m["rm_score"], ray.get(ctx.scored, timeout=60)))
    return record, batches


def assert_scored_by_the_rm(batches: list, rm_dir, max_length: int = 64) -> None:
    """Every sample's reward in the recorded batches is the in-process RM's, and each iteration's
    rm_score their mean."""
    from rlhf_ray.ppo.scoring import RolloutScorer

    in_process = RolloutScorer(rm_dir, max_length)
    for rm_score, scored in batches:
        want = in_process.rm_scores(scored.rollout.prompts, scored.rollout.responses)
        np.testing.assert_allclose(scored.rm_scores, want, atol=1e-5)
        assert rm_score == pytest.approx(float(want.mean()), abs=1e-5)
