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
import time
import warnings
from pathlib import Path

import numpy as np

from rlhf_ray.config import RolloutConfig
from rlhf_ray.data.chat import ChatRenderer
from rlhf_ray.data.prompts import PromptRecord
from rlhf_ray.ppo import transport
from rlhf_ray.ppo.engine import checkpoint_names, engine_args, plain_cpu_linear
from rlhf_ray.ppo.transport.object_store import ObjectStoreReceiver
from rlhf_ray.ppo.types import Rollout

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
        self.expected_names = checkpoint_names(self.model_path)
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
        # How new weights arrive: a weight transport's engine half (rlhf_ray.ppo.transport), the object
        # store's until another is opened.
        self.receiver = ObjectStoreReceiver(self)
        self.partial = None  # the samples carried between calls (rollout.partial_rollouts)
        if rollout_cfg.partial_rollouts:
            from rlhf_ray.ppo.partial import PartialRollouts

            self.partial = PartialRollouts(self, rollout_cfg.max_staleness, int(rollout_cfg.async_one_step_off))

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
                 seed: int | None = None, *, ignore_eos: bool = False, group_size: int = 1,
                 quota: int | None = None) -> Rollout:
        """Sample one response per prompt (text, messages or PromptRecord). ``seed`` makes the chunk
        reproducible (each prompt gets its own stream, derived from (seed, worker_id, index)); None
        uses the engine's RNG. ``max_new_tokens``: one limit for all, or one per prompt.
        ``ignore_eos`` (benchmarks) generates exactly ``max_new_tokens`` tokens.

        ``quota`` (with rollout.partial_rollouts): return once that many groups (``group_size``
        consecutive prompts) are done, carrying the others to the next call (rlhf_ray.ppo.partial)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            raise ValueError("generate: no prompts")
        t0 = time.perf_counter()
        records = [p if isinstance(p, PromptRecord) else PromptRecord(p, {}, "") for p in prompts]
        if quota is not None:
            if self.partial is None:
                raise ValueError("generate: a quota needs rollout.partial_rollouts")
            return self.partial.generate(records, max_new_tokens, temperature, top_p, seed, group_size, quota)
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

    def update_weights(self, payload, version: int) -> dict:
        """Take new policy weights through this engine's transport and stamp ``version`` on later
        rollouts. ``payload``: what the learner's sender sent (``Learner.send_weights``): buckets (a list
        of dicts name -> array in Hugging Face checkpoint names, a single dict, or refs to them) for the
        object store, the written slot's info for shared memory, the weights' meta for the collective.
        Returns {"version", "seconds", "fetch_seconds" (getting nested refs from the object store),
        "bytes", "mode"} (mode: :attr:`weight_sync_mode`, or the transport's name), and "write_seconds"
        where the learner's write counts in "seconds" (shared memory).
        """
        t0 = time.perf_counter()
        info = self.receiver.receive(payload)
        self.weights_changed(version)
        return {"version": self._version, "seconds": time.perf_counter() - t0 + info.get("write_seconds", 0.0),
                **info}

    def open_receiver(self, name: str, *args):
        """Take weights through transport ``name`` (``rlhf_ray.ppo.transport``) from now on: its
        receiver, opened with ``args`` (again, when it is already this one's: a re-formed group).
        Returns what its ``open`` returns; on failure the engine is back on the object store's."""
        cls = transport.module(name).RECEIVER
        if not isinstance(self.receiver, cls):
            self.close_receiver()
            self.receiver = cls(self)
        try:
            return self.receiver.open(*args)
        except BaseException:
            self.receiver = ObjectStoreReceiver(self)
            raise

    def close_receiver(self) -> None:
        """Back to the object store's receiver (shared memory: private weights, a copy of the shared ones)."""
        self.receiver.close()
        self.receiver = ObjectStoreReceiver(self)

    def weights_changed(self, version: int) -> None:
        """The engine holds new weights, of ``version``: no KV block cached under the old ones is reused."""
        self._reset_prefix_cache()
        self._version = int(version)

    def sync_info(self) -> dict:
        """Where this engine runs and how it can take weights (for the driver's choice of sync path)."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        return {"node_id": node, "device": self.device, "mode": self.weight_sync_mode, "dtype": dtype,
                "wire_dtype": self.wire_dtype}

    def _reset_prefix_cache(self) -> None:
        # KV blocks cached under the old weights would otherwise be reused for shared prefixes.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("reset_prefix_cache failed (requests still running?)")

    def __repr__(self) -> str:
        return (f"RolloutWorker(id={self.worker_id}, model={Path(self.model_path).name}, "
                f"version={self._version}, in_process={getattr(self, 'in_process', None)})")
