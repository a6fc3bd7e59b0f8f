"""What the PPO stages need from a Hugging Face causal LM beyond its forward: whether its logits can be
computed a chunk of tokens at a time, and token logprobs of a batch that way (the reference policy's)."""

from __future__ import annotations

import torch
from torch import nn

from rlhf_ray.ops import chunked_logprobs_entropy, logprobs_from_logits


def head_is_last(model, tokens: int = 8) -> bool:
    """Whether ``model``'s logits are its output embedding applied to its base model's last hidden state
    and nothing more (checked on a few tokens): what computing them a chunk at a time needs. Models that
    transform their logits after the head (soft-capping, scaling) are run whole."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or model.base_model is model:
        return False
    device = head.weight.device
    ids = torch.arange(tokens, device=device).remainder(head.out_features).unsqueeze(0)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.float()
        mine = head(model.base_model(input_ids=ids, use_cache=False).last_hidden_state).float()
    return bool(torch.allclose(full, mine, rtol=1e-4, atol=1e-4 * max(1.0, float(full.abs().max()))))


def model_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """What to pass a causal LM as its attention mask: None when every row is right-padded (its real
    tokens first), the mask as long otherwise. A causal LM's real tokens never attend to padding after
    them, so with right padding the mask changes nothing they compute (the position ids are the same
    0, 1, ...), and without one attention takes its causal fast path (SDPA's ``is_causal``).
    attention_mask: bool/0-1 [B, T]."""
    m = attention_mask.bool()
    if bool(m[:, 0].all()) and bool((m[:, 1:] <= m[:, :-1]).all()):
        return None
    return attention_mask.long()


@torch.no_grad()
def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64,
                      temperature: float = 1.0, chunk_tokens: int = 0,
                      score_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for every column t >= 1 of a right-padded batch; column 0 is 0;
    pi = softmax(logits / temperature).

    input_ids: long [B, T], attention_mask: bool/0-1 [B, T] -> float32 [B, T] (on the CPU).
    ``chunk_tokens`` > 0: the logits of at most that many tokens exist at once, computed from the last
    hidden states (``model`` must pass :func:`head_is_last`), and padding columns are 0 instead of
    computed; 0: each batch's whole [b, T, V] logits. ``score_mask`` [B, T]: in chunks, only these
    columns are computed (the others are 0), e.g. the response tokens.
    """
    out = torch.zeros(input_ids.shape, dtype=torch.float32)
    score_mask = attention_mask if score_mask is None else score_mask
    for i in range(0, len(input_ids), batch_size):
        ids, am = input_ids[i:i + batch_size], attention_mask[i:i + batch_size]
        if chunk_tokens > 0:
            hidden = model.base_model(input_ids=ids, attention_mask=model_attention_mask(am),
                                      use_cache=False).last_hidden_state
            head = model.get_output_embeddings()
            sm = score_mask[i:i + batch_size]
            lp, _ = chunked_logprobs_entropy(hidden[:, :-1], head.weight, ids[:, 1:], sm[:, 1:].bool(),
                                             bias=head.bias, temperature=temperature, chunk_tokens=chunk_tokens)
        else:
            logits = model(input_ids=ids, attention_mask=model_attention_mask(am), use_cache=False).logits  # (b, T, V)
            if temperature != 1.0:
                logits = logits / temperature
            lp = logprobs_from_logits(logits[:, :-1], ids[:, 1:])
        out[i:i + batch_size, 1:] = lp.float().cpu()
    return out
