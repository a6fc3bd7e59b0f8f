"""Held-out accuracy per iteration of several runs of this example, as a table and a PNG.

    .venv/bin/python examples/arithmetic/plot.py runs/arithmetic-s0 runs/arithmetic-s1 [--out FILE.png]

Each argument is a run's output_dir (its ppo/metrics.jsonl: eval_reward is the held-out accuracy of
sampled answers, at iteration 0 before any training); the label is the directory's name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r.get("iteration", 0), r["eval_reward"]) for r in rows if "eval_reward" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("accuracy.png"))
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in args.runs:
        points = curve(run)
        ax.plot([i for i, _ in points], [a for _, a in points], "o-", label=run.name)
        print(f"{run.name}: held-out accuracy {points[0][1]:.3f} (before) -> {points[-1][1]:.3f} "
              f"(iteration {points[-1][0]}); " + " ".join(f"{i}:{a:.3f}" for i, a in points))
    ax.set(xlabel="iteration", ylabel="held-out accuracy (64 sums, sampled)", ylim=(0, 1),
           title="SmolLM2-135M-Instruct learning a + b with GRPO (no RM)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
