"""RM training throughput: Ray Train (1 and 2 DDP workers) vs a plain in-process torch loop.

Same model (the embedded SFT'd backbone + scalar head), same data, same batch size. Records/s are
measured over the second epoch (the first warms up); Ray's start-up (fit() wall time) is printed
separately. Ray overhead = 1 - (Ray Train records/s) / (in-process records/s) with the same threads.

    .venv/bin/python benchmarks/rm_train.py [--records 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from rlhf_ray.config import load_config
from rlhf_ray.data.prepare import prepare_preference_data
from rlhf_ray.data.preferences import read_jsonl
from rlhf_ray.models.reward import init_reward_model
from rlhf_ray.pipeline import policy_stage
from rlhf_ray.reward.launch import train_rm
from rlhf_ray.reward.train import RMTrainLoop
from rlhf_ray.runtime import init_ray, quiet_libraries


def in_process(rm, policy, records, threads: int) -> float:
    torch.set_num_threads(threads)
    model, tok = init_reward_model(policy, seed=rm.seed)
    loop = RMTrainLoop(rm, model, tok, records, log=lambda *_: None)
    loop.train_epoch(0)
    return loop.train_epoch(1)["records_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=2000)
    args = ap.parse_args()
    quiet_libraries()
    tmp = Path(tempfile.mkdtemp())
    cfg = load_config(None, [f"data.num_train={args.records}", "data.num_eval=50", "rm.epochs=2"])
    policy = policy_stage(cfg, log=lambda *_: None)
    train_path, eval_path = prepare_preference_data(cfg.data, tmp)
    records = read_jsonl(train_path)
    init_ray(num_cpus=4)
    rows = []
    for workers, cpus in ((1, 2.0), (2, 1.0)):
        rm = replace(cfg.rm, num_workers=workers, cpus_per_worker=cpus)
        t0 = time.perf_counter()
        res = train_rm(rm, policy, train_path, eval_path, storage_path=str(tmp / "runs"))
        wall = time.perf_counter() - t0
        ray_rate = res.metrics["records_per_s"]
        base = in_process(rm, policy, records, threads=2)
        rows.append((workers, cpus, ray_rate, base, wall))
    print(f"\nRM epoch throughput, {args.records} records, batch {cfg.rm.batch_size}/worker (records/s, 2nd epoch)")
    print(f"{'setup':34s} {'Ray Train':>10s} {'in-process':>11s} {'ratio':>7s} {'overhead':>9s} {'fit() wall':>11s}")
    for workers, cpus, ray_rate, base, wall in rows:
        label = f"{workers} worker(s) x {cpus:g} CPU vs 2 threads"
        ratio = ray_rate / base
        print(f"{label:34s} {ray_rate:10.1f} {base:11.1f} {ratio:7.2f} {1 - ratio:9.1%} {wall:10.1f}s")


if __name__ == "__main__":
    main()
