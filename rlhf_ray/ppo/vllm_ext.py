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

Arguments arrive as Python objects when the engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and through msgpack otherwise, which has no numpy/torch type
for untyped RPC arguments: there the caller sends each bucket as safetensors bytes.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from rlhf_ray.ppo.weights import iter_named_arrays


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

    def load_buckets(self, buckets: list) -> dict:
        """Load all weights from ``buckets`` (dicts name -> array, or safetensors bytes, in HF
        checkpoint names). Returns {"bytes": bytes loaded, "mode": how}."""
        nbytes = 0

        def tensors():
            nonlocal nbytes
            for name, arr in iter_named_arrays(buckets):
                nbytes += arr.nbytes
                if isinstance(arr, np.ndarray):
                    # Ray hands over read-only views; the loaders only read them (copy into the params).
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        arr = torch.from_numpy(arr)
                yield name, arr

        mode = self.weight_sync_mode()
        if mode == "in_place":
            model = self.model_runner.get_model()
            with torch.no_grad():
                loaded = model.load_weights(tensors())
            if loaded is not None:
                missed = {n for n, _ in model.named_parameters()} - set(loaded)
                if missed:
                    raise RuntimeError(f"load_buckets: {len(missed)} engine parameter(s) got no weight, "
                                       f"e.g. {sorted(missed)[:5]}: the engine now mixes old and new weights")
        else:
            self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
        return {"bytes": nbytes, "mode": mode}
