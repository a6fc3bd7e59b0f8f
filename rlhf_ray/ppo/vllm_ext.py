"""vLLM worker extension that loads new policy weights into a running engine.

vLLM mixes this class into its worker class when the engine is built with
``LLM(..., worker_extension_cls="rlhf_ray.ppo.vllm_ext.WeightSyncExtension")``; the rollout worker then
calls ``llm.collective_rpc("load_buckets", args=(buckets,))``. Method names here must not clash with
vLLM's worker attributes (vLLM asserts that at start-up).

Two ways in, chosen once per engine by :func:`plain_weights`:

* ``"in_place"``: every weight the forward pass reads is the parameter itself (GPU engines; CPU
  engines built with ``rollout.cpu_plain_weights``). ``model.load_weights()`` maps the Hugging Face
  names onto vLLM's fused layout (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and copies each tensor
  into its slice: one copy per byte, no allocation.
* ``"reload"``: some layer computes from a packed copy of its weight (vLLM's CPU default: oneDNN
  handles, the plain parameter emptied). ``model.load_weights()`` alone would fail or leave the packed
  copy stale, so ``reload_weights(..., is_checkpoint_format=True)`` replays the whole loading path
  (fresh parameters, load, post-load repacking). It must see every weight of the model in one call: a
  layer whose weights are missing keeps its old values, and one whose weights arrive half in one
  call and half in another is processed half empty. Hence one RPC per update, with all buckets in it.
  Layers that compute from a packed copy of a weight they share (a tied LM head) are repacked after it.
  ("in_place" engines in another process take one bucket per RPC instead: see ``load_buckets``.)

A third way, for engines on the learner's node: ``shared_attach`` points the parameters at shared
memory that the learner writes, and ``shared_use_slot`` switches between its two slots
(``rlhf_ray.ppo.shared_weights``); this needs the "in_place" conditions and float32 CPU parameters.

Arguments arrive as Python objects when the engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and through msgpack otherwise, which has no numpy/torch type
for untyped RPC arguments: there the caller sends each bucket as safetensors bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from rlhf_ray.ppo.shared_weights import SharedSlots, check_order, find_placements, new_spec, order_pattern
from rlhf_ray.ppo.weights import as_torch, iter_named_arrays


def repack_shared(model: torch.nn.Module) -> None:
    """After vLLM's layerwise reload: rebuild the packed copy of every layer that keeps its weight beside
    one (vLLM passes ``remove_weight=False`` for embeddings and LM heads). The reload reprocesses only the
    layers whose weights it loaded; a tied LM head shares the embedding's parameter but loads nothing
    itself, so its oneDNN copy would keep the old weights (measured: logprobs 1.3-1.4 off after one
    update of a tied model). Rebuilding an up-to-date copy again is harmless."""
    for module in model.modules():
        fn, weight = getattr(module, "cpu_linear", None), getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if fn is None or getattr(fn, "__closure__", None) is None or weight is None or weight.numel() == 0:
            continue
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)


def plain_weights(model: torch.nn.Module) -> bool:
    """True when no layer of a vLLM model computes from a packed copy of its weight.

    On CPU vLLM gives every linear layer a ``cpu_linear`` function at load time: a closure over a
    packed handle (oneDNN, AMX, zentorch) that usually also empties ``weight``, or, on the fallback
    path, a plain ``torch.nn.functional.linear`` call that reads ``weight`` itself and closes over
    nothing. GPU layers have no ``cpu_linear`` and read their parameters directly.
    """
    for module in model.modules():
        fn = getattr(module, "cpu_linear", None)
        if fn is None:
            continue
        weight = getattr(module, "weight", None)
        if getattr(fn, "__closure__", None) is not None or weight is None or weight.numel() == 0:
            return False
    return True


class WeightSyncExtension:
    def weight_sync_mode(self) -> str:
        """"in_place" or "reload" (see the module docstring); decided on first use."""
        mode = getattr(self, "_rlhf_sync_mode", None)
        if mode is None:
            model = self.model_runner.get_model()
            quantized = getattr(self.model_runner.model_config, "quantization", None) is not None
            mode = "in_place" if plain_weights(model) and not quantized else "reload"
            self._rlhf_sync_mode = mode
        return mode

    def weight_wire_dtype(self) -> str:
        """The dtype new weights should travel in (``rlhf_ray.ppo.weights``): this engine's parameter
        dtype when every floating parameter has the same 16-bit one (it would round float32 weights to
        it as it loads them), else float32 (also for quantised engines, whose loader wants full precision)."""
        if getattr(self.model_runner.model_config, "quantization", None) is not None:
            return "float32"
        dtypes = {p.dtype for p in self._rlhf_params().values() if p.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else None
        return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")

    def load_buckets(self, buckets: list, last: bool = True) -> dict:
        """Load weights from ``buckets`` (dicts name -> array, or safetensors bytes, in HF checkpoint
        names). Returns {"bytes": bytes loaded, "mode": how}. In "in_place" mode an update may come in
        several calls (``last=False`` on all but the final one, so that an engine in another process
        never holds the whole model as bytes at once); the final call checks that every parameter got
        a weight since the update began. "reload" needs every weight in one call."""
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

    # ---- shared memory (same node as the learner) ------------------------------------------------

    def _rlhf_params(self) -> dict:
        return dict(self.model_runner.get_model().named_parameters())

    def shared_attach(self, spec: dict | None, hf_shapes: dict | None, slot: int, directory: str) -> dict:
        """Point every parameter at slot ``slot`` of the shared weights and keep them there.

        ``spec`` None (the first engine): create the slots in ``directory`` from this engine's
        parameters (both slots get its current weights), find where each of ``hf_shapes``' weights
        lands (this engine's loader, see ``shared_weights``) and return the spec for the learner and
        the other engines. Otherwise check that this engine's parameters match ``spec``. On failure
        the engine keeps its own weights and the error says why.
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
