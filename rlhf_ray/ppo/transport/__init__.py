"""Weight transport: how new policy weights go from the learner to the rollout engines, one module
per way (``rollout.weight_sync``):

    object_store    the learner's weight buckets put once in the object store; every engine loads the
                    same refs (any node, any device)
    shared_memory   two slot files under /dev/shm that every engine on the learner's node maps; the
                    learner writes the slot no engine reads, each engine switches to it (one copy per
                    sync, however many engines)
    collective      one process group of the learner and every engine (any node); the learner
                    broadcasts each bucket once

Each module owns three halves, one per process:

* the **link** (:class:`Transport`, in the driver): sets the path up between a learner and the engines
  of a pool, submits each sync, brings an engine added by a resize in, and removes what it made;
* the **sender** (:class:`Sender`, held by the Learner as ``learner.sender``): the learner's side of a
  sync (``Learner.open_sender`` / ``send_weights`` / ``close_sender``);
* the **receiver** (:class:`Receiver`, held by the RolloutWorker as ``worker.receiver``; the object
  store's until another is opened): the engine's side (``RolloutWorker.open_receiver`` /
  ``update_weights`` / ``close_receiver``).

``rlhf_ray.ppo.sync.WeightSync`` keeps the versions and the drift check and talks to the link alone.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

NAMES = ("object_store", "shared_memory", "collective")


class Transport(Protocol):
    """The driver's half: one path from ``learner`` to the engines of a ``RolloutPool``."""

    name: str  # "object_store" | "shared_memory" | "collective"
    one_send_for_all: bool  # one write or broadcast serves every engine (its bytes and time count once)
    notes: list[str]  # lines for the run's log after :meth:`describe`'s

    def describe(self) -> str:
        """The path in words, for the run's log (``weight sync: <this>; drift limit ...``)."""

    def send(self, version: int) -> list:
        """Submit the sync of the learner's weights after its ``version``-th update (after the train
        call submitted before it). Returns refs of every engine's info dict (in pool order), then any
        of the learner's."""

    def join(self, worker, context: str) -> None:
        """A worker that a resize added (before its first rollout): give it the last synced weights.
        ``context``: what an error about it names (``set_num_workers(n)``)."""

    def resized(self) -> None:
        """After a resize changed the pool's set of engines."""

    def close(self) -> None:
        """Remove what the path made (files); idempotent, and safe when the learner is dead."""


class Sender(Protocol):
    """The learner's half (``Learner.sender``). Built with the learner, its weight source."""

    def open(self, *args) -> Any:
        """Set up (again, with new arguments: a re-formed group); returns what the link needs."""

    def send(self, version: int, *after) -> Any:
        """The weights of ``version`` on their way: what the engines' :meth:`Receiver.receive` takes
        (buckets, the written slot's info, the broadcast's info). ``after``: results of the last sync,
        which Ray resolves before this runs."""

    def close(self) -> None: ...


class Receiver(Protocol):
    """The rollout worker's half (``RolloutWorker.receiver``). Built with the worker, its engine."""

    def open(self, *args) -> Any: ...

    def receive(self, payload) -> dict:
        """Load the weights the sender sent (``payload``); returns {"fetch_seconds", "bytes", "mode"}
        and, where the learner's time counts as the sync's, "write_seconds"."""

    def close(self) -> None: ...


def module(name: str):
    """The module of transport ``name`` (one of NAMES): its ``SENDER`` and ``RECEIVER`` classes."""
    if name not in NAMES:
        raise ValueError(f"weight transport: expected one of {NAMES}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def open_transport(pool, learner, weight_sync: str, bucket_bytes: int, wire_dtype: str) -> Transport:
    """The link ``rollout.weight_sync`` asks for between ``learner`` and the engines of ``pool``, set
    up (shared memory where it works under "auto", else the object store); the pool's from now on."""
    from rlhf_ray.ppo import refs
    from rlhf_ray.ppo.transport import collective, object_store, shared_memory

    meta = refs.get_small(learner.weight_meta.remote(wire_dtype))
    if weight_sync == "collective":  # one group of the learner and every engine, on any node
        link = collective.CollectiveTransport(pool, learner, meta, bucket_bytes, wire_dtype)
    else:
        link, why = None, f"rollout.weight_sync={weight_sync}"
        if weight_sync != "object_store":
            link, why = shared_memory.SharedMemoryTransport.attach(pool, learner, meta,
                                                                   required=weight_sync == "shared_memory")
        if link is None:
            link = object_store.ObjectStoreTransport(pool, learner, meta, bucket_bytes, wire_dtype, why)
    pool.transport = link
    return link
