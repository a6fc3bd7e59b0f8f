import json
import math
import os

import pytest

from rlhf_ray.config import DataConfig
from rlhf_ray.data import synthetic
from rlhf_ray.data.prepare import prepare_preference_data
from rlhf_ray.data.preferences import DataError, collate, read_jsonl


def test_gold_reward_hand_computed():
    p = synthetic.make_prompt("blender")
    assert synthetic.gold_reward(p, "the motor is great and the blade is solid .") == 1.5
    assert synthetic.gold_reward(p, "the motor is awful .") == -1 + 0.5
    # one positive one negative adjective, one on- and one off-topic noun
    assert synthetic.gold_reward(p, "the motor is great and the keyboard is broken .") == 0.0
    # an unknown word costs 0.25; no clause at all costs 0.5
    assert synthetic.gold_reward(p, "the motor is great zzz .") == 1.5 - 0.25
    assert synthetic.gold_reward(p, "the is .") == -0.5
    # length-invariant: repeating a clause earns nothing
    assert synthetic.gold_reward(p, "the jar is great and the jar is great .") == 1.5


def test_preference_records_vary_k_and_follow_the_label_model():
    recs = synthetic.preference_records(3000, seed=0, min_k=2, max_k=8, temperature=0.25)
    ks = {len(r["responses"]) for r in recs}
    assert ks == set(range(2, 9))
    # label noise: best = argmax(gold) often but not always; empirical rate matches the softmax model
    expected = 0.0
    for r in recs:
        g = [synthetic.gold_reward(r["prompt"], y) for y in r["responses"]]
        w = [math.exp(x / 0.25) for x in g]
        expected += w[max(range(len(g)), key=g.__getitem__)] / sum(w)
    ceiling = synthetic.gold_top1_accuracy(recs)
    assert 0.5 < ceiling < 0.95
    assert abs(ceiling - expected / len(recs)) < 0.03
    assert synthetic.preference_records(5, seed=1) == synthetic.preference_records(5, seed=1)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_jsonl_listwise_and_pairwise(tmp_path):
    f = _write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "x", "responses": ["a", "b", "c"], "best": 2}),
        "",
        json.dumps({"prompt": "x", "chosen": "good", "rejected": "bad"}),
    ])
    recs = read_jsonl(f)
    assert recs[0] == {"prompt": "x", "responses": ["a", "b", "c"], "best": 2}
    assert recs[1] == {"prompt": "x", "responses": ["good", "bad"], "best": 0}


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "x", "responses": ["a"], "best": 0}', "'responses' must be a list of at least 2 responses"),
    ('{"prompt": "x", "responses": ["a", "b"], "best": 2}', "'best' must be an integer in [0, 1]"),
    ('{"prompt": "x", "responses": ["a", 3], "best": 0}', "responses[1] must be a string"),
    ('{"prompt": 1, "responses": ["a", "b"], "best": 0}', "'prompt' must be a string or a non-empty list of messages"),
    ('{"prompt": "x", "chosen": "a"}', "pairwise record needs field 'rejected'"),
    ('{"prompt": "x", "responses": ["a", "b"], "best": 0', "invalid JSON: Expecting ',' delimiter (at character 52)"),
    ('{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}', "prompt[0].content must be a string"),
    ('{"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}',
     "field 'prompt' is text but 'chosen'/'rejected' are messages"),
    ('{"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "r"}]}',
     "share 0 leading messages"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_input_names_file_line_reason(tmp_path, line, reason):
    good = json.dumps({"prompt": "x", "responses": ["a", "b"], "best": 1})
    f = _write(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(DataError) as e:
        read_jsonl(f)
    assert f"{f}:3:" in str(e.value) and reason in str(e.value)


def test_prepare_requires_eval_file(tmp_path):
    f = _write(tmp_path / "t.jsonl", [json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"})])
    with pytest.raises(DataError, match="data.eval_path"):
        prepare_preference_data(DataConfig(train_path=str(f)), tmp_path)
    tr, ev = prepare_preference_data(DataConfig(num_train=10, num_eval=5), tmp_path)
    assert len(read_jsonl(tr)) == 10 and len(read_jsonl(ev)) == 5


def test_collate_variable_k(policy_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    recs = [{"prompt": "review of the lamp :", "responses": ["the bulb is great .", "the cord is poor ."], "best": 1},
            {"prompt": "review of the chair :", "responses": ["a", "b", "c", "d"], "best": 3}]
    b = collate(recs, tok, max_length=64)
    assert b.input_ids.shape[0] == 6
    assert b.valid.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert b.index.tolist() == [[0, 1, 0, 0], [2, 3, 4, 5]]
    assert b.best.tolist() == [1, 3]
    # every sequence starts with BOS and its last real token is EOS (the RM reads the last token)
    lengths = b.attention_mask.sum(1)
    assert (b.input_ids[:, 0] == tok.bos_token_id).all()
    assert all(b.input_ids[i, lengths[i] - 1] == tok.eos_token_id for i in range(6))
    short = collate(recs, tok, max_length=5)
    assert short.input_ids.shape[1] == 5 and short.truncated == 6
    # cut: BOS, then the last 4 tokens, which end in EOS (the response survives, not the prompt's start)
    for i, L in enumerate(lengths.tolist()):
        assert short.input_ids[i].tolist() == [tok.bos_token_id] + b.input_ids[i, L - 4:L].tolist()
    assert (short.input_ids[:, 4] == tok.eos_token_id).all()


def test_non_utf8_file_names_the_file_and_line(tmp_path):
    f = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    f.write_bytes((good + "\n\n" + json.dumps({"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"},
                                               ensure_ascii=False) + "\n").encode("latin-1"))
    with pytest.raises(DataError) as e:
        read_jsonl(f)
    assert str(e.value) == f"{f}:3: not valid UTF-8 (byte 0xe9 at character 16); save the file as UTF-8"
    f.write_text(good + "\n" + json.dumps({"prompt": "caf\u00e9", "chosen": "\u2713", "rejected": "b"},
                                          ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_jsonl(f)[1] == {"prompt": "caf\u00e9", "responses": ["\u2713", "b"], "best": 0}


# ---- TRL's formats, JSON and Parquet ---------------------------------------------------------------

def _msg(role, content):
    return {"role": role, "content": content}


def test_trl_conversational_preference_formats(tmp_path):
    """Explicit prompt (messages), implicit prompt (the shared leading messages), listwise chats, and
    TRL's implicit-prompt text form (each text scored whole)."""
    q, a, b = _msg("user", "review of the lamp :"), _msg("assistant", "the bulb is great ."), _msg("assistant", "no .")
    sys_ = _msg("system", "be brief")
    f = _write(tmp_path / "c.jsonl", [
        json.dumps({"prompt": [q], "chosen": [a], "rejected": [b]}),
        json.dumps({"chosen": [sys_, q, a], "rejected": [sys_, q, b]}),
        json.dumps({"prompt": [q], "responses": ["x", [b], "z"], "best": 2}),
        json.dumps({"prompt": [q], "chosen": "the bulb is great .", "rejected": "no ."}),
        json.dumps({"chosen": "q: a", "rejected": "q: b"}),
    ])
    recs = read_jsonl(f)
    assert recs[0] == {"prompt": [q], "responses": [[a], [b]], "best": 0}
    assert recs[1] == {"prompt": [sys_, q], "responses": [[a], [b]], "best": 0}
    assert recs[2] == {"prompt": [q], "responses": ["x", [b], "z"], "best": 2}
    assert recs[3] == {"prompt": [q], "responses": ["the bulb is great .", "no ."], "best": 0}
    assert recs[4] == {"prompt": "", "responses": ["q: a", "q: b"], "best": 0}


def test_json_and_parquet_files_read_like_jsonl_and_name_the_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlhf_ray.data.preferences import read_preferences

    recs = [{"prompt": [_msg("user", "p")], "chosen": [_msg("assistant", "a")], "rejected": [_msg("assistant", "b")]},
            {"prompt": [_msg("user", "p2")], "chosen": [_msg("assistant", "c")], "rejected": [_msg("assistant", "d")]}]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    want = read_jsonl(_write(tmp_path / "a.jsonl", [json.dumps(r) for r in recs]))
    assert read_preferences(tmp_path / "a.json") == want == read_preferences(tmp_path / "a.parquet")
    bad = recs + [{"prompt": [_msg("user", "p3")], "chosen": [_msg("assistant", "e")], "rejected": None}]
    (tmp_path / "b.json").write_text(json.dumps(bad))
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'b.json'}\[2\]: pairwise record needs field 'rejected'"):
        read_preferences(tmp_path / "b.json")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'b.parquet'} row 2: pairwise record needs field 'rejected'"):
        read_preferences(tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"unknown file type; expected one of \.jsonl, \.ndjson, \.json, \.parquet"):
        read_preferences(_write(tmp_path / "a.csv", ["x"]))


def test_synthetic_records_as_chats_keep_their_gold_ceiling(tmp_path):
    cfg = DataConfig(num_train=30, num_eval=200, synthetic_chat=True)
    tr, ev = prepare_preference_data(cfg, tmp_path)
    chats, plain = read_jsonl(ev), synthetic.preference_records(200, seed=1 + 7919)
    assert chats[0]["prompt"] == [{"role": "user", "content": f"Write a short review of the "
                                                             f"{synthetic.product_of(plain[0]['prompt'])}."}]
    assert [r["responses"] for r in chats] == [r["responses"] for r in plain]
    assert synthetic.gold_top1_accuracy(chats) == synthetic.gold_top1_accuracy(plain)
    assert synthetic.gold([chats[0]["prompt"]], [[_msg("assistant", plain[0]["responses"][0])]]) == \
        [synthetic.gold_reward(plain[0]["prompt"], plain[0]["responses"][0])]


# ---- prompt files ---------------------------------------------------------------------------------

def test_prompt_files_in_trl_prompt_only_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlhf_ray.data.prompts import PromptRecord, read_prompts

    q = [_msg("user", "review of the lamp :")]
    f = _write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "review of the kettle :", "product": "kettle"}),
        json.dumps({"prompt": q, "product": "lamp", "id": 3}),
        json.dumps({"messages": q + [_msg("assistant", "an answer to drop")]}),
    ])
    got = read_prompts(str(f))
    assert got == [PromptRecord("review of the kettle :", {"product": "kettle"}, f"{f}:1"),
                   PromptRecord(q, {"product": "lamp", "id": 3}, f"{f}:2"),
                   PromptRecord(q, {}, f"{f}:3")]
    pq.write_table(pa.Table.from_pylist([{"prompt": q, "product": "lamp"}]), tmp_path / "p.parquet")
    assert read_prompts(str(tmp_path / "p.parquet")) == [PromptRecord(q, {"product": "lamp"}, f"{tmp_path / 'p.parquet'} row 0")]


@pytest.mark.parametrize("line, reason", [
    ('{"text": "x"}', "no field 'prompt' (or 'messages'); found ['text']"),
    ('{"prompt": "  "}', "field 'prompt' is empty"),
    ('{"prompt": [{"role": "user", "content": 5}]}', "prompt[0].content must be a string, got int"),
    ('{"prompt": []}', "field 'prompt' must be a string or a non-empty list of messages"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "field 'messages' holds only an assistant turn; nothing to prompt with"),
    ('"just text"', "expected a JSON object, got str"),
])
def test_malformed_prompt_records_name_file_line_and_field(tmp_path, line, reason):
    from rlhf_ray.data.prompts import read_prompts

    f = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "ok"}), line])
    with pytest.raises(DataError) as e:
        read_prompts(str(f))
    assert str(e.value) == f"{f}:2: {reason}"


def test_prompt_stream_covers_every_prompt_once_per_epoch_whatever_the_iteration(tmp_path):
    """Iteration it's prompts are positions it*n .. it*n+n-1 of epochs that each permute the whole set:
    over any run of iterations every prompt comes once per epoch, and a resumed run (a new stream
    object, starting at any iteration) continues exactly where the first left off."""
    from rlhf_ray.data.prompts import PromptRecord, PromptStream

    records = [PromptRecord(f"p{i}", {}, f"f:{i}") for i in range(10)]
    stream = PromptStream(records, per_iteration=4, seed=3)
    positions = [pos for it in range(5) for pos in stream.positions(it)]  # 20 = two epochs exactly
    assert [e for e, _ in positions] == [0] * 10 + [1] * 10
    for epoch in (0, 1):
        assert sorted(i for e, i in positions if e == epoch) == list(range(10))
    assert [i for _, i in positions[:10]] != [i for _, i in positions[10:]]  # each epoch reshuffled
    batches = [stream.batch(it) for it in range(5)]
    resumed = PromptStream(records, per_iteration=4, seed=3)
    assert [resumed.batch(it) for it in (3, 4, 2)] == [batches[3], batches[4], batches[2]]
    assert PromptStream(records, 4, seed=4).batch(0) != batches[0]


def test_load_prompt_task_skips_long_prompts_and_holds_some_out(tmp_path, policy_dir):
    from transformers import AutoTokenizer

    from rlhf_ray.config import PPOConfig
    from rlhf_ray.data.chat import ChatRenderer
    from rlhf_ray.data.prompts import SYNTHETIC_EVAL_REWARD, load_prompt_task

    renderer = ChatRenderer(AutoTokenizer.from_pretrained(policy_dir))
    lines = [json.dumps({"prompt": f"review of the lamp {i} :"}) for i in range(20)]
    lines[5] = json.dumps({"prompt": "review " * 40})  # 41+ tokens
    f = _write(tmp_path / "p.jsonl", lines)
    task = load_prompt_task(PPOConfig(prompts_path=str(f), eval_prompts=3, max_prompt_tokens=20), renderer)
    assert task.skipped == {str(f): 1} and task.eval_reward == ""
    assert len(task.train.records) == 16 and [r.source for r in task.held_out] == [f"{f}:{i}" for i in (18, 19, 20)]
    assert f"skipped 1 of {f} (over ppo.max_prompt_tokens=20)" in task.describe
    held = _write(tmp_path / "h.jsonl", lines[:4])
    task = load_prompt_task(PPOConfig(prompts_path=str(f), eval_prompts_path=str(held), eval_prompts=0,
                                      eval_reward="my:fn"), renderer)
    assert len(task.train.records) == 19 and len(task.held_out) == 4 and task.eval_reward == "my:fn"  # the long one: > 64
    with pytest.raises(DataError, match=rf"{f}: all 20 prompts are longer than ppo.max_prompt_tokens=3"):
        load_prompt_task(PPOConfig(prompts_path=str(f), max_prompt_tokens=3), renderer)
    chats = _write(tmp_path / "c.jsonl", [json.dumps({"prompt": [_msg("user", "hi")]})] * 10)
    with pytest.raises(DataError, match=rf"{chats}: a chat record needs a chat template"):
        load_prompt_task(PPOConfig(prompts_path=str(chats)), renderer)
    synthetic_task = load_prompt_task(PPOConfig(), renderer)
    assert synthetic_task.eval_reward == SYNTHETIC_EVAL_REWARD and len(synthetic_task.held_out) == 64
    assert [r.prompt for r in synthetic_task.train.batch(2)] == synthetic.prompts(64, seed=0 * 1_000_003 + 2)


def test_remote_uris_are_read_with_ray_data(ray_cluster, tmp_path):
    """s3://, gs://, file:// ...: read by Ray Data on the cluster, rows named by the URI."""
    from rlhf_ray.data.preferences import read_preferences
    from rlhf_ray.data.prompts import read_prompts

    recs = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "responses": ["x", "y", "z"], "best": 1}]
    f = _write(tmp_path / "r.jsonl", [json.dumps(r) for r in recs])
    assert read_preferences(f"file://{f}") == read_jsonl(f)
    bad = _write(tmp_path / "bad.jsonl", [json.dumps(recs[0]), json.dumps({"prompt": "q", "best": 0})])
    with pytest.raises(DataError, match=rf"^file://{bad} row 1: field 'responses' must be a list"):
        read_preferences(f"file://{bad}")
    p = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "hello", "tag": 1})])
    assert read_prompts(f"file://{p}")[0].columns == {"tag": 1}


def test_private_files_and_directories(tmp_path):
    """rlhf_ray.private: whatever the umask, the owner alone reads what it restricts; links are not followed."""
    from rlhf_ray.private import create_private_file, make_private, private_dir

    old = os.umask(0)  # the most open umask: every mode below comes from rlhf_ray.private
    try:
        d = private_dir(tmp_path / "a" / "b")
        (d / "sub").mkdir()
        (d / "sub" / "w.bin").write_bytes(b"x")
        outside = tmp_path / "outside.txt"
        outside.write_text("y")
        (d / "link").symlink_to(outside)
        with create_private_file(d / "slot") as f:
            f.write(b"z")
        assert (d / "slot").stat().st_mode & 0o777 == 0o600
        with pytest.raises(FileExistsError):
            create_private_file(d / "slot")
        assert (d / "sub" / "w.bin").stat().st_mode & 0o777 == 0o666
        make_private(d)
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in (d, d / "sub", d / "sub" / "w.bin")] == [0o700, 0o700, 0o600]
    assert outside.stat().st_mode & 0o777 == 0o666  # a link's target is not ours to change
    assert make_private(tmp_path / "missing") == tmp_path / "missing"
