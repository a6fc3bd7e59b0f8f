"""Same-node weight sync through shared memory (``rollout.weight_sync=shared_memory``, and ``auto`` where
it applies): the engines' parameters live in two slot files under /dev/shm (``slots``) that every
engine on the learner's node maps; the learner writes version v into slot v % 2, then each engine
points its parameters at that slot. One copy per byte per sync, whatever the number of engines.

The learner overwrites a slot only after every engine has moved off it: its write waits for the
previous sync's results. The first engine creates the slots from its own weights and finds where
each Hugging Face weight lands in them (``slots.find_placements``); it needs the "in_place" conditions
(``rlhf_ray.ppo.vllm_ext``) and float32 CPU parameters. Where that fails under ``auto``, the run uses
the object store.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch

from rlhf_ray.ppo import refs
from rlhf_ray.ppo.nodes import node_of
from rlhf_ray.ppo.transport.slots import (SharedSlots, check_order, find_placements, new_spec, order_pattern,
                                          unlink_slots)

NAME = "shared_memory"


class SharedMemoryTransport:
    """The driver's half (see ``rlhf_ray.ppo.transport.Transport``); made by :meth:`attach`."""

    name, one_send_for_all = NAME, True

    def __init__(self, pool, learner, spec: dict, slot: tuple[int, int], node: str):
        self.pool, self.learner, self.spec, self.node = pool, learner, spec, node
        self.slot = slot  # (slot, version) the engines read, for workers added later
        self.last: list = []  # refs of the last sync: the next write waits for them
        removed = spec.get("stale_removed")
        self.notes = [f"removed {len(removed)} slot file(s) left by killed jobs"] if removed else []

    @classmethod
    def attach(cls, pool, learner, meta: dict, required: bool) -> tuple[SharedMemoryTransport | None, str | None]:
        """Move the engines of ``pool`` onto shared-memory weights written by ``learner`` (before the
        first update; ``meta``: ``Learner.weight_meta``). Returns (the link, None) when done, else
        (None, why not); raises instead when ``required``."""
        import ray

        from rlhf_ray.ppo.sync import WeightSyncError

        infos = refs.get_small([w.sync_info.remote() for w in pool.workers])
        node = node_of(learner)
        why = link = None
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
            shapes = dict(zip(meta["names"], meta["shapes"]))
            # Version v lives in slot v % 2 and the first write (v + 1) waits for nothing: the engines
            # must read the other slot, or a run resumed at an odd version overwrites the weights that
            # its queued rollouts sample. Both slots start as a copy of the first engine's weights.
            version = pool.version  # what the engines hold
            slot, spec = version % 2, None
            try:
                spec = refs.get_small(pool.workers[0].open_receiver.remote(NAME, None, shapes, slot, version))
                learner.open_sender.remote(NAME, spec)
                refs.get_small([w.open_receiver.remote(NAME, spec, None, slot, version) for w in pool.workers[1:]])
                link = cls(pool, learner, spec, (slot, version), node)
            except Exception as e:
                # An engine's code refused (RayTaskError): the job goes on with the object store. Else an
                # engine or the learner died, or a call timed out: the run fails (or restarts). Either
                # way no engine may stay on the files and the files go (no link is made, so the run's
                # cleanup would not remove them).
                failed = not isinstance(e, ray.exceptions.RayTaskError)
                if spec is not None:
                    try:
                        if not failed:  # back to private weights
                            refs.get_small([w.close_receiver.remote() for w in pool.workers])
                            refs.get_small(learner.close_sender.remote())
                    finally:
                        unlink_slots(spec)  # from the driver too: on the learner's node in most setups
                if failed:
                    raise
                why = f"{type(e.cause).__name__}: {e.cause}"
        if why is not None and required:
            raise WeightSyncError(f"rollout.weight_sync=shared_memory: {why}")
        return link, why

    def describe(self) -> str:
        return f"shared memory, 2 x {self.spec['numel'] * 4 >> 20} MiB in {self.spec['paths'][0][:-1]}{{0,1}}"

    def send(self, version: int) -> list:
        # Slot version % 2; the write waits until every engine has left that slot (last sync).
        written = self.learner.send_weights.remote(version, *self.last)
        self.slot = (version % 2, version)
        self.last = [w.update_weights.remote(written, version) for w in self.pool.workers]
        return self.last

    def join(self, worker, context: str) -> None:
        import ray

        node = refs.get_small(worker.sync_info.remote())["node_id"]  # waits for the engine to start
        if node != self.node:
            ray.kill(worker)
            raise ValueError(f"{context}: the new rollout worker started on node {node}, not on the learner's, "
                             f"where the engines share weights in memory")
        try:  # awaited: a failure surfaces here with its cause, not at the worker's first rollout
            refs.get_small(worker.open_receiver.remote(NAME, self.spec, None, *self.slot))
        except Exception:
            ray.kill(worker)
            raise

    def resized(self) -> None:
        pass

    def close(self) -> None:
        """Remove the slot files (through the learner; from here when it is dead: the same node in most
        setups)."""
        try:
            refs.get_small(self.learner.close_sender.remote())
        except Exception:
            unlink_slots(self.spec)


class SharedMemorySender:
    """The learner's half: writes the policy into a slot (see ``rlhf_ray.ppo.transport.Sender``). Only
    rank 0 of a group maps the files."""

    def __init__(self, learner):
        self.learner, self.spec, self.slots = learner, None, None

    def open(self, spec: dict) -> None:
        self.spec = spec
        self.slots = SharedSlots(spec) if self.learner.rank == 0 else None

    def send(self, version: int, *after) -> dict:
        """Write the policy into slot ``version % 2``: one copy per byte. ``after``: results of the syncs
        that must be done before the slot is overwritten (Ray resolves them first; unused here).
        Returns {"slot", "bytes", "seconds", "version"}."""
        from rlhf_ray.ppo.distributed import full

        learner, slot = self.learner, version % 2
        start = time.perf_counter()
        with torch.no_grad():
            if self.slots is None:  # (sharded, rank > 0: the gathers rank 0's write needs, in its order)
                nbytes = sum(full(v).numel() * 4 for v in learner.exported_weights().values())
            else:
                nbytes = self.slots.write(slot, ((k, full(v)) for k, v in learner.exported_weights().items()))
        return {"slot": slot, "bytes": nbytes, "seconds": time.perf_counter() - start, "version": learner.version}

    def close(self) -> None:
        """Remove the slot files (mappings stay valid until their processes exit)."""
        self.slots = None
        if self.spec is not None:
            unlink_slots(self.spec)


class SharedMemoryReceiver:
    """The rollout worker's half: its engine reads the slots (see ``rlhf_ray.ppo.transport.Receiver``)."""

    def __init__(self, worker):
        self.worker, self.spec = worker, None

    def open(self, spec: dict | None, hf_shapes: dict | None, slot: int, version: int,
             directory: str = "/dev/shm") -> dict:
        """Make the engine read its weights from slot ``slot`` of ``spec``, which holds ``version``. The
        first engine passes ``spec=None`` and the learner's ``hf_shapes`` (name -> shape): it creates the
        slots from its own weights in ``directory`` and returns the spec for the others and the learner."""
        w = self.worker
        self.spec = w.llm.collective_rpc("shared_attach", args=(spec, hf_shapes, int(slot), directory))[0]
        w.weights_changed(version)
        return self.spec

    def receive(self, written) -> dict:
        """Switch to the slot the learner has just written (``written``: what its sender returned, which
        Ray resolves before this runs); its write counts as the sync's time."""
        if not (isinstance(written, Mapping) and "slot" in written):
            raise RuntimeError("update_weights: this engine reads shared weights; the learner writes them")
        self.worker.llm.collective_rpc("shared_use_slot", args=(int(written["slot"]),))
        return {"fetch_seconds": 0.0, "bytes": int(written["bytes"]), "mode": NAME,
                "write_seconds": written["seconds"]}

    def close(self) -> None:
        """Back to private weights (a copy of the current shared ones)."""
        if self.spec is not None:
            self.worker.llm.collective_rpc("shared_detach")
            self.spec = None


class SharedMemoryEngine:
    """The vLLM worker's side (mixed into ``rlhf_ray.ppo.vllm_ext.WeightSyncExtension``)."""

    def shared_attach(self, spec: dict | None, hf_shapes: dict | None, slot: int, directory: str) -> dict:
        """Point every parameter at slot ``slot`` of the shared weights and keep them there.

        ``spec`` None (the first engine): create the slots in ``directory`` from this engine's
        parameters (both slots get its current weights), find where each of ``hf_shapes``' weights
        lands (this engine's loader, see ``slots``) and return the spec for the learner and the other
        engines. Otherwise check that this engine's parameters match ``spec``. On failure the engine
        keeps its own weights and the error says why.
        """
        params = self._rlhf_params()
        if self.weight_sync_mode() != "in_place":
            raise RuntimeError("shared weights need in-place loading (plain weights, not quantised)")
        odd = [n for n, p in params.items() if p.dtype != torch.float32 or p.device.type != "cpu"]
        if odd:
            raise RuntimeError(f"shared weights need float32 CPU parameters; e.g. {odd[:3]} are not")
        if spec is None:
            spec = new_spec({n: tuple(p.shape) for n, p in params.items()}, directory)
            slots = SharedSlots(spec, create=True)
            try:
                for s in (0, 1):
                    for n, view in slots.views(s).items():
                        view.copy_(params[n].detach())
                spec["placements"] = self._find_placements(params, hf_shapes)
                spec["stale_removed"] = slots.stale_removed
            except Exception:
                with torch.no_grad():  # discovery overwrote the parameters: put the weights back
                    for n, view in slots.views(0).items():
                        params[n].copy_(view)
                slots.unlink()
                raise
        else:
            mine = {n: [int(d) for d in p.shape] for n, p in params.items()}
            theirs = {n: list(shape) for n, (_, shape) in spec["params"].items()}
            if mine != theirs:
                raise RuntimeError("this engine's parameters differ from the shared weights' layout")
            slots = SharedSlots(spec)
        self._rlhf_slots = slots
        self.shared_use_slot(slot)
        return spec

    def _find_placements(self, params: dict, hf_shapes: dict) -> dict:
        model = self.model_runner.get_model()
        numels = {n: int(np.prod(shape)) for n, shape in hf_shapes.items()}
        with torch.no_grad():
            for p in params.values():
                p.zero_()
            model.load_weights((n, torch.full(tuple(shape), float(i + 1)))
                               for i, (n, shape) in enumerate(hf_shapes.items()))
            placements = find_placements(params, numels)
            for p in params.values():
                p.zero_()
            model.load_weights((n, order_pattern(numels[n]).view(tuple(hf_shapes[n]))) for n in placements)
            check_order(params, placements, numels)
        return {n: [pname, int(start), numels[n]] for n, (pname, start) in placements.items()}

    def shared_use_slot(self, slot: int) -> None:
        """Every parameter now reads slot ``slot`` (no copy)."""
        params = self._rlhf_params()
        for n, view in self._rlhf_slots.views(slot).items():
            params[n].data = view

    def shared_detach(self) -> None:
        """Give every parameter its own memory again (a copy of the slot it reads)."""
        for p in self._rlhf_params().values():
            p.data = p.data.clone()
        self.__dict__.pop("_rlhf_slots", None)


SENDER, RECEIVER = SharedMemorySender, SharedMemoryReceiver
