"""What a PPO job runs on: its prompts, held-out prompts and evaluation function, read and checked
before Ray starts (so a bad file is reported in seconds, naming the file, line and field)."""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.config import Config, ConfigError
from rlhf_ray.data.prompts import PromptTask
from rlhf_ray.ppo.checkpoints import model_config


def prepare_task(cfg: Config, policy_dir: str | Path) -> PromptTask:
    """The prompts, held-out prompts and evaluation function of ``cfg.ppo``, read and checked (local
    files before Ray starts; remote URIs need a Ray cluster), and the engines' size checked against the
    policy's config (``check_engine_fit``). Raises ConfigError or DataError naming the field or file."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.chat import ChatRenderer, resolve_chat_template
    from rlhf_ray.data.prompts import load_prompt_task
    from rlhf_ray.ppo.engine import check_engine_fit
    from rlhf_ray.reward.functions import RewardFunctionError, load_eval_function, load_reward_functions

    template = resolve_chat_template(cfg.data.chat_template)
    policy_config = model_config(policy_dir, f"the policy ({policy_dir})")
    check_engine_fit(policy_config, cfg.ppo.max_prompt_tokens, cfg.ppo.max_new_tokens, cfg.rollout,
                     on_gpu=cfg.rollout.gpus_per_worker > 0)
    task = load_prompt_task(cfg.ppo, ChatRenderer(AutoTokenizer.from_pretrained(str(policy_dir)), template))
    try:  # importable here, from the driver's working directory (they travel to the scorer by value)
        load_reward_functions(cfg.ppo.reward_functions)
        load_eval_function(task.eval_reward)
    except RewardFunctionError as e:
        raise ConfigError(str(e)) from None
    if cfg.ppo.multi_turn:  # the tools, environments and chat template, checked before Ray starts
        from rlhf_ray.ppo.tool_calls import ToolTemplate
        from rlhf_ray.ppo.toolbox import Toolbox, ToolSpec

        try:
            Toolbox(ToolSpec.from_config(cfg.ppo))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        renderer = ChatRenderer(AutoTokenizer.from_pretrained(str(policy_dir)), template)
        try:
            ToolTemplate(renderer.tokenizer, renderer.template, renderer.stop_token_ids())
        except ValueError as e:
            raise ConfigError(f"data.chat_template: {e}") from None
    return task
