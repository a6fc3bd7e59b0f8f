"""rollout.weight_sync=collective: the learner broadcasts its weights to every engine through one gloo
group (vLLM's weight-transfer API with the backend rlhf_ray registers), re-formed when the pool resizes."""

from __future__ import annotations

import dataclasses

import pytest
from ports import free_port

from rlhf_ray.ppo.transport.collective import nbytes
from rlhf_ray.ppo.weights import plan_buckets


def test_buckets_are_consecutive_and_bounded_and_a_big_tensor_goes_alone():
    assert plan_buckets([4, 4, 4, 10, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
    assert plan_buckets([], 8) == []
    assert nbytes("bfloat16", [3, 5]) == 30 and nbytes("float32", [2]) == 8
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([1], 0)


@pytest.mark.parametrize("plain", [True, False])
def test_a_broadcast_lands_every_weight_in_place_or_through_vllms_reload(tied_policy_dir, test_config, plain):
    """In process, a learner and one engine in a group of two: two syncs (training moved every weight
    before each) land the learner's weights in the engine, copied in place (plain CPU weights) or through
    vLLM's layerwise reload (its packed ones), a model whose LM head is its embedding included: the
    engine's logprobs are the learner's after each."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from rlhf_ray.data import synthetic
    from rlhf_ray.ppo.learner import Learner
    from rlhf_ray.ppo.rollout import RolloutWorker
    from rlhf_ray.ppo.weights import logprob_drift

    learner = Learner(tied_policy_dir, test_config.ppo, device="cpu")
    meta = learner.weight_meta()
    threads = torch.get_num_threads()
    w = RolloutWorker(str(tied_policy_dir), dataclasses.replace(
        test_config.rollout, weight_sync="collective", cpu_plain_weights=plain), worker_id=9, seed=0)
    try:
        port = free_port()
        r = w.generate(synthetic.prompts(4, seed=1), 6, 1.0, 1.0, seed=0)
        with ThreadPoolExecutor(1) as learner_side:  # each side blocks until the other is there
            joined = learner_side.submit(learner.open_sender, "collective", "127.0.0.1", port, 2, meta, 64 << 10)
            w.open_receiver("collective", "127.0.0.1", port, 1, 2, 64 << 10)
            joined.result()
            for version in (1, 2):
                with torch.no_grad():  # stands in for a PPO step: every weight moves, the tie holds
                    for p in learner.policy.parameters():
                        p.add_(0.05 * torch.randn_like(p))
                sent = learner_side.submit(learner.send_weights, version)
                info = w.update_weights(meta, version)
                assert sent.result()["bytes"] == info["bytes"] == sum(a.nbytes for a in learner.state_dict().values())
                assert info["version"] == version and info["mode"] == "collective"
                lp = w.logprobs_of(r.input_ids, r.attention_mask, r.response_mask)
                drift = logprob_drift(lp, learner.logprobs(r.input_ids, r.attention_mask), r.response_mask)
                assert drift < 1e-4, (version, drift)
    finally:
        w.shutdown()
        torch.set_num_threads(threads)


@pytest.mark.parametrize("one_step_off", [False, True])
def test_ppo_syncs_weights_collectively_and_re_forms_the_group_when_the_pool_grows(
        ray_cluster, test_config, policy_dir, rm_dir, tmp_path, one_step_off):
    """One engine, then (the operator's control file after iteration 1) two: the group of the learner and
    the engines is formed at start and again for the two engines. Synchronous, the new engine takes the
    learner's weights before its first rollout (every batch's sampling logprobs are pi_old's); one step
    off, the group forms while the learner trains on (the driver does not wait for it) and the next sync
    is the new engine's first. Each iteration's drift probe (engine 0, then the new engine 1) matches the
    learner's logprobs to float32 rounding, and every engine reports the synced version."""
    from rlhf_ray.ppo.driver import run_ppo
    from rlhf_ray.ppo.pool import CONTROL_FILE

    ppo = dataclasses.replace(test_config.ppo, iterations=2, prompts_per_iteration=8, max_new_tokens=8,
                              minibatch_size=4)
    cfg = dataclasses.replace(test_config, ppo=ppo, rollout=dataclasses.replace(
        test_config.rollout, num_workers=1, weight_sync="collective", weight_bucket_mib=1,
        async_one_step_off=one_step_off))
    lines = []

    def grow(m, ctx):
        if m["iteration"] == 1:
            (tmp_path / CONTROL_FILE).write_text("2\n")

    result = run_ppo(cfg, policy_dir, rm_dir, tmp_path, log=lines.append, eval_every=0, on_iteration=grow)
    said = [x for x in lines if "weight sync:" in x]
    assert len(said) == 1 and "collective (a gloo group of the learner and 1 engine(s))" in said[0], said
    assert any("rollout workers -> 2" in x for x in lines), lines
    h = result.history
    assert [x["sync_mode"] for x in h] == ["collective", "collective"]
    assert [x["drift_worker"] for x in h] == [0, 1] and [x["num_workers"] for x in h] == [1, 2]
    assert all(x["drift"] < 1e-4 for x in h), [x["drift"] for x in h]
    assert h[0]["sync_bytes"] == h[1]["sync_bytes"] > 0  # one broadcast for one engine or two
    gaps = [x["behaviour_logprob_gap"] for x in h]  # one step off, batch 2 was sampled one update back
    assert (gaps[1] > 10 * gaps[0] if one_step_off else max(gaps) < 1e-4), gaps
