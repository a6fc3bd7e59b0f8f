"""The rollout side of PPO: a vLLM engine that turns prompts into :class:`Rollout` chunks and takes
new policy weights from the learner (versioned).

A plain class; Ray is applied at the edge (``rlhf_ray/ppo/actors.py``)::

    Worker = ray.remote(num_cpus=cfg.rollout.cpus_per_worker, num_gpus=cfg.rollout.gpus_per_worker,
                        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})(RolloutWorker)

Conventions the learner relies on:

* Prompt ids are ``ChatRenderer.prompt_ids`` of the model directory's own tokenizer (plain text: the
  tokenizer's encoding, BOS added by its post-processor; a chat: rendered by the chat template with
  the generation prompt), fed to vLLM as token ids, so the learner recomputes exactly these ids.
  Prompts come as text, messages, or :class:`rlhf_ray.data.prompts.PromptRecord` (whose other fields
  travel with the rollout to the reward functions).
* Response tokens are everything the engine sampled, EOS included when it was sampled (the EOS is
  an action the policy took). ``truncated[b]`` is True when no stop token (the tokenizer's EOS, any of
  ``generation_config.eos_token_id``, or the chat template's end-of-turn token) came within
  ``max_new_tokens`` (or the length limit).
  ``responses[b]`` is ``tokenizer.decode(response ids but the stop token, skip_special_tokens=True)``,
  so it keeps the leading space of the first token.
* Logprobs are those of the distribution the tokens were sampled from: log_softmax(logits / temperature),
  renormalised over the top-p nucleus when top_p < 1 (vLLM's "processed_logprobs"). The learner and
  the reference model score tokens at the same temperature (``ppo.temperature``), so PPO's ratio, KL
  terms and entropy are those of the sampling policy; the nucleus is not modelled there, so with
  top_p < 1 the rollout is slightly off-policy (``behaviour_logprob_gap`` shows by how much).
  :meth:`logprobs_of` (the drift check after a sync) scores at temperature 1, on both sides.
* Sequences are kept at most ``max_model_len - 1`` tokens long, so that :meth:`logprobs_of` (which
  scores a whole sequence as a vLLM prompt) can score every rollout.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from rlhf_ray.config import RolloutConfig
from rlhf_ray.data.chat import ChatRenderer
from rlhf_ray.data.prompts import PromptRecord
from rlhf_ray.ppo.engine import checkpoint_names, engine_args, plain_cpu_linear
from rlhf_ray.ppo.types import Rollout
from rlhf_ray.ppo.weights import bucket_nbytes, bucket_to_bytes

def _resolve_refs(buckets) -> list[Mapping]:
    """Buckets as a flat list of dicts. Ray resolves an object ref passed as a top-level argument,
    not refs nested in a list: those are fetched here (a ref may hold one bucket or a list)."""
    if isinstance(buckets, Mapping):
        buckets = [buckets]
    buckets = list(buckets)
    ray = sys.modules.get("ray")  # only a Ray caller can have passed refs
    if ray is not None and any(isinstance(b, ray.ObjectRef) for b in buckets):
        buckets = [ray.get(b) if isinstance(b, ray.ObjectRef) else b for b in buckets]
    out = []
    for b in buckets:
        out.extend(b if isinstance(b, (list, tuple)) else [b])
    if not all(isinstance(b, Mapping) for b in out):
        raise TypeError(f"update_weights: buckets must be dicts name -> array, got {type(out[0]).__name__}")
    return out


def _chosen_logprobs(lps, token_ids, first: int = 0) -> list[float]:
    """Logprob of ``token_ids[i]`` at position ``first + i`` of vLLM's per-position logprobs
    (``FlatLogprobs`` or a list of {token_id: Logprob})."""
    out = []
    if hasattr(lps, "start_indices"):  # FlatLogprobs
        for i, tok in enumerate(token_ids):
            s, e = lps.start_indices[first + i], lps.end_indices[first + i]
            out.append(lps.logprobs[lps.token_ids.index(tok, s, e)])
    else:
        out = [lps[first + i][tok].logprob for i, tok in enumerate(token_ids)]
    return out


class RolloutWorker:
    """One vLLM engine: :meth:`generate` rollouts, :meth:`update_weights` from the learner,
    :meth:`logprobs_of` given sequences (the drift check after a sync).

    ``seed`` and ``worker_id`` together seed the engine, so workers sample differently.
    ``device``: "cpu" (float32 unless ``rollout.dtype`` says otherwise, eager; float32 logprobs match a
    float32 transformers forward within ~1e-5) or "cuda" (vLLM's dtype unless ``rollout.dtype`` is
    set). ``engine_kwargs`` override any ``vllm.LLM`` argument (e.g. ``block_size``, ``max_model_len``).

    On CPU the engine runs in this process unless ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` is set explicitly
    (in-process starts in 3-10 s instead of 25-40 s and uses ~1 GiB less memory); on GPU vLLM's
    default (a separate engine process) stands unless the variable says otherwise. vLLM reads the
    variable when the first engine of a process is built; in-process vLLM also takes over
    ``torch.set_num_threads`` of the host process, so keep training in another process.
    """

    def __init__(self, model_path: str, rollout_cfg: RolloutConfig, worker_id: int = 0, seed: int = 0,
                 device: str = "cpu", engine_kwargs: dict | None = None, version: int = 0,
                 max_model_len: int | None = None, chat_template: str = "auto", tools=None):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        if device == "cpu":
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from transformers import AutoTokenizer
        from vllm import LLM

        self.model_path = str(model_path)
        self.cfg = rollout_cfg
        self.worker_id = worker_id
        self.seed = seed
        self.device = device
        self._version = int(version)  # of the weights in model_path (a resumed run's checkpoint: > 0)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.renderer = ChatRenderer(self.tokenizer, chat_template)
        # The template's end-of-turn token, where it is neither EOS nor in generation_config (vLLM's stops).
        self.stop_token_ids = self.renderer.stop_token_ids()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self._expected_names = checkpoint_names(self.model_path)
        # Multi-turn episodes (``tools``: a rlhf_ray.ppo.toolbox.ToolSpec; rlhf_ray.ppo.episodes), checked
        # before the engine starts.
        self.toolbox = self.tool_template = None
        if tools is not None:
            from rlhf_ray.ppo.tool_calls import ToolTemplate
            from rlhf_ray.ppo.toolbox import Toolbox

            self.toolbox = Toolbox(tools)
            self.tool_template = ToolTemplate(self.tokenizer, self.renderer.template, self.stop_token_ids)

        kwargs = {**engine_args(self.model_path, rollout_cfg, worker_id, seed, device, max_model_len),
                  **(engine_kwargs or {})}
        # vLLM collects garbage several times while it builds an engine, each time walking every object
        # the imports made (~0.25 s a time on 2 cores): collect once and set the survivors aside while it
        # builds, which takes an in-process engine's start from ~3 s to ~2 s.
        gc.collect()
        gc.freeze()
        try:
            with plain_cpu_linear(device == "cpu" and rollout_cfg.cpu_plain_weights):
                self.llm = LLM(**kwargs)
        finally:
            gc.unfreeze()  # (collectable again: what the process drops later is freed as usual)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        # Arguments of collective_rpc reach the worker as Python objects only in-process.
        self.in_process = type(self.llm.llm_engine.engine_core).__name__ == "InprocClient"
        cache = self.llm.llm_engine.vllm_config.cache_config
        self.block_size = int(cache.block_size)
        self.kv_blocks = cache.num_gpu_blocks  # None if the engine did not report it
        self._warned_kv = False
        # "in_place" (weights copied where the kernels read them) or "reload" (vLLM's full loading
        # path, repacking included); see rlhf_ray/ppo/vllm_ext.py.
        self.weight_sync_mode = self.llm.collective_rpc("weight_sync_mode")[0]
        # The dtype update_weights' floats should come in (float32, or this engine's 16-bit dtype).
        self.wire_dtype = self.llm.collective_rpc("weight_wire_dtype")[0]
        self.shared_weights: dict | None = None  # the spec, once attached to shared memory

    # ---- state -------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def ready(self) -> bool:
        return True

    def shutdown(self) -> None:
        """Stop the engine (a multiprocess engine leaks its /dev/shm unless shut down before the
        process goes). Idempotent."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    # ---- generation --------------------------------------------------------------------------

    def encode_prompts(self, prompts: list) -> list[list[int]]:
        """Prompt ids exactly as the learner gets them (``ChatRenderer.prompt_ids``)."""
        plain = [p for p in prompts if isinstance(p, str)]
        if len(plain) == len(prompts):  # one tokenizer call
            return [list(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        return [self.renderer.prompt_ids(p) for p in prompts]

    def generate(self, prompts: list, max_new_tokens: int | list[int], temperature: float, top_p: float,
                 seed: int | None = None, *, ignore_eos: bool = False) -> Rollout:
        """Sample one response per prompt (text, messages or PromptRecord). ``seed`` makes the chunk
        reproducible (each prompt gets its own stream, derived from (seed, worker_id, index)); None
        uses the engine's RNG. ``max_new_tokens``: one limit for all, or one per prompt.
        ``ignore_eos`` (benchmarks) generates exactly ``max_new_tokens`` tokens."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            raise ValueError("generate: no prompts")
        t0 = time.perf_counter()
        records = [p if isinstance(p, PromptRecord) else PromptRecord(p, {}, "") for p in prompts]
        if self.toolbox is not None:  # episodes with tool calls
            from rlhf_ray.ppo.episodes import generate_episodes

            return generate_episodes(self, records, max_new_tokens, temperature, top_p, seed)
        prompts = [r.prompt for r in records]
        prompt_ids = self.encode_prompts(prompts)
        limits = [int(max_new_tokens)] * len(prompts) if np.ndim(max_new_tokens) == 0 else list(max_new_tokens)
        if len(limits) != len(prompts) or min(limits) < 1:
            raise ValueError(f"max_new_tokens: expected a positive int or {len(prompts)} of them, "
                             f"got {max_new_tokens!r}")
        limit = self.max_model_len - 1  # longest sequence logprobs_of can score
        params = []
        seeds = (np.random.SeedSequence([seed, self.worker_id]).generate_state(len(prompts))
                 if seed is not None else [None] * len(prompts))
        for i, ids in enumerate(prompt_ids):
            room = limit - len(ids)
            if room < 1:
                raise ValueError(f"prompt {i} is {len(ids)} tokens; the model takes at most "
                                 f"{limit - 1} prompt tokens to leave room for a response")
            params.append(SamplingParams(
                max_tokens=min(limits[i], room), temperature=temperature, top_p=top_p,
                seed=None if seeds[i] is None else int(seeds[i] & 0x7FFFFFFF), logprobs=0,
                ignore_eos=ignore_eos, detokenize=False, flat_logprobs=True,
                stop_token_ids=self.stop_token_ids or None))
        self._check_kv_capacity([len(ids) + p.max_tokens for ids, p in zip(prompt_ids, params)])
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=False)

        responses_ids = [list(o.outputs[0].token_ids) for o in outputs]
        lengths = [len(p) + len(r) for p, r in zip(prompt_ids, responses_ids)]
        B, T = len(prompts), max(lengths)
        input_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((B, T), dtype=bool)
        response_mask = np.zeros((B, T), dtype=bool)
        logprobs = np.zeros((B, T), dtype=np.float32)
        truncated = np.zeros(B, dtype=bool)
        for b, (p, r, out) in enumerate(zip(prompt_ids, responses_ids, outputs)):
            P, R = len(p), len(r)
            input_ids[b, :P + R] = p + r
            attention_mask[b, :P + R] = True
            response_mask[b, P:P + R] = True
            logprobs[b, P:P + R] = _chosen_logprobs(out.outputs[0].logprobs, r)
            # "stop": the tokenizer's EOS or another of the model's stop tokens (generation_config's
            # eos_token_id list: Llama-3's <|eot_id|>, Gemma's <end_of_turn>) ended it; "length": cut.
            truncated[b] = ignore_eos or out.outputs[0].finish_reason != "stop"
        texts = self.tokenizer.batch_decode(  # the stop token is an action, not text
            [r[:-1] if (r and not cut) else r for r, cut in zip(responses_ids, truncated)], skip_special_tokens=True)
        return Rollout(
            input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
            rollout_logprobs=logprobs, truncated=truncated, prompts=list(prompts), responses=texts,
            policy_version=self._version, worker_id=self.worker_id,
            gen_seconds=time.perf_counter() - t0, num_tokens=int(response_mask.sum()),
            columns=[r.columns for r in records], sources=[r.source for r in records])

    def _check_kv_capacity(self, max_lengths: list[int]) -> None:
        """Warn (once) when the chunk does not fit the KV cache at once: vLLM then runs the
        overflow after the rest, which can halve throughput without any other sign."""
        if not self.kv_blocks or self._warned_kv:
            return
        need = sum(-(-n // self.block_size) for n in max_lengths) + 1  # + vLLM's null block
        if need > self.kv_blocks:
            self._warned_kv = True
            fix = (f"rollout.kv_cache_mib >= {int(self.cfg.kv_cache_mib * need / self.kv_blocks) + 1}"
                   if self.device == "cpu" else "rollout.gpu_memory_utilization higher (or use more rollout workers)")
            warnings.warn(f"RolloutWorker {self.worker_id}: {len(max_lengths)} sequences need {need} KV blocks "
                          f"of {self.block_size} tokens, the cache holds {self.kv_blocks}: set {fix} to run "
                          f"them in one batch", RuntimeWarning)

    def logprobs_of(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                    response_mask: np.ndarray) -> np.ndarray:
        """The engine's log pi(token_t | tokens_<t) on ``response_mask``, 0 elsewhere; float32 [B, T].

        Inputs use the Rollout layout (each row's tokens first, then right padding). Each row is
        scored as a prompt (prompt_logprobs); vLLM never reads the prefix cache for those.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask, bool)
        response_mask = np.asarray(response_mask, bool)
        B, T = input_ids.shape
        lengths = attention_mask.sum(1)
        if not all(attention_mask[b, :lengths[b]].all() for b in range(B)):
            raise ValueError("attention_mask must be a prefix of each row (right padding only)")
        if (response_mask & ~attention_mask).any() or response_mask[:, 0].any():
            raise ValueError("response_mask must lie inside attention_mask, after the first token")
        seqs = [input_ids[b, :lengths[b]].tolist() for b in range(B)]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                flat_logprobs=True)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        out = np.zeros((B, T), dtype=np.float32)
        for b, (s, o) in enumerate(zip(seqs, outputs)):
            # prompt_logprobs[t] is log p(s[t] | s[:t]); position 0 has none.
            out[b, 1:len(s)] = _chosen_logprobs(o.prompt_logprobs, s[1:], first=1)
        return np.where(response_mask, out, np.float32(0.0))

    # ---- weights -----------------------------------------------------------------------------

    def update_weights(self, buckets, version: int) -> dict:
        """Load a full set of policy weights and stamp ``version`` on later rollouts.

        ``buckets``: what :func:`rlhf_ray.ppo.weights.state_dict_buckets` returns (a list of dicts
        name -> array in Hugging Face checkpoint names; floats in any of its dtypes, best in
        :attr:`wire_dtype`), a single dict, or a list of Ray object refs to buckets (fetched here; a
        ref passed as the argument itself is resolved by Ray).
        Every weight of the model must be present: vLLM would silently keep old values for the rest.
        Returns {"version", "seconds", "fetch_seconds" (getting nested refs from the object store),
        "bytes", "mode"} (mode: :attr:`weight_sync_mode`).
        """
        if self.shared_weights is not None:
            raise RuntimeError("update_weights: this engine reads shared weights; the learner writes them "
                               "(use_shared_weights)")
        t0 = time.perf_counter()
        buckets = _resolve_refs(buckets)
        t_fetched = time.perf_counter()
        if self._expected_names is not None:
            names = set().union(*(b.keys() for b in buckets))
            missing = self._expected_names - names
            if missing:
                raise ValueError(f"update_weights: {len(missing)} weight(s) missing, e.g. "
                                 f"{sorted(missing)[:5]}; got e.g. {sorted(names)[:5]}")
        nbytes = bucket_nbytes(buckets)
        if self.in_process:  # "reload" processes the layers again: as when the engine was built
            with plain_cpu_linear(self.device == "cpu" and self.cfg.cpu_plain_weights):
                loaded = self.llm.collective_rpc("load_buckets", args=(buckets,))[0]
        elif self.weight_sync_mode == "in_place":  # one bucket's bytes at a time, not the whole model's
            for i, b in enumerate(buckets):
                loaded = self.llm.collective_rpc("load_buckets", args=([bucket_to_bytes(b)], i == len(buckets) - 1))[0]
        else:  # "reload" must see every weight in one call
            loaded = self.llm.collective_rpc("load_buckets", args=([bucket_to_bytes(b) for b in buckets],))[0]
        self._reset_prefix_cache()
        self._version = int(version)
        return {"version": self._version, "seconds": time.perf_counter() - t0,
                "fetch_seconds": t_fetched - t0, "bytes": nbytes, "mode": loaded["mode"]}

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, bucket_bytes: int) -> None:
        """Join the learner's weight group as ``rank`` (``rlhf_ray.ppo.collective``; blocks until every
        member has), leaving the group it was in."""
        self.llm.shutdown_weight_transfer_engine()
        self.llm.init_weight_transfer_engine({"init_info": {
            "master_address": host, "master_port": port, "rank": rank, "world_size": world_size,
            "bucket_bytes": bucket_bytes}})

    def receive_weights(self, meta: dict, version: int) -> dict:
        """Take the weights the learner broadcasts to the group (``meta``: their names, dtype names and
        shapes, in order) and stamp ``version`` on later rollouts. Returns as :meth:`update_weights`."""
        t0 = time.perf_counter()
        with plain_cpu_linear(self.device == "cpu" and self.cfg.cpu_plain_weights):  # as the engine was built
            self.llm.start_weight_update()
            self.llm.update_weights({"update_info": meta})
            self.llm.finish_weight_update()
        self._reset_prefix_cache()
        self._version = int(version)
        from rlhf_ray.ppo.collective import nbytes

        return {"version": self._version, "seconds": time.perf_counter() - t0, "fetch_seconds": 0.0,
                "bytes": sum(nbytes(d, s) for d, s in zip(meta["dtype_names"], meta["shapes"])),
                "mode": "collective"}

    def sync_info(self) -> dict:
        """Where this engine runs and how it can take weights (for the driver's choice of sync path)."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        return {"node_id": node, "device": self.device, "mode": self.weight_sync_mode, "dtype": dtype,
                "wire_dtype": self.wire_dtype}

    def attach_shared_weights(self, spec: dict | None, hf_shapes: dict | None, slot: int, version: int,
                              directory: str = "/dev/shm") -> dict:
        """Make the engine read its weights from shared memory (``rlhf_ray.ppo.shared_weights``):
        slot ``slot`` of ``spec``, which holds ``version``. The first engine passes ``spec=None`` and
        the learner's ``hf_shapes`` (name -> shape): it creates the slots from its own weights in
        ``directory`` and returns the spec for the others and the learner."""
        spec = self.llm.collective_rpc("shared_attach", args=(spec, hf_shapes, int(slot), directory))[0]
        self._reset_prefix_cache()
        self.shared_weights, self._version = spec, int(version)
        return spec

    def use_shared_weights(self, written: dict, version: int) -> dict:
        """Switch to the slot the learner has just written (``written``: what its
        ``write_shared_weights`` returned, which Ray resolves before this runs). Returns the same
        info as :meth:`update_weights`; "seconds" counts the learner's write and the switch."""
        if self.shared_weights is None:
            raise RuntimeError("use_shared_weights: attach_shared_weights first")
        t0 = time.perf_counter()
        self.llm.collective_rpc("shared_use_slot", args=(int(written["slot"]),))
        self._reset_prefix_cache()
        self._version = int(version)
        switch = time.perf_counter() - t0
        return {"version": self._version, "seconds": written["seconds"] + switch, "fetch_seconds": 0.0,
                "bytes": int(written["bytes"]), "mode": "shared_memory", "write_seconds": written["seconds"]}

    def detach_shared_weights(self) -> None:
        """Back to private weights (a copy of the current shared ones); update_weights works again."""
        if self.shared_weights is not None:
            self.llm.collective_rpc("shared_detach")
            self.shared_weights = None

    def _reset_prefix_cache(self) -> None:
        # KV blocks cached under the old weights would otherwise be reused for shared prefixes.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("reset_prefix_cache failed (requests still running?)")

    def __repr__(self) -> str:
        return (f"RolloutWorker(id={self.worker_id}, model={Path(self.model_path).name}, "
                f"version={self._version}, in_process={getattr(self, 'in_process', None)})")
