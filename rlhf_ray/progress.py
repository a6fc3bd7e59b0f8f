"""Progress of the long stages (SFT steps, RM epochs, PPO iterations) as plain lines: each says how far
the stage is and how long the rest should take, so a log file reads the same as a terminal. On a
terminal the stages that run in the driver (SFT, PPO) also draw a bar (:class:`Bar`)."""

from __future__ import annotations

import os
import sys


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


class Bar:
    """A progress bar (tqdm: rate and time left) over a stage that runs in this process, drawn only when
    ``log`` is ``print`` and stdout is a terminal; otherwise nothing is drawn and the stage's own lines
    (which carry the time left) are all there is. Lines go through :meth:`log`, above the bar."""

    def __init__(self, total: int, desc: str, log=print, initial: int = 0):
        self._log, self._bar = log, None
        if log is print and sys.stdout.isatty() and sys.stderr.isatty() and not os.environ.get("TQDM_DISABLE"):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="it", leave=False, dynamic_ncols=True)

    def log(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            self._log(line)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
