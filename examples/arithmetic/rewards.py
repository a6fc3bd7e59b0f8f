"""The arithmetic example's verifier, in TRL's reward-function convention: 1 when the first number in
the answer is the sum (the prompt file's `answer` column), else 0."""

import re

_NUMBER = re.compile(r"-?\d+")


def correct(prompts, completions, answer=None, **kwargs):
    """1.0 when the completion's first integer equals the record's ``answer``, else 0.0 (None without one)."""
    out = []
    for completion, want in zip(completions, answer or [None] * len(completions)):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        found = _NUMBER.search(text)
        out.append(None if want is None else float(found is not None and int(found.group()) == int(want)))
    return out
