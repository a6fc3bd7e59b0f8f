"""Reward functions for the SmolLM2 example, in TRL's convention: f(prompts, completions, **columns)
returns one float per sample (None where it does not apply). Completions of chat prompts are
[{"role": "assistant", "content": text}]."""

import re

from rlhf_ray.data import synthetic

_WORD = re.compile(r"[a-z]+")


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def mentions_product(prompts, completions, product=None, **kwargs):
    """1 when the answer names the product the prompt asks about (the prompt file's `product` column),
    else 0; None for a prompt without one."""
    products = product or [None] * len(completions)
    return [None if p is None else float(p in _text(c).lower()) for p, c in zip(products, completions)]


def review_sentiment(prompts, completions, product=None, **kwargs):
    """The synthetic task's judgement read on English: (positive - negative adjectives) / adjectives
    plus half the share of the product's own part names among the parts named, over the task's word
    lists (lower-cased; other words are ignored, as a real model writes real words). In [-1.5, 1.5]."""
    out = []
    for p, c in zip(product or [None] * len(completions), completions):
        words = _WORD.findall(_text(c).lower())
        pos = sum(w in synthetic.POSITIVE for w in words)
        neg = sum(w in synthetic.NEGATIVE for w in words)
        adjectives = pos + neg + sum(w in synthetic.NEUTRAL for w in words)
        nouns = [synthetic.NOUN_OWNER[w] for w in words if w in synthetic.NOUN_OWNER]
        topic = (sum(n == p for n in nouns) - sum(n != p for n in nouns)) / max(1, len(nouns)) if p else 0.0
        out.append((pos - neg) / max(1, adjectives) + 0.5 * topic)
    return out
