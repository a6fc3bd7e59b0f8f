"""The one place where the PPO stage's plain classes become Ray actors (resources from the config).

Placement (``placement``, resolved by :func:`resolve_placement`):

* **disaggregated**: each role its own CPUs (and GPUs), so stages can overlap (one-step-off) and roles
  can sit on different nodes:

    learner     learner.cpus_per_worker CPUs (+ LEARNER_GPU when the cluster has GPUs: then it trains
                on CUDA); with learner.num_workers > 1 that many ranks of learner.cpus_per_worker CPUs
                (+ 1 GPU) each in a placement group (``rlhf_ray.ppo.learner_group``)
    rollout     rollout.cpus_per_worker CPUs, rollout.gpus_per_worker GPUs; on CPU the vLLM engine
                runs inside the actor process (VLLM_ENABLE_V1_MULTIPROCESSING=0: ~12 s start-up
                instead of ~25 s, ~1 GiB less memory)
    advantage   SMALL_CPUS (frozen reference policy, one forward per batch) (+ SMALL_GPU)
    scorer      SMALL_CPUS (in-process RM, or a thin client of the Serve deployment) (+ SMALL_GPU
                when in-process)

  Ray sets OMP_NUM_THREADS from num_cpus (1 for fractions), so these numbers are also thread counts.
  On a cluster with GPUs the three non-rollout actors ask for fractions that add up to one GPU: the
  reference policy and the RM run on CUDA beside the learner.

* **colocated** (one CPU node): every actor on one node (hard node affinity), asking COLOCATED_CPUS
  each, and each taking threads for every core of the node (the engines share them: cores /
  rollout.num_workers each). In synchronous mode the stages take turns, so whichever
  runs has the whole machine: a learner pinned to one core of two is what made a 2-core machine
  slower than a trainer that runs each phase on both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ray

from rlhf_ray.config import Config, ConfigError, LearnerConfig, PPOConfig, RolloutConfig
from rlhf_ray.ppo.advantage import AdvantageWorker
from rlhf_ray.ppo.learner import Learner
from rlhf_ray.ppo.rollout import RolloutWorker
from rlhf_ray.ppo.scoring import RolloutScorer
from rlhf_ray.runtime import log_level

SMALL_CPUS = 0.25
COLOCATED_CPUS = 0.25  # what each actor of a colocated run asks: a place on the node, its threads are the node's
LEARNER_GPU = 0.5
SMALL_GPU = 0.25  # LEARNER_GPU + 2 * SMALL_GPU = 1


def cluster_has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) >= 1


NODE_RESOURCE_UNIT = 0.001  # what an actor asks of a node_resource: a place, not a share of it


def placed_on(node_resource: str) -> dict:
    """Ray options that place an actor on the nodes having the custom resource ``node_resource`` ("": any)."""
    return {"resources": {node_resource: NODE_RESOURCE_UNIT}} if node_resource else {}


def resolve_placement(cfg: Config) -> str:
    """``placement`` as this run applies it: "auto" is colocated on a Ray cluster of one node without
    GPUs, in synchronous mode with one learner rank (where the stages can take turns), else
    disaggregated. An explicit colocated placement that cannot take turns is a ConfigError naming why."""
    if cfg.placement == "disaggregated":
        return "disaggregated"
    why = colocation_refused(cfg, len([n for n in ray.nodes() if n.get("Alive")]), cluster_has_gpu())
    if why and cfg.placement == "colocated":
        raise ConfigError(f"placement=colocated: {why}; use placement=disaggregated")
    return "disaggregated" if why else "colocated"


def colocation_refused(cfg: Config, nodes: int, gpus: bool) -> str | None:
    """Why the PPO actors cannot take turns on one node (None: they can)."""
    if cfg.rollout.async_one_step_off:
        return "rollout.async_one_step_off runs rollouts while the learner trains"
    if cfg.learner.num_workers > 1:
        return "learner.num_workers > 1 spreads the learner over several devices"
    if gpus or cfg.rollout.gpus_per_worker > 0:
        return "the cluster has GPUs (colocating engines and learner on one GPU needs vLLM's sleep mode, not wired yet)"
    if cfg.rollout.node_resource or cfg.learner.node_resource:
        return "rollout.node_resource / learner.node_resource place the roles on different nodes"
    if nodes > 1 and cfg.placement == "auto":
        return "the Ray cluster has several nodes"
    return None


@dataclass
class Placement:
    """Where the actors of one start of a PPO run go: each role on its own resources (``node`` None), or
    every actor on one node with ``cores`` threads to share."""

    node: str | None = None  # colocated: the node's id
    cores: int = 0  # colocated: that node's CPUs (each actor's threads)

    @property
    def colocated(self) -> bool:
        return self.node is not None

    def options(self, cpus: float, gpus: float = 0.0, node_resource: str = "", share: int = 1) -> dict:
        """Ray options of an actor that asks ``cpus`` CPUs and ``gpus`` GPUs disaggregated; colocated, a place
        on the node and threads for 1/``share`` of its cores (OMP_NUM_THREADS, which torch and vLLM's CPU
        kernels read at start)."""
        if not self.colocated:
            return {"num_cpus": cpus, "num_gpus": gpus, **placed_on(node_resource)}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"num_cpus": COLOCATED_CPUS, "scheduling_strategy": NodeAffinitySchedulingStrategy(self.node, soft=False),
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(max(1, self.cores // share))}}}

    def describe(self, num_workers: int) -> str:
        if not self.colocated:
            return "placement: disaggregated (each role on its own CPUs)"
        return (f"placement: colocated on one node, the stages taking turns: {self.cores} threads for the learner, "
                f"the reference and the RM, {max(1, self.cores // num_workers)} for each of {num_workers} "
                f"engine(s)")


def place(cfg: Config, mode: str, num_workers: int) -> Placement:
    """The Placement of one start: colocated, the node with the most free CPUs (the one node of a
    one-node cluster) and its CPU count."""
    if mode != "colocated":
        return Placement()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    need = cpus_needed(num_workers, cfg.rollout, cfg.learner, colocated=True)
    free = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")}
    node = max(free, key=free.get)
    if free[node] < need:
        raise ConfigError(f"placement=colocated: {num_workers + 3} actors x {COLOCATED_CPUS} need {need:g} CPUs of one "
                          f"node; the largest node has {free[node]:g}")
    cores = ray.get(_node_cores.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(),
                    timeout=120)
    return Placement(node, cores)


@ray.remote(num_cpus=0)
def _node_cores() -> int:
    return len(os.sched_getaffinity(0))


def check_cluster(cfg, num_workers: int, colocated: bool = False) -> None:
    """ConfigError when the Ray cluster cannot place the PPO actors with ``num_workers`` rollout
    workers: too few CPUs, or a node_resource no node has (the actors would wait forever)."""
    rc, lc, have = cfg.rollout, cfg.learner, ray.cluster_resources()
    need = cpus_needed(num_workers, rc, lc, colocated)
    if need > have.get("CPU", 0):
        what = (f"{num_workers + 3} actors x {COLOCATED_CPUS} (placement=colocated)" if colocated else
                f"rollout.num_workers={num_workers} x rollout.cpus_per_worker={rc.cpus_per_worker} + "
                f"learner.num_workers={lc.num_workers} x learner.cpus_per_worker={lc.cpus_per_worker} + scorer + advantage")
        raise ConfigError(f"{what}: PPO needs {need} CPUs, the Ray cluster has {have.get('CPU', 0)}")
    for name, resource in (("rollout.node_resource", rc.node_resource), ("learner.node_resource", lc.node_resource)):
        if resource and not have.get(resource):
            raise ConfigError(f"{name}={resource!r}: no node of the Ray cluster has that resource (start the "
                              f"nodes meant for it with ray start --resources='{{\"{resource}\": 1}}')")


def cpus_needed(num_workers: int, rollout_cfg: RolloutConfig, learner_cfg: LearnerConfig | None = None,
                colocated: bool = False) -> float:
    """CPUs the PPO actors reserve with ``num_workers`` rollout workers (and the learner of ``learner_cfg``)."""
    if colocated:
        return COLOCATED_CPUS * (3 + num_workers)
    lc = learner_cfg or LearnerConfig()
    return num_workers * rollout_cfg.cpus_per_worker + lc.num_workers * lc.cpus_per_worker + 2 * SMALL_CPUS


def start_learner(policy_path: str | Path, ppo_cfg: PPOConfig, chat_template: str = "auto",
                  learner_cfg: LearnerConfig | None = None, placement: Placement | None = None):
    """The learner: one actor, or with ``learner.num_workers`` > 1 a LearnerGroup (one whole GPU per rank
    on a cluster with GPUs) that is called the same way."""
    gpu = cluster_has_gpu()
    lc = learner_cfg or LearnerConfig()
    if lc.num_workers > 1:
        from rlhf_ray.ppo.learner_group import start_learner_group

        return start_learner_group(str(policy_path), ppo_cfg, lc, lc.cpus_per_worker, gpu, chat_template)
    options = (placement or Placement()).options(lc.cpus_per_worker, LEARNER_GPU if gpu else 0, lc.node_resource)
    return ray.remote(**options)(Learner).remote(str(policy_path), ppo_cfg, device="cuda" if gpu else "cpu",
                                                 chat_template=chat_template, learner_cfg=learner_cfg)


def stop(actor) -> None:
    """Kill an actor, or every rank of a LearnerGroup (and free its placement group)."""
    from rlhf_ray.ppo.learner_group import LearnerGroup

    if isinstance(actor, LearnerGroup):
        actor.shutdown()
    else:
        ray.kill(actor)


def start_advantage(ref_model_path: str | Path, ppo_cfg: PPOConfig, node_resource: str = "",
                    chunk_tokens: int = 1024, placement: Placement | None = None):
    gpu = cluster_has_gpu()
    options = (placement or Placement()).options(SMALL_CPUS, SMALL_GPU if gpu else 0, node_resource)
    return ray.remote(**options)(AdvantageWorker).remote(str(ref_model_path), ppo_cfg, device="cuda" if gpu else "cpu",
                                                         chunk_tokens=chunk_tokens)


def start_scorer(rm_dir: str | Path | None, max_length: int | None = None, handle=None, max_pairs: int = 4096,
                 reward_functions=(), eval_function=None, chat_template: str = "auto", node_resource: str = "",
                 placement: Placement | None = None, max_steps: int = 0, environment_rewards: bool = False):
    """The scorer. ``reward_functions`` and ``eval_function`` are RewardFunctions, imported here; the
    code of those whose module is not installed travels with them (``functions.ship_by_value``).
    Neither ``rm_dir`` nor ``handle``: the reward functions alone score (no RM is loaded)."""
    from rlhf_ray.reward.functions import ship_by_value

    ship_by_value([*reward_functions, *([eval_function] if eval_function else [])])
    # In process, the RM runs on the GPU Ray assigns (RewardScorer picks CUDA when it sees one);
    # through a Serve handle, the deployment has its own resources (serve.num_gpus).
    gpu = handle is None and rm_dir is not None and cluster_has_gpu()
    options = (placement or Placement()).options(SMALL_CPUS, SMALL_GPU if gpu else 0, node_resource)
    return ray.remote(**options)(RolloutScorer).remote(
        None if handle is not None or rm_dir is None else str(rm_dir), max_length, handle, max_pairs,
        list(reward_functions), eval_function, chat_template, max_steps, environment_rewards)


def start_rollout_worker(model_path: str | Path, rollout_cfg: RolloutConfig, worker_id: int, seed: int,
                         version: int = 0, placement: Placement | None = None, **options):
    """``options``: RolloutWorker's ``max_model_len``, ``chat_template`` and ``tools``. Colocated, the engines
    share the node's cores (rollout.num_workers of them generate at once)."""
    on_gpu = rollout_cfg.gpus_per_worker > 0
    # vLLM logs every weight reload at INFO/WARNING; keep the driver's output to the progress lines.
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
    if log_level() > logging.INFO:  # the engine's start-up: torch's NUMA notice, vLLM's FutureWarnings
        env.update(TORCH_CPP_LOG_LEVEL=os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"),
                   PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning"))
    if not on_gpu:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    ray_options = (placement or Placement()).options(rollout_cfg.cpus_per_worker, rollout_cfg.gpus_per_worker,
                                                     rollout_cfg.node_resource, share=rollout_cfg.num_workers)
    env.update(ray_options.pop("runtime_env", {}).get("env_vars", {}))
    return ray.remote(runtime_env={"env_vars": env}, **ray_options)(RolloutWorker).remote(
        str(model_path), rollout_cfg, worker_id=worker_id, seed=seed, device="cuda" if on_gpu else "cpu",
        version=version, **options)


def fill_groups(first, scorer, workers: list, extra_prompts: list[list], ppo_cfg: PPOConfig, seeds: list[int]):
    """Dynamic sampling of one iteration in a Ray task (``rlhf_ray.ppo.dynamic.fill_groups``): a ref of the
    ScoredRollout with ppo.prompts_per_iteration groups. ``first``: a ref of the iteration's scored rollout."""
    from rlhf_ray.ppo import dynamic

    return ray.remote(num_cpus=0)(dynamic.fill_groups).remote(first, scorer, workers, extra_prompts, ppo_cfg, seeds)
