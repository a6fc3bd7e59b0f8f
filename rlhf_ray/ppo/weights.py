"""Weight-sync helpers: the learner's state dict cut into size-bounded buckets of numpy arrays, the
safetensors-bytes form used across process boundaries, and the post-sync logprob drift.

Buckets are plain ``dict[str, np.ndarray]`` (C-contiguous) so that ``ray.put`` stores them zero-copy
and every rollout worker reads the same shared-memory copy. Floating weights travel in a "wire dtype":
float32 by default, or the 16-bit dtype a vLLM engine computes in (it rounds float32 weights to that
dtype as it loads them, so sending them already rounded gives it the same bits for half the bytes; this
holds where its loader copies weights, as for Llama-style models; an engine keeping some parameters
in float32, e.g. a Mamba layer's A_log, asks for float32, see ``vllm_ext.weight_wire_dtype``).
numpy has no bfloat16: a bfloat16 weight travels as its bit pattern in a ``uint16`` array, and
:func:`as_torch` turns it back (no LLM checkpoint has uint16 weights of its own).

Names stay in Hugging Face ``LlamaForCausalLM`` form (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``): vLLM's ``load_weights`` maps them to its fused layout (qkv_proj, gate_up_proj)
itself when reloading with ``is_checkpoint_format=True``, so no renaming is needed (checked in
tests/test_rollout.py).

Keep the state dict's order (parameters of one decoder layer together): vLLM buffers a layer's
weights until all of them have arrived, so interleaving layers costs memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

# Buffers that HF state dicts may carry but that are not checkpoint weights vLLM expects.
SKIP_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
WIRE_DTYPES = ("float32", "bfloat16", "float16")
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def _check_wire_dtype(dtype: str) -> None:
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"weight dtype: expected one of {WIRE_DTYPES}, got {dtype!r}")


def _to_numpy(value, copy: bool = True, dtype: str = "float32") -> np.ndarray:
    """A torch tensor (any device/dtype) or array -> a C-contiguous numpy array; floats become
    ``dtype`` (a name in WIRE_DTYPES; bfloat16 as its uint16 bit pattern). ``copy=False`` returns a
    view of a CPU contiguous input already in ``dtype`` instead of a copy."""
    import torch

    _check_wire_dtype(dtype)
    t = value.detach() if hasattr(value, "detach") else None
    if t is None:
        arr = np.asarray(value)
        if arr.dtype.kind != "f":
            return np.array(arr, order="C", copy=True if copy else None)
        if dtype != "bfloat16":
            return np.array(arr, dtype=dtype, order="C", copy=True if copy else None)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if not t.is_floating_point():
        return t.to(device="cpu", copy=copy).contiguous().numpy()
    t = t.to(device="cpu", dtype=getattr(torch, dtype), copy=copy).contiguous()
    return (t.view(torch.uint16) if dtype == "bfloat16" else t).numpy()


def as_torch(arr):
    """A bucket's array as a torch tensor sharing its memory (a uint16 array is a bfloat16 weight)."""
    import torch

    if not isinstance(arr, np.ndarray):
        return arr
    with warnings.catch_warnings():  # Ray hands over read-only views; the loaders only read them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if arr.dtype == np.uint16 else t


def exported_entries(state_dict: Mapping, strip_prefix: str = ""):
    """(name, value) of every weight the engines take: ``strip_prefix`` removed (names without it
    skipped), SKIP_SUFFIXES buffers left out."""
    for name, value in state_dict.items():
        if strip_prefix:
            if not name.startswith(strip_prefix):
                continue
            name = name[len(strip_prefix):]
        if not name.endswith(SKIP_SUFFIXES):
            yield name, value


def _exported_nbytes(value, dtype: str = "float32") -> int:
    """Bytes of ``value`` once exported (floats as ``dtype``), without converting it."""
    if hasattr(value, "detach"):
        return value.numel() * (_ITEMSIZE[dtype] if value.is_floating_point() else value.element_size())
    arr = np.asarray(value)
    return arr.size * (_ITEMSIZE[dtype] if arr.dtype.kind == "f" else arr.itemsize)


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Indices of consecutive tensors grouped into buckets of at most ``bucket_bytes`` (a tensor larger
    than that alone). sizes: bytes of each tensor, in send order -> [[indices of bucket 0], ...]."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(sizes):
        if current and size + n > bucket_bytes:
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    return out + [current] if current else out


def bucket_names(state_dict: Mapping, bucket_bytes: int, strip_prefix: str = "",
                 dtype: str = "float32") -> list[list[str]]:
    """The names (prefix stripped) of each bucket :func:`state_dict_buckets` would make, from the
    sizes alone (nothing is copied)."""
    _check_wire_dtype(dtype)
    entries = list(exported_entries(state_dict, strip_prefix))
    buckets = plan_buckets([_exported_nbytes(value, dtype) for _, value in entries], bucket_bytes)
    return [[entries[i][0] for i in bucket] for bucket in buckets]


def state_dict_buckets(state_dict: Mapping, bucket_bytes: int = 256 << 20, strip_prefix: str = "",
                       copy: bool = True, dtype: str = "float32") -> list[dict[str, np.ndarray]]:
    """Split ``state_dict`` (name -> torch tensor or array) into buckets of numpy arrays, floats in
    ``dtype`` (see the module docstring).

    ``strip_prefix``: when the causal LM sits inside a wrapper (``policy.model.layers...``), only
    entries under this prefix are kept, with the prefix removed (so a value head is left out).
    Order is kept; a bucket is closed before it would exceed ``bucket_bytes``, so no bucket is larger
    than ``bucket_bytes`` unless it holds a single tensor that is larger by itself (see
    :func:`bucket_names`). By default the arrays are copies, detached from the learner's parameters
    (the learner may keep training while they ship). ``copy=False`` leaves CPU tensors already in
    ``dtype`` as views of the live parameters: only for a caller that hands the buckets over before the weights
    change again, e.g. a Ray actor method returning them (Ray copies return values into the object
    store when the method returns), which saves one full copy of the model per sync.
    """
    names = bucket_names(state_dict, bucket_bytes, strip_prefix, dtype)
    entries = dict(exported_entries(state_dict, strip_prefix))
    return [{n: _to_numpy(entries[n], copy, dtype) for n in bucket} for bucket in names]


def bucket_nbytes(buckets: Iterable[Mapping[str, np.ndarray]]) -> int:
    return sum(int(a.nbytes) for b in buckets for a in b.values())


def bucket_to_bytes(bucket: Mapping[str, np.ndarray]) -> bytes:
    """One bucket as safetensors bytes (for a vLLM engine in another process: msgpack carries bytes)."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in bucket.items()})


def bucket_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(bytes(data))


def iter_named_arrays(buckets: Iterable) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) over buckets given as dicts or as safetensors bytes, in order."""
    for bucket in buckets:
        if isinstance(bucket, (bytes, bytearray, memoryview)):
            bucket = bucket_from_bytes(bucket)
        yield from bucket.items()


# rollout.max_logprob_drift = 0: the limit for engines computing in each dtype (see the config).
DRIFT_LIMITS = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 0.5}


def drift_limit(configured: float, engine_dtypes: Iterable[str]) -> float:
    """The drift past which a sync fails: ``configured`` if > 0, else the loosest of DRIFT_LIMITS over
    the engines' dtypes (bfloat16's for a dtype not in it)."""
    if configured > 0:
        return float(configured)
    return max(DRIFT_LIMITS.get(d, DRIFT_LIMITS["bfloat16"]) for d in engine_dtypes)


def logprob_drift(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """max |a - b| over ``mask`` (0.0 for an empty mask). a, b: float [B, T]; mask: bool [B, T].

    Entries outside the mask are never read, so padding may hold anything (NaN, -inf).
    """
    a, b, m = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(mask, bool)
    if a.shape != b.shape or a.shape != m.shape:
        raise ValueError(f"shape mismatch: {a.shape}, {b.shape}, mask {m.shape}")
    if not m.any():
        return 0.0
    return float(np.max(np.abs(a[m] - b[m])))
