"""Critic-free estimators against hand-computed values and loop references."""

import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_ray.ops import (discounted_returns, grpo_advantages, kl_penalized_rewards, reinforce_pp_advantages,
                          rloo_advantages, sequence_to_tokens)


def test_grpo_by_hand_ties_and_a_loop_reference():
    got = grpo_advantages(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    # group 1: mean 2, unbiased std 1; group 2 ties: std 0, every advantage 0
    torch.testing.assert_close(got, torch.tensor([[-1 / 1.0001, 0.0, 1 / 1.0001], [0.0, 0.0, 0.0]]))
    scores = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for g, row in enumerate(scores.tolist()):
        mean, std = statistics.fmean(row), statistics.stdev(row)
        expect = [(s - mean) / (std + 1e-4) for s in row]
        np.testing.assert_allclose(grpo_advantages(scores)[g].numpy(), expect, rtol=0, atol=1e-12)


def test_rloo_by_hand_and_a_loop_reference():
    torch.testing.assert_close(rloo_advantages(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[-1.5, 0.0, 1.5]]))
    scores = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for g, row in enumerate(scores.tolist()):
        expect = [s - statistics.fmean(row[:i] + row[i + 1:]) for i, s in enumerate(row)]
        np.testing.assert_allclose(rloo_advantages(scores)[g].numpy(), expect, rtol=0, atol=1e-12)
    assert rloo_advantages(scores).sum(dim=1).abs().max() < 1e-12  # each group's advantages sum to 0


@pytest.mark.parametrize("estimator", [grpo_advantages, rloo_advantages])
def test_a_group_of_one_is_an_error_naming_the_field(estimator):
    with pytest.raises(ValueError, match=r"at least 2 samples per prompt .*\(ppo.samples_per_prompt=1\)"):
        estimator(torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError, match=r"\[G prompts, n samples\]"):
        estimator(torch.tensor([1.0, 2.0]))


def test_sequence_advantages_land_on_response_tokens_only():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    torch.testing.assert_close(sequence_to_tokens(torch.tensor([2.0, -1.0]), mask),
                               torch.tensor([[0.0, 2.0, 2.0, 0.0], [0.0, 0.0, -1.0, -1.0]]))


def test_discounted_returns_against_a_loop():
    gen = torch.Generator().manual_seed(2)
    rewards = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    for gamma in (1.0, 0.9):
        got = discounted_returns(rewards, mask, gamma)
        for b in range(3):
            expect, run = np.zeros(7), 0.0
            for t in reversed(range(7)):
                run = (rewards[b, t].item() if mask[b, t] else 0.0) + gamma * run
                expect[t] = run if mask[b, t] else 0.0
            np.testing.assert_allclose(got[b].numpy(), expect, rtol=0, atol=1e-12)


def test_reinforce_pp_by_hand():
    """Sequence score on the last token minus the KL penalty on every token, returns with gamma = 1,
    whitened over the batch's response tokens."""
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    old = torch.tensor([[0.0, -1.0, -1.0, -1.0], [0.0, -2.0, -2.0, 0.0]])
    ref = old - 0.5  # log pi_old - log pi_ref = 0.5 on every token
    rewards, _ = kl_penalized_rewards(torch.tensor([2.0, -1.0]), old, ref, mask, kl_coef=0.2)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.1, -0.1, 1.9], [0.0, -0.1, -1.1, 0.0]]))
    adv, returns = reinforce_pp_advantages(rewards, mask)
    torch.testing.assert_close(returns, torch.tensor([[0.0, 1.7, 1.8, 1.9], [0.0, -1.2, -1.1, 0.0]]))
    tokens = np.array([1.7, 1.8, 1.9, -1.2, -1.1])
    whitened = (tokens - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(adv[mask.bool()].numpy(), whitened, rtol=0, atol=1e-6)
    assert (adv[~mask.bool()] == 0).all()


# ---- wiring: the advantage rule by estimator, the objective's KL terms, a critic-free learner ----------

def _cfg(test_config, **kw):
    import dataclasses

    return dataclasses.replace(test_config.ppo, **kw)


def test_advantages_by_estimator(test_config):
    from rlhf_ray.ops import gae, masked_whiten
    from rlhf_ray.ppo.advantage import advantages

    gen = torch.Generator().manual_seed(3)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0]])
    rewards = torch.where(mask.bool(), torch.randn(4, 4, generator=gen), torch.zeros(()))
    values = torch.where(mask.bool(), torch.randn(4, 4, generator=gen), torch.zeros(()))
    # gae: what the advantage worker always did
    adv, ret = advantages(_cfg(test_config), rewards, values, mask)
    a_ref, r_ref = gae(rewards, values, mask, test_config.ppo.gamma, test_config.ppo.lam)
    torch.testing.assert_close(adv, masked_whiten(a_ref, mask))
    torch.testing.assert_close(ret, r_ref)
    # grpo / rloo on each sample's summed token rewards, 2 samples per prompt, on its response tokens
    sums = (rewards * mask).sum(-1)
    for name, fn in (("grpo", grpo_advantages), ("rloo", rloo_advantages)):
        adv, ret = advantages(_cfg(test_config, advantage_estimator=name, samples_per_prompt=2), rewards, values, mask)
        per_seq = fn(sums.view(2, 2)).reshape(-1)
        torch.testing.assert_close(adv, sequence_to_tokens(per_seq, mask))
        torch.testing.assert_close(ret, adv)
    adv, ret = advantages(_cfg(test_config, advantage_estimator="reinforce_plus_plus"), rewards, values, mask)
    torch.testing.assert_close((adv, ret), reinforce_pp_advantages(rewards, mask))
    with pytest.raises(ValueError, match="not whole groups of ppo.samples_per_prompt=3"):
        advantages(_cfg(test_config, advantage_estimator="rloo", samples_per_prompt=3), rewards, values, mask)


def test_group_stats_is_the_listwise_rm_over_each_group():
    from rlhf_ray.ppo.advantage import group_stats

    assert group_stats(np.array([1.0, 2.0]), 1) == {}
    s = group_stats(np.array([0.0, np.log(3.0), 5.0, 5.0]), 2)  # P = (1/4, 3/4) and (1/2, 1/2)
    h = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    assert s["group_rm_top_prob"] == pytest.approx((0.75 + 0.5) / 2, abs=1e-12)
    assert s["group_rm_entropy"] == pytest.approx((h + np.log(2)) / 2, abs=1e-12)


def test_the_objectives_kl_loss_term_and_no_value_loss_without_a_critic():
    from rlhf_ray.ops import clipped_surrogate, kl_k3, masked_mean, ppo_objective

    gen = torch.Generator().manual_seed(4)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    old = -torch.rand(2, 4, generator=gen) - 0.5
    lp = (old + 0.1 * torch.randn(2, 4, generator=gen)).requires_grad_()
    ref = old - 0.2 * torch.rand(2, 4, generator=gen)
    adv = torch.randn(2, 4, generator=gen)
    kw = dict(clip_eps=0.2, beta=0.0, c1=0.5)
    loss, st = ppo_objective(lp, old, adv, None, None, None, mask, ref_logprobs=ref, kl_loss_coef=0.3, **kw)
    l_clip, _ = clipped_surrogate(lp, old, adv, mask, 0.2)
    kl_ref = masked_mean(torch.exp(ref - lp) - (ref - lp) - 1, mask)  # k3 of KL(pi_theta || pi_ref), by hand
    torch.testing.assert_close(kl_ref, masked_mean(kl_k3(lp, ref), mask))
    torch.testing.assert_close(loss, -(l_clip - 0.3 * kl_ref))
    assert float(st.value_loss) == 0.0 and float(st.kl_ref) == pytest.approx(float(kl_ref.detach()), abs=1e-6)
    # gradient of the KL term by hand: d/d lp of k3 = 1 - exp(ref - lp), per masked token / their count
    (g,) = torch.autograd.grad(0.3 * kl_ref, lp)
    torch.testing.assert_close(g, 0.3 * (1 - torch.exp(ref - lp.detach())) * mask / mask.sum())
    # without reference logprobs the term is off and reported as 0
    loss0, st0 = ppo_objective(lp, old, adv, None, None, None, mask, **kw)
    torch.testing.assert_close(loss0, -l_clip)
    assert float(st0.kl_ref) == 0.0


def test_the_config_refuses_a_group_estimator_with_one_sample():
    from rlhf_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"ppo.advantage_estimator=grpo compares the samples of a prompt: "
                                          r"ppo.samples_per_prompt must be at least 2, got 1"):
        load_config(None, ["ppo.advantage_estimator=grpo"])
    assert load_config(None, ["ppo.advantage_estimator=reinforce_plus_plus"]).ppo.samples_per_prompt == 1
    with pytest.raises(ConfigError, match="ppo.advantage_estimator: 'ppo' is not one of"):
        load_config(None, ["ppo.advantage_estimator=ppo"])


def test_a_critic_free_learner_has_no_value_head_trains_and_checkpoints(policy_dir, test_config, tmp_path):
    from rlhf_ray.ppo.learner import VALUE_HEAD_FILE, Learner
    from rlhf_ray.ppo.types import TrainBatch

    cfg = _cfg(test_config, advantage_estimator="rloo", samples_per_prompt=2, lr=1e-3, epochs=1, minibatch_size=4,
               kl_loss_coef=0.1)
    learner = Learner(policy_dir, cfg, device="cpu")
    assert learner.value_head is None
    ids = torch.randint(3, 60, (4, 10), generator=torch.Generator().manual_seed(5)).numpy()
    am = np.ones((4, 10), bool)
    rm = np.zeros((4, 10), bool)
    rm[:, 4:] = True
    lp = learner.logprobs(ids, am)
    adv = np.where(rm, np.array([[1.0], [-1.0], [0.5], [-0.5]]), 0).astype(np.float32)
    z = np.zeros((4, 10), np.float32)
    batch = TrainBatch(ids, am, rm, lp, lp - 0.1, z, z, adv, adv, policy_version=0)
    before = {k: p.detach().clone() for k, p in learner.policy.named_parameters()}
    stats = learner.train(batch)
    assert stats["value_loss"] == 0.0 and stats["kl_ref_k3"] > 0 and stats["policy_version"] == 1
    assert all(not torch.equal(p.detach(), before[k]) for k, p in learner.policy.named_parameters())
    saved = Path(learner.save_checkpoint(tmp_path / "ckpt"))
    assert not (saved / VALUE_HEAD_FILE).exists()
    again = Learner(saved, cfg, device="cpu")
    assert again.load_checkpoint(saved) == 1
    s1, s2 = learner.train(batch), again.train(batch)  # same state: the same next step
    assert s1["loss"] == pytest.approx(s2["loss"], abs=1e-6)
    gae_learner = Learner(saved, _cfg(test_config), device="cpu")
    with pytest.raises(FileNotFoundError, match="another ppo.advantage_estimator"):
        gae_learner.load_checkpoint(saved)
