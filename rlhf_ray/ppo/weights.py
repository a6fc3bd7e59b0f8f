"""Weight-sync helpers: the learner's state dict cut into size-bounded buckets of numpy arrays, the
safetensors-bytes form used across process boundaries, and the post-sync logprob drift.

Buckets are plain ``dict[str, np.ndarray]`` (float32, C-contiguous) so that ``ray.put`` stores them
zero-copy and every rollout worker reads the same shared-memory copy. Names stay in Hugging Face
``LlamaForCausalLM`` form (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``): vLLM's
``load_weights`` maps them to its fused layout (qkv_proj, gate_up_proj) itself when reloading with
``is_checkpoint_format=True``, so no renaming is needed (checked in tests/test_rollout.py).

Keep the state dict's order (parameters of one decoder layer together): vLLM buffers a layer's
weights until all of them have arrived, so interleaving layers costs memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np

# Buffers that HF state dicts may carry but that are not checkpoint weights vLLM expects.
SKIP_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def _to_numpy(value, copy: bool = True) -> np.ndarray:
    """A torch tensor (any device/dtype) or array -> a C-contiguous numpy array; floats become
    float32. ``copy=False`` returns a view of a CPU float32 contiguous input instead of a copy."""
    if hasattr(value, "detach"):  # torch.Tensor
        import torch

        t = value.detach()
        dtype = torch.float32 if t.is_floating_point() else t.dtype
        return t.to(device="cpu", dtype=dtype, copy=copy).contiguous().numpy()
    arr = np.asarray(value)
    dtype = np.float32 if arr.dtype.kind == "f" else arr.dtype
    return np.array(arr, dtype=dtype, order="C", copy=True if copy else None)


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


def _exported_nbytes(value) -> int:
    """Bytes of ``value`` once exported (floats as float32), without converting it."""
    if hasattr(value, "detach"):
        return value.numel() * (4 if value.is_floating_point() else value.element_size())
    arr = np.asarray(value)
    return arr.size * (4 if arr.dtype.kind == "f" else arr.itemsize)


def bucket_names(state_dict: Mapping, bucket_bytes: int, strip_prefix: str = "") -> list[list[str]]:
    """The names (prefix stripped) of each bucket :func:`state_dict_buckets` would make, from the
    sizes alone (nothing is copied)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    out: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, value in exported_entries(state_dict, strip_prefix):
        n = _exported_nbytes(value)
        if current and size + n > bucket_bytes:
            out.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        out.append(current)
    return out


def state_dict_buckets(state_dict: Mapping, bucket_bytes: int = 256 << 20,
                       strip_prefix: str = "", copy: bool = True) -> list[dict[str, np.ndarray]]:
    """Split ``state_dict`` (name -> torch tensor or array) into buckets of float32 numpy arrays.

    ``strip_prefix``: when the causal LM sits inside a wrapper (``policy.model.layers...``), only
    entries under this prefix are kept, with the prefix removed (so a value head is left out).
    Order is kept; a bucket is closed before it would exceed ``bucket_bytes``, so no bucket is larger
    than ``bucket_bytes`` unless it holds a single tensor that is larger by itself (see
    :func:`bucket_names`). By default the arrays are copies, detached from the learner's parameters
    (the learner may keep training while they ship). ``copy=False`` leaves CPU float32 tensors as
    views of the live parameters: only for a caller that hands the buckets over before the weights
    change again, e.g. a Ray actor method returning them (Ray copies return values into the object
    store when the method returns), which saves one full copy of the model per sync.
    """
    names = bucket_names(state_dict, bucket_bytes, strip_prefix)
    entries = dict(exported_entries(state_dict, strip_prefix))
    return [{n: _to_numpy(entries[n], copy) for n in bucket} for bucket in names]


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
