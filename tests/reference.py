"""Plain reference implementations the batched code under test is checked against."""

from __future__ import annotations

import torch

from rlhf_ray.data.preferences import encode_texts, rm_text


@torch.no_grad()
def rm_rewards(model, tokenizer, prompts: list[str], responses: list[str], max_length: int) -> list[float]:
    """R(x_i, y_i) one pair at a time (no batching, no padding, no reordering)."""
    out = []
    for p, r in zip(prompts, responses):
        ids, mask, _ = encode_texts(tokenizer, [rm_text(p, r)], max_length)
        out.append(float(model(input_ids=ids, attention_mask=mask).logits[0, 0]))
    return out
