"""Launch RM training under Ray Train (``TorchTrainer``, DDP over ``rm.num_workers`` workers)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_ray.config import ConfigError, RMConfig
from rlhf_ray.reward.train import ray_train_loop


@dataclass(frozen=True)
class RMTrainResult:
    checkpoint_dir: Path  # an HF model directory (safetensors) + trainer state
    metrics: dict  # rank 0's last report
    run_dir: Path


def train_rm(rm: RMConfig, init_dir: str | Path, train_path: Path, eval_path: Path,
             metrics_path: Path | None = None, name: str | None = None,
             storage_path: str | None = None) -> RMTrainResult:
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
            "train_path": str(train_path), "eval_path": str(eval_path),
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
    return RMTrainResult(Path(result.checkpoint.path), dict(result.metrics or {}), Path(result.path))
