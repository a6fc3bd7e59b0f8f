"""The PPO loop on Ray, top to bottom (cleanrl style): :func:`_run_attempt` is the story, each stage a
named piece in a module of its own.

Per iteration (every arrow a ref; each stage submitted as soon as the driver knows it will run)::

    prompts -> RolloutWorker x N (vLLM)  -ref-> RolloutScorer (merge chunks, RM score)
            -ref-> Learner.evaluate (pi_old logprobs, values) -ref-> AdvantageWorker (ref logprobs, KL,
            rewards, GAE) -ref-> Learner.train (PPO epochs) -> new weights into every engine -> drift
            check -> held-out eval -> metrics, checkpoint

    the rollout workers     rlhf_ray.ppo.pool.RolloutPool (resizable while the job runs)
    weight sync and drift   rlhf_ray.ppo.sync.WeightSync (the transports: rlhf_ray.ppo.transport)
    metrics and evaluation  rlhf_ray.ppo.metrics
    checkpoints, resuming   rlhf_ray.ppo.checkpoints
    the actors' classes     rlhf_ray.ppo.{rollout,scoring,advantage,learner} (plain classes; actors.py
                            makes them Ray actors)

Bulk data (rollouts, batches, weights) moves actor to actor as object refs; the driver only fetches
small results through :func:`rlhf_ray.ppo.refs.get_small` (stats dicts, versions, a drift probe),
which refuses anything bigger.

Modes: synchronous (rollout t+1 starts after the weights of step t are in the engines), or
``rollout.async_one_step_off``: the engines stay one rollout ahead of the learner: rollout t+1 (with
its scoring and reference logprobs) samples the weights of step t-1 while batch t is learned, so
every batch after the first is exactly one policy version old (``version_lag``; the learner
recomputes pi_old, and ``behaviour_logprob_gap`` reports how far the sampling policy was from it).
A resize of the rollout pool after iteration t applies from rollout t+1 (synchronous) or t+3
(one-step-off: rollouts t+1 and t+2 are already queued). Either mode can cut each rollout once enough
groups are done (``rollout.partial_rollouts``): the rollout workers carry the unfinished samples into
the next rollout (rlhf_ray.ppo.partial); the driver only sends the extra groups of a worker's first call.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from rlhf_ray.config import Config, ConfigError
from rlhf_ray.data.prompts import PromptTask
from rlhf_ray.ppo import refs
from rlhf_ray.ppo.checkpoints import CheckpointStore, policy_id, resume_point
from rlhf_ray.ppo.metrics import before_line, describe_estimator, done_line, evaluate, iteration_metrics, progress_line
from rlhf_ray.ppo.pool import CONTROL_FILE, RolloutPool, workers_at_start
from rlhf_ray.ppo.sync import WeightSync
from rlhf_ray.ppo.task import prepare_task
from rlhf_ray.progress import Bar, eta
from rlhf_ray.reward.train import MetricsLog


@dataclass
class IterationContext:
    """What ``on_iteration`` callbacks get besides the metrics: handles, not data. In one-step-off
    mode the learner has the next batch queued already: a call on ``learner`` runs after its next
    PPO epochs (synchronous mode: the learner is idle and holds exactly the synced weights)."""

    iteration: int
    pool: RolloutPool
    learner: object  # actor handle
    scored: object  # ObjectRef[ScoredRollout] of this iteration


class Launched(NamedTuple):
    """A rollout on its way: refs of its ScoredRollout and of its reference logprobs (None when no KL term
    reads them)."""

    scored: object
    reference: object


class Pending(NamedTuple):
    """A batch on its way to the learner: refs of its ScoredRollout and TrainBatch, and of the PPO epochs'
    stats once they are submitted (None before)."""

    scored: object
    batch: object
    train: object = None


@dataclass
class PPOResult:
    before: dict  # held-out evaluation of the initial policy (eval_reward, eval_rm_score, ...)
    after: dict  # held-out evaluation of the final policy
    history: list[dict] = field(default_factory=list)  # per-iteration metrics (as in metrics.jsonl)
    policy_dir: Path | None = None  # the trained policy, an ordinary HF directory
    metrics_path: Path | None = None
    plot_path: Path | None = None
    seconds: float = 0.0
    eval_reward_name: str = ""  # the function behind eval_reward ("" = none: eval_reward is NaN)

    @property
    def eval_reward_before(self) -> float:
        return self.before["eval_reward"]

    @property
    def eval_reward_after(self) -> float:
        return self.after["eval_reward"]


def check_reward_source(cfg: Config, have_rm: bool, rm_field: str = "the RM checkpoint") -> None:
    """ConfigError when nothing would score the responses: no RM (``have_rm``) and no reward function of
    weight > 0 in ``ppo.reward_functions``. ``rm_field``: how the caller names where the RM comes from."""
    if not have_rm and not any(f.weight for f in cfg.ppo.reward_functions) and not environment_rewards(cfg.ppo):
        raise ConfigError(f"no reward: {rm_field} is not given (or not an RM directory) and ppo.reward_functions "
                          f"has no function of weight > 0; train an RM (`rlhf-ray train-rm`) or give a reward "
                          f"function, e.g. ppo.reward_functions=[my_rewards:correct]")


def environment_rewards(ppo) -> bool:
    """Whether ppo.environment's environments own a reward (get_reward, a reward of weight 1 as in TRL)."""
    from rlhf_ray.ppo.toolbox import Toolbox, ToolSpec

    if not ppo.environment:
        return False
    try:
        return bool(Toolbox(ToolSpec.from_config(ppo)).reward_names)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _system_failure(e: BaseException) -> str | None:
    """What died, when ``e`` says an actor, worker process or node died or objects were lost (worth
    a restart; a RayTaskError's cause is followed); None when code raised."""
    import ray.exceptions as rex

    kinds = tuple(getattr(rex, name) for name in ("RayActorError", "WorkerCrashedError", "NodeDiedError",
                                                    "ObjectLostError", "OutOfMemoryError", "LocalRayletDiedError")
                  if hasattr(rex, name))
    for _ in range(8):
        if isinstance(e, kinds) and not isinstance(e, rex.RayTaskError):
            if getattr(e, "actor_init_failed", False):  # its __init__ raised: it would again
                return None
            lines = [x.strip() for x in str(e).strip().splitlines()] or [""]
            who = re.search(r"class_name: (\w+)", str(e))
            why = lines[0] + (f" {lines[-1]}" if len(lines) > 1 and ":" not in lines[-1][:20] else "")
            return f"{type(e).__name__}{f' ({who.group(1)})' if who else ''}: {why}"
        if not isinstance(e, rex.RayTaskError):
            return None
        e = e.cause
    return None


def run_ppo(cfg: Config, policy_dir: str | Path, rm_dir: str | Path | None, out_dir: str | Path, log=print, *,
            rm_handle=None, on_iteration: Callable[[dict, IterationContext], None] | None = None,
            bucket_bytes: int | None = None, eval_every: int | None = None,
            task: PromptTask | None = None) -> PPOResult:
    """PPO on Ray (joins the running Ray; see rlhf_ray.runtime.init_ray). Starts its actors, runs
    ``cfg.ppo.iterations`` iterations, saves the policy to ``out_dir/policy``, writes
    ``out_dir/metrics.jsonl`` (+ TensorBoard) and ``out_dir/ppo.png``, and stops its actors.

    ``rm_handle``: a Serve handle of the RM (rlhf_ray.reward.service.deploy_rm) used instead of loading
    ``rm_dir`` in-process; without one, ``ppo.rm_scoring=serve`` uses the Serve app "rm" running on
    the cluster, else deploys ``rm_dir`` as it for this run. ``bucket_bytes`` and ``eval_every``
    override rollout.weight_bucket_mib and ppo.eval_every. Every ``ppo.checkpoint_every``
    iterations a checkpoint goes to ``out_dir/checkpoints``; ``ppo.resume_from`` continues from one
    (``policy_dir`` stays the reference policy). ``eval_every``: held-out evaluation period in
    iterations (the last iteration is always evaluated; 0 = only before and after). Raises
    WeightSyncError when an engine's logprobs drift from the learner's by more than
    ``rollout.max_logprob_drift`` (0: by the engines' dtype, ``weights.drift_limit``) after a sync.

    When an actor or node dies (``_system_failure``), the run's actors are stopped and started again
    from its newest checkpoint (else from where it began), at most ``ppo.max_failures`` times (-1: no
    limit); ``on_iteration`` then sees the resumed iterations again.

    ``task``: what :func:`rlhf_ray.ppo.task.prepare_task` returns (the CLI calls it before starting Ray); None reads it here.

    No RM (``rm_dir`` and ``rm_handle`` None, ``ppo.rm_scoring=in_process``): the reward functions of
    ``ppo.reward_functions`` alone score the responses, and no RM is loaded anywhere.
    """
    check_reward_source(cfg, rm_dir is not None or rm_handle is not None or cfg.ppo.rm_scoring == "serve")
    task = task or prepare_task(cfg, policy_dir)
    log(f"[ppo] prompts: {task.describe}; eval reward: {task.eval_reward or 'none'}")
    log(f"[ppo] advantages: {describe_estimator(cfg.ppo)}")
    progress: dict = {}  # the attempt records its newest committed checkpoint here
    failures = 0
    while True:
        try:
            return _run_attempt(cfg, policy_dir, rm_dir, out_dir, log, progress, rm_handle=rm_handle,
                                on_iteration=on_iteration, bucket_bytes=bucket_bytes, eval_every=eval_every,
                                task=task)
        except Exception as e:
            died = _system_failure(e)
            if died is None or 0 <= cfg.ppo.max_failures <= failures:
                raise
            failures += 1
            ckpt = progress.get("checkpoint") or cfg.ppo.resume_from or None
            log(f"[ppo] {died}")
            if progress.get("iteration", -1) >= cfg.ppo.iterations:  # died while saving the result
                log(f"[ppo] not restarting: all iterations are done, the final policy is in {ckpt}/policy")
                raise
            log(f"[ppo] restarting the PPO actors from {ckpt or 'the start'} (failure {failures}, "
                f"ppo.max_failures={cfg.ppo.max_failures})")
            cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, resume_from=str(ckpt or "")))


def _run_attempt(cfg: Config, policy_dir: str | Path, rm_dir: str | Path | None, out_dir: str | Path, log,
                 progress: dict, *, rm_handle, on_iteration, bucket_bytes, eval_every, task: PromptTask) -> PPOResult:
    """One start of the PPO actors and the loop (see :func:`run_ppo`)."""
    from rlhf_ray.ppo.plots import plot_ppo

    ppo, one_step_off = cfg.ppo, cfg.rollout.async_one_step_off
    eval_every = ppo.eval_every if eval_every is None else eval_every
    run = _open_run(cfg, policy_dir, out_dir, progress, log)  # checks; resume point; checkpoint store
    start = time.perf_counter()
    team = _Actors(cfg, policy_dir, rm_dir, run, task, rm_handle, log)
    metrics_log = None
    try:
        metrics_log = MetricsLog(run.out_dir / "metrics.jsonl", purge_step=run.start_it + 1 if run.resumed else 0)
        sync = team.start(run, bucket_bytes or cfg.rollout.weight_bucket_mib << 20, since=start)
        before, history = team.baseline(run, metrics_log)  # the initial policy's held-out evaluation
        after = before

        # Every call below only submits work; the driver waits once per iteration (train stats, sync
        # infos, drift probe). Actor tasks run in submission order, which is what orders the stages:
        #   learner: train(t), export(t)[, evaluate(t+1)], probe(t)[, train(t+1)]
        #   engines: update_weights(t)[, generate(t+2)], logprobs_of (drift check)
        # (bracketed: one-step-off mode; synchronous mode queues evaluate(t+1) after the checks).
        pending = team.prepare(team.rollout(run.start_it))
        launched = team.rollout(run.start_it + 1) if one_step_off and run.start_it + 1 < ppo.iterations else None
        t_loop, bar = time.perf_counter(), Bar(ppo.iterations, "[ppo]", log, initial=run.start_it)
        for it in range(run.start_it, ppo.iterations):
            t_it, last, version = time.perf_counter(), it + 1 == ppo.iterations, it + 1
            scored, batch, train = pending
            if train is None:
                train = team.learner.train.remote(batch)  # ---- PPO epochs on batch it
            sync.push(version)  # ---- the new weights into every engine
            saving = run.checkpoints.begin(it + 1, team.learner)  # the learner's part, before it trains on
            if one_step_off and not last:
                # pi_old of batch it+1 = the policy after this train; rollout it+2 right behind this
                # update. Both before the drift probe, which then takes the learner while the advantage
                # actor computes batch it+1, and the engine while it generates first. Both still hold
                # exactly ``version`` then: the next update is submitted only after this iteration's checks.
                pending = team.prepare(launched)
                launched = team.rollout(it + 2) if it + 2 < ppo.iterations else None
            probe = sync.probe(scored, it)  # ---- drift check: one engine's logprobs vs the learner's
            if one_step_off and not last:
                pending = pending._replace(train=team.learner.train.remote(pending.batch))  # after the probe

            stats = team.train_stats(train, version)
            synced = sync.check(it + 1, version, probe)  # raises WeightSyncError
            evaluation = team.evaluate() if last or (eval_every and (it + 1) % eval_every == 0) else {}
            after = {**after, **evaluation} if evaluation else after

            # ---- record: metrics, progress line, checkpoint
            m = iteration_metrics(it + 1, stats, evaluation, synced, len(team.pool.workers), time.perf_counter() - t_it)
            history.append(m)
            metrics_log.write(it + 1, m)
            bar.update()
            if last or it == run.start_it or (it + 1) % (ppo.log_every or max(1, ppo.iterations // 15)) == 0:
                done, todo = it + 1 - run.start_it, ppo.iterations - run.start_it
                bar.log(progress_line(m, ppo.iterations, eta(done, todo, time.perf_counter() - t_loop)))
                if "eval_examples" in evaluation:
                    bar.log(f"[ppo]   e.g. {evaluation['eval_examples'][0]!r}")
            if saving is not None:
                # kl_coef_next: the controller after this batch (batch it+1 may have moved it already).
                run.commit(it + 1, refs.get_small(saving), {
                    "iteration": it + 1, "policy_version": version, "kl_coef": stats["kl_coef_next"],
                    "before": before, "reference_policy": policy_id(policy_dir), "seed": ppo.seed},
                    metrics_log.path, progress, log)

            # ---- between iterations: resize the rollout pool, then (sync mode) the next rollout
            if on_iteration is not None:
                on_iteration(m, IterationContext(it + 1, team.pool, team.learner, scored))
            team.pool.follow(run.control_file)
            if not one_step_off and not last:
                pending = team.prepare(team.rollout(it + 1))

        bar.close()
        policy_out = Path(refs.get_small(team.learner.save.remote(str(run.out_dir / "policy"))))
        plot = plot_ppo(history, run.out_dir / "ppo.png", before, eval_name=task.eval_reward)
        seconds = time.perf_counter() - start
        log(done_line(seconds, before, after, history, bool(task.eval_reward), policy_out, plot))
        return PPOResult(before=before, after=after, history=history, policy_dir=policy_out, eval_reward_name=task.eval_reward,
                         metrics_path=metrics_log.path, plot_path=plot, seconds=seconds)
    finally:
        if metrics_log is not None:  # a restarted attempt opens its own writer on the same directory
            _cleanup(log, "closing the TensorBoard writer", metrics_log.close)
        team.stop()


@dataclass
class _Run:
    """The output directory of one start, opened: where it resumes from and how many rollout workers
    it starts with."""

    out_dir: Path
    control_file: Path  # an operator's rollout worker count (rlhf_ray.ppo.pool)
    resume_dir: Path | None
    resumed: dict | None  # the checkpoint's state (read_checkpoint)
    num_workers: int
    checkpoints: CheckpointStore
    placement: str  # "colocated" | "disaggregated" (actors.resolve_placement)

    @property
    def start_it(self) -> int:
        return self.resumed["iteration"] if self.resumed else 0

    def commit(self, iteration: int, written: str, state: dict, metrics_path: Path, progress: dict, log) -> None:
        """Complete the checkpoint of ``iteration``; a restart after a failure resumes from it."""
        final = self.checkpoints.commit(iteration, written, state, metrics_path)
        if final is not None:
            progress.update(checkpoint=final, iteration=iteration)
            log(f"[ppo] checkpoint {final} (resume with ppo.resume_from={self.out_dir})")


def _open_run(cfg: Config, policy_dir, out_dir, progress: dict, log) -> _Run:
    """Checks first (an error leaves ``out_dir`` as it was), then ``metrics.jsonl`` holds this run:
    fresh, or the checkpoint's lines (a failed run's later lines go; TensorBoard likewise drops what
    earlier runs in this directory logged from that step on)."""
    from rlhf_ray.ppo import actors

    rc = cfg.rollout
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    resume_dir, resumed = resume_point(cfg.ppo, policy_dir)
    restarted = progress.get("attempts", 0) > 0  # (from the start when no checkpoint was committed yet)
    progress["attempts"] = progress.get("attempts", 0) + 1
    placement = actors.resolve_placement(cfg)
    actors.check_cluster(cfg, rc.num_workers, placement == "colocated")
    control_file = out_dir / CONTROL_FILE
    num_workers = workers_at_start(control_file, rc.num_workers, bool(resumed) or restarted, log)
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in resumed["lines"])
                                           if resumed else "")
    return _Run(out_dir, control_file, resume_dir, resumed, num_workers,
                CheckpointStore(out_dir, cfg.ppo.checkpoint_every, resume_dir, resumed, log), placement)


class _Actors:
    """The actors of one start, and the stages they run as submitted work (refs in, refs out).
    A resumed run: learner and engines start from the checkpoint's policy, the reference stays."""

    def __init__(self, cfg: Config, policy_dir, rm_dir, run: _Run, task: PromptTask, rm_handle, log):
        from rlhf_ray.ppo import actors
        from rlhf_ray.ppo.engine import engine_max_len
        from rlhf_ray.reward.functions import load_eval_function, load_reward_functions

        self.cfg, self.ppo, self.task, self.log = cfg, cfg.ppo, task, log
        self.deployed = False  # ppo.rm_scoring=serve without a handle: the running app "rm", or one of ours
        if rm_handle is None and self.ppo.rm_scoring == "serve":
            from rlhf_ray.reward.service import rm_service

            try:
                url, rm_handle, self.deployed = rm_service(cfg.serve, rm_dir,
                                                           chat_template=task.chat_template)
            except ValueError as e:
                raise ConfigError(f"ppo.rm_scoring=serve: {e}") from None
            log(f"[ppo] RM scores through the Serve app 'rm': "
                f"{f'deployed at {url}' if self.deployed else 'already running'}")
        elif rm_handle is None and rm_dir is None:
            log(f"[ppo] no RM: the reward functions alone score the responses "
                f"({', '.join(f.name for f in self.ppo.reward_functions if f.weight)})")
        start_policy = run.resume_dir / "policy" if run.resumed else policy_dir
        from rlhf_ray.ppo.toolbox import ToolSpec

        tools = ToolSpec.from_config(self.ppo)  # (imported here; their code travels to the engines)
        tools = None if tools is None else tools.resolved()
        self.placement = where = actors.place(cfg, run.placement, run.num_workers)
        log(f"[ppo] {where.describe(cfg.rollout.num_workers)}")
        self.learner = actors.start_learner(start_policy, self.ppo, task.chat_template, self.cfg.learner, where)
        self.advantage = actors.start_advantage(policy_dir, self.ppo, cfg.learner.node_resource,
                                                cfg.learner.logits_chunk_tokens, where)
        self.scorer = actors.start_scorer(rm_dir, None, rm_handle,  # (the RM's input length: its checkpoint's)
                                          max_pairs=cfg.serve.max_prompts * cfg.serve.max_responses,
                                          reward_functions=load_reward_functions(self.ppo.reward_functions),
                                          eval_function=load_eval_function(task.eval_reward),
                                          chat_template=task.chat_template, node_resource=cfg.learner.node_resource,
                                          placement=where, max_steps=self.ppo.iterations,
                                          environment_rewards=environment_rewards(self.ppo))
        self.pool = RolloutPool(start_policy, cfg.rollout, seed=self.ppo.seed, log=log,
                                version=run.resumed["policy_version"] if run.resumed else 0,
                                learner_cfg=cfg.learner, placement=where,
                                max_model_len=engine_max_len(self.ppo.max_prompt_tokens, self.ppo.max_new_tokens),
                                chat_template=task.chat_template, tools=tools)

    def start(self, run: _Run, bucket_bytes: int, since: float) -> WeightSync:
        """The checkpoint's state into the learner (resuming), the rollout workers, and the weight sync
        between them; ``since``: when the actors were started (for the log)."""
        # The engines start from the checkpoint's policy directory and need nothing of the learner's
        # state: they start while the learner loads it.
        loaded = self.learner.load_checkpoint.remote(str(run.resume_dir / "policy")) if run.resumed else None
        self.pool.start(run.num_workers, self.cfg.rollout.num_workers, run.control_file)
        if run.resumed:
            version = refs.get_small(loaded)
            if version != run.resumed["policy_version"]:
                raise ValueError(f"{run.resume_dir}: the learner's state is at version {version}, "
                                 f"trainer_state.json says {run.resumed['policy_version']}")
            if self.ppo.adaptive_kl:  # a fixed coefficient comes from the config, as set now
                self.advantage.set_kl_coef.remote(run.resumed["kl_coef"])
            self.log(f"[ppo] resuming from {run.resume_dir}: iteration {run.start_it}, policy version {version}")
        self.log(f"[ppo] {len(self.pool.workers)} rollout workers, learner, scorer and advantage actors up "
                 f"in {time.perf_counter() - since:.1f}s")
        sync = WeightSync(self.pool, self.learner, self.cfg.rollout, bucket_bytes)
        for line in sync.describe():
            self.log("[ppo] " + line)
        return sync

    def rollout(self, it: int) -> Launched:
        """Rollout of iteration ``it``, its RM scoring and reference logprobs (each starts as soon as
        the chunks exist; none needs the learner)."""
        # A prompt's samples side by side: the group estimators read them as rows of [prompts, n].
        from rlhf_ray.ppo import actors

        n, rounds = self.ppo.samples_per_prompt, self.ppo.dynamic_sampling_max_rounds
        prompts, seed = [p for p in self.task.train.batch(it) for _ in range(n)], self.ppo.seed * 1_000_003 + it
        # (partial rollouts: the groups in flight beside them, on a worker's first call)
        extra = lambda: [p for p in self.task.train.extra(it, 1) for _ in range(n)]  # noqa: E731
        scored = self.scorer.score.remote(*self.pool.generate(prompts, self.ppo, seed=seed, extra=extra))
        if rounds:  # dynamic sampling: more groups until enough of them differ, in a task of its own
            extra = [[p for p in self.task.train.extra(it, r) for _ in range(n)] for r in range(1, rounds + 1)]
            seeds = [int(np.random.SeedSequence([self.ppo.seed, it, r]).generate_state(1)[0]) for r in range(1, rounds + 1)]
            scored = actors.fill_groups(scored, self.scorer, list(self.pool.workers), extra, self.ppo, seeds)
        return Launched(scored, self.advantage.reference.remote(scored) if self.ppo.uses_reference else None)

    def prepare(self, launched: Launched) -> Pending:
        """pi_old and values (Learner.evaluate, which runs after every learner call submitted before
        it; skipped when pi_old is the training forward's) -> advantages: the batch, its PPO epochs not
        yet submitted."""
        old = None if self.ppo.pi_old_from_train_forward else self.learner.evaluate.remote(launched.scored)
        return Pending(launched.scored, self.advantage.compute.remote(launched.scored, old, launched.reference))

    def baseline(self, run: _Run, metrics_log: MetricsLog) -> tuple[dict, list[dict]]:
        """The held-out evaluation before training (a resumed run's from its checkpoint), and the
        history so far."""
        if run.resumed:
            before, history = run.resumed["before"], [x for x in run.resumed["lines"] if x["step"] > 0]
        else:
            before, history = self.evaluate(), []
            metrics_log.write(0, {k: v for k, v in before.items() if k != "eval_examples"})
        self.log(before_line(before, bool(self.task.eval_reward)))
        return before, history

    def train_stats(self, train, version: int) -> dict:
        """Wait for the PPO epochs (``train``: a ref of their stats), which must have made ``version``."""
        stats = refs.get_small(train)
        if stats["policy_version"] != version:
            raise RuntimeError(f"learner reports policy version {stats['policy_version']}, expected {version}")
        return stats

    def evaluate(self) -> dict:
        """The held-out evaluation (rollout worker 0) of the weights the engines hold."""
        return evaluate(self.pool.workers[0], self.scorer, self.task.held_out, self.ppo)

    def stop(self) -> None:
        from rlhf_ray.ppo import actors

        log = self.log
        _cleanup(log, "removing the shared-memory weights", self.pool.close_transport)
        _cleanup(log, "stopping the rollout workers", self.pool.shutdown)
        for name, actor in (("learner", self.learner), ("advantage", self.advantage), ("scorer", self.scorer)):
            _cleanup(log, f"stopping the {name} actor", actors.stop, actor)
        if self.deployed:
            from rlhf_ray.reward.service import shutdown_rm

            _cleanup(log, "shutting down the Serve app 'rm'", shutdown_rm, "rm")


def _cleanup(log, what: str, step: Callable, *args) -> None:
    """One cleanup step of an attempt: an error is logged, not raised. Raised in the ``finally`` it
    would replace the attempt's own error (an actor's death would then not restart the run)."""
    try:
        step(*args)
    except Exception as e:
        log(f"[ppo] cleanup: {what} failed: {type(e).__name__}: {e}")
