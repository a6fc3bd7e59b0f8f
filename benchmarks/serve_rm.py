"""Benchmark the RM service on loopback (bounded in time and count).

  (a) --clients concurrent clients, each POSTing /score with one prompt and --responses responses
      for --duration seconds, with @serve.batch and without: req/s, items/s, p50/p99 latency, errors.
  (b) bulk /score_batch requests (--bulk-prompts prompts x --responses responses each): items/s over
      HTTP and via the DeploymentHandle, as fractions of in-process RewardScorer on the same items
      (same model, same torch thread count as the replica).
  (c) --malformed malformed requests interleaved with good ones: 5xx count (goal 0), every good
      request answered, healthy afterwards.

"Ours" is the time inside the scorer (tokenize + forward), measured in the replica; the rest of a
request's latency is Serve (proxy, routing, batching queue) and HTTP (client, JSON).

    .venv/bin/python benchmarks/serve_rm.py --duration 30            # the embedded RM
    .venv/bin/python benchmarks/serve_rm.py --checkpoint runs/rm/.../checkpoint_000002
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from rlhf_ray.config import ModelConfig, ServeConfig, SFTConfig
from rlhf_ray.data import synthetic
from rlhf_ray.runtime import init_ray, quiet_libraries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_rm(dest: Path, cache_dir: str) -> Path:
    """The embedded SFT policy with a fresh (untrained) score head: the speed is what matters."""
    from rlhf_ray.models.embedded import resolve_model
    from rlhf_ray.models.reward import init_reward_model

    backbone = resolve_model(replace(ModelConfig(), cache_dir=cache_dir), SFTConfig())
    model, tok = init_reward_model(backbone)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest


def workload(n: int, k: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """n prompts with k synthetic responses each (cycled when a record has fewer)."""
    out = []
    for r in synthetic.preference_records(n, seed=seed, min_k=2, max_k=8):
        out.append((r["prompt"], [r["responses"][i % len(r["responses"])] for i in range(k)]))
    return out


def summary(latencies: list[float], errors: int, items_per_req: int, wall: float) -> dict:
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": len(latencies), "errors": errors, "req_s": len(latencies) / wall,
            "items_s": len(latencies) * items_per_req / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "mean_ms": float(lat.mean())}


async def closed_loop(url: str, bodies: list[dict], clients: int, duration: float, max_requests: int,
                      items_per_req: int) -> dict:
    """``clients`` keep-alive clients, each sending its next request when the last one returns."""
    import aiohttp

    latencies, errors, sent = [], 0, 0
    deadline = time.perf_counter() + duration

    async def client(session, i):
        nonlocal errors, sent
        j = i
        while time.perf_counter() < deadline and sent < max_requests:
            sent += 1
            t = time.perf_counter()
            try:
                async with session.post(url, json=bodies[j % len(bodies)]) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1
            j += clients

    start = time.perf_counter()
    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session, i) for i in range(clients)))
    return summary(latencies, errors, items_per_req, time.perf_counter() - start)


def replica_stats(handle, reset: bool = False) -> dict:
    return handle.get_stats.remote(reset=reset).result(timeout_s=60)


def ours_vs_serve(res: dict, stats: dict, wall: float) -> dict:
    """Split a request's mean latency: the forward pass it waited on (ours), the rest of its time in
    the replica (batch queue and wait, FastAPI), and outside the replica (Serve proxy and routing,
    HTTP, the client)."""
    batches, requests = max(stats["batches"], 1), max(stats["requests"], 1)
    forward_ms = stats["forward_s"] / batches * 1000  # one forward pass (tokenize + model)
    in_replica_ms = stats["in_replica_s"] / requests * 1000
    return {"mean_batch_requests": stats["requests"] / batches, "forward_ms": forward_ms,
            "replica_wait_ms": max(in_replica_ms - forward_ms, 0.0),
            "outside_replica_ms": max(res["mean_ms"] - in_replica_ms, 0.0),
            "replica_busy": stats["forward_s"] / wall}


def part_a(urls: dict, handles: dict, groups, args) -> dict:
    bodies = [{"prompt": p, "responses": rs} for p, rs in groups]
    out = {}
    for mode in ("batched", "unbatched"):
        replica_stats(handles[mode], reset=True)
        t = time.perf_counter()
        res = asyncio.run(closed_loop(urls[mode] + "/score", bodies, args.clients, args.duration,
                                      args.max_requests, args.responses))
        res.update(ours_vs_serve(res, replica_stats(handles[mode]), time.perf_counter() - t))
        out[mode] = res
        print(f"(a) {mode:9s} {args.clients} clients x 1 prompt x {args.responses} responses, "
              f"{args.duration:.0f} s: {res['req_s']:.1f} req/s, {res['items_s']:.0f} items/s, "
              f"p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, errors {res['errors']}; "
              f"mean batch {res['mean_batch_requests']:.1f} req; mean {res['mean_ms']:.1f} ms = forward "
              f"{res['forward_ms']:.1f} (ours) + replica queue/batch wait {res['replica_wait_ms']:.1f} + "
              f"Serve proxy/HTTP/client {res['outside_replica_ms']:.1f}; replica forward busy "
              f"{100 * res['replica_busy']:.0f}% of wall time", flush=True)
    ratio = out["batched"]["req_s"] / max(out["unbatched"]["req_s"], 1e-9)
    out["batched_over_unbatched"] = ratio
    print(f"(a) throughput ratio batched / unbatched: {ratio:.2f}x", flush=True)
    return out


def part_b(url: str, handle, ckpt: Path, groups, args, threads: int) -> dict:
    import torch

    from rlhf_ray.reward.scorer import RewardScorer

    items = [{"prompt": p, "responses": rs} for p, rs in groups[:args.bulk_prompts]]
    n_items = sum(len(it["responses"]) for it in items)
    reps = max(1, args.bulk_requests)

    # In-process, same model and thread count as the replica.
    torch.set_num_threads(threads)
    scorer = RewardScorer(ckpt, max_length=args.max_length)
    scorer.score_groups(groups[:8])  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        scorer.score_groups([(it["prompt"], it["responses"]) for it in items])
        times.append(time.perf_counter() - t)
    in_process = n_items / min(times)  # best of reps: a conservative baseline on a shared machine

    # Through Serve, two requests in flight (the next one is parsed while the replica computes).
    replica_stats(handle, reset=True)
    t = time.perf_counter()
    pending = [handle.score_batch.remote(items) for _ in range(min(2, reps))]
    for i in range(reps):
        pending.pop(0).result(timeout_s=300)
        if i + len(pending) + 1 < reps:
            pending.append(handle.score_batch.remote(items))
    via_handle = reps * n_items / (time.perf_counter() - t)
    handle_stats = replica_stats(handle, reset=True)

    res = asyncio.run(closed_loop(url + "/score_batch", [{"items": items}], 2, 1e9, reps, n_items))
    http_stats = replica_stats(handle)
    in_replica = reps * n_items / max(http_stats["forward_s"], 1e-9)  # the replica's own forward rate
    out = {"items_per_request": n_items, "requests": reps, "in_process_items_s": in_process,
           "handle_items_s": via_handle, "http_items_s": res["items_s"], "http_errors": res["errors"],
           "http_fraction": res["items_s"] / in_process, "handle_fraction": via_handle / in_process,
           "replica_forward_items_s": in_replica, "replica_forward_s_handle": handle_stats["forward_s"],
           "replica_forward_s_http": http_stats["forward_s"], "torch_threads": threads}
    print(f"(b) bulk {len(items)} prompts x {args.responses} = {n_items} items/request, {reps} requests, 2 in "
          f"flight: in-process {in_process:.0f} items/s (best of {reps}); handle {via_handle:.0f} items/s "
          f"({100 * out['handle_fraction']:.0f}%); HTTP {res['items_s']:.0f} items/s "
          f"({100 * out['http_fraction']:.0f}%), errors {res['errors']}; the replica's forward alone "
          f"{in_replica:.0f} items/s (ours); torch threads {threads}", flush=True)
    return out


def malformed_bodies(cfg: ServeConfig) -> list[tuple[str, str, bytes, dict]]:
    """(method, path, body, headers) cases that must all get a 4xx."""
    j = {"Content-Type": "application/json"}
    enc = lambda o: json.dumps(o).encode()  # noqa: E731
    ok = ["a", "b"]
    return [
        ("POST", "/score", b"", j),
        ("POST", "/score", b"{", j),
        ("POST", "/score", b'{"prompt": "x", "responses": [', j),
        ("POST", "/score", b"\xff\xfe\x00garbage", j),
        ("POST", "/score", b"null", j),
        ("POST", "/score", b"[1, 2, 3]", j),
        ("POST", "/score", b'"just a string"', j),
        ("POST", "/score", b"[" * 5000 + b"]" * 5000, j),
        ("POST", "/score", b'{"prompt": NaN, "responses": ["a"]}', j),
        ("POST", "/score", enc({"prompt": "x", "responses": []}), j),
        ("POST", "/score", enc({"prompt": "x", "responses": ["r"] * (cfg.max_responses + 1)}), j),
        ("POST", "/score", enc({"prompt": "x", "responses": ["y" * (cfg.max_chars + 1)]}), j),
        ("POST", "/score", enc({"prompt": "p" * (cfg.max_chars + 1), "responses": ok}), j),
        ("POST", "/score", enc({"prompt": 3, "responses": ok}), j),
        ("POST", "/score", enc({"prompt": "x", "responses": "ab"}), j),
        ("POST", "/score", enc({"prompt": "x", "responses": [1, None, {}]}), j),
        ("POST", "/score", enc({"prompt": "x"}), j),
        ("POST", "/score", enc({"prompt": "x", "responses": ok, "extra": 1}), j),
        ("POST", "/score", enc({"prompt": "x", "responses": ok}), {"Content-Type": "text/plain"}),
        ("POST", "/score_batch", enc({"items": []}), j),
        ("POST", "/score_batch", enc({"items": [{"prompt": "x", "responses": ok}] * (cfg.max_prompts + 1)}), j),
        ("POST", "/score_batch", enc({"items": [{"prompt": "x", "responses": []}]}), j),
        ("POST", "/score_batch", enc({"items": {"prompt": "x"}}), j),
        ("GET", "/score", b"", {}),
        ("POST", "/healthz", b"", {}),
        ("POST", "/no/such/route", enc({"prompt": "x", "responses": ok}), j),
    ]


async def part_c_async(url: str, cfg: ServeConfig, groups, n_bad: int, clients: int) -> dict:
    import aiohttp

    bad = malformed_bodies(cfg)
    rng = random.Random(0)
    plan = [("bad", bad[i % len(bad)]) for i in range(n_bad)]
    plan += [("good", ("POST", "/score", json.dumps({"prompt": p, "responses": rs}).encode(),
                       {"Content-Type": "application/json"})) for p, rs in (groups * 4)[:n_bad]]
    rng.shuffle(plan)
    counts = {"5xx": 0, "bad_4xx": 0, "bad_other": 0, "good_200": 0, "good_other": 0, "exceptions": 0}
    queue = list(reversed(plan))

    async def client(session):
        while queue:
            kind, (method, path, body, headers) = queue.pop()
            try:
                async with session.request(method, url + path, data=body, headers=headers) as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientError:
                counts["exceptions"] += 1
                continue
            counts["5xx"] += status >= 500
            if kind == "bad":
                counts["bad_4xx" if 400 <= status < 500 else "bad_other"] += 1
            else:
                counts["good_200" if status == 200 else "good_other"] += 1

    t = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    counts.update(bad_sent=n_bad, good_sent=n_bad, seconds=time.perf_counter() - t)
    return counts


def part_c(url: str, handle, cfg: ServeConfig, groups, args) -> dict:
    import requests

    before = requests.get(url + "/version", timeout=10).json()
    out = asyncio.run(part_c_async(url, cfg, groups, args.malformed, 8))
    after = requests.get(url + "/version", timeout=10).json()
    out["healthy_after"] = requests.get(url + "/healthz", timeout=10).status_code == 200
    out["same_model_after"] = before["model_version"] == after["model_version"]
    print(f"(c) {out['bad_sent']} malformed + {out['good_sent']} good requests interleaved in "
          f"{out['seconds']:.1f} s: 5xx {out['5xx']}, malformed answered 4xx {out['bad_4xx']} "
          f"(other {out['bad_other']}), good answered 200 {out['good_200']} (other {out['good_other']}), "
          f"client exceptions {out['exceptions']}, healthy after {out['healthy_after']}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="an RM directory; default: the embedded model with a fresh head")
    ap.add_argument("--cache-dir", default=ModelConfig().cache_dir, help="where the embedded model is cached")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per (a) run (batched, unbatched)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--responses", type=int, default=4, help="responses per prompt")
    ap.add_argument("--max-requests", type=int, default=100_000, help="cap per (a) run")
    ap.add_argument("--bulk-prompts", type=int, default=256, help="prompts per bulk request in (b)")
    ap.add_argument("--bulk-requests", type=int, default=10, help="bulk requests per path in (b)")
    ap.add_argument("--malformed", type=int, default=1000, help="malformed requests in (c)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--num-cpus", type=float, default=0.5, help="CPUs reserved per replica")
    ap.add_argument("--batch-wait", type=float, default=ServeConfig().batch_wait_timeout_s,
                    help="@serve.batch batch_wait_timeout_s (serve.batch_wait_timeout_s)")
    ap.add_argument("--max-batch-size", type=int, default=ServeConfig().max_batch_size)
    ap.add_argument("--parts", default="abc", help="which parts to run")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    quiet_libraries()
    from rlhf_ray.reward.service import deploy_rm, shutdown_rm

    tmp = tempfile.TemporaryDirectory(prefix="serve_rm_bench_")
    ckpt = Path(args.checkpoint) if args.checkpoint else embedded_rm(Path(tmp.name) / "rm", args.cache_dir)
    cfg = replace(ServeConfig(), port=free_port(), num_cpus=args.num_cpus, batch_wait_timeout_s=args.batch_wait,
                  max_batch_size=args.max_batch_size,
                  max_prompts=max(ServeConfig().max_prompts, args.bulk_prompts),
                  max_responses=max(ServeConfig().max_responses, args.responses),
                  auth_token_env="RLHF_RAY_BENCH_NO_TOKEN")
    groups = workload(max(args.bulk_prompts, 64), args.responses)
    init_ray()
    results: dict = {"args": vars(args), "checkpoint": str(ckpt)}
    try:
        urls, handles = {}, {}
        for mode, prefix in (("batched", "/b"), ("unbatched", "/u")):
            if mode == "unbatched" and "a" not in args.parts:
                continue
            urls[mode], handles[mode] = deploy_rm(cfg, ckpt, args.max_length, name=f"rm_{mode}",
                                                  route_prefix=prefix, batching=mode == "batched")
        print(f"serving {ckpt} at {urls}; cfg max_batch_size={cfg.max_batch_size} "
              f"batch_wait_timeout_s={cfg.batch_wait_timeout_s} num_cpus={cfg.num_cpus}", flush=True)
        threads = replica_stats(handles["batched"])["torch_threads"]
        # Warm up both paths (first requests pay lazy initialisation).
        for mode in urls:
            asyncio.run(closed_loop(urls[mode] + "/score", [{"prompt": "x", "responses": ["a"]}], 2, 1.0, 20, 1))
        if "a" in args.parts:
            results["a"] = part_a(urls, handles, groups, args)
        if "b" in args.parts:
            results["b"] = part_b(urls["batched"], handles["batched"], ckpt, groups, args, threads)
        if "c" in args.parts:
            results["c"] = part_c(urls["batched"], handles["batched"], cfg, groups, args)
    finally:
        shutdown_rm()
        import ray

        ray.shutdown()
        tmp.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    ok = "c" not in results or (results["c"]["5xx"] == 0 and results["c"]["good_other"] == 0
                                and results["c"]["healthy_after"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
