"""Moving a policy's weights from one Ray actor into N others, transport only (no engine, no load):
which transport the collective weight sync should use.

    .venv/bin/python benchmarks/weight_transport.py [--mib 256] [--bucket-mib 64] [--receivers 1,2,4]
                                                    [--repeats 3]

A sender holds ``--mib`` MiB of float32 weights in buckets of ``--bucket-mib``; each of N receivers
copies every bucket into tensors of its own (what an engine's in-place load does). Three transports:

* **object store**: the sender puts each bucket once; every receiver gets it (zero-copy on its node)
  and copies it (``rollout.weight_sync=object_store``);
* **gloo broadcast**: one process group of the sender and the receivers, each bucket broadcast once,
  received straight into the receivers' tensors (``rollout.weight_sync=collective``, the group made
  as ``rlhf_ray.ppo.transport.collective`` makes it);
* **Ray Direct Transport, gloo**: the sender's method returns each bucket with
  ``@ray.method(tensor_transport="gloo")`` and every receiver takes the refs as arguments; Ray sends
  the tensor to each receiver over a collective group of them all (``ray.experimental.collective``).

Printed: seconds per GB of weights (the best of ``--repeats``, after one warm-up) and its ratio to a
numpy memcpy of the same bytes, for each N. On one machine every byte goes through loopback TCP and
the receivers share the CPUs, so this says how the transports scale with N, not what a network gives.
"""

from __future__ import annotations

import argparse
import time

import ray
import torch
from model_limits import memcpy_gbs  # (this directory: the script's own)


def bucket_numels(total_bytes: int, bucket_bytes: int) -> list[int]:
    """float32 elements of each bucket: full ones, then what is left."""
    return [min(bucket_bytes, total_bytes - i) // 4 for i in range(0, total_bytes, bucket_bytes)]


@ray.remote(num_cpus=0)
class Sender:
    def __init__(self, total_bytes: int, bucket_bytes: int):
        torch.manual_seed(0)
        self.buckets = [torch.randn(n) for n in bucket_numels(total_bytes, bucket_bytes)]
        self.group = None

    def num_buckets(self) -> int:
        return len(self.buckets)

    def last_value(self) -> float:
        return float(self.buckets[-1][-1])

    def put(self) -> list:
        return [ray.put(b.numpy()) for b in self.buckets]

    def address(self) -> tuple[str, int]:
        from rlhf_ray.ppo.nodes import node_address

        return node_address()

    def join(self, host: str, port: int, world_size: int) -> None:
        from rlhf_ray.ppo.transport.collective import join_group

        self.group = join_group(host, port, 0, world_size)

    def broadcast(self) -> None:
        for b in self.buckets:
            self.group.broadcast(b, 0).wait()

    @ray.method(tensor_transport="gloo")
    def bucket(self, i: int) -> torch.Tensor:
        return self.buckets[i]


@ray.remote(num_cpus=0, enable_tensor_transport=True)  # (else it never receives an RDT tensor: Ray 2.60)
class Receiver:
    def __init__(self, total_bytes: int, bucket_bytes: int):
        self.dest = [torch.empty(n) for n in bucket_numels(total_bytes, bucket_bytes)]
        self.group = None

    def from_store(self, refs: list) -> float:
        for d, r in zip(self.dest, refs):
            d.copy_(torch.from_numpy(ray.get(r)))
        return float(self.dest[-1][-1])

    def join(self, host: str, port: int, rank: int, world_size: int) -> None:
        from rlhf_ray.ppo.transport.collective import join_group

        self.group = join_group(host, port, rank, world_size)

    def from_broadcast(self) -> float:
        for d in self.dest:
            self.group.broadcast(d, 0).wait()
        return float(self.dest[-1][-1])

    def from_rdt(self, *tensors) -> float:
        for d, t in zip(self.dest, tensors):
            d.copy_(t)
        return float(self.dest[-1][-1])


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(n: int, total: int, bucket: int, repeats: int) -> dict:
    from ray.experimental.collective import create_collective_group, destroy_collective_group

    sender = Sender.remote(total, bucket)
    receivers = [Receiver.remote(total, bucket) for _ in range(n)]
    nb = ray.get(sender.num_buckets.remote())
    expected = ray.get(sender.last_value.remote())

    def check(values) -> None:
        assert all(v == expected for v in values), (values, expected)

    def store() -> None:
        refs = ray.get(sender.put.remote())
        check(ray.get([r.from_store.remote(refs) for r in receivers]))

    host, port = ray.get(sender.address.remote())
    ray.get([sender.join.remote(host, port, n + 1),
             *(r.join.remote(host, port, 1 + i, n + 1) for i, r in enumerate(receivers))])

    def broadcast() -> None:
        out = ray.get([sender.broadcast.remote(), *(r.from_broadcast.remote() for r in receivers)])
        check(out[1:])

    group = create_collective_group([sender, *receivers], backend="torch_gloo")

    def rdt() -> None:
        refs = [sender.bucket.remote(i) for i in range(nb)]
        check(ray.get([r.from_rdt.remote(*refs) for r in receivers]))

    out = {"object store": best_of(store, repeats), "gloo broadcast": best_of(broadcast, repeats),
           "RDT gloo": best_of(rdt, repeats)}
    destroy_collective_group(group)
    for a in (sender, *receivers):
        ray.kill(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--bucket-mib", type=int, default=64)
    ap.add_argument("--receivers", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    total, bucket = args.mib << 20, args.bucket_mib << 20
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
    gb = total / 1e9
    copy = 1 / memcpy_gbs(total, args.repeats)  # s/GB
    print(f"{args.mib} MiB of float32 weights in buckets of {args.bucket_mib} MiB; memcpy {copy:.3f} s/GB")
    print("| receivers | transport | s/GB | x memcpy |\n|---|---|---|---|")
    for n in (int(x) for x in args.receivers.split(",")):
        for name, seconds in measure(n, total, bucket, args.repeats).items():
            print(f"| {n} | {name} | {seconds / gb:.3f} | {seconds / gb / copy:.1f} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
