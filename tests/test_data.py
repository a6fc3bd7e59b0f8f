import json
import math

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
    ('{"prompt": "x", "responses": ["a"], "best": 0}', "at least 2"),
    ('{"prompt": "x", "responses": ["a", "b"], "best": 2}', "'best' must be an integer in [0, 1]"),
    ('{"prompt": "x", "responses": ["a", 3], "best": 0}', "responses[1] must be a string"),
    ('{"prompt": 1, "responses": ["a", "b"], "best": 0}', "'prompt' must be a string"),
    ('{"prompt": "x", "chosen": "a"}', "pairwise record needs string field 'rejected'"),
    ('{"prompt": "x", "responses": ["a", "b"], "best": 0', "invalid JSON"),
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
    assert str(e.value) == f"{f}:3: not valid UTF-8 (byte 0xe9 at column 16); save the file as UTF-8"
    f.write_text(good + "\n" + json.dumps({"prompt": "caf\u00e9", "chosen": "\u2713", "rejected": "b"},
                                          ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_jsonl(f)[1] == {"prompt": "caf\u00e9", "responses": ["\u2713", "b"], "best": 0}
