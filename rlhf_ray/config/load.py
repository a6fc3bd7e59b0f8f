"""Reading a config: YAML and dotted overrides in, a checked :class:`Config` out. Every error names
the field (``rm.lr``), what is allowed, and the config file when the value came from it."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf_ray.config.schema import RANGES, SERVE_METRICS_INTERVAL_S, Config, ConfigError


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Coerce a YAML/CLI value to the field's type or raise ConfigError naming the field."""
    if typ == (str | dict[str, str]):  # a name, or a mapping of names (ppo.environment)
        if isinstance(value, dict):
            if not value:
                return ""
            if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()):
                raise ConfigError(f"{name}: expected a mapping of names to strings, got {value!r}")
            return dict(value)
        return "" if value is None else _coerce(name, value, str)
    if typing.get_origin(typ) is Literal:
        allowed = typing.get_args(typ)
        if value not in allowed:
            raise ConfigError(f"{name}: {value!r} is not one of {list(allowed)}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {typ}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix or "top level"
        close = {u: difflib.get_close_matches(u, fields, n=1, cutoff=0.6) for u in unknown}
        hint = "; ".join(f"did you mean {f'{prefix}.' if prefix else ''}{m[0]} (not {u})?" for u, m in close.items() if m)
        raise ConfigError(f"{where}: unknown field(s) {unknown}; {hint + ' ' if hint else ''}allowed: {sorted(fields)}")
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value or {}, name)
        elif typing.get_origin(typ) is tuple and typing.get_args(typ)[0] is str:
            items = [] if value in (None, "") else value if isinstance(value, (list, tuple)) else [value]
            kwargs[key] = tuple(_coerce(f"{name}[{i}]", v, str) for i, v in enumerate(items))
        elif typing.get_origin(typ) is tuple:
            kwargs[key] = _build_items(typing.get_args(typ)[0], value, name)
        else:
            kwargs[key] = _coerce(name, value, typ)
    return cls(**kwargs)


def _build_items(item: type, value: Any, name: str) -> tuple:
    """A list field of ``item`` dataclasses: each entry a mapping, or a bare string for its first field."""
    if value in (None, ""):
        return ()
    if not isinstance(value, (list, tuple)):
        value = [value]
    first = dataclasses.fields(item)[0].name
    return tuple(_build(item, {first: v} if isinstance(v, str) else v, f"{name}[{i}]") for i, v in enumerate(value))


def _check_function_name(field_name: str, value: str) -> None:
    module, _, function = value.partition(":")
    if not module or not function.isidentifier():
        raise ConfigError(f"{field_name}: expected 'module:function' (e.g. 'my_rewards:length_penalty'), got {value!r}")


def _check_ranges(cfg: Config) -> None:
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            if "range" in f.metadata:
                test, allowed = RANGES[f.metadata["range"]]
                v = getattr(values, f.name)
                if not test(v):
                    raise ConfigError(f"{section.name}.{f.name}: {allowed}, got {v}")
    if cfg.data.min_k < 2 or cfg.data.max_k < cfg.data.min_k:
        raise ConfigError(
            f"data.min_k/data.max_k: need 2 <= min_k <= max_k, got {cfg.data.min_k}..{cfg.data.max_k}")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(f"model.hidden_size: {cfg.model.hidden_size} is not divisible by "
                          f"model.num_heads={cfg.model.num_heads}")
    if cfg.model.name_or_path == "embedded" and cfg.rm.max_length > cfg.model.max_positions:
        raise ConfigError(f"rm.max_length: {cfg.rm.max_length} tokens exceed the embedded model's "
                          f"model.max_positions={cfg.model.max_positions}")
    if cfg.serve.max_replicas < max(cfg.serve.min_replicas, 1):
        raise ConfigError(f"serve.max_replicas: must be >= serve.min_replicas ({cfg.serve.min_replicas})")
    if cfg.serve.look_back_period_s <= SERVE_METRICS_INTERVAL_S:
        raise ConfigError(f"serve.look_back_period_s: must be more than {SERVE_METRICS_INTERVAL_S:g} s (how often "
                          f"Serve's replicas report their load), got {cfg.serve.look_back_period_s:g}")
    if not 0 < cfg.serve.port < 65536:
        raise ConfigError(f"serve.port: must be in 1..65535, got {cfg.serve.port}")
    ro = cfg.rollout
    if 0 < ro.gpus_per_worker < 1 and ro.gpu_memory_utilization > ro.gpus_per_worker:
        raise ConfigError(f"rollout.gpu_memory_utilization: {ro.gpu_memory_utilization} of a GPU per engine, but "
                          f"rollout.gpus_per_worker={ro.gpus_per_worker} lets Ray put engines and other actors on "
                          f"one GPU; set it <= {ro.gpus_per_worker}")
    _check_objective(cfg.ppo)
    for i, fn in enumerate(cfg.ppo.reward_functions):
        _check_function_name(f"ppo.reward_functions[{i}].name", fn.name)
    if cfg.ppo.eval_reward not in ("", "auto"):
        _check_function_name("ppo.eval_reward", cfg.ppo.eval_reward)
    _check_tools(cfg.ppo)
    _check_partial(cfg)
    if cfg.model.name_or_path == "embedded" and cfg.ppo.max_prompt_tokens + cfg.ppo.max_new_tokens >= cfg.model.max_positions:
        raise ConfigError(f"ppo.max_prompt_tokens + ppo.max_new_tokens: {cfg.ppo.max_prompt_tokens} + "
                          f"{cfg.ppo.max_new_tokens} tokens do not fit the embedded model's "
                          f"model.max_positions={cfg.model.max_positions} (one token is kept for scoring)")


def _check_tools(ppo) -> None:
    """ppo.tools, ppo.environment and what multi-turn rollouts need of the objective."""
    for i, name in enumerate(ppo.tools):
        _check_function_name(f"ppo.tools[{i}]", name)
    if isinstance(ppo.environment, dict):
        for env_name, factory in ppo.environment.items():
            _check_function_name(f"ppo.environment.{env_name}", factory)
    elif ppo.environment:
        _check_function_name("ppo.environment", ppo.environment)
    if ppo.multi_turn:
        from rlhf_ray.ops import ESTIMATORS

        # An episode's response mask has gaps (the tool turns); token-level estimators run over one span.
        if not ESTIMATORS[ppo.advantage_estimator].groups:
            group = sorted(k for k, e in ESTIMATORS.items() if e.groups)
            raise ConfigError(f"ppo.advantage_estimator={ppo.advantage_estimator}: multi-turn rollouts (ppo.tools, "
                              f"ppo.environment) leave gaps in a response (the tool turns), which it does not "
                              f"take; use one of {group}")


def _check_partial(cfg: Config) -> None:
    """rollout.partial_rollouts and rollout.max_staleness against the rest."""
    ro, ppo = cfg.rollout, cfg.ppo
    lag = int(ro.async_one_step_off)  # the learner's lead on the engines
    if not ro.partial_rollouts:
        return
    if ro.max_staleness < lag + 1:
        raise ConfigError(f"rollout.max_staleness: a partial rollout carried to the next iteration trains "
                          f"{lag + 1} policy version(s) old{' with rollout.async_one_step_off' if lag else ''}; "
                          f"rollout.partial_rollouts needs at least {lag + 1}, got {ro.max_staleness}")
    if not ppo.tis_cap:
        raise ConfigError("ppo.tis_cap: rollout.partial_rollouts trains on tokens sampled by older weights, which "
                          "the truncated importance weights correct; set it (2 is usual)")
    if ppo.dynamic_sampling_max_rounds:
        raise ConfigError("rollout.partial_rollouts: not with ppo.dynamic_sampling_max_rounds (its extra rounds "
                          "would wait for every sample again); turn one of them off")


def _check_objective(ppo) -> None:
    """The estimator and loss type against their tables (rlhf_ray.ops), and what each entry needs."""
    from rlhf_ray.ops import ESTIMATORS, LOSS_TYPES

    for name, value, table in (("ppo.advantage_estimator", ppo.advantage_estimator, ESTIMATORS),
                               ("ppo.loss_type", ppo.loss_type, LOSS_TYPES)):
        if value not in table:
            raise ConfigError(f"{name}: {value!r} is not one of {sorted(table)}")
    groups = ESTIMATORS[ppo.advantage_estimator].groups
    if groups and ppo.samples_per_prompt < 2:
        raise ConfigError(f"ppo.advantage_estimator={ppo.advantage_estimator} compares the samples of a prompt: "
                          f"ppo.samples_per_prompt must be at least 2, got {ppo.samples_per_prompt}")
    if ppo.dynamic_sampling_max_rounds and not groups:
        raise ConfigError(f"ppo.dynamic_sampling_max_rounds: drops groups whose rewards do not differ, which only a "
                          f"group estimator compares (ppo.advantage_estimator={ppo.advantage_estimator})")
    if ppo.overlong_buffer >= ppo.max_new_tokens:
        raise ConfigError(f"ppo.overlong_buffer: {ppo.overlong_buffer} must be less than ppo.max_new_tokens="
                          f"{ppo.max_new_tokens}")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"rm.lr=1e-3"`` -> ("rm.lr", 1e-3). The value is parsed as YAML (numbers, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or defaults when ``path`` is None) and apply dotted overrides."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: invalid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping of sections")
    from_file = copy.deepcopy(tree)  # the overrides below edit nested sections in place
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        cfg = _build(Config, tree, "")
        _check_ranges(cfg)
    except ConfigError as e:
        if path and str(e) == _error_of(from_file):  # the file's own value: name the file
            raise ConfigError(f"{e} (in config file {path})") from None
        raise
    return cfg


def _error_of(tree: dict) -> str | None:
    """The ConfigError message a tree gives on its own, if any."""
    try:
        _check_ranges(_build(Config, tree, ""))
    except ConfigError as e:
        return str(e)
    return None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
