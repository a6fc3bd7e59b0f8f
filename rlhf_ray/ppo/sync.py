"""New weights from the learner into every rollout engine after each update, and the drift check
that proves they arrived.

How the weights travel is the weight transport's business (``rlhf_ray.ppo.transport``: shared memory,
the object store or a collective, by ``rollout.weight_sync``); :class:`WeightSync` chooses the wire
dtype, keeps the versions and checks the result. After each sync one engine (round robin) computes the
logprobs of a few sampled sequences, which must match the learner's within ``rollout.max_logprob_drift``
(0: a limit chosen by the engines' dtype, :func:`rlhf_ray.ppo.weights.drift_limit`); version stamps
catch a missed sync.
"""

from __future__ import annotations

import time

from rlhf_ray.config import RolloutConfig
from rlhf_ray.ppo import refs
from rlhf_ray.ppo.transport import open_transport

DRIFT_PROBE_ROWS = 4


class WeightSyncError(RuntimeError):
    """After a weight sync an engine's logprobs differ from the learner's by more than allowed."""


class WeightSync:
    """Weight sync from ``learner`` to the engines of ``pool`` (a RolloutPool), set up once per start
    of the actors: the wire dtype (the engines' 16-bit dtype if they share one: they would round
    float32 to it, so half the bytes), the drift limit, and the transport (``rollout.weight_sync``:
    auto | shared_memory | collective | object_store), which the pool keeps for its resizes."""

    def __init__(self, pool, learner, rc: RolloutConfig, bucket_bytes: int):
        from rlhf_ray.ppo.weights import drift_limit

        self.pool, self.learner = pool, learner
        engines = refs.get_small([w.sync_info.remote() for w in pool.workers])
        wire_dtypes = {i["wire_dtype"] for i in engines}
        self.wire_dtype = wire_dtypes.pop() if len(wire_dtypes) == 1 else "float32"
        self.engine_dtypes = sorted({i["dtype"] for i in engines})
        self.configured_drift = rc.max_logprob_drift
        self.max_drift = drift_limit(rc.max_logprob_drift, set(self.engine_dtypes))
        self.transport = open_transport(pool, learner, rc.weight_sync, bucket_bytes, self.wire_dtype)
        self.synced: list = []  # refs of the last sync (every engine's info dict)

    def describe(self) -> list[str]:
        """Lines for the run's log: the path, the drift limit, and the transport's notes."""
        return [f"weight sync: {self.transport.describe()}; drift limit {self.max_drift:g} "
                f"({'/'.join(self.engine_dtypes)} engines)", *self.transport.notes]

    def push(self, version: int) -> None:
        """Submit the sync of the learner's weights after its ``version``-th update (runs after the
        train call submitted before it)."""
        self.synced = self.transport.send(version)

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
        shared = self.transport.one_send_for_all
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

