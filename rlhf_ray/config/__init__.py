"""Typed, validated configuration: YAML in, frozen dataclasses out.

One file configures every stage; each stage reads its own section. A config error names the
field (``rm.lr``) and what is allowed. Command-line overrides use the same dotted names
(``rm.num_workers=2``). Configs are frozen: nothing mutates them while a job runs.

    schema.py   the sections and their fields (defaults and what each does)
    load.py     YAML and overrides -> a checked Config
"""

from rlhf_ray.config.load import load_config, parse_override, to_dict
from rlhf_ray.config.schema import (Config, ConfigError, DataConfig, LearnerConfig, ModelConfig, PPOConfig,
                                    RewardFunctionConfig, RMConfig, RolloutConfig, ServeConfig, SFTConfig)

__all__ = ["Config", "ConfigError", "DataConfig", "LearnerConfig", "ModelConfig", "PPOConfig", "RewardFunctionConfig",
           "RMConfig", "RolloutConfig", "ServeConfig", "SFTConfig", "load_config", "parse_override", "to_dict"]
