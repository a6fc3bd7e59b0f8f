"""RM training: a plain loop (usable in-process) and the per-worker function Ray Train runs.

The loop minimises the derivation's empirical risk, the mean over records of -log softmax(R)[best]
(``rlhf_ray.ops.listwise_rm_loss``), with DDP averaging gradients across workers.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_ray.config import RMConfig
from rlhf_ray.data.chat import ChatRenderer
from rlhf_ray.data.preferences import as_renderer, collate
from rlhf_ray.models.reward import (DEFAULT_MAX_LENGTH, batch_rewards, init_reward_model, load_reward_model,
                                    save_rm_settings)
from rlhf_ray.ops import expected_calibration_error, listwise_probs, listwise_rm_loss
from rlhf_ray.progress import eta

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
    """Held-out metrics; ``tokenizer``: a tokenizer or a ChatRenderer (how chat records render)."""
    was_training, device = model.training, next(model.parameters()).device
    renderer = as_renderer(tokenizer)
    model.eval()
    losses, hits, pair_hits, pairs, probs_all, labels_all = [], 0, 0, 0, [], []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        batch = collate(chunk, renderer, max_length)
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

    def write(self, step: int, metrics: dict) -> dict:
        """Append one row; returns it (``step``, ``time`` and the metrics) as written."""
        row = {"step": step, "time": time.time(), **metrics}
        if not self.path:
            return row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        return row

    def close(self) -> None:
        """Close the TensorBoard writer (its file and flush thread); JSONL lines need nothing."""
        if self.tb:
            self.tb.close()
            self.tb = None


def resumed_metrics(state: dict, metrics_path: str | Path | None) -> list[dict]:
    """The metrics rows a run resumed from a checkpoint with trainer ``state`` keeps: epochs 1..state's
    epoch + 1. They are the checkpoint's own ``history``; a checkpoint without one (written before it was
    kept) takes the newest row of each of those epochs from ``metrics_path``, when it exists."""
    done = state["epoch"] + 1
    if "history" in state:
        return [r for r in state["history"] if r["epoch"] <= done]
    path = Path(metrics_path) if metrics_path else None
    if path is None or not path.is_file():
        return []
    newest = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and 1 <= row["epoch"] <= done:
                newest[row["epoch"]] = row
    return [newest[e] for e in sorted(newest)]


def reset_metrics_log(metrics_path: str | Path | None, rows: list[dict], epochs_done: int) -> MetricsLog:
    """A run's MetricsLog: ``metrics_path`` rewritten to ``rows`` (empty for a fresh run), TensorBoard
    purging from the first new step (``epochs_done`` + 1; 0 for a fresh run), so that neither keeps what
    an earlier run, or this run's failed attempt, logged in the same place after that point."""
    if metrics_path:
        path = Path(metrics_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return MetricsLog(metrics_path, purge_step=epochs_done + 1 if epochs_done else 0)


def save_checkpoint(model, tokenizer, optimizer, state: dict, dest: Path, max_length: int = DEFAULT_MAX_LENGTH) -> Path:
    """Model as a plain HF directory (safetensors) + trainer state; loadable without Ray. ``max_length``:
    rm.max_length, saved beside the weights (``save_rm_settings``) for scoring to read back."""
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    save_rm_settings(dest, max_length)
    torch.save(optimizer.state_dict(), dest / OPTIM_FILE)
    (dest / STATE_FILE).write_text(json.dumps(state, indent=1))
    return dest


def shard_sizes(n: int, world: int) -> list[int]:
    """Records of each rank's shard when rank r takes every ``world``-th record from r: ceil((n - r) / world)."""
    return [len(range(r, n, world)) for r in range(world)]


def step_sizes(sizes: list[int], batch_size: int, step: int) -> list[int]:
    """Records each rank takes at ``step`` (0-based): a full batch, the shard's short last one, or 0."""
    return [max(0, min(batch_size, s - step * batch_size)) for s in sizes]


def rank_loss_scale(world: int, step_records: int) -> float:
    """Factor on a rank's SUM of per-sample losses so that DDP's gradient average over ``world`` ranks
    is the gradient of the mean loss over the ``step_records`` samples of the step (all ranks):
    (1/world) * sum_r world * S_r / n = sum_r S_r / n."""
    return world / step_records


class RMTrainLoop:
    """The listwise RM training loop over one worker's shard; DDP-agnostic.

    ``model`` may be DDP-wrapped (Ray Train) or plain (in-process); ``rank``/``world`` pick the shard;
    ``tokenizer`` may be a ChatRenderer (how chat records render; a tokenizer renders with its own template).
    Every record is used once per epoch: rank r's shard is every ``world``-th record of the epoch's
    permutation from r, and every rank takes ceil(largest shard / batch_size) steps (DDP all-reduces on
    each backward, so all ranks must join every step); a shard's last batch may be short or empty.
    """

    def __init__(self, cfg: RMConfig, model, tokenizer, train_records: list[dict], rank: int = 0,
                 world: int = 1, log=print):
        self.cfg, self.model, self.renderer = cfg, model, as_renderer(tokenizer)
        self.records, self.rank, self.world, self.log = train_records, rank, world, log
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=True)  # (one pass per tensor: the fastest on CPU and GPU)
        if not train_records:
            raise ValueError("no training records")
        self.shard_sizes = shard_sizes(len(train_records), world)
        self.steps_per_epoch = math.ceil(max(self.shard_sizes) / cfg.batch_size)

    def shard(self, epoch: int) -> list[dict]:
        order = list(range(len(self.records)))
        random.Random(self.cfg.seed + epoch).shuffle(order)  # same permutation on every rank
        return [self.records[i] for i in order[self.rank::self.world]]

    def step_loss(self, shard: list[dict], step: int, device=None) -> tuple[torch.Tensor, float, int]:
        """(loss to backpropagate, sum of this rank's per-sample losses, its sample count) at ``step``.

        The loss is scaled by ``rank_loss_scale`` so that DDP's average of the ranks' gradients is the
        gradient of the mean over all the step's samples. A rank with no records left still runs a
        forward and backward (on one record, weight 0): DDP needs every rank in every all-reduce.
        """
        bs = self.cfg.batch_size
        chunk = shard[step * bs:(step + 1) * bs]
        step_records = sum(step_sizes(self.shard_sizes, bs, step))
        batch = collate(chunk or self.records[:1], self.renderer, self.cfg.max_length).to(device)
        mean = listwise_rm_loss(batch_rewards(self.model, batch), batch.valid, batch.best)
        if not chunk:
            return mean * 0.0, 0.0, 0
        total = mean * len(chunk)
        return total * rank_loss_scale(self.world, step_records), total.item(), len(chunk)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over every record; ``train_loss`` is the mean per-sample loss over all ranks' records
        (all-reduced when torch.distributed is initialised)."""
        self.model.train()
        shard = self.shard(epoch)
        device = next(self.model.parameters()).device  # Ray Train's prepare_model put it there
        loss_sum, samples, start = 0.0, 0, time.perf_counter()
        for step in range(self.steps_per_epoch):
            loss, step_sum, n = self.step_loss(shard, step, device)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            loss_sum += step_sum
            samples += n
            if self.rank == 0 and ((step + 1) % max(1, self.steps_per_epoch // 4) == 0
                                   or step == self.steps_per_epoch - 1):
                elapsed, steps = time.perf_counter() - start, self.steps_per_epoch
                left = eta(step + 1, steps + (self.cfg.epochs - epoch - 1) * steps, elapsed)  # at this epoch's rate
                self.log(f"[rm] epoch {epoch + 1} step {step + 1}/{steps} loss {step_sum / max(n, 1):.4f} "
                         f"({samples * self.world / elapsed:.0f} records/s, {left})")
        loss_sum, samples = all_reduce_sums(loss_sum, samples, device, self.world)
        elapsed = time.perf_counter() - start
        return {"train_loss": loss_sum / samples, "train_records": samples, "epoch_seconds": elapsed,
                "records_per_s": samples / elapsed}


def all_reduce_sums(loss_sum: float, count: int, device, world: int) -> tuple[float, int]:
    """(sum, count) summed over the ranks when torch.distributed runs ``world`` > 1 ranks, else as given."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return loss_sum, count
    t = torch.tensor([loss_sum, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0]), int(round(float(t[1])))


def _unwrap(model):
    return getattr(model, "module", model)


def dataset_records(name: str) -> list[dict]:
    """The records Ray Train hands this worker as dataset ``name`` (``get_dataset_shard``): the whole
    set, in order (see ``launch.record_datasets``); each row holds one record as JSON."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    return [json.loads(row["record"]) for row in shard.iter_rows()]


def ray_train_loop(loop_config: dict) -> None:
    """Per-worker entry point for ``TorchTrainer``: DDP, per-epoch eval, checkpoint, resume.
    Records come from Ray Data (datasets "train" and "eval", unsplit: :class:`RMTrainLoop` takes this
    rank's share, every record once per epoch)."""
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
    renderer = ChatRenderer(tokenizer, loop_config.get("chat_template", "auto"))
    renderer.apply_to()  # a Jinja template goes into the checkpoint's tokenizer: served the same way
    model = ray.train.torch.prepare_model(model)
    train_records = dataset_records("train")
    eval_records = dataset_records("eval") if rank == 0 else []
    loop = RMTrainLoop(cfg, model, renderer, train_records, rank, world)
    if resume_dir is not None and (resume_dir / OPTIM_FILE).exists():
        loop.optimizer.load_state_dict(torch.load(resume_dir / OPTIM_FILE, weights_only=True))
        if rank == 0:
            print(f"[rm] resumed from {resume_dir} after epoch {state['epoch'] + 1}")
    history, metrics_log = [], MetricsLog(None)
    if rank == 0:  # metrics.jsonl and TensorBoard hold this run only (up to the checkpoint when resumed)
        history = resumed_metrics(state, loop_config.get("metrics_path")) if resume_dir is not None else []
        metrics_log = reset_metrics_log(loop_config.get("metrics_path"), history, state["epoch"] + 1)
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        train_stats = loop.train_epoch(epoch)
        metrics = {"epoch": epoch + 1, **train_stats}
        if rank == 0:
            ev = evaluate(_unwrap(model), renderer, eval_records, cfg.max_length)
            metrics.update({f"eval_{k}": v for k, v in asdict(ev).items()})
            history.append(metrics_log.write(epoch + 1, metrics))
            print(f"[rm] epoch {epoch + 1}/{cfg.epochs} eval loss {ev.loss:.4f} top1 {ev.top1:.3f} "
                  f"pairwise {ev.pairwise:.3f} ece {ev.ece:.3f} (chance {ev.chance:.3f})")
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(_unwrap(model), tokenizer, loop.optimizer,
                                {"epoch": epoch, "metrics": metrics, "history": history}, Path(tmp), cfg.max_length)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
    metrics_log.close()
