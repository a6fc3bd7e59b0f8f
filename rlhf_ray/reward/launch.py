"""Launch RM training under Ray Train (``TorchTrainer``, DDP over ``rm.num_workers`` workers)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rlhf_ray.config import ConfigError, RMConfig
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


def train_rm(rm: RMConfig, init_dir: str | Path, train_path: Path, eval_path: Path,
             metrics_path: Path | None = None, name: str | None = None,
             storage_path: str | None = None) -> RMTrainResult:
    resume_dir, _ = rm_resume_point(rm)  # before Ray: a bad rm.resume_from fails here, naming the field
    rm = replace(rm, resume_from=str(resume_dir or ""))

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={
            "rm": asdict(rm), "init_dir": str(Path(init_dir).resolve()) if Path(init_dir).exists() else str(init_dir),
            "train_path": str(Path(train_path).resolve()), "eval_path": str(Path(eval_path).resolve()),
            "metrics_path": str(Path(metrics_path).resolve()) if metrics_path else None,
        },
        scaling_config=ScalingConfig(num_workers=rm.num_workers, use_gpu=rm.use_gpu,
                                     resources_per_worker={"CPU": rm.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=rm.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"RM training {name} produced no checkpoint (rm.epochs already done?)")
    # A remote checkpoint is downloaded beside the metrics (<output_dir>/rm), else under ./runs/rm.
    dest = (Path(metrics_path).resolve().parent if metrics_path else Path("runs/rm").resolve()) / "downloaded" / name
    return RMTrainResult(local_checkpoint_dir(result.checkpoint, dest), dict(result.metrics or {}),
                         Path(result.path))


def local_checkpoint_dir(checkpoint, dest: Path) -> Path:
    """A Ray Train checkpoint as a directory on this machine: its own path when it is on the local
    filesystem, else (``rm.storage_path`` on S3, GCS, ...) downloaded into ``dest``/<its name>, as the
    ``latest`` link, ``serve-rm`` and PPO read a local directory."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    local = dest / Path(checkpoint.path).name
    return Path(checkpoint.to_directory(str(local)))
