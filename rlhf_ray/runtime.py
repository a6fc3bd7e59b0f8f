"""Starting or joining Ray with the settings this project needs, and a quiet console.

Ray's own INFO and WARNING lines (in this process and in the job's workers) are hidden unless
``RLHF_RAY_LOG_LEVEL`` says otherwise (``info``, ``warning``; the CLI's ``--verbose`` sets ``info``);
at the default level a few known-harmless error lines that Ray prints on every run are dropped too
(:data:`KNOWN_NOISE`). Our own progress lines are prints and always shown.
"""

from __future__ import annotations

import logging
import os
import re

LOG_LEVEL_ENV = "RLHF_RAY_LOG_LEVEL"

# Ray Train's report() waits for the controller's poll (default every 2 s): poll faster.
# Quiet transformers' per-load reports and progress bars in every worker.
_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"),
    "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error"),
    "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # Ray Train routes a worker's print() through its logger as well as to stdout, where sys.stdout
    # is wrapped (as in a Ray worker): every line of the training loop reached the console twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"),
}

# Error-level lines Ray prints on every run that say nothing is wrong (shown with RLHF_RAY_LOG_LEVEL):
KNOWN_NOISE = (
    # Ray Train's controller starts its PreemptionWatcher actor with restarts and large arguments.
    re.compile(r"Actor with class name: 'PreemptionWatcher'.*max_restarts"),
    # serve.shutdown() kills its controller while the controller's own graceful shutdown is queued.
    re.compile(r"ServeController\.graceful_shutdown failed.*killed by `?ray\.kill"),
)


def log_level() -> int:
    """The level of Ray's loggers: ``$RLHF_RAY_LOG_LEVEL`` (debug, info, warning, error), else error."""
    name = os.environ.get(LOG_LEVEL_ENV, "error").strip().upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"${LOG_LEVEL_ENV}={name.lower()!r}: expected debug, info, warning or error")
    return level


def _level_env(level: int) -> dict[str, str]:
    """The environment that sets ``level`` for the libraries that read theirs from it (an explicit
    setting in this process's environment wins)."""
    name = logging.getLevelName(level)
    env = {LOG_LEVEL_ENV: name.lower(), "RAY_DATA_LOG_LEVEL": name,
           # Serve's controller, proxies and replicas log INFO lines to the console unless this is 0
           # (their log files under the Ray session directory keep everything).
           "RAY_SERVE_LOG_TO_STDERR": "1" if level <= logging.INFO else "0"}
    return {k: os.environ.get(k, v) for k, v in env.items()}


def quiet_serve_logger() -> None:
    """Importing Ray Serve sets its logger to INFO (``configure_default_serve_logger``); a process that
    holds a Serve handle calls this after the import to keep it at our level."""
    try:
        logging.getLogger("ray.serve").setLevel(log_level())
    except ValueError:
        pass


def train_log_level() -> str:
    """Ray Train's ``LoggingConfig(log_level=...)`` for our runs: the level of :func:`log_level`."""
    try:
        return logging.getLevelName(log_level())
    except ValueError:
        return "ERROR"


# Ray modules whose logger is named by their file path (logging.getLogger(__file__)), so Ray Train's
# level does not reach it: "Reporting training result ..." on every report of every worker.
_FILE_LOGGERS = ("train/v2/_internal/execution/context.py",)


def _quiet_ray_loggers(level: int) -> None:
    import ray

    for name in ("ray", "ray.train", "ray.serve", "ray.data", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    for path in _FILE_LOGGERS:
        logging.getLogger(os.path.join(os.path.dirname(ray.__file__), path)).setLevel(level)
    for name in _QUIET_WORKER_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.ERROR))


def quiet_libraries() -> None:
    """Apply the same quieting in this process (the driver)."""
    os.environ.update(_ENV)
    try:  # before Serve and Ray Data are imported: they read these once
        os.environ.update(_level_env(log_level()))
    except ValueError:  # a bad $RLHF_RAY_LOG_LEVEL is reported by whoever starts Ray
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:
        pass


# Loggers of Ray internals that only produce noise in a dashboard-less cluster: Ray Train's placement
# group cleaner asks the State API (served by the dashboard) whether the controller lives, once a
# second, and warns on every failure; without the dashboard it fails every time.
_QUIET_WORKER_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                         "ray.data")  # Ray Data: "execution finished", "progress bars disabled" per dataset read


def worker_setup() -> None:
    """Runs in every Ray worker process of the job (runtime_env worker_process_setup_hook)."""
    try:
        level = log_level()
    except ValueError:
        level = logging.ERROR
    _quiet_ray_loggers(level)
    if "VLLM_LOGGING_LEVEL" in os.environ:  # before vLLM configures its logger: its import warns early
        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())


def _drop_known_noise() -> None:
    """Filter the lines Ray forwards to this driver: the workers' output (its stdstream dispatcher)
    and the error messages of the cluster ("(raylet) ..."), which both end in
    ``ray._private.worker.print_to_stdstream``. Private API: nothing happens where it is not there."""
    import functools

    try:
        from ray._private import ray_logging
        from ray._private import worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    dispatcher = getattr(ray_logging, "global_worker_stdstream_dispatcher", None)
    if original is None or getattr(original, "_rlhf_ray_filter", False):
        return

    def filtered(data, ignore_prefix):
        lines = [x for x in data.get("lines", ()) if not any(p.search(x) for p in KNOWN_NOISE)]
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    filtered._rlhf_ray_filter = True
    ray_worker.print_to_stdstream = filtered  # (listen_error_messages looks it up on each message)
    handler = dict(getattr(dispatcher, "handlers", ())).get("ray_print_logs")
    if isinstance(handler, functools.partial) and handler.func is original:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", functools.partial(filtered, **handler.keywords))


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True,
             num_gpus: int | None = None):
    """Join ``address`` (e.g. "auto" on a cluster) or start a local Ray (GPUs detected unless
    ``num_gpus`` says); idempotent."""
    import ray

    if ray.is_initialized():
        return ray
    level = log_level() if quiet else logging.INFO
    os.environ.update(_ENV)  # inherited by the local raylet and so by every actor
    # Ray Data and Serve read their levels from the environment; Ray Train's comes from its RunConfig
    # (train_log_level).
    level_env = _level_env(level)
    os.environ.update(level_env)
    runtime_env = {"env_vars": {**_ENV, **level_env}}
    if quiet:
        runtime_env["worker_process_setup_hook"] = "rlhf_ray.runtime.worker_setup"
    kwargs = dict(include_dashboard=False, log_to_driver=True, runtime_env=runtime_env)
    if address:
        kwargs["address"] = address
    else:
        kwargs.update({k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)) if v is not None})
        # A local cluster started here has no dashboard to show metrics, so Ray's metrics pipeline
        # stays off. Its exporter thread once crashed a vLLM actor during start-up here (SIGSEGV in
        # opentelemetry's metric collection); Ray has known races between that thread and processes
        # that set environment variables, as vLLM does (ray-project/ray#61281, #62028).
        kwargs["_system_config"] = {"enable_metrics_collection": False}
    kwargs["logging_level"] = level
    ray.init(**kwargs)
    if quiet:
        _quiet_ray_loggers(level)
        if level >= logging.ERROR:
            _drop_known_noise()
    return ray
