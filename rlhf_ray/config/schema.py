"""The config's fields: one frozen dataclass per section, each field with its default and a comment
saying what it does (``rlhf-ray show-config`` prints them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and what is allowed."""


# The range a number must lie in, written beside its field (``steps: int = positive(300)``) and checked
# whenever a config is read (config/load.py): rule -> (test, what the error says is allowed).
RANGES = {
    "positive": (lambda v: v > 0, "must be > 0"),
    "at_least_zero": (lambda v: v >= 0, "must be >= 0"),
    "unit": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "fraction": (lambda v: 0 < v <= 1, "must be in (0, 1]"),  # 0 would keep no tokens / no memory
    "count_or_unlimited": (lambda v: v >= -1, "must be >= 0, or -1 for no limit"),
}


def _ranged(rule: str):
    """``field(default=...)`` marked with one of RANGES' rules."""
    return lambda default: field(default=default, metadata={"range": rule})


positive = _ranged("positive")
at_least_zero = _ranged("at_least_zero")
unit = _ranged("unit")
fraction = _ranged("fraction")
count_or_unlimited = _ranged("count_or_unlimited")


@dataclass(frozen=True)
class ModelConfig:
    # A Hugging Face model path or hub name; "embedded" builds the tiny local model (no download).
    name_or_path: str = "embedded"
    # Seed of the embedded tokenizer and model weights (deterministic build).
    seed: int = 0
    # Embedded model shape (ignored for other models).
    hidden_size: int = positive(128)
    num_layers: int = positive(2)
    num_heads: int = positive(4)
    intermediate_size: int = positive(256)
    vocab_size: int = positive(512)
    max_positions: int = positive(128)
    # Where built models are cached (relative paths are under the working directory).
    cache_dir: str = ".cache/rlhf_ray"


@dataclass(frozen=True)
class SFTConfig:
    # Supervised pre-training of the embedded policy on the synthetic corpus, so it writes well-formed text.
    steps: int = positive(300)
    batch_size: int = positive(32)
    lr: float = positive(3e-3)
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    # Preference data: JSONL, JSON or Parquet files (local, or s3://... / gs://... read with Ray Data), in
    # the listwise form {prompt, responses, best} or TRL's pairwise ones ({prompt, chosen, rejected},
    # {chosen, rejected}), plain text or chats. Empty: generate the synthetic task.
    train_path: str = ""
    eval_path: str = ""
    # How chat records (lists of {"role", "content"} messages) become text, everywhere: the rollout
    # engines' prompts, the RM in training, in the service and in PPO scoring. "auto": the tokenizer's
    # chat template; "none": no template (chat records are refused); or a Jinja template file. Plain-text
    # records are used as they are.
    chat_template: str = "auto"
    # The synthetic task written as chats (the prompt as a user message, each response as the assistant's
    # turn), for chat models; false: plain text, as the embedded model is trained on.
    synthetic_chat: bool = False
    num_train: int = positive(4000)
    num_eval: int = positive(400)
    min_k: int = 2
    max_k: int = 8
    # Label noise: best ~ softmax(gold / temperature) over the candidates.
    label_temperature: float = positive(0.25)
    seed: int = 1


@dataclass(frozen=True)
class RMConfig:
    num_workers: int = at_least_zero(2)
    use_gpu: bool = False
    cpus_per_worker: float = at_least_zero(1.0)
    epochs: int = positive(6)
    batch_size: int = positive(8)  # records (prompts) per worker per step; each has K_n candidates
    lr: float = positive(3e-4)
    weight_decay: float = at_least_zero(0.0)
    max_length: int = positive(64)  # tokens of prompt + response fed to the RM
    seed: int = 0
    # Where Ray Train keeps run directories and checkpoints ("" = <output_dir>/rm/ray_runs; on a
    # multi-node cluster use shared storage, e.g. s3://bucket/path or an NFS mount).
    storage_path: str = ""
    # Checkpoint directory to resume from ("" = start fresh).
    resume_from: str = ""
    # Ray Train's FailureConfig(max_failures): when a training worker dies, restart the worker group
    # from the newest reported checkpoint (an epoch) up to this many times; -1 = no limit.
    max_failures: int = count_or_unlimited(0)


SERVE_METRICS_INTERVAL_S = 10.0  # Ray Serve 2.60's autoscaling_config metrics_interval_s (left at its default)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    num_replicas: int = positive(1)
    # Autoscaling (min/max replicas); when max_replicas > num_replicas autoscaling is on.
    min_replicas: int = at_least_zero(1)
    max_replicas: int = positive(1)
    target_ongoing_requests: float = positive(4.0)
    # Seconds the load must stay above (below) target before autoscaling adds (removes) a replica; Ray
    # Serve's autoscaling_config upscale_delay_s / downscale_delay_s.
    upscale_delay_s: float = at_least_zero(30.0)
    downscale_delay_s: float = at_least_zero(600.0)
    # The window over which the replicas' ongoing requests are averaged for those decisions (Serve's
    # look_back_period_s): a shorter one follows the load sooner, a longer one rides out bursts. More
    # than SERVE_METRICS_INTERVAL_S, how often the replicas report their load.
    look_back_period_s: float = 30.0
    num_cpus: float = at_least_zero(0.5)
    num_gpus: float = at_least_zero(0.0)
    max_batch_size: int = positive(64)
    # @serve.batch closes a batch after this wait even while the replica is busy: longer waits make
    # larger batches (fewer forward passes) at some latency (docs/results.md: benchmarks/serve_rm.py).
    batch_wait_timeout_s: float = at_least_zero(0.02)
    max_responses: int = positive(16)
    max_chars: int = positive(2000)
    max_prompts: int = positive(256)
    # Request bodies larger than this are refused (413) before they are read whole.
    max_request_mib: int = positive(16)
    # Name of the environment variable holding a bearer token; auth is on when it is set.
    auth_token_env: str = "RLHF_RAY_SERVE_TOKEN"
    # Serving on a non-loopback host (e.g. 0.0.0.0) with no token set is refused unless this is true.
    allow_unauthenticated: bool = False


@dataclass(frozen=True)
class RewardFunctionConfig:
    # "module:function" in TRL's reward-function convention: called as f(prompts=..., completions=...,
    # completion_ids=..., **columns) -> list of floats (None: not applicable to that sample).
    name: str = ""
    # Weight of its values in the reward (added to the RM score); 0 = computed and logged only.
    weight: float = 1.0


@dataclass(frozen=True)
class PPOConfig:
    iterations: int = positive(150)
    prompts_per_iteration: int = positive(64)
    max_new_tokens: int = positive(16)
    # Prompts: a JSONL, JSON or Parquet file (local, or s3://... / gs://... read with Ray Data) of TRL
    # prompt-only records, {"prompt": text or [messages]} ("messages" is accepted too); other fields
    # reach the reward functions as columns. Empty: the built-in synthetic task.
    prompts_path: str = ""
    # Held-out prompts for evaluation (its first ppo.eval_prompts records; all when 0). Empty with a
    # prompts_path: the last ppo.eval_prompts prompts of that file are held out (at most a fifth of it).
    eval_prompts_path: str = ""
    # Prompts longer than this many tokens (after the chat template) are skipped (and counted in the
    # log). The engines are sized for max_prompt_tokens + max_new_tokens tokens per sequence.
    max_prompt_tokens: int = positive(64)
    # Programmatic rewards added to the RM score: a list of {name: "module:function", weight: w} (TRL's
    # reward-function convention; a bare "module:function" has weight 1). A module in the working
    # directory reaches the Ray workers.
    reward_functions: tuple[RewardFunctionConfig, ...] = ()
    # A "module:function" (same convention) that scores held-out samples only, logged as eval_reward
    # beside eval_rm_score. "auto": the synthetic task's gold reward when the prompts are synthetic,
    # else none; "" = none.
    eval_reward: str = "auto"
    # Tools, as TRL's GRPOTrainer takes them: "module:function" names of plain functions (sync or async,
    # with type hints and a Google-style docstring, which the chat template renders through transformers'
    # get_json_schema). With tools or an environment a rollout is an episode: the model's tool calls
    # (<tool_call>{json}</tool_call>) are run and answered as tool messages, appended as token ids that
    # carry no loss, KL or logprobs. Needs chat prompts, a template that renders tools and keeps its
    # prefix, and a group estimator (grpo, rloo).
    tools: tuple[str, ...] = ()
    # TRL's environment_factory: "module:factory" returning one environment per episode, whose public
    # methods are its tools, reset(**columns) -> str | None (a string is appended to the last user
    # message) and an optional get_reward() -> float (then a reward, weight 1, logged as
    # rewards/<class name>); or a mapping name -> "module:factory" chosen per record by its
    # "environment" column. "" = none.
    environment: str | dict[str, str] = ""
    # Most tool-calling rounds per episode (TRL's max_tool_calling_iterations); -1 = no limit but the
    # token budget (ppo.max_new_tokens for everything after the prompt, tool tokens included).
    max_tool_calling_iterations: int = count_or_unlimited(-1)
    # Seconds a tool call may run (in the rollout worker's thread pool) before its answer is a timeout
    # error; an exception is answered the same way, never ending the rollout.
    tool_timeout_s: float = positive(30.0)
    # Sampling (the exploration knobs). PPO optimises the tempered policy softmax(logits / temperature)
    # that the engines sample from; top_p < 1 truncates sampling to the nucleus, which the learner
    # does not model (the rollout is then slightly off-policy: see behaviour_logprob_gap).
    temperature: float = positive(1.0)
    top_p: float = fraction(1.0)
    # Responses sampled per prompt in a rollout (each with its own seed); a prompt's samples stay together
    # as a group from rollout to advantages. The group estimators (grpo, rloo) need at least 2.
    samples_per_prompt: int = positive(1)
    # How advantages are estimated (verl's names; the table rlhf_ray.ops.ESTIMATORS): "gae" (a value head,
    # GAE over the KL-penalised token rewards), or critic-free: "grpo" (a sample's score against its
    # group's mean and std), "rloo" (against the mean of the group's other samples), "reinforce_plus_plus"
    # (gamma-1 returns of the token rewards, whitened over the batch). Critic-free estimators have no value
    # head and no value loss.
    advantage_estimator: str = "gae"
    # grpo: what a group's centred scores are divided by (TRL's scale_rewards): the group's std ("group"),
    # the batch's ("batch"), or nothing ("none", Dr. GRPO).
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # The policy term (TRL's loss_type; the table rlhf_ray.ops.LOSS_TYPES): PPO-clip aggregated as "dapo"
    # (mean over every response token of the batch: the derivation's L_clip), "grpo" (mean over each
    # sequence's tokens, then over sequences), "dr_grpo" (each sequence's sum / max_new_tokens, mean over
    # sequences), "bnpo" (as dapo here: one optimizer step is one minibatch); or "cispo" (the truncated,
    # detached IS weight x A x log pi: every token keeps a gradient; set clip_eps_high to ~5 for it).
    loss_type: str = "dapo"
    epochs: int = positive(2)
    minibatch_size: int = positive(32)
    lr: float = positive(1e-4)
    # The ratio's clip range [1 - clip_eps, 1 + clip_eps_high] (TRL's epsilon, epsilon_high; DAPO's
    # clip-higher raises only the ceiling, e.g. 0.28); clip_eps_high 0 = clip_eps. For cispo,
    # clip_eps_high is the ceiling of the IS weight itself.
    clip_eps: float = positive(0.2)
    clip_eps_high: float = at_least_zero(0.0)
    # "token": PPO's per-token ratio; "sequence": GSPO's, each sequence's length-normalised ratio
    # exp(mean of its tokens' log ratios) on every token of it (TRL's importance_sampling_level).
    importance_sampling_level: Literal["token", "sequence"] = "token"
    # Responses cut at max_new_tokens without EOS carry no loss (TRL's mask_truncated_completions); they
    # still count in their group's advantages.
    mask_truncated_completions: bool = False
    # DAPO's dynamic sampling: groups whose task reward (before shaping) has no spread teach nothing under
    # a group estimator; they are dropped and more prompts are sampled until the batch is full, at most
    # this many extra rounds (0 = off; a batch still short then is filled with dropped groups).
    dynamic_sampling_max_rounds: int = at_least_zero(0)
    # DAPO's soft overlong punishment: a penalty rising linearly from 0 to overlong_penalty over the last
    # overlong_buffer tokens before max_new_tokens (0 = off), added to the sequence reward.
    overlong_buffer: int = at_least_zero(0)
    overlong_penalty: float = at_least_zero(1.0)
    value_clip_eps: float = at_least_zero(0.2)  # PPO2 value clipping around the old values; 0 = off
    # Weight of KL(pi_old || pi_theta) in the objective (the derivation's beta): it keeps each update near
    # the policy that sampled the batch (the demo without it drifted far from the reference after ~80
    # iterations: docs/results.md). Not TRL's beta (that is kl_loss_coef: docs/coming-from-trl.md).
    beta: float = at_least_zero(0.1)
    c1: float = at_least_zero(0.5)  # value-loss weight; L_V = 0.5 * mean (V - R)^2
    # Truncated importance sampling: weight each token's policy term by min(pi_old / pi_behaviour, cap),
    # pi_behaviour the engine's logprob of the token it sampled. One correction for the engine/learner
    # mismatch (kernels, precision: mismatch_kl in the metrics) and for stale rollouts
    # (rollout.async_one_step_off: decoupled PPO; rollout.partial_rollouts). 0 = off; 2 is a usual cap.
    tis_cap: float = at_least_zero(0.0)
    entropy_coef: float = at_least_zero(0.0)
    gamma: float = unit(1.0)
    lam: float = unit(0.95)
    # InstructGPT reference-KL penalty in the reward (0 = off): too small and the policy learns what the
    # RM over-rates, the gold reward falling while the RM's rises (docs/results.md).
    kl_coef: float = at_least_zero(0.4)
    # The reference KL as a loss term instead (GRPO's): kl_loss_coef * k3 KL(pi_theta || pi_ref) on the
    # response tokens, subtracted from the objective; 0 = off. Usually with kl_coef=0.
    kl_loss_coef: float = at_least_zero(0.0)
    adaptive_kl: bool = False
    target_kl: float = positive(2.0)
    kl_horizon: int = positive(1000)
    max_grad_norm: float = positive(1.0)
    whiten_advantages: bool = True
    # Reward for responses cut at max_new_tokens without EOS is the RM score minus this penalty.
    truncation_penalty: float = at_least_zero(0.0)
    # Held-out evaluation (eval reward and RM reward of samples on a fixed prompt set): every N
    # iterations (0 = only before and after PPO), on this many prompts (0 = the whole eval_prompts_path).
    # It blocks the iteration it runs in.
    eval_every: int = at_least_zero(1)
    eval_prompts: int = at_least_zero(64)
    # Print an iteration's line every N iterations (and the first and last); 0 = about 15 lines per run.
    # metrics.jsonl and TensorBoard get every iteration.
    log_every: int = at_least_zero(0)
    # Where PPO's RM scores come from: "in_process" (the scorer actor loads the RM) or "serve" (the
    # Ray Serve app "rm": the one already running on the cluster, e.g. from `rlhf-ray serve-rm`, else
    # one deployed for this run from the RM checkpoint and removed after it).
    rm_scoring: Literal["in_process", "serve"] = "in_process"
    # Save a resumable checkpoint (policy, value head, optimizer, RNG, KL coefficient, metrics so far)
    # every N iterations into <output_dir>/ppo/checkpoints/iter_NNNNNN (the run's newest two are kept,
    # a resumed run continuing the count; checkpoints/latest points to the newest); 0 = never.
    checkpoint_every: int = at_least_zero(25)
    # Continue a run from a checkpoint directory, or from a PPO output directory's latest checkpoint
    # ("" = start fresh). The run goes on to ppo.iterations with the same prompts and seeds it would
    # have had; in synchronous mode it repeats the uninterrupted run's iterations.
    resume_from: str = ""
    # Like Ray Train's FailureConfig(max_failures): when a PPO actor or its node dies (crash,
    # OOM kill, lost objects), stop the run's actors and start them again from the run's newest
    # checkpoint (else from where the run began), at most this many times; -1 = no limit. Errors raised
    # by the code itself (bad input, the drift check) are never retried.
    max_failures: int = count_or_unlimited(0)
    seed: int = 0

    # What the objective reads, in one place: the driver, the learner and the advantage actor skip what
    # nothing uses.
    @property
    def batch_size(self) -> int:
        """Samples per iteration: prompts_per_iteration x samples_per_prompt."""
        return self.prompts_per_iteration * self.samples_per_prompt

    @property
    def uses_reference(self) -> bool:
        """Whether a KL term reads the reference policy (kl_coef in the reward, kl_loss_coef in the loss);
        without one no reference policy is loaded or run."""
        return self.kl_coef > 0 or self.kl_loss_coef > 0

    @property
    def pi_old_from_train_forward(self) -> bool:
        """Whether pi_old is the training forward's own detached logprobs (as TRL takes it with
        num_iterations=1): each batch is one optimizer step (1 epoch, one minibatch), so pi_old is the
        policy that step starts from; nothing reads pi_old before training (no value head, whose values
        GAE needs first, and no KL penalty in the reward, which needs log pi_old). The separate pi_old
        pass is then skipped: same loss, gradients and update."""
        from rlhf_ray.ops import ESTIMATORS

        return (self.epochs == 1 and self.minibatch_size >= self.batch_size
                and not ESTIMATORS[self.advantage_estimator].critic and self.kl_coef == 0)

    @property
    def multi_turn(self) -> bool:
        """Whether rollouts are episodes with tool calls (ppo.tools or ppo.environment set)."""
        return bool(self.tools or self.environment)

    @property
    def critic(self) -> bool:
        """Whether the estimator reads a value head's values (the learner then keeps one)."""
        from rlhf_ray.ops import ESTIMATORS

        return ESTIMATORS[self.advantage_estimator].critic


@dataclass(frozen=True)
class RolloutConfig:
    num_workers: int = positive(2)
    cpus_per_worker: float = at_least_zero(1.0)
    gpus_per_worker: float = at_least_zero(0.0)
    # Place the rollout workers on the nodes that have this custom Ray resource (started with
    # ray start --resources='{"NAME": 1}'); each asks for a thousandth of it, so it places, not counts.
    # "" = any node.
    node_resource: str = ""
    # KV cache of a CPU engine (vLLM needs a size on CPU). A chunk that does not fit runs in parts
    # (the worker warns once, with the size that would fit).
    kv_cache_mib: int = positive(64)
    # GPU engines: the fraction of the GPU's memory vLLM takes for weights, activations and KV cache
    # (vLLM's gpu_memory_utilization; the KV cache gets what is left). Lower it when something else
    # shares the engine's GPU.
    gpu_memory_utilization: float = fraction(0.9)
    # The dtype the engines compute in: "auto" = float32 on CPU, vLLM's choice on GPUs (the checkpoint's
    # 16-bit dtype; for a float32 checkpoint bfloat16 on Ampere and newer GPUs, float16 on older ones).
    # A 16-bit engine takes its weight syncs in its own dtype (half the bytes of float32; the same
    # weights once it has rounded them).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Weight sync: the policy goes to the engines in buckets of at most this size (one object each).
    weight_bucket_mib: int = positive(64)
    # Max logprob drift (vLLM vs learner, max |difference| over a probe's response tokens) tolerated
    # after a weight sync before failing loudly; 0 = by the engines' dtype: 1e-3 for float32, 0.05 for
    # float16, 0.5 for bfloat16 (about ten times the drift of the learner's own weights in that dtype:
    # docs/ppo.md; raise it where a larger 16-bit model differs from the float32 learner by more). In 16
    # bits the check catches wrong or unloaded weights, not an engine a version or a few behind (the
    # version stamps catch a missed sync).
    max_logprob_drift: float = at_least_zero(0.0)
    # Rollouts overlap training: the engines sample rollout t+1 with the weights of step t-1 while the
    # learner trains on batch t (every batch one policy version old; docs/internals.md).
    async_one_step_off: bool = False
    # Partial rollouts: an iteration's rollout is cut as soon as ppo.prompts_per_iteration groups are done;
    # the samples still running go on in the next iteration, under the new weights (rlhf_ray/ppo/partial.py).
    # Each worker keeps twice its share of groups in flight. Needs ppo.tis_cap (the importance correction of
    # tokens sampled by older weights). With ppo.tools, an episode's next turn goes back to the engine as soon
    # as its tool answers are in. Not with dynamic sampling.
    partial_rollouts: bool = False
    # How many policy versions a trained sample's first token may be behind the learner: a partial rollout
    # that could not wait another iteration within it is finished before the cut. One-step-off alone is 1.
    max_staleness: int = positive(1)
    # CPU engines: keep vLLM's linear layers on plain weights (torch.nn.functional.linear) so that a
    # weight sync copies into them in place (~1.5x a memcpy) instead of replaying vLLM's loader and
    # repacking every matrix for oneDNN (~5x or more). vLLM's packed GEMMs generate faster: set false
    # where rollout, not weight sync, bounds an iteration (docs/results.md). Also keeps 16-bit engines on CPUs with AMX off vLLM's AMX
    # packing. No effect on GPUs (their weights are always plain) or on an engine in another process
    # (VLLM_ENABLE_V1_MULTIPROCESSING=1).
    cpu_plain_weights: bool = True
    # How new weights reach the engines. "shared_memory": engines on the learner's node read their
    # weights from two /dev/shm files the learner writes (one copy per sync, whatever the number of
    # engines, and one copy of the weights in memory for all of them); needs CPU engines with plain
    # weights. "object_store": bucketed through Ray's object store (any node, any device). "auto":
    # shared memory where it applies, else the object store.
    # "collective": the learner broadcasts each bucket once to every engine, on any node, through a
    # process group of the learner and the engines (vLLM's weight-transfer API; gloo).
    weight_sync: Literal["auto", "shared_memory", "collective", "object_store"] = "auto"


@dataclass(frozen=True)
class LearnerConfig:
    # The PPO learner's memory and precision (its optimisation settings are ppo.lr, ppo.epochs and
    # ppo.minibatch_size). Logprobs and entropy come from the LM head's logits of at most this many
    # tokens at a time, each chunk recomputed in backward instead of kept: a step holds [chunk, vocab]
    # floats, not [minibatch x length, vocab] (1.6 GB for a 49k vocabulary at 8 x 1024 tokens); padding
    # is skipped. The reference policy's logprobs come in the same chunks. 0 = the whole minibatch's
    # logits at once (the plain Hugging Face forward).
    logits_chunk_tokens: int = at_least_zero(1024)
    # Recompute each decoder layer's activations in backward (Hugging Face gradient checkpointing):
    # less memory per token, about a third more compute per step.
    gradient_checkpointing: bool = False
    # "auto": bfloat16 autocast on GPUs (float32 weights, optimizer and logprobs), float32 on CPU;
    # "bf16": autocast on CPU too; "no": float32 everywhere.
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    # CPUs of the learner's actor (each rank's, with num_workers > 1) under placement=disaggregated; Ray
    # gives it that many threads. (Colocated, it takes every core of the node while it trains.)
    cpus_per_worker: float = at_least_zero(1.0)
    # Learner ranks. 1: one actor (one GPU at most). More: that many Ray actors in one placement group
    # (one GPU each on a cluster with GPUs) training data-parallel with torch.distributed (gloo on CPU,
    # NCCL on GPUs): each minibatch of ppo.minibatch_size sequences is split across the ranks and its loss
    # normalised by the minibatch's token count, so a step is the one learner's step on the same data.
    num_workers: int = positive(1)
    # With num_workers > 1. "ddp": every rank holds the whole model and its Adam moments
    # (DistributedDataParallel); "fsdp": parameters, gradients and Adam moments sharded across the ranks
    # (FSDP2 fully_shard; bfloat16 parameters with float32 gradient reduction on GPUs when
    # mixed_precision allows), for a model whose training state does not fit one device.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # Ray placement of the ranks (one bundle each): "PACK" on as few nodes as possible, "SPREAD" across
    # nodes, or their STRICT_ forms.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # As rollout.node_resource, for the learner's ranks and the actors beside it (the reference policy
    # and the scorer). "" = any node.
    node_resource: str = ""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    # Where PPO's actors run. "colocated": all on one node, taking turns, each stage using every core
    # of the node while it runs (synchronous mode; CPU nodes). "disaggregated": each role on its own
    # CPUs and GPUs (rollout.cpus_per_worker, learner.cpus_per_worker, ...), on any nodes; needed by
    # rollout.async_one_step_off (rollouts overlap training), learner groups and GPU clusters. "auto":
    # colocated on a one-node Ray cluster without GPUs where it applies, else disaggregated.
    placement: Literal["auto", "colocated", "disaggregated"] = "auto"
    # Everything a run writes goes under here.
    output_dir: str = "runs/demo"
