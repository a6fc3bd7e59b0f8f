"""PNG of a PPO run's curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path


def plot_ppo(history: list[dict], path: str | Path, before: dict | None = None, eval_name: str = "") -> Path:
    """Four panels from the per-iteration metrics: held-out eval reward (``eval_name``, the
    ``ppo.eval_reward`` function; none drawn without one) and RM reward per iteration; the same against
    KL(pi || pi_ref) (reward-vs-KL frontier, the RM over-optimisation view); losses; and the time per
    stage. ``before``: the initial policy's held-out evaluation (drawn at x = 0, KL 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(key):
        return [h.get(key, math.nan) for h in history]

    it = col("iteration")
    label = f"eval: {eval_name.rpartition(':')[2]} (held-out)"
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    a = ax[0][0]
    has_rm = any("eval_rm_score" in h for h in [before or {}, *history])
    x0, ev0, rm0 = ([0], [before["eval_reward"]], [before.get("eval_rm_score", math.nan)]) if before else ([], [], [])
    if eval_name:
        a.plot(x0 + it, ev0 + col("eval_reward"), "o-", label=label)
    if has_rm:
        a.plot(x0 + it, rm0 + col("eval_rm_score"), "s--", label="RM (held-out)")
    a.plot(it, col("reward"), ":", alpha=0.6, label="reward (train batch)")
    a.set(xlabel="iteration", ylabel="reward", title="reward per iteration")
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=8)

    a = ax[0][1]
    # Per-batch KL is noisy (k1 on one batch): points coloured by iteration, no connecting lines.
    kl = ([0.0] if before else []) + col("kl_ref")
    order = x0 + it
    if eval_name:
        a.scatter(kl, ev0 + col("eval_reward"), c=order, cmap="Blues", marker="o", edgecolors="C0", label=label)
    if has_rm:
        a.scatter(kl, rm0 + col("eval_rm_score"), c=order, cmap="Oranges", marker="s", edgecolors="C1",
                  label="RM (held-out)")
    a.set(xlabel="KL(pi || pi_ref) per sequence, nats (train batch)", ylabel="reward",
          title="reward vs KL to reference (darker = later)")
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=8)

    a = ax[1][0]
    for key in ("policy_loss", "value_loss", "clip_frac", "entropy", "kl_old"):
        a.plot(it, col(key), label=key)
    a.set(xlabel="iteration", title="PPO statistics")
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=8)

    a = ax[1][1]
    for key in ("gen_seconds", "score_seconds", "reference_seconds", "evaluate_seconds", "advantage_seconds",
                "train_seconds", "sync_seconds", "eval_seconds", "iteration_seconds"):
        a.plot(it, col(key), label=key.replace("_seconds", ""))
    a.set(xlabel="iteration", ylabel="seconds", title="time per stage")
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=8)

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
