"""The RM stage on a real local Ray cluster: TorchTrainer with 2 DDP workers, checkpoints, resume, and a
restart after a worker dies (rm.max_failures)."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.data import synthetic
from rlhf_ray.data.prepare import prepare_preference_data
from rlhf_ray.data.preferences import read_jsonl
from rlhf_ray.models.reward import init_reward_model, load_reward_model
from rlhf_ray.reward.launch import train_rm
from rlhf_ray.reward.train import RMTrainLoop, evaluate


def test_in_process_loop_learns_and_changes_every_parameter(test_config, policy_dir):
    model, tok = init_reward_model(policy_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = synthetic.preference_records(480, seed=11)
    held = synthetic.preference_records(120, seed=12)
    ev0 = evaluate(model, tok, held, 64)
    loop = RMTrainLoop(replace(test_config.rm, batch_size=16), model, tok, train, log=lambda *_: None)
    loop.train_epoch(0)
    loop.train_epoch(1)
    ev1 = evaluate(model, tok, held, 64)
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"
    assert ev1.loss < ev0.loss - 0.1
    assert ev1.top1 > ev1.chance + 0.15
    assert 0 <= ev1.ece < 0.2 and ev1.pairwise > 0.6


def test_evaluate_metrics_hand_checked(policy_dir):
    """top-1 and pairwise accuracy recomputed by hand from the model's own rewards."""
    from reference import rm_rewards

    model, tok = init_reward_model(policy_dir, seed=3)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # make rewards spread out
    recs = synthetic.preference_records(40, seed=4)
    ev = evaluate(model, tok, recs, 64, batch_size=7)
    top1 = pair_hits = pairs = 0
    for r in recs:
        rw = rm_rewards(model, tok, [r["prompt"]] * len(r["responses"]), r["responses"], 64)
        top1 += max(range(len(rw)), key=rw.__getitem__) == r["best"]
        others = [i for i in range(len(rw)) if i != r["best"]]
        pair_hits += sum(rw[r["best"]] > rw[i] for i in others)
        pairs += len(others)
    assert abs(ev.top1 - top1 / len(recs)) < 1e-9
    assert abs(ev.pairwise - pair_hits / pairs) < 1e-9
    assert abs(ev.chance - sum(1 / len(r["responses"]) for r in recs) / len(recs)) < 1e-9


def test_ray_train_two_workers_checkpoint_and_resume(ray_cluster, test_config, policy_dir, tmp_path):
    cfg = test_config
    train_path, eval_path = prepare_preference_data(cfg.data, tmp_path / "data")
    metrics = tmp_path / "metrics.jsonl"
    rm = replace(cfg.rm, num_workers=2, epochs=1)
    res = train_rm(rm, policy_dir, train_path, eval_path, metrics_path=metrics, storage_path=str(tmp_path / "runs"))
    assert res.metrics["epoch"] == 1 and 0 <= res.metrics["eval_top1"] <= 1
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    # The checkpoint is a plain HF directory: loads without Ray, safetensors only.
    ck = res.checkpoint_dir
    assert (ck / "model.safetensors").exists() and json.loads((ck / "trainer_state.json").read_text())["epoch"] == 0
    model, tok = load_reward_model(ck)
    weights = load_file(ck / "model.safetensors")
    assert torch.equal(weights["score.weight"], model.score.weight)
    # DDP kept the two replicas identical, and training moved the weights away from the backbone.
    init, _ = init_reward_model(policy_dir)
    assert not torch.equal(init.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    # Evaluating the checkpoint in-process reproduces the reported held-out metrics.
    ev = evaluate(model, tok, read_jsonl(eval_path), rm.max_length)
    assert abs(ev.top1 - res.metrics["eval_top1"]) < 1e-9 and abs(ev.loss - res.metrics["eval_loss"]) < 1e-5

    # Resume from that checkpoint for a second epoch: starts at epoch 2, continues from its weights.
    rm2 = replace(rm, epochs=2, resume_from=str(ck))
    res2 = train_rm(rm2, policy_dir, train_path, eval_path, metrics_path=metrics, storage_path=str(tmp_path / "runs"))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert res2.metrics["epoch"] == 2
    assert res2.metrics["eval_loss"] < res.metrics["eval_loss"]

    # rm.max_failures=1: a training worker killed (SIGKILL) once epoch 1 is logged; Ray Train restarts the
    # worker group from its newest checkpoint (epoch 1's, or none if the kill beat the report) and the
    # run ends as the resumed one did.
    import os
    import signal
    import threading
    import time

    import psutil

    metrics3, killed, t0 = tmp_path / "metrics3.jsonl", [], time.time()

    def kill_a_worker_after_epoch_1():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if metrics3.exists() and [json.loads(x)["epoch"] for x in metrics3.read_text().splitlines()] == [1]:
                for p in psutil.process_iter(["cmdline", "create_time"]):  # this run's workers only
                    if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.info["create_time"] >= t0:
                        os.kill(p.pid, signal.SIGKILL)
                        killed.append(p.pid)
                        break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker_after_epoch_1, daemon=True)
    killer.start()
    res3 = train_rm(replace(rm, epochs=2, max_failures=1), policy_dir, train_path, eval_path, metrics_path=metrics3,
                    storage_path=str(tmp_path / "runs"))
    killer.join(timeout=5)
    assert killed and not psutil.pid_exists(killed[0])
    assert res3.metrics["epoch"] == 2
    assert res3.metrics["eval_loss"] == pytest.approx(res2.metrics["eval_loss"], abs=1e-5)
