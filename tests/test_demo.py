"""`rlhf-ray demo` itself, at test size: every stage runs in order and the summary shows what the README
says it shows."""

from __future__ import annotations

import re

from ports import free_port


def test_the_demo_runs_its_four_stages_and_prints_both_tables(ray_cluster, test_config, policy_dir, tmp_path, capsys):
    from rlhf_ray.cli import main

    port = free_port()
    args = ["demo", f"model.cache_dir={test_config.model.cache_dir}", f"output_dir={tmp_path}", "data.num_train=120",
            "data.num_eval=40", "rm.epochs=1", "rm.num_workers=1", f"rm.storage_path={tmp_path / 'ray_runs'}",
            f"serve.port={port}", "serve.num_cpus=0.25", "ppo.iterations=2", "ppo.prompts_per_iteration=8",
            "ppo.eval_prompts=8", "ppo.checkpoint_every=0", "rollout.num_workers=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    stages = [out.index(f"== {i}/4 ") for i in range(1, 5)]
    assert stages == sorted(stages)
    assert f"POST http://127.0.0.1:{port}/score " in out and '"rewards": [' in out  # the service answered
    assert "trained RM (held-out top-1)" in out and "chance (mean 1/K)" in out
    assert re.search(r"eval reward \(rlhf_ray\.data\.synthetic:gold\)\s+[+-]\d\.\d{3}\s+[+-]\d\.\d{3}", out), out[-2000:]
    assert "[ppo] placement: colocated" in out and re.search(r"demo took \d+ s", out)
    assert (tmp_path / "ppo" / "ppo.png").is_file() and (tmp_path / "rm" / "rm_curves.png").is_file()
