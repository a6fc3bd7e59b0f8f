"""A PPO learner step's speed and peak memory: the plain forward (whole [tokens, vocab] logits) against
the chunked one (``learner.logits_chunk_tokens``), with and without gradient checkpointing, measured in
one run against the machine's FLOP limit.

    .venv/bin/python benchmarks/learner.py                      # SmolLM2-135M's shape, 2 x 512 tokens, CPU
    .venv/bin/python benchmarks/learner.py --batch 8 --seq 1024 --hidden 896 --layers 24 --heads 14 \\
        --kv-heads 2 --intermediate 4864 --vocab 151936        # ~0.5B (Qwen2.5-0.5B's shape), on a GPU

The model is a randomly initialised Llama of the given shape (``--model DIR``: a real one instead); the
batch is random tokens, the second half of each sequence the response. Each variant runs in its own
process (peak memory is a high-water mark): ``learner.train`` on one minibatch of the whole batch for
``--steps`` steps after a warm-up step. Printed per variant:

* tokens/s (every token of the batch per step) and its fraction of the FLOP limit, peak / (6 N) with
  N the parameters (a tied embedding once; the attention's own FLOPs are left out, as usual), peak the
  best ``torch.mm`` measured here in the learner's compute dtype (float32 on CPU, bfloat16 on GPUs);
* peak memory of the timed steps above what the learner held after a warm-up step (weights, gradients'
  buffers, optimizer state): the resident set's peak (CPU; Linux's VmHWM, reset after the warm-up, with
  glibc made to unmap freed blocks so that it is the live peak) or the CUDA allocator's peak (GPU),
  and its ratio to the plain forward's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = {"plain": (0, False), "chunked": (1, False), "chunked+ckpt": (1, True)}  # (chunks on?, checkpointing)


def build_model(args, dest: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_ray.config import load_config
    from rlhf_ray.models.embedded import build_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                      vocab_size=args.vocab, max_position_embeddings=max(2048, args.seq), tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(dest, safe_serialization=True)
    # Any tokenizer will do (the batch is token ids): the embedded model's, built in a second (no model
    # to train for it).
    c = load_config(None, [])
    build_tokenizer(c.model.vocab_size, c.model.seed).save_pretrained(dest)
    return dest


def batch_of(vocab: int, batch: int, seq: int, seed: int = 0):
    import numpy as np

    from rlhf_ray.ppo.types import TrainBatch

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
    am = np.ones((batch, seq), bool)
    resp = np.zeros((batch, seq), bool)
    resp[:, seq // 2:] = True
    f = lambda: np.zeros((batch, seq), np.float32)  # noqa: E731
    adv = rng.standard_normal((batch, seq)).astype(np.float32) * resp
    return TrainBatch(input_ids=ids, attention_mask=am, response_mask=resp, old_logprobs=f(), ref_logprobs=f(),
                      old_values=f(), rewards=f(), advantages=adv, returns=adv.copy(), policy_version=0)


def matmul_peak(device: str, dtype, n: int | None = None, repeats: int = 5) -> float:
    """Best torch.mm of n x n matrices in ``dtype``, FLOP/s (n: 2048 on CPU; 8192 on a GPU, where smaller
    ones leave its tensor cores part idle and would understate the peak)."""
    import torch

    n = n or (8192 if device == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def proc_status(key: str) -> int:
    """A byte count from /proc/self/status (VmRSS: resident now, VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(key + ":"))


def reset_peak_rss() -> int:
    """Reset this process's resident-set peak (Linux: "5" > /proc/self/clear_refs); returns the resident
    set now, the baseline the peak is then measured from."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status("VmRSS")


def run_variant(args) -> dict:
    """One variant in this process: -> {"tps", "peak_bytes", "params", "device"}."""
    import dataclasses

    import torch

    from rlhf_ray.config import LearnerConfig, load_config
    from rlhf_ray.ppo.learner import Learner

    chunked, ckpt = VARIANTS[args.variant]
    chunk = args.chunk if chunked else 0
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ppo = dataclasses.replace(load_config(None, []).ppo, epochs=1, minibatch_size=args.batch, lr=1e-6)
    learner = Learner(args.model, ppo, device=device,
                      learner_cfg=LearnerConfig(logits_chunk_tokens=chunk, gradient_checkpointing=ckpt))
    batch = batch_of(learner.policy.config.vocab_size, args.batch, args.seq)
    params = sum(v.numel() for v in learner.exported_weights().values())
    learner.train(batch)  # warm-up: lazy imports, kernels, the optimizer state's first allocation
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    times = []
    for _ in range(args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        learner.train(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else proc_status("VmHWM")) - base
    return {"tps": args.batch * args.seq / min(times), "peak_bytes": peak, "params": params, "device": device,
            "chunked": learner.chunked}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a model directory (default: a random Llama of the shape below)")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--chunk", type=int, default=128, help="learner.logits_chunk_tokens of the chunked variants "
                   "(below batch x seq, or there is one chunk)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # (a child process's one variant)
    args = p.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    import torch

    given = bool(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        if not given:
            args.model = build_model(args, os.path.join(tmp, "model"))
        results = {}
        for v in args.variants.split(","):
            cmd = [sys.executable, __file__, "--variant", v, "--model", args.model, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads),
                   "--chunk", str(args.chunk)]
            # glibc keeps freed large blocks in its heap, so the resident set's high-water mark would count
            # memory freed long before the peak: every block of 64 KiB or more gets its own mapping,
            # returned when freed, so that ru_maxrss is the live peak.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results[v] = json.loads(out.strip().splitlines()[-1])
    torch.set_num_threads(args.threads)
    first = next(iter(results.values()))
    device = first["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    peak = matmul_peak(device, dtype)
    limit = peak / (6 * first["params"])
    print(f"model: {first['params'] / 1e6:.1f}M parameters ({args.model if given else f'vocabulary {args.vocab}'}); "
          f"batch {args.batch} x {args.seq} tokens, chunks of {args.chunk}; {device}, {args.threads} thread(s)")
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s ({str(dtype).split('.')[-1]}); FLOP limit peak / 6N = "
          f"{limit:.1f} tokens/s")
    plain = results.get("plain")
    for v, r in results.items():
        vs_plain = f", {r['tps'] / plain['tps']:.2f}x plain" if plain else ""
        mem = f"{r['peak_bytes'] / 2**20:8.0f} MiB"
        if plain and plain["peak_bytes"] > 0:
            mem += f" ({r['peak_bytes'] / plain['peak_bytes']:.2f}x plain)"
        if v != "plain" and not r["chunked"]:
            v += " (ran whole: the model's logits are not its head's)"
        print(f"{v:13s} {r['tps']:9.1f} tokens/s ({r['tps'] / limit:6.1%} of the FLOP limit{vs_plain}) | "
              f"step peak memory {mem}")

if __name__ == "__main__":
    main()
