"""RM training: a plain loop (usable in-process) and the per-worker function Ray Train runs.

The loop minimises the derivation's empirical risk, the mean over records of -log softmax(R)[best]
(``rlhf_ray.ops.listwise_rm_loss``), with DDP averaging gradients across workers.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_ray.config import RMConfig
from rlhf_ray.data.preferences import collate, read_jsonl
from rlhf_ray.models.reward import batch_rewards, init_reward_model, load_reward_model
from rlhf_ray.ops import expected_calibration_error, listwise_probs, listwise_rm_loss

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"


@dataclass(frozen=True)
class EvalMetrics:
    loss: float
    top1: float  # fraction of records where argmax R is the labelled best
    pairwise: float  # fraction of (best, other) pairs with R_best > R_other
    ece: float  # expected calibration error of P(y_i|x) against the labels
    chance: float  # mean 1/K: top-1 accuracy of a random guess
    records: int


@torch.no_grad()
def evaluate(model, tokenizer, records: list[dict], max_length: int, batch_size: int = 64) -> EvalMetrics:
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    losses, hits, pair_hits, pairs, probs_all, labels_all = [], 0, 0, 0, [], []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        batch = collate(chunk, tokenizer, max_length)
        rewards = batch_rewards(model, batch.to(device)).float().cpu()  # (B, Kmax); metrics on CPU
        losses.append(listwise_rm_loss(rewards, batch.valid, batch.best).item() * len(chunk))
        masked = rewards.masked_fill(~batch.valid, -math.inf)
        hits += (masked.argmax(-1) == batch.best).sum().item()
        r_best = rewards.gather(1, batch.best[:, None])  # (B, 1)
        others = batch.valid.clone()
        others[torch.arange(len(chunk)), batch.best] = False
        pair_hits += ((r_best > rewards) & others).sum().item()
        pairs += others.sum().item()
        probs = listwise_probs(rewards, batch.valid)
        labels = torch.zeros_like(probs)
        labels[torch.arange(len(chunk)), batch.best] = 1.0
        probs_all.append(probs[batch.valid])
        labels_all.append(labels[batch.valid])
    model.train(was_training)
    n = len(records)
    ece = float(expected_calibration_error(torch.cat(probs_all), torch.cat(labels_all)))
    chance = sum(1 / len(r["responses"]) for r in records) / n
    return EvalMetrics(sum(losses) / n, hits / n, pair_hits / max(1, pairs), ece, chance, n)


class MetricsLog:
    """Appends metrics to a JSONL file and, when tensorboard is installed, to TensorBoard."""

    def __init__(self, path: str | Path | None, purge_step: int | None = None):
        """``purge_step``: a resumed run's first new step; TensorBoard drops the earlier run's events
        from there on (they were logged after the checkpoint it resumes from)."""
        self.path = Path(path) if path else None
        self.tb = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=purge_step)
            except Exception:  # tensorboard is optional
                self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.path:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (its file and flush thread); JSONL lines need nothing."""
        if self.tb:
            self.tb.close()
            self.tb = None


def save_checkpoint(model, tokenizer, optimizer, state: dict, dest: Path) -> Path:
    """Model as a plain HF directory (safetensors) + trainer state; loadable without Ray."""
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    torch.save(optimizer.state_dict(), dest / OPTIM_FILE)
    (dest / STATE_FILE).write_text(json.dumps(state, indent=1))
    return dest


class RMTrainLoop:
    """The listwise RM training loop over one worker's shard; DDP-agnostic.

    ``model`` may be DDP-wrapped (Ray Train) or plain (in-process); ``rank``/``world`` pick the shard.
    """

    def __init__(self, cfg: RMConfig, model, tokenizer, train_records: list[dict], rank: int = 0,
                 world: int = 1, log=print):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.records, self.rank, self.world, self.log = train_records, rank, world, log
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # Every rank takes the same number of steps (DDP all-reduces on each backward).
        self.steps_per_epoch = len(train_records) // world // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"rm.batch_size={cfg.batch_size} x {world} workers exceeds the "
                             f"{len(train_records)} training records")

    def shard(self, epoch: int) -> list[dict]:
        order = list(range(len(self.records)))
        random.Random(self.cfg.seed + epoch).shuffle(order)  # same permutation on every rank
        per_rank = self.steps_per_epoch * self.cfg.batch_size
        return [self.records[i] for i in order[self.rank::self.world][:per_rank]]

    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        shard, bs = self.shard(epoch), self.cfg.batch_size
        device = next(self.model.parameters()).device  # Ray Train's prepare_model put it there
        total, samples, start = 0.0, 0, time.perf_counter()
        for step in range(self.steps_per_epoch):
            batch = collate(shard[step * bs:(step + 1) * bs], self.tokenizer, self.cfg.max_length).to(device)
            loss = listwise_rm_loss(batch_rewards(self.model, batch), batch.valid, batch.best)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            total += loss.item()
            samples += bs
            if self.rank == 0 and (step % 20 == 0 or step == self.steps_per_epoch - 1):
                rate = samples * self.world / (time.perf_counter() - start)
                self.log(f"[rm] epoch {epoch + 1} step {step + 1}/{self.steps_per_epoch} "
                         f"loss {loss.item():.4f} ({rate:.0f} records/s)")
        elapsed = time.perf_counter() - start
        return {"train_loss": total / self.steps_per_epoch, "epoch_seconds": elapsed,
                "records_per_s": samples * self.world / elapsed}


def _unwrap(model):
    return getattr(model, "module", model)


def ray_train_loop(loop_config: dict) -> None:
    """Per-worker entry point for ``TorchTrainer``: DDP, per-epoch eval, checkpoint, resume."""
    import ray.train
    import ray.train.torch

    cfg = RMConfig(**loop_config["rm"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    # Resume: Ray Train's own restore (worker failure) wins over an explicit resume_from.
    resume_dir, ray_ckpt = None, ray.train.get_checkpoint()
    if ray_ckpt is not None:
        resume_dir = Path(ray_ckpt.to_directory())
    elif cfg.resume_from:
        resume_dir = Path(cfg.resume_from)
    if resume_dir is not None:
        model, tokenizer = load_reward_model(resume_dir)
        state = json.loads((resume_dir / STATE_FILE).read_text())
    else:
        model, tokenizer = init_reward_model(loop_config["init_dir"], seed=cfg.seed)
        state = {"epoch": -1}
    model = ray.train.torch.prepare_model(model)
    train_records = read_jsonl(loop_config["train_path"])
    eval_records = read_jsonl(loop_config["eval_path"]) if rank == 0 else []
    loop = RMTrainLoop(cfg, model, tokenizer, train_records, rank, world)
    if resume_dir is not None and (resume_dir / OPTIM_FILE).exists():
        loop.optimizer.load_state_dict(torch.load(resume_dir / OPTIM_FILE, weights_only=True))
        if rank == 0:
            print(f"[rm] resumed from {resume_dir} after epoch {state['epoch'] + 1}")
    metrics_log = MetricsLog(loop_config.get("metrics_path") if rank == 0 else None)
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        train_stats = loop.train_epoch(epoch)
        metrics = {"epoch": epoch + 1, **train_stats}
        if rank == 0:
            ev = evaluate(_unwrap(model), tokenizer, eval_records, cfg.max_length)
            metrics.update({f"eval_{k}": v for k, v in asdict(ev).items()})
            metrics_log.write(epoch + 1, metrics)
            print(f"[rm] epoch {epoch + 1}/{cfg.epochs} eval loss {ev.loss:.4f} top1 {ev.top1:.3f} "
                  f"pairwise {ev.pairwise:.3f} ece {ev.ece:.3f} (chance {ev.chance:.3f})")
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(_unwrap(model), tokenizer, loop.optimizer, {"epoch": epoch, "metrics": metrics},
                                Path(tmp))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
