"""Collective weight sync (``rollout.weight_sync=collective``): the learner broadcasts each bucket of
its weights once to every engine through one process group, on any node.

The engines take the weights through vLLM 0.32's weight-transfer API (an engine built with
``weight_transfer_config``; ``LLM.init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` / ``finish_weight_update``). vLLM ships NCCL and CUDA-IPC backends; this module
registers a gloo one in its factory (:func:`register`), so CPU engines take part (and GPU engines
without NCCL to the learner). An engine whose layers read their parameters (GPU engines; CPU engines
with rollout.cpu_plain_weights) copies each weight in place as it arrives; one with packed CPU weights
loads through vLLM's layerwise reload, which repacks each layer once its weights are in.

The group: the learner's rank 0 is rank 0, engine i is rank 1 + i (one worker per engine). It is
formed when the set of engines changes (start, resize, restart) and reused for every sync. Per sync,
the names, dtypes and shapes travel as the call's arguments (they never change within a run); only
the bytes go over the group, in buckets of at most ``bucket_bytes`` that both sides derive from the
same sizes (``weights.plan_buckets``, as the object store's buckets), a tensor larger than that alone in
its bucket.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from rlhf_ray.ppo import refs
from rlhf_ray.ppo.nodes import address_on, node_of
from rlhf_ray.ppo.weights import plan_buckets

NAME = "collective"
BACKEND = "gloo"
TIMEOUT_S = 1800.0


def nbytes(dtype_name: str, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def join_group(host: str, port: int, rank: int, world_size: int, timeout_s: float = TIMEOUT_S):
    """A gloo process group of its own (not torch's default group, which a learner rank may have
    already), rank 0 hosting the rendezvous at host:port; blocks until every rank has joined."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(host, port, rank, world_size, backend=BACKEND,
                                                          timeout=timedelta(seconds=timeout_s))


def leave_group(group) -> None:
    from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

    try:
        stateless_destroy_torch_distributed_process_group(group)
    except Exception:  # (a group whose peer died: nothing left to release)
        pass


class Scratch:
    """One byte buffer that every bucket of every sync goes through (grown to the largest bucket).

    A fresh buffer per bucket costs more than the transfer: the kernel faults in and zeroes its pages on
    first touch. Measured here (two processes, gloo, an 82 MiB model in buckets of 64 and 18 MiB): 1.6
    s/GB through fresh buffers, 0.6 s/GB through reused ones."""

    def __init__(self):
        self.buf = torch.empty(0, dtype=torch.uint8)

    def take(self, n: int) -> torch.Tensor:
        """The buffer's first ``n`` bytes (what the last call returned is overwritten)."""
        if self.buf.numel() < n:
            self.buf = torch.empty(n, dtype=torch.uint8)
        return self.buf[:n]


def send(group, tensors, meta: dict, bucket_bytes: int, scratch: Scratch | None = None) -> int:
    """Broadcast ``tensors`` (an iterable of whole tensors in ``meta``'s order, names, dtypes and
    shapes as it says) from rank 0 of ``group``, a bucket at a time, each packed into ``scratch`` (a
    fresh one when None). Returns the bytes sent."""
    sizes = [nbytes(d, s) for d, s in zip(meta["dtype_names"], meta["shapes"])]
    scratch = scratch or Scratch()
    it, sent = iter(tensors), 0
    for bucket in plan_buckets(sizes, bucket_bytes):
        buf, at = scratch.take(sum(sizes[i] for i in bucket)), 0
        for i in bucket:
            t = next(it)
            if list(t.shape) != list(meta["shapes"][i]) or str(t.dtype).removeprefix("torch.") != meta["dtype_names"][i]:
                raise ValueError(f"collective weight sync: {meta['names'][i]} is {t.dtype} {list(t.shape)}, "
                                 f"announced {meta['dtype_names'][i]} {meta['shapes'][i]}")
            buf[at:at + sizes[i]].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
            at += sizes[i]
        group.broadcast(buf, 0).wait()
        sent += buf.numel()
    return sent


class CollectiveTransport:
    """The driver's half (see ``rlhf_ray.ppo.transport.Transport``): forms the group of the learner and
    the pool's engines, and forms it again when a resize changes them."""

    name, one_send_for_all = NAME, True

    def __init__(self, pool, learner, meta: dict, bucket_bytes: int, wire_dtype: str):
        """``meta``: the weights' names, dtype names and shapes (``Learner.weight_meta``). Waits for the
        group to form."""
        self.pool, self.learner, self.meta, self.bucket_bytes, self.wire_dtype = (pool, learner, meta, bucket_bytes,
                                                                                  wire_dtype)
        self.notes: list[str] = []
        self.members: list = []
        self.version = pool.version  # of the last sync (what a group formed again sends first)
        self.node = node_of(learner)
        refs.get_small(self._form_group())

    def describe(self) -> str:
        return (f"collective (a {BACKEND} group of the learner and {len(self.pool.workers)} engine(s)), "
                f"{self.wire_dtype} weights in buckets of {self.bucket_bytes >> 20} MiB")

    def send(self, version: int) -> list:
        """The learner broadcasts its weights to the group; every engine takes them as ``version``.
        Returns refs of the engines' info dicts and, last, the learner's."""
        self.version = version
        sent = self.learner.send_weights.remote(version)
        return [*(w.update_weights.remote(self.meta, version) for w in self.pool.workers), sent]

    def join(self, worker, context: str) -> None:
        pass  # (the group is formed again once the resize is done: :meth:`resized`)

    def resized(self) -> None:
        if len(self.pool.workers) == len(self.members):
            return
        # Another set of engines: a new group, formed as each member reaches its join (the learner
        # after the training queued before it: the driver does not wait for that). Synchronous, the
        # new engines' next rollout follows at once: the learner's weights (the last synced ones)
        # first. One-step-off, the next sync comes before any rollout of the new engines.
        self._form_group()
        if not self.pool.cfg.async_one_step_off:
            self.send(self.version)

    def _form_group(self) -> list:
        """Submit the (re)forming of the weight group with the current engines; refs of the joins. Where
        it meets (the learner's node, a free port there) comes from a task on that node, not from the
        learner, which may be training."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # (soft: were the node lost, the task runs elsewhere and the learner's death surfaces at its next
        # call, which restarts the run, instead of an unschedulable task failing it)
        host, port = address_on(NodeAffinitySchedulingStrategy(self.node, soft=True))
        workers = self.members = list(self.pool.workers)
        world = 1 + len(workers)
        return [self.learner.open_sender.remote(NAME, host, port, world, self.meta, self.bucket_bytes),
                *(w.open_receiver.remote(NAME, host, port, 1 + i, world, self.bucket_bytes)
                  for i, w in enumerate(workers))]

    def close(self) -> None:
        pass  # (each member leaves the group as its process ends)


class CollectiveSender:
    """The learner's half: hosts the group as its rank 0 and broadcasts (see
    ``rlhf_ray.ppo.transport.Sender``). Sharded, every rank gathers the tensors and rank 0 sends them."""

    def __init__(self, learner):
        self.learner, self.group, self.meta, self.bucket_bytes = learner, None, None, 0
        self.scratch = Scratch()  # (every bucket's pages, kept across groups)

    def open(self, host: str, port: int, world_size: int, meta: dict, bucket_bytes: int) -> None:
        """Host the group as its rank 0 (blocks until the engines have joined); leaves the last one.
        ``meta``: what :meth:`send` sends (``Learner.weight_meta``)."""
        self.meta, self.bucket_bytes = meta, bucket_bytes
        if self.learner.rank > 0:
            return
        if self.group is not None:
            leave_group(self.group)
        self.group = join_group(host, port, 0, world_size)

    def send(self, version: int, *after) -> dict:
        """Send the policy to every engine of the group, a bucket at a time. Returns {"bytes", "seconds",
        "version", "mode": "collective"}."""
        from rlhf_ray.ppo.distributed import full
        from rlhf_ray.ppo.weights import exported_entries

        learner, meta = self.learner, self.meta
        start = time.perf_counter()
        with torch.no_grad():
            tensors = (full(v).to(getattr(torch, d)) for (_, v), d in
                       zip(exported_entries(learner.exported_weights()), meta["dtype_names"]))
            if learner.rank > 0:
                nbytes = sum(t.numel() * t.element_size() for t in tensors)
            else:
                nbytes = send(self.group, tensors, meta, self.bucket_bytes, self.scratch)
        return {"bytes": nbytes, "seconds": time.perf_counter() - start, "version": learner.version, "mode": NAME}

    def close(self) -> None:
        if self.group is not None:
            leave_group(self.group)
            self.group = None


class CollectiveReceiver:
    """The rollout worker's half: its engine's weight-transfer engine in the group (see
    ``rlhf_ray.ppo.transport.Receiver``)."""

    def __init__(self, worker):
        self.worker = worker

    def open(self, host: str, port: int, rank: int, world_size: int, bucket_bytes: int) -> None:
        """Join the learner's group as ``rank`` (blocks until every member has), leaving the one it was in."""
        llm = self.worker.llm
        llm.shutdown_weight_transfer_engine()
        llm.init_weight_transfer_engine({"init_info": {
            "master_address": host, "master_port": port, "rank": rank, "world_size": world_size,
            "bucket_bytes": bucket_bytes}})

    def receive(self, meta: dict) -> dict:
        """Take the weights the learner broadcasts (``meta``: their names, dtype names and shapes, in order)."""
        from rlhf_ray.ppo.engine import plain_cpu_linear

        w = self.worker
        with plain_cpu_linear(w.device == "cpu" and w.cfg.cpu_plain_weights):  # as the engine was built
            w.llm.start_weight_update()
            w.llm.update_weights({"update_info": meta})
            w.llm.finish_weight_update()
        return {"fetch_seconds": 0.0, "bytes": sum(nbytes(d, s) for d, s in zip(meta["dtype_names"], meta["shapes"])),
                "mode": NAME}

    def close(self) -> None:
        self.worker.llm.shutdown_weight_transfer_engine()


SENDER, RECEIVER = CollectiveSender, CollectiveReceiver


# ---- the engine side: a vLLM weight-transfer backend -----------------------------------------------

def register() -> None:
    """Register the gloo backend in vLLM's factory (once per process; before the engine is built)."""
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, _engine_class())


def _engine_class():
    from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                       WeightTransferUpdateInfo)

    @dataclass(kw_only=True)
    class GlooInitInfo(WeightTransferInitInfo):
        master_address: str
        master_port: int
        rank: int
        world_size: int
        bucket_bytes: int
        timeout_s: float = TIMEOUT_S

    @dataclass
    class GlooUpdateInfo(WeightTransferUpdateInfo):
        names: list[str]
        dtype_names: list[str]
        shapes: list[list[int]]

    class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
        """Receives the buckets rank 0 broadcasts and loads each as it arrives (in place, or through vLLM's
        layerwise reload for packed CPU weights)."""
        init_info_cls, update_info_cls = GlooInitInfo, GlooUpdateInfo

        def __init__(self, config, vllm_config, device, model) -> None:
            super().__init__(config, vllm_config, device, model)
            self.group, self.bucket_bytes, self.scratch = None, 0, Scratch()

        def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
            self.bucket_bytes = init_info.bucket_bytes
            self.group = join_group(init_info.master_address, init_info.master_port, init_info.rank,
                                    init_info.world_size, init_info.timeout_s)

        def _in_place(self) -> bool:
            """Whether every layer computes from its parameter itself (``vllm_ext.plain_weights``): then
            a weight is copied where the kernels read it, as it arrives; else vLLM's layerwise reload
            reprocesses (repacks) each layer once its weights are in."""
            if getattr(self, "_plain", None) is None:
                from rlhf_ray.ppo.vllm_ext import plain_weights

                self._plain = plain_weights(self.model) and self.model_config.quantization is None
            return self._plain

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            if not self._in_place():
                initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            from rlhf_ray.ppo.vllm_ext import repack_shared

            if not self._in_place():
                finalize_layerwise_reload(self.model, self.model_config)
                repack_shared(self.model)  # (a tied LM head's packed copy: its embedding just changed)

        def update_weights(self, update_info: dict) -> None:
            # (the base class ends with torch.accelerator.synchronize(), which a CPU-only torch refuses)
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, info: GlooUpdateInfo) -> None:
            if self.group is None:
                raise RuntimeError("collective weight sync: this engine has not joined the learner's group")
            dtypes = [getattr(torch, d) for d in info.dtype_names]
            sizes = [nbytes(d, s) for d, s in zip(info.dtype_names, info.shapes)]
            in_place = self._in_place()
            for bucket in plan_buckets(sizes, self.bucket_bytes):
                # In place, a bucket's weights are copied out before the next bucket arrives: one buffer
                # serves them all (Scratch). The layerwise reload may keep views of a bucket until its
                # layer is whole: a fresh buffer each.
                n = sum(sizes[i] for i in bucket)
                buf = self.scratch.take(n) if in_place else torch.empty(n, dtype=torch.uint8)
                self.group.broadcast(buf, 0).wait()
                pieces = buf.split([sizes[i] for i in bucket])
                with torch.no_grad():
                    self.model.load_weights([(info.names[i], p.view(dtypes[i]).view(info.shapes[i]))
                                             for i, p in zip(bucket, pieces)])

        def shutdown(self) -> None:
            if self.group is not None:
                leave_group(self.group)
                self.group = None

    return GlooWeightTransferEngine
