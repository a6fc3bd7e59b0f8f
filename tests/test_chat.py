"""One rendering of chats for the engines and the RM (rlhf_ray.data.chat), checked against the
tokenizer by hand: no second BOS or EOS, the same token ids in training and in scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import CHAT_TEMPLATE

from rlhf_ray.data import synthetic
from rlhf_ray.data.chat import ChatRenderer, resolve_chat_template, rm_text

CHAT = [{"role": "user", "content": "review of the lamp :"}]


@pytest.fixture(scope="module")
def tok(policy_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy_dir)


def test_a_template_that_writes_bos_and_eos_gets_neither_twice(tok):
    r = ChatRenderer(tok, CHAT_TEMPLATE)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    text = "<s>user : review of the lamp :</s>\nassistant : the bulb is great .</s>"
    assert r.pair_text(CHAT, "the bulb is great .") == text  # the trailing newline after the last turn goes
    ids = r.pair_ids(CHAT, "the bulb is great .")
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1 and ids[-1] == eos and ids[-2] != eos
    assert ids.count(eos) == 2  # one per turn, none added
    # The engines' prompt: rendered with the generation prompt, its one BOS from the template.
    prompt = tok("<s>user : review of the lamp :</s>\nassistant :", add_special_tokens=False)["input_ids"]
    assert r.prompt_ids(CHAT) == prompt and prompt.count(bos) == 1
    # A response given as messages renders the same as its text.
    assert r.pair_ids(CHAT, [{"role": "assistant", "content": "the bulb is great ."}]) == ids


def test_a_template_without_bos_or_eos_gets_them_from_the_tokenizer(tok):
    r = ChatRenderer(tok, "{% for m in messages %}{{ m['content'] }} {% endfor %}")
    ids = r.pair_ids(CHAT, "the bulb is great .")
    assert ids == tok("review of the lamp : the bulb is great .")["input_ids"] + [tok.eos_token_id]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_plain_pairs_keep_their_rule(tok):
    """Text prompts are not touched by a template: BOS (the tokenizer's) + prompt, a space, the
    stripped response + EOS, as the RM was always trained."""
    r = ChatRenderer(tok, CHAT_TEMPLATE)
    assert rm_text("review of the lamp :", " the bulb is great . ") == "review of the lamp : the bulb is great ."
    assert rm_text("", " whole text ") == "whole text" and rm_text("q\n", "a") == "q\na"
    assert r.pair_ids("review of the lamp :", " the bulb is great .") == \
        tok("review of the lamp : the bulb is great .")["input_ids"] + [tok.eos_token_id]
    assert r.prompt_ids("review of the lamp :") == tok("review of the lamp :")["input_ids"]
    # A text that already holds BOS and ends in EOS (rendered elsewhere) gets neither again.
    assert r.text_ids("<s>a b</s>") == tok("<s>a b</s>", add_special_tokens=False)["input_ids"]


def test_training_and_scoring_see_the_same_token_ids(tok, policy_dir, tmp_path):
    """The RM's input for a chat pair is the same in training (collate) and in scoring (RewardScorer,
    which reads the template training stored in the checkpoint): same ids, same rewards."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.preferences import collate, pad_sequences
    from rlhf_ray.models.reward import batch_rewards, init_reward_model
    from rlhf_ray.reward.scorer import RewardScorer
    from rlhf_ray.reward.train import save_checkpoint

    model, rm_tok = init_reward_model(policy_dir, seed=2)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.eval()
    renderer = ChatRenderer(rm_tok, CHAT_TEMPLATE)
    renderer.apply_to()  # as the Ray Train loop does before saving
    ckpt = save_checkpoint(model, rm_tok, torch.optim.AdamW(model.parameters()), {"epoch": 0}, tmp_path / "rm")
    assert AutoTokenizer.from_pretrained(ckpt).chat_template == CHAT_TEMPLATE

    records = [synthetic.as_chat(r) for r in synthetic.preference_records(5, seed=4)]
    batch = collate(records, renderer, max_length=64)
    scorer = RewardScorer(ckpt, max_length=64)  # data.chat_template=auto: the checkpoint's
    prompts = [r["prompt"] for r in records for _ in r["responses"]]
    responses = [y for r in records for y in r["responses"]]
    ids, mask, _ = pad_sequences(scorer.renderer.pairs_ids(prompts, responses), scorer.renderer, 64)
    torch.testing.assert_close(ids, batch.input_ids, rtol=0, atol=0)
    torch.testing.assert_close(mask, batch.attention_mask, rtol=0, atol=0)
    assert (batch.input_ids[:, 0] == tok.bos_token_id).all()
    with torch.no_grad():
        trained = batch_rewards(model, batch)[batch.valid]
    np.testing.assert_allclose(scorer.score_flat(prompts, responses).rewards, trained.numpy(), rtol=1e-5, atol=1e-5)


def test_the_templates_end_of_turn_token_stops_generation(tok):
    pad, eos = tok.pad_token_id, tok.eos_token_id
    assert ChatRenderer(tok, CHAT_TEMPLATE).stop_token_ids() == [eos]
    other = "{% for m in messages %}{{ m['content'] }}<pad>\n{% endfor %}"
    assert ChatRenderer(tok, other).stop_token_ids() == [pad]
    assert ChatRenderer(tok, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}").stop_token_ids() == []
    assert ChatRenderer(tok, "auto").stop_token_ids() == []  # no template at all


def test_a_chat_without_a_template_names_the_setting(tok, tmp_path):
    with pytest.raises(ValueError, match="has no chat template; set data.chat_template to a Jinja file"):
        ChatRenderer(tok, "auto").pair_text(CHAT, "x")
    with pytest.raises(ValueError, match="data.chat_template=none"):
        ChatRenderer(tok, "none").prompt_ids(CHAT)
    f = tmp_path / "t.jinja"
    f.write_text(CHAT_TEMPLATE)
    assert resolve_chat_template(str(f)) == CHAT_TEMPLATE
    assert resolve_chat_template("auto") == "auto" and resolve_chat_template("none") == "none"
    with pytest.raises(ValueError, match="data.chat_template: 'nope.jinja' is neither 'auto', 'none' nor a Jinja file"):
        resolve_chat_template("nope.jinja")
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(ValueError, match="holds no Jinja template"):
        resolve_chat_template(str(tmp_path / "plain.txt"))
