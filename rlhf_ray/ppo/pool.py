"""The rollout workers of a PPO run (vLLM engines in Ray actors), resizable between iterations.

The number of workers can change while a job runs: through the ``on_iteration`` callback
(``ctx.pool.set_num_workers(n)``) or by writing a number into ``<out_dir>/rollout_workers``
(CONTROL_FILE). New workers start from the initial policy and get the current weights before their
first rollout. A resumed or restarted run starts with the file's number; a fresh run removes the
file an earlier run left.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rlhf_ray.config import LearnerConfig, PPOConfig, RolloutConfig
from rlhf_ray.ppo import refs
from rlhf_ray.ppo.nodes import address_on, node_of
from rlhf_ray.ppo.sync import WeightSyncError

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
        self._weights = None  # (bucket refs, version) of the last sync, for workers added later
        self.shared: dict | None = None  # the shared-memory weights' spec, once the engines read them
        self._slot = (version % 2, version)  # (slot, version) the engines read, for workers added later
        self._shared_node = None  # the learner's node, where every engine must run to share memory
        self.collective: dict | None = None  # the learner, weight meta and bucket size of a collective sync

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
            # Actor tasks run in order: the weights arrive before any rollout.
            if self.shared is not None:
                node = refs.get_small(w.sync_info.remote())["node_id"]  # waits for the engine to start
                if node != self._shared_node:
                    ray.kill(w)
                    raise ValueError(f"set_num_workers({n}): the new rollout worker started on node {node}, "
                                     f"not on the learner's, where the engines share weights in memory")
                try:  # awaited: a failure surfaces here with its cause, not at the worker's first rollout
                    refs.get_small(w.attach_shared_weights.remote(self.shared, None, *self._slot))
                except Exception:
                    ray.kill(w)
                    raise
            elif self._weights is not None:
                w.update_weights.remote(*self._weights)
            self.workers.append(w)
        while len(self.workers) > n:
            w = self.workers.pop()
            refs.get_small(w.shutdown.remote())  # also waits for the worker's earlier tasks
            ray.kill(w)
        if self.collective is not None and n != len(self.collective["members"]):
            # Another set of engines: a new group, formed as each member reaches its join (the learner
            # after the training queued before it: the driver does not wait for that). Synchronous, the
            # new engines' next rollout follows at once: the learner's weights (the last synced ones)
            # first. One-step-off, the next sync comes before any rollout of the new engines.
            self._form_group()
            if not self.cfg.async_one_step_off:
                self.sync_collective(self.collective["version"])

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

    def generate(self, prompts: list, ppo: PPOConfig, seed: int) -> list:
        """Split the prompts (PromptRecords, text or chats) across the workers; returns one Rollout ref
        per worker."""
        return generate_on(self.workers, prompts, ppo, seed)

    def attach_shared_weights(self, learner, required: bool) -> str | None:
        """Move the engines onto shared-memory weights written by ``learner`` (before the first
        update). Returns None when done, else why not; raises instead when ``required``."""
        import ray

        infos = refs.get_small([w.sync_info.remote() for w in self.workers])
        node = node_of(learner)
        why = None
        if any(i["node_id"] != node for i in infos):
            why = "a rollout worker runs on another node than the learner"
        elif any(i["device"] != "cpu" for i in infos):
            why = "the engines run on GPUs"
        elif any(i["dtype"] != "float32" for i in infos):
            dtypes = "/".join(sorted({i["dtype"] for i in infos} - {"float32"}))
            why = f"the engines compute in {dtypes} (shared memory holds float32 weights)"
        elif any(i["mode"] != "in_place" for i in infos):
            why = ("the engines keep packed weights (rollout.cpu_plain_weights=false, or engines in their own "
                   "process: VLLM_ENABLE_V1_MULTIPROCESSING=1)")
        else:
            shapes = learner.weight_shapes.remote()  # a ref: learner to engine
            version = self._weights[1] if self._weights is not None else self.version  # what the engines hold
            # Version v lives in slot v % 2 and the first write (v + 1) waits for nothing: the engines
            # must read the other slot, or a run resumed at an odd version overwrites the weights that
            # its queued rollouts sample. Both slots start as a copy of the first engine's weights.
            slot, spec = version % 2, None
            try:
                spec = refs.get_small(self.workers[0].attach_shared_weights.remote(None, shapes, slot, version))
                refs.get_small([w.attach_shared_weights.remote(spec, None, slot, version) for w in self.workers[1:]])
                self.shared, self._slot, self._shared_node = spec, (slot, version), node
            except Exception as e:
                # An engine's code refused (RayTaskError): the job goes on with the object store. Else an
                # engine or the learner died, or a call timed out: the run fails (or restarts). Either
                # way no engine may stay on the files and the files go (self.shared is not set, so the
                # run's cleanup would not remove them).
                failed = not isinstance(e, ray.exceptions.RayTaskError)
                if spec is not None:
                    from rlhf_ray.ppo.shared_weights import unlink_slots

                    try:
                        if not failed:  # back to private weights
                            refs.get_small([w.detach_shared_weights.remote() for w in self.workers])
                            refs.get_small(learner.close_shared_weights.remote(spec))
                    finally:
                        unlink_slots(spec)  # from the driver too: on the learner's node in most setups
                if failed:
                    raise
                why = f"{type(e.cause).__name__}: {e.cause}"
        if why is not None and required:
            raise WeightSyncError(f"rollout.weight_sync=shared_memory: {why}")
        return why

    def sync_shared(self, written_ref, version: int, slot: int) -> list:
        """Every engine switches to ``slot`` once the learner's write (``written_ref``) is done."""
        self._slot = (slot, version)
        return [w.use_shared_weights.remote(written_ref, version) for w in self.workers]

    def join_collective(self, learner, meta: dict, bucket_bytes: int) -> None:
        """Form the weight group of ``learner`` and every engine (``rlhf_ray.ppo.collective``); waits
        for it. ``meta``: the weights' names, dtypes and shapes (``Learner.weight_meta``)."""
        self.collective = {"learner": learner, "meta": meta, "bucket_bytes": bucket_bytes, "members": [],
                           "version": self.version, "node": node_of(learner)}
        refs.get_small(self._form_group())

    def _form_group(self) -> list:
        """Submit the (re)forming of the weight group with the current engines; refs of the joins. Where
        it meets (the learner's node, a free port there) comes from a task on that node, not from the
        learner, which may be training."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        c = self.collective
        # (soft: were the node lost, the task runs elsewhere and the learner's death surfaces at its next
        # call, which restarts the run, instead of an unschedulable task failing it)
        host, port = address_on(NodeAffinitySchedulingStrategy(c["node"], soft=True))
        world = 1 + len(self.workers)
        c["members"] = list(self.workers)
        return [c["learner"].join_weight_group.remote(host, port, world),
                *(w.join_weight_group.remote(host, port, 1 + i, world, c["bucket_bytes"])
                  for i, w in enumerate(self.workers))]

    def sync_collective(self, version: int) -> list:
        """The learner broadcasts its weights to the group; every engine takes them as ``version``.
        Returns refs of the engines' info dicts and, last, the learner's."""
        c = self.collective
        c["version"] = version
        sent = c["learner"].broadcast_weights.remote(c["meta"], c["bucket_bytes"])
        return [*(w.receive_weights.remote(c["meta"], version) for w in self.workers), sent]

    def sync(self, bucket_refs, version: int) -> list:
        """Load the same weights (refs: put once) into every worker; returns refs of their info dicts."""
        self._weights = (bucket_refs, version)
        return [w.update_weights.remote(bucket_refs, version) for w in self.workers]

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            try:
                refs.get_small(w.shutdown.remote())
            except Exception:  # a dead worker: kill it anyway
                pass
            ray.kill(w)
        self.workers = []


def generate_on(workers: list, prompts: list, ppo: PPOConfig, seed: int) -> list:
    """The prompts split across ``workers`` (rollout worker handles), in order; one Rollout ref each."""
    sizes = [len(a) for a in np.array_split(np.arange(len(prompts)), len(workers))]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = [list(prompts[a:b]) for a, b in zip(starts[:-1], starts[1:]) if b > a]
    return [w.generate.remote(part, ppo.max_new_tokens, ppo.temperature, ppo.top_p, seed)
            for w, part in zip(workers, parts)]


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
