"""A PPO run's rollout and learner throughput against what the machine allows, measured in one run.

    .venv/bin/python benchmarks/model_limits.py --model runs/smollm2/model --metrics runs/smollm2/ppo/metrics.jsonl

Measured here, with ``--threads`` threads (default 1: what a rollout worker and the learner get with
one CPU each):

* **matmul peak**: float32 ``torch.mm`` of ``--gemm``-sized square matrices, best of several, GFLOP/s;
* **memcpy**: ``np.copyto`` of 512 MB into touched memory, GB/s;
* **a plain Hugging Face train step** of the model (forward, backward, AdamW) at [``--batch`` x
  ``--seq``] tokens: the reference a learner step can be held to.

Then, from the run's ``metrics.jsonl`` (the mean over its iterations after the first):

* rollout tokens/s (``gen_tokens / gen_seconds``) against the FLOP limit, peak / (2 N) per token, and
  the memory limit: each decode step reads every weight once (N x 4 bytes in float32), so at batch B
  it yields at most B x memcpy / (4 N) tokens per second;
* learner tokens/s (``train_tokens_per_s``: every token of the batch, each PPO epoch) against the FLOP
  limit, peak / (6 N), beside the plain train step's fraction of that limit.

N counts every parameter once (a tied embedding once: it is the LM head's matmul).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def matmul_peak(n: int, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def memcpy_gbs(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    import numpy as np

    src = np.ones(nbytes // 4, np.float32)
    dst = np.zeros_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def hf_train_tokens_per_s(model_dir: str, batch: int, seq: int, steps: int = 3) -> tuple[float, int]:
    """(tokens/s of a plain HF train step at [batch, seq], number of parameters)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    best = float("inf")
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        best = min(best, time.perf_counter() - t)
    return batch * seq / best, n


def run_means(metrics: str) -> dict:
    rows = [json.loads(line) for line in open(metrics) if line.strip()]
    its = [r for r in rows if r.get("step", 0) > 1] or [r for r in rows if r.get("step", 0) > 0]
    mean = lambda k: sum(r[k] for r in its) / len(its)  # noqa: E731
    return {"iterations": len(its), "rollout_tps": mean("rollout_tokens_per_s"),
            "learner_tps": mean("train_tokens_per_s"), "batch": mean("batch_size"),
            "iteration_s": mean("iteration_seconds"), "gen_tokens": mean("gen_tokens")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the policy's model directory")
    p.add_argument("--metrics", required=True, help="a PPO run's metrics.jsonl")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gemm", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    peak, copy = matmul_peak(args.gemm), memcpy_gbs()
    hf_tps, n = hf_train_tokens_per_s(args.model, args.batch, args.seq)
    run = run_means(args.metrics)
    flop_roll, flop_learn = peak * 1e9 / (2 * n), peak * 1e9 / (6 * n)
    mem_roll = run["batch"] * copy * 1e9 / (4 * n)
    print(f"model: {n / 1e6:.1f}M parameters ({4 * n / 1e6:.0f} MB in float32); {args.threads} thread(s)")
    print(f"matmul peak {peak:.1f} GFLOP/s ({args.gemm}^3 float32), memcpy {copy:.2f} GB/s")
    print(f"run: {run['iterations']} iterations, batch {run['batch']:.0f}, {run['gen_tokens']:.0f} tokens generated "
          f"per iteration, {run['iteration_s']:.1f} s per iteration")
    print(f"rollout  {run['rollout_tps']:8.1f} tok/s | FLOP limit (peak / 2N) {flop_roll:8.1f} tok/s: "
          f"{run['rollout_tps'] / flop_roll:6.1%} | weight-read limit (batch x memcpy / 4N) {mem_roll:8.1f} tok/s: "
          f"{run['rollout_tps'] / mem_roll:6.1%}")
    print(f"learner  {run['learner_tps']:8.1f} tok/s | FLOP limit (peak / 6N) {flop_learn:8.1f} tok/s: "
          f"{run['learner_tps'] / flop_learn:6.1%}")
    print(f"plain HF train step [{args.batch} x {args.seq}] {hf_tps:8.1f} tok/s: {hf_tps / flop_learn:6.1%} of the "
          f"FLOP limit; the learner reaches {run['learner_tps'] / hf_tps:.2f}x of it")


if __name__ == "__main__":
    main()
