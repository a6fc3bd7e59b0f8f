"""New weights from the learner into every rollout engine after each update, and the drift check
that proves they arrived.

Three paths (``rollout.weight_sync``): engines on the learner's node read their weights from shared
memory that the learner writes (``rlhf_ray.ppo.shared_weights``: one copy per sync, however many
engines); "collective": the learner broadcasts each bucket once to a process group of every engine
(``rlhf_ray.ppo.collective``); otherwise the learner's weight buckets are put once in the object store
and every engine loads the same refs. After each sync one engine (round robin) computes the logprobs of a few sampled
sequences, which must match the learner's within ``rollout.max_logprob_drift`` (0: a limit chosen by
the engines' dtype, :func:`rlhf_ray.ppo.weights.drift_limit`); version stamps catch a missed sync.
"""

from __future__ import annotations

import time

from rlhf_ray.config import RolloutConfig
from rlhf_ray.ppo import collective, refs

DRIFT_PROBE_ROWS = 4


class WeightSyncError(RuntimeError):
    """After a weight sync an engine's logprobs differ from the learner's by more than allowed."""


class WeightSync:
    """Weight sync from ``learner`` to the engines of ``pool`` (a RolloutPool), set up once per start
    of the actors: the wire dtype (the engines' 16-bit dtype if they share one: they would round
    float32 to it, so half the bytes), the bucket count, the drift limit, and shared memory where it
    works (``rollout.weight_sync``: auto | shared_memory | object_store)."""

    def __init__(self, pool, learner, rc: RolloutConfig, bucket_bytes: int):
        from rlhf_ray.ppo.weights import drift_limit

        self.pool, self.learner, self.bucket_bytes = pool, learner, bucket_bytes
        engines = refs.get_small([w.sync_info.remote() for w in pool.workers])
        wire_dtypes = {i["wire_dtype"] for i in engines}
        self.wire_dtype = wire_dtypes.pop() if len(wire_dtypes) == 1 else "float32"
        self.n_buckets = refs.get_small(learner.num_buckets.remote(bucket_bytes, self.wire_dtype))
        self.engine_dtypes = sorted({i["dtype"] for i in engines})
        self.configured_drift = rc.max_logprob_drift
        self.max_drift = drift_limit(rc.max_logprob_drift, set(self.engine_dtypes))
        self.why_not_shared = f"rollout.weight_sync={rc.weight_sync}"
        self.collective = rc.weight_sync == "collective"
        if self.collective:  # one group of the learner and every engine, on any node
            self.meta = refs.get_small(learner.weight_meta.remote(self.wire_dtype))
            pool.join_collective(learner, self.meta, bucket_bytes)
        elif rc.weight_sync != "object_store":
            self.why_not_shared = pool.attach_shared_weights(learner, required=rc.weight_sync == "shared_memory")
        self.synced: list = []  # refs of the last sync (every engine's info dict)

    def describe(self) -> str:
        why, shared = self.why_not_shared, self.pool.shared
        if self.collective:
            return (f"weight sync: collective (a {collective.BACKEND} group of the learner and "
                    f"{len(self.pool.workers)} engine(s)), {self.wire_dtype} weights in buckets of "
                    f"{self.bucket_bytes >> 20} MiB; drift limit {self.max_drift:g} ({'/'.join(self.engine_dtypes)} engines)")
        return ("weight sync: " + (f"object store ({why}), {self.wire_dtype} weights" if why else
                                   f"shared memory, 2 x {shared['numel'] * 4 >> 20} MiB in "
                                   f"{shared['paths'][0][:-1]}{{0,1}}")
                + f"; drift limit {self.max_drift:g} ({'/'.join(self.engine_dtypes)} engines)")

    def push(self, version: int) -> None:
        """Submit the sync of the learner's weights after its ``version``-th update (runs after the
        train call submitted before it)."""
        pool, learner = self.pool, self.learner
        if self.collective:  # each bucket broadcast once to every engine
            self.synced = pool.sync_collective(version)
        elif pool.shared is not None:
            # Slot version % 2; the write waits until every engine has left that slot (last sync).
            slot = version % 2
            self.synced = pool.sync_shared(learner.write_shared_weights.remote(pool.shared, slot, *self.synced),
                                           version, slot)
        else:  # the buckets are put once (the learner's return values); every engine gets the same refs
            buckets = learner.weight_buckets.options(num_returns=self.n_buckets).remote(
                self.bucket_bytes, copy=False, dtype=self.wire_dtype)
            self.synced = pool.sync(buckets, version)

    def probe(self, scored, iteration: int) -> tuple:
        """Submit the drift probe of iteration ``iteration`` (0-based): the learner's logprobs of a few
        sequences of ``scored`` and one engine's (round robin), queued behind the engine's update."""
        checked = iteration % len(self.pool.workers)
        ids, attn, resp, learner_lp = self.learner.probe.options(num_returns=4).remote(scored, DRIFT_PROBE_ROWS)
        return checked, self.pool.workers[checked].logprobs_of.remote(ids, attn, resp), learner_lp, resp

    def check(self, iteration: int, version: int, probe: tuple) -> dict:
        """Wait for the sync and the probe; raise WeightSyncError when an engine is not at ``version``
        or the probed engine's logprobs drift past the limit. Returns the sync's metrics."""
        from rlhf_ray.ppo.weights import logprob_drift

        checked, engine_lp, learner_lp, resp = probe
        t_sync = time.perf_counter()  # how long every engine's update takes beyond training
        infos = refs.get_small(self.synced)
        sync_wall = time.perf_counter() - t_sync
        drift = logprob_drift(*refs.get_small([engine_lp, learner_lp, resp]))  # one-step-off: after generate
        if any(info["version"] != version for info in infos):
            raise WeightSyncError(f"engines report versions {[i['version'] for i in infos]}, expected {version}")
        if not drift <= self.max_drift:
            self._drifted(iteration, version, checked, drift)
        # Shared memory, collective: one write or broadcast serves every engine; else one load per engine.
        shared = infos[0]["mode"] in ("shared_memory", "collective")
        sync_bytes = infos[0]["bytes"] if shared else sum(i["bytes"] for i in infos)
        sync_busy = max(i["seconds"] for i in infos) if shared else sum(i["seconds"] for i in infos)
        return {"sync_seconds": max(i["seconds"] for i in infos), "sync_wall_seconds": sync_wall,
                "sync_bytes": sync_bytes, "sync_mode": infos[0]["mode"],
                "sync_gb_per_s": sync_bytes / 1e9 / max(sync_busy, 1e-9),
                "drift": drift, "drift_limit": self.max_drift, "drift_worker": checked}

    def _drifted(self, iteration: int, version: int, checked: int, drift: float):
        dtype = refs.get_small(self.pool.workers[checked].sync_info.remote()).get("dtype", "float32")
        hint = ("" if dtype == "float32" else f" (the engine computes in {dtype}: even with the learner's "
                f"weights its logprobs differ from the float32 learner's; if this is that noise, not "
                f"wrong weights, set rollout.max_logprob_drift above it)")
        limit = (f"rollout.max_logprob_drift={self.max_drift:g}" if self.configured_drift > 0 else
                 f"{self.max_drift:g} (rollout.max_logprob_drift=0: the limit for {dtype} engines)")
        raise WeightSyncError(f"iteration {iteration}: rollout worker {checked} logprobs differ from the "
                              f"learner's by {drift:.3g} > {limit} after syncing version {version}{hint}")


def close_shared(pool, learner) -> None:
    """Remove the shared-memory weights, if the engines of ``pool`` read them (through the learner;
    from here when it is dead: the same node in most setups)."""
    spec = pool.shared
    if spec is None:
        return
    try:
        refs.get_small(learner.close_shared_weights.remote(spec))
    except Exception:
        from rlhf_ray.ppo.shared_weights import unlink_slots

        unlink_slots(spec)
