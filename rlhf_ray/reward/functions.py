"""Programmatic rewards in TRL's reward-function convention.

A reward function is any callable ``f(prompts, completions, completion_ids, **columns)`` returning one
number per sample, or None where it does not apply (that sample's sum leaves it out, as TRL's
``nansum`` does). It is called by keyword exactly as TRL's GRPO trainer calls it:

* ``prompts``: the prompts as given (text, or a list of messages for a chat);
* ``completions``: the generated text for plain prompts, ``[{"role": "assistant", "content": text}]``
  for chats;
* ``completion_ids``: the generated token ids (lists of ints; a stop token is included);
* ``trainer_state``: a :class:`TrainerState` (TRL passes transformers' ``TrainerState``): ``global_step``,
  the updates the sampling policy has had, and ``max_steps`` (``ppo.iterations``), e.g. for a curriculum;
* ``**columns``: every other field of the prompt records, one list per field.

A function may be ``async def`` (an API-based judge, say): it is awaited, as TRL does.

So a function written for TRL works unchanged. Functions are named ``module:function``, imported in
the driver (its working directory is importable); the code of a module that is not installed (a file
in the working directory) travels to the Ray actor that calls it, on any node (:func:`ship_by_value`). A function that raises, returns the wrong number of values or a value that
is not a number stops the run with :class:`RewardFunctionError`, naming the function and the record.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np


class RewardFunctionError(ValueError):
    """A reward function failed; the message names it and the record."""


class TrainerState(NamedTuple):
    """The training progress a reward function sees as ``trainer_state`` (the fields of transformers'
    ``TrainerState`` that a reward function reads)."""

    global_step: int = 0  # optimizer updates of the policy that sampled the batch (its version)
    max_steps: int = 0  # ppo.iterations


class RewardFunction(NamedTuple):
    name: str  # "module:function", as configured
    weight: float
    fn: Callable

    @property
    def key(self) -> str:
        """Its metric name: ``rewards/<function name>`` (TRL logs ``rewards/<name>/mean``)."""
        return f"rewards/{self.name.rpartition(':')[2]}"


def import_function(name: str, field: str) -> Callable:
    """The callable ``module:function`` names; the current directory is importable, as for a script.
    Raises RewardFunctionError naming ``field`` when it cannot be imported."""
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise RewardFunctionError(f"{field}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardFunctionError(f"{field}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                                  f"function {attr!r}")
    return fn


def load_reward_functions(configs, field: str = "ppo.reward_functions") -> list[RewardFunction]:
    """RewardFunctions of ``configs`` (RewardFunctionConfig: name, weight), imported and checked."""
    out = [RewardFunction(c.name, float(c.weight), import_function(c.name, f"{field}[{i}].name"))
           for i, c in enumerate(configs)]
    keys = [f.key for f in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise RewardFunctionError(f"{field}: two functions share the name {dup[0].split('/', 1)[1]!r}; their metrics "
                                  f"would mix")
    return out


def load_eval_function(name: str, field: str = "ppo.eval_reward") -> RewardFunction | None:
    """The evaluation function ``name`` ("module:function"; "" = none)."""
    return RewardFunction(name, 0.0, import_function(name, field)) if name else None


def local_module(fn: Callable):
    """The module of ``fn`` when it is not installed (it lives outside site-packages, the standard
    library and this package: a file in the working directory), else None."""
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    top = sys.modules.get((getattr(module, "__name__", "") or "").split(".")[0])
    file = getattr(top, "__file__", None)
    if not file and getattr(top, "__path__", None):  # a namespace package (a directory without __init__.py)
        file = str(Path(list(top.__path__)[0]) / "__init__.py")
    if not file:
        return None
    path = Path(file).resolve()
    if any(part in ("site-packages", "dist-packages") for part in path.parts):
        return None
    if path.is_relative_to(Path(sys.base_prefix).resolve()) or path.is_relative_to(Path(sys.prefix).resolve()):
        return None
    import rlhf_ray

    if path.is_relative_to(Path(rlhf_ray.__file__).resolve().parent):
        return None
    return module


def ship_by_value(functions: list[RewardFunction]) -> list[RewardFunction]:
    """Make the functions of modules that are not installed travel with their code: their modules are
    registered with Ray's cloudpickle to be pickled by value, so an actor on any node of the cluster
    gets the function without the module being importable there. Installed ones go by name."""
    import ray.cloudpickle

    for f in functions:
        module = local_module(f.fn)
        if module is not None:
            ray.cloudpickle.register_pickle_by_value(module)
    return functions


def _values(out, n: int, name: str, sources: list[str]) -> np.ndarray:
    if isinstance(out, np.ndarray) or hasattr(out, "tolist"):
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardFunctionError(f"reward function {name} returned {type(out).__name__}; expected a list of {n} "
                                  f"numbers (or None)")
    if len(out) != n:
        raise RewardFunctionError(f"reward function {name} returned {len(out)} values for {n} samples")
    values = np.full(n, np.nan)
    for i, v in enumerate(out):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise RewardFunctionError(f"reward function {name} returned {v!r} for sample {i} (prompt record "
                                      f"{sources[i]}); expected a finite number or None")
        values[i] = float(v)
    return values


def call_reward_function(name: str, fn: Callable, prompts: list, completions: list, completion_ids: list,
                         columns: dict[str, list], sources: list[str], state: TrainerState = TrainerState()
                         ) -> np.ndarray:
    """``fn``'s values for the batch, float64 [B] (NaN where it returned None); an async function is
    awaited. An exception is traced to the first sample that raises alone and reported naming ``name``
    and that sample's ``sources`` entry (file and line of its prompt record)."""
    import asyncio
    import inspect

    n = len(prompts)

    def call(idx: list[int]):
        out = fn(prompts=[prompts[i] for i in idx], completions=[completions[i] for i in idx],
                 completion_ids=[completion_ids[i] for i in idx], trainer_state=state,
                 **{k: [v[i] for i in idx] for k, v in columns.items() if k != "trainer_state"})
        return asyncio.run(out) if inspect.isawaitable(out) else out

    try:
        out = call(list(range(n)))
    except Exception as e:
        culprit = None
        for i in range(n):
            try:
                call([i])
            except Exception:
                culprit = i
                break
        where = (f" on sample {culprit} (prompt record {sources[culprit]}: {str(prompts[culprit])[:80]!r})"
                 if culprit is not None else "")
        raise RewardFunctionError(f"reward function {name} raised {type(e).__name__}: {e}{where}") from e
    return _values(out, n, name, sources)


def column_lists(records: list[dict]) -> dict[str, list]:
    """Per-sample dicts of extra fields -> one list per field (None where a record lacks it)."""
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r if k not in keys)
    return {k: [r.get(k) for r in records] for k in keys}
