"""Preference data for the RM stage: the user's JSONL files, or the synthetic task written as JSONL."""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.config import DataConfig
from rlhf_ray.data import synthetic
from rlhf_ray.data.preferences import DataError, read_jsonl, write_jsonl


def prepare_preference_data(cfg: DataConfig, out_dir: str | Path) -> tuple[Path, Path]:
    """Return absolute (train, eval) JSONL paths, validated. Empty paths: generate the synthetic task."""
    out_dir = Path(out_dir).resolve()
    if cfg.train_path:
        if not cfg.eval_path:
            raise DataError("data.eval_path: required when data.train_path is set (held-out evaluation)")
        train, evals = Path(cfg.train_path).resolve(), Path(cfg.eval_path).resolve()
        read_jsonl(train), read_jsonl(evals)  # fail early, naming file and line
        return train, evals
    train = write_jsonl(synthetic.preference_records(cfg.num_train, cfg.seed, cfg.min_k, cfg.max_k,
                                                     cfg.label_temperature), out_dir / "prefs_train.jsonl")
    evals = write_jsonl(synthetic.preference_records(cfg.num_eval, cfg.seed + 7919, cfg.min_k, cfg.max_k,
                                                     cfg.label_temperature), out_dir / "prefs_eval.jsonl")
    return train, evals
