"""Multi-turn rollouts as pure functions: a model turn's tool calls parsed from its text, the chat
template's tokens for a tool turn, and an episode's token ids and masks.

Token-in, token-out: an episode is the prompt's ids, then each model turn's ids exactly as the engine
sampled them (its stop token included) and, after a turn that called tools, the template's tokens of
the tool messages and of the next generation prompt (:meth:`ToolTemplate.suffix_ids`). Only that delta
is ever tokenised; the model's tokens never are. Tool tokens are in the context (``attention_mask``) but
not in ``response_mask``: they carry no loss, no KL and no logprobs.

Tool calls are parsed as TRL 1.16 parses the Hermes/Qwen format (``trl.chat_template_utils``'s
``qwen3_schema``, which SmolLM2's and Qwen2.5's templates use): the turn's text is its content, then
one or more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, then only whitespace.
A turn that does not parse (JSON that does not load, a call without a string name, text after the
calls) is plain text, as TRL's ``parse_response`` falls back to: the episode ends there (counted as
``malformed``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

_CALL = re.compile(r"<tool_call>\s*(.+?)\s*</tool_call>", re.S)


class ParsedTurn(NamedTuple):
    content: str  # the text before the first tool call (all of it when there is none)
    tool_calls: list[dict]  # [{"type": "function", "function": {"name", "arguments"}}, ...] ([] = none)
    malformed: bool  # the text has <tool_call> but does not parse: read as plain text


def parse_tool_calls(text: str) -> ParsedTurn:
    """A model turn's text (its stop token removed) as content and tool calls, TRL's way (module docstring)."""
    start = text.find("<tool_call>")
    if start < 0:
        return ParsedTurn(text, [], False)
    content = text[:start].removesuffix("\n")
    calls, pos = [], start
    for m in _CALL.finditer(text, start):
        if text[pos:m.start()].strip():  # text between calls
            return ParsedTurn(text, [], True)
        try:
            call = json.loads(m.group(1))
        except ValueError:
            return ParsedTurn(text, [], True)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return ParsedTurn(text, [], True)
        if call.get("arguments") is None:  # a no-argument call may omit them (TRL normalises to {})
            call["arguments"] = {}
        calls.append({"type": "function", "function": call})
        pos = m.end()
    if not calls or text[pos:].strip():
        return ParsedTurn(text, [], True)
    return ParsedTurn(content, calls, False)


def tool_message(name: str, result: Any) -> dict:
    """The tool message answering a call to ``name`` that returned ``result`` (TRL: ``str(result)``)."""
    return {"role": "tool", "name": name, "content": str(result)}


def error_message(name: str, error: str) -> dict:
    """The tool message answering a call that failed (TRL's ``{"error": str(e)}``, as its text)."""
    return tool_message(name, {"error": error})


class ToolTemplate:
    """A tokenizer's chat template for multi-turn rollouts: prompts rendered with the tools' schemas, and
    the token ids of a tool turn appended after a model turn. Raises ValueError at construction when the
    template cannot serve: it drops tool calls or tool messages, or does not preserve the prefix (appending
    a tool turn would change tokens already generated; TRL's ``is_chat_template_prefix_preserving``)."""

    def __init__(self, tokenizer, template: str | None, stop_token_ids: list[int]):
        if template is None:
            raise ValueError("multi-turn rollouts (ppo.tools, ppo.environment) need a chat template; set "
                             "data.chat_template to a Jinja file that renders tools (or 'auto' with a chat model)")
        self.tokenizer, self.template = tokenizer, template
        self.stops = {t for t in [tokenizer.eos_token_id, *stop_token_ids] if t is not None}
        probe = [tool_message("probe_tool_a8f3", "probe_result_c4f9")]
        text = tokenizer.decode(self.suffix_ids(probe))  # checks the prefix
        if "probe_result_c4f9" not in text:
            raise ValueError(f"the chat template drops tool messages (a tool turn renders as {text!r}); multi-turn "
                             f"rollouts need one that renders them: set data.chat_template")
        call = self._render(self._dummy("probe_tool_a8f3"), False)
        if "probe_tool_a8f3" not in call:
            raise ValueError("the chat template drops an assistant turn's tool_calls; multi-turn rollouts need one "
                             "that renders them: set data.chat_template")

    def _render(self, messages: list[dict], generation_prompt: bool, tools=None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=self.template,
                                                  tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _dummy(name: str) -> list[dict]:
        call = {"type": "function", "function": {"name": name, "arguments": {}}}
        return [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": [call]}]

    def prompt_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """The ids the engine continues from: ``messages`` with the tools' schemas (callables or
        transformers' JSON schemas; ``tools=`` of ``apply_chat_template``) and the generation prompt."""
        return self._ids(self._render(messages, True, tools))

    def suffix_ids(self, tool_messages: list[dict]) -> list[int]:
        """The tokens after a model turn (ended by its stop token) that answer it with ``tool_messages``
        and open the next assistant turn: the template's delta between a conversation ending in a tool
        call (cut after its last stop token) and the same with the tool messages and the generation
        prompt (TRL's ``_get_tool_suffix_ids``)."""
        dummy = self._dummy(tool_messages[0]["name"])
        prefix = self._ids(self._render(dummy, False))
        ends = [i for i, t in enumerate(prefix) if t in self.stops]
        if not ends:
            raise ValueError(f"the chat template ends an assistant turn with none of the stop tokens "
                             f"{sorted(self.stops)}; a model turn could not be followed by a tool turn")
        prefix = prefix[:ends[-1] + 1]
        full = self._ids(self._render(dummy + list(tool_messages), True))
        if full[:len(prefix)] != prefix:
            raise ValueError("the chat template does not preserve the prefix: a conversation's tokens change when a "
                             "tool turn is appended, so a multi-turn rollout would re-tokenise what the model "
                             "generated; set data.chat_template to a prefix-preserving template (TRL: "
                             "is_chat_template_prefix_preserving)")
        return full[len(prefix):]


@dataclass(eq=False)  # (identity: episodes are told apart, never compared)
class Episode:
    """One multi-turn rollout as it grows: ``ids`` is the prompt (``prompt_len`` tokens) and everything
    after it; ``model[t]`` whether token t was sampled by the model, ``logprobs[t]`` its engine logprob."""

    prompt: Any  # the prompt as rendered (an environment's reset() text appended)
    prompt_len: int
    ids: list[int]
    model: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)  # the completion as TRL's reward functions get it
    tools: dict = field(default_factory=dict)  # name -> callable
    environment: Any = None
    done: bool = False
    truncated: bool = False
    rounds: int = 0  # tool-calling rounds answered
    tool_calls: int = 0
    tool_failures: int = 0
    malformed: int = 0

    def __post_init__(self):
        self.model = self.model or [False] * len(self.ids)
        self.logprobs = self.logprobs or [0.0] * len(self.ids)

    @property
    def used(self) -> int:
        """Tokens after the prompt (the episode's share of the token budget)."""
        return len(self.ids) - self.prompt_len

    def add_model_turn(self, token_ids: list[int], logprobs: list[float]) -> None:
        if len(token_ids) != len(logprobs):
            raise ValueError(f"a model turn of {len(token_ids)} tokens with {len(logprobs)} logprobs")
        self.ids += token_ids
        self.model += [True] * len(token_ids)
        self.logprobs += [float(x) for x in logprobs]

    def add_tool_turn(self, token_ids: list[int]) -> None:
        self.ids += token_ids
        self.model += [False] * len(token_ids)
        self.logprobs += [0.0] * len(token_ids)


def episode_arrays(episodes: list[Episode], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The Rollout layout of ``episodes`` (each row's tokens first, then right padding): input_ids int64,
    attention_mask bool, response_mask bool (the model's tokens only), rollout_logprobs float32 (0 off
    the model's tokens); all [B, T]."""
    B, T = len(episodes), max(len(e.ids) for e in episodes)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=bool)
    response_mask = np.zeros((B, T), dtype=bool)
    logprobs = np.zeros((B, T), dtype=np.float32)
    for b, e in enumerate(episodes):
        n = len(e.ids)
        input_ids[b, :n] = e.ids
        attention_mask[b, :n] = True
        response_mask[b, :n] = e.model
        logprobs[b, :n] = e.logprobs
    return input_ids, attention_mask, response_mask, logprobs
