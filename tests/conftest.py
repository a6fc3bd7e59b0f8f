"""Shared fixtures: one local Ray cluster and one tiny embedded model per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.runtime import quiet_libraries

quiet_libraries()

# Modules whose tests start vLLM engines, Ray clusters of their own or a real model (besides every test
# that uses the session's Ray cluster): the integration tests. `pytest -m "not integration"` is the unit
# run (docs/development.md).
INTEGRATION_MODULES = {"test_collective", "test_demo", "test_job_submit", "test_multinode", "test_multiturn",
                       "test_rollout", "test_smollm2"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()) or item.module.__name__ in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def test_config(tmp_path_factory):
    """The embedded default at test size (same code as the demo, smaller settings)."""
    root = tmp_path_factory.mktemp("rlhf")
    return load_config(None, [
        f"model.cache_dir={root / 'cache'}", "sft.steps=300",
        "data.num_train=240", "data.num_eval=80",
        "rm.epochs=2", "rm.batch_size=8", "rm.lr=1e-3", f"rm.storage_path={root / 'ray_runs'}",
        f"output_dir={root / 'out'}",
    ])


@pytest.fixture(scope="session")
def policy_dir(test_config) -> Path:
    """The SFT'd embedded policy (built once per session, ~15 s)."""
    from rlhf_ray.models.embedded import resolve_model

    return Path(resolve_model(test_config.model, test_config.sft, log=lambda *_: None))


@pytest.fixture(scope="session")
def tied_policy_dir(policy_dir, tmp_path_factory) -> Path:
    """A 2-layer Llama of the embedded policy's shape whose LM head is its input embedding
    (tie_word_embeddings, as Qwen2.5-0.5B, Llama-3.2-1B, SmolLM2), random weights, the policy's tokenizer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    base = LlamaConfig.from_pretrained(policy_dir)
    cfg = LlamaConfig(**{**base.to_dict(), "tie_word_embeddings": True, "num_hidden_layers": 2})
    torch.manual_seed(0)
    tied = tmp_path_factory.mktemp("tied") / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tied)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (policy_dir / f).exists():
            shutil.copy(policy_dir / f, tied / f)
    return tied


@pytest.fixture(scope="session")
def rm_dir(test_config, policy_dir, tmp_path_factory) -> Path:
    """A small RM trained in-process for one epoch and saved as a checkpoint directory (~5 s)."""
    from rlhf_ray.data import synthetic
    from rlhf_ray.models.reward import init_reward_model
    from rlhf_ray.reward.train import RMTrainLoop, save_checkpoint

    model, tok = init_reward_model(policy_dir)
    records = synthetic.preference_records(400, seed=3)
    loop = RMTrainLoop(test_config.rm, model, tok, records, log=lambda *_: None)
    loop.train_epoch(0)
    model.eval()
    return save_checkpoint(model, tok, loop.optimizer, {"epoch": 0}, tmp_path_factory.mktemp("rm") / "ckpt")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (ray.init takes 4-7 s here)."""
    from rlhf_ray.runtime import init_ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    ray = init_ray(num_cpus=4)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
