"""Token logprobs and entropy from hidden states, a chunk of tokens at a time.

The LM head's logits are the largest tensor of a learner step: [B, T, V] in float32 is 1.6 GB for a 49k
vocabulary at 8 x 1024 tokens, and autograd keeps them for backward. Here the logits of at most
``chunk_tokens`` tokens exist at once; under autograd each chunk but the last is checkpointed (its
logits are recomputed from the hidden states in backward), so what a step keeps is the hidden states,
two floats per token and the last chunk's graph. Only the tokens selected by ``mask`` are computed at all (padding is skipped).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .ppo import entropy_from_logits, logprobs_from_logits


def _chunk(hidden: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
           with_entropy: bool, entropy_grad: bool) -> tuple[Tensor, Tensor]:
    """hidden [c, H], labels long [c] -> (logprobs float32 [c], entropy float32 [c] (zeros without))."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if temperature != 1.0:
        logits = logits / temperature
    lp = logprobs_from_logits(logits, labels)
    if not with_entropy:
        return lp, torch.zeros_like(lp)
    return lp, entropy_from_logits(logits if entropy_grad else logits.detach())


def chunked_logprobs_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, *,
                             bias: Tensor | None = None, temperature: float = 1.0, chunk_tokens: int = 1024,
                             with_entropy: bool = False, entropy_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """log softmax((hidden @ weight.T + bias) / temperature)[labels] and the entropy of that softmax.

    hidden [B, T, H] (the model's last hidden states, after its final norm), weight [V, H] (the LM
    head), labels long [B, T], mask bool [B, T] (which positions to compute; the others are 0) ->
    (logprobs float32 [B, T], entropy float32 [B, T] or None). ``entropy_grad=False``: the entropy is a
    statistic (no gradient through it). Equal to ``logprobs_from_logits`` / ``entropy_from_logits`` of
    the full logits up to float rounding; ``chunk_tokens`` <= 0: all selected tokens in one chunk.
    """
    B, T, H = hidden.shape
    flat = mask.reshape(-1).nonzero().squeeze(-1)
    h, y = hidden.reshape(B * T, H).index_select(0, flat), labels.reshape(-1).index_select(0, flat)
    n = h.shape[0]
    step = n if chunk_tokens <= 0 else chunk_tokens
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    lps, ents = [], []
    for i in range(0, n, max(step, 1)):
        args = (h[i:i + step], y[i:i + step], weight, bias, temperature, with_entropy, entropy_grad)
        # The last chunk is not checkpointed: its backward comes first, so recomputing its logits would only
        # repeat them (the peak is one chunk's graph either way); one chunk for all tokens: no recompute.
        last = i + step >= n
        lp, ent = checkpoint(_chunk, *args, use_reentrant=False) if grad and not last else _chunk(*args)
        lps.append(lp)
        ents.append(ent)

    def scatter(parts: list[Tensor]) -> Tensor:
        out = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
        if parts:
            out = out.index_put((flat,), torch.cat(parts))
        return out.view(B, T)

    return scatter(lps), scatter(ents) if with_entropy else None
