"""The cluster as a cluster, on one machine: tests/multinode_ppo.py in its own process (a driver joins one
Ray cluster, and this session's is another)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_ppo_across_nodes_placed_by_resource_survives_losing_a_node(policy_dir, rm_dir, tmp_path):
    """Roles placed by node resource, batches and weights crossing nodes, a trainer node removed and
    replaced mid-run: the run restarts from its checkpoint and ends as the uninterrupted run
    (what is checked: tests/multinode_ppo.py)."""
    script = Path(__file__).with_name("multinode_ppo.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(policy_dir), str(rm_dir), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "multinode: ok" in done.stdout, out[-6000:]
