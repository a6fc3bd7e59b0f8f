"""Nothing computed that nothing uses: pi_old taken from the training forward when a batch is one
optimizer step, no reference policy without a KL term, no RM when reward functions score alone. Each
skip is checked against the run that does the work: same batch, loss, gradients and update."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import PROMPTS, RESPONSES, TRUNCATED, make_rollout

from rlhf_ray.config import RewardFunctionConfig
from rlhf_ray.ppo.types import ScoredRollout


@pytest.fixture(scope="module")
def group_scored(policy_dir):
    """Two prompts x two samples (adjacent), scored by hand."""
    from transformers import AutoTokenizer

    ro = make_rollout(AutoTokenizer.from_pretrained(policy_dir), PROMPTS, RESPONSES, TRUNCATED)
    ro.rollout_logprobs[ro.response_mask] = -1.5  # the engine's sampled-token logprobs, made up
    scores = np.array([1.0, -0.5, 0.25, 2.0], np.float32)
    return ScoredRollout(ro, scores, scores, 0.01)


def grpo_cfg(test_config, **kw):
    return dataclasses.replace(test_config.ppo, advantage_estimator="grpo", samples_per_prompt=2,
                               prompts_per_iteration=2, epochs=1, minibatch_size=4, kl_coef=0.0,
                               kl_loss_coef=0.0, beta=0.1, entropy_coef=0.01, lr=1e-4, **kw)


def test_what_the_objective_reads_decides_the_passes(test_config):
    cfg = grpo_cfg(test_config)
    assert cfg.batch_size == 4 and cfg.pi_old_from_train_forward and not cfg.uses_reference
    for kw in ({"epochs": 2}, {"minibatch_size": 2}, {"kl_coef": 0.05}):
        assert not dataclasses.replace(cfg, **kw).pi_old_from_train_forward, kw
    assert not dataclasses.replace(cfg, advantage_estimator="gae").pi_old_from_train_forward  # GAE reads values
    assert dataclasses.replace(cfg, kl_loss_coef=0.01).uses_reference
    assert dataclasses.replace(cfg, kl_coef=0.05).uses_reference
    assert test_config.ppo.uses_reference and not test_config.ppo.pi_old_from_train_forward  # the seed's PPO


def test_pi_old_from_the_training_forward_gives_the_same_loss_gradients_and_update(test_config, policy_dir,
                                                                                   group_scored):
    """One optimizer step per batch: the learner with a separate pi_old pass (Learner.evaluate) and the
    one taking pi_old from its own forward compute the same loss (with beta's KL and the entropy bonus),
    the same gradient of every parameter and the same weights after the step, to 1e-6."""
    from rlhf_ray.ppo.advantage import AdvantageWorker
    from rlhf_ray.ppo.learner import Learner

    cfg = grpo_cfg(test_config)
    adv = AdvantageWorker(policy_dir, cfg)
    assert adv.ref is None  # no KL term: no reference policy loaded
    evaluated, skipped = Learner(policy_dir, cfg, device="cpu"), Learner(policy_dir, cfg, device="cpu")
    with_pass = adv.compute(group_scored, evaluated.evaluate(group_scored))
    without = adv.compute(group_scored, None)
    assert without.old_logprobs is None and without.ref_logprobs is None and with_pass.ref_logprobs is None
    np.testing.assert_array_equal(without.advantages, with_pass.advantages)
    assert np.abs(with_pass.advantages).max() > 0.5  # (groups whose scores differ)

    rows = np.arange(4)
    grads = []
    for learner, batch in ((evaluated, with_pass), (skipped, without)):
        loss, stats, _ = learner._minibatch_loss(batch, rows)
        loss.backward()
        grads.append((float(loss.detach()), stats, {k: p.grad.clone() for k, p in learner.policy.named_parameters()}))
        learner.optimizer.zero_grad(set_to_none=True)
    (loss_a, st_a, g_a), (loss_b, st_b, g_b) = grads
    assert loss_b == pytest.approx(loss_a, abs=1e-6) and float(st_b.kl) == pytest.approx(0.0, abs=1e-7)
    assert float(st_b.entropy) == pytest.approx(float(st_a.entropy), abs=1e-6)
    for k, g in g_a.items():
        torch.testing.assert_close(g_b[k], g, rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")

    a, b = evaluated.train(with_pass), skipped.train(without)
    for k in ("loss", "policy_loss", "kl_old", "clip_frac", "entropy", "grad_norm"):
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    # the engine-vs-pi_old gap, measured by the learner when it takes pi_old itself
    m = group_scored.rollout.response_mask
    assert b["behaviour_logprob_gap"] == pytest.approx(np.abs(with_pass.old_logprobs + 1.5)[m].mean(), rel=1e-5)
    assert b["mismatch_kl"] == pytest.approx(a["mismatch_kl"], rel=1e-5) and a["mismatch_kl"] > 0.1
    changed = 0
    for (k, pa), pb in zip(evaluated.policy.named_parameters(), skipped.policy.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
    for pa, p0 in zip(evaluated.policy.parameters(), Learner(policy_dir, cfg, device="cpu").policy.parameters()):
        changed += not torch.equal(pa, p0)
    assert changed == len(list(evaluated.policy.parameters()))  # (the step moved every weight)


def test_without_a_kl_term_the_batch_equals_one_made_with_a_reference(test_config, policy_dir, group_scored):
    """kl_coef = kl_loss_coef = 0: no reference policy is loaded, and the batch's rewards and
    advantages equal those of a worker that has one (kl_loss_coef > 0 loads it; kl_coef = 0 leaves the
    reward alone); the reference KL is not reported, as nothing measured it."""
    from rlhf_ray.ppo.advantage import AdvantageWorker
    from rlhf_ray.ppo.learner import Learner

    cfg = dataclasses.replace(grpo_cfg(test_config), epochs=2)  # pi_old from a pass: only the reference varies
    old = Learner(policy_dir, cfg, device="cpu").evaluate(group_scored)
    plain, with_ref = AdvantageWorker(policy_dir, cfg), AdvantageWorker(policy_dir, dataclasses.replace(cfg, kl_loss_coef=0.1))
    assert plain.ref is None and with_ref.ref is not None
    a, b = plain.compute(group_scored, old), with_ref.compute(group_scored, old)
    assert a.ref_logprobs is None and b.ref_logprobs is not None
    for name in ("rewards", "advantages", "returns", "old_logprobs"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert "kl_ref" not in a.stats and b.stats["kl_ref"] == pytest.approx(
        float((b.old_logprobs - b.ref_logprobs)[group_scored.rollout.response_mask].sum() / 4), rel=1e-5)
    assert a.stats["reference_seconds"] == 0.0


def test_reward_functions_alone_score_without_an_rm(group_scored):
    """No RM: the score is the weighted sum of the reward functions (a None adds nothing), nothing is
    reported as an RM score, and a scorer with neither an RM nor a weighted function is refused."""
    from rlhf_ray.ppo.scoring import RolloutScorer
    from rlhf_ray.reward.functions import load_eval_function, load_reward_functions

    fns = load_reward_functions([RewardFunctionConfig("task_rewards:words", 0.5),
                                 RewardFunctionConfig("task_rewards:token_count", 0.0)])
    scorer = RolloutScorer(None, reward_functions=fns, eval_function=load_eval_function("task_rewards:words"))
    assert not scorer.has_rm
    out = scorer.score(group_scored.rollout)
    words = np.array([len(r.split()) for r in RESPONSES], np.float32)
    np.testing.assert_allclose(out.scores, 0.5 * words, rtol=0, atol=1e-6)
    assert out.rm_scores is None and set(out.function_scores) == {"rewards/words", "rewards/token_count"}
    summary = scorer.summary(group_scored.rollout)
    assert "rm_score" not in summary and summary["eval_reward"] == pytest.approx(words.mean(), rel=1e-6)
    with pytest.raises(ValueError, match="no RM .* and no reward function of weight > 0"):
        RolloutScorer(None)
    with pytest.raises(ValueError, match="no reward function of weight > 0"):
        RolloutScorer(None, reward_functions=load_reward_functions([RewardFunctionConfig("task_rewards:words", 0.0)]))


def test_the_cli_without_rm_or_weighted_function_names_both(tmp_path, capsys):
    from rlhf_ray.cli import main

    assert main(["ppo", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "--rm-checkpoint" in err and "ppo.reward_functions" in err and "rlhf-ray train-rm" in err
    assert main(["ppo", "--rm-checkpoint", "none", f"output_dir={tmp_path}",
                 "ppo.reward_functions=[{name: 'task_rewards:words', weight: 0}]"]) == 2
    assert "no function of weight > 0" in capsys.readouterr().err


def test_a_skipped_pass_reports_no_throughput():
    """A stage that did not run (pi_old taken from the training forward: 0 s) has no tokens/s in the
    metrics line, rather than tokens over a vanishing time."""
    from rlhf_ray.ppo.metrics import iteration_metrics

    stats = {"gen_tokens": 300, "gen_seconds": 1.5, "total_tokens": 600, "score_seconds": 0.5,
             "evaluate_seconds": 0.0, "advantage_seconds": 0.25, "train_seconds": 2.0}
    m = iteration_metrics(3, stats, {}, {"sync_seconds": 0.1}, 1, 5.0)
    assert "evaluate_tokens_per_s" not in m
    assert m["rollout_tokens_per_s"] == 200.0 and m["score_tokens_per_s"] == 1200.0
    assert m["advantage_tokens_per_s"] == 2400.0 and m["learn_seconds"] == 2.25
