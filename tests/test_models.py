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


def test_tokenizer_without_pad_token_pads_with_eos(policy_dir, tmp_path):
    """A backbone whose tokenizer has no pad token (GPT-2, Llama): inputs are padded with EOS, the RM's
    config.pad_token_id is EOS too, and batched rewards equal those of unpadded single sequences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.data.preferences import collate, encode_texts
    from rlhf_ray.models.reward import batch_rewards, init_reward_model
    from reference import rm_rewards

    tok = AutoTokenizer.from_pretrained(policy_dir)
    tok.pad_token = None
    lm = AutoModelForCausalLM.from_pretrained(policy_dir)
    lm.config.pad_token_id = None
    tok.save_pretrained(tmp_path), lm.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token_id is None
    ids, mask, _ = encode_texts(AutoTokenizer.from_pretrained(tmp_path), ["a b c d", "a"], 64)
    assert ids[1, mask[1].sum():].eq(tok.eos_token_id).all() and mask[1].sum() < mask[0].sum()

    model, rm_tok = init_reward_model(tmp_path, seed=1)
    assert rm_tok.pad_token_id == model.config.pad_token_id == tok.eos_token_id
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.eval()
    recs = synthetic.preference_records(6, seed=9)
    with torch.no_grad():
        batch = collate(recs, rm_tok, 64)
        got = batch_rewards(model, batch)
    assert batch.attention_mask.eq(0).any()  # the batch really is padded
    for b, r in enumerate(recs):
        want = rm_rewards(model, rm_tok, [r["prompt"]] * len(r["responses"]), r["responses"], 64)
        torch.testing.assert_close(got[b, :len(want)], torch.tensor(want), rtol=1e-5, atol=1e-5)
