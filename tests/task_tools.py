"""Tools and environments in TRL's convention (written as for GRPOTrainer(tools=..., environment_factory=...)),
used by the tests and the docs' example."""

from __future__ import annotations

import ast
import asyncio
import operator
import time

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression of integers with +, - and *.

    Args:
        expression: The expression, e.g. "2+3*4".
    """
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not an arithmetic expression: {expression!r}")
    return str(value(ast.parse(expression, mode="eval").body))


def fail(reason: str) -> str:
    """Always raises.

    Args:
        reason: Why it fails.
    """
    raise RuntimeError(f"tool failed: {reason}")


def hang(seconds: int) -> str:
    """Sleeps, then answers.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "woke up"


async def lookup(key: str) -> str:
    """Looks a key up (asynchronously).

    Args:
        key: The key.
    """
    await asyncio.sleep(0.01)
    return {"a": "alpha", "b": "beta"}.get(key, "unknown")


class Counter:
    """A counter the model moves; it owns the reward: minus the distance to the record's target."""

    def __init__(self):
        self.value, self.target = 0, 0

    def reset(self, target: int = 3, **kwargs) -> str:
        self.value, self.target = 0, int(target)
        return f" (reach {self.target})"

    def step(self, by: int) -> str:
        """Adds to the counter.

        Args:
            by: How much to add.
        """
        self.value += by
        return f"counter = {self.value}"

    def get_reward(self) -> float:
        return -float(abs(self.target - self.value))


class Echo:
    """An environment without a reward of its own; reset adds nothing to the prompt."""

    def reset(self, **kwargs) -> None:
        return None

    def echo(self, text: str) -> str:
        """Repeats the text.

        Args:
            text: The text.
        """
        return text


def make_counter() -> Counter:
    return Counter()
