"""The stages as functions the CLI (and the demo) call: model -> data -> RM under Ray Train -> ...

Each stage writes under ``cfg.output_dir`` and returns what the next stage needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhf_ray.config import Config
from rlhf_ray.data import synthetic
from rlhf_ray.data.chat import resolve_chat_template
from rlhf_ray.data.prepare import prepare_preference_data
from rlhf_ray.data.preferences import read_preferences
from rlhf_ray.models.embedded import resolve_model


def policy_stage(cfg: Config, log=print) -> Path | str:
    """The starting policy: the embedded model built and SFT'd (cached), or the configured HF model."""
    return resolve_model(cfg.model, cfg.sft, log=log)


@dataclass(frozen=True)
class RMStageResult:
    checkpoint_dir: Path
    eval: dict  # final held-out metrics (eval_top1, eval_pairwise, eval_ece, eval_chance, ...)
    gold_ceiling: float | None  # gold reward's own top-1 accuracy on the same noisy labels (synthetic only)
    metrics_path: Path


def rm_stage(cfg: Config, policy_dir: Path | str, log=print) -> RMStageResult:
    """Prepare preference data, train the RM under Ray Train, report accuracy vs chance and ceiling."""
    from rlhf_ray.reward.launch import train_rm

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    template = resolve_chat_template(cfg.data.chat_template)
    train_path, eval_path = prepare_preference_data(cfg.data, out / "data", check=False)  # train_rm reads them
    metrics_path = out / "rm" / "metrics.jsonl"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"[rm] training on {train_path} ({cfg.rm.num_workers} Ray Train workers, {cfg.rm.epochs} epochs)")
    storage = cfg.rm.storage_path or str(out / "rm" / "ray_runs")
    result = train_rm(cfg.rm, policy_dir, train_path, eval_path, metrics_path=metrics_path, storage_path=storage,
                      chat_template=template)
    ceiling = synthetic.gold_top1_accuracy(read_preferences(eval_path)) if not cfg.data.train_path else None
    summary = {"checkpoint": str(result.checkpoint_dir), **result.metrics, "gold_ceiling_top1": ceiling}
    (out / "rm" / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "rm" / "latest").unlink(missing_ok=True)
    (out / "rm" / "latest").symlink_to(result.checkpoint_dir)
    return RMStageResult(result.checkpoint_dir, result.metrics, ceiling, metrics_path)


def rm_table(res: RMStageResult) -> str:
    m = res.eval
    rows = [("trained RM (held-out top-1)", m.get("eval_top1")),
            ("chance (mean 1/K)", m.get("eval_chance"))]
    if res.gold_ceiling is not None:
        rows.append(("gold reward on the same noisy labels (ceiling)", res.gold_ceiling))
    lines = [f"{'':48s} top-1 accuracy"]
    lines += [f"{name:48s} {value:.3f}" for name, value in rows if value is not None]
    lines.append(f"{'RM pairwise accuracy / ECE':48s} {m.get('eval_pairwise', float('nan')):.3f} / "
                 f"{m.get('eval_ece', float('nan')):.3f}")
    return "\n".join(lines)


def plot_rm_curves(metrics_path: Path, dest: Path, ceiling: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train loss")
    a.plot(epochs, [r["eval_loss"] for r in rows], "o-", label="held-out loss")
    a.set_xlabel("epoch"), a.legend(), a.set_title("listwise RM loss")
    b.plot(epochs, [r["eval_top1"] for r in rows], "o-", label="RM top-1")
    b.axhline(rows[-1]["eval_chance"], color="gray", ls="--", label="chance")
    if ceiling is not None:
        b.axhline(ceiling, color="green", ls="--", label="gold ceiling")
    b.set_xlabel("epoch"), b.set_ylim(0, 1), b.legend(), b.set_title("held-out accuracy")
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)
    return dest


def demo_serve_query(url: str, token_env: str) -> str:
    """One real HTTP request to the deployed RM, shown the way a user would send it."""
    import json as _json
    import os

    import requests

    token = os.environ.get(token_env)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"prompt": "review of the kettle :",
            "responses": ["the spout is great and the handle is solid .", "the switch is broken .",
                          "the keyboard is lovely ."]}
    r = requests.post(f"{url}/score", json=body, headers=headers, timeout=30)
    r.raise_for_status()
    return f"POST {url}/score {_json.dumps(body)}\n -> {_json.dumps(r.json())}"


def ppo_table(res) -> str:
    """Held-out eval reward (``ppo.eval_reward``; the synthetic task's gold reward by default) and RM
    reward of the policy before and after PPO (res: rlhf_ray.ppo.driver.PPOResult)."""
    b, a = res.before, res.after
    last = res.history[-1] if res.history else {}
    name = f"eval reward ({res.eval_reward_name})" if res.eval_reward_name else ""
    width = max(30, len(name))
    lines = [f"{'held-out prompts':{width}s} {'before PPO':>11s} {'after PPO':>10s}"]
    if name:
        lines.append(f"{name:{width}s} {b['eval_reward']:+11.3f} {a['eval_reward']:+10.3f}")
    if "eval_rm_score" in b:  # (a run without an RM has none)
        lines.append(f"{'RM reward':{width}s} {b['eval_rm_score']:+11.3f} {a['eval_rm_score']:+10.3f}")
    if "kl_ref" in last:
        lines.append(f"{'KL to reference (last batch)':{width}s} {0.0:11.3f} {last['kl_ref']:10.3f}")
    lines.append(f"PPO took {res.seconds:.0f} s; policy saved to {res.policy_dir}")
    return "\n".join(lines)
