"""``ray job submit -- rlhf-ray ...`` against a real ``ray start --head`` cluster that the test starts on
its own ports and temp dir and stops again, process by process (``ray stop`` would stop this session's
Ray too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def stop_cluster(temp_dir: str) -> None:
    """Kill the processes of the cluster whose temp dir is ``temp_dir`` (and nothing else)."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in mine:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, mine = psutil.wait_procs(mine, timeout=10)
        if not mine:
            return


def test_ray_job_submit_runs_ppo_on_a_cluster_of_its_own(ray_cluster, policy_dir, rm_dir, tmp_path):
    """The command the cluster guide shows (token auth on, as Ray 2.60 starts it), with the repo as the
    job's working directory and the installed rlhf-ray as its entrypoint: the job succeeds and its PPO run
    writes its metrics and policy; the suite's own cluster is untouched."""
    import ray

    bin_dir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # (short: Ray's socket paths live under it)
    # Every fixed default port of its own: this session's cluster holds the defaults (its dashboard
    # agent's 52365, for one, without which a job cannot be submitted).
    port, dashboard, agent, agent_grpc, env_agent, metrics, client = (free_port() for _ in range(7))
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(
        [str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
         f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
         "--num-cpus=4", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        out = tmp_path / "run"
        deadline = time.monotonic() + 60
        while True:  # the head's job agent comes up a little after `ray start` returns
            job = subprocess.run(
                [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir",
                 str(ROOT), "--", str(bin_dir / "rlhf-ray"), "ppo", "--address", "auto", "--policy", str(policy_dir),
                 "--rm-checkpoint", str(rm_dir), f"output_dir={out}", "ppo.iterations=1",
                 "ppo.prompts_per_iteration=4", "ppo.max_new_tokens=8", "ppo.eval_prompts=4", "rollout.num_workers=1"],
                env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
            said = job.stdout + job.stderr
            if "No available agent to submit job" not in said or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0 and "succeeded" in said, said[-5000:]
        steps = [json.loads(x)["step"] for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
        assert steps == [0, 1] and (out / "ppo" / "policy" / "model.safetensors").is_file()
    finally:
        stop_cluster(temp_dir)
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 4  # this session's cluster goes on
