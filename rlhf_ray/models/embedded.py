"""The embedded default model: a tiny byte-level BPE tokenizer and Llama-family causal LM, built
locally and deterministically from a seed (no network), in Hugging Face format (safetensors).

The directory loads with ``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained`` and with vLLM.
Any Hugging Face model path or name can be used in its place (see :func:`resolve_model`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from rlhf_ray.config import ModelConfig, SFTConfig
from rlhf_ray.data import synthetic
from rlhf_ray.progress import Bar, eta

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def _key(cfg: ModelConfig) -> str:
    spec = {k: getattr(cfg, k) for k in ("seed", "hidden_size", "num_layers", "num_heads",
                                         "intermediate_size", "vocab_size", "max_positions")}
    spec["format"] = 1
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def build_tokenizer(vocab_size: int, seed: int):
    """Train a byte-level BPE on the synthetic corpus; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [f"{p} {r}" for p, r in synthetic.corpus(4000, seed)]
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="right", model_max_length=None)


def build_model(cfg: ModelConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def atomic_save_model(model, tokenizer, dest: Path) -> Path:
    """Save an HF model dir to a temp dir next to ``dest`` and rename, so a crash never leaves a half model."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def embedded_base(cfg: ModelConfig) -> Path:
    """Build (or reuse from cache) the untrained embedded model; returns its directory."""
    dest = Path(cfg.cache_dir).resolve() / f"embedded-{_key(cfg)}" / "base"
    if (dest / "config.json").exists():
        return dest
    tokenizer = build_tokenizer(cfg.vocab_size, cfg.seed)
    return atomic_save_model(build_model(cfg, tokenizer), tokenizer, dest)


def sft(base_dir: Path, cfg: SFTConfig, dest: Path, log=print) -> Path:
    """Briefly train the causal LM on synthetic (prompt, response) text so it writes well-formed
    reviews; loss only on response tokens (and EOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / cfg.steps))
    data = synthetic.corpus(cfg.steps * cfg.batch_size, seed=1000 + cfg.seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    start, bar = time.perf_counter(), Bar(cfg.steps, "[sft]", log)
    for step in range(cfg.steps):
        chunk = data[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        seqs, labels = [], []
        for prompt, response in chunk:
            p = tokenizer(prompt)["input_ids"]
            r = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [eos]
            seqs.append(p + r)
            labels.append([-100] * len(p) + r)
        length = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (length - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (length - len(s)) for s in labels])
        attn = (torch.arange(length)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=attn, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update()
        if (step + 1) % 100 == 0 or step == cfg.steps - 1:
            bar.log(f"[sft] step {step + 1}/{cfg.steps} loss {loss.item():.3f} "
                    f"({eta(step + 1, cfg.steps, time.perf_counter() - start)})")
    bar.close()
    model.eval()
    return atomic_save_model(model, tokenizer, Path(dest))


def resolve_model(cfg: ModelConfig, sft_cfg: SFTConfig | None = None, log=print) -> Path | str:
    """The policy to start from: the embedded model (built, then SFT'd, both cached) or a HF path/name."""
    if cfg.name_or_path != "embedded":
        return cfg.name_or_path
    base = embedded_base(cfg)
    if sft_cfg is None:
        return base
    key = hashlib.sha256(json.dumps(sft_cfg.__dict__, sort_keys=True).encode()).hexdigest()[:8]
    dest = base.parent / f"sft-{key}"
    if (dest / "config.json").exists():
        return dest
    log(f"[sft] training the embedded policy ({sft_cfg.steps} steps) -> {dest}")
    return sft(base, sft_cfg, dest, log=log)
