"""The RM service: real Ray Serve on a free local port, real HTTP (requests) and the handle path,
checked against the in-process RewardScorer. Serve is started once for the module."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import requests
from ports import free_port

from rlhf_ray.data import synthetic
from rlhf_ray.data.preferences import rm_text

MAX_RESPONSES, MAX_PROMPTS, MAX_CHARS = 4, 3, 600


class Service(NamedTuple):
    url: str
    handle: object
    cfg: object


@pytest.fixture(scope="module")
def service(ray_cluster, rm_dir, test_config):
    from rlhf_ray.reward.service import deploy_rm, shutdown_rm

    cfg = dataclasses.replace(
        test_config.serve, port=free_port(), num_cpus=0.25, max_responses=MAX_RESPONSES,
        max_prompts=MAX_PROMPTS, max_chars=MAX_CHARS, max_request_mib=1,
        auth_token_env=f"RLHF_RAY_TEST_TOKEN_{uuid.uuid4().hex[:8]}")  # unset: auth off
    url, handle = deploy_rm(cfg, rm_dir, max_length=64, name="rm")
    yield Service(url, handle, cfg)
    shutdown_rm()


@pytest.fixture(scope="module")
def scorer(rm_dir):
    from rlhf_ray.reward.scorer import RewardScorer

    return RewardScorer(rm_dir, max_length=64)


@pytest.fixture(scope="module")
def groups():
    records = synthetic.preference_records(3, seed=11)
    return [(r["prompt"], r["responses"][:MAX_RESPONSES]) for r in records]


def softmax(x) -> np.ndarray:
    z = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return z / z.sum()


def check_answer(answer: dict, expected, model_version: str) -> None:
    """One /score answer against the in-process GroupScore."""
    assert set(answer) == {"rewards", "probs", "best", "truncated", "model_version"}
    np.testing.assert_allclose(answer["rewards"], expected.rewards, rtol=0, atol=1e-5)
    np.testing.assert_allclose(answer["probs"], softmax(answer["rewards"]), rtol=0, atol=1e-6)
    assert answer["best"] == int(np.argmax(answer["rewards"]))
    assert answer["truncated"] == expected.truncated
    assert answer["model_version"] == model_version


def test_http_and_handle_agree_with_in_process_scorer(service, scorer, groups):
    expected = scorer.score_groups(groups)
    assert all(len(r) >= 2 for _, r in groups)
    for (prompt, responses), exp in zip(groups, expected):
        r = requests.post(f"{service.url}/score", json={"prompt": prompt, "responses": responses}, timeout=30)
        assert r.status_code == 200, r.text
        check_answer(r.json(), exp, scorer.model_version)
        check_answer(service.handle.score.remote(prompt, responses).result(timeout_s=30), exp, scorer.model_version)

    items = [{"prompt": p, "responses": rs} for p, rs in groups]
    r = requests.post(f"{service.url}/score_batch", json={"items": items}, timeout=30)
    assert r.status_code == 200, r.text
    via_handle = service.handle.score_batch.remote(items).result(timeout_s=30)
    for body in (r.json(), via_handle):
        assert body["model_version"] == scorer.model_version
        assert len(body["results"]) == len(groups)
        for answer, exp in zip(body["results"], expected):
            check_answer(answer, exp, scorer.model_version)

    prompts = [p for p, rs in groups for _ in rs]
    responses = [y for _, rs in groups for y in rs]
    flat = service.handle.score_pairs.remote(prompts, responses).result(timeout_s=30)
    np.testing.assert_allclose(flat["rewards"], scorer.score_pairs(prompts, responses), rtol=0, atol=1e-5)

    version = requests.get(f"{service.url}/version", timeout=10).json()
    assert version["model_version"] == scorer.model_version and version["batching"] is True
    assert requests.get(f"{service.url}/docs", timeout=10).status_code == 200
    assert "/score_batch" in requests.get(f"{service.url}/openapi.json", timeout=10).json()["paths"]


def test_serve_run_app_builder_without_batching(service, scorer, groups):
    """What `serve run rlhf_ray.reward.serve:app_builder checkpoint=... batching=false serve.<field>=...`
    deploys, here beside the module's app on its own route: it scores one request per forward pass
    (no merging, /version says so) with the same rewards, and takes ServeConfig fields as arguments."""
    from ray import serve

    from rlhf_ray.reward.serve import app_builder

    with pytest.raises(ValueError, match="checkpoint=<RM directory> is required"):
        app_builder({})
    app = app_builder({"checkpoint": str(scorer.model_dir), "max_length": "64", "batching": "false",
                       "max_responses": "2", "num_cpus": "0.25"})
    handle = serve.run(app, name="rm_unbatched", route_prefix="/unbatched")
    try:
        url = service.url + "/unbatched"
        version = requests.get(f"{url}/version", timeout=30).json()
        assert version["batching"] is False and version["limits"]["max_responses"] == 2
        prompt, responses = groups[0]
        pending = [handle.score.remote(prompt, responses[:2]) for _ in range(6)]
        exp = scorer.score_groups([(prompt, responses[:2])])[0]
        for p in pending:
            check_answer(p.result(timeout_s=60), exp, scorer.model_version)
        stats = handle.get_stats.remote().result(timeout_s=30)
        assert stats["requests"] == stats["batches"] == 6  # one forward per request
        r = _post(f"{url}/score", {"prompt": prompt, "responses": responses[:3]})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "responses", r.text
    finally:
        serve.delete("rm_unbatched")


def test_chat_prompts_are_rendered_as_in_training(service, rm_dir, groups, tmp_path):
    """/score with a chat (a message list) as the prompt, on an app deployed the way `serve run ...
    chat_template=FILE` does: the same rewards as the in-process scorer with that template (which
    renders exactly as training does, tests/test_chat.py); a text prompt on the same app is unchanged."""
    from ray import serve
    from reference import CHAT_TEMPLATE

    from rlhf_ray.reward.scorer import RewardScorer
    from rlhf_ray.reward.serve import app_builder

    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    handle = serve.run(app_builder({"checkpoint": str(rm_dir), "chat_template": str(template), "num_cpus": "0.25"}),
                       name="rm_chat", route_prefix="/chat")
    try:
        local = RewardScorer(rm_dir, max_length=64, chat_template=CHAT_TEMPLATE)
        prompt, responses = groups[0]
        chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}]
        exp = local.score_groups([(chat, responses)])[0]
        r = _post(f"{service.url}/chat/score", {"prompt": chat, "responses": responses})
        assert r.status_code == 200, r.text
        check_answer(r.json(), exp, local.model_version)
        check_answer(handle.score.remote(chat, responses).result(timeout_s=30), exp, local.model_version)
        plain = _post(f"{service.url}/chat/score", {"prompt": prompt, "responses": responses}).json()
        np.testing.assert_allclose(plain["rewards"], local.score_groups([(prompt, responses)])[0].rewards, atol=1e-5)
        assert not np.allclose(plain["rewards"], exp.rewards, atol=1e-3)  # the template changes the input
        bad = _post(f"{service.url}/chat/score", {"prompt": [{"role": "user"}], "responses": responses})
        assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"].startswith("prompt"), bad.text
    finally:
        serve.delete("rm_chat")
    # The module's app has no template (the embedded tokenizer has none): a chat is refused, not a 5xx.
    r = _post(f"{service.url}/score", {"prompt": [{"role": "user", "content": "hi"}], "responses": ["a"]})
    assert r.status_code == 422 and "needs a chat template" in r.json()["error"]["message"], r.text


def test_openrlhf_remote_rm_protocol(service, scorer, groups):
    """POST /get_reward as OpenRLHF's --remote_rm_url client sends it: rendered queries, optional
    prompts (a query that starts with its prompt is scored as that pair, else whole), labels ignored;
    the rewards come back under "rewards" and "scores"."""
    prompts = [p for p, rs in groups for _ in rs]
    responses = [y for _, rs in groups for y in rs]
    queries = [f"{p} {y}" for p, y in zip(prompts, responses)]
    body = {"query": queries, "prompts": prompts, "labels": [None] * len(queries)}
    r = _post(f"{service.url}/get_reward", body)
    assert r.status_code == 200, r.text
    want = scorer.score_pairs(prompts, responses)
    np.testing.assert_allclose(r.json()["rewards"], want, rtol=0, atol=1e-5)
    assert r.json()["scores"] == r.json()["rewards"] and r.json()["model_version"] == scorer.model_version
    # The split matters for plain-text RMs: a response without its leading space still gets the one space.
    glued = [p + y for p, y in zip(prompts, responses)]
    split = _post(f"{service.url}/get_reward", {"query": glued, "prompts": prompts}).json()["rewards"]
    np.testing.assert_allclose(split, want, rtol=0, atol=1e-5)
    whole = _post(f"{service.url}/get_reward", {"query": glued}).json()["rewards"]
    np.testing.assert_allclose(whole, scorer.score_texts(glued).rewards, rtol=0, atol=1e-5)
    assert not np.allclose(whole, want, atol=1e-3)
    other = _post(f"{service.url}/get_reward", {"query": queries[:1], "prompts": ["not its prompt"]}).json()
    np.testing.assert_allclose(other["rewards"], scorer.score_texts(queries[:1]).rewards, rtol=0, atol=1e-5)
    via_handle = service.handle.get_reward.remote(queries, prompts).result(timeout_s=30)
    np.testing.assert_allclose(via_handle["rewards"], want, rtol=0, atol=1e-5)
    bad = _post(f"{service.url}/get_reward", {"query": queries[:2], "prompts": prompts[:1]})
    assert bad.status_code == 422 and "2 queries but 1 prompts" in bad.json()["error"]["message"], bad.text


def test_concurrent_requests_share_forward_passes(service, scorer, groups):
    """16 requests sent at once share forward passes (@serve.batch). Whether they reach the replica
    within one batch window depends on the machine's load, so up to 5 rounds are tried: batching that
    never merges still fails, a busy machine does not."""
    prompt, responses = groups[0]
    exp = scorer.score_groups([groups[0]])[0]
    for _ in range(5):
        service.handle.get_stats.remote(reset=True).result(timeout_s=30)
        pending = [service.handle.score.remote(prompt, responses) for _ in range(16)]
        answers = [p.result(timeout_s=60) for p in pending]
        stats = service.handle.get_stats.remote().result(timeout_s=30)
        assert stats["requests"] == 16 and stats["items"] == 16 * len(responses)
        for a in answers:
            check_answer(a, exp, scorer.model_version)
        if stats["batches"] < stats["requests"]:  # @serve.batch merged some
            break
    assert stats["batches"] < stats["requests"], stats


def test_over_long_input_is_truncated_by_the_training_rule(service, scorer):
    import torch

    prompt, long = "Review the film:", " ".join(["wonderful"] * 50)  # > 64 tokens, < MAX_CHARS
    r = requests.post(f"{service.url}/score", json={"prompt": prompt, "responses": ["fine.", long]}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["truncated"] == [False, True]
    # The rule: BOS, then the last max_length - 1 tokens (ending in EOS).
    tok = scorer.tokenizer
    ids = tok(rm_text(prompt, long))["input_ids"] + [tok.eos_token_id]
    assert len(ids) > 64 and ids[0] == tok.bos_token_id
    cut = torch.tensor([ids[:1] + ids[-63:]])
    with torch.no_grad():
        expected = scorer.model(input_ids=cut, attention_mask=torch.ones_like(cut)).logits[0, 0].item()
    assert abs(body["rewards"][1] - expected) < 1e-5


def _bad_requests():
    ok = ["a", "b"]
    return [
        # (body: dict or raw str, expected status, field the error must name)
        ({"prompt": "x", "responses": []}, 422, "responses"),
        ({"prompt": "x", "responses": ["r"] * (MAX_RESPONSES + 1)}, 422, "responses"),
        ({"prompt": "x", "responses": ["a", "y" * (MAX_CHARS + 1)]}, 422, "responses[1]"),
        ({"prompt": "p" * (MAX_CHARS + 1), "responses": ok}, 422, "prompt"),
        ({"prompt": 3, "responses": ok}, 422, "prompt"),
        ({"prompt": "x", "responses": "ab"}, 422, "responses"),
        ({"prompt": "x", "responses": ["a", 7]}, 422, "responses[1]"),
        ({"prompt": "x", "responses": ["a", None]}, 422, "responses[1]"),
        ({"responses": ok}, 422, "prompt"),
        ({"prompt": "x"}, 422, "responses"),
        ({"prompt": "x", "responses": ok, "best": 0}, 422, "best"),
        ('{"prompt": "x", "responses": [', 400, "body"),
        ("not json at all", 400, "body"),
        (b'{"prompt": "x\xff", "responses": ["a"]}', 400, "body"),  # not UTF-8
        ("[" * 100_000 + "]" * 100_000, 400, "body"),  # nested past the JSON decoder's recursion limit
        ("[1, 2]", 422, "body"),
        ("", 422, "body"),
    ]


def _bad_batches():
    item = {"prompt": "x", "responses": ["a", "b"]}
    return [
        ({"items": []}, 422, "items"),
        ({"items": [item] * (MAX_PROMPTS + 1)}, 422, "items"),
        ({"items": [item, {"prompt": "x", "responses": []}]}, 422, "items[1].responses"),
        ({"items": [item, {"prompt": "x", "responses": ["a", 1]}]}, 422, "items[1].responses[1]"),
        ({"items": item}, 422, "items"),
        ({"prompt": "x", "responses": ["a"]}, 422, "items"),
    ]


def _post(url: str, body):
    if isinstance(body, (str, bytes)):
        return requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    return requests.post(url, json=body, timeout=30)


def test_bad_requests_get_4xx_naming_the_field(service, groups):
    from rlhf_ray.reward.api import RequestError

    cases = [("/score", *c) for c in _bad_requests()] + [("/score_batch", *c) for c in _bad_batches()]
    for route, body, status, field in cases:
        r = _post(service.url + route, body)
        assert r.status_code == status, (route, body, r.status_code, r.text)
        error = r.json()["error"]
        assert field in [f["field"] for f in error["fields"]], (route, body, error)
        assert field in error["message"], error
    assert requests.get(f"{service.url}/score", timeout=10).status_code == 405
    assert requests.get(f"{service.url}/nope", timeout=10).json()["error"]["type"] == "http_error"
    r = _post(service.url + "/score", b'{"prompt": "\xff"}')
    assert r.json()["error"] == {"type": "invalid_json", "message": "body: invalid JSON: not UTF-8 text (byte 12)",
                                 "fields": [{"field": "body", "message": "invalid JSON: not UTF-8 text (byte 12)"}]}

    # The handle path refuses the same way (RequestError, a ValueError, with the same fields).
    with pytest.raises(RequestError) as e:
        service.handle.score.remote("x", []).result(timeout_s=30)
    assert e.value.status == 422 and e.value.fields[0]["field"] == "responses"
    with pytest.raises(RequestError, match="2 prompts but 1 responses"):
        service.handle.score_pairs.remote(["a", "b"], ["c"]).result(timeout_s=30)

    # Still healthy and answering.
    assert requests.get(f"{service.url}/healthz", timeout=10).json() == {"status": "ok"}
    prompt, responses = groups[0]
    assert _post(f"{service.url}/score", {"prompt": prompt, "responses": responses}).status_code == 200


def test_a_failing_request_does_not_fail_the_others_in_its_batch():
    from rlhf_ray.reward.scorer import GroupScore
    from rlhf_ray.reward.serve import score_jobs

    class Scorer:  # fails on any group whose prompt is "boom"
        def score_groups(self, groups):
            if any(p == "boom" for p, _ in groups):
                raise RuntimeError("boom")
            return [GroupScore([float(len(r)) for r in rs], [], 0, [False] * len(rs)) for _, rs in groups]

    jobs = [[("a", ["xx", "y"])], [("boom", ["z"])], [("b", ["qqq"]), ("c", ["w"])]]
    out = score_jobs(Scorer(), jobs)
    assert [g.rewards for g in out[0]] == [[2.0, 1.0]]
    assert isinstance(out[1], RuntimeError)
    assert [g.rewards for g in out[2]] == [[3.0], [1.0]]
    assert [len(r) for r in score_jobs(Scorer(), [jobs[0], jobs[2]])] == [1, 2]


def test_ppo_scores_through_the_rm_app_already_running(service, rm_dir, policy_dir, test_config, groups,
                                                       tmp_path):
    """ppo.rm_scoring=serve with the app "rm" already up (as `rlhf-ray serve-rm` leaves it): PPO's
    scorer gets the in-process RM's rewards through it, a PPO run needs no RM directory, and the app
    is still serving afterwards (PPO removes only an app it deployed itself)."""
    from rlhf_ray.ppo.driver import run_ppo
    from rlhf_ray.ppo.scoring import RolloutScorer
    from rlhf_ray.reward.service import rm_service

    url, handle, deployed = rm_service(service.cfg, None)
    assert url is None and not deployed
    prompts = [p for p, rs in groups for _ in rs] * 2
    responses = [r for _, rs in groups for r in rs] * 2
    max_pairs = service.cfg.max_prompts * service.cfg.max_responses
    assert len(prompts) > max_pairs  # more pairs than one request may carry: sent as several
    np.testing.assert_allclose(RolloutScorer(handle=handle, max_pairs=max_pairs).rm_scores(prompts, responses),
                               RolloutScorer(rm_dir).rm_scores(prompts, responses), atol=1e-5)

    cfg = dataclasses.replace(
        test_config, serve=service.cfg,
        ppo=dataclasses.replace(test_config.ppo, iterations=2, prompts_per_iteration=8, max_new_tokens=8,
                                minibatch_size=8, rm_scoring="serve", checkpoint_every=0),
        rollout=dataclasses.replace(test_config.rollout, num_workers=1))
    from helpers import assert_scored_by_the_rm, batch_recorder

    lines, (on_iteration, batches) = [], batch_recorder()
    res = run_ppo(cfg, policy_dir, None, tmp_path, log=lines.append, eval_every=0, on_iteration=on_iteration)
    said = [x for x in lines if "Serve app 'rm'" in x]
    assert said == ["[ppo] RM scores through the Serve app 'rm': already running"]
    assert len(res.history) == len(batches) == 2
    assert_scored_by_the_rm(batches, rm_dir)  # each batch's rewards are the RM's, as in process
    assert requests.get(f"{service.url}/healthz", timeout=10).ok


def test_a_body_over_the_limit_is_refused_before_it_is_read(service):
    """serve.max_request_mib (1 here): 413 with the service's error JSON, from the Content-Length, or
    while a chunked body streams in; the service goes on answering."""
    big = b'{"prompt": "x", "responses": ["' + b"a" * (2 << 20) + b'"]}'
    for body in (big, (big[i:i + 65536] for i in range(0, len(big), 65536))):  # sized, then chunked
        r = requests.post(f"{service.url}/score", data=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 413, r.text
        assert r.json()["error"] == {"type": "request_too_large", "message": "body: over 1048576 bytes "
                                     "(serve.max_request_mib)", "fields": [{"field": "body",
                                                                            "message": "larger than 1048576 bytes"}]}
    r = _post(f"{service.url}/score", {"prompt": "x", "responses": ["a" * 500]})
    assert r.status_code == 200, r.text


def test_serving_a_public_host_needs_a_token_or_an_explicit_yes(service):
    from rlhf_ray.config import ConfigError
    from rlhf_ray.reward.service import check_exposure

    public = dataclasses.replace(service.cfg, host="0.0.0.0")
    with pytest.raises(ConfigError, match=r"serve.host=0.0.0.0 reaches other machines, and no bearer token is set"):
        check_exposure(public, None)
    check_exposure(public, "a-token")
    check_exposure(dataclasses.replace(public, allow_unauthenticated=True), None)
    check_exposure(service.cfg, None)  # 127.0.0.1


def test_bearer_token(service, rm_dir, monkeypatch):
    from rlhf_ray.reward.service import deploy_rm, shutdown_rm

    cfg = dataclasses.replace(service.cfg, auth_token_env=f"RLHF_RAY_TEST_TOKEN_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv(cfg.auth_token_env, "s3cret-token")
    url, handle = deploy_rm(cfg, rm_dir, name="rm_auth", route_prefix="/auth")
    try:
        good = {"prompt": "x", "responses": ["a", "b"]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Bearer s3cret-token-and-more"}):
            r = requests.post(f"{url}/score", json=good, headers=headers, timeout=30)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["type"] == "unauthorized"
        assert requests.get(f"{url}/version", timeout=10).status_code == 401
        # Auth comes before parsing: a malformed body without a token is 401, not 400.
        assert _post(f"{url}/score", "{oops").status_code == 401
        auth = {"Authorization": "Bearer s3cret-token"}
        r = requests.post(f"{url}/score", json=good, headers=auth, timeout=30)
        assert r.status_code == 200 and len(r.json()["rewards"]) == 2
        assert requests.get(f"{url}/version", headers=auth, timeout=10).status_code == 200
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200  # open
        assert requests.get(f"{url}/docs", timeout=10).status_code == 200  # open
        # The main app (no token configured) is unaffected.
        assert requests.post(f"{service.url}/score", json=good, timeout=30).status_code == 200
        # Handles are in-cluster: no token.
        assert handle.score.remote("x", ["a"]).result(timeout_s=30)["probs"] == [1.0]
    finally:
        shutdown_rm("rm_auth")


def perturbed_checkpoint(src: Path, dest: Path) -> Path:
    """A copy of ``src`` with the score head's weights changed (a "new" checkpoint)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    assert "score.weight" in tensors
    tensors["score.weight"] = tensors["score.weight"] * 1.5 + 0.01
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_rolling_a_new_checkpoint_drops_no_request(service, scorer, groups, rm_dir, tmp_path):
    from rlhf_ray.reward.scorer import RewardScorer
    from rlhf_ray.reward.service import deploy_rm

    new_dir = perturbed_checkpoint(rm_dir, tmp_path / "ckpt2")
    new = RewardScorer(new_dir, max_length=64)
    assert new.model_version != scorer.model_version
    prompt, responses = groups[0]
    old_exp, new_exp = scorer.score_groups([groups[0]])[0], new.score_groups([groups[0]])[0]

    stop, seen, lock = threading.Event(), [], threading.Lock()

    def client():
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.post(f"{service.url}/score", json={"prompt": prompt, "responses": responses}, timeout=60)
                    item = (r.status_code, r.json() if r.status_code == 200 else r.text)
                except requests.RequestException as e:
                    item = (-1, repr(e))
                with lock:
                    seen.append(item)

    def wait_for(version: str, n: int = 8, timeout: float = 60.0) -> None:
        """Until n answers from ``version`` have come back (not a fixed sleep: a loaded machine is slower)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                if sum(1 for c, b in seen if c == 200 and b["model_version"] == version) >= n:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"fewer than {n} answers from {version} in {timeout} s")

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(scorer.model_version)
        deploy_rm(service.cfg, new_dir, max_length=64, name="rm")  # the roll
        wait_for(new.model_version)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    failures = [s for s in seen if s[0] != 200]
    assert not failures, failures[:3]
    versions = [body["model_version"] for _, body in seen]
    assert len(seen) > 10 and set(versions) == {scorer.model_version, new.model_version}
    assert versions[-1] == new.model_version
    for _, body in seen:
        check_answer(body, old_exp if body["model_version"] == scorer.model_version else new_exp,
                     body["model_version"])
    assert requests.get(f"{service.url}/version", timeout=10).json()["model_version"] == new.model_version
    answer = service.handle.score.remote(prompt, responses).result(timeout_s=30)
    check_answer(answer, new_exp, new.model_version)

    # A damaged checkpoint is refused in the driver, naming the file, before any replica tries it;
    # the service goes on with the last good model.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(new_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=f"{broken / 'model.safetensors'}: not a readable safetensors file"):
        deploy_rm(service.cfg, broken, max_length=64, name="rm")
    info = requests.get(f"{service.url}/version", timeout=10).json()
    assert info["model_version"] == new.model_version and info["load_error"] is None, info
    r = _post(f"{service.url}/score", {"prompt": prompt, "responses": responses})
    assert r.status_code == 200
    check_answer(r.json(), new_exp, new.model_version)


def test_model_version_counts_epochs_from_one(rm_dir, tmp_path):
    """trainer_state.json's epoch is 0-based; model_version says "epoch1" after one epoch, as the logs do."""
    import hashlib
    import json

    from rlhf_ray.reward.scorer import model_version

    digest = hashlib.sha256((rm_dir / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert json.loads((rm_dir / "trainer_state.json").read_text())["epoch"] == 0
    assert model_version(rm_dir) == f"epoch1-{digest}"
    copy = tmp_path / "rm"
    shutil.copytree(rm_dir, copy)
    (copy / "trainer_state.json").write_text(json.dumps({"epoch": 5}))
    assert model_version(copy) == f"epoch6-{digest}"
    (copy / "trainer_state.json").unlink()
    assert model_version(copy) == f"epoch?-{digest}"


def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(int(d.replica_states.get("RUNNING", 0)) for d in status.deployments.values())


def replica_actors(app: str) -> list[str]:
    """The names (namespace "serve") of the app's live replica actors (no dashboard needed)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{app}#"))


def wait_until(what: str, ok, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def test_autoscaling_adds_a_replica_under_load_and_a_killed_replica_is_replaced(service, scorer, groups, rm_dir):
    """serve.min_replicas=1, max_replicas=2: 6 concurrent clients take the app from 1 replica to 2; one
    replica is killed under that load and replaced; every request is answered (a client retries a failed
    one, up to 5 times), each answer the in-process scorer's; without load it goes back to 1 replica
    (the load averaged over serve.look_back_period_s=12 s, not Serve's default 30).
    Waits on the replica count, not on sleeps."""
    import ray
    from ray.serve.context import _get_global_client

    from rlhf_ray.reward.service import deploy_rm

    app = "rm_scale"
    cfg = dataclasses.replace(service.cfg, num_replicas=1, min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                              upscale_delay_s=1, downscale_delay_s=3, look_back_period_s=12)
    url, _ = deploy_rm(cfg, rm_dir, max_length=64, name=app, route_prefix="/scale")
    deployments = _get_global_client().get_serve_details()["applications"][app]["deployments"]
    (scaling,) = [d["deployment_config"]["autoscaling_config"] for d in deployments.values()]
    want = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 1.0,
            "upscale_delay_s": 1.0, "downscale_delay_s": 3.0, "look_back_period_s": 12.0}
    assert {k: scaling.get(k) for k in want} == want, scaling
    prompt, responses = groups[0]
    expected = scorer.score_groups([groups[0]])[0]
    stop, answers, given_up, lock = threading.Event(), [], [], threading.Lock()

    def client():
        with requests.Session() as s:
            while not stop.is_set():
                for _ in range(5):
                    try:
                        r = s.post(f"{url}/score", json={"prompt": prompt, "responses": responses}, timeout=60)
                        if r.status_code == 200:
                            with lock:
                                answers.append(r.json())
                            break
                        failure = (r.status_code, r.text[:200])
                    except requests.RequestException as e:
                        failure = (-1, repr(e)[:200])
                else:
                    with lock:
                        given_up.append(failure)

    assert running_replicas(app) == 1  # before any load (after it, Serve may scale up at once)
    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until("autoscaled to 2 replicas", lambda: running_replicas(app) == 2)
        first = replica_actors(app)
        assert len(first) == 2
        ray.kill(ray.get_actor(first[0], namespace="serve"), no_restart=True)
        wait_until("the killed replica replaced", lambda: running_replicas(app) == 2 and first[0] not in
                   replica_actors(app) and len(replica_actors(app)) == 2)
        n = len(answers)
        wait_until("answers after the replacement", lambda: len(answers) >= n + 20, timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    try:
        assert not given_up, given_up[:3]
        assert len(answers) > 40
        for body in answers:
            check_answer(body, expected, scorer.model_version)
        wait_until("back to 1 replica without load", lambda: running_replicas(app) == 1, timeout=90)
    finally:
        from ray import serve

        serve.delete(app)


def test_the_serve_rm_command_serves_until_sigterm_and_then_stops_cleanly(rm_dir, scorer, tmp_path):
    """`rlhf-ray serve-rm` as an operator runs it (its own local Ray): it says where it serves, answers a
    request as the in-process scorer does, and on SIGTERM (docker stop, systemd) shuts Serve and its Ray
    down and exits 0, freeing the port."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    port = free_port()
    cmd = [str(Path(sys.executable).with_name("rlhf-ray")), "serve-rm", "--checkpoint", str(rm_dir), "--port",
           str(port), "serve.num_cpus=0.25"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while not any(" serving at " in x for x in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)[-3000:]
            lines.append(proc.stdout.readline())
        said = next(x for x in lines if " serving at " in x)
        assert f"serving at http://127.0.0.1:{port}" in said and "Ctrl-C stops" in said
        prompt, responses = "review of the kettle :", ["the spout is great .", "the switch is broken ."]
        answer = requests.post(f"http://127.0.0.1:{port}/score", json={"prompt": prompt, "responses": responses},
                               timeout=60).json()
        np.testing.assert_allclose(answer["rewards"], scorer.score_groups([(prompt, responses)])[0].rewards, atol=1e-4)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, "".join(lines) + out
    assert "shutting down the reward model service" in out
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))
