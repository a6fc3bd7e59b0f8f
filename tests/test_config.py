import dataclasses

import pytest

from rlhf_ray.cli import main
from rlhf_ray.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rm:\n  num_workers: 3\n  lr: 0.01\nppo:\n  gamma: 0.9\n")
    cfg = load_config(f, ["rm.lr=2e-3", "data.max_k=5"])
    assert cfg.rm.num_workers == 3 and cfg.rm.lr == 2e-3 and cfg.ppo.gamma == 0.9 and cfg.data.max_k == 5
    assert cfg.sft.steps == 300 and cfg.rm.epochs == 6 and cfg.ppo.lam == 0.95  # untouched fields: the defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rm.lr = 1.0  # frozen


def test_a_misspelt_field_gets_a_suggestion_and_a_bad_file_value_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"rm: unknown field\(s\) \['num_worker'\]; did you mean rm.num_workers "
                                          r"\(not num_worker\)\? allowed: \["):
        load_config(None, ["rm.num_worker=2"])
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  gamma: 2\n")
    with pytest.raises(ConfigError, match=rf"^ppo.gamma: must be in \[0, 1\], got 2.0 \(in config file {f}\)$"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"^ppo.gamma: must be in \[0, 1\], got 3.0$"):  # the override's value
        load_config(f, ["ppo.gamma=3"])
    assert load_config(f, ["ppo.gamma=0.5"]).ppo.gamma == 0.5  # an override mends the file


def test_cli_version_and_serve_rm_refusing_an_open_public_host(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("rlhf-ray 0.1")
    monkeypatch.delenv("RLHF_RAY_SERVE_TOKEN", raising=False)
    assert main(["serve-rm", "--checkpoint", "nowhere", "--host", "0.0.0.0", "--port", "8123"]) == 2
    err = capsys.readouterr().err
    assert "serve.host=0.0.0.0 reaches other machines, and no bearer token is set: set $RLHF_RAY_SERVE_TOKEN" in err
    assert "serve.allow_unauthenticated=true" in err


@pytest.mark.parametrize("override, needle", [
    ("rm.num_workers=two", "rm.num_workers: expected an integer"),
    ("rm.bogus=1", "rm: unknown field(s) ['bogus']; allowed:"),
    ("nosection.x=1", "top level: unknown field(s) ['nosection']"),
    ("ppo.gamma=1.5", "ppo.gamma: must be in [0, 1]"),
    ("rm.use_gpu=maybe", "rm.use_gpu: expected true or false"),
    ("data.min_k=1", "data.min_k/data.max_k"),
    ("rm.lr=0", "rm.lr: must be > 0"),
    ("model.num_heads=3", "model.hidden_size: 128 is not divisible by model.num_heads=3"),
    ("rm.epochs", "expected section.field=value"),
    ("ppo.max_failures=-2", "ppo.max_failures: must be >= 0, or -1 for no limit, got -2"),
    ("rm.max_failures=-5", "rm.max_failures: must be >= 0, or -1"),
    ("rollout.gpu_memory_utilization=1.2", "rollout.gpu_memory_utilization: must be in (0, 1], got 1.2"),
    ("rollout.gpu_memory_utilization=0", "rollout.gpu_memory_utilization: must be in (0, 1], got 0.0"),
    ("ppo.top_p=0", "ppo.top_p: must be in (0, 1], got 0.0"),
    ("ppo.lam=-0.1", "ppo.lam: must be in [0, 1], got -0.1"),
    ("ppo.kl_horizon=0", "ppo.kl_horizon: must be > 0, got 0"),
    ("ppo.value_clip_eps=-0.2", "ppo.value_clip_eps: must be >= 0, got -0.2"),
    ("rm.cpus_per_worker=-1", "rm.cpus_per_worker: must be >= 0, got -1.0"),
    ("serve.num_cpus=-2", "serve.num_cpus: must be >= 0, got -2.0"),
    ("serve.batch_wait_timeout_s=-1", "serve.batch_wait_timeout_s: must be >= 0, got -1.0"),
    ("serve.target_ongoing_requests=0", "serve.target_ongoing_requests: must be > 0, got 0.0"),
    ("serve.look_back_period_s=10", "serve.look_back_period_s: must be more than 10 s (how often Serve's "
                                    "replicas report their load), got 10"),
    ("rollout.cpus_per_worker=-1", "rollout.cpus_per_worker: must be >= 0, got -1.0"),
    ("rollout.max_logprob_drift=-1e-3", "rollout.max_logprob_drift: must be >= 0, got -0.001"),
    ("rollout.dtype=fp8", "rollout.dtype: 'fp8' is not one of ['auto', 'float32', 'bfloat16', 'float16']"),
    ("rm.max_length=129", "rm.max_length: 129 tokens exceed the embedded model's model.max_positions=128"),
    ("rollout.gpus_per_worker=0.5", "rollout.gpu_memory_utilization: 0.9 of a GPU per engine, but "
                                    "rollout.gpus_per_worker=0.5"),
])
def test_errors_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def _ranged_fields():
    from rlhf_ray.config import Config

    for section in dataclasses.fields(Config):
        if dataclasses.is_dataclass(section.default_factory):  # a section, not a top-level field
            for f in dataclasses.fields(section.default_factory):
                if "range" in f.metadata:
                    yield f"{section.name}.{f.name}", f.metadata["range"], f.default


# A value just outside each rule, and one on its edge that it allows.
OUTSIDE = {"positive": (0, 1), "at_least_zero": (-1, 0), "unit": (1.5, 1), "fraction": (0, 1), "count_or_unlimited": (-2, -1)}


def test_every_ranged_field_is_checked_where_it_is_declared():
    """Each field whose declaration carries a range refuses a value outside it (naming the field and the
    rule) and takes one on its edge; the defaults satisfy their own rules."""
    seen = set()
    for name, rule, _ in _ranged_fields():
        bad, edge = OUTSIDE[rule]
        with pytest.raises(ConfigError, match=rf"^{name}: must be .*, got {bad}"):
            load_config(None, [f"{name}={bad}"])
        try:
            load_config(None, [f"{name}={edge}"])
        except ConfigError as e:  # a rule across fields (e.g. max_replicas >= min_replicas) may still refuse it
            assert not str(e).startswith(f"{name}: must be"), e
        seen.add(rule)
    assert seen == set(OUTSIDE) and len(list(_ranged_fields())) > 70


def test_tools_and_environments_as_trl_names_them():
    """ppo.tools is a list of "module:function" (one bare name too); ppo.environment one factory or a
    mapping name -> factory; multi-turn rollouts need a group estimator (their responses have gaps)."""
    group = ["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=2"]
    cfg = load_config(None, ["ppo.tools=[calc:add, calc:mul]", "ppo.environment={maze: envs:Maze, quiz: envs:Quiz}",
                             "ppo.max_tool_calling_iterations=3", *group])
    assert cfg.ppo.tools == ("calc:add", "calc:mul") and cfg.ppo.environment == {"maze": "envs:Maze", "quiz": "envs:Quiz"}
    assert cfg.ppo.max_tool_calling_iterations == 3 and cfg.ppo.multi_turn
    cfg = load_config(None, ["ppo.tools=calc:add", "ppo.environment=envs:Maze", *group])
    assert cfg.ppo.tools == ("calc:add",) and cfg.ppo.environment == "envs:Maze"
    defaults = load_config(None, []).ppo
    assert (defaults.tools, defaults.environment, defaults.max_tool_calling_iterations) == ((), "", -1)
    assert not defaults.multi_turn
    for overrides, message in [
        (["ppo.tools=[calc:add, calc]"], "ppo.tools[1]: expected 'module:function'"),
        (["ppo.environment={maze: Maze}"], "ppo.environment.maze: expected 'module:function'"),
        (["ppo.environment={maze: [envs:Maze]}"], "ppo.environment: expected a mapping of names to strings"),
        (["ppo.environment=envs"], "ppo.environment: expected 'module:function'"),
        (["ppo.max_tool_calling_iterations=-2"], "ppo.max_tool_calling_iterations: must be >= 0, or -1 for no limit"),
        (["ppo.tool_timeout_s=0"], "ppo.tool_timeout_s: must be > 0, got 0.0"),
        (["ppo.tools=[calc:add]"], "ppo.advantage_estimator=gae: multi-turn rollouts (ppo.tools, ppo.environment) "
                                   "leave gaps in a response (the tool turns), which it does not take; use one of "
                                   "['grpo', 'rloo']"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(None, overrides + (group if "estimator" not in message else []))
        assert str(e.value).startswith(message), str(e.value)


def test_rollout_dtype_and_drift_limit_defaults():
    rc = load_config(None, []).rollout
    assert (rc.dtype, rc.max_logprob_drift) == ("auto", 0.0)  # 0: the limit follows the engines' dtype
    rc = load_config(None, ["rollout.dtype=bfloat16", "rollout.max_logprob_drift=0.2"]).rollout
    assert (rc.dtype, rc.max_logprob_drift) == ("bfloat16", 0.2)


def test_rm_max_length_is_only_bounded_for_the_embedded_model():
    cfg = load_config(None, ["rm.max_length=128", "serve.batch_wait_timeout_s=0", "rm.cpus_per_worker=0"])
    assert (cfg.rm.max_length, cfg.serve.batch_wait_timeout_s, cfg.rm.cpus_per_worker) == (128, 0.0, 0.0)
    assert load_config(None, ["model.name_or_path=gpt2", "rm.max_length=1024"]).rm.max_length == 1024
    assert load_config(None, ["model.max_positions=256", "rm.max_length=200"]).rm.max_length == 200


def test_fractional_gpus_per_engine_with_a_matching_memory_share():
    cfg = load_config(None, ["rollout.gpus_per_worker=0.5", "rollout.gpu_memory_utilization=0.45",
                             "ppo.max_failures=-1"])
    assert (cfg.rollout.gpus_per_worker, cfg.rollout.gpu_memory_utilization, cfg.ppo.max_failures) == (0.5, 0.45, -1)


def test_bad_yaml_file_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rm: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_help_lists_stages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for stage in ("build-model", "make-data", "train-rm", "serve-rm", "ppo", "demo"):
        assert stage in out
    with pytest.raises(SystemExit):
        main(["train-rm", "--help"])
    assert "--config" in capsys.readouterr().out


def test_cli_config_error_exit_code(capsys):
    assert main(["make-data", "data.max_k=oops"]) == 2
    assert "data.max_k: expected an integer" in capsys.readouterr().err


def test_cli_ppo_without_rm_checkpoint_says_what_to_do(tmp_path, capsys):
    assert main(["ppo", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "--rm-checkpoint" in err and "rlhf-ray train-rm" in err


def test_cli_make_data_writes_the_records_and_prints_the_ceiling(tmp_path, capsys):
    """`rlhf-ray make-data`: the synthetic train/eval files at the configured sizes, K within
    data.min_k..max_k, and the printed ceiling is the gold reward's top-1 accuracy on the eval file."""
    from rlhf_ray.data import synthetic
    from rlhf_ray.data.preferences import read_jsonl

    assert main(["make-data", f"output_dir={tmp_path}", "data.num_train=30", "data.num_eval=12"]) == 0
    out = capsys.readouterr().out
    train, evals = (read_jsonl(next((tmp_path / "data").glob(f"prefs_{s}.jsonl"))) for s in ("train", "eval"))
    assert (len(train), len(evals)) == (30, 12)
    cfg = load_config(None, [])
    assert all(cfg.data.min_k <= len(r["responses"]) <= cfg.data.max_k and 0 <= r["best"] < len(r["responses"])
               for r in train + evals)
    assert f"(ceiling): {synthetic.gold_top1_accuracy(evals):.3f}" in out
    # Run again: the same files (deterministic from data.seed), not appended to.
    assert main(["make-data", f"output_dir={tmp_path}", "data.num_train=30", "data.num_eval=12"]) == 0
    assert read_jsonl(tmp_path / "data" / "prefs_train.jsonl") == train


def test_show_config_prints_every_field_with_its_comment_and_loads_back(tmp_path, capsys):
    """`rlhf-ray show-config` is a complete, commented config file: loaded back it gives the same config."""
    overrides = ["ppo.iterations=7", "ppo.reward_functions=[{name: 'm:f', weight: 0.5}]"]
    assert main(["show-config", *overrides]) == 0
    text = capsys.readouterr().out
    (tmp_path / "all.yaml").write_text(text)
    cfg = load_config(tmp_path / "all.yaml")
    assert cfg == load_config(None, overrides) and cfg.ppo.iterations == 7
    sections = [f for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    n_fields = sum(len(dataclasses.fields(getattr(cfg, s.name))) for s in sections)
    assert sum(line.startswith("  ") and not line.startswith("  #") for line in text.splitlines()) == n_fields
    # The schema's comment above a field (and one after it on its line) comes with it.
    assert "  # A Hugging Face model path or hub name; \"embedded\" builds the tiny local model (no download).\n" \
           "  name_or_path: embedded\n" in text
    assert "  # records (prompts) per worker per step; each has K_n candidates\n  batch_size: 8\n" in text


def test_the_shipped_config_reference_is_show_configs_output_and_loads():
    """examples/config.yaml is `rlhf-ray show-config` verbatim (every field, its default and its comment,
    from the schema: regenerate it with `rlhf-ray show-config > examples/config.yaml`), and it loads to
    the defaults; the SmolLM2 example's config loads too."""
    from pathlib import Path

    from rlhf_ray.config.describe import describe_config
    from rlhf_ray.config.load import to_dict

    root = Path(__file__).resolve().parents[1]
    assert (root / "examples" / "config.yaml").read_text() == describe_config(load_config())
    assert to_dict(load_config(root / "examples" / "config.yaml")) == to_dict(load_config())
    smollm2 = load_config(root / "examples" / "smollm2" / "config.yaml")
    assert smollm2.model.name_or_path == "runs/smollm2/model" and smollm2.ppo.reward_functions
