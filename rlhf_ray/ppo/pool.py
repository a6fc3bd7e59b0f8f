"""The rollout workers of a PPO run (vLLM engines in Ray actors), resizable between iterations.

The number of workers can change while a job runs: through the ``on_iteration`` callback
(``ctx.pool.set_num_workers(n)``) or by writing a number into ``<out_dir>/rollout_workers``
(CONTROL_FILE). New workers start from the initial policy and get the current weights before their
first rollout. A resumed or restarted run starts with the file's number; a fresh run removes the
file an earlier run left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from rlhf_ray.config import LearnerConfig, PPOConfig, RolloutConfig
from rlhf_ray.ppo import refs

CONTROL_FILE = "rollout_workers"


class RolloutPool:
    """The rollout workers of a job; resizable between iterations."""

    def __init__(self, model_path: str | Path, rollout_cfg: RolloutConfig, seed: int, log=print, version: int = 0,
                 learner_cfg: LearnerConfig | None = None, placement=None, **engine_options):
        """``version``: the policy version of the weights in ``model_path`` (0 unless resuming);
        ``learner_cfg``: the learner's (for the CPUs a resize needs); ``placement``: the run's
        ``actors.Placement`` (None: disaggregated); ``engine_options``: RolloutWorker's ``max_model_len``
        and ``chat_template``."""
        from rlhf_ray.ppo.actors import Placement

        self.model_path, self.cfg, self.seed, self.log = str(model_path), rollout_cfg, seed, log
        self.learner_cfg, self.placement = learner_cfg or LearnerConfig(), placement or Placement()
        self.engine_options = engine_options
        self.version = version
        self.workers: list = []
        self._next_id = 0
        # The weight transport's link (rlhf_ray.ppo.transport), once the weight sync has set one up: it
        # brings workers added later in.
        self.transport = None
        self._primed: set[int] = set()  # (partial rollouts) workers that had their first call

    def set_num_workers(self, n: int) -> None:
        """Start or stop workers so that ``n`` run. Call between iterations (no rollout in flight).
        A new worker gets the last synced weights before anything else."""
        import ray

        from rlhf_ray.ppo import actors

        if n < 1:
            raise ValueError(f"set_num_workers: need at least 1 worker, got {n}")
        need = actors.cpus_needed(n, self.cfg, self.learner_cfg, self.placement.colocated)
        have = ray.cluster_resources().get("CPU", 0)
        if need > have:  # an actor that cannot be placed would pend forever
            raise ValueError(f"set_num_workers({n}): the PPO actors would need {need} CPUs, the Ray cluster "
                             f"has {have}")
        while len(self.workers) < n:
            w = actors.start_rollout_worker(self.model_path, self.cfg, worker_id=self._next_id, seed=self.seed,
                                            version=self.version, placement=self.placement, **self.engine_options)
            self._next_id += 1
            if self.transport is not None:  # the last synced weights, before anything else
                self.transport.join(w, f"set_num_workers({n})")
            self.workers.append(w)
        while len(self.workers) > n:
            w = self.workers.pop()
            self._primed.discard(id(w))
            refs.get_small(w.shutdown.remote())  # also waits for the worker's earlier tasks
            ray.kill(w)
        if self.transport is not None:
            self.transport.resized()

    def start(self, n: int, configured: int, control_file: Path) -> None:
        """Start ``n`` workers (what :func:`workers_at_start` chose); when the control file's count does
        not fit the cluster, the configured number (rollout.num_workers) instead."""
        try:
            self.set_num_workers(n)
        except ValueError as e:
            if n == configured:
                raise
            self.log(f"[ppo] not starting {n} rollout workers ({control_file}): {e}; "
                     f"rollout.num_workers={configured} instead")
            self.set_num_workers(configured)
        self.wait_ready()

    def follow(self, control_file: Path) -> None:
        """Between iterations: resize to the number an operator wrote into ``control_file``, if any."""
        wanted = requested_workers(control_file, self.log)
        if wanted is not None and wanted != len(self.workers):
            try:
                self.set_num_workers(wanted)
                self.log(f"[ppo] rollout workers -> {wanted} ({control_file})")
            except ValueError as e:
                self.log(f"[ppo] not resizing: {e}")

    def wait_ready(self) -> None:
        refs.get_small([w.ready.remote() for w in self.workers])

    def generate(self, prompts: list, ppo: PPOConfig, seed: int, extra: Callable[[], list] | None = None) -> list:
        """Split the prompts (PromptRecords, text or chats) across the workers; returns one Rollout ref
        per worker. With rollout.partial_rollouts, ``extra()`` gives more prompts (whole groups) for the
        workers' first calls (rlhf_ray.ppo.partial)."""
        if not self.cfg.partial_rollouts:
            return generate_on(self.workers, prompts, ppo, seed)
        first = [w for w in self.workers if id(w) not in self._primed]
        self._primed |= {id(w) for w in first}
        return generate_on(self.workers, prompts, ppo, seed, first=first, extra=extra() if first and extra else [])

    def close_transport(self) -> None:
        """Remove what the weight transport made (shared memory's files), if any."""
        link, self.transport = self.transport, None
        if link is not None:
            link.close()

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            try:
                refs.get_small(w.shutdown.remote())
            except Exception:  # a dead worker: kill it anyway
                pass
            ray.kill(w)
        self.workers = []


def generate_on(workers: list, prompts: list, ppo: PPOConfig, seed: int, first: list | None = None,
                extra: list = ()) -> list:
    """The prompts split across ``workers`` (rollout worker handles), in order; one Rollout ref each.

    ``first`` (partial rollouts; rlhf_ray.ppo.partial): the workers on their first call. Then the prompts
    are split in whole groups of ppo.samples_per_prompt, each worker returns as many groups as it gets
    (its quota), and each worker of ``first`` also gets as many groups again from ``extra`` (the groups in
    flight that let a cut happen)."""
    n = ppo.samples_per_prompt if first is not None else 1
    sizes = [n * len(a) for a in np.array_split(np.arange(len(prompts) // n), len(workers))]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = [(w, list(prompts[a:b])) for w, a, b in zip(workers, starts[:-1], starts[1:]) if b > a]
    if first is None:
        return [w.generate.remote(part, ppo.max_new_tokens, ppo.temperature, ppo.top_p, seed) for w, part in parts]
    refs_, extra, firsts = [], list(extra), {id(w) for w in first}
    for w, part in parts:
        more = extra[:len(part)] if id(w) in firsts else []
        extra = extra[len(more):]
        refs_.append(w.generate.remote(part + more, ppo.max_new_tokens, ppo.temperature, ppo.top_p, seed,
                                       group_size=n, quota=len(part) // n))
    return refs_


def requested_workers(path: Path, log) -> int | None:
    """The worker count an operator wrote into the control file, if any (bad content is ignored)."""
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError:
        log(f"[ppo] ignoring {path}: expected an integer")
        return None


def workers_at_start(path: Path, configured: int, continuing: bool, log) -> int:
    """The rollout workers a start of the actors begins with. A resumed or restarted run goes on with
    what an operator wrote into the control file ``path``; a fresh run uses ``configured``
    (rollout.num_workers) and removes a control file that an earlier job left, which would
    otherwise resize it after its first iteration."""
    if not continuing:
        if path.exists():
            path.unlink()
            log(f"[ppo] starting fresh: removed {path} (left by an earlier run); rollout.num_workers={configured}")
        return configured
    wanted = requested_workers(path, log)
    if wanted is not None and wanted < 1:
        log(f"[ppo] ignoring {path}: need at least 1 rollout worker, got {wanted}")
        wanted = None
    if wanted is not None and wanted != configured:
        log(f"[ppo] rollout workers: {wanted} ({path}), not rollout.num_workers={configured}")
    return configured if wanted is None else wanted
