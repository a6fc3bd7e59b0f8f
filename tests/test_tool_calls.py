"""Multi-turn rollouts without an engine: tool calls parsed as TRL parses them, the chat template's tool
turn as token ids, episode layouts and masks, tools run with a timeout, environments as TRL takes them,
and their rewards in scoring. Expected values are written out by hand."""

from __future__ import annotations

import time

import numpy as np
import pytest
from reference import CHAT_TEMPLATE, TOOL_CHAT_TEMPLATE

from rlhf_ray.ppo.tool_calls import Episode, ToolTemplate, episode_arrays, parse_tool_calls
from rlhf_ray.ppo.toolbox import Toolbox, ToolSpec
from rlhf_ray.ppo.types import Rollout, ToolTrace

CALC = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+3"}}}


@pytest.fixture(scope="module")
def tokenizer(policy_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy_dir)


# ---- parsing -------------------------------------------------------------------------------------

def test_tool_calls_parse_as_trl_parses_hermes_turns():
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'
    assert parse_tool_calls("the sum is 5") == ("the sum is 5", [], False)
    assert parse_tool_calls(call) == ("", [CALC], False)
    assert parse_tool_calls("let me add\n" + call + "\n") == ("let me add", [CALC], False)  # one \n before dropped
    two = parse_tool_calls(call + ' <tool_call>{"name": "lookup"}</tool_call>')
    assert two.tool_calls == [CALC, {"type": "function", "function": {"name": "lookup", "arguments": {}}}]
    # Malformed: the whole turn is text, no call (TRL's parse_response falls back to the decoded text).
    for bad in ['<tool_call>{"name": "calculator", "arguments": {</tool_call>',  # JSON that does not load
                '<tool_call>{"arguments": {}}</tool_call>',  # no name
                '<tool_call>["calculator"]</tool_call>',  # not an object
                '<tool_call>{"name": "calculator"}',  # never closed
                call + " and then some text"]:  # text after the calls
        assert parse_tool_calls(bad) == (bad, [], True), bad


# ---- the template's tool turn ----------------------------------------------------------------------

def test_tool_turn_is_the_templates_delta_as_token_ids(tokenizer):
    """After a model turn ending in EOS, a tool turn is the template's "\\ntool : <content></s>\\nassistant :"
    tokenised in context: around the special </s> the text tokenises on its own, so the expected ids are
    those of the pieces."""
    t = ToolTemplate(tokenizer, TOOL_CHAT_TEMPLATE, [])
    pieces = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    one = [{"role": "tool", "name": "calculator", "content": "5"}]
    assert t.suffix_ids(one) == pieces("\ntool : 5") + [eos] + pieces("\nassistant :")
    two = one + [{"role": "tool", "name": "lookup", "content": "alpha"}]
    assert t.suffix_ids(two) == (pieces("\ntool : 5") + [eos] + pieces("\ntool : alpha") + [eos]
                                 + pieces("\nassistant :"))

    from task_tools import calculator

    ids = t.prompt_ids([{"role": "user", "content": "what is 2+3 ?"}], [calculator])
    assert ids == ([tokenizer.bos_token_id] + pieces("system : tools calculator") + [eos] + pieces("\nuser : what is 2+3 ?")
                   + [eos] + pieces("\nassistant :"))


def test_templates_that_cannot_serve_multi_turn_are_refused(tokenizer):
    with pytest.raises(ValueError, match="drops an assistant turn's tool_calls"):
        ToolTemplate(tokenizer, CHAT_TEMPLATE, [])  # renders tool messages, not tool calls
    no_tool_turns = TOOL_CHAT_TEMPLATE.replace("{% for m in messages %}", "{% for m in messages if m['role'] != 'tool' %}")
    with pytest.raises(ValueError, match="drops tool messages"):
        ToolTemplate(tokenizer, no_tool_turns, [])
    # A template that renders an assistant turn differently once it is not the last (as some drop reasoning
    # from earlier turns): appending a tool turn would change tokens already generated.
    unstable = TOOL_CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] }}{% if loop.last %} (last){% endif %}")
    with pytest.raises(ValueError, match="does not preserve the prefix"):
        ToolTemplate(tokenizer, unstable, [])
    with pytest.raises(ValueError, match="need a chat template"):
        ToolTemplate(tokenizer, None, [])


# ---- episodes ------------------------------------------------------------------------------------

def test_episode_layout_model_tokens_only_in_the_response_mask():
    """prompt [5, 6], model turn [7, 8] (logprobs -1, -2), tool turn [9], model turn [10] (-3): every
    token attended, only the model's in response_mask, logprobs on them alone; rows right-padded."""
    e = Episode("p", 2, [5, 6])
    e.add_model_turn([7, 8], [-1.0, -2.0])
    e.add_tool_turn([9])
    e.add_model_turn([10], [-3.0])
    short = Episode("q", 1, [4])
    short.add_model_turn([11], [-0.5])
    assert e.used == 4 and short.used == 1
    ids, am, rm, lp = episode_arrays([e, short], pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 8, 9, 10], [4, 11, 0, 0, 0, 0]])
    np.testing.assert_array_equal(am, [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rm, [[0, 0, 1, 1, 0, 1], [0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(lp, np.float32([[0, 0, -1, -2, 0, -3], [0, -0.5, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="2 tokens with 1 logprobs"):
        e.add_model_turn([1, 2], [0.0])


# ---- tools and environments ----------------------------------------------------------------------

def test_tools_answer_errors_timeouts_and_bad_calls_as_text():
    """Calls run at once, each with the timeout: a hanging call costs the timeout once, not per call;
    exceptions, unknown tools and arguments that do not fit are answered as TRL answers them."""
    box = Toolbox(ToolSpec(("task_tools:calculator", "task_tools:fail", "task_tools:hang", "task_tools:lookup"),
                           timeout_s=0.5))
    tools = box.tools_for(None)
    assert list(tools) == ["calculator", "fail", "hang", "lookup"]
    call = lambda name, **args: ({"type": "function", "function": {"name": name, "arguments": args}}, tools)  # noqa: E731
    start = time.perf_counter()
    out = box.call([call("calculator", expression="2+3*4"), call("hang", seconds=30), call("fail", reason="x"),
                    call("lookup", key="a"), call("nope"), call("calculator", expr="1"), call("hang", seconds=30),
                    ({"type": "function", "function": {"name": "calculator", "arguments": "2+3"}}, tools)])
    assert time.perf_counter() - start < 2.0
    assert out == [
        ({"role": "tool", "name": "calculator", "content": "14"}, False),
        ({"role": "tool", "name": "hang", "content": "{'error': 'Tool hang timed out after 0.5 s.'}"}, True),
        ({"role": "tool", "name": "fail", "content": "{'error': 'tool failed: x'}"}, True),
        ({"role": "tool", "name": "lookup", "content": "alpha"}, False),  # async, awaited
        ({"role": "tool", "name": "nope", "content": "{'error': 'Tool nope not found.'}"}, True),
        ({"role": "tool", "name": "calculator",
          "content": "{'error': \"calculator() got an unexpected keyword argument 'expr'\"}"}, True),
        ({"role": "tool", "name": "hang", "content": "{'error': 'Tool hang timed out after 0.5 s.'}"}, True),
        ({"role": "tool", "name": "calculator",
          "content": "{'error': 'task_tools.calculator() argument after ** must be a mapping, not str'}"}, True),
    ]


def test_environments_as_trl_takes_them():
    """One environment per record from a pool (reused through reset), its public methods as tools beside
    the standalone ones, reset's text appended to the last user message, get_reward read at the end;
    with a mapping, the record's environment column picks the factory and is not passed to reset."""
    box = Toolbox(ToolSpec(("task_tools:calculator",), "task_tools:make_counter"))
    assert box.reward_names == ["Counter"]
    envs = box.environments([{"target": 2}, {"target": 5}], ["a", "b"])
    assert envs[0] is box.pools[None][0] and envs[1] is not envs[0]  # the probe, then a new one
    assert box.environments([{}], ["c"])[0] is envs[0]  # reused
    prompt = [{"role": "system", "content": "count"}, {"role": "user", "content": "go"}]
    assert box.reset(envs[1], prompt, {"target": 5}) == [prompt[0], {"role": "user", "content": "go (reach 5)"}]
    assert prompt[1]["content"] == "go"  # the record's prompt is left as it was
    tools = box.tools_for(envs[1])
    assert list(tools) == ["calculator", "step"]
    assert box.call([({"type": "function", "function": {"name": "step", "arguments": {"by": 4}}}, tools)])[0][0] == \
        {"role": "tool", "name": "step", "content": "counter = 4"}
    assert box.reward(envs[1]) == ("Counter", -1.0)

    multi = Toolbox(ToolSpec((), {"count": "task_tools:make_counter", "echo": "task_tools:Echo"}))
    assert multi.reward_names == ["Counter"]
    a, b = multi.environments([{"environment": "echo"}, {"environment": "count", "target": 1}], ["x", "y"])
    assert type(a).__name__ == "Echo" and type(b).__name__ == "Counter"
    assert multi.reset(a, prompt, {"environment": "echo"}) == prompt  # None: the prompt unchanged
    assert multi.reset(b, prompt, {"environment": "count", "target": 1})[-1]["content"] == "go (reach 1)"
    assert list(multi.tools_for(a)) == ["echo"] and multi.reward(a) is None
    with pytest.raises(ValueError, match=r"prompt record y: environment='maze' is not one of ppo.environment's "
                                         r"\['count', 'echo'\]"):
        multi.environments([{"environment": "echo"}, {"environment": "maze"}], ["x", "y"])


def test_tools_that_cannot_be_tools_are_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"ppo.tools\[0\]: .*make_counter cannot be a tool: .*docstring"):
        Toolbox(ToolSpec(("task_tools:make_counter",)))
    with pytest.raises(ValueError, match=r"ppo.tools\[1\]: cannot import module 'no_such_module'"):
        Toolbox(ToolSpec(("task_tools:calculator", "no_such_module:f")))
    with pytest.raises(ValueError, match=r"ppo.environment.d: builtins:dict returned a dict, which has no reset method"):
        Toolbox(ToolSpec((), {"d": "builtins:dict"}))


# ---- scoring -------------------------------------------------------------------------------------

def _rollout(messages, env_rewards) -> Rollout:
    B = len(messages)
    z = np.zeros((B, 3), bool)
    trace = ToolTrace(messages, np.arange(B), np.zeros(B, np.int64), np.zeros(B, np.int64), env_rewards)
    return Rollout(np.zeros((B, 3), np.int64), ~z, z, np.zeros((B, 3), np.float32), np.zeros(B, bool),
                   [[{"role": "user", "content": "q"}]] * B, ["r"] * B, 0, 0, 0.0, 0, episodes=trace)


def test_environment_rewards_score_with_weight_one_and_reward_functions_see_the_messages():
    """As TRL: get_reward() is one more reward function of weight 1 named after the environment class
    (NaN, counted as 0, where a sample's environment is another); completions are the episode's messages."""
    from rlhf_ray.ppo.scoring import RolloutScorer, completions, merge_rollouts
    from rlhf_ray.reward.functions import RewardFunction

    turns = [[{"role": "assistant", "content": "", "tool_calls": [CALC]},
              {"role": "tool", "name": "calculator", "content": "5"}, {"role": "assistant", "content": "5"}],
             [{"role": "assistant", "content": "no tools"}]]
    a = _rollout(turns, {"Counter": np.float32([-1.0, -2.0])})
    b = _rollout(turns[1:], {})  # a chunk whose episodes had no Counter
    merged = merge_rollouts([a, b])
    assert completions(merged) == turns + turns[1:]
    np.testing.assert_array_equal(merged.episodes.tool_calls, [0, 1, 0])
    np.testing.assert_array_equal(merged.episodes.env_rewards["Counter"], np.float32([-1, -2, np.nan]))
    assert merged.take(np.array([2, 0])).episodes.messages == [turns[1], turns[0]]

    with pytest.raises(ValueError, match="nothing would score"):
        RolloutScorer()
    last_words = RewardFunction("task_rewards:words", 0.5, __import__("task_rewards").words)
    scored = RolloutScorer(reward_functions=[last_words], environment_rewards=True).score(a, b)
    # words: the last message's words (1, 2, 2) x 0.5; Counter: -1, -2, (NaN ->) 0
    np.testing.assert_allclose(scored.scores, [0.5 - 1, 1 - 2, 1 + 0])
    np.testing.assert_array_equal(scored.function_scores["rewards/Counter"], np.float32([-1, -2, np.nan]))

