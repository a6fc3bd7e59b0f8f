"""Rollout throughput: RolloutWorker (vLLM) vs Hugging Face ``generate`` on the same model, prompts and
sampling settings; and weight-sync cost against a plain memory copy of the same bytes.

    .venv/bin/python benchmarks/rollout.py                      # both models, batch 64, 48 new tokens
    .venv/bin/python benchmarks/rollout.py --models big --repeats 5

Each backend runs in its own subprocess with the same thread count (``--threads``, default 1: what a
rollout actor with ``cpus_per_worker=1`` gets), because in-process vLLM rebinds the host's torch
threads and memory. Both generate exactly ``--new-tokens`` tokens per prompt (vLLM ``ignore_eos``,
HF ``min_new_tokens``), with temperature 1 and top_p 1. Models are random-weight Llamas with the
embedded tokenizer: "big" (~28M parameters) and "tiny" (the demo's default shape).
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


def run_vllm(model_dir: str, batch: int, new_tokens: int, repeats: int) -> dict:
    import numpy as np

    from rlhf_ray.config import RolloutConfig
    from rlhf_ray.ppo.rollout import RolloutWorker
    from rlhf_ray.ppo.weights import state_dict_buckets

    t0 = time.perf_counter()
    worker = RolloutWorker(model_dir, RolloutConfig(kv_cache_mib=512), seed=0)
    start_s = time.perf_counter() - t0
    ps = prompts(batch)
    worker.generate(ps[:8], 8, 1.0, 1.0, seed=0)  # warm-up
    wall, cpu = [], []
    for i in range(repeats):
        c0 = time.process_time()
        r = worker.generate(ps, new_tokens, 1.0, 1.0, seed=i, ignore_eos=True)
        cpu.append(r.num_tokens / (time.process_time() - c0))
        assert r.num_tokens == batch * new_tokens
        wall.append(r.num_tokens / r.gen_seconds)

    # Weight sync: the model's own weights, as the learner would send them.
    from safetensors.numpy import load_file

    sd = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        sd.update(load_file(f))
    t0 = time.perf_counter()
    buckets = state_dict_buckets(sd, 64 << 20)
    bucket_s = time.perf_counter() - t0
    sync, cold, warm = [], [], []
    for i in range(repeats):
        info = worker.update_weights(buckets, version=i + 1)
        sync.append(info["seconds"])
        # memcpy baselines: into fresh arrays (page faults included, like any new copy) and into
        # already-touched ones (pure bandwidth).
        dst = [{k: np.empty_like(v) for k, v in b.items()} for b in buckets]
        for times in (cold, warm):
            t0 = time.perf_counter()
            for b, d in zip(buckets, dst):
                for k, v in b.items():
                    np.copyto(d[k], v)
            times.append(time.perf_counter() - t0)
    worker.shutdown()
    return dict(wall=wall, cpu=cpu, start_s=start_s, bytes=info["bytes"],
                sync_s=min(sync), cold_s=min(cold), warm_s=min(warm), bucket_s=bucket_s,
                buckets=len(buckets))


def run_hf(model_dir: str, batch: int, new_tokens: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"  # batched generation continues from the last column
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok(prompts(batch), return_tensors="pt", padding=True)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        model.generate(**{k: v[:8] for k, v in enc.items()}, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
        wall, cpu = [], []
        for i in range(repeats):
            torch.manual_seed(i)
            t0, c0 = time.perf_counter(), time.process_time()
            out = model.generate(**enc, **kw)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            n = (out.shape[1] - enc["input_ids"].shape[1]) * batch
            assert n == batch * new_tokens
            wall.append(n / dt)
            cpu.append(n / dc)
    return dict(wall=wall, cpu=cpu)


def child(args) -> None:
    fn = run_vllm if args.backend == "vllm" else run_hf
    print("RESULT " + json.dumps(fn(args.model_dir, args.batch, args.new_tokens, args.repeats)))


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="big,tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend:
        return child(args)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "TRANSFORMERS_VERBOSITY": "error", "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        for name in args.models.split(","):
            model_dir = build(name, Path(tmp))
            from safetensors.numpy import load_file

            n_params = sum(a.size for a in load_file(model_dir / "model.safetensors").values())
            res = {}
            for backend in ("hf", "vllm"):
                cmd = [sys.executable, __file__, "--backend", backend, "--model-dir", str(model_dir),
                       "--batch", str(args.batch), "--new-tokens", str(args.new_tokens),
                       "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode or not line:
                    sys.exit(f"{backend} on {name} failed:\n{out.stderr[-4000:]}")
                res[backend] = json.loads(line[0][7:])
            rows.append((name, n_params, res))

    print(f"\nbatch {args.batch} x {args.new_tokens} new tokens, temperature 1, top_p 1, {args.threads} "
          f"thread(s), {args.repeats} runs. tok/s: best wall-clock run (the least disturbed on a shared "
          f"machine); tok/cpu-s: tokens per CPU-second of the process, median")
    print(f"{'model':<6} {'params':>8} {'HF tok/s':>9} {'vLLM tok/s':>10} {'ratio':>6} "
          f"{'HF tok/cpu-s':>12} {'vLLM tok/cpu-s':>14} {'ratio':>6}")
    for name, n, res in rows:
        hf, vl = max(res["hf"]["wall"]), max(res["vllm"]["wall"])
        hc, vc = float(np.median(res["hf"]["cpu"])), float(np.median(res["vllm"]["cpu"]))
        print(f"{name:<6} {n / 1e6:>7.1f}M {hf:>9.0f} {vl:>10.0f} {vl / hf:>5.2f}x {hc:>12.0f} {vc:>14.0f} "
              f"{vc / hc:>5.2f}x")
    print(f"\nweight sync (in-process engine) vs numpy copy of the same bytes, best of {args.repeats}")
    print(f"{'model':<6} {'MB':>7} {'sync ms':>8} {'sync s/GB':>9} {'copy s/GB':>9} {'ratio':>6} "
          f"{'warm copy s/GB':>14} {'ratio':>6} {'bucketing ms':>12}")
    for name, _, res in rows:
        v = res["vllm"]
        gb = v["bytes"] / 1e9
        print(f"{name:<6} {v['bytes'] / 1e6:>7.1f} {v['sync_s'] * 1e3:>8.1f} {v['sync_s'] / gb:>9.2f} "
              f"{v['cold_s'] / gb:>9.2f} {v['sync_s'] / v['cold_s']:>5.1f}x {v['warm_s'] / gb:>14.2f} "
              f"{v['sync_s'] / v['warm_s']:>5.1f}x {v['bucket_s'] * 1e3:>12.1f}")
    print("(sync: update_weights, i.e. reload into the engine + prefix-cache reset; copy: np.copyto into fresh "
          "arrays, page faults included; warm copy: into touched arrays; bucketing: state_dict_buckets)")
    for name, _, res in rows:
        print(f"{name}: vLLM engine start {res['vllm']['start_s']:.1f} s; all runs tok/s "
              f"HF {[round(x) for x in res['hf']['wall']]} vLLM {[round(x) for x in res['vllm']['wall']]}")


if __name__ == "__main__":
    main()
