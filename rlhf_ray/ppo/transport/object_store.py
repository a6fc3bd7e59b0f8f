"""Weight sync through the object store (``rollout.weight_sync=object_store``, and ``auto`` where shared
memory does not apply: engines on other nodes, on GPUs, in 16-bit or with packed CPU weights).

The learner returns its weights as buckets of numpy arrays (``rlhf_ray.ppo.weights.state_dict_buckets``,
floats in the engines' wire dtype), which Ray puts once in the object store as the method returns;
every engine gets the same refs and loads them (one load per engine). A worker added by a resize
gets the last synced refs before its first rollout.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping

import torch

from rlhf_ray.ppo import refs
from rlhf_ray.ppo.weights import as_torch, bucket_names, bucket_nbytes, bucket_to_bytes, iter_named_arrays

NAME = "object_store"


class ObjectStoreTransport:
    """The driver's half (see ``rlhf_ray.ppo.transport.Transport``)."""

    name, one_send_for_all = NAME, False

    def __init__(self, pool, learner, meta: dict, bucket_bytes: int, wire_dtype: str, why: str):
        """``why``: why not shared memory (for the log)."""
        self.pool, self.learner, self.wire_dtype, self.why = pool, learner, wire_dtype, why
        self.notes: list[str] = []
        # copy=False: the learner's return values are copied into the object store as the method returns.
        self.n_buckets = refs.get_small(learner.open_sender.remote(NAME, bucket_bytes, wire_dtype, False))
        self.last = None  # (bucket refs, version) of the last sync, for workers added later

    def describe(self) -> str:
        return f"object store ({self.why}), {self.wire_dtype} weights"

    def send(self, version: int) -> list:
        # The buckets are put once (the learner's return values); every engine gets the same refs.
        buckets = self.learner.send_weights.options(num_returns=self.n_buckets).remote(version)
        self.last = (buckets, version)
        return [w.update_weights.remote(buckets, version) for w in self.pool.workers]

    def join(self, worker, context: str) -> None:
        if self.last is not None:  # (actor tasks run in order: the weights arrive before any rollout)
            worker.update_weights.remote(*self.last)

    def resized(self) -> None:
        pass

    def close(self) -> None:
        pass


class ObjectStoreSender:
    """The learner's half: its weights as buckets (see ``rlhf_ray.ppo.transport.Sender``)."""

    def __init__(self, learner):
        self.learner = learner
        self.bucket_bytes, self.dtype, self.copy = 256 << 20, "float32", True

    def open(self, bucket_bytes: int, dtype: str = "float32", copy: bool = True) -> int:
        """Buckets of about ``bucket_bytes``, floats in ``dtype`` (the engines' ``wire_dtype``).
        ``copy=False`` (the Ray driver: the return values are copied into the object store as the method
        returns) skips the extra copy of CPU weights already in ``dtype``; see
        ``weights.state_dict_buckets``. Returns how many buckets :meth:`send` returns (from the tensors'
        sizes, no export)."""
        self.bucket_bytes, self.dtype, self.copy = bucket_bytes, dtype, copy
        return len(bucket_names(self.learner.exported_weights(), bucket_bytes, dtype=dtype))

    def send(self, version: int | None = None, *after) -> list[dict]:
        """The policy's weights split into buckets (list of dicts name -> numpy array). Sharded: every
        rank gathers the whole tensors a bucket at a time (the model is never whole in one process),
        rank 0 returns them and the others as many empty buckets."""
        from rlhf_ray.ppo.distributed import full
        from rlhf_ray.ppo.weights import exported_entries, state_dict_buckets

        learner, dtype = self.learner, self.dtype
        exported = learner.exported_weights()
        with torch.no_grad():
            if not learner.sharded:
                return state_dict_buckets(exported, self.bucket_bytes, copy=self.copy, dtype=dtype)
            entries, out = dict(exported_entries(exported)), []
            for names in bucket_names(exported, self.bucket_bytes, dtype=dtype):
                whole = {n: full(entries[n]) for n in names}
                out.append(state_dict_buckets(whole, 1 << 62, dtype=dtype)[0] if learner.rank == 0 else {})
            return out

    def close(self) -> None:
        pass


def resolve_refs(buckets) -> list[Mapping]:
    """Buckets as a flat list of dicts. Ray resolves an object ref passed as a top-level argument,
    not refs nested in a list: those are fetched here (a ref may hold one bucket or a list)."""
    if isinstance(buckets, Mapping):
        buckets = [buckets]
    buckets = list(buckets)
    ray = sys.modules.get("ray")  # only a Ray caller can have passed refs
    if ray is not None and any(isinstance(b, ray.ObjectRef) for b in buckets):
        buckets = [ray.get(b) if isinstance(b, ray.ObjectRef) else b for b in buckets]
    out = []
    for b in buckets:
        out.extend(b if isinstance(b, (list, tuple)) else [b])
    if not all(isinstance(b, Mapping) for b in out):
        raise TypeError(f"update_weights: buckets must be dicts name -> array, got {type(out[0]).__name__}")
    return out


class ObjectStoreReceiver:
    """The rollout worker's half: loads buckets into its engine (see ``rlhf_ray.ppo.transport.Receiver``).
    Every worker starts with this one."""

    def __init__(self, worker):
        self.worker = worker

    def open(self) -> None:
        pass

    def receive(self, buckets) -> dict:
        """Load a full set of policy weights: what :meth:`ObjectStoreSender.send` returns (a list of dicts
        name -> array in Hugging Face checkpoint names; floats in any of its dtypes, best in the engine's
        ``wire_dtype``), a single dict, or a list of Ray object refs to buckets (fetched here; a ref
        passed as the argument itself is resolved by Ray). Every weight of the model must be present:
        vLLM would silently keep old values for the rest."""
        from rlhf_ray.ppo.engine import plain_cpu_linear

        w = self.worker
        t0 = time.perf_counter()
        buckets = resolve_refs(buckets)
        t_fetched = time.perf_counter()
        if w.expected_names is not None:
            names = set().union(*(b.keys() for b in buckets))
            missing = w.expected_names - names
            if missing:
                raise ValueError(f"update_weights: {len(missing)} weight(s) missing, e.g. "
                                 f"{sorted(missing)[:5]}; got e.g. {sorted(names)[:5]}")
        nbytes = bucket_nbytes(buckets)
        if w.in_process:  # "reload" processes the layers again: as when the engine was built
            with plain_cpu_linear(w.device == "cpu" and w.cfg.cpu_plain_weights):
                loaded = w.llm.collective_rpc("load_buckets", args=(buckets,))[0]
        elif w.weight_sync_mode == "in_place":  # one bucket's bytes at a time, not the whole model's
            for i, b in enumerate(buckets):
                loaded = w.llm.collective_rpc("load_buckets", args=([bucket_to_bytes(b)], i == len(buckets) - 1))[0]
        else:  # "reload" must see every weight in one call
            loaded = w.llm.collective_rpc("load_buckets", args=([bucket_to_bytes(b) for b in buckets],))[0]
        return {"fetch_seconds": t_fetched - t0, "bytes": nbytes, "mode": loaded["mode"]}

    def close(self) -> None:
        pass


class ObjectStoreEngine:
    """The vLLM worker's side (mixed into ``rlhf_ray.ppo.vllm_ext.WeightSyncExtension``)."""

    def load_buckets(self, buckets: list, last: bool = True) -> dict:
        """Load weights from ``buckets`` (dicts name -> array, or safetensors bytes, in HF checkpoint
        names). Returns {"bytes": bytes loaded, "mode": how}. In "in_place" mode an update may come in
        several calls (``last=False`` on all but the final one, so that an engine in another process
        never holds the whole model as bytes at once); the final call checks that every parameter got
        a weight since the update began. "reload" needs every weight in one call."""
        from rlhf_ray.ppo.vllm_ext import repack_shared

        nbytes = 0

        def tensors():
            nonlocal nbytes
            for name, arr in iter_named_arrays(buckets):
                nbytes += arr.nbytes
                yield name, as_torch(arr)

        mode = self.weight_sync_mode()
        if mode == "in_place":
            model = self.model_runner.get_model()
            with torch.no_grad():
                loaded = model.load_weights(tensors())
            so_far = getattr(self, "_rlhf_loaded", set())
            so_far = None if loaded is None or so_far is None else so_far | set(loaded)
            self._rlhf_loaded = set() if last else so_far
            if last and so_far is not None:
                missed = {n for n, _ in model.named_parameters()} - so_far
                if missed:
                    raise RuntimeError(f"load_buckets: {len(missed)} engine parameter(s) got no weight, "
                                       f"e.g. {sorted(missed)[:5]}: the engine now mixes old and new weights")
        else:
            if not last:
                raise ValueError("load_buckets: a 'reload' engine takes every weight in one call (last=True)")
            self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
            repack_shared(self.model_runner.get_model())
        return {"bytes": nbytes, "mode": mode}


SENDER, RECEIVER = ObjectStoreSender, ObjectStoreReceiver
