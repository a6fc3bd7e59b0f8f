"""Starting or joining Ray with the settings this project needs."""

from __future__ import annotations

import os

# Ray Train's report() waits for the controller's poll (default every 2 s): poll faster.
# Quiet transformers' per-load reports and progress bars in every worker.
_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"),
    "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error"),
    "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_libraries() -> None:
    """Apply the same quieting in this process (the driver)."""
    os.environ.update(_ENV)
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
    import logging

    for name in _QUIET_WORKER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True,
             num_gpus: int | None = None):
    """Join ``address`` (e.g. "auto" on a cluster) or start a local Ray (GPUs detected unless
    ``num_gpus`` says); idempotent."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.update(_ENV)  # inherited by the local raylet and so by every actor
    runtime_env = {"env_vars": dict(_ENV)}
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
    if quiet:
        kwargs["logging_level"] = "warning"
    ray.init(**kwargs)
    return ray
