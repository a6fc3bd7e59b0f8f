"""The one place where the PPO stage's plain classes become Ray actors (resources from the config).

    learner     1 CPU (+ LEARNER_GPU when the cluster has GPUs: then it trains on CUDA); with
                learner.num_workers > 1 that many ranks of 1 CPU (+ 1 GPU) each in a placement group
                (``rlhf_ray.ppo.learner_group``)
    rollout     rollout.cpus_per_worker CPUs, rollout.gpus_per_worker GPUs; on CPU the vLLM engine
                runs inside the actor process (VLLM_ENABLE_V1_MULTIPROCESSING=0: ~12 s start-up
                instead of ~25 s, ~1 GiB less memory)
    advantage   SMALL_CPUS (frozen reference policy, one forward per batch) (+ SMALL_GPU)
    scorer      SMALL_CPUS (in-process RM, or a thin client of the Serve deployment) (+ SMALL_GPU
                when in-process)

On a cluster with GPUs the three non-rollout actors ask for fractions that add up to one GPU, the
one the learner alone used to take: the reference policy and the RM run on CUDA beside the learner
(on one free GPU Ray packs the fractions together) instead of on the CPU.

Ray sets OMP_NUM_THREADS from num_cpus (1 for fractions), so these numbers are also thread counts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

from rlhf_ray.config import LearnerConfig, PPOConfig, RolloutConfig
from rlhf_ray.ppo.advantage import AdvantageWorker
from rlhf_ray.ppo.learner import Learner
from rlhf_ray.ppo.rollout import RolloutWorker
from rlhf_ray.ppo.scoring import RolloutScorer
from rlhf_ray.runtime import log_level

LEARNER_CPUS = 1.0
SMALL_CPUS = 0.25
LEARNER_GPU = 0.5
SMALL_GPU = 0.25  # LEARNER_GPU + 2 * SMALL_GPU = 1


def cluster_has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) >= 1


NODE_RESOURCE_UNIT = 0.001  # what an actor asks of a node_resource: a place, not a share of it


def placed_on(node_resource: str) -> dict:
    """Ray options that place an actor on the nodes having the custom resource ``node_resource`` ("": any)."""
    return {"resources": {node_resource: NODE_RESOURCE_UNIT}} if node_resource else {}


def check_cluster(cfg, num_workers: int) -> None:
    """ConfigError when the Ray cluster cannot place the PPO actors with ``num_workers`` rollout
    workers: too few CPUs, or a node_resource no node has (the actors would wait forever)."""
    from rlhf_ray.config import ConfigError

    rc, lc, have = cfg.rollout, cfg.learner, ray.cluster_resources()
    need = cpus_needed(num_workers, rc, lc.num_workers)
    if need > have.get("CPU", 0):
        raise ConfigError(f"rollout.num_workers={num_workers} x rollout.cpus_per_worker={rc.cpus_per_worker} "
                          f"+ learner.num_workers={lc.num_workers} + scorer + advantage: PPO needs {need} "
                          f"CPUs, the Ray cluster has {have.get('CPU', 0)}")
    for name, resource in (("rollout.node_resource", rc.node_resource), ("learner.node_resource", lc.node_resource)):
        if resource and not have.get(resource):
            raise ConfigError(f"{name}={resource!r}: no node of the Ray cluster has that resource (start the "
                              f"nodes meant for it with ray start --resources='{{\"{resource}\": 1}}')")


def cpus_needed(num_workers: int, rollout_cfg: RolloutConfig, learner_workers: int = 1) -> float:
    """CPUs the PPO actors reserve with ``num_workers`` rollout workers and ``learner_workers`` learner ranks."""
    return num_workers * rollout_cfg.cpus_per_worker + learner_workers * LEARNER_CPUS + 2 * SMALL_CPUS


def start_learner(policy_path: str | Path, ppo_cfg: PPOConfig, chat_template: str = "auto",
                  learner_cfg: LearnerConfig | None = None):
    """The learner: one actor, or with ``learner.num_workers`` > 1 a LearnerGroup (one whole GPU per rank
    on a cluster with GPUs) that is called the same way."""
    gpu = cluster_has_gpu()
    if learner_cfg is not None and learner_cfg.num_workers > 1:
        from rlhf_ray.ppo.learner_group import start_learner_group

        return start_learner_group(str(policy_path), ppo_cfg, learner_cfg, LEARNER_CPUS, gpu, chat_template)
    cls = ray.remote(num_cpus=LEARNER_CPUS, num_gpus=LEARNER_GPU if gpu else 0,
                     **placed_on(learner_cfg.node_resource if learner_cfg else ""))(Learner)
    return cls.remote(str(policy_path), ppo_cfg, device="cuda" if gpu else "cpu", chat_template=chat_template,
                      learner_cfg=learner_cfg)


def stop(actor) -> None:
    """Kill an actor, or every rank of a LearnerGroup (and free its placement group)."""
    from rlhf_ray.ppo.learner_group import LearnerGroup

    if isinstance(actor, LearnerGroup):
        actor.shutdown()
    else:
        ray.kill(actor)


def start_advantage(ref_model_path: str | Path, ppo_cfg: PPOConfig, node_resource: str = "",
                    chunk_tokens: int = 1024):
    gpu = cluster_has_gpu()
    cls = ray.remote(num_cpus=SMALL_CPUS, num_gpus=SMALL_GPU if gpu else 0, **placed_on(node_resource))(AdvantageWorker)
    return cls.remote(str(ref_model_path), ppo_cfg, device="cuda" if gpu else "cpu", chunk_tokens=chunk_tokens)


def start_scorer(rm_dir: str | Path | None, max_length: int, handle=None, max_pairs: int = 4096,
                 reward_functions=(), eval_function=None, chat_template: str = "auto", node_resource: str = ""):
    """The scorer. ``reward_functions`` and ``eval_function`` are RewardFunctions, imported here; the
    code of those whose module is not installed travels with them (``functions.ship_by_value``).
    Neither ``rm_dir`` nor ``handle``: the reward functions alone score (no RM is loaded)."""
    from rlhf_ray.reward.functions import ship_by_value

    ship_by_value([*reward_functions, *([eval_function] if eval_function else [])])
    # In process, the RM runs on the GPU Ray assigns (RewardScorer picks CUDA when it sees one);
    # through a Serve handle, the deployment has its own resources (serve.num_gpus).
    gpu = handle is None and rm_dir is not None and cluster_has_gpu()
    cls = ray.remote(num_cpus=SMALL_CPUS, num_gpus=SMALL_GPU if gpu else 0, **placed_on(node_resource))(RolloutScorer)
    return cls.remote(None if handle is not None or rm_dir is None else str(rm_dir), max_length, handle, max_pairs,
                      list(reward_functions), eval_function, chat_template)


def start_rollout_worker(model_path: str | Path, rollout_cfg: RolloutConfig, worker_id: int, seed: int,
                         version: int = 0, **options):
    """``options``: RolloutWorker's ``max_model_len`` and ``chat_template``."""
    on_gpu = rollout_cfg.gpus_per_worker > 0
    # vLLM logs every weight reload at INFO/WARNING; keep the driver's output to the progress lines.
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
    if log_level() > logging.INFO:  # the engine's start-up: torch's NUMA notice, vLLM's FutureWarnings
        env.update(TORCH_CPP_LOG_LEVEL=os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"),
                   PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning"))
    if not on_gpu:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    cls = ray.remote(num_cpus=rollout_cfg.cpus_per_worker, num_gpus=rollout_cfg.gpus_per_worker,
                     runtime_env={"env_vars": env}, **placed_on(rollout_cfg.node_resource))(RolloutWorker)
    return cls.remote(str(model_path), rollout_cfg, worker_id=worker_id, seed=seed,
                      device="cuda" if on_gpu else "cpu", version=version, **options)
