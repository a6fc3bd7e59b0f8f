"""``learner.num_workers`` learner ranks as Ray actors in one placement group, used like one learner actor.

The driver holds a :class:`LearnerGroup` where it would hold the learner's actor handle and calls it
the same way (``group.train.remote(batch)``, ``group.send_weights.options(num_returns=n).remote(...)``).
A call that needs every rank (the PPO epochs, loading a checkpoint and, when the model is sharded,
every forward and every export) is submitted to all of them with the same arguments, in the same
order (Ray runs an actor's calls from one caller in order, so the ranks meet in the same collectives);
the others go to rank 0 alone, which holds the whole model under DDP. What comes back is rank 0's
refs. Arguments that are refs (a batch in the object store) are read by each rank from there.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.config import LearnerConfig, PPOConfig
from rlhf_ray.ppo.distributed import RankSpec
from rlhf_ray.ppo.learner import Learner
from rlhf_ray.ppo.nodes import address_on

EVERY_RANK = frozenset({"train", "load_checkpoint"})
# Sharded (fsdp), a forward or an export gathers parameters from every rank; every rank's weight sender
# takes part in an export (opening one gathers nothing).
GATHERS = frozenset({"evaluate", "probe", "logprobs", "loss", "state_dict", "send_weights", "save", "save_checkpoint"})
EVERY_RANK_SHARDED = EVERY_RANK | GATHERS | {"open_sender"}
PLACEMENT_TIMEOUT_S = 120


class LearnerGroup:
    """The ranks (actor handles, rank 0 first), their placement group and strategy; attribute access
    gives a method to call ``.remote`` (or ``.options(...).remote``) on, as on an actor handle."""

    def __init__(self, ranks: list, pg, strategy: str):
        self.ranks, self.placement_group, self.strategy = ranks, pg, strategy
        self.every_rank = EVERY_RANK_SHARDED if strategy == "fsdp" else EVERY_RANK

    def __getattr__(self, name: str):
        if name.startswith("_") and name != "__ray_call__":  # (copy, pickle: not actor methods)
            raise AttributeError(name)
        return _GroupMethod(self, name, {})

    def shutdown(self) -> None:
        """Kill the ranks and free their placement group."""
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.placement_group)


class _GroupMethod:
    def __init__(self, group: LearnerGroup, name: str, options: dict):
        self.group, self.name, self.opts = group, name, options

    def options(self, **options) -> _GroupMethod:
        return _GroupMethod(self.group, self.name, {**self.opts, **options})

    def remote(self, *args, **kwargs):
        ranks = self.group.ranks if self.name in self.group.every_rank else self.group.ranks[:1]
        out = [getattr(r, self.name).options(**self.opts).remote(*args, **kwargs) if self.opts
               else getattr(r, self.name).remote(*args, **kwargs) for r in ranks]
        return out[0]


def _ends_its_rank_on_failure(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            if self.rank == 0 and not isinstance(e, RuntimeError):
                raise
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
    return call


# A rank whose collective failed (a peer died: gloo's "Connection reset by peer", NCCL's errors; a
# timeout) cannot go on with its peers. It ends its process, so that the run sees an actor death, as for
# a lost node, and restarts from its last checkpoint (ppo.max_failures) instead of failing on the error.
# Rank 0's other errors (a missing checkpoint file) come back to the driver as they are. The driver
# waits on rank 0 alone, so any error of another rank ends that rank (its traceback in the log): its
# peers' collectives then fail at once instead of waiting out the group's timeout.
LearnerRank = type("LearnerRank", (Learner,), {
    name: _ends_its_rank_on_failure(getattr(Learner, name)) for name in sorted(EVERY_RANK | GATHERS)})
LearnerRank.__doc__ = "A Learner rank of a group (``Learner`` whose failed collectives end the process)."


def start_learner_group(policy_path: str, ppo_cfg: PPOConfig, learner_cfg: LearnerConfig, cpus: float,
                        gpu: bool, chat_template: str = "auto") -> LearnerGroup:
    """``learner_cfg.num_workers`` Learner ranks, each ``cpus`` CPUs (and one GPU when ``gpu``) in one
    placement group placed by ``learner_cfg.placement_strategy``; they join their process group as they
    start. Raises RuntimeError when the cluster cannot place them."""
    from rlhf_ray.ppo.actors import NODE_RESOURCE_UNIT

    n = learner_cfg.num_workers
    bundle = {"CPU": cpus, **({"GPU": 1} if gpu else {}),
              **({learner_cfg.node_resource: NODE_RESOURCE_UNIT} if learner_cfg.node_resource else {})}
    pg = placement_group([dict(bundle) for _ in range(n)], strategy=learner_cfg.placement_strategy)
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(f"learner.num_workers={n}: the cluster could not place {n} x {bundle} "
                           f"({learner_cfg.placement_strategy}) within {PLACEMENT_TIMEOUT_S} s") from None
    on = lambda i: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)  # noqa: E731
    host, port = address_on(on(0))
    cls = ray.remote(num_cpus=cpus, num_gpus=1 if gpu else 0)(LearnerRank)
    ranks = [cls.options(scheduling_strategy=on(i)).remote(
        policy_path, ppo_cfg, device="cuda" if gpu else "cpu", chat_template=chat_template, learner_cfg=learner_cfg,
        rank=RankSpec(i, n, f"tcp://{host}:{port}", learner_cfg.strategy)) for i in range(n)]
    return LearnerGroup(ranks, pg, learner_cfg.strategy)
