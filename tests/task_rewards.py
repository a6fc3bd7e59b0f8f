"""Reward functions in TRL's convention, used by the tests (a module outside the package: it reaches
Ray workers as the scorer's py_modules)."""


def words(prompts, completions, completion_ids, **kwargs):
    """Number of words in the response (text or the assistant message of a chat)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(t.split())) for t in texts]


def mentions(prompts, completions, product=None, **kwargs):
    """1 when the response names the record's ``product`` column, 0 when not, None without a product."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [None if p is None else float(p in t) for p, t in zip(product or [None] * len(texts), texts)]


def token_count(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def seen_columns(prompts, completions, completion_ids, **kwargs):
    """Records which keyword arguments it was called with (for the test of the calling convention)."""
    seen_columns.calls.append(sorted(kwargs))
    return [0.0] * len(prompts)


seen_columns.calls = []


def fails_on_once(prompts, completions, **kwargs):
    for c in completions:
        if "once" in (c if isinstance(c, str) else c[-1]["content"]):
            raise ValueError("cannot score stories")
    return [0.0] * len(completions)


def too_few(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def not_a_number(prompts, completions, **kwargs):
    return ["high"] * len(completions)


def says_great(prompts, completions, **kwargs):
    """1 when the response has the word "great", else 0: a binary reward whose groups often tie."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float("great" in t.split()) for t in texts]
