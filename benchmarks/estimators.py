"""Ablation of the advantage estimators and KL options on the synthetic task, compute-matched: every
arm samples the same number of responses per iteration (prompts x samples_per_prompt = 64).

    .venv/bin/python benchmarks/estimators.py --rm-dir runs/demo/rm/latest [--iterations 60] [--seeds 0 1 2]
                                              [--arms gae gae_beta grpo rloo reinforce_pp] [key=value ...]

Arms (on top of the demo's settings and any overrides; beta 0 but in gae_beta, as in the recorded table):
    gae           GAE-PPO with the reference KL in the reward (kl_coef 0.4) only (beta 0)
    gae_beta      the same plus the derivation's beta * KL(pi_old || pi_theta), beta 0.1: the default
    grpo          16 prompts x 4 samples, GRPO advantages, the reference KL as a loss term (0.04), none in the reward
    rloo          16 prompts x 4 samples, RLOO advantages, the reference KL in the reward (0.4)
    reinforce_pp  64 prompts x 1 sample, REINFORCE++ (gamma-1 returns, batch-whitened), KL in the reward (0.4)

For each arm and seed: the held-out gold reward (the synthetic task's hidden score) of samples before
and after PPO, the KL to the reference of the last batch, and the seconds per iteration (mean of
iterations 2..); then mean +- std over the seeds. The RM is fixed (``--rm-dir``, e.g. the demo's).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

ARMS = {
    "gae": {"beta": 0.0},
    "gae_beta": {"beta": 0.1},
    "grpo": {"advantage_estimator": "grpo", "samples_per_prompt": 4, "prompts_per_iteration": 16,
             "kl_coef": 0.0, "kl_loss_coef": 0.04, "beta": 0.0},
    "rloo": {"advantage_estimator": "rloo", "samples_per_prompt": 4, "prompts_per_iteration": 16, "beta": 0.0},
    "reinforce_pp": {"advantage_estimator": "reinforce_plus_plus", "beta": 0.0},
}


def run_arm(cfg, policy, rm_dir, out: Path, arm: str, seed: int) -> dict:
    from rlhf_ray.ppo.driver import run_ppo

    ppo = dataclasses.replace(cfg.ppo, seed=seed, checkpoint_every=0, **ARMS[arm])
    start = time.perf_counter()
    res = run_ppo(dataclasses.replace(cfg, ppo=ppo), policy, rm_dir, out / f"{arm}_{seed}", log=lambda *_: None,
                  eval_every=0)
    its = [h["iteration_seconds"] for h in res.history[1:]] or [res.history[0]["iteration_seconds"]]
    return {"before": res.eval_reward_before, "after": res.eval_reward_after, "kl": res.history[-1]["kl_ref"],
            "s_per_it": statistics.fmean(its), "wall": time.perf_counter() - start}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):+.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:+.3f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rm-dir", required=True)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--cache-dir", default=".cache/rlhf_ray")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from rlhf_ray.config import load_config
    from rlhf_ray.models.embedded import resolve_model
    from rlhf_ray.runtime import init_ray, quiet_libraries

    quiet_libraries()
    cfg = load_config(None, [f"model.cache_dir={args.cache_dir}", f"ppo.iterations={args.iterations}",
                             *args.overrides])
    init_ray(num_cpus=max(4, cfg.rollout.num_workers + 3))
    policy = Path(resolve_model(cfg.model, cfg.sft))
    out = Path(tempfile.mkdtemp(prefix="estimators_"))
    rows = {}
    for arm in args.arms:
        rows[arm] = [run_arm(cfg, policy, Path(args.rm_dir), out, arm, seed) for seed in args.seeds]
        r = rows[arm]
        per_seed = ", ".join(f"{x['after']:+.3f}" for x in r)
        print(f"{arm:<13} gold {mean_std([x['before'] for x in r])} -> {mean_std([x['after'] for x in r])}  "
              f"KL {mean_std([x['kl'] for x in r])}  s/it {mean_std([x['s_per_it'] for x in r])}  "
              f"(gold after, per seed: {per_seed})", flush=True)
    print(f"\n{args.iterations} iterations, 64 sampled responses per iteration, seeds {args.seeds}; mean ± std over seeds")
    print("| arm | gold before | gold after | KL to reference (last batch) | s / iteration |")
    print("|---|---|---|---|---|")
    for arm, r in rows.items():
        print(f"| {arm} | {mean_std([x['before'] for x in r])} | {mean_std([x['after'] for x in r])} | "
              f"{mean_std([x['kl'] for x in r])} | {mean_std([x['s_per_it'] for x in r])} |")


if __name__ == "__main__":
    main()
