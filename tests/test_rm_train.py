"""The RM stage on a real local Ray cluster: TorchTrainer with 2 DDP workers, checkpoints, resume, and a
restart after a worker dies (rm.max_failures)."""

import copy
import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.data import synthetic
from rlhf_ray.data.prepare import prepare_preference_data
from rlhf_ray.config import ConfigError
from rlhf_ray.data.preferences import collate, read_jsonl, write_jsonl
from rlhf_ray.models.reward import batch_rewards, init_reward_model, load_reward_model
from rlhf_ray.ops import listwise_rm_loss
from rlhf_ray.reward.launch import rm_resume_point, train_rm
from rlhf_ray.reward.train import (MetricsLog, RMTrainLoop, evaluate, reset_metrics_log, resumed_metrics,
                                   shard_sizes, step_sizes)


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


def test_shards_cover_every_record_once_per_epoch(test_config):
    """N = 30 records, 2 workers, batch 8 (not a multiple of 16), and N = 17 (a rank left with nothing in
    its last step): every record once per epoch, the same number of steps on every rank."""
    assert shard_sizes(30, 2) == [15, 15] and shard_sizes(17, 2) == [9, 8] and shard_sizes(1, 3) == [1, 0, 0]
    assert [step_sizes([9, 8], 8, s) for s in range(3)] == [[8, 8], [1, 0], [0, 0]]
    cfg = replace(test_config.rm, batch_size=8)
    for n in (30, 17, 5):
        records = [{"prompt": f"p{i}", "responses": ["a", "b"], "best": 0} for i in range(n)]
        loops = [RMTrainLoop(cfg, torch.nn.Linear(1, 1), None, records, rank=r, world=2) for r in range(2)]
        assert loops[0].steps_per_epoch == loops[1].steps_per_epoch == -(-((n + 1) // 2) // 8)
        for epoch in (0, 1):
            seen = []
            for loop in loops:
                shard = loop.shard(epoch)
                for step in range(loop.steps_per_epoch):
                    seen += [r["prompt"] for r in shard[step * 8:(step + 1) * 8]]
            assert sorted(seen) == sorted(r["prompt"] for r in records)


def test_ddp_step_gradient_equals_one_process_mean(test_config, policy_dir):
    """Averaging the two ranks' gradients (what DDP does) gives the gradient of the mean loss over all the
    step's records, also when the ranks' batches differ in size (9 + 8 records, batch 8: 8 + 8, then 1 + 0;
    the empty rank contributes an all-zero gradient)."""
    model, tok = init_reward_model(policy_dir, seed=5)
    torch.nn.init.normal_(model.score.weight, std=0.3)
    records = synthetic.preference_records(17, seed=21)
    cfg = replace(test_config.rm, batch_size=8)
    loops = [RMTrainLoop(cfg, copy.deepcopy(model), tok, records, rank=r, world=2) for r in range(2)]
    assert loops[0].steps_per_epoch == 2
    for step in range(2):
        grads, chunks, sums = [], [], 0.0
        for loop in loops:
            shard = loop.shard(3)
            loop.model.zero_grad(set_to_none=True)
            loss, step_sum, n = loop.step_loss(shard, step)
            loss.backward()
            grads.append({k: p.grad.clone() for k, p in loop.model.named_parameters()})
            chunks += shard[step * 8:(step + 1) * 8]
            sums += step_sum
            assert n == len(shard[step * 8:(step + 1) * 8])
        if step == 1:  # rank 1 has no record left: a zero-weight pass, zero gradient
            assert all(not g.any() for g in grads[1].values())
        model.zero_grad(set_to_none=True)
        batch = collate(chunks, tok, cfg.max_length)
        ref = listwise_rm_loss(batch_rewards(model, batch), batch.valid, batch.best)
        ref.backward()
        assert sums / len(chunks) == pytest.approx(ref.item(), abs=1e-6)
        for k, p in model.named_parameters():
            ddp = (grads[0][k] + grads[1][k]) / 2
            # float32 summation order differs between the paths: entries that nearly cancel (embedding
            # rows hit by many tokens) keep an error of ~1e-6 of the tensor's largest gradient.
            torch.testing.assert_close(ddp, p.grad, rtol=1e-4, atol=1e-6 * float(p.grad.abs().max()) + 1e-9,
                                       msg=lambda m, k=k: f"{k}: {m}")


def test_train_loss_is_the_mean_over_all_records(test_config, policy_dir):
    """With a learning rate too small to move float32 weights, an epoch's train_loss is the held-out style
    mean of -log P(best) over all 21 records (21 = 2 full batches of 8 + a short one of 5)."""
    model, tok = init_reward_model(policy_dir, seed=2)
    torch.nn.init.normal_(model.score.weight, std=0.3)
    records = synthetic.preference_records(21, seed=8)
    ref = evaluate(model, tok, records, test_config.rm.max_length)
    loop = RMTrainLoop(replace(test_config.rm, batch_size=8, lr=1e-12), model, tok, records, log=lambda *_: None)
    stats = loop.train_epoch(0)
    assert stats["train_records"] == 21 and loop.steps_per_epoch == 3
    assert stats["train_loss"] == pytest.approx(ref.loss, abs=1e-5)


def test_resumed_metrics_keep_the_checkpoints_epochs(tmp_path):
    rows = [{"step": e, "epoch": e, "eval_loss": 1.0 / e} for e in (1, 2, 3)]
    assert resumed_metrics({"epoch": 1, "history": rows}, None) == rows[:2]
    # An older checkpoint without history: the newest row of each epoch up to the checkpoint's, from the file.
    path = tmp_path / "metrics.jsonl"
    stale = [{"step": 1, "epoch": 1, "eval_loss": 9.0}, {"step": 2, "epoch": 2, "eval_loss": 9.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in stale + rows))
    assert resumed_metrics({"epoch": 1}, path) == rows[:2]
    assert resumed_metrics({"epoch": 0}, tmp_path / "missing.jsonl") == []


def test_fresh_and_resumed_metrics_logs_drop_other_runs_rows(tmp_path):
    """metrics.jsonl and TensorBoard hold one run: a fresh one truncates them (purge_step 0), a resumed one
    keeps the rows up to its checkpoint's epoch and purges TensorBoard from the next epoch on."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = tmp_path / "rm" / "metrics.jsonl"

    def tb_scalars():
        events = EventAccumulator(str(path.parent / "tensorboard"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars("eval_loss")]

    def epochs():
        return [json.loads(x)["epoch"] for x in path.read_text().splitlines()]

    for run in (1, 2):  # two earlier runs of 3 epochs, logged the old way (appended, no purge)
        old = MetricsLog(path)
        for e in (1, 2, 3):
            old.write(e, {"epoch": e, "eval_loss": 10.0 * run + e})
        old.close()
    assert epochs() == [1, 2, 3, 1, 2, 3]
    log = reset_metrics_log(path, [], 0)
    history = [log.write(e, {"epoch": e, "eval_loss": float(e)}) for e in (1, 2, 3)]
    log.close()
    assert epochs() == [1, 2, 3] and tb_scalars() == [(1, 1.0), (2, 2.0), (3, 3.0)]
    log = reset_metrics_log(path, resumed_metrics({"epoch": 0, "history": history}, path), 1)
    log.write(2, {"epoch": 2, "eval_loss": 0.5})
    log.close()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 2 and rows[0] == history[0] and (rows[1]["step"], rows[1]["eval_loss"]) == (2, 0.5)
    assert tb_scalars() == [(1, 1.0), (2, 0.5)]


def test_resume_from_is_checked_and_made_absolute_on_the_driver(test_config, rm_dir, tmp_path, monkeypatch):
    """Ray Train moves each worker into its own directory: a relative rm.resume_from is resolved on the
    driver; a missing path, a directory that is no RM checkpoint, or one already at rm.epochs is a
    ConfigError naming rm.resume_from, raised before Ray is touched."""
    monkeypatch.chdir(rm_dir.parent)
    rm = replace(test_config.rm, epochs=2, resume_from=rm_dir.name)
    ckpt, state = rm_resume_point(rm)
    assert ckpt == rm_dir.resolve() and ckpt.is_absolute() and state["epoch"] == 0
    assert rm_resume_point(replace(rm, resume_from="")) == (None, None)
    (tmp_path / "empty").mkdir()
    for resume_from, needle in ((str(tmp_path / "nope"), "does not exist"),
                                (str(tmp_path / "empty"), "is not an RM checkpoint")):
        with pytest.raises(ConfigError, match=f"rm.resume_from: .*{needle}"):
            rm_resume_point(replace(rm, resume_from=resume_from))
    with pytest.raises(ConfigError, match=r"rm.resume_from: .* is at epoch 1; set rm.epochs above 1"):
        train_rm(replace(rm, epochs=1), rm_dir, tmp_path / "t.jsonl", tmp_path / "e.jsonl")


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


def test_ray_train_two_workers_checkpoint_and_resume(ray_cluster, test_config, policy_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tb_eval_loss():
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars("eval_loss")]

    cfg = test_config
    # 235 records: 118 + 117 per worker, 15 steps of 8 with short last batches; every record is used.
    train_path, eval_path = prepare_preference_data(replace(cfg.data, num_train=235), tmp_path / "data")
    metrics = tmp_path / "metrics.jsonl"
    earlier = MetricsLog(metrics)  # an earlier run in the same place: its rows and curves must go
    for e in (1, 2, 3):
        earlier.write(e, {"epoch": e, "eval_loss": 99.0})
    earlier.close()
    rm = replace(cfg.rm, num_workers=2, epochs=1)
    res = train_rm(rm, policy_dir, train_path, eval_path, metrics_path=metrics, storage_path=str(tmp_path / "runs"))
    assert res.metrics["epoch"] == 1  # its eval_* are checked against an in-process evaluation below
    assert res.metrics["train_records"] == 235
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert tb_eval_loss() == [(1, pytest.approx(res.metrics["eval_loss"], rel=1e-6))]
    # The checkpoint is a plain HF directory: loads without Ray, safetensors only.
    ck = res.checkpoint_dir
    assert (tmp_path / "runs").stat().st_mode & 0o777 == 0o700  # Ray Train's storage: the owner's only
    assert {p.stat().st_mode & 0o777 for p in ck.rglob("*") if p.is_file()} == {0o600}
    assert (ck / "model.safetensors").exists() and json.loads((ck / "trainer_state.json").read_text())["epoch"] == 0
    model, tok = load_reward_model(ck)
    weights = load_file(ck / "model.safetensors")
    assert torch.equal(weights["score.weight"], model.score.weight)
    # Training moved the weights away from the backbone.
    init, _ = init_reward_model(policy_dir)
    assert not torch.equal(init.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    # Evaluating the checkpoint in-process reproduces the reported held-out metrics.
    ev = evaluate(model, tok, read_jsonl(eval_path), rm.max_length)
    assert abs(ev.top1 - res.metrics["eval_top1"]) < 1e-9 and abs(ev.loss - res.metrics["eval_loss"]) < 1e-5

    # Resume from that checkpoint, named by a path relative to the working directory (Ray Train runs each
    # worker elsewhere), for a second epoch: starts at epoch 2, continues from its weights. A stale epoch-2
    # row (a failed run past the checkpoint) goes.
    with metrics.open("a") as f:
        f.write(json.dumps({"step": 2, "epoch": 2, "eval_loss": 99.0}) + "\n")
    monkeypatch.chdir(tmp_path)
    rm2 = replace(rm, epochs=2, resume_from=os.path.relpath(ck, tmp_path))
    assert not os.path.isabs(rm2.resume_from)
    res2 = train_rm(rm2, policy_dir, train_path, eval_path, metrics_path=metrics, storage_path=str(tmp_path / "runs"))
    rows2 = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows2] == [1, 2] and rows2[0] == rows[0]
    assert rows2[1]["eval_loss"] == pytest.approx(res2.metrics["eval_loss"], rel=1e-9)
    assert tb_eval_loss() == [(1, pytest.approx(res.metrics["eval_loss"], rel=1e-6)),
                              (2, pytest.approx(res2.metrics["eval_loss"], rel=1e-6))]
    assert res2.metrics["epoch"] == 2
    assert res2.metrics["eval_loss"] < res.metrics["eval_loss"]

    # rm.max_failures=1: a training worker killed (SIGKILL) once epoch 1 is logged; Ray Train restarts the
    # worker group from its newest checkpoint (epoch 1's, or none if the kill beat the report) and the
    # run ends as the resumed one did.
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


def test_ray_train_loss_is_the_mean_over_every_record(ray_cluster, test_config, policy_dir, tmp_path):
    """2 DDP workers, 37 records, batch 8 (19 + 18: 3 steps, short last batches). With a learning rate too
    small to move float32 weights, the reported train_loss is the mean of -log P(best) over all 37 records
    of the initial RM, computed in-process (not rank 0's shard only)."""
    records = synthetic.preference_records(37, seed=31)
    train_path = write_jsonl(records, tmp_path / "train.jsonl")
    eval_path = write_jsonl(synthetic.preference_records(8, seed=32), tmp_path / "eval.jsonl")
    rm = replace(test_config.rm, num_workers=2, epochs=1, batch_size=8, lr=1e-12)
    res = train_rm(rm, policy_dir, train_path, eval_path, storage_path=str(tmp_path / "runs"))
    model, tok = init_reward_model(policy_dir, seed=rm.seed)
    ref = evaluate(model, tok, records, rm.max_length)
    assert res.metrics["train_records"] == 37
    assert res.metrics["train_loss"] == pytest.approx(ref.loss, abs=1e-5)


def test_a_checkpoint_on_remote_storage_is_downloaded(tmp_path):
    """rm.storage_path on S3/GCS: the final checkpoint is copied to a local directory (the ``latest``
    link, serve-rm and PPO read one); a local checkpoint is used where it is."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from rlhf_ray.reward.launch import local_checkpoint_dir

    remote = tmp_path / "bucket" / "rm-run" / "checkpoint_000005"
    remote.mkdir(parents=True)
    (remote / "config.json").write_text('{"a": 1}')
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())  # not local paths
    local = local_checkpoint_dir(Checkpoint("rm-run/checkpoint_000005", filesystem=fs), tmp_path / "dl" / "rm-run")
    assert local == tmp_path / "dl" / "rm-run" / "checkpoint_000005"
    assert (local / "config.json").read_text() == '{"a": 1}'
    assert local_checkpoint_dir(Checkpoint(str(remote)), tmp_path / "unused") == remote
    assert not (tmp_path / "unused").exists()


def test_an_rm_checkpoint_keeps_its_max_length_and_scoring_reads_it_back(policy_dir, tmp_path):
    """rm.max_length is saved with the checkpoint (rm_settings.json): the scorer, the service and PPO's
    scorer cut inputs where training did without being told, and PPO reports the share of inputs cut."""
    import torch

    from helpers import make_rollout

    from rlhf_ray.models.reward import RM_SETTINGS_FILE, init_reward_model, rm_max_length
    from rlhf_ray.ppo.scoring import RolloutScorer
    from rlhf_ray.reward.scorer import RewardScorer
    from rlhf_ray.reward.train import save_checkpoint

    model, tok = init_reward_model(policy_dir)
    ckpt = save_checkpoint(model, tok, torch.optim.AdamW(model.parameters()), {"epoch": 0}, tmp_path / "rm", max_length=12)
    assert (ckpt / RM_SETTINGS_FILE).is_file() and rm_max_length(ckpt) == 12 and rm_max_length(tmp_path) == 64
    assert RewardScorer(ckpt).max_length == 12 and RewardScorer(ckpt, max_length=20).max_length == 20
    responses = ["the bulb is great .", "the spout is awful and the fan is ok and the lid is solid and the base is fine ."]
    ro = make_rollout(tok, ["review of the lamp :", "review of the kettle :"], responses, [False, False])
    lengths = [len(x) for x in RewardScorer(ckpt).renderer.pairs_ids(ro.prompts, responses)]
    assert lengths[0] <= 12 < lengths[1]  # one input fits, the other is cut
    scored = RolloutScorer(ckpt).score(ro)
    assert scored.stats == {"rm_truncated_frac": 0.5}
