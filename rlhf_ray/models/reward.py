"""The reward model: a causal-LM backbone with a scalar head on the last token, R(x, y) -> float.

It is Hugging Face's ``AutoModelForSequenceClassification`` with ``num_labels=1`` (the head reads the
last non-pad token: the EOS every input ends with, or the token before it for a tokenizer without a pad
token, which pads with EOS), so a saved RM is an ordinary model directory (safetensors + config + tokenizer)
that loads without Ray and without this package.
"""

from __future__ import annotations

import json

from pathlib import Path

import torch

from rlhf_ray.data.preferences import RMBatch


def init_reward_model(backbone: str | Path, seed: int = 0):
    """A fresh RM on a pretrained backbone (the SFT policy); the scalar head starts near zero."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    if tokenizer.pad_token is None:  # GPT-2, Llama: pad with EOS, in the saved tokenizer and config alike
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        backbone, num_labels=1, dtype=torch.float32, pad_token_id=tokenizer.pad_token_id)
    torch.nn.init.normal_(model.score.weight, std=1e-3)
    return model, tokenizer


RM_SETTINGS_FILE = "rm_settings.json"  # what scoring needs to see the inputs as training did, beside the weights
DEFAULT_MAX_LENGTH = 64  # rm.max_length's default: checkpoints written without the settings file were trained at it


def save_rm_settings(path: str | Path, max_length: int) -> None:
    """Record with an RM checkpoint what scoring needs besides the weights and the tokenizer (whose chat
    template the checkpoint already holds): the max length of its inputs (rm.max_length)."""
    (Path(path) / RM_SETTINGS_FILE).write_text(json.dumps({"max_length": int(max_length)}) + "\n")


def rm_max_length(path: str | Path, default: int = DEFAULT_MAX_LENGTH) -> int:
    """The input length an RM checkpoint was trained at (its settings file), ``default`` without one."""
    settings = Path(path) / RM_SETTINGS_FILE
    return int(json.loads(settings.read_text())["max_length"]) if settings.is_file() else default


def load_reward_model(path: str | Path):
    """Load a saved RM directory (safetensors only: never unpickles)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if not (path / "model.safetensors").exists() and not list(path.glob("model-*.safetensors")):
        raise FileNotFoundError(f"{path}: no model.safetensors (an RM directory or Ray Train checkpoint is expected)")
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def batch_rewards(model, batch: RMBatch) -> torch.Tensor:
    """Rewards of a collated group, float [B, Kmax] (padding slots hold copies; mask with ``valid``)."""
    from rlhf_ray.models.causal_lm import model_attention_mask

    # (N,); the score is read at each row's last real token, found from the pad token (right padding)
    flat = model(input_ids=batch.input_ids, attention_mask=model_attention_mask(batch.attention_mask),
                 use_cache=False).logits[:, 0]
    return flat[batch.index]
