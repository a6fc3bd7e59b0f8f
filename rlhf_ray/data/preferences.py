"""Preference data: reading and validating records, and collation of variable-K groups.

Records, one per line of a JSONL file (or a JSON array, or a Parquet row):

* listwise: ``{"prompt", "responses": [y_1, ..., y_K], "best": b}`` (K >= 2 varies per record);
* pairwise, TRL's explicit-prompt form: ``{"prompt", "chosen", "rejected"}``, read as K = 2, best = 0;
* pairwise, TRL's implicit-prompt form: ``{"chosen", "rejected"}``; for chats the prompt is the
  messages both share from the start and the responses are the rest; for plain text the prompt is
  empty and each text is scored whole.

Prompts are plain text or chats (lists of ``{"role", "content"}``, TRL's conversational format); a
response is text, or for a chat the messages that complete it (usually one assistant turn). Every
record is normalised to the listwise form ``{"prompt", "responses", "best"}``; a malformed one stops
the read with the file, line (record, row) and field (:class:`rlhf_ray.data.files.DataError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ray.data.chat import ChatRenderer, check_messages, is_chat, rm_text  # noqa: F401 (rm_text re-exported)
from rlhf_ray.data.files import DataError, iter_records, write_jsonl  # noqa: F401 (re-exported)


def _text_or_chat(value, field: str, where: str):
    if isinstance(value, str):
        return value
    try:
        return check_messages(value, field)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


def _shared_prefix(chosen: list, rejected: list) -> int:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def _pairwise(obj: dict, where: str) -> dict:
    for key in ("chosen", "rejected"):
        if obj.get(key) is None:
            raise DataError(f"{where}: pairwise record needs field {key!r} (a string or a list of messages)")
    chosen, rejected = (_text_or_chat(obj[k], k, where) for k in ("chosen", "rejected"))
    if obj.get("prompt") is not None:  # explicit prompt
        prompt = _text_or_chat(obj["prompt"], "prompt", where)
        if not is_chat(prompt) and (is_chat(chosen) or is_chat(rejected)):
            raise DataError(f"{where}: field 'prompt' is text but 'chosen'/'rejected' are messages; give the "
                            f"prompt as messages too")
        return {"prompt": prompt, "responses": [chosen, rejected], "best": 0}
    if is_chat(chosen) != is_chat(rejected):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be text or both be messages")
    if not is_chat(chosen):  # implicit prompt, plain text: each text is scored whole
        return {"prompt": "", "responses": [chosen, rejected], "best": 0}
    n = _shared_prefix(chosen, rejected)
    if n == 0 or n == len(chosen) or n == len(rejected):
        raise DataError(f"{where}: 'chosen' and 'rejected' share {n} leading messages; an implicit prompt needs "
                        f"at least one shared message and a different completion after it (or give 'prompt')")
    return {"prompt": chosen[:n], "responses": [chosen[n:], rejected[n:]], "best": 0}


def validate_record(obj, where: str) -> dict:
    """Return the normalised listwise record or raise DataError naming ``where``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "chosen" in obj or "rejected" in obj:
        return _pairwise(obj, where)
    if obj.get("prompt") is None:
        raise DataError(f"{where}: field 'prompt' must be a string or a list of messages")
    prompt = _text_or_chat(obj["prompt"], "prompt", where)
    responses = obj.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{where}: field 'responses' must be a list of at least 2 responses")
    for i, r in enumerate(responses):
        if isinstance(r, list) and is_chat(prompt):
            _text_or_chat(r, f"responses[{i}]", where)
        elif not isinstance(r, str):
            raise DataError(f"{where}: responses[{i}] must be a string"
                            f"{' or a list of messages' if is_chat(prompt) else ''}, got {type(r).__name__}")
    best = obj.get("best")
    if isinstance(best, float) and best.is_integer():  # a table column of ints with gaps reads as floats
        best = int(best)
    if not isinstance(best, int) or isinstance(best, bool) or not 0 <= best < len(responses):
        raise DataError(f"{where}: field 'best' must be an integer in [0, {len(responses) - 1}], got {best!r}")
    return {"prompt": prompt, "responses": list(responses), "best": best}


def read_preferences(path: str | Path) -> list[dict]:
    """Read and validate a preference file: local JSONL, JSON or Parquet (read here), or a remote URI
    (``s3://...``: read with Ray Data on the Ray cluster this process has joined)."""
    records = [validate_record(obj, where) for where, obj in iter_records(path)]
    if not records:
        raise DataError(f"{path}: no records")
    return records


read_jsonl = read_preferences  # the name earlier versions used


@dataclass
class RMBatch:
    """A collated group of records; candidates are flattened for one forward pass.

    input_ids, attention_mask: long [N, L] with N = sum_n K_n;
    index: long [B, Kmax] position of each candidate in the flat axis (0 at padding);
    valid: bool [B, Kmax]; best: long [B].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    best: torch.Tensor
    truncated: int  # how many sequences were cut to max_length

    def to(self, device) -> RMBatch:
        """The same batch with its tensors on ``device`` (the model's, e.g. a GPU under Ray Train)."""
        move = lambda t: t.to(device)  # noqa: E731
        return RMBatch(move(self.input_ids), move(self.attention_mask), move(self.index), move(self.valid),
                       move(self.best), self.truncated)


def pad_token_id(tokenizer) -> int:
    """The id RM inputs are padded with: the tokenizer's pad token, else its EOS (GPT-2 and Llama tokenizers
    have no pad token). The reward model's ``config.pad_token_id`` must be the same id, as the head reads
    the last token that is not padding (``init_reward_model`` sets both)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"{type(tokenizer).__name__}: the tokenizer has neither a pad nor an EOS token")
    return pad


def as_renderer(tokenizer_or_renderer) -> ChatRenderer | None:
    """A ChatRenderer as given, or the tokenizer's own (``data.chat_template=auto``); None for None."""
    if tokenizer_or_renderer is None or isinstance(tokenizer_or_renderer, ChatRenderer):
        return tokenizer_or_renderer
    return ChatRenderer(tokenizer_or_renderer)


def pad_sequences(seqs: list[list[int]], renderer, max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded RM inputs from token id lists that end in EOS (``ChatRenderer.pair_ids``). One
    longer than ``max_length`` keeps its LAST tokens (the response the reward is about, and the end of
    the prompt), after its first token when that is BOS.
    Returns (ids long [N, L], mask long [N, L], truncated bool [N])."""
    renderer = as_renderer(renderer)
    bos = renderer.bos
    out, truncated = [], torch.zeros(len(seqs), dtype=torch.bool)
    for i, ids in enumerate(seqs):
        if len(ids) > max_length:
            head = ids[:1] if bos is not None and ids[0] == bos else []
            ids = head + ids[len(ids) - (max_length - len(head)):]
            truncated[i] = True
        out.append(ids)
    length = max(len(s) for s in out)
    input_ids = torch.full((len(out), length), pad_token_id(renderer.tokenizer), dtype=torch.long)
    mask = torch.zeros((len(out), length), dtype=torch.long)
    for i, s in enumerate(out):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return input_ids, mask, truncated


def encode_pairs(renderer, prompts: list, responses: list, max_length: int):
    """The RM's input for aligned (prompt, response) lists, the same in training, serving and PPO
    scoring: ``pair_ids`` of each pair, cut and padded by :func:`pad_sequences`."""
    renderer = as_renderer(renderer)
    return pad_sequences(renderer.pairs_ids(prompts, responses), renderer, max_length)


def encode_texts(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain texts as RM inputs (each as ``ChatRenderer.text_ids``: BOS unless the text holds it, EOS
    unless it ends in it), cut and padded by :func:`pad_sequences`."""
    renderer = as_renderer(tokenizer)
    return pad_sequences(renderer.texts_ids(texts), renderer, max_length)


def collate(records: list[dict], renderer, max_length: int) -> RMBatch:
    """``renderer``: a ChatRenderer, or a tokenizer (then its own chat template renders chat records)."""
    prompts, responses, index_rows = [], [], []
    for r in records:
        start = len(prompts)
        prompts.extend([r["prompt"]] * len(r["responses"]))
        responses.extend(r["responses"])
        index_rows.append(list(range(start, len(prompts))))
    kmax = max(len(row) for row in index_rows)
    index = torch.zeros((len(records), kmax), dtype=torch.long)
    valid = torch.zeros((len(records), kmax), dtype=torch.bool)
    for b, row in enumerate(index_rows):
        index[b, : len(row)] = torch.tensor(row)
        valid[b, : len(row)] = True
    input_ids, mask, truncated = encode_pairs(renderer, prompts, responses, max_length)
    best = torch.tensor([r["best"] for r in records], dtype=torch.long)
    return RMBatch(input_ids, mask, index, valid, best, int(truncated.sum()))
