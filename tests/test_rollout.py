"""RolloutWorker on a real vLLM engine (in-process, CPU, float32): rollout layout, sampled logprobs
against a transformers recomputation, weight sync (every engine's weights change, prefix cache
invalidated), and two workers as Ray actors fed by one object ref (one with its engine in a separate
process, as on GPUs).

One engine serves the whole module; tests that load other weights put the SFT weights back.
"""

from __future__ import annotations

import dataclasses
import os
import random
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from rlhf_ray.data import synthetic  # noqa: E402
from rlhf_ray.ppo.weights import bucket_names, logprob_drift, state_dict_buckets  # noqa: E402

TOL = 1e-4  # float32 vLLM vs float32 transformers: measured ~2e-6


# ---- helpers --------------------------------------------------------------------------------------

def hf_model(policy_dir, noise: float = 0.0, seed: int = 0):
    """The policy in transformers, optionally with Gaussian noise added to every weight."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    if noise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def hf_logprobs(model, input_ids: np.ndarray, attention_mask: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log pi(token_t | tokens_<t) for every t >= 1 (0 at t = 0), float32 [B, T]; pi = softmax(logits / T)."""
    ids = torch.as_tensor(input_ids)
    logits = model(input_ids=ids, attention_mask=torch.as_tensor(attention_mask).long()).logits
    lp = torch.log_softmax(logits.float() / temperature, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    out = np.zeros(input_ids.shape, np.float32)
    out[:, 1:] = lp.numpy()
    return out


def long_prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts of ~45-60 tokens: a few reviews, then a new review to write (spans >= 1 KV block)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(3):
            product = rng.choice(synthetic.PRODUCT_LIST)
            parts.append(f"{synthetic.make_prompt(product)} {synthetic.sample_response(rng, product)}")
        out.append(" ".join(parts) + " " + synthetic.make_prompt(rng.choice(synthetic.PRODUCT_LIST)))
    return out


def test_engine_arguments_per_device(test_config):
    """CPU engines get a fixed KV size (vLLM needs one there); GPU engines size theirs from
    rollout.gpu_memory_utilization, since a fixed size overrides it (64 MiB would hold ~128 tokens of a
    7B model)."""
    from rlhf_ray.ppo.engine import EXTENSION, engine_args

    rc = dataclasses.replace(test_config.rollout, kv_cache_mib=48, gpu_memory_utilization=0.45)
    cpu, gpu = (engine_args("m", rc, worker_id=1, seed=5, device=d) for d in ("cpu", "cuda"))
    assert cpu["kv_cache_memory_bytes"] == 48 << 20 and "gpu_memory_utilization" not in cpu
    assert (cpu["dtype"], cpu["enforce_eager"], cpu["block_size"]) == ("float32", True, 32)
    assert gpu["gpu_memory_utilization"] == 0.45
    assert not {"kv_cache_memory_bytes", "dtype", "enforce_eager", "block_size"} & set(gpu)  # vLLM's defaults
    assert cpu["seed"] == gpu["seed"] != engine_args("m", rc, worker_id=2, seed=5, device="cpu")["seed"]
    assert cpu["worker_extension_cls"] == gpu["worker_extension_cls"] == EXTENSION
    half = dataclasses.replace(rc, dtype="bfloat16")  # rollout.dtype set: both devices take it
    assert engine_args("m", half, 1, 5, "cpu")["dtype"] == engine_args("m", half, 1, 5, "cuda")["dtype"] == "bfloat16"


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker(policy_dir, test_config):
    from helpers import in_process_worker

    with in_process_worker(str(policy_dir), test_config.rollout, worker_id=3, seed=0) as w:
        yield w


@pytest.fixture(scope="module")
def sft_model(policy_dir):
    return hf_model(policy_dir)


@pytest.fixture(scope="module")
def rollout(worker):
    """16 synthetic prompts, 24 new tokens: room for most responses to end in EOS."""
    return worker.generate(synthetic.prompts(16, seed=5), max_new_tokens=24, temperature=1.0, top_p=1.0, seed=0)


def restore_sft(worker, sft_model):
    return worker.update_weights(state_dict_buckets(sft_model.state_dict(), 1 << 20),
                                 version=worker.version + 1)


# ---- pure helpers (no engine) ---------------------------------------------------------------------

def test_state_dict_buckets_bounds_order_and_copies():
    sd = {"a": torch.ones(10), "b": torch.ones(3, 4, dtype=torch.float64), "big": torch.zeros(100),
          "c": torch.ones(4, 2).t(), "rotary_emb.inv_freq": torch.ones(2), "d": np.arange(6, dtype=np.float16)}
    buckets = state_dict_buckets(sd, bucket_bytes=100)
    names = [n for b in buckets for n in b]
    assert names == ["a", "b", "big", "c", "d"]  # order kept, rotary buffer dropped
    sizes = [sum(a.nbytes for a in b.values()) for b in buckets]
    assert all(s <= 100 or len(b) == 1 for s, b in zip(sizes, buckets)), sizes
    assert [list(b) for b in buckets] == [["a", "b"], ["big"], ["c", "d"]]  # 40+48 bytes fit, +400 do not
    for b in buckets:
        for a in b.values():
            assert a.dtype == np.float32 and a.flags.c_contiguous
    sd["a"].add_(1)  # the learner keeps training: buckets must not change
    assert (buckets[0]["a"] == 1).all()
    wrapped = state_dict_buckets({"policy.x": torch.ones(2), "value_head.w": torch.ones(2)}, 1 << 20,
                                 strip_prefix="policy.")
    assert [list(b) for b in wrapped] == [["x"]]
    assert bucket_names(sd, 100) == [list(b) for b in buckets]  # sizes alone, no copies

    views = state_dict_buckets(sd, bucket_bytes=100, copy=False)
    assert [list(b) for b in views] == [list(b) for b in buckets]
    assert np.shares_memory(views[0]["a"], sd["a"].numpy())  # float32 on CPU: the live parameter
    assert not np.shares_memory(views[0]["b"], sd["b"].numpy())  # float64 had to be converted


def test_buckets_in_a_16_bit_wire_dtype():
    """Floats travel in the engines' dtype: float16 as such, bfloat16 as its bit pattern in uint16 (numpy
    has none), turned back by as_torch into exactly what rounding the float32 weight gives; integers keep
    theirs; bucket sizes count 2 bytes per float."""
    from rlhf_ray.ppo.weights import as_torch, bucket_from_bytes, bucket_to_bytes

    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(6, 5, generator=g), "v": torch.randn(7, generator=g).double(),
          "n": np.random.default_rng(0).standard_normal(4).astype(np.float32), "i": torch.arange(3)}
    for dtype, np_dtype, t_dtype in (("bfloat16", np.uint16, torch.bfloat16), ("float16", np.float16, torch.float16)):
        (bucket,) = state_dict_buckets(sd, 1 << 20, dtype=dtype)
        assert {k: a.dtype for k, a in bucket.items()} == {"w": np_dtype, "v": np_dtype, "n": np_dtype, "i": np.int64}
        for k in ("w", "v", "n"):
            back = as_torch(bucket[k])
            assert back.dtype == t_dtype and torch.equal(back, torch.as_tensor(sd[k]).to(t_dtype))
        assert torch.equal(as_torch(bucket["i"]), torch.arange(3))
        # the safetensors bytes form (engines in another process) keeps the bits
        assert all(np.array_equal(a, bucket[k]) and a.dtype == bucket[k].dtype
                   for k, a in bucket_from_bytes(bucket_to_bytes(bucket)).items())
        assert sum(a.nbytes for a in bucket.values()) == (30 + 7 + 4) * 2 + 3 * 8
    assert [list(b) for b in state_dict_buckets(sd, 64, dtype="bfloat16")] == [["w"], ["v", "n", "i"]]
    assert [list(b) for b in state_dict_buckets(sd, 64)] == [["w"], ["v", "n"], ["i"]]  # float32: 120, 28+16, 24
    with pytest.raises(ValueError, match="weight dtype: expected one of"):
        state_dict_buckets(sd, 64, dtype="int8")


def test_drift_limit_by_engine_dtype():
    from rlhf_ray.ppo.weights import drift_limit

    assert drift_limit(0.0, {"float32"}) == 1e-3
    assert drift_limit(0.0, {"float32", "float16"}) == 5e-2  # the loosest of a mixed pool
    assert drift_limit(0.0, {"bfloat16"}) == drift_limit(0.0, {"float8_e4m3fn"}) == 0.5
    assert drift_limit(2e-2, {"bfloat16"}) == 2e-2  # a configured limit wins


def test_expected_weight_names_follow_the_safetensors_index(tmp_path):
    """As vLLM's loader: with model.safetensors.index.json only the files it maps hold the model's
    weights (Mistral repos also ship consolidated.safetensors with native names); else every file."""
    import json

    from safetensors.numpy import save_file

    from rlhf_ray.ppo.engine import checkpoint_names

    w = np.zeros((2, 2), np.float32)
    save_file({"model.embed_tokens.weight": w}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"lm_head.weight": w, "model.layers.0.self_attn.rotary_emb.inv_freq": w[0]},
              tmp_path / "model-00002-of-00002.safetensors")
    save_file({"tok_embeddings.weight": w, "output.weight": w}, tmp_path / "consolidated.safetensors")
    assert checkpoint_names(str(tmp_path)) == {"model.embed_tokens.weight", "lm_head.weight",
                                                "tok_embeddings.weight", "output.weight"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
        "model.layers.0.self_attn.rotary_emb.inv_freq": "model-00002-of-00002.safetensors"}}))
    assert checkpoint_names(str(tmp_path)) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert checkpoint_names(str(tmp_path / "hub-name")) is None


def test_plain_weights_detects_packed_layers():
    from rlhf_ray.ppo.vllm_ext import plain_weights

    def packed_linear():  # vLLM's oneDNN path: a closure over a handle, the parameter emptied
        layer = torch.nn.Linear(4, 3, bias=False)
        handle = layer.weight.detach().t().contiguous()
        layer.cpu_linear = lambda x, weight, bias: x @ handle
        layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        return layer

    def plain_linear():  # vLLM's fallback: reads the parameter it is given, closes over nothing
        layer = torch.nn.Linear(4, 3, bias=False)
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)
        return layer

    assert plain_weights(torch.nn.Sequential(plain_linear(), torch.nn.LayerNorm(3), plain_linear()))
    assert plain_weights(torch.nn.Sequential(torch.nn.Linear(4, 3)))  # GPU layers: no cpu_linear
    assert not plain_weights(torch.nn.Sequential(plain_linear(), packed_linear()))
    kept = plain_linear()  # e.g. vLLM's lm_head: weight kept but a packed copy used
    handle = kept.weight.detach().clone()
    kept.cpu_linear = lambda x, weight, bias: x @ handle.t()
    assert not plain_weights(torch.nn.Sequential(kept))


def test_logprob_drift_reads_only_the_mask():
    a = np.array([[0.0, -1.0, np.nan], [-2.0, -0.5, -np.inf]], np.float32)
    b = np.array([[5.0, -1.25, 0.0], [-2.0, -0.4, 0.0]], np.float32)
    m = np.array([[False, True, False], [True, True, False]])
    assert logprob_drift(a, b, m) == pytest.approx(0.25)
    assert logprob_drift(a, b, np.zeros_like(m)) == 0.0


# ---- generation -----------------------------------------------------------------------------------

def check_layout(worker, r, max_new_tokens: int):
    """Every invariant of the Rollout token layout (see rlhf_ray/ppo/types.py)."""
    tok = worker.tokenizer
    B, T = r.input_ids.shape
    assert r.input_ids.dtype == np.int64 and r.rollout_logprobs.dtype == np.float32
    for a in (r.attention_mask, r.response_mask):
        assert a.dtype == bool and a.shape == (B, T)
    assert r.truncated.shape == (B,) and len(r.prompts) == len(r.responses) == B
    assert r.attention_mask.sum(1).max() == T  # no all-padding column
    for b in range(B):
        prompt_ids = tok(r.prompts[b])["input_ids"]
        P, L = len(prompt_ids), int(r.attention_mask[b].sum())
        R = L - P
        assert prompt_ids[0] == tok.bos_token_id
        assert r.input_ids[b, :P].tolist() == prompt_ids
        assert r.attention_mask[b].tolist() == [True] * L + [False] * (T - L)
        assert r.response_mask[b].tolist() == [False] * P + [True] * R + [False] * (T - L)
        assert (r.input_ids[b, L:] == tok.pad_token_id).all()
        resp = r.input_ids[b, P:L].tolist()
        assert 1 <= R <= max_new_tokens
        ends_in_eos = resp[-1] == tok.eos_token_id
        assert r.truncated[b] == (not ends_in_eos)
        assert r.truncated[b] == (R == max_new_tokens and not ends_in_eos)
        assert tok.eos_token_id not in resp[:-1]
        assert tok.decode(resp[:-1] if ends_in_eos else resp, skip_special_tokens=True) == r.responses[b]
    assert (r.rollout_logprobs[r.response_mask] <= 0).all()
    assert (r.rollout_logprobs[r.response_mask] < 0).any()
    assert (r.rollout_logprobs[~r.response_mask] == 0).all()
    assert r.num_tokens == int(r.response_mask.sum())


def test_rollout_layout(worker, rollout):
    check_layout(worker, rollout, 24)
    assert rollout.worker_id == 3 and rollout.policy_version == worker.version
    assert (~rollout.truncated).sum() >= 8  # the SFT policy ends most reviews with EOS
    assert all(r.strip().startswith("the ") for r in rollout.responses[:4]), rollout.responses


def test_truncation_with_few_tokens(worker):
    r = worker.generate(synthetic.prompts(6, seed=6), max_new_tokens=3, temperature=1.0, top_p=1.0, seed=1)
    check_layout(worker, r, 3)
    # every synthetic review is longer than 3 tokens: all cut, all exactly 3 tokens
    assert r.truncated.all() and (r.response_mask.sum(1) == 3).all()


def test_sampled_logprobs_match_transformers(worker, rollout, sft_model):
    ref = hf_logprobs(sft_model, rollout.input_ids, rollout.attention_mask)
    assert logprob_drift(rollout.rollout_logprobs, ref, rollout.response_mask) < TOL
    mine = worker.logprobs_of(rollout.input_ids, rollout.attention_mask, rollout.response_mask)
    assert logprob_drift(mine, ref, rollout.response_mask) < TOL
    assert (mine[~rollout.response_mask] == 0).all()


def test_logprobs_are_those_of_the_sampling_distribution(worker, sft_model):
    """At temperature T the engine reports log softmax(logits / T), the distribution it sampled from
    and the one the learner and the reference score at ppo.temperature; with top_p < 1 the nucleus
    renormalisation raises every sampled token's logprob by the same -log(nucleus mass) per step."""
    prompts = synthetic.prompts(8, seed=7)
    hot = worker.generate(prompts, 12, temperature=0.7, top_p=1.0, seed=3)
    m = hot.response_mask
    tempered = hf_logprobs(sft_model, hot.input_ids, hot.attention_mask, temperature=0.7)
    assert logprob_drift(hot.rollout_logprobs, tempered, m) < TOL
    raw = hf_logprobs(sft_model, hot.input_ids, hot.attention_mask)
    assert np.abs(hot.rollout_logprobs - raw)[m].mean() > 0.05  # not the temperature-1 logprobs
    nucleus = worker.generate(prompts, 12, temperature=1.0, top_p=0.8, seed=3)
    full = hf_logprobs(sft_model, nucleus.input_ids, nucleus.attention_mask)
    gap = (nucleus.rollout_logprobs - full)[nucleus.response_mask]
    assert gap.min() > -TOL and gap.max() > 0.01 and gap.max() <= -np.log(0.8) + 1e-4


def test_seeded_generation(worker):
    prompts = ["review of the lamp :"] * 6
    a = worker.generate(prompts, 12, 1.0, 1.0, seed=42)
    b = worker.generate(prompts, 12, 1.0, 1.0, seed=42)
    assert np.array_equal(a.input_ids, b.input_ids)  # reproducible
    assert len(set(a.responses)) > 1  # one stream per prompt: equal prompts, different samples


def test_a_chunk_beyond_the_kv_cache_warns_once_with_the_size_that_fits(worker, test_config):
    blocks, mib = worker.kv_blocks, test_config.rollout.kv_cache_mib
    assert blocks and worker.block_size == 32
    # blocks + 1 sequences of one block each, plus vLLM's null block: 2 blocks too many.
    want = int(mib * (blocks + 2) / blocks) + 1
    try:
        worker._warned_kv = False
        with pytest.warns(RuntimeWarning, match=rf"need {blocks + 2} KV blocks of 32 tokens, the cache holds "
                                                 rf"{blocks}: set rollout.kv_cache_mib >= {want} to run"):
            worker._check_kv_capacity([32] * (blocks + 1))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            worker._check_kv_capacity([32] * (blocks + 1))  # once per worker
            worker._warned_kv = False
            worker._check_kv_capacity([32] * (blocks - 1))  # fits
        assert not seen
    finally:
        worker._warned_kv = False


def test_prompt_too_long_is_refused(worker):
    with pytest.raises(ValueError, match="prompt 0"):
        worker.generate(["the " * 200], 4, 1.0, 1.0)


# ---- weight sync ----------------------------------------------------------------------------------

def test_update_weights_changes_engine(worker, rollout, policy_dir, sft_model):
    new = hf_model(policy_dir, noise=0.05, seed=1)
    old_ref = hf_logprobs(sft_model, rollout.input_ids, rollout.attention_mask)
    new_ref = hf_logprobs(new, rollout.input_ids, rollout.attention_mask)
    v0 = worker.version
    buckets = state_dict_buckets(new.state_dict(), 64 << 10)
    assert len(buckets) > 5  # the sync really went in several buckets
    try:
        info = worker.update_weights(buckets, version=v0 + 1)
        assert info["version"] == v0 + 1 == worker.version
        # rollout.cpu_plain_weights (default): copied into the parameters the kernels read.
        assert info["mode"] == worker.weight_sync_mode == "in_place"
        assert worker.sync_info()["dtype"] == "float32"  # the drift check's error names a 16-bit engine's
        assert info["bytes"] == sum(p.numel() * 4 for p in new.parameters()) and info["seconds"] > 0

        after = worker.logprobs_of(rollout.input_ids, rollout.attention_mask, rollout.response_mask)
        m = rollout.response_mask
        assert logprob_drift(after, new_ref, m) < TOL
        assert logprob_drift(after, old_ref, m) > 1e-2

        r = worker.generate(rollout.prompts, 24, 1.0, 1.0, seed=0)
        assert r.policy_version == v0 + 1
        assert logprob_drift(r.rollout_logprobs, hf_logprobs(new, r.input_ids, r.attention_mask),
                             r.response_mask) < TOL
    finally:
        restore_sft(worker, sft_model)
    back = worker.logprobs_of(rollout.input_ids, rollout.attention_mask, rollout.response_mask)
    assert logprob_drift(back, old_ref, rollout.response_mask) < TOL


def test_update_weights_refuses_partial_state(worker, sft_model):
    sd = {k: v for k, v in sft_model.state_dict().items() if "layers.1." not in k}
    v = worker.version
    with pytest.raises(ValueError, match="missing"):
        worker.update_weights(state_dict_buckets(sd, 1 << 20), version=v + 1)
    assert worker.version == v


def test_prefix_cache_is_reset_after_update(worker, policy_dir, sft_model):
    """Prompts spanning >= 1 KV block are served from the prefix cache on a repeat. After new
    weights, those cached blocks are stale: without the reset the sampled logprobs are wrong
    (shown below by loading weights behind the worker's back), with it they match transformers."""
    prompts = long_prompts(6)
    lens = [len(ids) for ids in worker.encode_prompts(prompts)]
    assert worker.block_size == 32 and min(lens) > worker.block_size and max(lens) + 16 < worker.max_model_len, lens
    new = hf_model(policy_dir, noise=0.05, seed=2)
    buckets = state_dict_buckets(new.state_dict(), 1 << 20)
    try:
        worker.generate(prompts, 16, 1.0, 1.0, seed=3)  # caches the prompts' full blocks (old weights)

        worker.llm.collective_rpc("load_buckets", args=(buckets,))  # new weights, cache not reset
        stale = worker.generate(prompts, 16, 1.0, 1.0, seed=3)
        ref = hf_logprobs(new, stale.input_ids, stale.attention_mask)
        assert logprob_drift(stale.rollout_logprobs, ref, stale.response_mask) > 1e-2

        restore_sft(worker, sft_model)
        worker.generate(prompts, 16, 1.0, 1.0, seed=3)  # cache the blocks again, under SFT weights
        worker.update_weights(buckets, version=worker.version + 1)
        r = worker.generate(prompts, 16, 1.0, 1.0, seed=3)
        ref = hf_logprobs(new, r.input_ids, r.attention_mask)
        assert logprob_drift(r.rollout_logprobs, ref, r.response_mask) < TOL
    finally:
        restore_sft(worker, sft_model)


def test_find_placements_reads_fused_and_padded_layouts():
    from rlhf_ray.ppo.transport.slots import check_order, find_placements, order_pattern, slot_layout

    numels = {"q": 6, "k": 2, "v": 2, "emb": 6, "tied_head": 6}
    # What a loader does with sentinel weights: q, k, v fused into one parameter in that order; the
    # embedding padded to 4 rows of 2 (2 rows stay 0); the tied head skipped.
    qkv = torch.cat([torch.full((6,), 1.0), torch.full((2,), 2.0), torch.full((2,), 3.0)]).view(5, 2)
    emb = torch.cat([torch.full((6,), 4.0), torch.zeros(2)]).view(4, 2)
    params = {"qkv": qkv, "emb": emb}
    assert find_placements(params, numels) == {"q": ("qkv", 0), "k": ("qkv", 6), "v": ("qkv", 8), "emb": ("emb", 0)}

    with pytest.raises(ValueError, match="landed in more than one place"):
        find_placements({"a": torch.tensor([1.0, 1, 0, 1])}, {"x": 2})
    with pytest.raises(ValueError, match="has 3 elements but 2"):
        find_placements({"a": torch.tensor([1.0, 1, 0])}, {"x": 3})
    with pytest.raises(ValueError, match="received no weight"):
        find_placements({"a": torch.tensor([1.0, 1]), "b": torch.zeros(3)}, {"x": 2})
    with pytest.raises(ValueError, match="not a weight's number"):
        find_placements({"a": torch.tensor([2.0, 2.0])}, {"x": 2})  # a loader that added 1

    # Element order: a loader that transposes passes the sentinel check but not this one.
    placed = {"w": ("p", 2)}
    good = torch.cat([torch.zeros(2), order_pattern(6)])
    check_order({"p": good}, placed, {"w": 6})
    bad = torch.cat([torch.zeros(2), order_pattern(6).view(2, 3).t().reshape(-1)])
    with pytest.raises(ValueError, match="reorders"):
        check_order({"p": bad}, placed, {"w": 6})

    offsets, numel = slot_layout({"a": (3,), "b": (2, 20), "c": (1,)})
    assert offsets == {"a": 0, "b": 16, "c": 64} and numel == 80  # 64-byte (16-float) aligned


def test_slot_files_of_killed_jobs_are_removed(tmp_path):
    import subprocess

    from rlhf_ray.ppo.transport.slots import SharedSlots, new_spec, remove_stale_slots

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer exists (reaped)
    stale = [tmp_path / f"rlhf_ray-weights-{dead.pid}-abc123-slot{k}" for k in (0, 1)]
    other = tmp_path / "rlhf_ray-weights-notes.txt"  # not a slot file: kept
    for f in (*stale, other):
        f.write_bytes(b"x")
    spec = new_spec({"w": (4, 4)}, str(tmp_path))  # named after this (live) process
    assert str(os.getpid()) in spec["paths"][0]
    slots = SharedSlots(spec, create=True)  # creating slots sweeps the directory first
    assert sorted(slots.stale_removed) == sorted(map(str, stale))
    assert [os.stat(p).st_mode & 0o777 for p in spec["paths"]] == [0o600, 0o600]  # the policy is private
    kept = [other.name] + [os.path.basename(p) for p in spec["paths"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_slots(str(tmp_path)) == []  # live creator: its files stay
    slots.unlink()
    # A creation that fails half-way (the second file cannot be made) leaves no file behind.
    broken = new_spec({"w": (4, 4)}, str(tmp_path))
    broken["paths"][1] = str(tmp_path / "missing-dir" / "slot1")
    with pytest.raises(FileNotFoundError):
        SharedSlots(broken, create=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name]


def test_shared_weights_one_write_no_engine_copy(worker, rollout, policy_dir, sft_model, tmp_path):
    """The engine reads its weights from the slot files: after the learner's write into the other
    slot and a switch, its logprobs are the new model's; writing into the slot it reads changes them
    with no call to the engine at all (nothing was copied into it)."""
    from rlhf_ray.ppo.transport.slots import SharedSlots, unlink_slots
    from rlhf_ray.ppo.weights import SKIP_SUFFIXES

    new = hf_model(policy_dir, noise=0.05, seed=5)
    ids, am, m = rollout.input_ids, rollout.attention_mask, rollout.response_mask
    old_ref, new_ref = hf_logprobs(sft_model, ids, am), hf_logprobs(new, ids, am)
    sd = sft_model.state_dict()
    shapes = {k: list(v.shape) for k, v in sd.items() if not k.endswith(SKIP_SUFFIXES)}
    spec = None
    try:
        spec = worker.open_receiver("shared_memory", None, shapes, 0, 7, str(tmp_path))
        assert worker.version == 7 and len(list(tmp_path.iterdir())) == 2
        q = sd["model.layers.0.self_attn.q_proj.weight"].numel()
        k = sd["model.layers.0.self_attn.k_proj.weight"].numel()
        fused = "model.layers.0.self_attn.qkv_proj.weight"
        pl = spec["placements"]
        assert pl["model.layers.0.self_attn.q_proj.weight"] == [fused, 0, q]
        assert pl["model.layers.0.self_attn.k_proj.weight"] == [fused, q, k]
        assert pl["model.layers.0.self_attn.v_proj.weight"] == [fused, q + k, k]
        # Discovery went through the engine's own parameters; it still generates with the SFT weights.
        assert logprob_drift(worker.logprobs_of(ids, am, m), old_ref, m) < TOL

        learner_side = SharedSlots(spec)  # what the learner's SharedMemorySender does
        nbytes = learner_side.write(1, new.state_dict().items())
        assert nbytes == 4 * sum(sd[n].numel() for n in pl)
        info = worker.update_weights({"slot": 1, "bytes": nbytes, "seconds": 0.01}, version=8)
        assert info["mode"] == "shared_memory" and info["version"] == 8 == worker.version
        assert logprob_drift(worker.logprobs_of(ids, am, m), new_ref, m) < TOL
        r = worker.generate(rollout.prompts, 24, 1.0, 1.0, seed=0)
        assert r.policy_version == 8
        assert logprob_drift(r.rollout_logprobs, hf_logprobs(new, r.input_ids, r.attention_mask), r.response_mask) < TOL

        learner_side.write(1, sd.items())  # behind the engine's back, into the slot it reads
        assert logprob_drift(worker.logprobs_of(ids, am, m), old_ref, m) < TOL
        with pytest.raises(RuntimeError, match="shared weights"):
            worker.update_weights(state_dict_buckets(sd, 1 << 20), version=9)
        with pytest.raises(ValueError, match="not written"):
            learner_side.write(0, list(sd.items())[:3])
        with pytest.raises(ValueError, match="has 8 elements"):  # a learner with another shape
            learner_side.write(0, [("model.norm.weight", torch.ones(8))])
    finally:
        worker.close_receiver()
        if spec is not None:
            unlink_slots(spec)
    assert not list(tmp_path.iterdir())
    restore_sft(worker, sft_model)  # private weights again: loads in place
    assert logprob_drift(worker.logprobs_of(ids, am, m), old_ref, m) < TOL


# Builds and shuts down a second in-process engine, which tears down vLLM's process-wide parallel
# state: tests that use the module's `worker` go above this one.
def test_update_weights_through_vllm_repacking(policy_dir, test_config, sft_model, rollout):
    """rollout.cpu_plain_weights=false keeps vLLM's packed oneDNN kernels; syncs then replay vLLM's
    loader (repacking every matrix) and must land the same weights."""
    import dataclasses

    from rlhf_ray.ppo.rollout import RolloutWorker

    cfg = dataclasses.replace(test_config.rollout, cpu_plain_weights=False)
    threads = torch.get_num_threads()
    w = RolloutWorker(str(policy_dir), cfg, worker_id=4, seed=0)
    try:
        assert w.weight_sync_mode == "reload"
        new = hf_model(policy_dir, noise=0.05, seed=4)
        info = w.update_weights(state_dict_buckets(new.state_dict(), 64 << 10), version=1)
        assert info["mode"] == "reload" and info["version"] == 1
        lp = w.logprobs_of(rollout.input_ids, rollout.attention_mask, rollout.response_mask)
        assert logprob_drift(lp, hf_logprobs(new, rollout.input_ids, rollout.attention_mask),
                             rollout.response_mask) < TOL
        assert logprob_drift(lp, hf_logprobs(sft_model, rollout.input_ids, rollout.attention_mask),
                             rollout.response_mask) > 1e-2
    finally:
        w.shutdown()
        torch.set_num_threads(threads)


def test_every_stop_token_of_the_generation_config_ends_a_response(policy_dir, test_config, rollout, tmp_path):
    """Models whose generation_config lists several EOS ids (Llama-3's <|eot_id|>, Gemma's <end_of_turn>)
    stop on any of them: such a response is finished (not truncated, no truncation penalty) and its
    text excludes the stop token. Here the token the SFT policy writes most often before EOS is made a
    second stop token, in a copy of the policy directory."""
    import collections
    import json
    import shutil

    from transformers import AutoTokenizer

    from rlhf_ray.ppo.rollout import RolloutWorker

    eos = AutoTokenizer.from_pretrained(policy_dir).eos_token_id
    ends = [rollout.input_ids[b, rollout.attention_mask[b]].tolist() for b in range(len(rollout.prompts))]
    stop = collections.Counter(s[-2] for s in ends if s[-1] == eos).most_common(1)[0][0]
    model = tmp_path / "two_stops"
    shutil.copytree(policy_dir, model)
    gen = json.loads((model / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eos
    (model / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [eos, int(stop)]}))
    threads = torch.get_num_threads()
    w = RolloutWorker(str(model), test_config.rollout, worker_id=5, seed=0)
    try:
        r = w.generate(synthetic.prompts(16, seed=5), max_new_tokens=24, temperature=1.0, top_p=1.0, seed=0)
    finally:
        w.shutdown()
        torch.set_num_threads(threads)
    by_stop = 0
    for b in range(len(r.prompts)):
        resp = r.input_ids[b, r.response_mask[b]].tolist()
        assert eos not in resp[:-1] and stop not in resp[:-1]
        assert r.truncated[b] == (resp[-1] not in (eos, stop)), resp
        assert r.truncated[b] == (len(resp) == 24 and resp[-1] not in (eos, stop))
        if resp[-1] == stop:
            by_stop += 1
            assert r.responses[b] == w.tokenizer.decode(resp[:-1], skip_special_tokens=True)
    assert by_stop >= 4  # most reviews end in it now


@pytest.mark.parametrize("plain", [True, False])
def test_a_model_with_tied_embeddings_syncs_once_per_weight(tied_policy_dir, test_config, plain):
    """tie_word_embeddings (Qwen2.5-0.5B, Llama-3.2-1B, SmolLM2): the learner exports the shared
    embedding once (lm_head.weight is the same tensor; its saved files and vLLM tie it themselves), and a
    sync still lands every weight in the engine, with plain weights (in place) and with vLLM's packed
    ones (reload, where the LM head's packed copy must be rebuilt from the new embedding): logprobs
    match the learner's after training moved them."""
    from rlhf_ray.ppo.learner import Learner
    from rlhf_ray.ppo.rollout import RolloutWorker

    tied = tied_policy_dir
    learner = Learner(tied, test_config.ppo, device="cpu")
    exported = learner.state_dict()
    assert "lm_head.weight" not in exported and "model.embed_tokens.weight" in exported
    assert set(learner.weight_meta()["names"]) == set(exported)
    with torch.no_grad():  # stands in for a PPO step: every weight moves, the tie holds
        for p in learner.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert learner.policy.lm_head.weight.data_ptr() == learner.policy.model.embed_tokens.weight.data_ptr()
    threads = torch.get_num_threads()
    w = RolloutWorker(str(tied), dataclasses.replace(test_config.rollout, cpu_plain_weights=plain), worker_id=6, seed=0)
    try:
        assert w.weight_sync_mode == ("in_place" if plain else "reload")
        r = w.generate(synthetic.prompts(4, seed=1), 6, 1.0, 1.0, seed=0)
        learner.open_sender("object_store", 64 << 10)
        info = w.update_weights(learner.send_weights(1), version=1)
        assert info["bytes"] == sum(a.nbytes for a in learner.state_dict().values())
        lp = w.logprobs_of(r.input_ids, r.attention_mask, r.response_mask)
    finally:
        w.shutdown()
        torch.set_num_threads(threads)
    assert logprob_drift(lp, learner.logprobs(r.input_ids, r.attention_mask), r.response_mask) < TOL


def vllm_packs_bf16_linears() -> bool:
    """Whether vLLM packs a bfloat16 linear weight on this CPU (as ``dispatch_cpu_unquantized_gemm``
    does): its AMX kernels for small matrices, or a oneDNN handle, which cannot be made without
    AVX-512 bfloat16 (on an AVX2-only CPU vLLM falls back to plain weights)."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    if check_cpu_sgl_kernel(256, 128, torch.bfloat16):
        return True
    if not ops._supports_onednn:
        return False
    try:
        ops.create_onednn_mm(torch.zeros(256, 128, dtype=torch.bfloat16).t(), 32)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("plain,packed_mode", [(True, "in_place"), (False, "reload")])
def test_a_16_bit_engine_takes_weights_in_its_own_dtype(policy_dir, test_config, rollout, plain, packed_mode):
    """rollout.dtype=bfloat16: the engine asks for bfloat16 weights (wire_dtype), and a sync in
    bfloat16 (half the bytes) leaves it computing exactly what a float32 sync does, since the engine
    rounds float32 to bfloat16 as it loads; also through safetensors bytes, the form an engine in another
    process gets. Its logprobs then differ from the float32 learner's by bfloat16 noise only, far below
    the default limit for bfloat16 engines and far below a stale engine's drift. With plain weights
    (rollout.cpu_plain_weights) syncs copy in place; with vLLM's packed ones (oneDNN, and on CPUs with
    AMX its AMX kernels for smaller matrices) they replay its loader."""
    from rlhf_ray.ppo.engine import plain_cpu_linear
    from rlhf_ray.ppo.rollout import RolloutWorker
    from rlhf_ray.ppo.weights import bucket_to_bytes, drift_limit

    # Packed weights are only packed where vLLM can pack them: elsewhere they stay plain, synced in place.
    mode = packed_mode if plain or vllm_packs_bf16_linears() else "in_place"
    args = rollout.input_ids, rollout.attention_mask, rollout.response_mask
    new, sft = hf_model(policy_dir, noise=0.05, seed=7), hf_model(policy_dir)
    threads = torch.get_num_threads()
    cfg = dataclasses.replace(test_config.rollout, dtype="bfloat16", cpu_plain_weights=plain)
    w = RolloutWorker(str(policy_dir), cfg, worker_id=7, seed=0)
    try:
        assert w.wire_dtype == "bfloat16" and w.sync_info()["dtype"] == "bfloat16" and w.weight_sync_mode == mode
        f32 = w.update_weights(state_dict_buckets(new.state_dict(), 64 << 10), version=1)
        lp = w.logprobs_of(*args)
        w.update_weights(state_dict_buckets(sft.state_dict(), 64 << 10), version=2)
        assert not np.array_equal(w.logprobs_of(*args), lp)
        bf16 = w.update_weights(state_dict_buckets(new.state_dict(), 64 << 10, dtype="bfloat16"), version=3)
        assert bf16["bytes"] * 2 == f32["bytes"] and bf16["mode"] == f32["mode"] == mode
        assert np.array_equal(w.logprobs_of(*args), lp)
        w.update_weights(state_dict_buckets(sft.state_dict(), 64 << 10), version=4)
        as_bytes = [bucket_to_bytes(b) for b in state_dict_buckets(new.state_dict(), 64 << 10, dtype="bfloat16")]
        with plain_cpu_linear(plain):
            w.llm.collective_rpc("load_buckets", args=(as_bytes,))
        w._reset_prefix_cache()
        assert np.array_equal(w.logprobs_of(*args), lp)
    finally:
        w.shutdown()
        torch.set_num_threads(threads)
    noise = logprob_drift(lp, hf_logprobs(new, rollout.input_ids, rollout.attention_mask), rollout.response_mask)
    stale = logprob_drift(lp, hf_logprobs(sft, rollout.input_ids, rollout.attention_mask), rollout.response_mask)
    assert 1e-3 < noise < drift_limit(0.0, {"bfloat16"}) / 5 and stale > 5 * noise, (noise, stale)  # 0.045, 8.4


# ---- Ray ------------------------------------------------------------------------------------------

def test_ray_copies_returned_views_before_the_next_task(ray_cluster):
    """The driver asks the learner for copy=False buckets (views of the live parameters): safe only
    because Ray copies an actor method's return values into the object store before the actor runs
    its next task. Checked here with the same pattern: export views, train in place, then read."""
    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self):
            self.w = torch.zeros(1 << 18)  # 1 MiB: stored in shared memory, not inline

        def export(self):
            return state_dict_buckets({"w": self.w}, 1 << 30, copy=False)

        def train(self):
            self.w.add_(1.0)
            return float(self.w[0])

    h = Holder.remote()
    exported = h.export.remote()
    assert ray.get(h.train.remote()) == 1.0
    assert (ray.get(exported)[0]["w"] == 0).all()
    ray.kill(h)


def test_two_ray_workers_one_object_ref(ray_cluster, policy_dir, test_config, sft_model):
    ray = ray_cluster
    from rlhf_ray.ppo.rollout import RolloutWorker

    # Worker 1's engine runs in a process of its own, vLLM's default on GPUs: weights then cross to it
    # as safetensors bytes (msgpack carries no arrays), the path GPU engines take.
    workers = [ray.remote(num_cpus=1, runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": str(i)}})(
        RolloutWorker).remote(str(policy_dir), test_config.rollout, worker_id=i, seed=0) for i in range(2)]
    try:
        assert ray.get([w.ready.remote() for w in workers], timeout=240) == [True, True]
        assert ray.get([w.__ray_call__.remote(lambda self: self.in_process) for w in workers]) == [True, False]
        prompts = synthetic.prompts(8, seed=7)
        rollouts = ray.get([w.generate.remote(prompts, 16, 1.0, 1.0, 11) for w in workers], timeout=120)
        for i, r in enumerate(rollouts):
            assert r.worker_id == i and r.policy_version == 0 and r.num_tokens > 0
            assert logprob_drift(r.rollout_logprobs, hf_logprobs(sft_model, r.input_ids, r.attention_mask),
                                 r.response_mask) < TOL
        assert not np.array_equal(rollouts[0].input_ids, rollouts[1].input_ids)  # workers sample apart

        new = hf_model(policy_dir, noise=0.05, seed=3)
        ref = ray.put(state_dict_buckets(new.state_dict(), 256 << 10))  # one put, read by both
        infos = ray.get([w.update_weights.remote(ref, 5) for w in workers], timeout=120)
        assert [i["version"] for i in infos] == [5, 5]
        assert ray.get([w.__ray_call__.remote(lambda w: w.version) for w in workers]) == [5, 5]

        r = rollouts[0]
        lps = ray.get([w.logprobs_of.remote(r.input_ids, r.attention_mask, r.response_mask) for w in workers],
                      timeout=120)
        new_ref = hf_logprobs(new, r.input_ids, r.attention_mask)
        old_ref = hf_logprobs(sft_model, r.input_ids, r.attention_mask)
        assert logprob_drift(lps[0], lps[1], r.response_mask) < 1e-5
        for lp in lps:
            assert logprob_drift(lp, new_ref, r.response_mask) < TOL
            assert logprob_drift(lp, old_ref, r.response_mask) > 1e-2

        # Buckets as separate refs inside a list: the worker fetches them itself.
        refs = [ray.put(b) for b in state_dict_buckets(sft_model.state_dict(), 256 << 10)]
        assert ray.get(workers[1].update_weights.remote(refs, 6), timeout=120)["version"] == 6
        back = ray.get(workers[1].logprobs_of.remote(r.input_ids, r.attention_mask, r.response_mask))
        assert logprob_drift(back, old_ref, r.response_mask) < TOL
    finally:
        ray.get([w.shutdown.remote() for w in workers], timeout=60)
        for w in workers:
            ray.kill(w)



# ---- engines sized by the job; chat prompts ---------------------------------------------------------

SMOLLM2_SHAPE = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                 "hidden_size": 576, "max_position_embeddings": 8192}


def test_engines_are_sized_by_the_job_and_a_small_kv_cache_is_our_config_error(test_config):
    """max_model_len = ppo.max_prompt_tokens + ppo.max_new_tokens (+1 for the drift check's scoring);
    a CPU KV cache that cannot hold one such sequence (vLLM's own start-up check) is refused first,
    naming rollout.kv_cache_mib and the size needed: SmolLM2-135M in float32 takes 2 x 30 layers x 3 KV
    heads x 64 x 4 bytes = 46080 bytes per token."""
    from rlhf_ray.config import ConfigError
    from rlhf_ray.ppo.engine import check_engine_fit, engine_args, kv_bytes_per_token

    rc = test_config.rollout
    assert kv_bytes_per_token(SMOLLM2_SHAPE) == 46080 and kv_bytes_per_token(SMOLLM2_SHAPE, "bfloat16") == 23040
    assert check_engine_fit(SMOLLM2_SHAPE, 256, 64, rc, on_gpu=False) == 321  # 321 -> 11 blocks of 32: 15.5 MiB
    with pytest.raises(ConfigError) as e:
        check_engine_fit(SMOLLM2_SHAPE, 2048, 64, rc, on_gpu=False)
    # 2113 tokens -> 67 blocks of 32 = 2144 tokens x 46080 bytes = 94.2 MiB
    assert str(e.value) == ("rollout.kv_cache_mib=64: an engine needs at least 95 MiB of KV cache for one sequence "
                            "of ppo.max_prompt_tokens + ppo.max_new_tokens = 2112 tokens (46080 bytes per token in "
                            "float32); raise it, or lower those")
    assert check_engine_fit(SMOLLM2_SHAPE, 2048, 64, dataclasses.replace(rc, kv_cache_mib=95), on_gpu=False) == 2113
    assert check_engine_fit(SMOLLM2_SHAPE, 2048, 64, rc, on_gpu=True) == 2113  # GPUs: vLLM sizes its cache
    with pytest.raises(ConfigError, match="8192 tokens"):
        check_engine_fit(SMOLLM2_SHAPE, 8192, 64, rc, on_gpu=True)
    assert engine_args("m", rc, 0, 0, "cpu", max_model_len=81)["max_model_len"] == 81
    assert "max_model_len" not in engine_args("m", rc, 0, 0, "cpu")


def test_chat_prompts_through_the_template_with_its_stop_token(policy_dir, test_config, sft_model):
    """A rollout worker with a chat template: chat prompts are rendered with the generation prompt (one
    BOS, from the template), plain and chat prompts mix in one chunk, columns and sources travel with
    the rollout, a response ends at the template's end-of-turn token (here <pad>, neither EOS nor in
    generation_config) and the engine's logprobs still match transformers'."""
    from reference import CHAT_TEMPLATE

    from rlhf_ray.data.chat import ChatRenderer
    from rlhf_ray.data.prompts import PromptRecord
    from rlhf_ray.ppo.rollout import RolloutWorker

    template = CHAT_TEMPLATE.replace("{{ eos_token }}", "<pad>")
    threads = torch.get_num_threads()
    w = RolloutWorker(str(policy_dir), test_config.rollout, worker_id=1, seed=0, max_model_len=81,
                      chat_template=template)
    try:
        assert w.max_model_len == 81 and w.stop_token_ids == [w.tokenizer.pad_token_id]
        chat = [{"role": "user", "content": "review of the lamp :"}]
        prompts = [PromptRecord(chat, {"product": "lamp"}, "p.jsonl:1"), "review of the kettle :",
                   PromptRecord("review of the chair :", {}, "p.jsonl:3")]
        ro = w.generate(prompts, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=0)
        renderer = ChatRenderer(w.tokenizer, template)
        for b, p in enumerate([chat, "review of the kettle :", "review of the chair :"]):
            want = renderer.prompt_ids(p)
            assert ro.input_ids[b, :len(want)].tolist() == want and not ro.response_mask[b, :len(want)].any()
        assert ro.prompts == [chat, "review of the kettle :", "review of the chair :"]
        assert ro.columns == [{"product": "lamp"}, {}, {}] and ro.sources == ["p.jsonl:1", "", "p.jsonl:3"]
        assert (ro.input_ids[0, :ro.attention_mask[0].sum()] == w.tokenizer.bos_token_id).sum() == 1
        np.testing.assert_allclose(ro.rollout_logprobs, hf_logprobs(sft_model, ro.input_ids, ro.attention_mask)
                                   * ro.response_mask, atol=2e-4)
        # The end-of-turn token stops a response: sample until one ends with it (the SFT policy never
        # writes <pad> by itself, so bias it there through the engine's weights).
        state = {k: v.clone() for k, v in sft_model.state_dict().items()}
        state["lm_head.weight"][w.tokenizer.pad_token_id] += 5.0 * state["lm_head.weight"][w.tokenizer.eos_token_id]
        w.update_weights(state_dict_buckets(state, 1 << 20), version=1)
        ro = w.generate([chat] * 8, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=1)
        ends = [ro.input_ids[b][ro.response_mask[b]][-1] for b in range(8)]
        pad, eos = w.tokenizer.pad_token_id, w.tokenizer.eos_token_id
        stopped = [b for b in range(8) if not ro.truncated[b]]
        assert any(ends[b] == pad for b in stopped) and all(ends[b] in (pad, eos) for b in stopped), ends
        assert all(ends[b] not in (pad, eos) for b in range(8) if ro.truncated[b])
    finally:
        w.shutdown()
        torch.set_num_threads(threads)
