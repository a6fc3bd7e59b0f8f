"""The learner's ranks (``learner.num_workers`` > 1): torch.distributed inside Ray actors.

Every rank is a :class:`rlhf_ray.ppo.learner.Learner` given a :class:`RankSpec`; it joins a process group
(gloo on CPU, NCCL on GPUs) and wraps its policy + value head in DistributedDataParallel ("ddp") or
shards it with FSDP2's ``fully_shard`` ("fsdp": each decoder layer a unit, the rest in the root unit).
Ray places and starts the ranks (``rlhf_ray.ppo.learner_group``); torch does the training collectives.

A PPO minibatch is split across the ranks (:func:`rank_rows`) and every loss term is a mean over the
minibatch's response tokens. A rank's loss is its own token mean, so it is scaled by
:func:`token_share` before backward: the gradient average DDP and FSDP take over the ranks is then the
gradient of the whole minibatch's token mean, the single learner's, whatever the ranks' token counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class RankSpec:
    """One rank of a learner group: its rank, the group's size, rank 0's ``tcp://host:port`` and the
    strategy ("ddp" | "fsdp")."""
    rank: int
    world_size: int
    init_method: str
    strategy: str = "ddp"


def rank_rows(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's rows of a minibatch: every world_size-th, from ``rank``. [b] -> [<= ceil(b / world)]."""
    return rows[rank::world_size]


def token_share(local_tokens: int, total_tokens: int, world_size: int) -> float:
    """The factor on a rank's token-mean loss so that the mean over ranks of the scaled gradients (what
    DDP's all-reduce and FSDP's reduce-scatter compute) is the gradient of the minibatch's token mean:
    world_size * local_tokens / total_tokens (0 for a minibatch without response tokens)."""
    return world_size * local_tokens / total_tokens if total_tokens else 0.0


def init_process_group(spec: RankSpec, device: str, timeout_s: float = 1800) -> None:
    """Join the group (blocks until every rank has): NCCL on a CUDA device, gloo otherwise."""
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device).index or 0)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=spec.init_method,
                            rank=spec.rank, world_size=spec.world_size, timeout=timedelta(seconds=timeout_s))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, by the class names Hugging Face lists in ``_no_split_modules``
    (``LlamaDecoderLayer``, ...): FSDP's units."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"learner.strategy=fsdp: {type(model).__name__} names no decoder layer class in "
                         f"_no_split_modules; use learner.strategy=ddp")
    return layers


def wrap(net: nn.Module, policy: nn.Module, strategy: str, device: str, bf16_params: bool) -> nn.Module:
    """The module to train: ``net`` in DDP, or ``net`` itself sharded in place with FSDP2 (every decoder
    layer of ``policy`` one unit, ``net`` the root; ``bf16_params``: bfloat16 parameters in forward and
    backward, float32 gradient reduction)."""
    import torch.distributed as dist

    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.cuda.current_device()] if device.startswith("cuda") else None
        # Buffers (rotary tables) never change: no broadcast before each forward, so rank 0 alone may run
        # the unwrapped module between steps.
        return DistributedDataParallel(net, device_ids=ids, forward_sync_buffers=False)
    if strategy != "fsdp":
        raise ValueError(f"learner.strategy: expected 'ddp' or 'fsdp', got {strategy!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(policy):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(net, mesh=mesh, mp_policy=mp)
    return net


def empty_policy(path) -> nn.Module:
    """The Hugging Face causal LM of the directory ``path`` built from its config alone, every parameter
    and buffer on the meta device: no memory, the weights file not read. A sharded rank other than 0
    starts from this and receives its shards from rank 0 (:func:`fill_from_rank0`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)), dtype=torch.float32)


def rank0_value(compute):
    """``compute()`` as rank 0 computes it, on every rank (a collective; the others do not call it: a
    question only rank 0's real weights can answer)."""
    import torch.distributed as dist

    value = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(value, 0)
    return value[0]


def fill_from_rank0(module: nn.Module, source: dict[str, torch.Tensor] | None, device: str) -> None:
    """Give every rank's ``module`` (sharded by :func:`wrap`) rank 0's values, one tensor at a time (a
    collective: every rank calls it). ``source``: on rank 0, {name: whole tensor} of every parameter and
    buffer of ``module`` as loaded, before it was sharded; None elsewhere, where ``module`` was built on
    the meta device and is given memory on ``device`` here (its shards only). A sharded parameter is
    scattered from rank 0 (each rank receives its shard alone); the rest (buffers: rotary tables) is
    broadcast."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank > 0:
        module.to_empty(device=device)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if is_sharded(t):
                t.copy_(like(source[name] if rank == 0 else torch.empty(t.shape, dtype=t.dtype), t))
            else:
                dist.broadcast(t.data, 0)


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a sharded one (a collective: every rank calls it, in the same order); a plain
    tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def like(full_value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full_value`` laid out as ``param`` is: this rank's shard of it for a sharded parameter (every rank
    holds the whole value, e.g. read from a checkpoint), else itself on the parameter's device."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full_value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return full_value.to(param.device)


def gathered(tensors, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """(name, tensor) pairs -> {name: the whole tensor on the CPU}, gathered one at a time (a collective
    under FSDP: every rank calls it, in the same order). ``keep=False`` (a rank that does not write):
    each whole tensor is dropped as soon as it is gathered, so only the writer holds the whole model."""
    out = {}
    for k, v in tensors:
        t = full(v).detach().cpu().contiguous()
        if keep:
            out[k] = t
    return out if keep else None


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict | None:
    """``optimizer.state_dict()`` with every sharded moment gathered whole, on the CPU: the single
    learner's format, so a checkpoint resumes at any number of ranks (a collective under FSDP).
    ``keep=False``: gathers and drops (see :func:`gathered`), returns None."""
    state = optimizer.state_dict()  # (its per-parameter dicts are the optimizer's own: replaced, not changed)
    for idx, per in sorted(state["state"].items()):
        moments = gathered(((k, v) for k, v in sorted(per.items()) if torch.is_tensor(v)), keep)
        if keep:
            state["state"][idx] = {**per, **moments}
    return state if keep else None


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A :func:`full_optimizer_state` laid out as ``optimizer``'s parameters are (sharded ones sharded)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, per in state["state"].items():
        p = params[idx]
        for k, v in per.items():
            if torch.is_tensor(v) and is_sharded(p) and tuple(v.shape) == tuple(p.shape):
                per[k] = like(v, p)
    return state


def sum_over_ranks(values: dict[str, float], device: str) -> dict[str, float]:
    """Each value summed over the ranks (the same keys on every rank; a collective)."""
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))
