"""PPO stage: advantage (reward placement, truncation rule, KL penalty, GAE), learner (a step moves every
parameter and lowers the loss, weight export round-trips), scoring (chunk merge), and one Ray run with
real vLLM engines (weight sync into every engine, drift, versions, resizing, no bulk data in the driver).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (PROMPTS, RESPONSES, TRUNCATED, assert_scored_by_the_rm, batch_recorder, last_response_index,
                     make_rollout)
from ports import free_port

from rlhf_ray.data import synthetic
from rlhf_ray.data.prompts import load_prompt_task
from rlhf_ray.ppo.types import Rollout, ScoredRollout

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


# ---- helpers --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(policy_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy_dir)


@pytest.fixture(scope="module")
def scored(tokenizer):
    ro = make_rollout(tokenizer, PROMPTS, RESPONSES, TRUNCATED)
    scores = np.array([1.0, -0.5, 0.25, 2.0], np.float32)
    return ScoredRollout(ro, scores, scores, 0.01)


def ppo_cfg(test_config, **kw):
    return dataclasses.replace(test_config.ppo, **kw)


# ---- scoring --------------------------------------------------------------------------------------

def test_merge_pads_to_longest_chunk_and_keeps_oldest_version(tokenizer):
    from rlhf_ray.ppo.scoring import merge_rollouts

    a = make_rollout(tokenizer, PROMPTS[:2], RESPONSES[:2], TRUNCATED[:2], version=3, worker_id=0)
    b = make_rollout(tokenizer, PROMPTS[2:], RESPONSES[2:], TRUNCATED[2:], version=2, worker_id=1)
    m = merge_rollouts([a, b])
    T = max(a.input_ids.shape[1], b.input_ids.shape[1])
    assert m.input_ids.shape == (4, T) and m.rollout_logprobs.shape == (4, T)
    assert m.policy_version == 2 and m.worker_id == -1 and m.num_tokens == a.num_tokens + b.num_tokens
    assert m.prompts == PROMPTS and m.truncated.tolist() == TRUNCATED
    for rows, chunk in ((slice(0, 2), a), (slice(2, 4), b)):
        t = chunk.input_ids.shape[1]
        np.testing.assert_array_equal(m.response_mask[rows, :t], chunk.response_mask)
        assert not m.attention_mask[rows, t:].any()


def test_scorer_adds_weighted_reward_functions_to_the_rm_and_evaluates_with_its_own(tokenizer, rm_dir):
    """Sequence score = R + sum_f w_f f, a None leaving f out of that sample's sum (TRL's nansum); each
    function's values are kept under rewards/<name>; the held-out summary uses the eval function only."""
    from reference import rm_rewards

    from rlhf_ray.config import RewardFunctionConfig
    from rlhf_ray.models.reward import load_reward_model
    from rlhf_ray.ppo.scoring import RolloutScorer
    from rlhf_ray.reward.functions import load_eval_function, load_reward_functions

    chunks = [make_rollout(tokenizer, PROMPTS[:2], RESPONSES[:2], TRUNCATED[:2]),
              make_rollout(tokenizer, PROMPTS[2:], RESPONSES[2:], TRUNCATED[2:])]
    for c, products in zip(chunks, (["bulb", "blender"], [None, None])):
        c.columns = [{"product": p} if p else {} for p in products]
        c.sources = [f"p.jsonl:{i}" for i in range(len(products))]
    fns = (RewardFunctionConfig("task_rewards:words", 0.5), RewardFunctionConfig("task_rewards:mentions", 2.0),
           RewardFunctionConfig("task_rewards:token_count", 0.0))
    scorer = RolloutScorer(rm_dir, reward_functions=load_reward_functions(fns),
                           eval_function=load_eval_function("rlhf_ray.data.synthetic:gold"))
    out = scorer.score(*chunks)
    model, tok = load_reward_model(rm_dir)
    rm = np.array(rm_rewards(model, tok, PROMPTS, RESPONSES, max_length=64), np.float32)
    np.testing.assert_allclose(out.rm_scores, rm, rtol=1e-5, atol=1e-5)
    n_words = np.array([5, 10, 3, 2], np.float32)
    mentions = np.array([1.0, 0.0, np.nan, np.nan], np.float32)  # the last two records have no product
    np.testing.assert_array_equal(out.function_scores["rewards/words"], n_words)
    np.testing.assert_array_equal(out.function_scores["rewards/mentions"], mentions)
    np.testing.assert_array_equal(out.function_scores["rewards/token_count"],
                                  chunks[0].response_mask.sum(1).tolist() + chunks[1].response_mask.sum(1).tolist())
    np.testing.assert_allclose(out.scores, rm + 0.5 * n_words + 2.0 * np.nan_to_num(mentions), rtol=1e-6, atol=1e-5)
    s = scorer.summary(*chunks)
    gold = [synthetic.gold_reward(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert s["eval_reward"] == pytest.approx(np.mean(gold), abs=1e-9)
    assert s["rm_score"] == pytest.approx(float(rm.mean()), abs=1e-5)
    assert np.isnan(RolloutScorer(rm_dir).summary(*chunks)["eval_reward"])  # no eval function: NaN


def test_reward_functions_are_called_as_trl_calls_them(tokenizer, rm_dir):
    """By keyword: prompts, completions (text; an assistant message list for chats), completion_ids and
    one list per extra column of the prompt records (None where a record lacks it)."""
    import task_rewards

    from rlhf_ray.ppo.scoring import completion_ids, completions, function_values
    from rlhf_ray.reward.functions import RewardFunction

    ro = make_rollout(tokenizer, PROMPTS[:2], RESPONSES[:2], TRUNCATED[:2])
    chat = [{"role": "user", "content": "Write a review of the lamp."}]
    ro.prompts = [PROMPTS[0], chat]
    ro.columns, ro.sources = [{"product": "lamp", "id": 7}, {"product": "kettle"}], ["a:1", "a:2"]
    assert completions(ro) == [RESPONSES[0], [{"role": "assistant", "content": RESPONSES[1]}]]
    ids = completion_ids(ro)
    assert ids[0] == tokenizer(" " + RESPONSES[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    task_rewards.seen_columns.calls.clear()
    function_values(RewardFunction("task_rewards:seen_columns", 1.0, task_rewards.seen_columns), ro)
    # beside prompts, completions, completion_ids: the columns and TRL's trainer_state
    assert task_rewards.seen_columns.calls == [["id", "product", "trainer_state"]]
    got = {}

    def spy(prompts, completions, completion_ids, **columns):
        got.update(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        return [1.0, None]

    values = function_values(RewardFunction("x:spy", 1.0, spy), dataclasses.replace(ro, policy_version=3), max_steps=9)
    assert got == {"prompts": [PROMPTS[0], chat], "completions": completions(ro), "completion_ids": ids,
                   "product": ["lamp", "kettle"], "id": [7, None], "trainer_state": (3, 9)}
    assert got["trainer_state"].global_step == 3 and got["trainer_state"].max_steps == 9
    assert values[0] == 1.0 and np.isnan(values[1])

    async def judge(prompts, completions, **kwargs):  # an async function (an API judge) is awaited
        return [float(len(c if isinstance(c, str) else c[-1]["content"])) for c in completions]

    np.testing.assert_array_equal(function_values(RewardFunction("x:judge", 1.0, judge), ro),
                                  [len(RESPONSES[0]), len(RESPONSES[1])])


@pytest.mark.parametrize("name, message", [
    ("fails_on_once", "reward function task_rewards:fails_on_once raised ValueError: cannot score stories on sample 3 "
                      "(prompt record p.jsonl:4: 'tell me a story')"),
    ("too_few", "reward function task_rewards:too_few returned 3 values for 4 samples"),
    ("not_a_number", "reward function task_rewards:not_a_number returned 'high' for sample 0 (prompt record "
                     "p.jsonl:1); expected a finite number or None"),
])
def test_a_failing_reward_function_names_itself_and_the_record(tokenizer, rm_dir, name, message):
    from rlhf_ray.config import RewardFunctionConfig
    from rlhf_ray.ppo.scoring import RolloutScorer
    from rlhf_ray.reward.functions import RewardFunctionError, load_reward_functions

    ro = make_rollout(tokenizer, PROMPTS, RESPONSES, TRUNCATED)
    ro.sources = [f"p.jsonl:{i + 1}" for i in range(4)]
    fns = load_reward_functions([RewardFunctionConfig(f"task_rewards:{name}")])
    with pytest.raises(RewardFunctionError) as e:
        RolloutScorer(rm_dir, reward_functions=fns).score(ro)
    assert str(e.value) == message


# ---- advantage ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref_worker(policy_dir, test_config):
    from rlhf_ray.ppo.advantage import AdvantageWorker

    return AdvantageWorker(policy_dir, ppo_cfg(test_config))


def compute(worker, cfg, scored, old_logprobs, values):
    worker.cfg = cfg  # the reference model is shared; only the rule's settings vary
    from rlhf_ray.ops import FixedKLController

    worker.kl_ctl = FixedKLController(cfg.kl_coef)
    return worker.compute(scored, {"old_logprobs": old_logprobs, "values": values})


def test_sequence_reward_on_last_token_with_truncation_penalty(ref_worker, scored, test_config):
    cfg = ppo_cfg(test_config, kl_coef=0.0, truncation_penalty=0.75, whiten_advantages=False, gamma=1.0, lam=1.0)
    ro = scored.rollout
    ref = ref_worker.ref_logprobs(ro.input_ids, ro.attention_mask)
    values = np.where(ro.response_mask, 0.3, 0.0).astype(np.float32)
    batch = compute(ref_worker, cfg, scored, ref, values)
    last = last_response_index(ro.response_mask)
    expected = scored.scores - 0.75 * np.array(TRUNCATED, np.float32)  # [1.0, -0.5, -0.5, 1.25]
    rows = np.arange(len(last))
    np.testing.assert_allclose(batch.rewards[rows, last], expected, rtol=1e-6)
    others = ro.response_mask.copy()
    others[rows, last] = False
    assert np.all(batch.rewards[others] == 0) and np.all(batch.rewards[~ro.response_mask] == 0)
    # gamma = lam = 1: every response token's return is the sequence reward, advantage = return - V.
    np.testing.assert_allclose(batch.returns[ro.response_mask], np.repeat(expected, ro.response_mask.sum(1)),
                               rtol=1e-5)
    np.testing.assert_allclose(batch.advantages[ro.response_mask],
                               np.repeat(expected, ro.response_mask.sum(1)) - 0.3, rtol=1e-5, atol=1e-6)
    # (the reference scores the response tokens only: nothing reads the prompt's)
    np.testing.assert_allclose(batch.ref_logprobs[ro.response_mask], ref[ro.response_mask], atol=1e-6)
    assert np.all(batch.ref_logprobs[~ro.response_mask] == 0)
    assert batch.stats["kl_ref"] == pytest.approx(0.0, abs=1e-6)


def test_kl_penalty_and_gae_shapes(ref_worker, scored, test_config):
    cfg = ppo_cfg(test_config, kl_coef=0.2, truncation_penalty=0.0, whiten_advantages=True, gamma=1.0, lam=0.95)
    ro = scored.rollout
    mask = ro.response_mask
    ref = ref_worker.ref_logprobs(ro.input_ids, ro.attention_mask)
    old = np.where(mask, ref + 0.1, 0.0).astype(np.float32)  # log pi_old - log pi_ref = 0.1 per token
    rng = np.random.default_rng(0)
    values = np.where(mask, rng.normal(size=mask.shape), 0.0).astype(np.float32)
    batch = compute(ref_worker, cfg, scored, old, values)
    last = last_response_index(mask)
    rows = np.arange(len(last))
    expected = np.where(mask, -0.2 * 0.1, 0.0)
    expected[rows, last] += scored.scores
    np.testing.assert_allclose(batch.rewards, expected, atol=1e-6)
    assert batch.stats["kl_ref"] == pytest.approx(0.1 * mask.sum(1).mean(), rel=1e-4)
    for name in ("rewards", "advantages", "returns", "old_logprobs", "ref_logprobs", "old_values"):
        a = getattr(batch, name)
        assert a.shape == mask.shape and a.dtype == np.float32, name
    assert np.all(batch.advantages[~mask] == 0) and np.all(batch.returns[~mask] == 0)
    adv = batch.advantages[mask]
    assert adv.mean() == pytest.approx(0.0, abs=1e-5) and adv.std(ddof=1) == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_array_equal(batch.behaviour_logprobs, ro.rollout_logprobs)  # (the learner compares them)
    # returns = unwhitened advantages + values: check against a per-row loop reference of GAE, and the
    # whitened advantages against (A - mean) / sqrt(var + 1e-8) of those references over all tokens.
    raw = np.zeros(mask.shape)
    for b in range(len(rows)):
        idx = np.flatnonzero(mask[b])
        r, v = expected[b, idx], values[b, idx]
        a, ret = 0.0, np.zeros(len(idx))
        for j in reversed(range(len(idx))):
            nv = v[j + 1] if j + 1 < len(idx) else 0.0
            a = r[j] + 1.0 * nv - v[j] + 1.0 * 0.95 * a
            ret[j] = a + v[j]
        np.testing.assert_allclose(batch.returns[b, idx], ret, rtol=1e-4, atol=1e-5)
        raw[b, idx] = ret - v
    a = raw[mask]
    np.testing.assert_allclose(adv, (a - a.mean()) / np.sqrt(a.var(ddof=1) + 1e-8), atol=1e-5)


def test_reference_computed_ahead_gives_the_same_batch(ref_worker, scored, test_config):
    """The driver runs reference() as soon as a rollout is scored and hands it to compute()."""
    cfg = ppo_cfg(test_config, kl_coef=0.2)
    mask = scored.rollout.response_mask
    old = np.where(mask, -1.0, 0.0).astype(np.float32)
    values = np.where(mask, 0.5, 0.0).astype(np.float32)
    inline = compute(ref_worker, cfg, scored, old, values)
    ahead = ref_worker.reference(scored)
    np.testing.assert_array_equal(ahead["ref_logprobs"], inline.ref_logprobs)
    given = ref_worker.compute(scored, {"old_logprobs": old, "values": values}, ahead)
    for name in ("ref_logprobs", "rewards", "advantages", "returns"):
        np.testing.assert_array_equal(getattr(given, name), getattr(inline, name), err_msg=name)
    with pytest.raises(ValueError, match="do not match"):
        ref_worker.compute(scored, {"old_logprobs": old, "values": values},
                           {"ref_logprobs": ahead["ref_logprobs"][:, :-1], "seconds": 0.0})


def test_reference_logprobs_in_chunks_equal_the_whole_logits(ref_worker, policy_dir, scored):
    """The reference policy's logprobs a few tokens of logits at a time (learner.logits_chunk_tokens)
    equal those of its whole [B, T, V] logits on every real token, at the sampling temperature too;
    padding columns are 0."""
    from rlhf_ray.models.causal_lm import sequence_logprobs

    ro, model = scored.rollout, ref_worker.ref
    assert ref_worker.chunk_tokens == 1024  # the default, and the tiny model's logits are its head's
    ids, am = torch.tensor(ro.input_ids), torch.tensor(ro.attention_mask)
    real = ro.attention_mask.copy()
    real[:, 0] = False
    assert (~ro.attention_mask).any()  # the batch has padding
    for temperature in (1.0, 0.7):
        whole = sequence_logprobs(model, ids, am, temperature=temperature).numpy()
        chunked = sequence_logprobs(model, ids, am, batch_size=3, temperature=temperature, chunk_tokens=5).numpy()
        assert np.all(whole[real] < 0) and whole[real].mean() < -1  # real logprobs, not zeros
        np.testing.assert_allclose(chunked[real], whole[real], rtol=1e-5, atol=1e-5)
        assert np.all(chunked[~real] == 0)
    np.testing.assert_allclose(ref_worker.ref_logprobs(ro.input_ids, ro.attention_mask)[real],
                               sequence_logprobs(model, ids, am, temperature=ref_worker.cfg.temperature)[real],
                               rtol=1e-5, atol=1e-5)


def test_adaptive_kl_coefficient_moves_towards_target(policy_dir, scored, test_config):
    from rlhf_ray.ppo.advantage import AdvantageWorker

    cfg = ppo_cfg(test_config, kl_coef=0.1, adaptive_kl=True, target_kl=0.01, kl_horizon=10)
    worker = AdvantageWorker(policy_dir, cfg)
    ro = scored.rollout
    ref = worker.ref_logprobs(ro.input_ids, ro.attention_mask)
    old = np.where(ro.response_mask, ref + 0.1, 0.0).astype(np.float32)  # KL >> target
    b1 = worker.compute(scored, {"old_logprobs": old, "values": np.zeros_like(old)})
    b2 = worker.compute(scored, {"old_logprobs": old, "values": np.zeros_like(old)})
    assert b1.stats["kl_coef"] == pytest.approx(0.1)
    # error clipped to +0.2: coef *= 1 + 0.2 * B / horizon per batch
    assert b2.stats["kl_coef"] == pytest.approx(0.1 * (1 + 0.2 * 4 / 10))


# ---- learner --------------------------------------------------------------------------------------

@pytest.fixture
def learner_and_batch(policy_dir, scored, ref_worker, test_config):
    from rlhf_ray.ppo.learner import Learner

    # lr 1e-4: Adam's first step moves every weight by ~lr; at 1e-3 one step gives KL ~1.5 per token here.
    cfg = ppo_cfg(test_config, lr=1e-4, epochs=1, minibatch_size=len(PROMPTS), kl_coef=0.05, entropy_coef=0.01,
                  beta=0.1)
    learner = Learner(policy_dir, cfg, device="cpu")
    old = learner.evaluate(scored)
    ref_worker.cfg, ref_worker.kl_ctl.value = cfg, cfg.kl_coef
    return learner, ref_worker.compute(scored, old)


def test_evaluate_matches_a_transformers_recomputation(learner_and_batch, scored, policy_dir):
    from transformers import AutoModelForCausalLM

    learner, batch = learner_and_batch
    ro = scored.rollout
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ro.input_ids),
                       attention_mask=torch.tensor(ro.attention_mask).long()).logits
    lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, torch.tensor(ro.input_ids)[:, 1:, None])[..., 0].numpy()
    np.testing.assert_allclose(batch.old_logprobs[:, 1:][ro.response_mask[:, 1:]], lp[ro.response_mask[:, 1:]],
                               atol=1e-5)
    assert np.all(batch.old_values == 0)  # the value head starts at zero


def test_learner_and_reference_score_at_the_sampling_temperature(policy_dir, scored, ref_worker, test_config):
    """ppo.temperature T: pi_old, the reference and the entropy are those of softmax(logits / T), the
    distribution the engines sample from; the drift probe stays at temperature 1 (as the engine's side)."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.ppo.learner import Learner

    cfg = ppo_cfg(test_config, temperature=0.7)
    learner = Learner(policy_dir, cfg, device="cpu")
    ro = scored.rollout
    ids, am = torch.tensor(ro.input_ids), torch.tensor(ro.attention_mask)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am.long()).logits[:, :-1]
    m = ro.response_mask[:, 1:]

    def chosen(T):
        return torch.log_softmax(logits / T, -1).gather(-1, ids[:, 1:, None])[..., 0].numpy()[m]

    np.testing.assert_allclose(learner.evaluate(scored)["old_logprobs"][:, 1:][m], chosen(0.7), atol=1e-5)
    ref_worker.cfg, shared_cfg = cfg, ref_worker.cfg
    ref_lp = ref_worker.ref_logprobs(ro.input_ids, ro.attention_mask)
    ref_worker.cfg = shared_cfg
    np.testing.assert_allclose(ref_lp[:, 1:][m], chosen(0.7), atol=1e-5)
    assert np.abs(chosen(0.7) - chosen(1.0)).mean() > 0.05
    np.testing.assert_allclose(learner.probe(scored, n=4)[3][:, 1:][m[:4]], chosen(1.0)[:m[:4].sum()], atol=1e-5)
    _, _, ent = learner._forward(ids, am, with_entropy=True)
    p = torch.softmax(logits / 0.7, -1)
    expected = -(p * torch.log(p)).sum(-1)
    np.testing.assert_allclose(ent[:, 1:].detach().numpy()[m], expected.numpy()[m], rtol=1e-4, atol=1e-5)
    assert not ent.requires_grad  # entropy_coef 0: a statistic, no graph through the softmax


def test_train_step_changes_every_parameter_and_lowers_the_loss(learner_and_batch):
    learner, batch = learner_and_batch
    params = dict(learner.policy.named_parameters()) | {
        f"value_head.{k}": p for k, p in learner.value_head.named_parameters()}
    assert all(p.requires_grad for p in params.values())
    before = {k: p.detach().clone() for k, p in params.items()}
    loss0 = learner.loss(batch)
    stats = learner.train(batch)
    unchanged = [k for k, p in params.items() if torch.equal(p.detach(), before[k])]
    assert not unchanged, f"not updated by a train step: {unchanged}"
    assert stats["train_steps"] == 1 and stats["kl_old"] == pytest.approx(0.0, abs=1e-6)  # ratio 1 at pi_old
    assert stats["policy_version"] == 1 and learner.version == 1 and stats["version_lag"] == 0
    assert learner.loss(batch) < loss0 - 1e-4
    for _ in range(3):
        learner.train(batch)
    assert learner.loss(batch) < loss0 - 1e-3


def test_max_grad_norm_clips_what_the_optimizer_steps_on(learner_and_batch):
    """ppo.max_grad_norm: the gradient the optimizer steps on has that total norm when the raw one is
    larger; the reported grad_norm is the raw one (before clipping)."""
    learner, batch = learner_and_batch
    learner.cfg = dataclasses.replace(learner.cfg, max_grad_norm=1e-3)
    seen = []
    step = learner.optimizer.step

    def recording_step(*a, **kw):
        grads = [p.grad for g in learner.optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(*a, **kw)

    learner.optimizer.step = recording_step
    stats = learner.train(batch)
    assert stats["grad_norm"] > 1e-2 and seen == [pytest.approx(1e-3, rel=1e-4)]


def test_the_learners_memory_options_give_the_plain_loss_and_gradients(learner_and_batch, policy_dir):
    """The default learner (logits a chunk of 1024 tokens at a time) against the plain Hugging Face
    forward (learner.logits_chunk_tokens=0) and against chunks of 5 tokens with gradient checkpointing:
    the same loss (with the entropy bonus, beta's KL and the value loss) and the same gradient for every
    parameter (what the chunks keep for backward: tests/test_ops.py)."""
    from rlhf_ray.config import LearnerConfig
    from rlhf_ray.ppo.learner import Learner

    learner, batch = learner_and_batch
    rows = np.arange(len(batch.input_ids))

    def loss_and_grads(memory):
        m = Learner(policy_dir, learner.cfg, device="cpu", learner_cfg=memory)
        assert m.chunked == (memory.logits_chunk_tokens > 0)
        loss, _, _ = m._minibatch_loss(batch, rows)
        loss.backward()
        return float(loss.detach()), {k: p.grad.clone() for k, p in [*m.policy.named_parameters(),
                                                             *m.value_head.named_parameters()]}

    base_loss, base = loss_and_grads(LearnerConfig())
    for memory in (LearnerConfig(logits_chunk_tokens=0), LearnerConfig(logits_chunk_tokens=5, gradient_checkpointing=True)):
        loss, grads = loss_and_grads(memory)
        assert loss == pytest.approx(base_loss, abs=1e-6), memory
        for k, g in grads.items():
            torch.testing.assert_close(g, base[k], rtol=1e-4, atol=1e-6, msg=lambda msg: f"{memory} {k}: {msg}")


def test_truncated_importance_sampling_weights_tokens_by_the_old_to_behaviour_ratio(learner_and_batch):
    """ppo.tis_cap > 0: each token's surrogate is weighted by min(pi_old / pi_behaviour, cap).
    At pi_theta = pi_old every ratio is 1, so L_clip = masked_mean(w * A): the loss moves by exactly
    -(masked_mean(w * A) - masked_mean(A)) against plain PPO, and train() reports masked_mean(w), the
    share of capped tokens, the mean |log pi_behaviour - log pi_old| and KL(pi_behaviour || pi_old)."""
    learner, batch = learner_and_batch
    mask = batch.response_mask
    # The behaviour policy under-sampled the good tokens (A > 0: weight 3, capped at 2) and over-sampled
    # the bad ones (weight 0.5 or 0.75).
    rng = np.random.default_rng(0)
    w0 = np.where(mask, np.where(batch.advantages > 0, 3.0, rng.choice([0.5, 0.75], mask.shape)), 1.0)
    stale = dataclasses.replace(batch, behaviour_logprobs=(batch.old_logprobs - np.log(w0)).astype(np.float32))
    plain = learner.loss(stale)
    learner.cfg = dataclasses.replace(learner.cfg, tis_cap=2.0)
    w = np.minimum(w0, 2.0)
    adv = batch.advantages.astype(np.float64)
    expected_shift = -((w * adv)[mask].mean() - adv[mask].mean())
    assert abs(expected_shift) > 1e-2
    assert learner.loss(stale) - plain == pytest.approx(expected_shift, abs=1e-5)
    stats = learner.train(stale)  # one epoch, one minibatch: the whole batch
    assert stats["tis_weight"] == pytest.approx(w[mask].mean(), rel=1e-5)
    assert stats["tis_capped"] == pytest.approx((w0[mask] >= 2.0).mean(), abs=1e-6)
    log_w = np.log(w0[mask])  # log pi_old - log pi_behaviour
    assert stats["behaviour_logprob_gap"] == pytest.approx(np.abs(log_w).mean(), rel=1e-5)
    assert stats["mismatch_kl"] == pytest.approx((np.exp(log_w) - 1 - log_w).mean(), rel=1e-5)


def test_learner_checkpoint_goes_on_training_exactly(learner_and_batch, tmp_path):
    """A learner rebuilt from save_checkpoint trains on bit for bit like the one that saved it:
    value head, Adam moments, minibatch shuffling and version restored (a learner that skips
    load_checkpoint does not)."""
    from rlhf_ray.ppo.learner import LEARNER_STATE_FILE, Learner

    learner, batch = learner_and_batch
    learner.cfg = dataclasses.replace(learner.cfg, minibatch_size=2, epochs=2)  # the shuffle matters
    learner.train(batch)
    path = learner.save_checkpoint(tmp_path / "ckpt")
    modes = {p.relative_to(path).as_posix(): p.stat().st_mode & 0o777 for p in [Path(path), *Path(path).rglob("*")]}
    assert modes["."] == modes["value_head"] == 0o700 and modes["model.safetensors"] == 0o600, modes
    assert {m for k, m in modes.items() if (Path(path) / k).is_file()} == {0o600}, modes  # every file
    resumed, fresh = Learner(path, learner.cfg, device="cpu"), Learner(path, learner.cfg, device="cpu")
    assert resumed.load_checkpoint(path) == learner.version == 1
    stats = [m.train(batch) for m in (learner, resumed, fresh)]
    assert [s["policy_version"] for s in stats] == [2, 2, 1]

    def params(m):
        return [*m.policy.parameters(), *m.value_head.parameters()]

    for p, q in zip(params(learner), params(resumed)):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert max(float((p - q).detach().abs().max()) for p, q in zip(params(learner), params(fresh))) > 1e-6
    (Path(path) / LEARNER_STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=LEARNER_STATE_FILE):
        fresh.load_checkpoint(path)


def test_a_resumed_run_replaces_tensorboard_steps_after_its_checkpoint(tmp_path):
    """A run logged steps 1-5 and failed; resumed from its step-2 checkpoint (purge_step 3), the
    steps TensorBoard shows are the first run's 1-2 and the resumed run's 3-4. A fresh run there
    later (purge_step 0) shows only its own."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf_ray.reward.train import MetricsLog

    # TensorBoard reads a directory's event files in name order: the time in whole seconds, then a
    # per-process counter as text ("10" before "9"). Runs start seconds apart; writers made within one
    # second of each other by a process that made ten or more before would be read out of order.
    import time

    first = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        first.write(step, {"gold": float(step)})
    first.tb.close()
    time.sleep(1.05)
    resumed = MetricsLog(tmp_path / "metrics.jsonl", purge_step=3)
    for step in (3, 4):
        resumed.write(step, {"gold": 10.0 + step})
    resumed.tb.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("gold")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    # A fresh run in the same directory (metrics.jsonl rewritten; purge_step 0): only its own steps.
    time.sleep(1.05)
    fresh = MetricsLog(tmp_path / "metrics.jsonl", purge_step=0)
    fresh.write(1, {"gold": 100.0})
    fresh.tb.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("gold")] == [(1, 100.0)]


def test_weight_buckets_round_trip_the_policy_state_dict(learner_and_batch, tmp_path):
    from transformers import AutoModelForCausalLM

    learner, batch = learner_and_batch
    learner.train(batch)
    nbytes = sum(p.numel() * 4 for p in learner.policy.parameters())
    n = learner.open_sender("object_store", nbytes // 5)
    buckets = learner.send_weights(learner.version)
    assert len(buckets) >= 5 and n == len(buckets)
    merged = {k: v for b in buckets for k, v in b.items()}
    state = learner.policy.state_dict()
    assert sum(len(b) for b in buckets) == len(merged) and set(merged) == set(state)
    assert not any(k.startswith("value_head") for k in merged)
    for k, v in state.items():
        assert merged[k].dtype == np.float32
        np.testing.assert_array_equal(merged[k], v.numpy(), err_msg=k)
    saved = AutoModelForCausalLM.from_pretrained(learner.save(tmp_path / "policy"), dtype=torch.float32)
    for k, v in saved.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), merged[k], err_msg=k)
    from rlhf_ray.ppo.learner import VALUE_HEAD_FILE

    assert (tmp_path / "policy" / VALUE_HEAD_FILE).exists()
    assert [p.name for p in (tmp_path / "policy").glob("*.safetensors")] == ["model.safetensors"]  # for vLLM


def test_control_file_sets_the_number_of_workers(tmp_path):
    from rlhf_ray.ppo.pool import requested_workers as _requested_workers

    path, said = tmp_path / "rollout_workers", []
    assert _requested_workers(path, said.append) is None
    path.write_text("3\n")
    assert _requested_workers(path, said.append) == 3
    path.write_text("three")
    assert _requested_workers(path, said.append) is None and "expected an integer" in said[0]


def test_control_file_at_start_applies_to_a_continued_run_and_is_removed_for_a_fresh_one(tmp_path):
    from rlhf_ray.ppo.pool import workers_at_start as _workers_at_start

    path, said = tmp_path / "rollout_workers", []
    assert _workers_at_start(path, 2, True, said.append) == 2 and not said  # no file: the config's count
    path.write_text("3\n")
    assert _workers_at_start(path, 2, True, said.append) == 3 and path.exists()  # resumed / restarted
    assert str(path) in said[-1] and "not rollout.num_workers=2" in said[-1]
    for bad in ("0", "three"):
        path.write_text(bad)
        assert _workers_at_start(path, 2, True, said.append) == 2 and "ignoring" in said[-1]
    path.write_text("3\n")  # left by an earlier job: a fresh run neither uses nor keeps it
    assert _workers_at_start(path, 2, False, said.append) == 2 and not path.exists()
    assert said[-1].startswith("[ppo] starting fresh: removed " + str(path))
    assert _workers_at_start(path, 2, False, said.append) == 2


def test_a_run_that_does_not_fit_the_cluster_is_a_config_error_that_changes_nothing(ray_cluster, test_config,
                                                                                     tmp_path):
    """The CPU check comes before the output directory is touched: metrics.jsonl, the checkpoints'
    'latest' link and the control file stay as an earlier run left them."""
    from rlhf_ray.config import ConfigError
    from rlhf_ray.ppo.driver import run_ppo

    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "checkpoints" / "iter_000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").symlink_to("iter_000002")
    (tmp_path / "rollout_workers").write_text("1\n")
    cfg = dataclasses.replace(test_config, rollout=dataclasses.replace(test_config.rollout, num_workers=64),
                              placement="disaggregated")
    with pytest.raises(ConfigError, match=r"^rollout.num_workers=64 x rollout.cpus_per_worker=1.0 .* the Ray "
                                          r"cluster has 4"):
        run_ppo(cfg, "policy", "rm", tmp_path, log=lambda *_: None, task=load_prompt_task(cfg.ppo))
    # colocated (auto, on this one-node cluster): each actor asks a quarter CPU of one bundle
    with pytest.raises(ConfigError, match=r"^67 actors x 0.25 \(placement=colocated\): PPO needs 16.75 CPUs, the "
                                          r"Ray cluster has 4"):
        run_ppo(dataclasses.replace(cfg, placement="auto"), "policy", "rm", tmp_path, log=lambda *_: None,
                task=load_prompt_task(cfg.ppo))
    # Two learner ranks count too; a node resource no node has would leave the actors waiting forever.
    cfg = dataclasses.replace(test_config, rollout=dataclasses.replace(test_config.rollout, num_workers=2),
                              learner=dataclasses.replace(test_config.learner, num_workers=2))
    with pytest.raises(ConfigError, match=r"\+ learner.num_workers=2 .* PPO needs 4.5 CPUs, the Ray cluster has 4"):
        run_ppo(cfg, "policy", "rm", tmp_path, log=lambda *_: None, task=load_prompt_task(cfg.ppo))
    cfg = dataclasses.replace(test_config, rollout=dataclasses.replace(test_config.rollout, num_workers=1,
                                                                       node_resource="gpu_box"))
    with pytest.raises(ConfigError, match=r"^rollout.node_resource='gpu_box': no node of the Ray cluster has that "
                                          r"resource \(start the nodes meant for it with ray start "
                                          r"--resources='\{\"gpu_box\": 1\}'\)"):
        run_ppo(cfg, "policy", "rm", tmp_path, log=lambda *_: None, task=load_prompt_task(cfg.ppo))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert (tmp_path / "checkpoints" / "latest").is_symlink() and (tmp_path / "rollout_workers").exists()
    assert not (tmp_path / "tensorboard").exists()


def fake_checkpoint(root: Path, reference: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A checkpoint directory as the driver commits one (iteration 2), its policy only a config."""
    from transformers import LlamaConfig

    ckpt = root / "checkpoints" / "iter_000002"
    LlamaConfig(vocab_size=64, hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64).save_pretrained(ckpt / "policy")
    (ckpt / "trainer_state.json").write_text(json.dumps({
        "iteration": 2, "policy_version": 2, "kl_coef": 0.1, "before": {"eval_reward": 0.0}, "seed": seed,
        "reference_policy": str(reference), "run_checkpoints": ["iter_000002"]}))
    (ckpt / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(3)))
    (ckpt.parent / "latest").symlink_to(ckpt.name)
    return ckpt


def test_resume_point_refuses_another_seed_or_reference_policy(test_config, tmp_path):
    """Resuming must repeat the checkpoint's ppo.seed and reference policy (a policy of the same
    shape elsewhere too); refused before any actor starts, naming the field and the state file."""
    from transformers import LlamaConfig

    from rlhf_ray.config import ConfigError
    from rlhf_ray.ppo.checkpoints import resume_point

    ref, other = tmp_path / "ref", tmp_path / "other"
    for d in (ref, other):  # same shape as the checkpoint's policy
        LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64).save_pretrained(d)
    ckpt = fake_checkpoint(tmp_path / "run", ref, seed=3)
    state_file = str(ckpt / "trainer_state.json")

    def ppo(**kw):
        return dataclasses.replace(test_config.ppo, iterations=4, resume_from=str(tmp_path / "run"), **kw)

    got, state = resume_point(ppo(seed=3), ref)
    assert got == ckpt and state["iteration"] == 2 and [x["step"] for x in state["lines"]] == [0, 1, 2]
    assert resume_point(ppo(seed=3), os.path.relpath(ref))[0] == ckpt  # the same directory, spelled relative
    with pytest.raises(ConfigError) as e:
        resume_point(ppo(seed=0), ref)
    assert "ppo.seed=0" in str(e.value) and "ppo.seed=3" in str(e.value) and state_file in str(e.value)
    with pytest.raises(ConfigError) as e:
        resume_point(ppo(seed=3), other)
    assert f"reference policy is {other}" in str(e.value) and str(ref) in str(e.value) and state_file in str(e.value)
    assert resume_point(dataclasses.replace(test_config.ppo, resume_from=""), other) == (None, None)
    ref.rename(tmp_path / "moved")  # the run's files moved elsewhere: the recorded directory is gone
    assert resume_point(ppo(seed=3), tmp_path / "moved")[0] == ckpt


def test_read_checkpoint_reads_the_reference_config_through_transformers(tmp_path):
    """The reference policy's config comes from AutoConfig (a local directory or a hub name); one
    that cannot be read, or of another shape, is a ConfigError naming it."""
    from transformers import LlamaConfig

    from rlhf_ray.config import ConfigError
    from rlhf_ray.ppo.checkpoints import read_checkpoint

    ref = tmp_path / "ref"
    LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64).save_pretrained(ref)
    ckpt = fake_checkpoint(tmp_path / "run", ref)
    assert read_checkpoint(ckpt, ref)["iteration"] == 2
    assert read_checkpoint(ckpt, str(ref))["iteration"] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"the reference policy \\({empty}\\): cannot read its config.json"):
        read_checkpoint(ckpt, empty)
    wide = fake_checkpoint(tmp_path / "wide", ref, hidden_size=48)
    with pytest.raises(ConfigError, match=r"has hidden_size=48, the reference policy .* 32"):
        read_checkpoint(wide, ref)


def test_recommitting_a_checkpoint_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    from rlhf_ray.ppo import checkpoints

    root = tmp_path / "checkpoints"

    def learner_wrote(tag):
        tmp = root / ".tmp-iter_000004"
        (tmp / "policy").mkdir(parents=True)
        (tmp / "policy" / "weights").write_text(tag)
        return tmp

    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    final = root / "iter_000004"
    checkpoints.commit_checkpoint(learner_wrote("old"), final, {"iteration": 4}, tmp_path / "metrics.jsonl")
    assert (root / "latest").resolve() == final and (final / "policy" / "weights").read_text() == "old"
    # A resumed run redoes iteration 4 ('latest' names it): replaced, nothing left beside it.
    checkpoints.commit_checkpoint(learner_wrote("new"), final, {"iteration": 4}, tmp_path / "metrics.jsonl")
    assert (root / "latest").resolve() == final and (final / "policy" / "weights").read_text() == "new"
    assert sorted(p.name for p in root.iterdir()) == ["iter_000004", "latest"]
    assert json.loads((final / "trainer_state.json").read_text()) == {"iteration": 4}
    assert {p.stat().st_mode & 0o777 for p in final.rglob("*") if p.is_file()} == {0o600}  # the state too
    assert final.stat().st_mode & 0o777 == 0o700
    # Killed between moving the old one aside and moving the new one in: the old one is still whole.
    real_replace = os.replace

    def killed_at_the_move(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", killed_at_the_move)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.commit_checkpoint(learner_wrote("newer"), final, {"iteration": 4}, tmp_path / "metrics.jsonl")
    assert (root / ".old-iter_000004" / "policy" / "weights").read_text() == "new"
    # ... and resuming puts it back where 'latest' points.
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    assert checkpoints.find_checkpoint(tmp_path) == final  # (its checkpoints/latest)
    assert (final / "policy" / "weights").read_text() == "new" and not (root / ".old-iter_000004").exists()


def test_a_failing_cleanup_step_is_logged_not_raised():
    from rlhf_ray.ppo.driver import _cleanup

    said, ran = [], []
    _cleanup(said.append, "shutting down the Serve app 'rm'", lambda: 1 / 0)
    _cleanup(said.append, "closing", ran.append, "x")
    assert said == ["[ppo] cleanup: shutting down the Serve app 'rm' failed: ZeroDivisionError: division by zero"]
    assert ran == ["x"]


def test_only_deaths_and_lost_objects_count_as_failures_to_restart_from():
    import ray.exceptions as rex

    from rlhf_ray.ppo.driver import _system_failure

    died = rex.ActorDiedError()
    assert _system_failure(died) == "ActorDiedError: The actor died unexpectedly before finishing this task."
    # An actor task whose input came from the dead actor: the cause is followed, wrapped or not.
    wrapped = rex.RayTaskError("Learner.train", "tb", rex.RayTaskError("RolloutScorer.score", "tb", died))
    assert _system_failure(wrapped) == _system_failure(wrapped.as_instanceof_cause()) == _system_failure(died)
    assert _system_failure(rex.ObjectLostError("ab12", "owner", "")).startswith("ObjectLostError: ")
    # Code that raised (bad input, the drift check, a timeout) would only fail again.
    from rlhf_ray.ppo.sync import WeightSyncError

    init_failed = rex.ActorDiedError(rex.RayTaskError("Learner.__init__", "tb", ValueError("no model")))
    assert init_failed.actor_init_failed
    for err in (ValueError("bad"), WeightSyncError("drift"), rex.GetTimeoutError("slow"), init_failed):
        assert _system_failure(err) is None
        assert _system_failure(rex.RayTaskError("f", "tb", err).as_instanceof_cause()) is None


def test_restart_policy_of_max_failures(test_config, monkeypatch):
    """The retry loop around one start of the actors (the real restart runs in the resume test)."""
    import ray.exceptions as rex

    from rlhf_ray.ppo import driver

    calls = []

    def attempt(script):
        def run(cfg, policy_dir, rm_dir, out_dir, log, progress, **kw):
            calls.append(cfg.ppo.resume_from)
            step = script[len(calls) - 1]
            if isinstance(step, int):  # this start gets to checkpoint `step`, then an actor dies
                progress.update(checkpoint=f"ckpt{step}", iteration=step)
                raise rex.RayTaskError("Learner.train", "tb", rex.ActorDiedError()).as_instanceof_cause()
            if isinstance(step, Exception):
                raise step
            return step
        monkeypatch.setattr(driver, "_run_attempt", run)

    def run_with(max_failures, script, resume_from=""):
        calls.clear()
        attempt(script)
        ppo = dataclasses.replace(test_config.ppo, iterations=10, max_failures=max_failures, resume_from=resume_from)
        return driver.run_ppo(dataclasses.replace(test_config, ppo=ppo), "p", "r", "o", log=lambda *_: None,
                              task=load_prompt_task(ppo))

    assert run_with(2, [2, 6, "done"]) == "done" and calls == ["", "ckpt2", "ckpt6"]
    assert run_with(-1, [1, 2, 3, 4, "done"]) == "done" and len(calls) == 5
    with pytest.raises(rex.ActorDiedError):
        run_with(0, [2, "done"])
    with pytest.raises(rex.ActorDiedError):  # the limit counts failures, not starts
        run_with(1, [2, 4, "done"])
    assert calls == ["", "ckpt2"]
    with pytest.raises(rex.ActorDiedError):  # died after its last iteration's checkpoint: nothing to redo
        run_with(3, [10, "done"])
    assert calls == [""]
    with pytest.raises(ValueError, match="bad"):  # code that raised is not retried
        run_with(3, [ValueError("bad"), "done"])
    assert len(calls) == 1
    # No checkpoint of its own yet: the restart goes back to where the run began.
    assert run_with(1, [rex.ActorDiedError(), "done"], resume_from="given") == "done"
    assert calls == ["given", "given"]


# ---- on Ray, with vLLM engines --------------------------------------------------------------------

def test_ppo_on_ray(ray_cluster, test_config, policy_dir, rm_dir, tmp_path, monkeypatch):
    """3 iterations, 16 prompts, 2 -> 1 (the control file) -> 2 (the callback's pool) rollout workers:
    every engine gets every version with
    drift below the threshold, its logprobs move away from the initial policy, and the driver only
    ever fetches small dicts."""
    ray = ray_cluster
    from rlhf_ray.ppo import checkpoints, driver, metrics, pool, refs, sync
    from rlhf_ray.ppo.advantage import AdvantageWorker
    from rlhf_ray.ppo.transport import collective, object_store, shared_memory
    from rlhf_ray.ppo.types import TrainBatch

    # The driver's one ray.get is the size-checked refs.get_small (the transports' driver halves use it
    # too; the object store's engine half fetches nested bucket refs); record everything it fetches.
    assert [inspect.getsource(m).count("ray.get(") for m in (refs, driver, pool, sync, metrics, checkpoints,
                                                             shared_memory, collective, object_store)] \
        == [1, 0, 0, 0, 0, 0, 0, 0, 1]
    with pytest.raises(RuntimeError, match="bulk data"):
        refs.get_small(ray.put(np.zeros(1 << 18, np.float32)))
    fetched = []
    real_get_small = refs.get_small

    def recording_get_small(refs_, limit=refs.SMALL_RESULT_BYTES):
        value = real_get_small(refs_, limit)
        fetched.append(value)
        return value

    monkeypatch.setattr(refs, "get_small", recording_get_small)

    cfg = dataclasses.replace(
        test_config,
        ppo=ppo_cfg(test_config, iterations=3, prompts_per_iteration=16, max_new_tokens=8, minibatch_size=8,
                    lr=1e-3),
        rollout=dataclasses.replace(test_config.rollout, num_workers=2))
    reference = AdvantageWorker(policy_dir, cfg.ppo)  # initial-policy logprobs, to see the engines move
    seen = []

    def on_iteration(m, ctx):
        ids, attn, mask, learner_lp = ray.get(ctx.learner.probe.remote(ctx.scored, 4), timeout=120)
        engine = ray.get([w.logprobs_of.remote(ids, attn, mask) for w in ctx.pool.workers], timeout=120)
        versions = ray.get([w.__ray_call__.remote(lambda w: w.version) for w in ctx.pool.workers], timeout=120)
        initial = reference.ref_logprobs(ids, attn)
        seen.append({"versions": versions, "version": m["policy_version"],
                     "drift": [float(np.abs(e - learner_lp)[mask].max()) for e in engine],
                     "moved": [float(np.abs(e - initial)[mask].max()) for e in engine]})
        if ctx.iteration == 1:  # an operator's resize: a number in the control file
            (tmp_path / "rollout_workers").write_text("1\n")
        elif ctx.iteration == 2:  # a program's: the callback's pool
            (tmp_path / "rollout_workers").unlink()
            ctx.pool.set_num_workers(2)

    lines = []
    result = driver.run_ppo(cfg, policy_dir, rm_dir, tmp_path, log=lambda x: (lines.append(x), print(x)),
                            on_iteration=on_iteration, bucket_bytes=256 << 10)

    assert [h["num_workers"] for h in result.history] == [2, 1, 2]
    resized = [x for x in lines if "rollout workers ->" in x]
    assert resized == [f"[ppo] rollout workers -> 1 ({tmp_path / 'rollout_workers'})"]
    assert [s["version"] for s in seen] == [1, 2, 3]
    for s in seen:  # every engine holds the learner's latest weights
        assert s["versions"] == [s["version"]] * len(s["versions"])
        assert max(s["drift"]) <= 1e-3  # float32 engines (they agree with the learner to ~1e-6)
        assert min(s["moved"]) > 1e-3
    assert len(seen[2]["versions"]) == 2  # the worker added after iteration 2 was synced too
    for i, h in enumerate(result.history):
        assert h["data_version"] == i and h["version_lag"] == 0 and h["drift"] <= h["drift_limit"] == 1e-3
        assert h["batch_size"] == 16 and h["reward"] == pytest.approx(h["rm_score"], abs=1e-6)  # no penalty here
        assert h["eval_policy_version"] == h["policy_version"]
        assert h["rm_truncated_frac"] == 0.0  # (the synthetic task's pairs fit the RM's 64 tokens)
    assert result.after["eval_reward"] == result.history[-1]["eval_reward"]
    # rollout.weight_sync=auto on one node: the engines read shared memory, removed at the end.
    assert {h["sync_mode"] for h in result.history} == {"shared_memory"}
    # One pair of slot files (the worker added mid-run attaches to it, awaited: its spec comes back).
    specs = {tuple(x["paths"]): x for x in fetched if isinstance(x, dict) and "placements" in x}
    assert len(specs) == 1 and not any(os.path.exists(p) for p in next(iter(specs.values()))["paths"])

    # The driver fetched only small things: no rollout, scored batch, train batch or weight bucket.
    bulk = (Rollout, ScoredRollout, TrainBatch)
    flat = [v for x in fetched for v in (x if isinstance(x, list) else [x])]
    assert flat and not any(isinstance(v, bulk) for v in flat)
    assert not any(isinstance(v, dict) and any(k.startswith("model.") for k in v) for v in flat)

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3]
    assert (tmp_path / "ppo.png").stat().st_size > 1000
    assert (result.policy_dir / "model.safetensors").exists()


def test_ppo_deploys_the_rm_app_it_needs_and_removes_it(ray_cluster, test_config, policy_dir, rm_dir, tmp_path):
    """ppo.rm_scoring=serve with no app "rm" on the cluster: PPO deploys one from the RM directory for
    the run, scores through it exactly as in process (every sample's reward), and removes it at the end."""
    from ray import serve

    from rlhf_ray.ppo.driver import run_ppo
    from rlhf_ray.reward.service import shutdown_rm

    port = free_port()
    ppo = ppo_cfg(test_config, iterations=2, prompts_per_iteration=8, max_new_tokens=8, minibatch_size=8,
                  checkpoint_every=0)
    cfg = dataclasses.replace(test_config, ppo=ppo,
                              serve=dataclasses.replace(test_config.serve, port=port, num_cpus=0.25),
                              rollout=dataclasses.replace(test_config.rollout, num_workers=1))
    lines, (on_iteration, batches) = [], batch_recorder()
    try:
        via = run_ppo(dataclasses.replace(cfg, ppo=dataclasses.replace(ppo, rm_scoring="serve")), policy_dir,
                      rm_dir, tmp_path / "serve", log=lines.append, eval_every=0, on_iteration=on_iteration)
        assert "rm" not in serve.status().applications
    finally:
        shutdown_rm()  # Serve itself, so that later tests start it on their own port
    said = [x for x in lines if "Serve app 'rm'" in x]
    assert said == [f"[ppo] RM scores through the Serve app 'rm': deployed at http://127.0.0.1:{port}"], lines
    assert len(via.history) == len(batches) == 2
    assert_scored_by_the_rm(batches, rm_dir, test_config.rm.max_length)


def test_ppo_raises_the_gold_reward(ray_cluster, test_config, policy_dir, rm_dir, tmp_path):
    """What PPO is for: 10 iterations of the test-size RM's reward lift the held-out GOLD reward (the
    synthetic task's hidden score, never seen in training) of samples clearly above the SFT policy's,
    with the KL to the reference bounded; the RM reward rises with it."""
    from rlhf_ray.ppo.driver import run_ppo

    cfg = dataclasses.replace(
        test_config, ppo=ppo_cfg(test_config, iterations=10, prompts_per_iteration=64, eval_prompts=64),
        rollout=dataclasses.replace(test_config.rollout, num_workers=1))
    result = run_ppo(cfg, policy_dir, rm_dir, tmp_path, log=lambda *_: None, eval_every=0)
    # Measured (seeded): +0.247 -> +0.488. A policy that does not learn stays within ~0.1 of where it began.
    assert result.eval_reward_after > result.eval_reward_before + 0.15, (result.eval_reward_before,
                                                                       result.eval_reward_after)
    assert result.after["eval_rm_score"] > result.before["eval_rm_score"]
    assert result.history[-1]["kl_ref"] < 5.0


@pytest.mark.parametrize("weight_sync,plain,mode", [("shared_memory", True, "shared_memory"),
                                                    ("auto", False, "reload")])
def test_ppo_one_step_off_on_ray(ray_cluster, test_config, policy_dir, rm_dir, tmp_path, weight_sync, plain, mode):
    """Async mode: rollout t+1 overlaps learning on t, so every batch after the first is one version
    old. The engine samples from one shared-memory slot while the learner writes the other; or, with
    packed CPU weights (rollout.cpu_plain_weights=false), "auto" falls back to the object store and
    vLLM's reloading path, and says why."""
    from rlhf_ray.ppo.driver import run_ppo

    cfg = dataclasses.replace(
        test_config,
        ppo=ppo_cfg(test_config, iterations=3, prompts_per_iteration=16, max_new_tokens=8, minibatch_size=16),
        rollout=dataclasses.replace(test_config.rollout, num_workers=1, async_one_step_off=True,
                                    weight_sync=weight_sync, cpu_plain_weights=plain))
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, tis_cap=2.0))  # decoupled PPO
    if mode == "reload":  # and a critic-free estimator with the derivation's beta: 8 prompts x 2 samples,
        # GRPO's sequence-mean loss
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, advantage_estimator="rloo", samples_per_prompt=2,
                                                               prompts_per_iteration=8, beta=0.1, loss_type="grpo"))
    lines, kill, killed = [], None, []
    if mode == "reload":  # ... which loses its rollout worker after iteration 2 and restarts from there
        kill, killed = worker_killer(after=2)
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, max_failures=1, checkpoint_every=1))
    result = run_ppo(cfg, policy_dir, rm_dir, tmp_path, log=lines.append, eval_every=0, on_iteration=kill)
    if mode == "reload":
        assert_critic_free(lines, result, "rloo", 2, batch=16)
        assert_restarted_once(lines, killed, 2)
        assert all(h["kl_old"] > 0 for h in result.history[1:])  # beta's KL(pi_old || pi_theta) is measured
    assert {h["sync_mode"] for h in result.history} == {mode}
    said = [x for x in lines if "weight sync:" in x]
    assert len(said) == (2 if killed else 1) and said[0].split("weight sync: ")[1].startswith(
        "shared memory" if mode == "shared_memory" else "object store (the engines keep packed weights"), said
    # Every batch one version old but a run's first: the restarted run's first batch (iteration 3) is
    # sampled from its checkpoint's weights.
    fresh = [0, 2] if killed else [0]
    assert [h["data_version"] for h in result.history] == ([0, 0, 2] if killed else [0, 0, 1])
    assert [h["version_lag"] for h in result.history] == ([0, 1, 0] if killed else [0, 1, 1])
    assert [h["policy_version"] for h in result.history] == [1, 2, 3]
    # The engine's logprobs are pi_old's for a fresh batch, one update older for the others.
    gaps = [h["behaviour_logprob_gap"] for h in result.history]
    assert max(gaps[i] for i in fresh) < 1e-4 and gaps[1] > 10 * max(max(gaps[i] for i in fresh), 1e-5), gaps
    for i, h in enumerate(result.history):
        assert (h["tis_weight"] == pytest.approx(1.0, abs=1e-4)) == (i in fresh), (i, h["tis_weight"])
    assert all(h["drift"] <= h["drift_limit"] == 1e-3 for h in result.history)
    assert "eval_reward" not in result.history[0] and result.after["eval_policy_version"] == result.history[-1]["policy_version"]


def test_ppo_resumes_from_a_checkpoint_as_if_never_stopped(ray_cluster, test_config, policy_dir, rm_dir, tmp_path):
    """Run A: 4 iterations, a checkpoint every 2. Run B resumes from A's iteration-2 checkpoint:
    its iterations 3-4 repeat A's (same prompts, seeds, weights, optimizer) and it ends on A's
    weights. Run C loses its rollout worker and, with ppo.max_failures, restarts from its own
    checkpoint by itself, also ending as A. Bad resume input is refused before any actor starts,
    naming the file."""
    from safetensors.numpy import load_file

    from rlhf_ray.ppo.checkpoints import find_checkpoint
    from rlhf_ray.ppo.driver import run_ppo

    # An adaptive KL coefficient (moving every batch) must come back from the checkpoint too.
    ppo = ppo_cfg(test_config, iterations=4, prompts_per_iteration=16, max_new_tokens=8, minibatch_size=8,
                  lr=1e-3, checkpoint_every=2, adaptive_kl=True, target_kl=0.05, kl_horizon=20)
    cfg = dataclasses.replace(test_config, ppo=ppo,
                              rollout=dataclasses.replace(test_config.rollout, num_workers=1))
    a = run_ppo(cfg, policy_dir, rm_dir, tmp_path / "a", log=print, eval_every=0)
    ckpts = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_000002", "iter_000004", "latest"]
    assert find_checkpoint(tmp_path / "a") == (ckpts / "iter_000004").resolve()

    lines = []
    partial = tmp_path / "b" / "checkpoints" / ".tmp-iter_000003" / "policy"  # as a crash mid-save leaves it
    partial.mkdir(parents=True)
    resumed = dataclasses.replace(cfg, ppo=dataclasses.replace(ppo, resume_from=str(ckpts / "iter_000002")))
    b = run_ppo(resumed, policy_dir, rm_dir, tmp_path / "b", log=lines.append, eval_every=0)
    assert any("resuming from" in x and "iteration 2" in x for x in lines)
    assert [h["iteration"] for h in b.history] == [1, 2, 3, 4]
    assert [h["policy_version"] for h in b.history[2:]] == [3, 4]
    assert [h["data_version"] for h in b.history[2:]] == [2, 3]
    assert b.eval_reward_before == a.eval_reward_before
    assert len({h["kl_coef"] for h in a.history}) == 4  # it moved at every batch
    for ha, hb in zip(a.history[2:], b.history[2:]):
        for k in ("reward", "rm_score", "kl_ref", "kl_coef", "policy_loss", "value_loss", "entropy"):
            assert hb[k] == pytest.approx(ha[k], rel=1e-4, abs=1e-6), k
    wa, wb = (load_file(str(r.policy_dir / "model.safetensors")) for r in (a, b))
    assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) < 1e-5
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]
    assert (tmp_path / "b" / "checkpoints" / "latest").resolve().name == "iter_000004"
    assert not partial.parent.exists()

    # Run C: A again with ppo.max_failures=1 and a checkpoint every iteration (the newest two kept), its
    # rollout worker killed after iteration 3. The run restarts its actors from iteration 3's checkpoint
    # and ends as A did.
    import ray

    killed, lines = [], []

    def kill_worker(m, ctx):
        if m["iteration"] == 3 and not killed:
            killed.append(ctx.pool.workers[0])
            ray.kill(ctx.pool.workers[0])

    c = run_ppo(dataclasses.replace(cfg, ppo=dataclasses.replace(ppo, max_failures=1, checkpoint_every=1)),
                policy_dir, rm_dir, tmp_path / "c", log=lines.append, eval_every=0, on_iteration=kill_worker)
    restarts = [x for x in lines if "restarting the PPO actors" in x]
    assert killed and len(restarts) == 1 and "iter_000003 (failure 1" in restarts[0], lines
    ckpts_c = tmp_path / "c" / "checkpoints"
    assert sorted(p.name for p in ckpts_c.iterdir()) == ["iter_000003", "iter_000004", "latest"]
    state = json.loads((ckpts_c / "iter_000004" / "trainer_state.json").read_text())
    assert state["run_checkpoints"] == ["iter_000003", "iter_000004"]
    assert state["kl_coef"] == pytest.approx(a.history[3]["kl_coef_next"], rel=1e-6)
    assert any(x.startswith("[ppo] ActorDiedError (RolloutWorker): ") for x in lines), lines
    assert [h["iteration"] for h in c.history] == [1, 2, 3, 4]
    for ha, hc in zip(a.history, c.history):
        for k in ("reward", "rm_score", "kl_ref", "kl_coef", "policy_loss", "value_loss", "entropy"):
            assert hc[k] == pytest.approx(ha[k], rel=1e-4, abs=1e-6), k
    wc = load_file(str(c.policy_dir / "model.safetensors"))
    assert max(float(np.abs(wa[k] - wc[k]).max()) for k in wa) < 1e-5
    steps = [json.loads(x)["step"] for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]

    # Bad input: nothing to go on with, a non-checkpoint, a damaged state file.
    with pytest.raises(ValueError, match="at iteration 4; set ppo.iterations above 4"):
        run_ppo(dataclasses.replace(cfg, ppo=dataclasses.replace(ppo, resume_from=str(tmp_path / "a"))),
                policy_dir, rm_dir, tmp_path / "c")
    with pytest.raises(ValueError, match="is not a PPO checkpoint"):
        find_checkpoint(tmp_path / "b" / "policy")
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpts / "iter_000002", bad)
    (bad / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match=str(bad / "trainer_state.json") + ": not valid JSON"):
        run_ppo(dataclasses.replace(cfg, ppo=dataclasses.replace(ppo, resume_from=str(bad))),
                policy_dir, rm_dir, tmp_path / "c")


def test_ppo_on_a_users_prompt_file_with_chats_and_reward_functions(ray_cluster, test_config, policy_dir, rm_dir,
                                                                    tmp_path):
    """A user's task end to end on Ray: a JSONL prompt file (chats rendered by a Jinja template, and
    plain text) with a column the reward functions read, a held-out file, programmatic rewards from a
    module outside the package (shipped to the scorer actor), an eval function. The iterations draw
    the prompt stream's batches; a run resumed from iteration 2's checkpoint draws the same prompts for
    iteration 3 (none repeated or skipped) and the same metrics."""
    import ray
    from reference import CHAT_TEMPLATE

    from rlhf_ray.config import RewardFunctionConfig
    from rlhf_ray.data.prompts import PromptStream, read_prompts
    from rlhf_ray.ppo.driver import run_ppo

    products = sorted(synthetic.PRODUCTS)
    lines = [json.dumps({"prompt": [{"role": "user", "content": synthetic.make_prompt(p)}] if i % 2 else
                         synthetic.make_prompt(p), "product": synthetic.PRODUCTS[p][0]})
             for i, p in enumerate(products + products[:4])]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "held.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    ppo = ppo_cfg(test_config, iterations=3, prompts_per_iteration=8, max_new_tokens=8, minibatch_size=8,
                  checkpoint_every=1, eval_every=2, prompts_path=str(tmp_path / "prompts.jsonl"),
                  eval_prompts_path=str(tmp_path / "held.jsonl"), eval_prompts=0,
                  reward_functions=(RewardFunctionConfig("task_rewards:mentions", 1.0),
                                    RewardFunctionConfig("task_rewards:words", 0.0)),
                  eval_reward="rlhf_ray.data.synthetic:gold")
    cfg = dataclasses.replace(test_config, ppo=ppo, data=dataclasses.replace(
        test_config.data, chat_template=str(tmp_path / "chat.jinja")),
        rollout=dataclasses.replace(test_config.rollout, num_workers=2))
    seen: dict[str, list] = {"a": [], "b": []}
    scored: list = []

    def recorder(run):
        def on_iteration(m, ctx):
            batch = ray.get(ctx.scored, timeout=60)
            seen[run].append(batch.rollout.prompts)
            scored.append(batch) if run == "a" else None
        return on_iteration

    log = []
    a = run_ppo(cfg, policy_dir, rm_dir, tmp_path / "a", log=log.append, on_iteration=recorder("a"))
    assert any(f"12 training prompts from {tmp_path / 'prompts.jsonl'} (6 chats), 4 held-out prompts" in x
               for x in log), log
    stream = PromptStream(read_prompts(str(tmp_path / "prompts.jsonl")), 8, ppo.seed)
    assert seen["a"] == [[r.prompt for r in stream.batch(it)] for it in range(3)]
    assert sorted(map(json.dumps, seen["a"][0] + seen["a"][1][:4])) == sorted(
        json.dumps(json.loads(x)["prompt"]) for x in lines)  # the first epoch: every prompt once
    import task_rewards

    from rlhf_ray.ppo.scoring import completions

    for h, batch in zip(a.history, scored):
        assert set(h) >= {"rewards/mentions", "rewards/words"} and ("eval_reward" in h) == (h["iteration"] != 1)
        # each function's metric: its mean over the batch, recomputed from the batch's responses and columns
        ro = batch.rollout
        products = [c["product"] for c in ro.columns]
        assert h["rewards/mentions"] == pytest.approx(np.mean(task_rewards.mentions(
            ro.prompts, completions(ro), product=products)), abs=1e-6)
        assert h["rewards/words"] == pytest.approx(np.mean(task_rewards.words(ro.prompts, completions(ro), None)),
                                                   abs=1e-5)
        # reward = RM + 1.0 x mentions (every record has a product; words has weight 0)
        assert h["reward"] == pytest.approx(h["rm_score"] + h["rewards/mentions"], abs=1e-5)
    assert a.eval_reward_name == "rlhf_ray.data.synthetic:gold" and a.eval_reward_before == a.before["eval_reward"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(a.policy_dir).chat_template == CHAT_TEMPLATE

    resumed = dataclasses.replace(cfg, ppo=dataclasses.replace(
        ppo, resume_from=str(tmp_path / "a" / "checkpoints" / "iter_000002")))
    b = run_ppo(resumed, policy_dir, rm_dir, tmp_path / "b", log=lambda *_: None, on_iteration=recorder("b"))
    assert seen["b"] == seen["a"][2:]
    for ha, hb in zip(a.history[2:], b.history[2:]):
        for k in ("reward", "rm_score", "rewards/mentions", "kl_ref", "policy_loss"):
            assert hb[k] == pytest.approx(ha[k], rel=1e-4, abs=1e-6), k


def test_a_bad_prompt_file_or_reward_function_stops_the_cli_before_ray(policy_dir, rm_dir, tmp_path, capsys):
    """Checked in the driver before Ray starts, exit status 2, naming the file and line or the field."""
    import time

    from rlhf_ray.cli import main

    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    base = [f"--policy={policy_dir}", f"--rm-checkpoint={rm_dir}", f"output_dir={tmp_path / 'out'}"]
    t = time.perf_counter()
    assert main(["ppo", *base, f"ppo.prompts_path={tmp_path / 'p.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert f"rlhf-ray ppo: {tmp_path / 'p.jsonl'}:2: field 'prompt' must be a string or a non-empty list" in err
    assert main(["ppo", *base, "ppo.reward_functions=[no_such_module:f]"]) == 2
    err = capsys.readouterr().err
    assert "ppo.reward_functions[0].name: cannot import module 'no_such_module'" in err
    assert main(["ppo", *base, "ppo.reward_functions=[task_rewards:nope]"]) == 2
    assert "has no function 'nope'" in capsys.readouterr().err
    assert main(["ppo", *base, "ppo.max_prompt_tokens=120"]) == 2
    assert "ppo.max_prompt_tokens + ppo.max_new_tokens: 120 + 16 tokens do not fit" in capsys.readouterr().err
    assert time.perf_counter() - t < 30  # no Ray start (4-7 s each) among them
    assert not (tmp_path / "out" / "ppo").exists()


def test_engines_resumed_at_an_odd_version_read_the_slot_the_next_write_spares(ray_cluster, test_config, policy_dir):
    """Shared memory, resumed at version 1: the engine attaches to slot 1, so the learner's first
    write (version 2, slot 0, which waits for nothing: one-step-off has rollouts queued on the engine)
    leaves the weights the engine samples untouched until the switch."""
    ray = ray_cluster
    from rlhf_ray.ppo import actors
    from rlhf_ray.ppo.pool import RolloutPool
    from rlhf_ray.ppo.transport.shared_memory import SharedMemoryTransport

    rc = dataclasses.replace(test_config.rollout, num_workers=1, weight_sync="shared_memory")
    learner = actors.start_learner(policy_dir, test_config.ppo)
    pool, link = RolloutPool(policy_dir, rc, seed=0, version=1), None
    try:
        pool.set_num_workers(1)
        pool.wait_ready()
        link, why = SharedMemoryTransport.attach(pool, learner, ray.get(learner.weight_meta.remote(), timeout=120),
                                                 required=True)
        assert why is None and link.slot == (1, 1)
        engine = pool.workers[0]
        ids = ray.get(engine.encode_prompts.remote(synthetic.prompts(2, seed=5)), timeout=120)
        T = max(len(x) for x in ids)
        input_ids = np.array([x + [0] * (T - len(x)) for x in ids])
        attn = np.array([[t < len(x) for t in range(T)] for x in ids])
        resp = attn & (np.arange(T) >= 2)

        def engine_lp():
            return ray.get(engine.logprobs_of.remote(input_ids, attn, resp), timeout=120)

        before = engine_lp()
        ray.get(learner.__ray_call__.remote(lambda lr: [p.data.mul_(0.5) for p in lr.policy.parameters()]),
                timeout=120)
        written = learner.send_weights.remote(2)  # version 2 into slot 0, as the link's send writes it
        assert ray.get(written, timeout=120)["slot"] == 0
        np.testing.assert_array_equal(engine_lp(), before)  # slot 1 untouched
        infos = ray.get([engine.update_weights.remote(written, 2)], timeout=120)
        assert [i["version"] for i in infos] == [2]
        assert float(np.abs(engine_lp() - before)[resp].max()) > 1e-2  # the switch takes the new weights
    finally:
        if link is not None:
            link.close()
        pool.shutdown()
        ray.kill(learner)


def test_ppo_with_bfloat16_engines(ray_cluster, test_config, policy_dir, rm_dir, tmp_path):
    """rollout.dtype=bfloat16 (what GPU engines run by default): syncs go through the object store in
    bfloat16, half the float32 bytes, and the drift check uses the bfloat16 limit (0.5), since such an
    engine differs from the float32 learner by more than float32's 1e-3 even with the same weights."""
    from rlhf_ray.ppo.driver import run_ppo
    from rlhf_ray.ppo.learner import Learner

    # (and REINFORCE++ on Ray, one step off, losing its rollout worker after iteration 2: restarted)
    cfg = dataclasses.replace(
        test_config,
        ppo=ppo_cfg(test_config, iterations=3, prompts_per_iteration=8, max_new_tokens=8, minibatch_size=8,
                    checkpoint_every=1, max_failures=1, advantage_estimator="reinforce_plus_plus"),
        rollout=dataclasses.replace(test_config.rollout, num_workers=1, dtype="bfloat16", async_one_step_off=True))
    lines = []
    kill, killed = worker_killer(after=2)
    result = run_ppo(cfg, policy_dir, rm_dir, tmp_path, log=lines.append, eval_every=0, on_iteration=kill)
    assert_critic_free(lines, result, "reinforce_plus_plus", 1, batch=8)
    assert_restarted_once(lines, killed, 2)
    assert [h["version_lag"] for h in result.history] == [0, 1, 0]
    assert all(h["kl_coef"] == cfg.ppo.kl_coef > 0 for h in result.history)  # its KL: in the token rewards
    float32_bytes = sum(a.nbytes for a in Learner(policy_dir, cfg.ppo, device="cpu").state_dict().values())
    said = [x for x in lines if "weight sync:" in x]
    assert said == 2 * ["[ppo] weight sync: object store (the engines compute in bfloat16 (shared memory holds float32 "
                        "weights)), bfloat16 weights; drift limit 0.5 (bfloat16 engines)"], said  # (and restarted)
    for h in result.history:
        assert h["sync_bytes"] * 2 == float32_bytes
        assert 1e-3 < h["drift"] <= h["drift_limit"] == 0.5
        assert h["behaviour_logprob_gap"] > 1e-4  # bfloat16 samples are off-policy for the float32 learner
    assert [h["policy_version"] for h in result.history] == [1, 2, 3] and result.after["eval_policy_version"] == 3


def test_drift_past_the_threshold_stops_the_run_loudly(ray_cluster, test_config, policy_dir, rm_dir, tmp_path):
    """rollout.max_logprob_drift below what fp32 engine and learner agree to (~1e-6 here): the drift
    check after the first sync fails the run with WeightSyncError naming worker and version (in
    one-step-off mode, where the probe's answer comes after the next rollout), and the shared-memory
    weight files are removed."""
    import glob
    import re

    from rlhf_ray.ppo.driver import run_ppo
    from rlhf_ray.ppo.sync import WeightSyncError

    cfg = dataclasses.replace(
        test_config,
        ppo=ppo_cfg(test_config, iterations=3, prompts_per_iteration=8, max_new_tokens=8, minibatch_size=8,
                    checkpoint_every=0),
        rollout=dataclasses.replace(test_config.rollout, num_workers=1, async_one_step_off=True,
                                    max_logprob_drift=1e-12))
    lines = []
    with pytest.raises(WeightSyncError, match=r"iteration 1: rollout worker 0 logprobs differ from the learner's "
                                              r"by .* > rollout.max_logprob_drift=1e-12 after syncing version 1"):
        run_ppo(cfg, policy_dir, rm_dir, tmp_path, log=lines.append, eval_every=0)
    slots = [m.group(1) for x in lines for m in [re.search(r"in (/dev/shm/\S+)slot\{0,1\}", x)] if m]
    assert len(slots) == 1 and not glob.glob(slots[0] + "*")
    assert not any(x.startswith("[ppo] it ") for x in lines)  # no iteration was reported as done


def test_cli_ppo_runs_and_resumes(ray_cluster, policy_dir, rm_dir, tmp_path, capsys):
    """`rlhf-ray ppo` as a user types it: the stage runs from the CLI's overrides, prints the before/after
    table, writes metrics, plot and a policy that transformers loads; the same command with a higher
    ppo.iterations and ppo.resume_from=<output_dir>/ppo goes on from its checkpoint. A wrong
    --rm-checkpoint is refused by name before Ray work starts."""
    import json

    from transformers import AutoModelForCausalLM

    from rlhf_ray.cli import main

    args = ["ppo", "--policy", str(policy_dir), "--rm-checkpoint", str(rm_dir), f"output_dir={tmp_path}",
            "ppo.prompts_per_iteration=8", "ppo.max_new_tokens=8", "ppo.minibatch_size=8", "ppo.eval_prompts=8",
            "ppo.checkpoint_every=1", "rollout.num_workers=1", "placement=disaggregated"]  # (auto colocates here)
    assert main([*args, "ppo.iterations=2"]) == 0
    out = capsys.readouterr().out
    assert "eval reward (rlhf_ray.data.synthetic:gold)" in out and f"policy saved to {tmp_path / 'ppo' / 'policy'}" in out
    assert "[ppo] placement: disaggregated" in out
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "iteration" in r] == [1, 2]
    assert (tmp_path / "ppo" / "ppo.png").stat().st_size > 10_000
    AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "policy")

    assert main([*args, "ppo.iterations=3", f"ppo.resume_from={tmp_path / 'ppo'}"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'ppo' / 'checkpoints' / 'iter_000002'}: iteration 2" in out
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "iteration" in r] == [1, 2, 3]

    assert main([*args, "--rm-checkpoint", str(tmp_path / "nope")]) == 2
    assert f"--rm-checkpoint: {tmp_path / 'nope'} is not an RM directory" in capsys.readouterr().err


def test_reward_functions_from_a_local_module_travel_with_their_code(tmp_path, monkeypatch):
    """A module that is not installed (a file in the working directory) reaches the scorer actor on any
    node with the function: after ship_by_value its functions unpickle in a process that cannot import
    the module. An installed one goes by reference."""
    import math
    import subprocess
    import sys

    import ray.cloudpickle

    from rlhf_ray.config import RewardFunctionConfig
    from rlhf_ray.reward.functions import load_eval_function, load_reward_functions, ship_by_value

    (tmp_path / "user_rewards_for_shipping.py").write_text(
        "import math\n\nSCALE = 2.0\n\n\ndef _n(c):\n    return len(c if isinstance(c, str) else c[-1]['content'])\n\n\n"
        "def long_answers(prompts, completions, **kwargs):\n    return [SCALE * math.log1p(_n(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)  # the driver's working directory is importable, as for a script
    [fn] = ship_by_value(load_reward_functions([RewardFunctionConfig("user_rewards_for_shipping:long_answers")]))
    blob = ray.cloudpickle.dumps(fn)
    code = ("import pickle, sys; f = pickle.loads(sys.stdin.buffer.read()); "
            "print(f.fn(prompts=['p'], completions=['abc']))")
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, cwd=elsewhere, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == f"[{2.0 * math.log1p(3)!r}]"
    installed = load_eval_function("rlhf_ray.data.synthetic:gold")
    assert b"rlhf_ray.data.synthetic" in ray.cloudpickle.dumps(ship_by_value([installed])[0]) and \
        len(ray.cloudpickle.dumps(installed)) < 400


def assert_critic_free(lines: list[str], result, estimator: str, n: int, batch: int, scored: list | None = None
                       ) -> None:
    """A critic-free run said so, trained without a value loss on prompts x n rows, logged the RM's
    P over each group when n > 1 (recomputed from each iteration's ``scored`` batch when given), and
    saved no value head."""
    from rlhf_ray.ppo.learner import VALUE_HEAD_FILE

    said = [x for x in lines if x.startswith("[ppo] advantages: ")]
    assert said and said[0].startswith(f"[ppo] advantages: {estimator}, {n} sample") and "no value head" in said[0]
    for i, h in enumerate(result.history):
        assert h["batch_size"] == batch and h["value_loss"] == 0.0
        assert ("group_rm_top_prob" in h) == ("group_rm_entropy" in h) == (n > 1)
        if scored is not None and n > 1:  # the listwise RM's P(y_i|x) over each group, from the batch's RM scores
            z = scored[i].rm_scores.astype(np.float64).reshape(-1, n)
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            assert h["group_rm_top_prob"] == pytest.approx(p.max(1).mean(), rel=1e-6)
            assert h["group_rm_entropy"] == pytest.approx(-(p * np.log(p)).sum(1).mean(), rel=1e-6)
    assert not (result.policy_dir / VALUE_HEAD_FILE).exists()


def worker_killer(after: int):
    """An on_iteration callback that kills the first rollout worker once, after iteration ``after``;
    returns (callback, the killed handles)."""
    import ray

    killed = []

    def kill(m, ctx):
        if m["iteration"] == after and not killed:
            killed.append(ctx.pool.workers[0])
            ray.kill(ctx.pool.workers[0])
    return kill, killed


def assert_restarted_once(lines: list[str], killed: list, iteration: int) -> None:
    """The run lost its killed rollout worker and restarted its actors from iteration ``iteration``'s
    checkpoint, once."""
    restarts = [x for x in lines if "restarting the PPO actors" in x]
    assert killed and len(restarts) == 1 and f"iter_{iteration:06d} (failure 1" in restarts[0], lines


def test_grpo_with_the_kl_loss_on_ray_resumes_exactly(ray_cluster, test_config, policy_dir, rm_dir, tmp_path):
    """GRPO: 4 prompts x 2 samples, the reference KL as a loss term and none in the reward, with CISPO's
    policy term at GSPO's sequence-level ratio and rewards scaled by the batch's std; the policy
    moves, and a run resumed from its iteration-1 checkpoint (no value head to restore) repeats its
    iteration 2; that run is one step off (its first batch is fresh: the same as the synchronous run's)
    and loses its rollout worker after iteration 2, restarting from there. (RLOO one step off and
    restarted in the one-step-off test, REINFORCE++ in the bfloat16 one; GAE in both modes in the
    resume test.)"""
    from safetensors.numpy import load_file

    from rlhf_ray.ppo.driver import run_ppo
    from rlhf_ray.ppo.learner import VALUE_HEAD_FILE

    cfg = dataclasses.replace(
        test_config,
        ppo=ppo_cfg(test_config, iterations=2, prompts_per_iteration=4, max_new_tokens=8, minibatch_size=8,
                    samples_per_prompt=2, advantage_estimator="grpo", kl_coef=0.0, kl_loss_coef=0.1,
                    checkpoint_every=1, lr=1e-3, loss_type="cispo", clip_eps_high=5.0,
                    importance_sampling_level="sequence", scale_rewards="batch"),
        rollout=dataclasses.replace(test_config.rollout, num_workers=1))
    lines, (record, batches) = [], batch_recorder()
    result = run_ppo(cfg, policy_dir, rm_dir, tmp_path, log=lines.append, eval_every=0, on_iteration=record)
    assert_critic_free(lines, result, "grpo", 2, batch=8, scored=[b for _, b in batches])
    assert any("loss cispo (sequence ratio, clip [0.8, 5])" in x for x in lines), lines
    assert [h["policy_version"] for h in result.history] == [1, 2]
    assert result.history[-1]["kl_ref_k3"] > 0 and all(h["kl_coef"] == 0.0 for h in result.history)
    trained = load_file(str(result.policy_dir / "model.safetensors"))
    initial = load_file(str(Path(policy_dir) / "model.safetensors"))
    assert any(not np.array_equal(trained[k], initial[k]) for k in initial)
    first = tmp_path / "checkpoints" / "iter_000001"
    assert (first / "policy" / "config.json").is_file() and not (first / "policy" / VALUE_HEAD_FILE).exists()
    ppo = dataclasses.replace(cfg.ppo, resume_from=str(first), iterations=3, max_failures=1)
    lines, (kill, killed) = [], worker_killer(after=2)
    again = run_ppo(dataclasses.replace(cfg, ppo=ppo, rollout=dataclasses.replace(cfg.rollout, async_one_step_off=True)),
                    policy_dir, rm_dir, tmp_path / "resumed", log=lines.append, eval_every=0, on_iteration=kill)
    for key in ("reward", "rm_score", "loss", "kl_ref_k3", "group_rm_top_prob"):
        assert again.history[1][key] == pytest.approx(result.history[1][key], abs=1e-4), key
    assert_restarted_once(lines, killed, 2)
    assert [h["policy_version"] for h in again.history] == [1, 2, 3]
    assert [h["version_lag"] for h in again.history[1:]] == [0, 0]  # each the first batch of a start
