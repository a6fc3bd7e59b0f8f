"""Partial rollouts (rollout.partial_rollouts, rlhf_ray/ppo/partial.py): the cut and the staleness bound
by hand; a real in-process engine whose carried samples go on across a weight update, each token's
logprob that of the weights that sampled it; and a PPO run on Ray whose batches mix policy versions."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from rlhf_ray.config import ConfigError, load_config  # noqa: E402
from rlhf_ray.ppo.partial import must_finish, pick_groups  # noqa: E402

TOL = 1e-4  # float32 vLLM sampling logprobs vs its own prompt scoring: measured ~1e-6


def test_a_group_must_finish_when_waiting_would_pass_the_staleness_bound():
    # Engine at version 5. A group started at version v trains, if carried once more, at 6 + lag - v.
    firsts = np.array([5, 4, 3])
    assert must_finish(firsts, 5, 0, 1).tolist() == [False, True, True]  # 1, 2, 3 versions old
    assert must_finish(firsts, 5, 0, 2).tolist() == [False, False, True]
    assert must_finish(firsts, 5, 1, 2).tolist() == [False, True, True]  # one-step-off: one more
    assert must_finish(firsts, 5, 1, 3).tolist() == [False, False, True]


def test_the_cut_waits_for_the_quota_and_the_forced_groups_and_returns_the_oldest():
    done = np.array([False, True, True, True, False])
    none = np.zeros(5, bool)
    assert pick_groups(done, none, 2).tolist() == [1, 2]  # the oldest done ones
    assert pick_groups(done, none, 3).tolist() == [1, 2, 3]
    assert pick_groups(done, none, 4) is None  # three done: go on
    forced = np.array([True, False, False, False, False])
    assert pick_groups(done, forced, 2) is None  # group 0 must be done first
    done[0] = True
    assert pick_groups(done, forced, 2).tolist() == [0, 1]
    forced[[2, 3]] = True
    assert pick_groups(done, forced, 2).tolist() == [0, 2, 3]  # more than the quota when forced
    assert pick_groups(np.array([True, True]), np.zeros(2, bool), 3).tolist() == [0, 1]  # all there is


def test_partial_rollouts_are_checked_against_what_they_need(tmp_path):
    base = ["rollout.partial_rollouts=true", "ppo.tis_cap=2"]
    assert load_config(None, base).rollout.max_staleness == 1
    with pytest.raises(ConfigError, match="ppo.tis_cap"):
        load_config(None, base[:1])
    with pytest.raises(ConfigError, match=r"rollout.max_staleness: .*2 policy version\(s\) old with "
                                          r"rollout.async_one_step_off; .*at least 2, got 1"):
        load_config(None, base + ["rollout.async_one_step_off=true"])
    assert load_config(None, base + ["rollout.async_one_step_off=true", "rollout.max_staleness=2"])
    with pytest.raises(ConfigError, match="rollout.max_staleness: must be"):
        load_config(None, base + ["rollout.max_staleness=0"])
    group = ["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=2"]
    with pytest.raises(ConfigError, match="rollout.partial_rollouts: not with ppo.dynamic_sampling_max_rounds"):
        load_config(None, base + group + ["ppo.dynamic_sampling_max_rounds=2"])
    assert load_config(None, base + group + ["ppo.tools=[task_tools:calculator]"]).ppo.tools


@pytest.fixture(scope="module")
def partial_worker(policy_dir, test_config):
    from helpers import in_process_worker

    rollout = dataclasses.replace(test_config.rollout, partial_rollouts=True, max_staleness=1)
    with in_process_worker(str(policy_dir), rollout, worker_id=0, seed=0) as w:
        yield w


def _perturbed(policy_dir, scale: float) -> dict:
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    return {k: (v + scale * rng.standard_normal(v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
            for k, v in load_file(str(policy_dir / "model.safetensors")).items()}


def test_carried_samples_go_on_across_a_weight_update(partial_worker, policy_dir):
    """Call 1 admits 4 groups of 2 and returns 2 once they are done; the 2 others wait. After new weights
    (version 1), call 2 must return those (trained at version 1 they would be 2 old if carried again):
    their tokens before the cut carry the old weights' logprobs, those after it the new weights'."""
    from rlhf_ray.data import synthetic

    w = partial_worker
    prompts = [p for p in synthetic.prompts(6, seed=11) for _ in range(2)]
    first = w.generate(prompts[:8], 40, 1.0, 1.0, seed=3, group_size=2, quota=2)
    assert len(first.prompts) == 4 and (first.versions == 0).all() and first.stats["rollout_resumed"] == 0
    assert first.prompts[0] == first.prompts[1] and first.prompts[2] == first.prompts[3]  # groups whole
    assert not first.truncated.any()  # returned groups are done (the budget of 40 was not reached)
    kept = [s for g in w.partial.groups for s in g]
    assert len(kept) == 4 == first.stats["rollout_carried"] and all(s.first_version == 0 for s in kept)
    cut_at = {id(s): len(s.episode.ids) for s in kept}
    running = [s for s in kept if s.finish is None]
    assert running, "the cut stopped no sample: nothing to resume"
    old = [w.logprobs_of(np.array([s.episode.ids]), np.ones((1, len(s.episode.ids)), bool),
                         np.array([s.episode.model]))[0] for s in running]

    w.update_weights(_perturbed(policy_dir, 0.02), version=1)
    second = w.generate(prompts[8:12], 40, 1.0, 1.0, seed=4, group_size=2, quota=2)
    assert len(second.prompts) == 4 and (second.versions == 0).all() and second.policy_version == 0
    assert second.stats["rollout_resumed"] == len(running) and second.stats["rollout_carried"] == 4
    assert [p for p in second.prompts] == [s.record.prompt for s in kept]
    for s, before in zip(running, old):
        b = next(i for i, k in enumerate(kept) if k is s)
        row, cut = second.rollout_logprobs[b], cut_at[id(s)]
        n = int(second.attention_mask[b].sum())
        assert n > cut and second.input_ids[b, :cut].tolist() == s.episode.ids[:cut]
        now = w.logprobs_of(second.input_ids[b:b + 1, :n], second.attention_mask[b:b + 1, :n],
                            second.response_mask[b:b + 1, :n])[0]
        resp = second.response_mask[b, :n]
        np.testing.assert_allclose(row[:cut][resp[:cut]], before[:cut][resp[:cut]], atol=TOL)  # old weights
        np.testing.assert_allclose(row[cut:n][resp[cut:]], now[cut:][resp[cut:]], atol=TOL)  # new weights
        assert np.abs(row[:cut][resp[:cut]] - now[:cut][resp[:cut]]).max() > 10 * TOL  # the versions differ
    # The new groups wait in turn, started under version 1.
    assert all(s.first_version == 1 for g in w.partial.groups for s in g)


@pytest.mark.parametrize("one_step_off", [False, True])
def test_partial_rollouts_on_ray(ray_cluster, test_config, policy_dir, tmp_path, one_step_off):
    """GRPO on two rollout workers with partial rollouts: every batch is the configured size, groups whole;
    batches after the first hold samples begun an iteration earlier, up to the staleness bound (1; 2 with
    one-step-off, whose batches are one version old already), which the truncated importance weights
    correct, and the engines stay in sync."""
    from rlhf_ray.config.schema import RewardFunctionConfig
    from rlhf_ray.ppo.driver import run_ppo

    bound = 1 + one_step_off
    cfg = dataclasses.replace(
        test_config,
        ppo=dataclasses.replace(test_config.ppo, iterations=3, prompts_per_iteration=8, samples_per_prompt=2,
                                advantage_estimator="grpo", beta=0.0, kl_coef=0.0, max_new_tokens=24,
                                minibatch_size=16, tis_cap=2.0, rm_scoring="in_process",
                                reward_functions=(RewardFunctionConfig("task_rewards:says_great", 1.0),)),
        rollout=dataclasses.replace(test_config.rollout, num_workers=2, partial_rollouts=True, max_staleness=bound,
                                    async_one_step_off=one_step_off),
        placement="disaggregated" if one_step_off else "auto")
    result = run_ppo(cfg, policy_dir, None, tmp_path, log=lambda *_: None, eval_every=0)
    h = result.history
    assert [x["batch_size"] for x in h] == [16] * 3
    assert h[0]["version_lag"] == 0 and h[0]["rollout_resumed_frac"] == 0
    assert max(x["version_lag"] for x in h) == bound and all(x["rollout_resumed_frac"] > 0 for x in h[1:])
    assert all(x["rollout_carried"] > 0 for x in h)
    for x in h:  # tokens of an older version: importance weights differ from 1 exactly when some are
        assert (abs(x["tis_weight"] - 1.0) > 1e-4) == (x["version_lag"] > 0), x
    assert all(x["drift"] <= x["drift_limit"] for x in h)
