"""Tools and environments in TRL's convention (``GRPOTrainer(tools=..., environment_factory=...)``), for
the rollout workers' multi-turn episodes.

* A tool is a plain function, sync or ``async def``, with type hints and a Google-style docstring
  (transformers' ``get_json_schema`` turns it into the schema the chat template renders).
* An environment factory returns one environment per episode (instances are pooled and reused through
  ``reset``, as TRL does). Its public methods are its tools; ``reset(**columns) -> str | None`` gets the
  prompt record (``prompt=`` and its other fields; not ``environment``, which picks the factory when
  several are named) and a string it returns is appended to the last user message; an optional
  ``get_reward() -> float`` (sync or async) is read once the episode ends.

Calls run each in a daemon thread with a timeout (``ppo.tool_timeout_s``): an exception, a timeout, an
unknown tool or arguments that do not fit become the tool message's text (TRL's ``{"error": ...}``),
never a failed rollout. A call that hangs keeps its thread (Python cannot stop one); the episode goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from rlhf_ray.ppo.tool_calls import error_message, tool_message


class ToolSpec(NamedTuple):
    """What a rollout worker needs to build its :class:`Toolbox` (the ``ppo.*`` fields; picklable)."""

    tools: tuple = ()  # "module:function" (or the functions: :meth:`resolved`)
    environment: Any = ""  # "module:factory", or name -> "module:factory" (or the factories)
    max_iterations: int = -1  # tool-calling rounds per episode; -1 = no limit
    timeout_s: float = 30.0

    @classmethod
    def from_config(cls, ppo) -> "ToolSpec | None":
        """The spec of ``ppo`` (a PPOConfig), None when it has no tools or environment."""
        if not ppo.multi_turn:
            return None
        env = dict(ppo.environment) if isinstance(ppo.environment, dict) else ppo.environment
        return cls(tuple(ppo.tools), env, ppo.max_tool_calling_iterations, ppo.tool_timeout_s)

    def resolved(self) -> "ToolSpec":
        """The spec with its names imported (here: the driver, whose working directory is importable) and
        the code of modules that are not installed made to travel with it to the Ray workers, on any node
        (as the reward functions': ``rlhf_ray.reward.functions.ship_by_value``)."""
        import ray.cloudpickle

        from rlhf_ray.reward.functions import import_function, local_module

        def load(name, field):
            fn = name if callable(name) else import_function(name, field)
            module = local_module(fn)
            if module is not None:
                ray.cloudpickle.register_pickle_by_value(module)
            return fn

        tools = tuple(load(t, f"ppo.tools[{i}]") for i, t in enumerate(self.tools))
        env = self.environment
        if isinstance(env, dict):
            env = {k: load(v, f"ppo.environment.{k}") for k, v in env.items()}
        elif env:
            env = load(env, "ppo.environment")
        return self._replace(tools=tools, environment=env)


def tool_methods(environment) -> list[Callable]:
    """An environment's tools: its public methods but ``reset`` and ``get_reward`` (looked up on the class,
    as TRL does, so properties are not evaluated)."""
    return [getattr(environment, name) for name, _ in inspect.getmembers(type(environment), inspect.isfunction)
            if name not in ("reset", "get_reward") and not name.startswith("_")]


def tool_schema(fn: Callable, field: str) -> dict:
    """transformers' JSON schema of ``fn``; ValueError naming ``field`` when it has none to give (no
    docstring, an argument without a type hint or description)."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:
        raise ValueError(f"{field}: {getattr(fn, '__qualname__', fn)} cannot be a tool: {e}") from None


def _result(value):
    return asyncio.run(value) if inspect.isawaitable(value) else value


class Toolbox:
    """The tools and environment factories of a :class:`ToolSpec`, imported and checked (each tool's
    schema; each environment probed once for ``reset`` and its methods' schemas). Raises ValueError
    naming the field."""

    def __init__(self, spec: ToolSpec):
        from rlhf_ray.reward.functions import import_function

        self.spec = spec
        self.tools = {}
        for i, name in enumerate(spec.tools):
            fn = name if callable(name) else import_function(name, f"ppo.tools[{i}]")
            tool_schema(fn, f"ppo.tools[{i}]")
            self.tools[fn.__name__] = fn
        env = spec.environment
        self.multi_env = isinstance(env, dict)
        named = env if self.multi_env else ({None: env} if env else {})
        self.factories, self.pools = {}, {}
        for key, name in named.items():
            field = f"ppo.environment.{key}" if self.multi_env else "ppo.environment"
            factory = name if callable(name) else import_function(name, field)
            probe = factory()
            if not callable(getattr(probe, "reset", None)):
                raise ValueError(f"{field}: {name if isinstance(name, str) else factory.__qualname__} returned a {type(probe).__name__}, which has no reset method "
                                 f"(an environment needs reset(**columns) -> str | None)")
            for m in tool_methods(probe):
                tool_schema(m, field)
            self.factories[key], self.pools[key] = factory, [probe]

    @property
    def reward_names(self) -> list[str]:
        """The environment classes that own a reward (``get_reward``): the metric names ``rewards/<class>``."""
        out = []
        for pool in self.pools.values():
            cls = type(pool[0])
            if callable(getattr(cls, "get_reward", None)) and cls.__name__ not in out:
                out.append(cls.__name__)
        return out

    # ---- one episode's environment and tools

    def environments(self, columns: list[dict], sources: list[str]) -> list:
        """One environment per record (None without environments), drawn from the pools (more made when a
        chunk needs more than exist). The ``environment`` column picks the factory when several are named."""
        if not self.factories:
            return [None] * len(columns)
        used: dict = {}
        out = []
        for cols, src in zip(columns, sources):
            key = cols.get("environment") if self.multi_env else None
            if key not in self.factories:
                raise ValueError(f"prompt record {src}: environment={key!r} is not one of ppo.environment's "
                                 f"{sorted(self.factories)}")
            pool, i = self.pools[key], used.get(key, 0)
            if i == len(pool):
                pool.append(self.factories[key]())
            used[key] = i + 1
            out.append(pool[i])
        return out

    def reset(self, environment, prompt, columns: dict):
        """``prompt`` after ``environment.reset(prompt=..., **columns)``: its text appended to the last message."""
        if environment is None:
            return prompt
        kwargs = {k: v for k, v in columns.items() if not (self.multi_env and k == "environment")}
        observation = _result(environment.reset(prompt=prompt, **kwargs))
        if observation is None:
            return prompt
        last = prompt[-1]
        return [*prompt[:-1], {**last, "content": last["content"] + str(observation)}]

    def tools_for(self, environment) -> dict[str, Callable]:
        """The episode's tools by name: the standalone ones, then its environment's methods."""
        return {**self.tools, **({m.__name__: m for m in tool_methods(environment)} if environment is not None else {})}

    @staticmethod
    def reward(environment) -> tuple[str, float] | None:
        """(class name, ``get_reward()``) once the episode has ended; None when it owns no reward."""
        if environment is None or not callable(getattr(type(environment), "get_reward", None)):
            return None
        return type(environment).__name__, float(_result(environment.get_reward()))

    # ---- calls

    def call(self, requests: list[tuple[dict, dict]]) -> list[tuple[dict, bool]]:
        """Run tool calls concurrently, each in its own thread with ``timeout_s``: ``requests`` are (tool
        call as parsed, the episode's tools by name); returns (tool message, failed) in the same order."""
        threads, boxes = [], []
        for call, tools in requests:
            box: dict = {}
            fn = call["function"]
            t = threading.Thread(target=self._run, args=(fn["name"], fn.get("arguments"), tools, box), daemon=True)
            t.start()
            threads.append(t)
            boxes.append(box)
        deadline = time.monotonic() + self.spec.timeout_s
        out = []
        for t, box, (call, _) in zip(threads, boxes, requests):
            t.join(max(0.0, deadline - time.monotonic()))
            name = call["function"]["name"]
            if "message" in box:
                out.append((box["message"], box["failed"]))
            else:
                out.append((error_message(name, f"Tool {name} timed out after {self.spec.timeout_s:g} s."), True))
        return out

    @staticmethod
    def _run(name: str, arguments: Any, tools: dict, box: dict) -> None:
        try:
            if name not in tools:
                raise ValueError(f"Tool {name} not found.")  # TRL's words
            result = _result(tools[name](**arguments))
            box["message"], box["failed"] = tool_message(name, result), False
        except Exception as e:  # (a TypeError for arguments that are not a mapping or do not fit, too)
            box["message"], box["failed"] = error_message(name, str(e)), True
