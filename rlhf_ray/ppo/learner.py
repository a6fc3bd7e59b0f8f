"""Learner: the policy (a Hugging Face causal LM) plus a value head, trained with PPO.

Value function: a linear head on the policy's last hidden state (shared trunk, as in TRL's
``AutoModelForCausalLMWithValueHead``), not a separate critic copy. One forward pass gives both the
logits and the values, which halves learner compute and memory; on the 2-core CPU demo the learner
is the longest stage. The price is that the value loss (weighted by c1) also shapes the trunk.
Only the policy's weights are pushed to the rollout engines; the head stays on the learner.

Token layout as in ``rlhf_ray.ppo.types``: ``logprobs[b, t]`` = log pi(token_t | tokens_<t) and
``values[b, t]`` = V(tokens_<t), both read from the hidden state at position t-1; column 0 is 0.

The policy PPO optimises is the one the engines sample from: softmax(logits / ppo.temperature) (as in
TRL and OpenRLHF), so ratios, KL(pi_old || pi_theta) and the entropy bonus are taken at that
temperature; :meth:`logprobs` (the drift probe) stays at temperature 1 like the engine's side of it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rlhf_ray.config import LearnerConfig, PPOConfig
from rlhf_ray.models.causal_lm import head_is_last, model_attention_mask
from rlhf_ray.ops import (chunked_logprobs_entropy, entropy_from_logits, logprobs_from_logits, masked_mean,
                          mismatch_kl, ppo_objective, truncated_is_weights)
from rlhf_ray.ppo.distributed import (RankSpec, empty_policy, fill_from_rank0, full, full_optimizer_state, gathered,
                                      init_process_group, like, rank0_value, rank_rows, shard_optimizer_state,
                                      sum_over_ranks, token_share, wrap)
from rlhf_ray.ppo.types import ScoredRollout, TrainBatch
from rlhf_ray.private import make_private, private_dir

# In a subdirectory: vLLM loads every *.safetensors at the top of a model directory, so a value head
# beside model.safetensors would stop the saved policy from loading in vLLM.
VALUE_HEAD_FILE = "value_head/value_head.safetensors"
LEARNER_STATE_FILE = "learner_state.pt"  # optimizer, minibatch RNG and version, beside a saved policy


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class PolicyValue(nn.Module):
    """The policy and its value head as one module (what DDP wraps and FSDP shards): token logprobs,
    entropy and values of a batch in one forward."""

    def __init__(self, policy: nn.Module, value_head: nn.Module | None, temperature: float, chunk_tokens: int,
                 entropy_grad: bool, autocast_dtype: torch.dtype | None, device: str):
        """``chunk_tokens`` > 0: logprobs and entropy from the last hidden states that many tokens at a time
        (the policy's logits must be its output embedding of them: ``head_is_last``); ``entropy_grad``:
        whether the entropy is differentiated (an entropy bonus) or a statistic only."""
        super().__init__()
        self.policy, self.value_head = policy, value_head
        self.temperature, self.chunk_tokens, self.entropy_grad = temperature, chunk_tokens, entropy_grad
        self.autocast_dtype, self.device_type = autocast_dtype, device.split(":")[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_entropy: bool = False,
                temperature: float | None = None, score_mask: torch.Tensor | None = None):
        """input_ids, attention_mask [B, T] -> logprobs [B, T] and entropy [B, T] (or None) at
        ``temperature`` (the configured one when None), values [B, T] (None without a value head); column
        0 is 0. In chunks, the logits exist a chunk of tokens at a time
        (``rlhf_ray.ops.chunked_logprobs_entropy``) for the positions of ``score_mask`` [B, T] alone (the
        attention mask when None; PPO passes the response mask: the LM head skips the prompt, over half
        the tokens of a short answer), and the others are 0."""
        temperature = self.temperature if temperature is None else temperature
        critic = self.value_head is not None
        pad = lambda x: nn.functional.pad(x, (1, 0))  # noqa: E731  (B, T-1) -> (B, T)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            if self.chunk_tokens > 0:
                hidden = self.policy.base_model(input_ids=input_ids, attention_mask=model_attention_mask(attention_mask),
                                                use_cache=False).last_hidden_state[:, :-1]
                head = self.policy.get_output_embeddings()
                scored = attention_mask if score_mask is None else score_mask
                logprobs, entropy = chunked_logprobs_entropy(
                    hidden, head.weight, input_ids[:, 1:], scored[:, 1:].bool(), bias=head.bias,
                    temperature=temperature, chunk_tokens=self.chunk_tokens,
                    with_entropy=with_entropy, entropy_grad=self.entropy_grad)
                logprobs, entropy = pad(logprobs), pad(entropy) if with_entropy else None
            else:
                out = self.policy(input_ids=input_ids, attention_mask=model_attention_mask(attention_mask),
                                  output_hidden_states=critic, use_cache=False)
                hidden = out.hidden_states[-1][:, :-1] if critic else None
                logits = out.logits[:, :-1]  # (B, T-1, V): predicts tokens 1..T-1
                if temperature != 1.0:
                    logits = logits / temperature  # the sampling distribution
                logprobs = pad(logprobs_from_logits(logits, input_ids[:, 1:]))
                entropy = pad(entropy_from_logits(logits if self.entropy_grad else logits.detach())) \
                    if with_entropy else None
            values = pad(self.value_head(hidden).squeeze(-1).float()) if critic else None
        return logprobs, values, entropy


class Learner:
    """Policy + value head; ``evaluate`` (pi_old logprobs, values), ``train`` (PPO epochs), weight export.

    Given a ``rank`` (``rlhf_ray.ppo.distributed.RankSpec``), one rank of a learner group: every rank
    is called with the same calls in the same order (``rlhf_ray.ppo.learner_group``), and only rank 0
    writes files or shared memory. New weights leave through ``sender``, a weight transport's learner
    half (``rlhf_ray.ppo.transport``)."""

    def __init__(self, policy_path: str | Path, ppo_cfg: PPOConfig, device: str | None = None,
                 chat_template: str = "auto", learner_cfg: LearnerConfig | None = None,
                 rank: RankSpec | None = None):
        """``chat_template``: Jinja source (``data.chat_template`` read) is stored in the saved policy's
        tokenizer, so the trained policy renders chats as it was trained to. ``learner_cfg``: memory
        and precision (the ``learner`` section; its defaults when None). ``rank``: this learner's place
        in a group (joins its process group here, blocking until every rank has)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlhf_ray.data.chat import ChatRenderer

        self.cfg, self.device = ppo_cfg, device or default_device()
        self.memory = learner_cfg or LearnerConfig()
        self.rank, self.world_size = (rank.rank, rank.world_size) if rank else (0, 1)
        self.sharded = rank is not None and rank.strategy == "fsdp"
        if rank is not None:
            init_process_group(rank, self.device)
        torch.manual_seed(ppo_cfg.seed)
        # Sharded, rank 0 alone reads the weights, into host memory: FSDP moves each unit to the device as
        # it shards it (one decoder layer on the device at a time, never the whole model), and the other
        # ranks, built on the meta device, receive their shards from it (fill_from_rank0 below).
        if self.sharded and self.rank > 0:
            self.policy = empty_policy(policy_path)
        else:
            self.policy = AutoModelForCausalLM.from_pretrained(str(policy_path), dtype=torch.float32)
        if not self.sharded:
            self.policy.to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(policy_path))
        ChatRenderer(self.tokenizer, chat_template).apply_to()
        # Dropout off throughout: pi_old recomputed in evaluate() must equal the first train forward.
        self.policy.eval()
        if self.memory.gradient_checkpointing:
            # Hugging Face checkpoints a decoder layer only while that layer is in training mode: set the
            # flag on the layers alone (their dropout modules stay in eval mode).
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for m in self.policy.modules():
                if getattr(m, "gradient_checkpointing", False) and m is not self.policy:
                    m.training = True
        mp = self.memory.mixed_precision
        self.autocast_dtype = torch.bfloat16 if mp == "bf16" or (mp == "auto" and self.device.startswith("cuda")) \
            else None
        self.chunked = self.memory.logits_chunk_tokens > 0 and (
            rank0_value(lambda: head_is_last(self.policy)) if self.sharded else head_is_last(self.policy))
        # A value head for an estimator that reads values (GAE; rlhf_ray.ops.ESTIMATORS), none for the others.
        self.value_head = None
        if ppo_cfg.critic:
            self.value_head = nn.Linear(self.policy.config.hidden_size, 1).to(self.device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        # Without an entropy bonus the entropy is a statistic only: no graph through a softmax over V.
        self.net = PolicyValue(self.policy, self.value_head, ppo_cfg.temperature,
                               self.memory.logits_chunk_tokens if self.chunked else 0, bool(ppo_cfg.entropy_coef),
                               self.autocast_dtype, self.device)
        # What train() runs: DDP around the net (the net itself, unwrapped, for everything else), or the net
        # sharded in place by FSDP (every forward is then a collective).
        source = {k: t.detach() for k, t in [*self.net.named_parameters(), *self.net.named_buffers()]} \
            if self.sharded and self.rank == 0 else None
        self.trained = self.net if rank is None else wrap(
            self.net, self.policy, rank.strategy, self.device,
            bf16_params=self.autocast_dtype is not None and self.device.startswith("cuda"))
        if self.sharded:
            fill_from_rank0(self.net, source, self.device)
            del source  # (rank 0's whole policy: each rank now holds its shards alone)
        # The fused kernel (one pass over each tensor; ~3x the default's speed at 135M parameters on CPU), as
        # TRL's default optimizer; sharded parameters take the default implementation.
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=ppo_cfg.lr, eps=1e-5, weight_decay=0.0,
                                           fused=not self.sharded or None)
        self.rng = np.random.default_rng(ppo_cfg.seed)
        self.version = 0  # bumped by every train(); stamped on the weights sent to the engines
        self.sender = None  # the weight transport's learner half, once open (open_sender)

    # ------------------------------------------------------------------ forward

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_entropy: bool = False,
                 train: bool = False, temperature: float | None = None, score_mask: torch.Tensor | None = None):
        """-> logprobs, values, entropy as :meth:`PolicyValue.forward` gives them; ``train``: through the
        module train() steps (DDP's wrapper in a group)."""
        return (self.trained if train else self.net)(input_ids, attention_mask, with_entropy, temperature, score_mask)

    def _tensors(self, *arrays: np.ndarray, rows=None) -> list[torch.Tensor]:
        """numpy [B, T] (possibly read-only views from the object store) -> tensors on the device,
        trimmed to the longest sequence of the selected rows."""
        am = arrays[1] if rows is None else arrays[1][rows]
        length = int(am.sum(-1).max()) if am.size else 1
        sel = [a if rows is None else a[rows] for a in arrays]
        return [torch.tensor(a[:, :length], device=self.device) for a in sel]

    def logprobs(self, input_ids: np.ndarray, attention_mask: np.ndarray, batch_size: int = 64,
                 score_mask: np.ndarray | None = None) -> np.ndarray:
        """float32 [B, T] logprobs of each token under the current policy (0 at column 0 and padding, and
        outside ``score_mask`` [B, T] when given)."""
        out = np.zeros(input_ids.shape, np.float32)
        score_mask = attention_mask if score_mask is None else score_mask
        with torch.no_grad():
            for i in range(0, len(input_ids), batch_size):
                rows = np.arange(i, min(i + batch_size, len(input_ids)))
                ids, am, sm = self._tensors(input_ids, attention_mask, score_mask, rows=rows)
                lp, _, _ = self._forward(ids, am, temperature=1.0, score_mask=sm)
                out[rows, :lp.shape[1]] = torch.where(am.bool(), lp, 0.0).cpu().numpy()
        return out

    @torch.no_grad()
    def evaluate(self, scored: ScoredRollout, batch_size: int = 64) -> dict:
        """pi_old logprobs (of the response tokens; 0 elsewhere) and values of the rollout under the
        current weights.

        Returns {"old_logprobs": float32 [B, T], "values": float32 [B, T], "seconds": float}.
        """
        start = time.perf_counter()
        ro = scored.rollout
        B, T = ro.input_ids.shape
        old_lp, values = np.zeros((B, T), np.float32), np.zeros((B, T), np.float32)
        for i in range(0, B, batch_size):
            rows = np.arange(i, min(i + batch_size, B))
            ids, am, resp = self._tensors(ro.input_ids, ro.attention_mask, ro.response_mask, rows=rows)
            lp, v, _ = self._forward(ids, am, score_mask=resp)
            old_lp[rows, :lp.shape[1]] = lp.cpu().numpy()
            if v is not None:  # (critic-free: values stay 0)
                values[rows, :v.shape[1]] = v.cpu().numpy()
        return {"old_logprobs": old_lp, "values": values, "seconds": time.perf_counter() - start}

    def probe(self, scored: ScoredRollout, n: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The first n sequences of the rollout and their logprobs under the CURRENT weights, for the
        engine-vs-learner drift check after a weight sync: (input_ids, attention_mask, response_mask,
        logprobs), each [n, T]. A tuple, so that Ray can return the parts as separate objects."""
        ro = scored.rollout
        ids, am, rm = (np.array(a[:n]) for a in (ro.input_ids, ro.attention_mask, ro.response_mask))
        return ids, am, rm, self.logprobs(ids, am, score_mask=rm)

    # ------------------------------------------------------------------ PPO

    def _minibatch_loss(self, batch: TrainBatch, rows: np.ndarray, train: bool = False,
                        shares: dict[str, float] | None = None):
        """(loss, PPOStats, {name: measured scalar}) of the minibatch ``rows``; ``train``: through the module
        train() steps; ``shares``: a rank's factors per aggregation unit (``ppo_objective``). A batch
        without ``old_logprobs`` takes pi_old from this forward, detached (its ratio is 1 and its KL term 0,
        with the gradients of a pi_old computed before: PPOConfig.pi_old_from_train_forward). Measured
        against the engine's logprobs (pi_behaviour): their gap and mismatch_kl to pi_old, and with
        ppo.tis_cap the truncated IS weights the policy term takes."""
        cfg = self.cfg
        # (None: pi_old is this forward's own logprobs; no reference: no KL term reads it)
        given = {"old": batch.old_logprobs, "ref": batch.ref_logprobs if cfg.kl_loss_coef > 0 else None,
                 "behaviour": batch.behaviour_logprobs}
        given = {k: v for k, v in given.items() if v is not None}
        ids, am, mask, old_v, adv, ret, *extra = self._tensors(
            batch.input_ids, batch.attention_mask, batch.response_mask, batch.old_values, batch.advantages,
            batch.returns, *given.values(), rows=rows)
        given = dict(zip(given, extra))
        if cfg.mask_truncated_completions and batch.truncated is not None:  # cut responses carry no loss
            mask = mask & ~torch.as_tensor(np.asarray(batch.truncated)[rows], device=mask.device)[:, None]
        lp, v, ent = self._forward(ids, am, with_entropy=True, train=train, score_mask=mask)
        old_lp = given["old"] if "old" in given else lp.detach()
        weights, measured = None, {}
        if "behaviour" in given:
            behaviour = given["behaviour"]
            measured = {"behaviour_logprob_gap": masked_mean((behaviour - old_lp).abs(), mask),
                        "mismatch_kl": mismatch_kl(behaviour, old_lp, mask)}
            if cfg.tis_cap > 0:
                weights = truncated_is_weights(old_lp, behaviour, cfg.tis_cap)
                measured.update(tis_weight=masked_mean(weights, mask),
                                tis_capped=masked_mean((weights >= cfg.tis_cap).float(), mask))
        loss, stats = ppo_objective(lp, old_lp, adv, v, old_v, ret, mask, clip_eps=cfg.clip_eps, beta=cfg.beta,
                                    c1=cfg.c1, value_clip_eps=cfg.value_clip_eps or None, entropy=ent,
                                    entropy_coef=cfg.entropy_coef, weights=weights,
                                    ref_logprobs=given.get("ref"), kl_loss_coef=cfg.kl_loss_coef,
                                    loss_type=cfg.loss_type, clip_eps_high=cfg.clip_eps_high or None,
                                    importance_sampling_level=cfg.importance_sampling_level,
                                    max_tokens=cfg.max_new_tokens, shares=shares)
        return loss, stats, measured

    def _stat_weights(self, shares: dict[str, float] | None) -> dict[str, float]:
        """What each step statistic of this rank counts for in the group's (their sum over the ranks):
        a token mean its token share, a term of the loss type its share of the loss type's unit (tokens
        or sequences), and the loss and the objective as they are (scaled already), the grad norm as
        it is (the same on every rank); each over the world size. 1 for a single learner."""
        if shares is None:
            return {"tokens": 1.0}
        from rlhf_ray.ops.losses import AGGREGATIONS, LOSS_TYPES

        per_rank = 1 / self.world_size
        unit = shares[AGGREGATIONS[LOSS_TYPES[self.cfg.loss_type].aggregation].unit] * per_rank
        return {"tokens": shares["tokens"] * per_rank, "l_clip": unit, "kl": unit, "kl_ref": unit,
                "loss": per_rank, "grad_norm": per_rank, "objective": per_rank}

    @torch.no_grad()
    def loss(self, batch: TrainBatch) -> float:
        """-L of the whole batch at the current weights (for tests and diagnostics)."""
        loss, _, _ = self._minibatch_loss(batch, np.arange(len(batch.input_ids)))
        return float(loss)

    def train(self, batch: TrainBatch) -> dict:
        """ppo.epochs passes of shuffled minibatches over the batch; returns small scalar stats
        (this batch's upstream stats merged in) and bumps ``version``. In a group, every rank takes its
        share of each minibatch (``rlhf_ray.ppo.distributed``) and the stats are the minibatch's."""
        start, cfg = time.perf_counter(), self.cfg
        B = len(batch.input_ids)
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(cfg.epochs):
            order = self.rng.permutation(B)
            for i in range(0, B, cfg.minibatch_size):
                rows = order[i:i + cfg.minibatch_size]
                mine = rank_rows(rows, self.rank, self.world_size)
                share, shares = 1.0, None
                if self.world_size > 1:  # a rank without rows still steps (the collectives), with no weight
                    tokens = int(batch.response_mask[mine].sum())
                    share = token_share(tokens, int(batch.response_mask[rows].sum()), self.world_size)
                    shares = {"tokens": share, "sequences": self.world_size * len(mine) / len(rows)}
                    mine = mine if len(mine) else rows[:1]
                loss, st, measured = self._minibatch_loss(batch, mine, train=True, shares=shares)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()  # (scaled by the shares in a group)
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                grad_norm = full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                self.optimizer.step()
                if shares is not None:  # (the group's objective is the sum of the ranks' scaled ones)
                    st = st._replace(objective=-loss.detach())
                stat_weights = self._stat_weights(shares)
                for k, v in (*st._asdict().items(), ("loss", loss.detach()), ("grad_norm", grad_norm),
                             *measured.items()):
                    sums[k] = sums.get(k, 0.0) + float(v) * stat_weights.get(k, stat_weights["tokens"])
                steps += 1
        if self.world_size > 1:
            sums = sum_over_ranks(sums, self.device)
        stats = {k: v / steps for k, v in sums.items()}
        seconds = time.perf_counter() - start
        lag = self.version - batch.policy_version  # staleness of the data vs the weights it trains
        self.version += 1
        return {
            **batch.stats,
            "policy_loss": -stats["l_clip"], "value_loss": stats["value_loss"], "kl_old": stats["kl"],
            "clip_frac": stats["clip_frac"], "entropy": stats["entropy"], "objective": stats["objective"],
            "kl_ref_k3": stats["kl_ref"],  # the kl_loss_coef term's KL (0 when that is off)
            "loss": stats["loss"], "grad_norm": stats["grad_norm"], "train_steps": steps,
            "train_seconds": seconds,
            "train_tokens_per_s": cfg.epochs * float(batch.attention_mask.sum()) / seconds,
            "policy_version": self.version, "data_version": batch.policy_version, "version_lag": lag,
            **{k: stats[k] for k in ("behaviour_logprob_gap", "mismatch_kl", "tis_weight", "tis_capped") if k in stats},
        }

    # ------------------------------------------------------------------ weights

    def exported_weights(self) -> dict[str, torch.Tensor]:
        """The policy's state dict as the engines take it: a parameter tied to an earlier one
        (lm_head.weight with tie_word_embeddings) is left out, as in the model's saved files; vLLM ties
        it itself. Tied names go by the parameters they name (under FSDP the tensors are shards)."""
        seen, tied = set(), set()
        for k, p in self.policy.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                tied.add(k)
            seen.add(id(p))
        return {k: v for k, v in self.policy.state_dict().items() if k not in tied}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The policy's weights for the engines (HF names, float32 numpy on CPU, tied copies left out);
        the value head is not included. Sharded: gathered on every rank, kept and returned by rank 0."""
        out = gathered(self.exported_weights().items(), keep=self.rank == 0)
        return {k: v.to(torch.float32).numpy() for k, v in out.items()} if out is not None else {}

    def weight_meta(self, dtype: str = "float32") -> dict:
        """Names, dtype names and shapes of the weights sent to the engines, in order (floats in
        ``dtype``, the engines' ``wire_dtype``): what every weight transport sets itself up from."""
        from rlhf_ray.ppo.weights import exported_entries

        entries = list(exported_entries(self.exported_weights()))
        return {"names": [k for k, _ in entries], "shapes": [list(v.shape) for _, v in entries],
                "dtype_names": [dtype if v.is_floating_point() else str(v.dtype).removeprefix("torch.")
                                for _, v in entries]}

    def open_sender(self, name: str, *args):
        """Send weights through transport ``name`` (``rlhf_ray.ppo.transport``) from now on: its sender,
        opened with ``args`` (again, when it is already this one's). Returns what its ``open`` returns."""
        from rlhf_ray.ppo import transport

        cls = transport.module(name).SENDER
        if not isinstance(self.sender, cls):
            if self.sender is not None:
                self.sender.close()
            self.sender = cls(self)
        return self.sender.open(*args)

    def send_weights(self, version: int, *after):
        """The weights of ``version`` (the current ones) through the open sender: what the engines'
        ``update_weights`` takes. ``after``: results of the last sync, which Ray resolves first."""
        if self.sender is None:
            raise RuntimeError("send_weights: no weight transport is open (open_sender)")
        return self.sender.send(version, *after)

    def close_sender(self) -> None:
        """Close the open sender (shared memory: remove its files)."""
        sender, self.sender = self.sender, None
        if sender is not None:
            sender.close()

    def save_checkpoint(self, path: str | Path) -> str:
        """:meth:`save` plus what :meth:`train` needs to go on exactly where it stopped: the optimizer
        state, the minibatch shuffling RNG and the version. Returns the directory."""
        path = self.save(path)
        # Whole moments (resumes at any number of ranks), kept by rank 0 alone.
        optimizer = full_optimizer_state(self.optimizer, keep=self.rank == 0)
        if self.rank == 0:
            torch.save({"optimizer": optimizer, "rng": self.rng.bit_generator.state, "version": self.version},
                       path / LEARNER_STATE_FILE)
            make_private(path / LEARNER_STATE_FILE)
        return str(path)

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore the value head, optimizer, RNG and version that :meth:`save_checkpoint` wrote to
        ``path``, on a learner built from the policy in that same directory. Returns the version."""
        from safetensors.torch import load_file

        path = Path(path)
        for name in (VALUE_HEAD_FILE, LEARNER_STATE_FILE) if self.value_head is not None else (LEARNER_STATE_FILE,):
            if not (path / name).is_file():
                raise FileNotFoundError(f"PPO checkpoint {path}: {name} is missing (a checkpoint of a run with "
                                        f"another ppo.advantage_estimator?)" if name == VALUE_HEAD_FILE else
                                        f"PPO checkpoint {path}: {name} is missing")
        if self.value_head is not None:
            params = dict(self.value_head.named_parameters())
            self.value_head.load_state_dict({k: like(v, params[k]) if k in params else v
                                             for k, v in load_file(str(path / VALUE_HEAD_FILE)).items()})
        # Sharded: the whole moments stay in the file (mapped, not read in) until each is cut to this
        # rank's shard, one at a time on the device.
        state = torch.load(path / LEARNER_STATE_FILE, map_location="cpu" if self.sharded else self.device,
                           mmap=self.sharded, weights_only=True)
        self.optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], self.optimizer))
        self.rng.bit_generator.state = state["rng"]
        self.version = int(state["version"])
        return self.version

    def save(self, path: str | Path) -> Path:
        """The policy as an ordinary HF directory (safetensors + tokenizer; loads in transformers and
        vLLM) and the value head in ``VALUE_HEAD_FILE`` under it; only its owner can read it
        (``rlhf_ray.private``)."""
        from safetensors.torch import save_file

        # Sharded, every rank gathers the whole tensors (in the same order) and rank 0, which alone keeps
        # them, writes them.
        keep = self.rank == 0
        policy = gathered(self.exported_weights().items(), keep) if self.sharded else None
        head = gathered(self.value_head.state_dict().items(), keep) if self.value_head is not None else {}
        if not keep:
            return Path(path)
        path = private_dir(path)
        self.policy.save_pretrained(path, safe_serialization=True, state_dict=policy)
        self.tokenizer.save_pretrained(path)
        if self.value_head is not None:
            (path / VALUE_HEAD_FILE).parent.mkdir(exist_ok=True)
            save_file(head, str(path / VALUE_HEAD_FILE))
        (path / "ppo_version.txt").write_text(f"{self.version}\n")
        return make_private(path)
