"""Multi-turn rollouts on a real vLLM engine (in-process, CPU, float32): a calculator, a tool that raises,
one that hangs, a malformed call, a turn without tools and an environment (tests/task_tools.py) in one
batch of episodes of different lengths; the layout (tool turns in the context, out of the response mask)
and the logprobs of the model's tokens against the learner's.

The embedded model never writes a tool call by itself: the turns that must call one are constrained to
that text with vLLM's structured outputs (a regex), the engine sampling within it. The logprobs of such
a turn are those of the constrained distribution, so the engine/learner comparison of sampled logprobs
is made on the free turns, and on every model token through the engine's own scoring (the drift check).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from reference import TOOL_CHAT_TEMPLATE  # noqa: E402

from rlhf_ray.data.prompts import PromptRecord  # noqa: E402
from rlhf_ray.ppo.toolbox import ToolSpec  # noqa: E402

TOL = 1e-4  # float32 vLLM vs float32 transformers: measured ~2e-6


def literal(text: str) -> str:
    """``text`` as a regex matching exactly it (re.escape's escaped spaces are not xgrammar's)."""
    return re.escape(text).replace("\\ ", " ")


def call_text(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


@pytest.fixture(scope="module")
def long_policy(policy_dir, tmp_path_factory):
    """The embedded policy with room for episodes: a copy whose max_position_embeddings is 512 (rotary
    positions, so the same weights run at any length, in vLLM and transformers alike)."""
    import shutil

    path = tmp_path_factory.mktemp("long") / "model"
    shutil.copytree(policy_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    return path


@pytest.fixture(scope="module")
def worker(long_policy, test_config):
    from helpers import in_process_worker

    spec = ToolSpec(("task_tools:calculator", "task_tools:fail", "task_tools:hang"), "task_tools:make_counter",
                    max_iterations=2, timeout_s=1.0)
    with in_process_worker(str(long_policy), test_config.rollout, worker_id=0, seed=0, max_model_len=320,
                           chat_template=TOOL_CHAT_TEMPLATE, tools=spec) as w:
        yield w


def segments(mask_row: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) spans where a bool row is True."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask_row.astype(int), 0]))
    return list(zip(edges[::2], edges[1::2]))


def test_episodes_with_tools_and_an_environment(worker, long_policy, test_config):
    from rlhf_ray.ppo.episodes import generate_episodes
    from rlhf_ray.ppo.learner import Learner

    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    records = [PromptRecord(user("what is 2+3 ?"), {}, "calc"), PromptRecord(user("break"), {}, "fail"),
               PromptRecord(user("wait"), {}, "hang"), PromptRecord(user("typo"), {}, "malformed"),
               PromptRecord(user("review of the lamp :"), {}, "no tools"),
               PromptRecord(user("count"), {"target": 3}, "environment")]
    malformed = '<tool_call>{"name": "calculator", "arguments": {</tool_call>'
    forced = [[call_text("calculator", expression="2+3")], [call_text("fail", reason="test")],
              [call_text("hang", seconds=30)], [malformed], [],
              [call_text("step", by=2), call_text("step", by=1), call_text("step", by=5)]]
    ro = generate_episodes(worker, records, max_new_tokens=250, temperature=1.0, top_p=1.0, seed=3,
                           turn_regex=[[literal(t) for t in turns] for turns in forced])
    tok, template, eos = worker.tokenizer, worker.tool_template, worker.tokenizer.eos_token_id
    tr = ro.episodes

    # What each episode did: rounds answered, failures, and the turn that did not parse.
    np.testing.assert_array_equal(tr.tool_calls, [1, 1, 1, 0, 0, 2])
    np.testing.assert_array_equal(tr.tool_failures, [0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(tr.malformed, [0, 0, 0, 1, 0, 0])
    answers = [["5"], ["{'error': 'tool failed: test'}"], ["{'error': 'Tool hang timed out after 1 s.'}"], [], [],
               ["counter = 2", "counter = 3"]]
    for b, want in enumerate(answers):
        assert [m["content"] for m in tr.messages[b] if m["role"] == "tool"] == want, b
    assert tr.messages[0][0] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+3"}}}]}
    assert tr.messages[3] == [{"role": "assistant", "content": malformed}]  # text, as TRL reads it
    assert len(tr.messages[5]) == 5 and "tool_calls" in tr.messages[5][-1]  # the third call: over the limit
    # The environment's reward: its counter ended at 2 + 1 = 3, the target; the others never stepped.
    np.testing.assert_array_equal(tr.env_rewards["Counter"], [-3, -3, -3, -3, -3, 0])
    assert ro.prompts[5] == user("count (reach 3)")

    # Layout: the prompt as the template renders it with the tools; then model turns (in the response mask,
    # each ending in EOS unless cut) separated by tool turns (attended, not in the response mask), each
    # exactly the template's tokens for its answers.
    lengths = ro.attention_mask.sum(1)
    tools = list(worker.toolbox.tools_for(worker.toolbox.pools[None][0]).values())
    assert [t.__name__ for t in tools] == ["calculator", "fail", "hang", "step"]
    for b in range(len(records)):
        prompt_ids = template.prompt_ids(ro.prompts[b], tools)
        n, P = lengths[b], len(prompt_ids)
        ids, model = ro.input_ids[b, :n].tolist(), ro.response_mask[b, :n]
        assert ids[:P] == prompt_ids and not model[:P].any() and model[P], b
        turns = segments(model)
        assert len(turns) == [2, 2, 2, 1, 1, 3][b], (b, turns)
        tool_msgs = [m for m in tr.messages[b] if m["role"] == "tool"]
        for k, ((s, t), (s2, _)) in enumerate(zip(turns, turns[1:])):
            assert ids[t - 1] == eos  # the model's turn ended with its stop token
            answered = tool_msgs[k:k + 1]
            assert ids[t:s2] == template.suffix_ids(answered), (b, k)
        if b in (0, 1, 2, 3, 5):  # the guided first turn, token for token as sampled
            first = tok.decode(ids[turns[0][0]:turns[0][1] - 1])
            assert first == forced[b][0]
        assert ro.rollout_logprobs[b, ~ro.response_mask[b]].tolist() == [0.0] * int((~ro.response_mask[b]).sum())
    assert len(set(lengths.tolist())) >= 4  # episodes of different lengths in one batch
    # vLLM's prefix cache served the later turns' context (the 5 requests after a tool turn): all of it but
    # the tool turn just appended and the partial KV block (32 tokens) before it.
    cached, prompted = ro.stats["prefix_cached_tokens"], ro.stats["prefix_prompt_tokens"]
    turns = [segments(ro.response_mask[b]) for b in range(6)]
    assert prompted == sum(int(s) for t in turns for s, _ in t[1:])
    new = sum(int(s - t_prev) + 32 for t in turns for (_, t_prev), (s, _) in zip(t, t[1:]))
    assert prompted - new < cached <= prompted and cached > 0.6 * prompted, (cached, prompted, new)
    assert ro.num_tokens == int(ro.response_mask.sum()) and not ro.truncated[[3, 5]].any()

    # Logprobs: the learner's on the model's tokens (tool tokens in its context) against the engine's: the
    # sampled ones on free turns, the engine's scoring (the drift check) on all of them.
    cfg = dataclasses.replace(test_config.ppo, advantage_estimator="grpo", samples_per_prompt=2, epochs=1,
                              minibatch_size=6, kl_coef=0.1)
    learner = Learner(long_policy, cfg, device="cpu")
    lp = learner.logprobs(ro.input_ids, ro.attention_mask, score_mask=ro.response_mask)
    free = np.zeros_like(ro.response_mask)
    for b in range(len(records)):
        for k, (s, t) in enumerate(segments(ro.response_mask[b])):
            free[b, s:t] = k >= len(forced[b])
    assert free.sum() > 20
    np.testing.assert_allclose(ro.rollout_logprobs[free], lp[free], atol=TOL)
    engine = worker.logprobs_of(ro.input_ids, ro.attention_mask, ro.response_mask)
    np.testing.assert_allclose(engine[ro.response_mask], lp[ro.response_mask], atol=TOL)
    guided_turns = ro.response_mask & ~free
    assert np.abs(ro.rollout_logprobs[guided_turns] - lp[guided_turns]).max() > 0.1  # constrained: not the policy's

    # The stages after it take the gaps: the environment's reward alone scores; GRPO's advantages, the KL
    # penalty and pi_old are on the model's tokens only; a PPO step trains on them.
    from rlhf_ray.ppo.advantage import AdvantageWorker
    from rlhf_ray.ppo.scoring import RolloutScorer

    scored = RolloutScorer(environment_rewards=True).score(ro)
    assert RolloutScorer(environment_rewards=True).summary(ro)["tool_calls"] == 5 / 6  # (eval_tool_calls)
    np.testing.assert_array_equal(scored.scores, [-3, -3, -3, -3, -3, 0])
    batch = AdvantageWorker(str(long_policy), cfg).compute(scored, learner.evaluate(scored))
    outside = ~ro.response_mask
    for name in ("old_logprobs", "ref_logprobs", "rewards", "advantages", "returns"):
        assert not getattr(batch, name)[outside].any(), name
    assert batch.stats["tools/call_frequency"] == 5 / 6 and batch.stats["tools/failure_frequency"] == 2 / 5
    assert batch.stats["tools/malformed_frequency"] == 1 / 6
    assert (batch.advantages[5][ro.response_mask[5]] > 0).all()  # the best of its group, on all its turns
    np.testing.assert_allclose(batch.old_logprobs[ro.response_mask], lp[ro.response_mask], atol=TOL)
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    stats = learner.train(batch)
    assert np.isfinite(stats["policy_loss"]) and any(
        not torch.equal(before[k], v) for k, v in learner.policy.state_dict().items())


def test_a_ray_rollout_worker_gets_the_tools_by_value(ray_cluster, long_policy, test_config):
    """The driver's wiring: the spec imported on the driver (ToolSpec.resolved) reaches an engine actor
    with the code of a module that is not installed (tests/task_tools.py), and its rollouts are episodes
    (the model, unguided, calls no tool: one turn each, scored by the environment)."""
    ray = ray_cluster
    from rlhf_ray.ppo import actors

    spec = ToolSpec(("task_tools:calculator",), "task_tools:make_counter").resolved()
    assert callable(spec.tools[0]) and callable(spec.environment)
    w = actors.start_rollout_worker(long_policy, test_config.rollout, worker_id=1, seed=0, max_model_len=160,
                                    chat_template=TOOL_CHAT_TEMPLATE, tools=spec)
    try:
        ro = ray.get(w.generate.remote([[{"role": "user", "content": "review of the lamp :"}]] * 2, 24, 1.0, 1.0, 0),
                     timeout=300)
        assert [len(m) for m in ro.episodes.messages] == [1, 1] and ro.episodes.tool_calls.tolist() == [0, 0]
        np.testing.assert_array_equal(ro.episodes.env_rewards["Counter"], [-3, -3])
        assert ro.prompts[0][-1]["content"] == "review of the lamp : (reach 3)"
    finally:
        ray.get(w.shutdown.remote(), timeout=60)
        ray.kill(w)


def test_partial_rollouts_answer_tools_between_steps_and_resume_episodes(worker):
    """Partial rollouts with tools (rlhf_ray.ppo.partial): a turn's tool answers go in as soon as the turn
    ends and its next turn goes straight back to the engine, its context from vLLM's prefix cache. Call 1
    returns the group of a long single turn (quota 1) and carries the calculator's group, stopped in the
    middle of its second turn; after a weight version, call 2 must return it (rollout.max_staleness=1),
    that turn resumed from the tokens it had."""
    from rlhf_ray.ppo.partial import PartialRollouts

    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    long_text = "the lamp is great and the speaker is reliable and the camera is superb . " * 4
    records = [PromptRecord(user("what is 2+3 ?"), {}, "calc")] * 2 + [PromptRecord(user("review :"), {}, "long")] * 2
    regex = [[literal(call_text("calculator", expression="2+3"))]] * 2 + [[literal(long_text)]] * 2
    part, tok, template = PartialRollouts(worker, max_staleness=1, base_lag=0), worker.tokenizer, worker.tool_template
    first = part.generate(records, 250, 1.0, 1.0, seed=3, group_size=2, quota=1, turn_regex=regex)
    assert first.sources == ["long"] * 2 and first.stats["rollout_resumed"] == 0 and first.stats["rollout_carried"] == 2
    assert [m[0]["content"] for m in first.episodes.messages] == [long_text] * 2
    # The calculator's turns: the call, its answer, then a second turn that the cut stopped.
    kept = [s for g in part.groups for s in g]
    assert [s.record.source for s in kept] == ["calc"] * 2
    for s in kept:
        e = s.episode
        assert s.finish is None and e.tool_calls == 1 and e.messages[-1] == {"role": "tool", "name": "calculator",
                                                                             "content": "5"}
        assert len(segments(np.array(e.model))) == 2 and e.model[-1] and s.turn_start > e.prompt_len
    # The second turns' requests found their context (the prompt, the call, the answer) in the prefix cache,
    # but for the last partial KV block of 32 tokens.
    cached, prompted = first.stats["prefix_cached_tokens"], first.stats["prefix_prompt_tokens"]
    assert prompted == sum(s.turn_start for s in kept) and prompted - 2 * 32 < cached <= prompted
    cut = [list(s.episode.ids) for s in kept]

    worker.weights_changed(1)  # (the same weights, a new version: the carried group is now due)
    try:
        second = part.generate([PromptRecord(user("review of the lamp :"), {}, "new")] * 2, 250, 1.0, 1.0, seed=4,
                               group_size=2, quota=1)
    finally:
        worker.weights_changed(0)
    assert second.sources == ["calc"] * 2 and second.versions.tolist() == [0, 0]
    assert second.stats["rollout_resumed"] == 2 and second.stats["rollout_carried"] == 2
    assert second.episodes.tool_calls.tolist() == [1, 1]
    for b in range(2):
        n = int(second.attention_mask[b].sum())
        ids = second.input_ids[b, :n].tolist()
        assert ids[:len(cut[b])] == cut[b] and n > len(cut[b])
        (s1, t1), (s2, t2) = segments(second.response_mask[b, :n])  # the call, then the answer across the cut
        assert ids[t1:s2] == template.suffix_ids([{"role": "tool", "name": "calculator", "content": "5"}])
        assert s2 < len(cut[b]) < t2
        stopped = not second.truncated[b]
        text = tok.decode(ids[s2:t2 - 1] if stopped else ids[s2:t2], skip_special_tokens=False)
        assert second.episodes.messages[b][-1]["content"] == text  # the whole turn, parsed once it ended
        engine = worker.logprobs_of(second.input_ids[b:b + 1, :n], second.attention_mask[b:b + 1, :n],
                                    second.response_mask[b:b + 1, :n])[0]
        np.testing.assert_allclose(second.rollout_logprobs[b, s2:t2], engine[s2:t2], atol=TOL)  # the free turn
