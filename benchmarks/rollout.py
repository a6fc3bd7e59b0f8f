"""Rollout throughput: RolloutWorker (vLLM) vs Hugging Face ``generate`` on the same model, prompts and
sampling settings; and weight-sync cost against a plain memory copy of the same bytes.

    .venv/bin/python benchmarks/rollout.py                      # both models, the demo's batch
    .venv/bin/python benchmarks/rollout.py --models big --repeats 5 --new-tokens 48
    .venv/bin/python benchmarks/rollout.py --models big --profile   # + where a decode step's time goes, bound
    .venv/bin/python benchmarks/rollout.py --models big --dtype bfloat16   # both backends in bfloat16

Two workloads on each model, batch ``--batch`` (default 64, the demo's ppo.prompts_per_iteration):

* ``fixed``: every response exactly ``--new-tokens`` tokens (default 16, the demo's ppo.max_new_tokens;
  vLLM ``ignore_eos``, HF ``min_new_tokens``): pure decoding speed.
* ``demo``: responses as long as the demo's SFT policy makes them on these prompts (sampled once with
  the embedded SFT model, EOS included, at most ``--new-tokens``). vLLM gets each prompt's length
  as its limit; HF ``generate`` cannot retire a finished row, so it runs every row until the longest
  is done, as it does when rows stop at EOS; tokens/s counts the responses' tokens only. The models
  here have random weights (they would not stop at EOS by themselves), so the lengths are imposed.

Each backend runs in its own subprocess with the same thread count (``--threads``, default 1: what a
rollout actor with ``cpus_per_worker=1`` gets), because in-process vLLM rebinds the host's torch
threads and memory; ``--rounds`` (default 2) interleaves the backends' processes, because this
shared VM's speed drifts by up to ~30 % over minutes, and takes the best run of all rounds.
Temperature 1, top_p 1 throughout. ``--dtype`` (default float32) is the dtype both backends compute
in (HF loads the model in it; vLLM gets it as ``rollout.dtype``). vLLM runs twice: with plain weights
(the default ``rollout.cpu_plain_weights``: weight syncs copy in place) and with vLLM's packed oneDNN
weights (syncs replay vLLM's loader; in 16 bits on a CPU with AMX, smaller matrices are packed for
vLLM's AMX kernels instead); weight syncs send the engine's ``wire_dtype``. Models are random-weight
Llamas with the embedded tokenizer: "big" (~28M parameters) and "tiny" (the demo's default shape).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "big": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536),
    "tiny": dict(),  # ModelConfig defaults: the demo's embedded policy shape
}


def build(name: str, root: Path) -> Path:
    """A random-weight model directory for MODELS[name] (safetensors + tokenizer)."""
    from rlhf_ray.config import ModelConfig
    from rlhf_ray.models.embedded import build_model, build_tokenizer

    dest = root / name
    if (dest / "config.json").exists():
        return dest
    cfg = ModelConfig(**MODELS[name])
    tok = build_tokenizer(cfg.vocab_size, cfg.seed)
    model = build_model(cfg, tok)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest


def prompts(batch: int) -> list[str]:
    from rlhf_ray.data import synthetic

    return synthetic.prompts(batch, seed=0)


def demo_lengths(batch: int, new_tokens: int, cache_dir: str) -> list[int]:
    """Response lengths (tokens, EOS included) of the demo's SFT policy on ``prompts(batch)``."""
    from rlhf_ray.config import load_config
    from rlhf_ray.models.embedded import resolve_model
    from rlhf_ray.ppo.rollout import RolloutWorker

    cfg = load_config(None, [f"model.cache_dir={cache_dir}"])
    worker = RolloutWorker(resolve_model(cfg.model, cfg.sft), cfg.rollout, seed=0)
    r = worker.generate(prompts(batch), new_tokens, 1.0, 1.0, seed=0)
    worker.shutdown()
    return [int(n) for n in r.response_mask.sum(1)]


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "_C::onednn_mm", "_C::weight_packed_linear")


def profiled(fn) -> dict:
    """Wall ms of ``fn()`` under torch.profiler and the self-CPU ms of its GEMMs, of its attention
    (vLLM's CPU attention and KV-cache kernels, HF's SDPA) and of everything else."""
    import torch

    with torch.profiler.profile() as prof:
        t0 = time.perf_counter()
        fn()
        wall = (time.perf_counter() - t0) * 1e3
    gemm = attention = 0.0
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3
        if e.key in GEMM_OPS:
            gemm += ms
        elif "attention" in e.key or "reshape_and_cache" in e.key or "scaled_dot_product" in e.key:
            attention += ms
    return {"wall_ms": wall, "gemm_ms": gemm, "attention_ms": attention, "rest_ms": wall - gemm - attention}


def run_vllm(model_dir: str, lengths: list[int], new_tokens: int, repeats: int, plain: bool,
             profile: bool = False, dtype: str = "float32") -> dict:
    import numpy as np

    from rlhf_ray.config import RolloutConfig
    from rlhf_ray.ppo.rollout import RolloutWorker
    from rlhf_ray.ppo.weights import state_dict_buckets

    t0 = time.perf_counter()
    worker = RolloutWorker(model_dir, RolloutConfig(kv_cache_mib=512, cpu_plain_weights=plain, dtype=dtype), seed=0)
    start_s = time.perf_counter() - t0
    ps = prompts(len(lengths))
    worker.generate(ps[:8], 8, 1.0, 1.0, seed=0)  # warm-up
    res = {}
    for workload, limit in (("fixed", new_tokens), ("demo", lengths)):
        wall = []
        for i in range(repeats):
            r = worker.generate(ps, limit, 1.0, 1.0, seed=i, ignore_eos=True)
            assert r.num_tokens == (len(ps) * new_tokens if workload == "fixed" else sum(lengths))
            wall.append(r.num_tokens / r.gen_seconds)
        res[workload] = wall
    if profile:
        res["profile"] = profiled(lambda: worker.generate(ps, new_tokens, 1.0, 1.0, seed=99, ignore_eos=True))

    # Weight sync: the model's own weights, as the learner would send them.
    from safetensors.numpy import load_file

    sd = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        sd.update(load_file(f))
    buckets = state_dict_buckets(sd, 64 << 20, dtype=worker.wire_dtype)
    dst = [{k: np.empty_like(v) for k, v in b.items()} for b in buckets]
    sync, copy = [], []
    for i in range(repeats):
        info = worker.update_weights(buckets, version=i + 1)
        sync.append(info["seconds"])
        t0 = time.perf_counter()  # memcpy of the same bytes into touched arrays
        for b, d in zip(buckets, dst):
            for k, v in b.items():
                np.copyto(d[k], v)
        copy.append(time.perf_counter() - t0)
    worker.shutdown()
    return dict(res, start_s=start_s, bytes=info["bytes"], mode=info["mode"], sync_s=min(sync),
                copy_s=min(copy))


def run_hf(model_dir: str, lengths: list[int], new_tokens: int, repeats: int, profile: bool = False,
           dtype: str = "float32") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"  # batched generation continues from the last column
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    enc = tok(prompts(len(lengths)), return_tensors="pt", padding=True)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tok.pad_token_id)
    res = {}
    with torch.no_grad():
        model.generate(**{k: v[:8] for k, v in enc.items()}, max_new_tokens=8, min_new_tokens=8, **kw)
        # demo: rows stop at EOS but generate() runs them all until the longest is done.
        for workload, steps, useful in (("fixed", new_tokens, len(lengths) * new_tokens),
                                        ("demo", max(lengths), sum(lengths))):
            wall = []
            for i in range(repeats):
                torch.manual_seed(i)
                t0 = time.perf_counter()
                out = model.generate(**enc, max_new_tokens=steps, min_new_tokens=steps, **kw)
                dt = time.perf_counter() - t0
                assert out.shape[1] - enc["input_ids"].shape[1] == steps
                wall.append(useful / dt)
            res[workload] = wall
        if profile:
            res["profile"] = profiled(lambda: model.generate(**enc, max_new_tokens=new_tokens,
                                                             min_new_tokens=new_tokens, **kw))
    return res


def child(args) -> None:
    if args.backend == "lengths":
        out = demo_lengths(args.batch, args.new_tokens, args.cache_dir)
    elif args.backend == "hf":
        out = run_hf(args.model_dir, json.loads(args.lengths), args.new_tokens, args.repeats, args.profile,
                     args.dtype)
    else:
        out = run_vllm(args.model_dir, json.loads(args.lengths), args.new_tokens, args.repeats,
                       plain=args.backend == "vllm", profile=args.profile and args.backend == "vllm",
                       dtype=args.dtype)
    print("RESULT " + json.dumps(out))


def run_child(env: dict, **kw) -> dict | list:
    # A value of "" passes a bare flag (--profile).
    cmd = [sys.executable, __file__] + [a for k, v in kw.items()
                                        for a in (f"--{k.replace('_', '-')}", str(v))[:1 if v == "" else 2]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{kw} failed:\n{out.stderr[-4000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="big,tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="each backend's process this many times, interleaved")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="what both backends compute in")
    ap.add_argument("--cache-dir", default=".cache/rlhf_ray")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one fixed-workload generate of HF and vLLM (plain weights): "
                         "ms per decode step in GEMMs, attention and the rest, and the ratio vLLM would "
                         "reach with no time outside its GEMMs")
    ap.add_argument("--backend", choices=["vllm", "vllm-packed", "hf", "lengths"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--lengths", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend:
        return child(args)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "TRANSFORMERS_VERBOSITY": "error", "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore"}
    common = dict(batch=args.batch, new_tokens=args.new_tokens, repeats=args.repeats)
    lengths = run_child(env, backend="lengths", cache_dir=args.cache_dir, **common)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        for name in args.models.split(","):
            model_dir = build(name, Path(tmp))
            from safetensors.numpy import load_file

            n_params = sum(a.size for a in load_file(model_dir / "model.safetensors").values())
            # Rounds of HF, vLLM, vLLM packed in turn, so that a machine whose speed drifts over the
            # minutes (a shared VM) slows every backend alike; the runs of all rounds are pooled.
            res: dict = {}
            for r in range(args.rounds):
                for backend in ("hf", "vllm", "vllm-packed"):
                    extra = {"profile": ""} if args.profile and r == 0 else {}
                    out = run_child(env, backend=backend, model_dir=model_dir, lengths=json.dumps(lengths),
                                    dtype=args.dtype, **common, **extra)
                    if backend in res:
                        for workload in ("fixed", "demo"):
                            res[backend][workload] += out[workload]
                    else:
                        res[backend] = out
            rows.append((name, n_params, res))

    print(f"\n{args.dtype}, batch {args.batch}, temperature 1, top_p 1, {args.threads} thread(s), "
          f"best of {args.rounds} x "
          f"{args.repeats} runs (the least disturbed on a shared machine), response tokens/s")
    print(f"demo lengths (SFT policy, <= {args.new_tokens}): mean {np.mean(lengths):.1f}, max {max(lengths)}, "
          f"{sum(n == args.new_tokens for n in lengths)} of {len(lengths)} at the limit")
    print(f"{'model':<6} {'params':>8} {'workload':<12} {'HF':>8} {'vLLM':>8} {'ratio':>6} "
          f"{'vLLM packed':>11} {'ratio':>6}")
    for name, n, res in rows:
        for workload, label in (("fixed", f"fixed {args.new_tokens}"), ("demo", "demo lengths")):
            hf, vl, vp = (max(res[b][workload]) for b in ("hf", "vllm", "vllm-packed"))
            print(f"{name:<6} {n / 1e6:>7.1f}M {label:<12} {hf:>8.0f} {vl:>8.0f} {vl / hf:>5.2f}x "
                  f"{vp:>11.0f} {vp / hf:>5.2f}x")
    print(f"\nweight sync into a running engine (update_weights: load + prefix-cache reset) vs a numpy copy "
          f"of the same bytes into touched arrays, best of {args.repeats}")
    print(f"{'model':<6} {'MB':>7} {'engine weights':<15} {'mode':<9} {'sync ms':>8} {'copy ms':>8} {'ratio':>6}")
    for name, _, res in rows:
        for backend, label in (("vllm", "plain"), ("vllm-packed", "packed oneDNN")):
            v = res[backend]
            print(f"{name:<6} {v['bytes'] / 1e6:>7.1f} {label:<15} {v['mode']:<9} {v['sync_s'] * 1e3:>8.1f} "
                  f"{v['copy_s'] * 1e3:>8.1f} {v['sync_s'] / v['copy_s']:>5.2f}x")
    if args.profile:
        print(f"\none fixed-workload generate under torch.profiler (which slows it), ms per decode step "
              f"(/{args.new_tokens}): self-CPU time of GEMMs, of attention, and the rest of the wall time")
        print(f"{'model':<6} {'backend':<8} {'wall':>7} {'GEMM':>7} {'attention':>10} {'rest':>7}")
        for name, _, res in rows:
            for backend, label in (("hf", "HF"), ("vllm", "vLLM")):
                pr = {k: v / args.new_tokens for k, v in res[backend]["profile"].items()}
                print(f"{name:<6} {label:<8} {pr['wall_ms']:>7.1f} {pr['gemm_ms']:>7.1f} {pr['attention_ms']:>10.1f} "
                      f"{pr['rest_ms']:>7.1f}")
            # Both run the same GEMM FLOPs on this workload: vLLM can only gain on the time outside them.
            # HF's step from its best unprofiled run (the profiler slows HF's many small ops more).
            hf_step = 1e3 * args.batch / max(res["hf"]["fixed"])
            vp = {k: v / args.new_tokens for k, v in res["vllm"]["profile"].items()}
            gemm = vp["gemm_ms"]
            print(f"{name:<6} bound: HF's best unprofiled step {hf_step:.1f} ms; vLLM's GEMMs alone {gemm:.1f} ms "
                  f"per step, so even with nothing else vLLM would reach {hf_step / gemm:.2f}x (fixed "
                  f"workload), and 1.5x leaves {hf_step / 1.5 - gemm:.1f} ms per step outside its GEMMs "
                  f"(profiled now: {vp['wall_ms'] - gemm:.1f})")
    for name, _, res in rows:
        print(f"{name}: vLLM engine start {res['vllm']['start_s']:.1f} s; all runs tok/s " + "; ".join(
            f"{b} {w} {[round(x) for x in res[b][w]]}" for b in ("hf", "vllm", "vllm-packed")
            for w in ("fixed", "demo")))


if __name__ == "__main__":
    main()
