"""The learner as a group of ranks (learner.num_workers = 2, gloo on CPU): a PPO step equals the single
learner's on the same batch (ranks with different token counts), every export path gives its weights, and
checkpoints move between rank counts. (A group in a PPO run, across nodes, losing one: test_multinode.py.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import ray
import torch
from ports import free_port

from rlhf_ray.ppo.distributed import rank_rows, token_share
from rlhf_ray.ppo.types import TrainBatch

STATS = ("loss", "grad_norm", "policy_loss", "value_loss", "kl_old", "entropy", "clip_frac", "objective", "kl_ref_k3")


def test_token_shares_make_the_ranks_mean_the_minibatch_token_mean():
    """Two ranks with 7 and 2 response tokens (token means m1, m2): the mean over ranks of the scaled
    losses is the minibatch's token mean (7 m1 + 2 m2) / 9, not (m1 + m2) / 2."""
    rows = np.arange(5)
    assert rank_rows(rows, 0, 2).tolist() == [0, 2, 4] and rank_rows(rows, 1, 2).tolist() == [1, 3]
    m1, m2 = 0.3, -1.1
    scaled = [m1 * token_share(7, 9, 2), m2 * token_share(2, 9, 2)]
    assert sum(scaled) / 2 == pytest.approx((7 * m1 + 2 * m2) / 9, abs=1e-12)
    assert token_share(0, 0, 2) == 0.0


def test_whole_optimizer_state_is_kept_only_where_it_is_written():
    """full_optimizer_state keeps every moment and the non-tensor entries of each parameter (the single
    learner's format); keep=False (a rank that does not write the checkpoint) returns nothing."""
    import torch

    from rlhf_ray.ppo.distributed import full_optimizer_state, gathered

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    state, ref = full_optimizer_state(opt), opt.state_dict()
    assert state["param_groups"] == ref["param_groups"] and state["state"].keys() == ref["state"].keys() == {0, 1}
    for idx, per in ref["state"].items():
        assert state["state"][idx].keys() == per.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k, v in per.items():
            assert torch.equal(state["state"][idx][k], v), (idx, k)
    assert full_optimizer_state(opt, keep=False) is None
    assert gathered(model.state_dict().items(), keep=False) is None
    assert gathered(model.state_dict().items()).keys() == {"weight", "bias"}


def make_batch(learner, seed: int) -> TrainBatch:
    """8 sequences of the tiny policy's vocabulary, a 4-token prompt and 1..11 response tokens each (the
    ranks' shares of a minibatch differ in tokens), pi_old from ``learner``."""
    rng = np.random.default_rng(seed)
    B, T = 8, 16
    ids = rng.integers(3, 60, (B, T))
    ends = 4 + rng.permutation([1, 2, 3, 5, 7, 9, 11, 12])
    t = np.arange(T)
    am = t[None] < ends[:, None]
    rm = am & (t[None] >= 4)
    old = learner.logprobs(ids, am)
    f = lambda x: np.where(rm, x, 0).astype(np.float32)  # noqa: E731
    adv, ret = f(rng.normal(size=(B, T))), f(rng.normal(size=(B, T)))
    return TrainBatch(ids, am, rm, old, f(old - 0.05), f(np.zeros((B, T))), f(np.zeros((B, T))), adv, ret,
                      policy_version=learner.version)


def weights(learner) -> dict:
    """A copy of an in-process learner's weights (its state_dict() is a view of the live CPU tensors)."""
    return {k: np.array(v) for k, v in learner.state_dict().items()}


def assert_same_step(a: dict, b: dict) -> None:
    for k in STATS:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    assert a["policy_version"] == b["policy_version"]


def assert_same_update(start: dict, a: dict, b: dict) -> None:
    """Each weight moved, and by the same amount in ``a`` as in ``b`` (Adam's steps of ~lr)."""
    assert a.keys() == b.keys() == start.keys()
    for k in start:
        assert not np.array_equal(a[k], start[k]), k
        np.testing.assert_allclose(a[k] - start[k], b[k] - start[k], rtol=1e-3, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def group_cfg(test_config):
    # The value head (gae), the KL penalty, the entropy bonus and the reference KL loss all in the loss;
    # minibatches of 3 sequences (rank 0 takes 2, rank 1 one), two epochs.
    return dataclasses.replace(test_config.ppo, lr=1e-4, epochs=2, minibatch_size=3, beta=0.1, entropy_coef=0.01,
                               kl_loss_coef=0.1, temperature=1.0)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_a_group_of_one_rank_steps_as_the_single_learner(policy_dir, group_cfg, device, strategy):
    """World size 1 in this process, gloo on the CPU and NCCL on a GPU (benchmarks/gpu_check.sh runs the
    latter): the wrapped learner's pi_old, step statistics and update are the plain learner's. Float32
    on both sides (learner.mixed_precision=no), so that they compute the same sums."""
    import torch.distributed as dist

    from rlhf_ray.config import LearnerConfig
    from rlhf_ray.ppo.distributed import RankSpec
    from rlhf_ray.ppo.learner import Learner

    single = Learner(policy_dir, group_cfg, device=device, learner_cfg=LearnerConfig(mixed_precision="no"))
    start = weights(single)
    try:
        one = Learner(policy_dir, group_cfg, device=device,
                      learner_cfg=LearnerConfig(mixed_precision="no", strategy=strategy),
                      rank=RankSpec(0, 1, f"tcp://127.0.0.1:{free_port()}", strategy))
        assert dist.get_backend() == ("nccl" if device == "cuda" else "gloo") and dist.get_world_size() == 1
        b = make_batch(single, seed=5)
        np.testing.assert_allclose(one.logprobs(b.input_ids, b.attention_mask), b.old_logprobs, atol=1e-5)
        assert_same_step(one.train(b), single.train(b))
        assert_same_update(start, weights(one), weights(single))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_sharded_rank_reads_no_weights_and_receives_its_shards_from_rank_0(ray_cluster, policy_dir, group_cfg,
                                                                              tmp_path):
    """Under fsdp a rank other than 0 builds the policy from its config alone (meta device) and rank 0
    scatters the weights: rank 1 given a copy of the policy directory without its weights file computes
    the single learner's logprobs with rank 0, and trains with it, here with GRPO's sequence-mean loss
    (the ranks' shares of a minibatch's sequences, not of its tokens, weigh their policy terms)."""
    import shutil

    from rlhf_ray.config import LearnerConfig
    from rlhf_ray.ppo.distributed import RankSpec
    from rlhf_ray.ppo.learner import Learner
    from rlhf_ray.ppo.nodes import address_on

    bare = tmp_path / "no-weights"
    shutil.copytree(policy_dir, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    assert not list(bare.glob("*.safetensors")) and (bare / "config.json").is_file()
    group_cfg = dataclasses.replace(group_cfg, loss_type="grpo")  # (sequence means: each rank weighs by its rows)
    single = Learner(policy_dir, group_cfg, device="cpu")
    host, port = address_on()
    cls = ray.remote(num_cpus=1)(Learner)
    ranks = [cls.remote(str(path), group_cfg, device="cpu", learner_cfg=LearnerConfig(num_workers=2, strategy="fsdp"),
                        rank=RankSpec(i, 2, f"tcp://{host}:{port}", "fsdp")) for i, path in enumerate((policy_dir, bare))]
    try:
        b = make_batch(single, seed=4)
        for lp in ray.get([r.logprobs.remote(b.input_ids, b.attention_mask) for r in ranks]):
            np.testing.assert_allclose(lp, b.old_logprobs, atol=1e-5)
        assert_same_step(ray.get([r.train.remote(b) for r in ranks])[0], single.train(b))
    finally:
        for r in ranks:
            ray.kill(r)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_as_the_single_learner_and_checkpoints_change_rank_count(
        ray_cluster, policy_dir, group_cfg, strategy, tmp_path):
    from rlhf_ray.config import LearnerConfig
    from rlhf_ray.ppo import actors
    from rlhf_ray.ppo.learner import Learner
    from rlhf_ray.ppo.transport.slots import SharedSlots, new_spec, unlink_slots

    single = Learner(policy_dir, group_cfg, device="cpu")
    start = weights(single)
    group = actors.start_learner(policy_dir, group_cfg, learner_cfg=LearnerConfig(num_workers=2, strategy=strategy))
    try:
        b1 = make_batch(single, seed=1)
        # pi_old through the group: rank 0's forward (ddp), or every rank's sharded one (fsdp).
        np.testing.assert_allclose(ray.get(group.logprobs.remote(b1.input_ids, b1.attention_mask)), b1.old_logprobs,
                                   atol=1e-5)
        assert_same_step(ray.get(group.train.remote(b1)), single.train(b1))
        assert_same_update(start, ray.get(group.state_dict.remote()), single.state_dict())
        # The weights as each sync path exports them: buckets for the object store, and the engines'
        # shared memory (here laid out as the Hugging Face tensors themselves), gathered under fsdp.
        trained = single.state_dict()
        n = ray.get(group.open_sender.remote("object_store", 1 << 20))
        buckets = ray.get(group.send_weights.options(num_returns=n).remote(1))
        exported = {k: v for b in (buckets if n > 1 else [buckets]) for k, v in b.items()}
        assert exported.keys() == start.keys()
        meta = ray.get(group.weight_meta.remote())
        shapes = dict(zip(meta["names"], meta["shapes"]))
        spec = {**new_spec(shapes), "placements": {k: [k, 0, int(np.prod(s))] for k, s in shapes.items()}}
        slots = SharedSlots(spec, create=True)
        try:
            group.open_sender.remote("shared_memory", spec)
            assert ray.get(group.send_weights.remote(1))["slot"] == 1  # version 1: slot 1
            for k, v in slots.views(1).items():
                np.testing.assert_allclose(v.numpy(), trained[k], rtol=1e-5, atol=1e-6, err_msg=k)
                np.testing.assert_allclose(exported[k], trained[k], rtol=1e-5, atol=1e-6, err_msg=k)
        finally:
            unlink_slots(spec)

        # The group's checkpoint resumes in a single learner, which then steps as the group does.
        saved = ray.get(group.save_checkpoint.remote(str(tmp_path / "group")))
        resumed = Learner(saved, group_cfg, device="cpu")
        assert resumed.load_checkpoint(saved) == 1
        b2 = make_batch(single, seed=2)
        before = weights(single)
        mine = single.train(b2)
        assert_same_step(ray.get(group.train.remote(b2)), mine)
        assert_same_step(resumed.train(b2), mine)
        assert_same_update(before, resumed.state_dict(), single.state_dict())
        if strategy == "ddp":
            # A rank failing on its own (rank 1 handed a checkpoint that is not there, while rank 0
            # trains and waits for it in the gradient all-reduce) ends its process; rank 0's collective
            # then fails at once and it ends too (the run restarts from its checkpoint), instead of
            # waiting out the group's 30-minute timeout. Rank 0's own such error comes back as it is.
            with pytest.raises(FileNotFoundError, match="value_head.safetensors is missing"):
                ray.get(group.ranks[0].load_checkpoint.remote(str(tmp_path / "none")))
            waiting = group.ranks[0].train.remote(b2)
            failed = group.ranks[1].load_checkpoint.remote(str(tmp_path / "none"))
            for ref in (failed, waiting):
                with pytest.raises(ray.exceptions.ActorDiedError):
                    ray.get(ref, timeout=120)
    finally:
        actors.stop(group)
    if strategy == "fsdp":  # and a single learner's checkpoint resumes in a group
        saved = single.save_checkpoint(tmp_path / "single")
        group = actors.start_learner(saved, group_cfg, learner_cfg=LearnerConfig(num_workers=2, strategy=strategy))
        try:
            assert ray.get(group.load_checkpoint.remote(saved)) == 2
            b3, before = make_batch(single, seed=3), weights(single)
            assert_same_step(ray.get(group.train.remote(b3)), single.train(b3))
            assert_same_update(before, ray.get(group.state_dict.remote()), single.state_dict())
        finally:
            actors.stop(group)
