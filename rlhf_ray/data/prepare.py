"""Preference data for the RM stage: the user's files, or the synthetic task written as JSONL."""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.config import DataConfig
from rlhf_ray.data import synthetic
from rlhf_ray.data.files import DataError, is_remote, write_jsonl
from rlhf_ray.data.preferences import read_preferences


def _location(path: str) -> str:
    return path if is_remote(path) else str(Path(path).resolve())


def prepare_preference_data(cfg: DataConfig, out_dir: str | Path, check: bool = True) -> tuple[str, str]:
    """Return (train, eval) locations: absolute local paths, or remote URIs as given. Empty paths:
    generate the synthetic task (as chats with ``data.synthetic_chat``). ``check`` reads local files
    through, failing on the first malformed record with its file and line; remote URIs are read
    (and checked) by the RM stage through Ray Data."""
    out_dir = Path(out_dir).resolve()
    if cfg.train_path:
        if not cfg.eval_path:
            raise DataError("data.eval_path: required when data.train_path is set (held-out evaluation)")
        train, evals = _location(cfg.train_path), _location(cfg.eval_path)
        for path in (train, evals):
            if check and not is_remote(path):
                read_preferences(path)
        return train, evals
    make = synthetic.as_chat if cfg.synthetic_chat else (lambda r: r)
    sets = []
    for n, seed, name in ((cfg.num_train, cfg.seed, "prefs_train.jsonl"), (cfg.num_eval, cfg.seed + 7919, "prefs_eval.jsonl")):
        records = synthetic.preference_records(n, seed, cfg.min_k, cfg.max_k, cfg.label_temperature)
        sets.append(str(write_jsonl([make(r) for r in records], out_dir / name)))
    return sets[0], sets[1]
