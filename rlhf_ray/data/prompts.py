"""Prompt sets for PPO: the user's files, or the built-in synthetic task.

A prompt file (JSONL, JSON or Parquet; local, or a remote URI read with Ray Data) holds one record per
prompt, TRL's prompt-only format: ``{"prompt": "text"}`` or ``{"prompt": [{"role": "user", "content":
...}, ...]}`` (a chat; ``messages`` is accepted in place of ``prompt``, as in chat SFT data). Every
other field is carried along and reaches the reward functions as a column of that name, as TRL
passes dataset columns to its reward functions.

:class:`PromptStream` draws the training prompts of each iteration: epoch after epoch, each a seeded
permutation of the whole set, ``ppo.prompts_per_iteration`` at a time; the prompts of an iteration
depend only on ``ppo.seed`` and its index, so a resumed or restarted run continues the stream where
its checkpoint left it (no prompt repeated or skipped). Without a file the synthetic task's
prompts are drawn as before (``rlhf_ray.data.synthetic``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from rlhf_ray.data import synthetic
from rlhf_ray.data.chat import Prompt, check_messages, is_chat
from rlhf_ray.data.files import DataError, iter_records

EVAL_SEED = 7919  # the synthetic task's held-out prompts (fixed: the same prompts every evaluation)
SYNTHETIC_EVAL_REWARD = "rlhf_ray.data.synthetic:gold"


class PromptRecord(NamedTuple):
    """One prompt and what travels with it to the reward functions."""

    prompt: Prompt  # text or messages
    columns: dict  # the record's other fields (reward-function keyword arguments)
    source: str  # where it came from, for error messages ("prompts.jsonl:17", "synthetic")


def validate_prompt(obj, where: str) -> PromptRecord:
    """A prompt-file record as a PromptRecord, or DataError naming ``where`` and the field."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    key = "prompt" if "prompt" in obj else "messages" if "messages" in obj else None
    if key is None:
        raise DataError(f"{where}: no field 'prompt' (or 'messages'); found {sorted(obj)}")
    prompt = obj[key]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field {key!r} is empty")
    else:
        try:
            prompt = check_messages(prompt, key)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        if key == "messages" and prompt[-1]["role"] == "assistant":  # an SFT conversation: prompt = before it
            prompt = prompt[:-1]
            if not prompt:
                raise DataError(f"{where}: field 'messages' holds only an assistant turn; nothing to prompt with")
    return PromptRecord(prompt, {k: v for k, v in obj.items() if k != key}, where)


def read_prompts(path: str) -> list[PromptRecord]:
    """Every record of a prompt file (local: read here; remote URI: Ray Data), validated."""
    records = [validate_prompt(obj, where) for where, obj in iter_records(path)]
    if not records:
        raise DataError(f"{path}: no records")
    return records


def fit_prompts(records: list[PromptRecord], renderer, max_tokens: int) -> tuple[list[PromptRecord], int]:
    """(records whose rendered prompt has at most ``max_tokens`` tokens, how many were skipped)."""
    kept = [r for r in records if len(renderer.prompt_ids(r.prompt)) <= max_tokens]
    return kept, len(records) - len(kept)


class PromptStream:
    """The training prompts of iteration ``it``: positions ``it * n .. it * n + n - 1`` of an endless
    stream made of epochs, each a permutation of ``records`` seeded by (seed, epoch)."""

    def __init__(self, records: list[PromptRecord], per_iteration: int, seed: int):
        if not records:
            raise DataError("no training prompts")
        self.records, self.n, self.seed = records, per_iteration, seed
        self._perm: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.records))}
        return self._perm[epoch]

    def positions(self, it: int) -> list[tuple[int, int]]:
        """(epoch, index into records) of iteration ``it``'s prompts."""
        N = len(self.records)
        return [(p // N, int(self._order(p // N)[p % N])) for p in range(it * self.n, (it + 1) * self.n)]

    def batch(self, it: int) -> list[PromptRecord]:
        return [self.records[i] for _, i in self.positions(it)]

    def extra(self, it: int, round_: int) -> list[PromptRecord]:
        """More prompts for iteration ``it`` (dynamic sampling's round ``round_`` >= 1): a draw of its
        own, seeded by (seed, it, round), that leaves the stream's iterations as they are."""
        rng = np.random.default_rng([self.seed, it, round_, 1])
        return [self.records[int(i)] for i in rng.choice(len(self.records), self.n, replace=self.n > len(self.records))]


class SyntheticStream:
    """The synthetic task's prompts: iteration ``it`` draws its own (seed ``seed * 1_000_003 + it``)."""

    def __init__(self, per_iteration: int, seed: int):
        self.n, self.seed = per_iteration, seed

    def batch(self, it: int) -> list[PromptRecord]:
        return [PromptRecord(p, {}, "synthetic task")
                for p in synthetic.prompts(self.n, seed=self.seed * 1_000_003 + it)]

    def extra(self, it: int, round_: int) -> list[PromptRecord]:
        """More prompts for iteration ``it`` (dynamic sampling's round ``round_`` >= 1), drawn apart."""
        seed = int(np.random.default_rng([self.seed, it, round_, 1]).integers(1 << 62))
        return [PromptRecord(p, {}, "synthetic task") for p in synthetic.prompts(self.n, seed=seed)]


@dataclass
class PromptTask:
    """What PPO samples from and evaluates on."""

    train: PromptStream | SyntheticStream
    held_out: list[PromptRecord]
    eval_reward: str  # "module:function" scoring held-out samples ("" = none)
    describe: str  # one line for the log
    skipped: dict = field(default_factory=dict)  # file -> prompts over ppo.max_prompt_tokens
    chat_template: str = "auto"  # how chats render: "auto", "none" or Jinja source (resolve_chat_template)


def load_prompt_task(ppo, renderer=None) -> PromptTask:
    """The prompts ``ppo`` (a PPOConfig) names: files (local ones are read and checked here; call it
    before starting Ray to fail fast), or the synthetic task when ``ppo.prompts_path`` is empty.
    ``renderer`` (a ChatRenderer of the policy's tokenizer) renders chats (its template is the task's
    ``chat_template``) and measures prompts against
    ``ppo.max_prompt_tokens``; prompts over it are skipped and counted. ``ppo.eval_reward`` = ``auto``
    is the synthetic task's gold reward for its prompts, else none."""
    eval_reward = ppo.eval_reward
    template = renderer.setting if renderer is not None else "auto"
    if not ppo.prompts_path:
        if ppo.eval_prompts_path:
            raise DataError("ppo.eval_prompts_path: set ppo.prompts_path too (the synthetic task has its own "
                            "held-out prompts)")
        held = [PromptRecord(p, {}, "synthetic task (held out)")
                for p in synthetic.prompts(ppo.eval_prompts or 64, seed=EVAL_SEED)]
        return PromptTask(SyntheticStream(ppo.prompts_per_iteration, ppo.seed), held,
                          SYNTHETIC_EVAL_REWARD if eval_reward == "auto" else eval_reward,
                          "the synthetic task's prompts", chat_template=template)
    skipped = {}

    def load(path: str) -> list[PromptRecord]:
        records = read_prompts(path)
        if renderer is None:
            return records
        try:
            kept, skipped[path] = fit_prompts(records, renderer, ppo.max_prompt_tokens)
        except ValueError as e:  # a chat record without a chat template
            raise DataError(f"{path}: {e}") from None
        if not kept:
            raise DataError(f"{path}: all {len(records)} prompts are longer than ppo.max_prompt_tokens="
                            f"{ppo.max_prompt_tokens} tokens (after the chat template); raise it")
        return kept

    train = load(ppo.prompts_path)
    if ppo.eval_prompts_path:
        held = load(ppo.eval_prompts_path)
        held = held[:ppo.eval_prompts] if ppo.eval_prompts else held
        where = f"{len(held)} held-out prompts from {ppo.eval_prompts_path}"
    else:  # hold out the file's last prompts, so that the evaluation is on prompts PPO never trains on
        n = min(ppo.eval_prompts or 64, len(train) // 5)
        if n == 0:
            raise DataError(f"{ppo.prompts_path}: {len(train)} prompts are too few to hold any out for "
                            f"evaluation; give ppo.eval_prompts_path")
        train, held = train[:-n], train[-n:]
        where = f"its last {n} held out for evaluation (no ppo.eval_prompts_path)"
    chats = sum(is_chat(r.prompt) for r in train)
    describe = (f"{len(train)} training prompts from {ppo.prompts_path} ({chats} chats), {where}"
                + "".join(f"; skipped {k} of {path} (over ppo.max_prompt_tokens={ppo.max_prompt_tokens})"
                          for path, k in skipped.items() if k))
    return PromptTask(PromptStream(train, ppo.prompts_per_iteration, ppo.seed), held,
                      "" if eval_reward == "auto" else eval_reward, describe, skipped, template)
