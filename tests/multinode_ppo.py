"""PPO on a Ray cluster of several nodes on one machine (``ray.cluster_utils.Cluster``: a raylet per node,
each with its own resources). A driver joins one cluster per process, so tests/test_multinode.py runs
this in a process of its own:

    python tests/multinode_ppo.py POLICY_DIR RM_DIR OUT_DIR

Nodes: a head for the driver alone, two "trainer" nodes (the learner's ranks, the reference policy, the
scorer) and a "rollout" node (the vLLM engine), placed by learner.node_resource and rollout.node_resource.
Run A: one learner, weights through the object store, uninterrupted. Run B: two learner ranks
(FSDP) spread over the trainer nodes, weights broadcast to the engine (rollout.weight_sync=collective);
after iteration 1 one trainer node is removed and a replacement added. B restarts from its iteration-1
checkpoint (ppo.max_failures) and must end with A's metrics and weights. Exits 1 on a failed check.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import ray
from ray.cluster_utils import Cluster

from rlhf_ray.ppo.nodes import node_of


def main(policy_dir: str, rm_dir: str, out: str) -> None:
    from safetensors.numpy import load_file

    from rlhf_ray.config import load_config
    from rlhf_ray.ppo.driver import run_ppo
    from rlhf_ray.runtime import quiet_libraries

    quiet_libraries()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    trainer = [cluster.add_node(num_cpus=n, resources={"trainer": 1}) for n in (2, 1)]
    rollout = cluster.add_node(num_cpus=1, resources={"rollout": 1})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cfg = load_config(None, [
        "ppo.iterations=2", "ppo.prompts_per_iteration=8", "ppo.max_new_tokens=8", "ppo.minibatch_size=4",
        "ppo.checkpoint_every=1", "ppo.max_failures=1", "ppo.eval_prompts=8",
        "rollout.num_workers=1", "rollout.node_resource=rollout", "learner.node_resource=trainer"])
    a = run_ppo(cfg, policy_dir, rm_dir, Path(out) / "a", log=lambda *_: None, eval_every=0)

    seen, lines = {}, []

    def swap_a_trainer_node(m, ctx):
        if m["iteration"] == 1 and not seen:
            seen["rollout"] = node_of(ctx.pool.workers[0])
            seen["ranks"] = [node_of(r) for r in ctx.learner.ranks]
            cluster.remove_node(trainer[1])
            cluster.add_node(num_cpus=1, resources={"trainer": 1})

    two = dataclasses.replace(
        cfg, learner=dataclasses.replace(cfg.learner, num_workers=2, strategy="fsdp", placement_strategy="SPREAD"),
        rollout=dataclasses.replace(cfg.rollout, weight_sync="collective"))
    b = run_ppo(two, policy_dir, rm_dir, Path(out) / "b", log=lines.append, eval_every=0,
                on_iteration=swap_a_trainer_node)

    check(seen.get("rollout") == rollout.node_id, f"the rollout worker ran on {seen.get('rollout')}, "
          f"not on the rollout node {rollout.node_id}")
    check(sorted(seen["ranks"]) == sorted(n.node_id for n in trainer), f"the learner's ranks ran on {seen['ranks']}")
    restarts = [x for x in lines if "restarting the PPO actors" in x]
    check(len(restarts) == 1 and "iter_000001 (failure 1" in restarts[0], "\n".join(lines))
    # Engines on another node than the learner: "auto" takes the object store (each engine copies the
    # buckets in place); B broadcasts to them.
    for r, mode in ((a, "in_place"), (b, "collective")):
        check({h["sync_mode"] for h in r.history} == {mode}, str([h["sync_mode"] for h in r.history]))
    check([h["iteration"] for h in b.history] == [1, 2], str(b.history))
    for ha, hb in zip(a.history, b.history):
        for k in ("reward", "rm_score", "kl_ref", "policy_loss", "value_loss", "entropy", "grad_norm"):
            check(abs(ha[k] - hb[k]) <= 1e-4 * abs(ha[k]) + 1e-6, f"iteration {ha['iteration']} {k}: {ha[k]} vs {hb[k]}")
    wa, wb = (load_file(str(r.policy_dir / "model.safetensors")) for r in (a, b))
    check(max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) < 1e-5, "final weights differ")
    print("multinode: ok;", restarts[0])
    ray.shutdown()
    cluster.shutdown()


def check(ok: bool, what: str) -> None:
    if not ok:
        print(f"multinode: FAILED: {what}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
