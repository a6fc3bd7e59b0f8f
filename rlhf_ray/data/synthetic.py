"""The built-in synthetic preference task: short product reviews with a hidden gold reward.

Prompts name a product (``review of the blender :``); responses are short reviews made of clauses
``the <noun> is <adjective>`` joined by ``and``, ending in ``.``. Each product has its own topic nouns.

Gold reward (documented, deterministic, over text only)::

    gold(x, y) = sentiment + 0.5 * topic - 0.25 * unknown_words - 0.5 * [no clause]
    sentiment  = (#positive adjectives - #negative adjectives) / max(1, #adjectives)     in [-1, 1]
    topic      = (#nouns of x's product - #nouns of other products) / max(1, #nouns)     in [-1, 1]

so a fluent, positive, on-topic review scores 1.5, and the ratios make the score length-invariant
(padding a review with more clauses earns nothing). Preference labels are drawn from
``softmax(gold / T)`` over a record's candidates (label noise), so the accuracy of the gold reward
itself on those labels is the ceiling any RM can reach.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

PRODUCTS: dict[str, tuple[str, ...]] = {
    "blender": ("blade", "motor", "jar", "lid"),
    "laptop": ("screen", "keyboard", "battery", "fan"),
    "phone": ("camera", "speaker", "case", "charger"),
    "kettle": ("spout", "handle", "switch", "base"),
    "backpack": ("strap", "zipper", "pocket", "fabric"),
    "headphones": ("cushion", "cable", "sound", "band"),
    "lamp": ("bulb", "shade", "cord", "stand"),
    "chair": ("seat", "leg", "armrest", "wheel"),
}
POSITIVE = ("great", "excellent", "sturdy", "perfect", "reliable", "lovely", "solid", "superb")
NEGATIVE = ("broken", "awful", "flimsy", "noisy", "cheap", "useless", "poor", "terrible")
NEUTRAL = ("ok", "average", "fine", "normal")
FUNCTION_WORDS = ("the", "is", "and", ".", "review", "of", ":", "very", "really")
INTENSIFIERS = ("very", "really")

NOUN_OWNER = {n: p for p, nouns in PRODUCTS.items() for n in nouns}
VOCAB = set(FUNCTION_WORDS) | set(POSITIVE) | set(NEGATIVE) | set(NEUTRAL) | set(NOUN_OWNER) | set(PRODUCTS)


def make_prompt(product: str) -> str:
    return f"review of the {product} :"


def chat_prompt(product: str) -> list[dict]:
    """The task's prompt for a chat model: one user message."""
    return [{"role": "user", "content": f"Write a short review of the {product}."}]


def as_chat(record: dict) -> dict:
    """A plain preference record ``{"prompt", "responses", "best"}`` as a chat record: the prompt as a
    user message, each response as the assistant's turn (a string)."""
    return {**record, "prompt": chat_prompt(product_of(record["prompt"]))}


def _text(x) -> str:
    """Plain text, or the contents of a chat's messages."""
    return x if isinstance(x, str) else " ".join(m.get("content", "") for m in x)


def product_of(prompt) -> str | None:
    """The product a prompt (text or chat) asks about."""
    for word in _text(prompt).replace(".", " ").replace(":", " ").replace("?", " ").split():
        if word.lower() in PRODUCTS:
            return word.lower()
    return None


@dataclass(frozen=True)
class GoldBreakdown:
    sentiment: float
    topic: float
    unknown: int
    clauses: int
    score: float


def gold_breakdown(prompt: str, response: str) -> GoldBreakdown:
    """The hidden gold reward of ``response`` to ``prompt``, with its parts (see module docstring)."""
    product = product_of(prompt)
    words = response.replace(".", " . ").split()
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    adjectives = pos + neg + sum(w in NEUTRAL for w in words)
    nouns = [w for w in words if w in NOUN_OWNER]
    on = sum(NOUN_OWNER[w] == product for w in nouns)
    off = len(nouns) - on
    unknown = sum(w not in VOCAB for w in words)
    clauses = min(adjectives, len(nouns))
    sentiment = (pos - neg) / max(1, adjectives)
    topic = (on - off) / max(1, len(nouns))
    score = sentiment + 0.5 * topic - 0.25 * unknown - 0.5 * (clauses == 0)
    return GoldBreakdown(sentiment, topic, unknown, clauses, score)


def gold_reward(prompt: str, response: str) -> float:
    return gold_breakdown(prompt, response).score


def gold(prompts: list, completions: list, **kwargs) -> list[float]:
    """The gold reward as a reward function (TRL's convention: prompts and completions as text or
    messages, extra columns ignored). PPO evaluates the synthetic task's held-out samples with it."""
    return [gold_reward(_text(p), _text(c)) for p, c in zip(prompts, completions)]


def sample_response(rng: random.Random, product: str, p_positive: float | None = None,
                    p_on_topic: float | None = None, max_clauses: int = 3) -> str:
    """A fluent review with a random mix of sentiment and topicality (the SFT/candidate distribution)."""
    p_pos = rng.random() if p_positive is None else p_positive
    p_on = rng.random() if p_on_topic is None else p_on_topic
    clauses = []
    for _ in range(rng.randint(1, max_clauses)):
        if rng.random() < p_on:
            noun = rng.choice(PRODUCTS[product])
        else:
            noun = rng.choice(NOUN_OWNER_LIST)
        r = rng.random()
        if r < 0.15:
            adj = rng.choice(NEUTRAL)
        elif r < 0.15 + 0.85 * p_pos:
            adj = rng.choice(POSITIVE)
        else:
            adj = rng.choice(NEGATIVE)
        inten = rng.choice(INTENSIFIERS) + " " if rng.random() < 0.2 else ""
        clauses.append(f"the {noun} is {inten}{adj}")
    return " and ".join(clauses) + " ."


NOUN_OWNER_LIST = sorted(NOUN_OWNER)
PRODUCT_LIST = sorted(PRODUCTS)


def corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, response) pairs for SFT and for building the tokenizer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        product = rng.choice(PRODUCT_LIST)
        out.append((make_prompt(product), sample_response(rng, product)))
    return out


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [make_prompt(rng.choice(PRODUCT_LIST)) for _ in range(n)]


def preference_records(n: int, seed: int, min_k: int = 2, max_k: int = 8,
                       temperature: float = 0.25) -> list[dict]:
    """``n`` records ``{"prompt", "responses", "best"}`` with K ~ U{min_k..max_k} and noisy labels.

    ``best`` ~ softmax(gold / temperature) over the record's candidates.
    """
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        product = rng.choice(PRODUCT_LIST)
        prompt = make_prompt(product)
        k = rng.randint(min_k, max_k)
        responses = [sample_response(rng, product) for _ in range(k)]
        gold = [gold_reward(prompt, r) for r in responses]
        m = max(gold)
        weights = [math.exp((g - m) / temperature) for g in gold]
        best = rng.choices(range(k), weights=weights)[0]
        records.append({"prompt": prompt, "responses": responses, "best": best})
    return records


def gold_top1_accuracy(records: list[dict]) -> float:
    """Accuracy of the gold reward's argmax on the (noisy) labels: the ceiling for any RM."""
    hits = 0
    for r in records:
        gold = [gold_reward(r["prompt"], y) for y in r["responses"]]
        hits += max(range(len(gold)), key=gold.__getitem__) == r["best"]
    return hits / max(1, len(records))
