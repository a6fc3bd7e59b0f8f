"""The registered policy losses, aggregations and estimator options against hand-computed values and
loop references (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhf_ray.ops import (ESTIMATORS, LOSS_TYPES, AdvantageSettings, ClipRange, grpo_advantages, mismatch_kl,
                          overlong_penalty, policy_loss, ppo_objective, truncated_is_weights)
from rlhf_ray.ops.losses import AGGREGATIONS, log_importance_ratio

D = torch.float64
MASK = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)  # 3 and 2 response tokens


def test_aggregations_by_hand():
    x = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0], [9.0, 9.0, 4.0, 8.0, 9.0]], dtype=D)
    assert AGGREGATIONS["token_mean"].fn(x, MASK, 0).item() == pytest.approx(18 / 5)  # (1+2+3+4+8) / 5
    assert AGGREGATIONS["sequence_mean"].fn(x, MASK, 0).item() == pytest.approx((2.0 + 6.0) / 2)
    assert AGGREGATIONS["sequence_sum_over_max"].fn(x, MASK, 4).item() == pytest.approx((6 + 12) / (2 * 4))
    with pytest.raises(ValueError, match="max_tokens"):
        AGGREGATIONS["sequence_sum_over_max"].fn(x, MASK, 0)


def test_every_loss_type_against_a_loop_reference():
    """Each registered loss type's policy term, value and gradient, against a per-token loop of the
    formula written out (asymmetric clip range, both ratio levels, truncated IS weights)."""
    gen = torch.Generator().manual_seed(0)
    B, T = 3, 6
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    old = -torch.rand(B, T, generator=gen, dtype=D) * 2
    lp0 = old + 0.4 * torch.randn(B, T, generator=gen, dtype=D)
    adv = torch.randn(B, T, generator=gen, dtype=D)
    w = torch.rand(B, T, generator=gen, dtype=D) + 0.5
    max_tokens = 7
    for name in LOSS_TYPES:
        for level in ("token", "sequence"):
            clip = ClipRange(0.2, 5.0 if name == "cispo" else 0.28)
            lp = lp0.clone().requires_grad_(True)
            got, terms = policy_loss(name, lp, old, adv, mask, clip, level, weights=w, max_tokens=max_tokens)
            got.backward()

            def reference(lp_list):
                per_seq, total, count = [], 0.0, 0
                for b in range(B):
                    idx = [t for t in range(T) if mask[b, t]]
                    seq_log_r = sum(lp_list[b][t] - old[b, t].item() for t in idx) / len(idx)
                    seq = 0.0
                    for t in idx:
                        log_r = seq_log_r if level == "sequence" else lp_list[b][t] - old[b, t].item()
                        r, a = math.exp(log_r), adv[b, t].item()
                        if name == "cispo":
                            term = min(r, clip.high) * a * lp_list[b][t]  # (the weight detached: see below)
                        else:
                            term = min(r * a, min(max(r, 1 - clip.low), 1 + clip.high) * a)
                        term *= w[b, t].item()
                        seq, total, count = seq + term, total + term, count + 1
                    per_seq.append((seq, len(idx)))
                if name in ("dapo", "bnpo", "cispo"):
                    return total / count
                if name == "grpo":
                    return sum(s / n for s, n in per_seq) / B
                return sum(s for s, _ in per_seq) / (B * max_tokens)  # dr_grpo

            assert got.item() == pytest.approx(reference(lp0.tolist()), rel=1e-10, abs=1e-12), (name, level)
            if name == "cispo":  # d/dlp of sg(w_is) * A * lp * w: the weight is not differentiated
                continue
            eps = 1e-6  # the others: finite differences of the loop reference
            for b, t in [(0, 2), (1, 4), (2, 1)]:
                up, down = lp0.tolist(), lp0.tolist()
                up[b][t] += eps
                down[b][t] -= eps
                fd = (reference(up) - reference(down)) / (2 * eps)
                assert lp.grad[b, t].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), (name, level, b, t)


def test_cispo_keeps_the_gradient_where_ppo_clips_it():
    """A token whose ratio left the clip range in the advantage's direction: PPO-clip gives it no
    gradient; CISPO gives it min(r, high) * A (the weight detached)."""
    old = torch.log(torch.tensor([[0.2, 0.5]], dtype=D))
    lp = (old + torch.log(torch.tensor([[2.0, 1.1]], dtype=D))).requires_grad_(True)  # ratios 2.0, 1.1
    adv, mask = torch.tensor([[1.0, -1.0]], dtype=D), torch.ones(1, 2, dtype=torch.bool)
    clipped, terms = policy_loss("dapo", lp, old, adv, mask, ClipRange(0.2, 0.2))
    clipped.backward()
    assert lp.grad[0, 0] == 0 and terms.clip_frac.item() == 0.5
    lp.grad = None
    value, terms = policy_loss("cispo", lp, old, adv, mask, ClipRange(0.2, 1.5))
    value.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[1.5 * 1.0, 1.1 * -1.0]], dtype=D) / 2)
    assert value.item() == pytest.approx((1.5 * lp[0, 0].item() - 1.1 * lp[0, 1].item()) / 2)
    assert terms.clip_frac.item() == 0.5  # the truncated token


def test_sequence_level_ratio_is_the_mean_of_its_tokens():
    old = torch.zeros(2, 5, dtype=D)
    lp = torch.tensor([[9.0, 0.1, 0.2, 0.6, 9.0], [9.0, 9.0, -0.5, 0.1, 9.0]], dtype=D)
    got = log_importance_ratio(lp, old, MASK, "sequence")
    torch.testing.assert_close(got, torch.tensor([[0.3] * 5, [-0.2] * 5], dtype=D))
    torch.testing.assert_close(log_importance_ratio(lp, old, MASK, "token"), lp)


def test_grpo_reward_scaling_by_hand():
    scores = torch.tensor([[1.0, 3.0], [2.0, 2.0]], dtype=D)
    torch.testing.assert_close(grpo_advantages(scores, scale="none"), torch.tensor([[-1.0, 1.0], [0.0, 0.0]], dtype=D))
    batch_std = scores.std()  # unbiased over all four: sqrt(2/3)
    torch.testing.assert_close(grpo_advantages(scores, scale="batch"),
                               torch.tensor([[-1.0, 1.0], [0.0, 0.0]], dtype=D) / (batch_std + 1e-4))
    assert grpo_advantages(scores, scale="group")[0, 1].item() == pytest.approx(1 / (math.sqrt(2) + 1e-4))
    # through the estimator table: a sample's advantage on each of its response tokens
    rewards = torch.zeros(4, 5, dtype=D)
    mask = torch.tensor([[0, 1, 1, 0, 0]] * 4, dtype=torch.bool)
    rewards[:, 2] = torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=D)
    adv, ret = ESTIMATORS["grpo"].fn(rewards, torch.zeros_like(rewards), mask, AdvantageSettings(n=2, scale_rewards="none"))
    torch.testing.assert_close(adv[:, 1], torch.tensor([-1.0, 1.0, 0.0, 0.0]))  # (float32, as the batch)
    assert torch.equal(adv, ret) and torch.all(adv[~mask] == 0)


def test_the_estimator_table_declares_what_each_needs():
    assert {k: (e.critic, e.groups) for k, e in ESTIMATORS.items()} == {
        "gae": (True, False), "grpo": (False, True), "rloo": (False, True), "reinforce_plus_plus": (False, False)}


def test_overlong_penalty_by_hand():
    got = overlong_penalty(torch.tensor([3, 12, 13, 16]), max_tokens=16, buffer=4, penalty=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.125, -0.5]))


def test_truncated_is_weights_and_mismatch_kl_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]], dtype=D))
    behaviour = torch.log(torch.tensor([[0.25, 0.4, 0.1]], dtype=D))
    torch.testing.assert_close(truncated_is_weights(old, behaviour, 3.0), torch.tensor([[2.0, 0.5, 3.0]], dtype=D))
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    expected = ((2.0 - 1 - math.log(2.0)) + (0.5 - 1 - math.log(0.5))) / 2  # k3 with r = pi_old / pi_behaviour
    assert mismatch_kl(behaviour, old, mask).item() == pytest.approx(expected)


def test_ppo_objective_aggregates_the_kl_terms_as_its_loss_type_and_scales_each_by_its_share():
    """loss_type grpo: the policy term and both KL terms are sequence means, the value loss and the
    entropy token means; a rank's shares scale the sequence terms by the sequence share and the token
    terms by the token share."""
    gen = torch.Generator().manual_seed(3)
    lp, old, ref, adv, v, v_old, ret, ent = (torch.randn(2, 5, generator=gen, dtype=D) for _ in range(8))
    kw = dict(clip_eps=0.2, beta=0.3, c1=0.5, value_clip_eps=None, entropy=ent, entropy_coef=0.01,
              ref_logprobs=ref, kl_loss_coef=0.2, loss_type="grpo", clip_eps_high=0.28)
    loss, st = ppo_objective(lp, old, adv, v, v_old, ret, MASK, **kw)
    seq = AGGREGATIONS["sequence_mean"].fn
    k3 = lambda p, q: torch.exp(q - p) - 1 - (q - p)  # noqa: E731  KL(p || q), x ~ p
    p_term, _ = policy_loss("grpo", lp, old, adv, MASK, ClipRange(0.2, 0.28))
    tok = lambda x: x[MASK].mean()  # noqa: E731
    value = 0.5 * tok((v - ret) ** 2)
    expected = p_term - 0.3 * seq(k3(old, lp), MASK) - 0.5 * value - 0.2 * seq(k3(lp, ref), MASK) + 0.01 * tok(ent)
    assert loss.item() == pytest.approx(-expected.item(), rel=1e-12)
    assert st.kl.item() == pytest.approx(seq(k3(old, lp), MASK).item())
    scaled, st2 = ppo_objective(lp, old, adv, v, v_old, ret, MASK, **kw, shares={"tokens": 0.5, "sequences": 2.0})
    expected_scaled = 2.0 * (p_term - 0.3 * seq(k3(old, lp), MASK) - 0.2 * seq(k3(lp, ref), MASK)) \
        + 0.5 * (-0.5 * value + 0.01 * tok(ent))
    assert scaled.item() == pytest.approx(-expected_scaled.item(), rel=1e-12) and st2 == st


def test_the_config_check_reads_the_tables():
    from rlhf_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"ppo.loss_type: 'gspo' is not one of \['bnpo', 'cispo', 'dapo', 'dr_grpo', "
                                          r"'grpo'\]"):
        load_config(None, ["ppo.loss_type=gspo"])
    with pytest.raises(ConfigError, match="ppo.advantage_estimator: 'ppo' is not one of"):
        load_config(None, ["ppo.advantage_estimator=ppo"])
    with pytest.raises(ConfigError, match="ppo.samples_per_prompt must be at least 2"):
        load_config(None, ["ppo.advantage_estimator=rloo"])
    with pytest.raises(ConfigError, match="dynamic_sampling_max_rounds: .* only a group estimator"):
        load_config(None, ["ppo.dynamic_sampling_max_rounds=2"])
    with pytest.raises(ConfigError, match="ppo.overlong_buffer: 16 must be less than ppo.max_new_tokens=16"):
        load_config(None, ["ppo.overlong_buffer=16"])
    cfg = load_config(None, ["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4", "ppo.loss_type=cispo",
                             "ppo.clip_eps_high=5", "ppo.importance_sampling_level=sequence"])
    assert cfg.ppo.loss_type == "cispo" and not cfg.ppo.critic


def test_dynamic_sampling_keeps_groups_that_differ_and_fills_with_the_others():
    from rlhf_ray.ppo.dynamic import group_spread, select_groups
    from rlhf_ray.ppo.types import Rollout, ScoredRollout

    def scored(scores, tag):
        B = len(scores)
        ro = Rollout(np.arange(B * 3).reshape(B, 3), np.ones((B, 3), bool), np.ones((B, 3), bool),
                     np.zeros((B, 3), np.float32), np.zeros(B, bool), [f"{tag}{i}" for i in range(B)],
                     [""] * B, 0, 0, 1.0, 3 * B)
        return ScoredRollout(ro, np.asarray(scores, np.float32), None, 0.5)

    assert list(group_spread(np.array([1, 1, 0, 1, 2, 2.0]), 2)) == [False, True, False]
    first = scored([1, 1, 0, 1, 2, 2], "a")  # groups a0 (tie), a1 (differs), a2 (tie)
    more = scored([0, 3, 5, 5, 1, 0], "b")  # b0 differs, b1 ties, b2 differs
    out = select_groups([first, more], n=2, groups=3)
    assert out.rollout.prompts == ["a2", "a3", "b0", "b1", "b4", "b5"]  # the three that differ, in order
    assert out.stats == {"sampling_rounds": 1, "groups_dropped": 3, "groups_without_spread": 0}
    short = select_groups([first], n=2, groups=3)  # nothing more: filled with the dropped groups
    assert short.rollout.prompts == ["a0", "a1", "a2", "a3", "a4", "a5"]
    assert short.stats == {"sampling_rounds": 0, "groups_dropped": 2, "groups_without_spread": 2}
    assert short.rollout.gen_seconds == 1.0 and out.rollout.gen_seconds == 2.0 and out.score_seconds == 1.0


def test_dapo_options_end_to_end_on_ray(ray_cluster, test_config, policy_dir, tmp_path):
    """GRPO with DAPO's and Dr. GRPO's options in one run: dynamic sampling, overlong shaping, clip-higher,
    truncated responses masked, no std scaling, the dr_grpo loss; two engines, a group split between them.
    Each batch keeps its size and its groups; the reward is the function's value plus the overlong penalty
    of each sample's length; the groups that differ are chosen first, and the policy moves."""
    import dataclasses

    import ray
    from safetensors.numpy import load_file

    from rlhf_ray.config import RewardFunctionConfig
    from rlhf_ray.ppo.driver import run_ppo
    from rlhf_ray.ppo.dynamic import group_spread

    ppo = dataclasses.replace(
        test_config.ppo, iterations=2, prompts_per_iteration=3, samples_per_prompt=2, max_new_tokens=8,
        minibatch_size=6, epochs=1, kl_coef=0.0, lr=1e-3, advantage_estimator="grpo", loss_type="dr_grpo",
        clip_eps_high=0.28, scale_rewards="none", mask_truncated_completions=True, overlong_buffer=3,
        overlong_penalty=0.5, dynamic_sampling_max_rounds=2, eval_reward="", checkpoint_every=0,
        reward_functions=(RewardFunctionConfig("task_rewards:says_great", 1.0),))
    # two engines: 3 prompts x 2 samples split 3 + 3, so a group's two samples come from different engines
    cfg = dataclasses.replace(test_config, ppo=ppo, rollout=dataclasses.replace(test_config.rollout, num_workers=2))
    batches, lines = [], []

    def record(m, ctx):
        s = ray.get(ctx.scored, timeout=60)
        batches.append((s.scores.copy(), s.rollout.response_mask.sum(-1), s.stats))
        prompts = s.rollout.prompts
        assert all(prompts[2 * g] == prompts[2 * g + 1] for g in range(3))  # each group: one prompt, twice

    result = run_ppo(cfg, policy_dir, None, tmp_path, log=lines.append, eval_every=0, on_iteration=record)
    said = next(x for x in lines if x.startswith("[ppo] advantages: "))
    for part in ("loss dr_grpo (token ratio, clip [0.8, 1.28])", "dynamic sampling (<= 2 extra rounds)",
                 "overlong buffer 3", "truncated responses masked"):
        assert part in said, said
    for h, (scores, lengths, sampling) in zip(result.history, batches):
        assert h["batch_size"] == 6 and len(scores) == 6 and sampling and sampling == {
            k: h[k] for k in ("sampling_rounds", "groups_dropped", "groups_without_spread")}
        penalty = -0.5 * np.clip(lengths - (8 - 3), 0, None) / 3
        assert h["reward"] == pytest.approx(float(np.mean(scores + penalty)), abs=1e-5)
        spread = group_spread(scores, 2)
        assert h["groups_without_spread"] == int((~spread).sum())
    # a binary reward on a tiny model: most groups tie, so the extra rounds ran (and still fell short)
    assert max(b[2]["sampling_rounds"] for b in batches) >= 1 and max(b[2]["groups_dropped"] for b in batches) > 0
    trained, initial = load_file(str(result.policy_dir / "model.safetensors")), load_file(str(policy_dir / "model.safetensors"))
    assert any(not np.array_equal(trained[k], initial[k]) for k in initial)
