"""Launch RM training under Ray Train (``TorchTrainer``, DDP over ``rm.num_workers`` workers)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rlhf_ray.config import ConfigError, RMConfig
from rlhf_ray.data.files import DataError
from rlhf_ray.private import make_private, private_dir
from rlhf_ray.reward.train import STATE_FILE, ray_train_loop


@dataclass(frozen=True)
class RMTrainResult:
    checkpoint_dir: Path  # an HF model directory (safetensors) + trainer state
    metrics: dict  # rank 0's last report
    run_dir: Path


def rm_resume_point(rm: RMConfig) -> tuple[Path | None, dict | None]:
    """(absolute checkpoint directory, its trainer state) that ``rm.resume_from`` names, checked on the
    driver; (None, None) when starting fresh. Ray Train runs each worker in its own directory, so a
    relative path must become absolute here. Raises ConfigError naming rm.resume_from or the file."""
    if not rm.resume_from:
        return None, None
    ckpt = Path(rm.resume_from).expanduser().resolve()
    if not ckpt.is_dir():
        raise ConfigError(f"rm.resume_from: {ckpt} does not exist or is not a directory")
    state_file = ckpt / STATE_FILE
    if not state_file.is_file() or not list(ckpt.glob("model*.safetensors")):
        raise ConfigError(f"rm.resume_from: {ckpt} is not an RM checkpoint (needs {STATE_FILE} and "
                          f"model.safetensors)")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{state_file}: not valid JSON ({e})") from None
    epoch = state.get("epoch") if isinstance(state, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < -1:
        raise ConfigError(f"{state_file}: 'epoch' must be an integer >= -1, got {epoch!r}")
    if epoch + 1 >= rm.epochs:
        raise ConfigError(f"rm.resume_from: {ckpt} is at epoch {epoch + 1}; set rm.epochs above {epoch + 1} "
                          f"to train on from it (now {rm.epochs})")
    return ckpt, state


def check_renderable(records: list[dict], tokenizer_dir: str | Path, chat_template: str, where: str) -> None:
    """Fail on the driver (DataError naming ``where``) when the first chat record cannot be rendered:
    no chat template for it."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.chat import ChatRenderer, is_chat

    first = next((r for r in records if is_chat(r["prompt"])), None)
    if first is None:
        return
    try:
        ChatRenderer(AutoTokenizer.from_pretrained(str(tokenizer_dir)), chat_template).pair_text(
            first["prompt"], first["responses"][0])
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


def record_datasets(records: dict[str, list[dict]]) -> dict:
    """Ray Data datasets of validated records (name -> records), one JSON string per row, in order.
    Ray Train hands them to every worker whole (``get_dataset_shard``), so no worker reads a path:
    the output directory needs no shared storage, and each worker takes its share of every epoch."""
    import ray.data

    ctx = ray.data.DataContext.get_current()  # the datasets carry it to the workers
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = ctx.print_on_execution_start = False
    return {name: ray.data.from_items([{"record": json.dumps(r)} for r in recs]) for name, recs in records.items()}


def train_rm(rm: RMConfig, init_dir: str | Path, train_path: Path, eval_path: Path,
             metrics_path: Path | None = None, name: str | None = None,
             storage_path: str | None = None, chat_template: str = "auto") -> RMTrainResult:
    """``chat_template``: ``auto``, ``none`` or Jinja source (``rlhf_ray.data.chat.resolve_chat_template``)."""
    resume_dir, _ = rm_resume_point(rm)  # before Ray: a bad rm.resume_from fails here, naming the field
    rm = replace(rm, resume_from=str(resume_dir or ""))

    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rlhf_ray.runtime import train_log_level

    need = rm.num_workers * rm.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise ConfigError(f"rm.num_workers={rm.num_workers} x rm.cpus_per_worker={rm.cpus_per_worker} "
                          f"needs {need} CPUs but the Ray cluster has {have}")
    if rm.use_gpu and ray.cluster_resources().get("GPU", 0) < rm.num_workers:
        raise ConfigError(f"rm.use_gpu: {rm.num_workers} GPUs needed, the Ray cluster has "
                          f"{ray.cluster_resources().get('GPU', 0)}")
    # A unique name: the same storage_path + name would silently resume an older run.
    name = name or f"rm-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}"
    storage = storage_path or rm.storage_path or "runs/rm"
    if "://" not in storage:  # checkpoints (the RM's weights) only its owner can read: rlhf_ray.private
        storage = str(private_dir(Path(storage).resolve()))
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    from rlhf_ray.data.preferences import read_preferences

    # Local files are read here, remote URIs (s3://, gs://, ...) with Ray Data; both checked record by record.
    records = {"train": read_preferences(str(train_path)), "eval": read_preferences(str(eval_path))}
    init = str(Path(init_dir).resolve()) if Path(init_dir).exists() else str(init_dir)
    for split, path in (("train", train_path), ("eval", eval_path)):
        check_renderable(records[split], resume_dir or init, chat_template, str(path))
    datasets = record_datasets(records)
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={
            "rm": asdict(rm), "init_dir": init, "chat_template": chat_template,
            "metrics_path": str(Path(metrics_path).resolve()) if metrics_path else None,
        },
        # Not split by Ray Data: streaming_split(equal=True) would drop a remainder of records.
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        scaling_config=ScalingConfig(num_workers=rm.num_workers, use_gpu=rm.use_gpu,
                                     resources_per_worker={"CPU": rm.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=rm.max_failures),
                             logging_config=LoggingConfig(log_level=train_log_level())),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"RM training {name} produced no checkpoint (rm.epochs already done?)")
    # A remote checkpoint is downloaded beside the metrics (<output_dir>/rm), else under ./runs/rm.
    dest = (Path(metrics_path).resolve().parent if metrics_path else Path("runs/rm").resolve()) / "downloaded" / name
    local = local_checkpoint_dir(result.checkpoint, dest)
    if "://" not in storage:
        make_private(result.path)  # its files too (Ray Train copies checkpoints with the umask's modes)
    return RMTrainResult(make_private(local), dict(result.metrics or {}), Path(result.path))


def local_checkpoint_dir(checkpoint, dest: Path) -> Path:
    """A Ray Train checkpoint as a directory on this machine: its own path when it is on the local
    filesystem, else (``rm.storage_path`` on S3, GCS, ...) downloaded into ``dest``/<its name>, as the
    ``latest`` link, ``serve-rm`` and PPO read a local directory."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    local = dest / Path(checkpoint.path).name
    return Path(checkpoint.to_directory(str(local)))
