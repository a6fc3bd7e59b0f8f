"""One machine, fully used: where the PPO actors go (placement), and GRPO with a reward function and no
RM colocated on one node, as most users first run it."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest


@pytest.mark.parametrize("change, why", [
    ({"rollout": {"async_one_step_off": True}}, "rollout.async_one_step_off runs rollouts while the learner trains"),
    ({"learner": {"num_workers": 2}}, "learner.num_workers > 1"),
    ({"rollout": {"gpus_per_worker": 1.0}}, "the cluster has GPUs"),
    ({"learner": {"node_resource": "trainer"}}, "place the roles on different nodes"),
])
def test_colocation_is_refused_where_the_stages_cannot_take_turns(test_config, change, why):
    from rlhf_ray.ppo.actors import colocation_refused

    assert colocation_refused(test_config, nodes=1, gpus=False) is None
    cfg = dataclasses.replace(test_config, **{k: dataclasses.replace(getattr(test_config, k), **v)
                                              for k, v in change.items()})
    assert why in colocation_refused(cfg, nodes=1, gpus=False)
    assert "GPUs" in colocation_refused(test_config, nodes=1, gpus=True)
    # auto keeps a multi-node cluster disaggregated; asked for explicitly, colocated packs one node
    assert "several nodes" in colocation_refused(test_config, nodes=3, gpus=False)
    assert colocation_refused(dataclasses.replace(test_config, placement="colocated"), nodes=3, gpus=False) is None


def test_placement_options_give_each_colocated_actor_the_nodes_cores():
    from rlhf_ray.ppo.actors import COLOCATED_CPUS, Placement

    apart = Placement().options(1.5, 0.0, "trainer")
    assert apart == {"num_cpus": 1.5, "num_gpus": 0.0, "resources": {"trainer": 0.001}}
    together = Placement(node="ab" * 28, cores=8)
    engine = together.options(1.0, 0.0, "rollout", share=3)
    assert engine["num_cpus"] == COLOCATED_CPUS < 1 and engine["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "2"}}
    assert engine["scheduling_strategy"].node_id == "ab" * 28 and not engine["scheduling_strategy"].soft
    assert together.options(1.0)["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "8"}}
    assert "8 threads for the learner" in together.describe(3) and "2 for each of 3 engine(s)" in together.describe(3)


def test_grpo_with_a_reward_function_and_no_rm_colocated(ray_cluster, test_config, policy_dir, tmp_path):
    """`rlhf-ray ppo` with a reward function and no RM on a one-node cluster: placement auto colocates
    the actors, each with threads for every core of the node (the one engine too); no RM is loaded, no
    reference policy (no KL term) and no pi_old pass (one optimizer step per batch); the reward is the
    function's value; the policy is trained."""
    import ray
    from safetensors.numpy import load_file

    from rlhf_ray.cli import main

    out = tmp_path / "out"
    args = ["ppo", "--policy", str(policy_dir), f"output_dir={out}", "ppo.reward_functions=[task_rewards:words]",
            "ppo.eval_reward=task_rewards:words", "ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4",
            "ppo.prompts_per_iteration=4", "ppo.minibatch_size=16", "ppo.epochs=1", "ppo.kl_coef=0",
            "ppo.iterations=2", "ppo.eval_every=0", "ppo.eval_prompts=8", "ppo.max_new_tokens=8", "ppo.lr=1e-3",
            "ppo.checkpoint_every=0", "rollout.num_workers=1", "ppo.loss_type=bnpo",
            "rollout.weight_sync=object_store"]  # (chosen by name: the engines copy the buckets in place)
    threads = {}

    def on_iteration(m, ctx):  # the actors' own view of their threads and of what they loaded
        count = lambda _: (__import__("torch").get_num_threads(), len(os.sched_getaffinity(0)))  # noqa: E731
        threads["learner"] = ray.get(ctx.learner.__ray_call__.remote(count), timeout=60)
        threads["engine"] = ray.get(ctx.pool.workers[0].__ray_call__.remote(count), timeout=60)

    from rlhf_ray.ppo import driver

    real_run = driver.run_ppo
    lines = []

    def run(*a, **kw):  # the CLI's run, with the callback and the log recorded
        return real_run(*a, **{**kw, "on_iteration": on_iteration, "log": lambda x: (lines.append(x), print(x))})

    driver.run_ppo = run
    try:
        assert main(args) == 0
    finally:
        driver.run_ppo = real_run
    assert any(x.startswith("[ppo] no RM: the reward functions alone score") for x in lines), lines
    assert any(x.startswith("[ppo] placement: colocated on one node") for x in lines), lines
    assert not any("Serve app" in x for x in lines)
    assert any("weight sync: object store (rollout.weight_sync=object_store)" in x for x in lines), lines
    cores = threads["learner"][1]
    assert threads["learner"] == (cores, cores) and threads["engine"] == (cores, cores)  # (Ray's default: 1)

    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in rows if "iteration" in r]
    assert len(its) == 2
    for r in its:
        assert r["evaluate_seconds"] == 0.0 and r["reference_seconds"] == 0.0  # neither pass ran
        assert "rm_score" not in r and "kl_ref" not in r
        assert r["reward"] == pytest.approx(r["rewards/words"], abs=1e-6)  # the function's value, weight 1
        assert r["behaviour_logprob_gap"] < 1e-4  # the engines sample what the learner scores (float32)
        assert r["sync_mode"] == "in_place" and r["drift"] < 1e-4
    assert "eval_reward" in rows[0] and "eval_rm_score" not in rows[0]
    before, after = load_file(str(policy_dir / "model.safetensors")), load_file(str(out / "ppo" / "policy" / "model.safetensors"))
    assert sum(not np.array_equal(before[k], after[k]) for k in before) == len(before)


def test_shared_memory_asked_for_where_it_cannot_work_is_refused_by_name(ray_cluster, test_config, policy_dir, tmp_path):
    """rollout.weight_sync=shared_memory with engines that keep vLLM's packed weights: the run stops at start
    with an error naming the field and why (auto would fall back to the object store)."""
    from rlhf_ray.config import RewardFunctionConfig
    from rlhf_ray.ppo.driver import run_ppo
    from rlhf_ray.ppo.sync import WeightSyncError

    ppo = dataclasses.replace(test_config.ppo, iterations=1, eval_every=0,
                              reward_functions=(RewardFunctionConfig("task_rewards:words"),))
    rollout = dataclasses.replace(test_config.rollout, num_workers=1, weight_sync="shared_memory", cpu_plain_weights=False)
    with pytest.raises(WeightSyncError, match=r"rollout.weight_sync=shared_memory: the engines keep packed weights"):
        run_ppo(dataclasses.replace(test_config, ppo=ppo, rollout=rollout), policy_dir, None, tmp_path, log=lambda *_: None)
