"""The slot files of the shared-memory weight transport (``shared_memory``): the engines' parameters
live in two files ("slots") under /dev/shm that every rollout engine on the node maps; the learner
writes a new version into the slot no engine reads, then each engine points its parameters at that slot.

Per sync that is one copy of each byte (the learner's write), whatever the number of engines, with
no object store in between and no copy inside the engines; the engines also share one copy of the
weights instead of holding one each. Version v goes to slot v % 2, and the learner overwrites a slot
only after every engine has moved off it (its write waits for the previous sync).

A slot holds the engine's parameters in vLLM's names and shapes (fused q/k/v and gate/up, padded
vocabulary), float32, one after another at 64-byte aligned offsets. Where each Hugging Face weight
lands inside them is found once, by the first engine, through its own loader: it loads tensors filled
with a distinct number per weight into zeroed parameters and reads back where each number went
(:func:`find_placements`), then loads an element-order pattern and checks it arrived unpermuted
(:func:`check_order`). A loader that transforms values (quantisation, scaling, transposes) fails
these checks and the job keeps the object-store path. Engines on other nodes, on GPUs, or with
packed CPU weights use the object-store path too.

The files are named after the process that creates them (the first engine, which lives as long as
the job) and removed when the job ends. A job killed before its cleanup leaves them behind; the next
job that creates slots on the node removes those whose creator is gone (:func:`remove_stale_slots`).
"""

from __future__ import annotations

import glob
import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping

import torch

from rlhf_ray.private import create_private_file

ALIGN_ELEMS = 16  # 64 bytes of float32
ORDER_PERIOD = 4093  # order pattern: (i % ORDER_PERIOD) + 1, exact in float32


def slot_layout(shapes: Mapping[str, Iterable[int]]) -> tuple[dict[str, int], int]:
    """Element offset of each parameter inside a slot (in the given order, 64-byte aligned) and the
    slot's size in float32 elements."""
    offsets, end = {}, 0
    for name, shape in shapes.items():
        offsets[name] = end
        end += -(-math.prod(shape) // ALIGN_ELEMS) * ALIGN_ELEMS
    return offsets, max(end, ALIGN_ELEMS)


def find_placements(params: Mapping[str, torch.Tensor], numels: Mapping[str, int]) -> dict[str, tuple[str, int]]:
    """Where each weight went, after loading weight i of ``numels`` (in its order) as a tensor full
    of i + 1 into parameters that were all 0.

    params: engine parameter name -> tensor; numels: weight (HF) name -> element count.
    Returns weight name -> (parameter name, element offset inside that parameter), for the weights
    that landed somewhere (a loader may skip some, e.g. a tied lm_head). Raises ValueError when a
    weight landed in pieces or with a different size, a value is not a weight's number, or a
    parameter received no weight at all (it would keep stale values after a sync).
    """
    names = list(numels)
    found: dict[str, tuple[str, int]] = {}
    for pname, p in params.items():
        v = p.detach().reshape(-1)
        if v.numel() == 0:
            continue
        cuts = (torch.nonzero(v[1:] != v[:-1]).flatten() + 1).tolist()
        starts, ends = [0, *cuts], [*cuts, v.numel()]
        received = False
        for s, e in zip(starts, ends):
            val = float(v[s])
            if val == 0.0:
                continue
            k = int(val) - 1
            if val != k + 1 or not 0 <= k < len(names):
                raise ValueError(f"{pname}[{s}:{e}] holds {val}, not a weight's number: the loader transforms values")
            name = names[k]
            if name in found:
                raise ValueError(f"{name} landed in more than one place ({found[name][0]}, {pname})")
            if e - s != numels[name]:
                raise ValueError(f"{name} has {numels[name]} elements but {e - s} landed in {pname}")
            found[name] = (pname, s)
            received = True
        if not received:
            raise ValueError(f"engine parameter {pname} received no weight")
    return found


def order_pattern(numel: int) -> torch.Tensor:
    """float32 [numel]: (i % ORDER_PERIOD) + 1, to check that a loader keeps the element order."""
    return (torch.arange(numel) % ORDER_PERIOD + 1).to(torch.float32)


def check_order(params: Mapping[str, torch.Tensor], placements: Mapping[str, tuple[str, int]],
                numels: Mapping[str, int]) -> None:
    """After loading :func:`order_pattern` for every placed weight: each landed unpermuted."""
    for name, (pname, start) in placements.items():
        got = params[pname].detach().reshape(-1)[start:start + numels[name]]
        if not torch.equal(got, order_pattern(numels[name])):
            raise ValueError(f"{name}: the loader reorders its elements inside {pname}")


PREFIX = "rlhf_ray-weights-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-[0-9a-f]+-slot[01]$")


def new_spec(shapes: Mapping[str, Iterable[int]], directory: str = "/dev/shm") -> dict:
    """A slot specification for parameters of ``shapes`` (placements still empty): plain lists,
    strings and ints, so it travels through Ray and vLLM's RPC alike. The file names carry this
    process's id (see :func:`remove_stale_slots`)."""
    offsets, numel = slot_layout(shapes)
    stem = os.path.join(directory, f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    return {"paths": [f"{stem}-slot0", f"{stem}-slot1"], "numel": numel,
            "params": {n: [offsets[n], [int(d) for d in shape]] for n, shape in shapes.items()},
            "placements": {}}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_slots(directory: str) -> list[str]:
    """Remove slot files in ``directory`` whose creating process no longer exists (left by a job
    that was killed before its cleanup); returns their paths."""
    removed = []
    for path in glob.glob(os.path.join(directory, PREFIX + "*")):
        m = _NAME.search(os.path.basename(path))
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


class SharedSlots:
    """The two slot files of a spec, mapped into this process (an engine or the learner)."""

    def __init__(self, spec: Mapping, create: bool = False):
        self.spec = spec
        nbytes = 4 * spec["numel"]
        self.stale_removed: list[str] = []
        if create:
            directory = os.path.dirname(spec["paths"][0])
            self.stale_removed = remove_stale_slots(directory)
            if free_bytes(directory) < 2 * nbytes + (64 << 20):
                raise OSError(f"{directory}: {free_bytes(directory) >> 20} MiB free, two slots need "
                              f"{2 * nbytes >> 20} MiB")
        created = []
        try:
            for path in spec["paths"] if create else ():
                with create_private_file(path) as f:  # 0600: the policy is nobody else's to read
                    created.append(path)
                    f.truncate(nbytes)
            self.flat = [torch.from_file(p, shared=True, size=spec["numel"], dtype=torch.float32)
                         for p in spec["paths"]]
        except BaseException:  # files made here are known to nobody else yet: do not leave them behind
            unlink_slots({"paths": created})
            raise
        self._views: dict[int, dict[str, torch.Tensor]] = {}

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        """Engine parameter name -> view of slot ``slot`` in the parameter's shape."""
        if slot not in self._views:
            flat = self.flat[slot]
            self._views[slot] = {n: flat[off:off + math.prod(shape)].view(shape)
                                 for n, (off, shape) in self.spec["params"].items()}
        return self._views[slot]

    def write(self, slot: int, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy Hugging Face-named weights into their placements in slot ``slot``; returns bytes
        written. Every placed weight must come: a missing one would leave that slot's old values."""
        flat, params, placements = self.flat[slot], self.spec["params"], self.spec["placements"]
        written, nbytes = set(), 0
        for name, tensor in weights:
            if name not in placements:
                continue
            pname, start, numel = placements[name]
            if tensor.numel() != numel:
                raise ValueError(f"shared weights: {name} has {tensor.numel()} elements, its place in {pname} "
                                 f"{numel}")
            off = params[pname][0] + start
            flat[off:off + numel].copy_(tensor.detach().reshape(-1))
            written.add(name)
            nbytes += tensor.numel() * 4
        missing = set(placements) - written
        if missing:
            raise ValueError(f"shared weights: {len(missing)} weight(s) not written, e.g. {sorted(missing)[:5]}")
        return nbytes

    def unlink(self) -> None:
        unlink_slots(self.spec)


def unlink_slots(spec: Mapping) -> None:
    """Remove a spec's slot files (mappings stay valid until every process drops them)."""
    for path in spec["paths"]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
