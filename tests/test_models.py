import torch
from safetensors.torch import load_file

from rlhf_ray.config import ModelConfig
from rlhf_ray.data import synthetic
from rlhf_ray.models.embedded import build_model, build_tokenizer, embedded_base


def test_embedded_build_is_deterministic(tmp_path):
    cfg = ModelConfig(cache_dir=str(tmp_path), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    t1, t2 = build_tokenizer(cfg.vocab_size, 0), build_tokenizer(cfg.vocab_size, 0)
    assert t1.get_vocab() == t2.get_vocab()
    m1, m2 = build_model(cfg, t1), build_model(cfg, t2)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    d = embedded_base(cfg)
    assert (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()
    mtime = (d / "model.safetensors").stat().st_mtime
    assert embedded_base(cfg) == d and (d / "model.safetensors").stat().st_mtime == mtime  # cached
    saved = load_file(d / "model.safetensors")
    assert torch.equal(saved["model.embed_tokens.weight"], m1.state_dict()["model.embed_tokens.weight"])


def test_tokenizer_round_trip_words_are_tokens(policy_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    text = "review of the blender : the motor is great and the armrest is really flimsy ."
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) == 1 + len(text.split())  # every word of the language is one token


def test_sft_policy_writes_well_formed_reviews(policy_dir):
    """The SFT'd model loads with AutoModelForCausalLM and samples fluent reviews (few unknown words)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    tok.padding_side = "left"  # generation continues after the prompt
    prompts = synthetic.prompts(32, seed=5)
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=24, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    parts = [synthetic.gold_breakdown(p, t) for p, t in zip(prompts, texts)]
    assert sum(b.unknown for b in parts) <= 2
    assert sum(b.clauses >= 1 for b in parts) >= 28
    # the SFT corpus mixes sentiment: the untuned policy is far from the gold optimum of 1.5
    assert -0.7 < sum(b.score for b in parts) / len(parts) < 0.9
