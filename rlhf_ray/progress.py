"""Progress of the long stages (SFT steps, RM epochs, PPO iterations) as plain lines: each says how far
the stage is and how long the rest should take, so a log file reads the same as a terminal."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``; ``3725`` -> ``"1h02m"``; ``9.4`` -> ``"9s"``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(done: int, total: int, elapsed: float) -> str:
    """Time left for ``total`` units when ``done`` of them took ``elapsed`` seconds (at that rate)."""
    if done <= 0:
        return "eta ?"
    return f"eta {duration(elapsed / done * max(total - done, 0))}"
