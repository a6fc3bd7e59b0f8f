"""What a PPO run records: the held-out evaluation, each iteration's metrics (a line of
``metrics.jsonl``) and the lines it prints."""

from __future__ import annotations

import time

from rlhf_ray.config import PPOConfig
from rlhf_ray.data.prompts import EVAL_SEED
from rlhf_ray.ppo import refs


def evaluate(worker, scorer, held_out: list, ppo: PPOConfig) -> dict:
    """Mean eval reward (``ppo.eval_reward``; NaN without one) and RM reward (absent without an RM) of
    samples of the held-out prompts from rollout ``worker``, with a fixed sampling seed."""
    t = time.perf_counter()
    ro = worker.generate.remote(held_out, ppo.max_new_tokens, ppo.temperature, ppo.top_p, EVAL_SEED)
    s = refs.get_small(scorer.summary.remote(ro))
    return {"eval_reward": s["eval_reward"], **({"eval_rm_score": s["rm_score"]} if "rm_score" in s else {}),
            "eval_response_len": s["response_len"],
            "eval_truncated_frac": s["truncated_frac"], "eval_policy_version": s["policy_version"],
            **({"eval_tool_calls": s["tool_calls"]} if "tool_calls" in s else {}),  # per sample (multi-turn)
            "eval_examples": s["examples"], "eval_seconds": time.perf_counter() - t}


def iteration_metrics(iteration: int, stats: dict, evaluation: dict, sync: dict, num_workers: int,
                      seconds: float) -> dict:
    """One line of metrics.jsonl: the learner's ``stats`` (rollout, scoring, advantage and PPO epochs
    of the batch), the held-out ``evaluation`` if this iteration ran one, the weight ``sync``'s metrics
    (WeightSync.check), and throughput derived from them."""
    return {
        "iteration": iteration, **stats, **{k: v for k, v in evaluation.items() if k != "eval_examples"},
        "num_workers": num_workers,
        "learn_seconds": stats["evaluate_seconds"] + stats["advantage_seconds"] + stats["train_seconds"],
        **sync,
        **_rate("rollout", stats["gen_tokens"], stats["gen_seconds"]),
        **_rate("score", stats["total_tokens"], stats["score_seconds"]),
        **_rate("evaluate", stats["total_tokens"], stats["evaluate_seconds"]),
        **_rate("advantage", stats["total_tokens"], stats["advantage_seconds"]),
        "iteration_seconds": seconds,
    }


def _rate(stage: str, tokens: float, seconds: float) -> dict:
    """``{"<stage>_tokens_per_s": tokens / seconds}``, or nothing for a stage that did not run this
    iteration (no pi_old or reference pass, say): a rate over ~0 s would be meaningless."""
    return {f"{stage}_tokens_per_s": tokens / seconds} if seconds > 1e-6 else {}


def _held_out(m: dict) -> str:
    """The held-out numbers of an evaluated iteration (``m``: an evaluation's keys), "" otherwise: eval
    reward (NaN without an eval function) and RM reward (absent without an RM)."""
    ev, rm = m.get("eval_reward", float("nan")), m.get("eval_rm_score")
    parts = [f"eval {ev:+.3f}" if ev == ev else "", f"rm {rm:+.3f}" if rm is not None else ""]
    return " ".join(p for p in parts if p)


def progress_line(m: dict, iterations: int, left: str = "") -> str:
    """An iteration's line; ``left``: how long the rest of the run should take (progress.eta)."""
    held_out = _held_out(m)
    held_out = f"(held-out: {held_out}) " if held_out else ""
    rm = f"rm {m['rm_score']:+.3f} " if "rm_score" in m else ""
    kl = f"kl_ref {m['kl_ref']:.3f} " if "kl_ref" in m else ""
    return (f"[ppo] it {m['iteration']}/{iterations} v{m['policy_version']} "
            f"reward {m['reward']:+.3f} {rm}{held_out}"
            f"{kl}| pg {m['policy_loss']:+.4f} vf {m['value_loss']:.4f} "
            f"clip {m['clip_frac']:.3f} ent {m['entropy']:.2f} | gen {m['gen_seconds']:.2f}s "
            f"score {m['score_seconds']:.2f}s learn {m['learn_seconds']:.2f}s sync {m['sync_seconds']:.3f}s "
            f"drift {m['drift']:.1e} | {m['iteration_seconds']:.1f}s workers {m['num_workers']} "
            f"lag {m['version_lag']}{f' | {left}' if left else ''}")


def before_line(before: dict, has_eval_reward: bool) -> str:
    evaluated = f"eval reward {before['eval_reward']:+.3f} " if has_eval_reward else ""
    rm = f"rm {before['eval_rm_score']:+.3f} " if "eval_rm_score" in before else ""
    return f"[ppo] before: held-out {evaluated}{rm}e.g. {before['eval_examples'][0]!r}"


def done_line(seconds: float, before: dict, after: dict, history: list[dict], has_eval_reward: bool,
              policy, plot) -> str:
    parts = [f"eval reward {before['eval_reward']:+.3f} -> {after['eval_reward']:+.3f}" if has_eval_reward else "",
             f"rm {before['eval_rm_score']:+.3f} -> {after['eval_rm_score']:+.3f}" if "eval_rm_score" in before else "",
             f"kl_ref {history[-1]['kl_ref']:.3f}" if history and "kl_ref" in history[-1] else ""]
    said = ", ".join(p for p in parts if p)
    return f"[ppo] done in {seconds:.0f}s: held-out {said}; policy {policy}, plot {plot}"


def describe_estimator(ppo: PPOConfig) -> str:
    """The run's advantage estimator, samples per prompt, value head, loss type and KL terms, in words."""
    n = f"{ppo.samples_per_prompt} sample{'s' if ppo.samples_per_prompt > 1 else ''} per prompt"
    kl = ", ".join(x for x in (f"reference KL in the reward x {ppo.kl_coef:g}" if ppo.kl_coef else "",
                               f"reference KL in the loss x {ppo.kl_loss_coef:g}" if ppo.kl_loss_coef else "",
                               f"KL(pi_old || pi_theta) x {ppo.beta:g}" if ppo.beta else "") if x) or "no KL term"
    critic = "a value head (c1 x L_V)" if ppo.critic else "no value head, no value loss"
    high = ppo.clip_eps_high or ppo.clip_eps
    loss = (f"loss {ppo.loss_type} ({ppo.importance_sampling_level} ratio, clip [{1 - ppo.clip_eps:g}, "
            f"{high if ppo.loss_type == 'cispo' else 1 + high:g}])")
    extras = [f"truncated IS at {ppo.tis_cap:g}" if ppo.tis_cap else "",
              f"dynamic sampling (<= {ppo.dynamic_sampling_max_rounds} extra rounds)" if ppo.dynamic_sampling_max_rounds
              else "", f"overlong buffer {ppo.overlong_buffer}" if ppo.overlong_buffer else "",
              "truncated responses masked" if ppo.mask_truncated_completions else ""]
    return ", ".join([f"{ppo.advantage_estimator}, {n}, {critic}; {loss}", *[x for x in extras if x]]) + f"; {kl}"
