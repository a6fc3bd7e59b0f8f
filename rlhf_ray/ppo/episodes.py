"""Multi-turn rollouts on a rollout worker's engine: generate, run the tool calls, append the tool turn's
token ids, generate again, until no episode calls a tool, ``ppo.max_tool_calling_iterations`` rounds
have been answered, or the token budget is spent (``max_new_tokens`` for everything after the prompt,
tool tokens included, as TRL's ``max_completion_length``; and the engine's ``max_model_len - 1``).

Each round sends the episodes still running to the engine as one batch of token-id prompts, so vLLM's
prefix cache reuses the context of the earlier turns. An episode ends:

* without a tool call in its turn (or a malformed one, read as text: ``tool_calls.parse_tool_calls``);
* after ``max_tool_calling_iterations`` answered rounds (its last calls unanswered, as in TRL);
* cut (``truncated``): a turn ran out of tokens before its stop token, or the tool answers would not
  fit the budget (they are dropped, as TRL drops them).

The Rollout's ``episodes`` (:class:`rlhf_ray.ppo.types.ToolTrace`) carries each episode's messages,
its tool calls and failures, and the environments' rewards.
"""

from __future__ import annotations

import time

import numpy as np

from rlhf_ray.data.chat import is_chat
from rlhf_ray.data.prompts import PromptRecord
from rlhf_ray.ppo.tool_calls import Episode, episode_arrays, parse_tool_calls
from rlhf_ray.ppo.types import Rollout, ToolTrace


def generate_episodes(worker, records: list[PromptRecord], max_new_tokens: int | list[int], temperature: float,
                      top_p: float,
                      seed: int | None = None, turn_regex: list[list[str | None]] | None = None) -> Rollout:
    """One episode per record on ``worker`` (a RolloutWorker with a toolbox and tool template), in rounds.

    ``turn_regex``: per record, a regular expression each of its turns must match (vLLM structured
    outputs; None or a missing entry: free sampling). Tests use it to make a small model call tools;
    the logprobs of a guided turn are then those of the constrained distribution."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    from rlhf_ray.ppo.rollout import _chosen_logprobs

    t0 = time.perf_counter()
    budgets = [int(max_new_tokens)] * len(records) if np.ndim(max_new_tokens) == 0 else list(max_new_tokens)
    if len(budgets) != len(records) or min(budgets) < 1:
        raise ValueError(f"max_new_tokens: expected a positive int or {len(records)} of them, got {max_new_tokens!r}")
    episodes = start_episodes(worker, records)
    seeds = (np.random.SeedSequence([seed, worker.worker_id]).generate_state(len(records))
             if seed is not None else None)
    limit = worker.max_model_len - 1
    turn, cache = 0, PrefixCache()
    while True:
        running = []
        for b, e in enumerate(episodes):
            room = min(budgets[b] - e.used, limit - len(e.ids))
            if not e.done and room < 1:
                e.done, e.truncated = True, True
            if not e.done:
                running.append((b, e, room))
        if not running:
            break
        params = []
        for b, e, room in running:
            regex = turn_regex[b][turn] if turn_regex and turn < len(turn_regex[b]) else None
            params.append(SamplingParams(
                max_tokens=room, temperature=temperature, top_p=top_p, logprobs=0, detokenize=False,
                seed=None if seeds is None else turn_seed(int(seeds[b]), turn),
                flat_logprobs=True, stop_token_ids=worker.stop_token_ids or None,
                structured_outputs=StructuredOutputsParams(regex=regex) if regex else None))
        outputs = worker.llm.generate([TokensPrompt(prompt_token_ids=list(e.ids)) for _, e, _ in running], params,
                                      use_tqdm=False)
        calls = {}
        for (b, e, _), out in zip(running, outputs):
            cache.count(out, later_turn=turn > 0)
            toks = list(out.outputs[0].token_ids)
            e.add_model_turn(toks, _chosen_logprobs(out.outputs[0].logprobs, toks))
            calls[b] = end_turn(worker, e, toks, out.outputs[0].finish_reason == "stop")
        answer_calls(worker, {b: (episodes[b], budgets[b], c) for b, c in calls.items() if c})
        turn += 1
    return episodes_rollout(worker, episodes, records, time.perf_counter() - t0, stats=cache.stats())


class PrefixCache:
    """How much of the later turns' prompts (an episode's context so far) vLLM's prefix cache served."""

    def __init__(self):
        self.cached = self.prompted = 0

    def count(self, out, later_turn: bool) -> None:
        """``out``: a request's (first) RequestOutput; only the turns after an episode's first count."""
        if later_turn:
            self.cached += int(out.num_cached_tokens or 0)
            self.prompted += len(out.prompt_token_ids or ())

    def stats(self) -> dict:
        return {"prefix_cached_tokens": self.cached, "prefix_prompt_tokens": self.prompted}


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of an episode's ``turn``-th request (partial rollouts: of a sample's ``turn``-th
    request, each resumption one), from the episode's ``seed``."""
    return int(np.random.SeedSequence([seed, turn]).generate_state(1)[0] & 0x7FFFFFFF)


def start_episodes(worker, records: list[PromptRecord]) -> list[Episode]:
    """An episode per record: its environment reset, its tools, its prompt ids with the tools' schemas."""
    box, template = worker.toolbox, worker.tool_template
    limit = worker.max_model_len - 1  # longest sequence logprobs_of can score
    envs = box.environments([r.columns for r in records], [r.source for r in records])
    episodes = []
    for i, (r, env) in enumerate(zip(records, envs)):
        if not is_chat(r.prompt):
            raise ValueError(f"prompt record {r.source or i}: multi-turn rollouts (ppo.tools, ppo.environment) need "
                             f"chat prompts (a list of messages), got plain text")
        prompt = box.reset(env, r.prompt, r.columns)
        tools = box.tools_for(env)
        ids = template.prompt_ids(prompt, list(tools.values()))
        if len(ids) >= limit:
            raise ValueError(f"prompt {i} is {len(ids)} tokens with its tools; the model takes at most {limit - 1} "
                             f"prompt tokens to leave room for a response")
        episodes.append(Episode(prompt, len(ids), ids, tools=tools, environment=env))
    return episodes


def end_turn(worker, e: Episode, toks: list[int], stopped: bool) -> list[dict]:
    """A model turn of ``e`` has ended (its ``toks`` already in the episode; ``stopped``: at a stop token,
    not cut): its message, and the tool calls to answer ([]: the episode is done)."""
    tok = worker.tokenizer
    text = tok.decode(toks[:-1] if stopped and toks else toks, skip_special_tokens=False)
    parsed = parse_tool_calls(text.removesuffix(tok.eos_token or ""))
    message = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        message["tool_calls"] = parsed.tool_calls
    e.messages.append(message)
    e.malformed += parsed.malformed and stopped  # (a cut turn is truncated, not malformed)
    max_rounds = worker.toolbox.spec.max_iterations
    if not stopped:
        e.done, e.truncated = True, True
    elif not parsed.tool_calls or (max_rounds >= 0 and e.rounds >= max_rounds):
        e.done = True
    else:
        return list(parsed.tool_calls)
    return []


def answer_calls(worker, calling: dict) -> None:
    """Run the tool calls of the episodes in ``calling`` (key -> (episode, its token budget, its calls))
    together, and append each episode's tool turn, or end it when the answers would not fit its budget
    (they are dropped, as TRL drops them)."""
    if not calling:
        return
    limit = worker.max_model_len - 1
    keys = list(calling)
    requests = [(call, calling[k][0].tools) for k in keys for call in calling[k][2]]
    answers = iter(worker.toolbox.call(requests))
    for k in keys:
        e, budget, calls = calling[k]
        mine = [next(answers) for _ in calls]
        e.tool_calls += len(mine)
        e.tool_failures += sum(failed for _, failed in mine)
        suffix = worker.tool_template.suffix_ids([m for m, _ in mine])
        if e.used + len(suffix) > budget or len(e.ids) + len(suffix) >= limit:
            e.done, e.truncated = True, True
            continue
        e.add_tool_turn(suffix)
        e.messages += [m for m, _ in mine]
        e.rounds += 1


def episodes_rollout(worker, episodes: list[Episode], records: list[PromptRecord], seconds: float,
                     **fields) -> Rollout:
    """The ended ``episodes`` as a Rollout: the layout, the responses' text, the tool trace and the
    environments' rewards (``fields``: more of the Rollout's fields)."""
    box, tok = worker.toolbox, worker.tokenizer
    env_rewards: dict[str, np.ndarray] = {}
    for b, e in enumerate(episodes):
        got = box.reward(e.environment)
        if got is not None:
            env_rewards.setdefault(got[0], np.full(len(episodes), np.nan, dtype=np.float32))[b] = got[1]
    input_ids, attention_mask, response_mask, logprobs = episode_arrays(episodes, worker.pad_id)
    responses = [tok.decode(e.ids[e.prompt_len:], skip_special_tokens=True) for e in episodes]
    trace = ToolTrace(messages=[e.messages for e in episodes],
                      tool_calls=np.array([e.tool_calls for e in episodes], dtype=np.int64),
                      tool_failures=np.array([e.tool_failures for e in episodes], dtype=np.int64),
                      malformed=np.array([e.malformed for e in episodes], dtype=np.int64),
                      env_rewards=env_rewards)
    return Rollout(**{
        "input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
        "rollout_logprobs": logprobs, "truncated": np.array([e.truncated for e in episodes], dtype=bool),
        "prompts": [e.prompt for e in episodes], "responses": responses, "policy_version": worker.version,
        "worker_id": worker.worker_id, "gen_seconds": seconds, "num_tokens": int(response_mask.sum()),
        "columns": [r.columns for r in records], "sources": [r.source for r in records], "episodes": trace,
        **fields})
