"""The CUDA paths: RM training (in process and under Ray Train with use_gpu), the PPO learner (and
its write into CPU engines' shared memory), the reference policy and the RM scorer on a GPU, each
checked against the same computation on the CPU.

Skipped where torch sees no GPU (CI has none). On a GPU machine without vLLM, from the repo root:

    PYTHONPATH=$PWD python -m pytest -q tests/test_gpu.py

The Ray tests also need Ray (``../shared/tools/device-ray-bundle.sh`` packs it for a bare GPU image).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rlhf_ray.data import synthetic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fp32 on both sides (no TF32: torch's default matmul precision is "highest"); what differs is the
# order of floating-point sums, ~1e-6 relative per op.
TOL = 2e-4


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def scored(policy_dir):
    from helpers import make_rollout
    from transformers import AutoTokenizer

    from rlhf_ray.ppo.types import ScoredRollout

    tok = AutoTokenizer.from_pretrained(policy_dir)
    prompts, responses = zip(*synthetic.corpus(24, seed=5))
    truncated = [i % 5 == 0 for i in range(24)]
    ro = make_rollout(tok, list(prompts), list(responses), truncated)
    scores = np.linspace(-1, 1, 24).astype(np.float32)
    return ScoredRollout(ro, scores, scores, 0.0)


def test_rm_training_on_gpu_matches_cpu(test_config, policy_dir):
    from rlhf_ray.models.reward import init_reward_model
    from rlhf_ray.reward.train import RMTrainLoop, evaluate

    train = synthetic.preference_records(192, seed=11)
    held = synthetic.preference_records(64, seed=12)
    cfg = dataclasses.replace(test_config.rm, batch_size=8, lr=1e-3)
    out = {}
    for device in ("cpu", "cuda"):
        model, tok = init_reward_model(policy_dir)
        model.to(device)
        before = evaluate(model, tok, held, cfg.max_length)
        stats = RMTrainLoop(cfg, model, tok, train, log=quiet).train_epoch(0)
        after = evaluate(model, tok, held, cfg.max_length)
        assert next(model.parameters()).device.type == device
        out[device] = before, stats, after
    (b_cpu, s_cpu, a_cpu), (b_gpu, s_gpu, a_gpu) = out["cpu"], out["cuda"]
    assert abs(b_cpu.loss - b_gpu.loss) < 1e-5 and b_cpu.top1 == b_gpu.top1
    assert abs(s_cpu["train_loss"] - s_gpu["train_loss"]) < 1e-3
    assert a_gpu.loss < b_gpu.loss - 0.03  # it learned on the GPU
    assert abs(a_cpu.loss - a_gpu.loss) < 2e-3 and abs(a_cpu.ece - a_gpu.ece) < 2e-2


def test_learner_and_reference_on_gpu_match_cpu(test_config, policy_dir, scored):
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.causal_lm import sequence_logprobs
    from rlhf_ray.ppo.advantage import AdvantageWorker
    from rlhf_ray.ppo.learner import Learner

    from rlhf_ray.config import LearnerConfig

    cfg = dataclasses.replace(test_config.ppo, minibatch_size=8, epochs=2)
    ro = scored.rollout
    out = {}
    for device in ("cpu", "cuda"):  # float32 on both sides (a CUDA learner autocasts to bf16 by default)
        learner = Learner(policy_dir, cfg, device=device, learner_cfg=LearnerConfig(mixed_precision="no"))
        adv = AdvantageWorker(str(policy_dir), cfg, device=device)
        old = learner.evaluate(scored)
        batch = adv.compute(scored, old, adv.reference(scored))
        loss0 = learner.loss(batch)
        stats = learner.train(batch)
        out[device] = old, batch, loss0, stats, learner.loss(batch), learner
    (old_c, batch_c, l0_c, st_c, l1_c, _), (old_g, batch_g, l0_g, st_g, l1_g, learner) = out["cpu"], out["cuda"]
    mask = ro.attention_mask
    for key in ("old_logprobs", "values"):
        assert np.abs(old_c[key] - old_g[key])[mask].max() < TOL, key
    assert np.abs(batch_c.ref_logprobs - batch_g.ref_logprobs)[mask].max() < TOL
    assert np.abs(batch_c.advantages - batch_g.advantages)[ro.response_mask].max() < 1e-3
    assert abs(l0_c - l0_g) < 1e-4
    assert l1_g < l0_g and abs(l1_c - l1_g) < 5e-3  # 6 Adam steps on each device
    assert st_g["policy_version"] == 1 and st_g["train_steps"] == 6

    # What the GPU learner exports (CPU float32 numpy, HF names) is its policy: a CPU copy of the model
    # loaded from it gives the learner's own logprobs.
    sd = learner.state_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in sd.values())
    cpu_model = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32).eval()
    cpu_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    ids, am = torch.tensor(ro.input_ids), torch.tensor(ro.attention_mask)
    on_cpu = torch.where(am, sequence_logprobs(cpu_model, ids, am), 0.0).numpy()
    assert np.abs(on_cpu - learner.logprobs(ro.input_ids, ro.attention_mask))[mask].max() < TOL


def test_a_bf16_learner_on_gpu_stays_near_the_float32_one(test_config, policy_dir, scored):
    """learner.mixed_precision=auto on CUDA: bfloat16 autocast. pi_old within bf16 rounding of the float32
    CPU learner's (logprobs of a ~500-token vocabulary: ~1e-2), the loss too, and its steps lower it."""
    from rlhf_ray.ppo.advantage import AdvantageWorker
    from rlhf_ray.ppo.learner import Learner

    cfg = dataclasses.replace(test_config.ppo, minibatch_size=8, epochs=2)
    cpu, gpu = Learner(policy_dir, cfg, device="cpu"), Learner(policy_dir, cfg, device="cuda")
    assert cpu.autocast_dtype is None and gpu.autocast_dtype == torch.bfloat16
    old_c, old_g = cpu.evaluate(scored), gpu.evaluate(scored)
    m = scored.rollout.response_mask
    gap = np.abs(old_c["old_logprobs"] - old_g["old_logprobs"])[m]
    assert 0 < gap.max() < 0.1 and gap.mean() < 2e-2  # bf16 rounding: not zero, not far
    batch = AdvantageWorker(str(policy_dir), cfg).compute(scored, old_c)
    l0_c, l0_g = cpu.loss(batch), gpu.loss(batch)
    assert abs(l0_c - l0_g) < 5e-2
    gpu.train(batch)
    assert gpu.loss(batch) < l0_g


def test_gpu_learner_writes_shared_weights(test_config, policy_dir, tmp_path):
    """A CUDA learner writes CPU engines' shared memory (device to host, straight into the slot)."""
    from rlhf_ray.ppo.learner import Learner
    from rlhf_ray.ppo.transport.slots import SharedSlots, new_spec

    learner = Learner(policy_dir, test_config.ppo, device="cuda")
    sd = learner.state_dict()
    meta = learner.weight_meta()
    shapes = dict(zip(meta["names"], meta["shapes"]))
    spec = new_spec(shapes, str(tmp_path))  # an engine whose layout is the checkpoint's own
    spec["placements"] = {n: [n, 0, int(np.prod(s))] for n, s in shapes.items()}
    SharedSlots(spec, create=True)
    learner.open_sender("shared_memory", spec)
    info = learner.send_weights(1)  # version 1: slot 1
    assert info["slot"] == 1 and info["bytes"] == 4 * sum(int(np.prod(s)) for s in shapes.values())
    views = SharedSlots(spec).views(1)
    for n in shapes:
        assert np.array_equal(views[n].numpy(), sd[n]), n
    learner.close_sender()
    assert not list(tmp_path.iterdir())


def test_reward_scorer_on_gpu_matches_cpu(rm_dir):
    from rlhf_ray.reward.scorer import RewardScorer

    prompts, responses = zip(*synthetic.corpus(40, seed=6))
    cpu = RewardScorer(rm_dir, max_length=64, device="cpu").score_pairs(list(prompts), list(responses))
    gpu = RewardScorer(rm_dir, max_length=64, device="cuda")
    assert gpu.device.type == "cuda"
    assert np.abs(cpu - gpu.score_pairs(list(prompts), list(responses))).max() < TOL


# ---- Ray on a GPU node ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray that has the GPUs torch sees (conftest's cluster is CPU-sized)."""
    ray = pytest.importorskip("ray")
    from rlhf_ray.runtime import init_ray

    started = not ray.is_initialized()  # else: the session's cluster (it detected the GPUs itself)
    init_ray(num_cpus=4, num_gpus=torch.cuda.device_count())
    yield ray
    if started:
        ray.shutdown()


def test_ppo_actors_share_one_gpu_and_train_through_the_object_store(ray_cluster, test_config, policy_dir,
                                                                    rm_dir, scored):
    ray = ray_cluster
    from rlhf_ray.ppo import actors

    cfg = dataclasses.replace(test_config.ppo, minibatch_size=8)
    learner = actors.start_learner(policy_dir, cfg)
    advantage = actors.start_advantage(policy_dir, cfg)
    scorer = actors.start_scorer(rm_dir, 64)
    where = ray.get([a.__ray_call__.remote(lambda self: (str(getattr(self, "device", None) or
                                                             self.scorer.device), ray.get_gpu_ids()))
                     for a in (learner, advantage, scorer)])
    assert [d for d, _ in where] == ["cuda", "cuda", "cuda"], where
    assert len({tuple(ids) for _, ids in where}) == 1, f"not packed on one GPU: {where}"

    scored_ref = scorer.score.remote(ray.put(scored.rollout))
    old = learner.evaluate.remote(scored_ref)
    batch = advantage.compute.remote(scored_ref, old, advantage.reference.remote(scored_ref))
    before = ray.get(learner.loss.remote(batch))
    stats = ray.get(learner.train.remote(batch))
    assert stats["policy_version"] == 1 and np.isfinite(stats["loss"])
    assert ray.get(learner.loss.remote(batch)) < before
    ray.get(learner.open_sender.remote("object_store", 16 << 20, "float32", False))
    buckets = ray.get(learner.send_weights.remote(1))
    assert sum(len(b) for b in buckets) == len(ray.get(learner.state_dict.remote()))
    for a in (learner, advantage, scorer):
        ray.kill(a)


def test_rm_under_ray_train_on_gpu(ray_cluster, test_config, policy_dir, tmp_path):
    from rlhf_ray.data.prepare import prepare_preference_data
    from rlhf_ray.data.preferences import read_jsonl
    from rlhf_ray.models.reward import load_reward_model
    from rlhf_ray.reward.launch import train_rm
    from rlhf_ray.reward.train import evaluate

    train_path, eval_path = prepare_preference_data(test_config.data, tmp_path / "data")
    rm = dataclasses.replace(test_config.rm, num_workers=1, use_gpu=True, epochs=1)
    res = train_rm(rm, policy_dir, train_path, eval_path, storage_path=str(tmp_path / "runs"))
    assert res.metrics["epoch"] == 1 and np.isfinite(res.metrics["train_loss"])
    model, tok = load_reward_model(res.checkpoint_dir)
    ev = evaluate(model, tok, read_jsonl(eval_path), rm.max_length)  # on the CPU
    assert abs(ev.loss - res.metrics["eval_loss"]) < 1e-4 and abs(ev.top1 - res.metrics["eval_top1"]) < 1e-9
