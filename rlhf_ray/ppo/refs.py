"""The PPO driver's one ``ray.get``: it fetches small results only (stats dicts, versions, a drift
probe of a few sequences). Bulk data (rollouts, batches, weights) moves actor to actor as object refs."""

from __future__ import annotations

import pickle

SMALL_RESULT_BYTES = 256 << 10  # the most the driver may fetch in one ray.get
GET_TIMEOUT_S = 900.0  # a stage that takes longer is stuck (e.g. an actor pending on resources)


def get_small(refs, limit: int = SMALL_RESULT_BYTES):
    """Ray's get of ``refs``, for the driver: anything over ``limit`` bytes (pickled) raises, since bulk
    data must stay in the object store."""
    import ray

    value = ray.get(refs, timeout=GET_TIMEOUT_S)
    size = len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    if size > limit:
        raise RuntimeError(f"driver fetched {size} bytes ({type(value).__name__}); bulk data must stay "
                           f"in the object store and move actor to actor as refs (limit {limit})")
    return value
