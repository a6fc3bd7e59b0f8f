"""The cluster as a cluster, on one machine: tests/multinode_ppo.py in its own process (a driver joins one
Ray cluster, and this session's is another)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def test_ppo_across_nodes_placed_by_resource_survives_losing_a_node(policy_dir, rm_dir, tmp_path):
    """Roles placed by node resource, batches and weights crossing nodes, a trainer node removed and
    replaced mid-run: the run restarts from its checkpoint and ends as the uninterrupted run
    (what is checked: tests/multinode_ppo.py)."""
    script = Path(__file__).with_name("multinode_ppo.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parents[1]), os.environ.get("PYTHONPATH", "")])}
    # Its own session: on a timeout the whole process group goes (the script's Ray cluster, raylets and
    # workers with it), before pytest's own timeout (900 s) could kill this test and leave them running.
    proc = subprocess.Popen([sys.executable, str(script), str(policy_dir), str(rm_dir), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=780)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"multinode_ppo.py ran past 780 s; its process group was killed\n{out[-6000:]}") from None
    assert proc.returncode == 0 and "multinode: ok" in out, out[-6000:]
