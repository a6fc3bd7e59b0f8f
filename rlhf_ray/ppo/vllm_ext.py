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

The transports' engine-side methods come from their modules (``rlhf_ray.ppo.transport``):
``load_buckets`` from the object store's, ``shared_attach`` / ``shared_use_slot`` / ``shared_detach``
from shared memory's (which needs the "in_place" conditions and float32 CPU parameters); the collective
path goes through vLLM's weight-transfer API instead.

Arguments arrive as Python objects when the engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and through msgpack otherwise, which has no numpy/torch type
for untyped RPC arguments: there the caller sends each bucket as safetensors bytes.
"""

from __future__ import annotations

import torch

from rlhf_ray.ppo.transport.object_store import ObjectStoreEngine
from rlhf_ray.ppo.transport.shared_memory import SharedMemoryEngine


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


class WeightSyncExtension(ObjectStoreEngine, SharedMemoryEngine):
    """What every engine can do, and each transport's engine-side methods."""

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

    def _rlhf_params(self) -> dict:
        return dict(self.model_runner.get_model().named_parameters())
