"""Scoring with a saved reward model, in-process (no Ray): what the RM service and PPO call.

For a prompt x with candidates y_1..y_K the RM gives rewards R(x, y_i) and the listwise model
P(y_i | x) = softmax_i R(x, y_i) (``rlhf_ray.ops.listwise_probs``). A prompt is text or a chat
(messages), rendered as in training (``rlhf_ray.data.chat``: the same token ids). Inputs longer than
``max_length`` tokens are cut by the training rule (``pad_sequences``: BOS, then the last tokens,
which end in EOS: the response is kept, the start of the prompt goes) and flagged as truncated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from rlhf_ray.data.chat import ChatRenderer, Completion, Prompt
from rlhf_ray.data.preferences import pad_sequences
from rlhf_ray.models.causal_lm import model_attention_mask
from rlhf_ray.ops import listwise_probs

Group = tuple[Prompt, list[Completion]]  # (prompt, candidate responses)


class GroupScore(NamedTuple):
    """The RM's answer for one prompt and its K candidates."""

    rewards: list[float]  # R(x, y_i), K values
    probs: list[float]  # P(y_i | x) = softmax(rewards), sums to 1
    best: int  # argmax_i rewards (the first one on ties)
    truncated: list[bool]  # y_i's input was cut to max_length tokens


class FlatScores(NamedTuple):
    rewards: np.ndarray  # float32 [N]
    truncated: np.ndarray  # bool [N]


def model_version(model_dir: str | Path) -> str:
    """``"epoch<E>-<sha256[:12] of the safetensors bytes>"`` with E the number of epochs trained (1-based, as
    the training logs and metrics count them; trainer_state.json's ``epoch`` is 0-based); ``epoch?`` without
    trainer state."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no model*.safetensors")
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    epoch = "?"
    state = model_dir / "trainer_state.json"
    if state.is_file():
        try:
            done = json.loads(state.read_text()).get("epoch")
            if isinstance(done, int) and not isinstance(done, bool):
                epoch = str(done + 1)
        except (ValueError, AttributeError):
            pass
    return f"epoch{epoch}-{digest.hexdigest()[:12]}"


def group_scores(rewards: np.ndarray, truncated: np.ndarray, sizes: list[int]) -> list[GroupScore]:
    """Split flat scores into groups of ``sizes`` (each >= 1) and add P(y_i|x) and the argmax.

    rewards: float [N]; truncated: bool [N]; sum(sizes) == N.
    """
    if not sizes:
        return []
    kmax = max(sizes)
    padded = torch.zeros((len(sizes), kmax), dtype=torch.float64)  # (B, Kmax)
    valid = torch.zeros((len(sizes), kmax), dtype=torch.bool)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for b, (s, k) in enumerate(zip(starts, sizes)):
        padded[b, :k] = torch.from_numpy(rewards[s:s + k].astype(np.float64))
        valid[b, :k] = True
    probs = listwise_probs(padded, valid)  # (B, Kmax), 0 at padding
    out = []
    for b, (s, k) in enumerate(zip(starts, sizes)):
        r = rewards[s:s + k]
        out.append(GroupScore(rewards=r.tolist(), probs=probs[b, :k].tolist(), best=int(np.argmax(r)),
                              truncated=truncated[s:s + k].tolist()))
    return out


class RewardScorer:
    """A saved RM directory (HF format or a Ray Train checkpoint), ready to score text and chats.

    ``chat_template``: ``auto`` (the checkpoint tokenizer's, which training stored), ``none``, or Jinja
    source. Loads safetensors only. Not thread-safe: call it from one thread at a time.
    """

    def __init__(self, model_dir: str | Path, max_length: int | None = None, batch_size: int = 256,
                 device: str | None = None, chat_template: str = "auto"):
        from rlhf_ray.models.reward import load_reward_model, rm_max_length

        self.model_dir = Path(model_dir).resolve()
        max_length = rm_max_length(self.model_dir) if max_length is None else max_length
        self.model_version = model_version(self.model_dir)
        self.model, self.tokenizer = load_reward_model(self.model_dir)
        self.renderer = ChatRenderer(self.tokenizer, chat_template)
        context = getattr(self.model.config, "max_position_embeddings", None)
        if max_length < 2 or (context is not None and max_length > context):
            raise ValueError(f"max_length={max_length}: must be in [2, {context}] (the model's context)")
        self.max_length, self.batch_size = max_length, batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)

    def score_flat(self, prompts: list[Prompt], responses: list[Completion]) -> FlatScores:
        """R(x_i, y_i) for aligned lists, and which inputs were truncated."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        texts = [self.renderer.pair_text(p, r) for p, r in zip(prompts, responses)]
        return self.score_ids(self.renderer.texts_ids(texts), [len(t) for t in texts])

    def score_texts(self, texts: list[str]) -> FlatScores:
        """R of texts already rendered (prompt and response in one string, e.g. from OpenRLHF): tokenized
        with BOS unless the text holds it, EOS unless it ends in it."""
        return self.score_ids(self.renderer.texts_ids(list(texts)), [len(t) for t in texts])

    def score_ids(self, seqs: list[list[int]], sizes: list[int] | None = None) -> FlatScores:
        """R of token id lists (each ending in EOS), cut to max_length by the training rule. Inputs of
        similar ``sizes`` (default: token counts; the callers pass characters) share a forward pass."""
        rewards = np.zeros(len(seqs), dtype=np.float32)
        truncated = np.zeros(len(seqs), dtype=bool)
        sizes = sizes or [len(s) for s in seqs]
        order = sorted(range(len(seqs)), key=lambda i: sizes[i])
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                ids, mask, cut = pad_sequences([seqs[i] for i in idx], self.renderer, self.max_length)  # (n, L), (n,)
                logits = self.model(input_ids=ids.to(self.device), use_cache=False,
                                    attention_mask=model_attention_mask(mask.to(self.device))).logits  # (right padded)
                rewards[idx] = logits[:, 0].float().cpu().numpy()
                truncated[idx] = cut.numpy()
        return FlatScores(rewards, truncated)

    def score_pairs(self, prompts: list[Prompt], responses: list[Completion]) -> np.ndarray:
        """Flat rewards, float32 [N], for aligned (prompt, response) lists (PPO's reward)."""
        return self.score_flat(prompts, responses).rewards

    def score_groups(self, groups: list[Group]) -> list[GroupScore]:
        """One forward over all candidates of all groups; each group needs at least one response."""
        sizes = [len(responses) for _, responses in groups]
        if any(k == 0 for k in sizes):
            raise ValueError(f"group {sizes.index(0)} has no responses")
        prompts = [p for p, responses in groups for _ in responses]
        flat = self.score_flat(prompts, [r for _, responses in groups for r in responses])
        return group_scores(flat.rewards, flat.truncated, sizes)
