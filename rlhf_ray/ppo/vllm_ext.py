"""vLLM worker extension that loads new policy weights into a running engine.

vLLM mixes this class into its worker class when the engine is built with
``LLM(..., worker_extension_cls="rlhf_ray.ppo.vllm_ext.WeightSyncExtension")``; the rollout worker then
calls ``llm.collective_rpc("load_buckets", args=(buckets,))``. Method names here must not clash with
vLLM's worker attributes (vLLM asserts that at start-up).

``model.load_weights()`` after start-up is not enough on CPU (the weights are repacked for the
kernels); ``reload_weights(..., is_checkpoint_format=True)`` replays the whole loading path
(checkpoint names, fusing q/k/v and gate/up, post-load processing) into the existing storage.
It must see every weight of the model in one call: a layer whose weights are missing keeps its
old values, and one whose weights arrive half in one call and half in another is processed half
empty. Hence one RPC per update, with all buckets in it.

Arguments arrive as Python objects when the engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and through msgpack otherwise, which has no numpy/torch type
for untyped RPC arguments: there the caller sends each bucket as safetensors bytes.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from rlhf_ray.ppo.weights import iter_named_arrays


class WeightSyncExtension:
    def load_buckets(self, buckets: list) -> int:
        """Reload all weights from ``buckets`` (dicts name -> array, or safetensors bytes, in HF
        checkpoint names); returns the number of bytes loaded."""
        nbytes = 0

        def tensors():
            nonlocal nbytes
            for name, arr in iter_named_arrays(buckets):
                nbytes += arr.nbytes
                if isinstance(arr, np.ndarray):
                    # Ray hands over read-only views; the loader only reads (copies into the params).
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        arr = torch.from_numpy(arr)
                yield name, arr

        self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
        return nbytes
