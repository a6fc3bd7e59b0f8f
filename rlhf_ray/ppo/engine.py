"""How a rollout engine is built: the ``vllm.LLM`` arguments of a job's engines, their size
(``max_model_len`` from the job, KV cache checked before any engine starts), and the CPU build
setting that keeps weights plain so that syncs copy in place."""

from __future__ import annotations

import contextlib
import glob
import os

import numpy as np

from rlhf_ray.config import RolloutConfig
from rlhf_ray.ppo.weights import SKIP_SUFFIXES

EXTENSION = "rlhf_ray.ppo.vllm_ext.WeightSyncExtension"


@contextlib.contextmanager
def plain_cpu_linear(enabled: bool):
    """While vLLM builds an engine in this process, keep its CPU linear layers on plain weights.

    vLLM 0.32 packs each CPU linear weight when the model's weights are processed after loading: a
    16-bit one below a size limit for its AMX kernels where the CPU has AMX
    (``layers.utils.check_cpu_sgl_kernel``), else into a oneDNN handle where
    ``_custom_ops._supports_onednn``; otherwise the layer calls ``torch.nn.functional.linear`` on the
    parameter. Turning both off for the engine's construction lets weight syncs copy in place (see
    ``vllm_ext``). If a vLLM version packs some other way, the extension notices
    (``weight_sync_mode()`` == "reload") and syncs still work, only slower; that reloading must run
    under this context too, or it would process the layers differently from the engine's build.
    """
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers import utils as layer_utils

    patches = [(mod, name, value) for mod, name, value in ((ops, "_supports_onednn", False),
                                                           (layer_utils, "check_cpu_sgl_kernel", lambda *a: False))
               if enabled and hasattr(mod, name)]
    saved = [getattr(mod, name) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield
    finally:
        for (mod, name, _), value in zip(patches, saved):
            setattr(mod, name, value)


def checkpoint_names(model_path: str) -> set[str] | None:
    """Weight names in the model directory's safetensors files (None for a hub name). With a
    ``model.safetensors.index.json`` only the files it maps count, as for vLLM's loader: some repos
    (Mistral) also ship a ``consolidated.safetensors`` with the same weights under native names."""
    import json

    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k for k in json.load(f)["weight_map"] if not k.endswith(SKIP_SUFFIXES)}
    files = glob.glob(os.path.join(model_path, "*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(f, "np") as st:
            names.update(k for k in st.keys() if not k.endswith(SKIP_SUFFIXES))
    return names


def engine_args(model_path: str, rollout_cfg: RolloutConfig, worker_id: int, seed: int, device: str,
                max_model_len: int | None = None) -> dict:
    """``vllm.LLM`` arguments of a rollout engine on ``device`` ("cpu" or "cuda"); ``max_model_len``:
    the longest sequence the job needs (:func:`engine_max_len`; None: the model's context)."""
    args = dict(
        model=model_path,
        seed=int(np.random.SeedSequence([seed, worker_id]).generate_state(1)[0] & 0x7FFFFFFF),
        enable_prefix_caching=True,  # safe: reset after every weight update
        worker_extension_cls=EXTENSION,
        logprobs_mode="processed_logprobs",  # after temperature and top-p: the sampling distribution
        use_tqdm_on_load=False,  # a progress bar per engine start and reload in the job's console
    )
    if max_model_len:
        args["max_model_len"] = int(max_model_len)
    if rollout_cfg.weight_sync == "collective":  # new weights through vLLM's weight-transfer API
        from rlhf_ray.ppo.transport.collective import BACKEND, register

        register()  # (an engine in another process finds it through the vllm.general_plugins entry point)
        args["weight_transfer_config"] = {"backend": BACKEND}
    if device == "cpu":
        # block_size: vLLM's CPU default is 128, so a prompt shorter than 128 tokens never hits the
        # prefix cache and a short sequence reserves 128 tokens of KV; 32 (the CPU kernel needs a
        # multiple of 32) measured as fast or faster.
        args.update(dtype="float32" if rollout_cfg.dtype == "auto" else rollout_cfg.dtype, enforce_eager=True,
                    block_size=32, kv_cache_memory_bytes=int(rollout_cfg.kv_cache_mib) << 20)
    else:  # a fixed KV size would override this and starve a real model (64 MiB: ~128 tokens of a 7B)
        args.update(gpu_memory_utilization=float(rollout_cfg.gpu_memory_utilization))
        if rollout_cfg.dtype != "auto":
            args.update(dtype=rollout_cfg.dtype)
    return args


CPU_BLOCK_SIZE = 32  # tokens per KV block of a CPU engine (engine_args)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def engine_max_len(max_prompt_tokens: int, max_new_tokens: int) -> int:
    """``max_model_len`` of the job's engines: the longest prompt, its response, and one more token, as
    the drift check scores a whole sequence as a prompt (vLLM scores at most max_model_len - 1)."""
    return max_prompt_tokens + max_new_tokens + 1


def kv_bytes_per_token(model_config: dict, dtype: str = "float32") -> int:
    """Bytes of KV cache one token takes in every layer: 2 (K, V) x layers x KV heads x head dim x dtype."""
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads") or heads
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    return 2 * model_config["num_hidden_layers"] * kv_heads * head_dim * _DTYPE_BYTES[dtype]


def check_engine_fit(model_config: dict, max_prompt_tokens: int, max_new_tokens: int,
                     rollout_cfg: RolloutConfig, on_gpu: bool) -> int:
    """The engines' ``max_model_len`` for this job, checked before any engine starts: it must fit the
    model's context, and a CPU engine's KV cache (``rollout.kv_cache_mib``) must hold one sequence of
    that length, which vLLM requires. Raises ConfigError naming the fields and the size needed."""
    from rlhf_ray.config import ConfigError

    length = engine_max_len(max_prompt_tokens, max_new_tokens)
    context = model_config.get("max_position_embeddings")
    if context and length > context:
        raise ConfigError(f"ppo.max_prompt_tokens + ppo.max_new_tokens: {max_prompt_tokens} + {max_new_tokens} "
                          f"(+1) tokens exceed the model's context of {context} tokens")
    if not on_gpu:
        dtype = "float32" if rollout_cfg.dtype == "auto" else rollout_cfg.dtype
        per_token = kv_bytes_per_token(model_config, dtype)
        need = -(-length // CPU_BLOCK_SIZE) * CPU_BLOCK_SIZE * per_token
        if need > rollout_cfg.kv_cache_mib << 20:
            raise ConfigError(f"rollout.kv_cache_mib={rollout_cfg.kv_cache_mib}: an engine needs at least "
                              f"{-(-need // (1 << 20))} MiB of KV cache for one sequence of ppo.max_prompt_tokens + "
                              f"ppo.max_new_tokens = {length - 1} tokens ({per_token} bytes per token in {dtype}); "
                              f"raise it, or lower those")
    return length
