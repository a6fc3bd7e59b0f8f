"""Preference data: JSONL reading/validation and collation of variable-K groups.

A record is ``{"prompt": str, "responses": [str, ...], "best": int}`` (K = len(responses) >= 2 varies
per record), or pairwise ``{"prompt": str, "chosen": str, "rejected": str}``, read as K = 2, best = 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


class DataError(ValueError):
    """Malformed input; the message names the file, the line and the reason."""


def validate_record(obj, where: str) -> dict:
    """Return the normalised listwise record or raise DataError naming ``where``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "chosen" in obj or "rejected" in obj:
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: pairwise record needs string field {key!r}")
        return {"prompt": obj["prompt"], "responses": [obj["chosen"], obj["rejected"]], "best": 0}
    if not isinstance(obj.get("prompt"), str):
        raise DataError(f"{where}: field 'prompt' must be a string")
    responses = obj.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{where}: field 'responses' must be a list of at least 2 strings")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(f"{where}: responses[{i}] must be a string, got {type(r).__name__}")
    best = obj.get("best")
    if not isinstance(best, int) or isinstance(best, bool) or not 0 <= best < len(responses):
        raise DataError(f"{where}: field 'best' must be an integer in [0, {len(responses) - 1}], got {best!r}")
    return {"prompt": obj["prompt"], "responses": list(responses), "best": best}


def read_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a preference JSONL file (UTF-8); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            records.append(validate_record(obj, f"{path}:{lineno}"))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def rm_text(prompt: str, response: str) -> str:
    """How a (prompt, response) pair is shown to the RM: the same text the policy writes."""
    return f"{prompt} {response.strip()}"


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


def encode_texts(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids + mask; every sequence ends in EOS (the RM reads the last token). One longer
    than ``max_length`` keeps its LAST tokens (the response the reward is about, and the end of the
    prompt), after the BOS token when the tokenizer adds one.
    Returns (ids long [N, L], mask long [N, L], truncated bool [N])."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    seqs, truncated = [], torch.zeros(len(encoded), dtype=torch.bool)
    for i, ids in enumerate(encoded):
        ids = list(ids) + [eos]
        if len(ids) > max_length:
            head = ids[:1] if bos is not None and ids[0] == bos else []
            ids = head + ids[len(ids) - (max_length - len(head)):]
            truncated[i] = True
        seqs.append(ids)
    length = max(len(s) for s in seqs)
    pad = pad_token_id(tokenizer)
    input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return input_ids, mask, truncated


def collate(records: list[dict], tokenizer, max_length: int) -> RMBatch:
    texts, index_rows = [], []
    for r in records:
        start = len(texts)
        texts.extend(rm_text(r["prompt"], y) for y in r["responses"])
        index_rows.append(list(range(start, len(texts))))
    kmax = max(len(row) for row in index_rows)
    index = torch.zeros((len(records), kmax), dtype=torch.long)
    valid = torch.zeros((len(records), kmax), dtype=torch.bool)
    for b, row in enumerate(index_rows):
        index[b, : len(row)] = torch.tensor(row)
        valid[b, : len(row)] = True
    input_ids, mask, truncated = encode_texts(tokenizer, texts, max_length)
    best = torch.tensor([r["best"] for r in records], dtype=torch.long)
    return RMBatch(input_ids, mask, index, valid, best, int(truncated.sum()))
