"""The PPO loop on Ray, top to bottom (cleanrl style).

Per iteration (every arrow a ref; each stage submitted as soon as the driver knows it will run)::

    prompts -> RolloutWorker x N (vLLM)  -ref-> RolloutScorer (merge chunks, RM score)
            -ref-> Learner.evaluate (pi_old logprobs, values) -ref-> AdvantageWorker (ref logprobs, KL,
            rewards, GAE) -ref-> Learner.train (PPO epochs) -> new weights into every engine -> drift
            check -> held-out eval

New weights reach the engines one of two ways (``rollout.weight_sync``): engines on the learner's
node read their weights from shared memory that the learner writes (``rlhf_ray.ppo.shared_weights``:
one copy per sync, however many engines); otherwise the learner's weight buckets are put once in the
object store and every RolloutWorker.update_weights(refs, version) loads them.

Bulk data (rollouts, batches, weights) moves actor to actor as object refs; the driver only fetches
small results through :func:`_get_small` (stats dicts, versions, a probe of a few sequences), which
refuses anything bigger than SMALL_RESULT_BYTES.

Modes: synchronous (rollout t+1 starts after the weights of step t are in the engines), or
``rollout.async_one_step_off``: the engines stay one rollout ahead of the learner: rollout t+1 (with
its scoring and reference logprobs) samples the weights of step t-1 while batch t is learned, so
every batch after the first is exactly one policy version old (``version_lag``; the learner
recomputes pi_old, and ``behaviour_logprob_gap`` reports how far the sampling policy was from it).

The number of rollout workers can change between iterations of a running job: through the
``on_iteration`` callback (``ctx.pool.set_num_workers(n)``) or by writing a number into
``<out_dir>/rollout_workers``. New workers start from the initial policy and get the current weights
before their first rollout. A resize after iteration t applies from rollout t+1 (synchronous) or
t+3 (one-step-off: rollouts t+1 and t+2 are already queued). A resumed or restarted run starts with
the file's number; a fresh run removes the file an earlier run left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from rlhf_ray.config import Config, ConfigError, PPOConfig, RolloutConfig
from rlhf_ray.data.prompts import EVAL_SEED, PromptTask
from rlhf_ray.reward.train import MetricsLog

SMALL_RESULT_BYTES = 256 << 10  # the most the driver may fetch in one ray.get
GET_TIMEOUT_S = 900.0  # a stage that takes longer is stuck (e.g. an actor pending on resources)
DRIFT_PROBE_ROWS = 4
CONTROL_FILE = "rollout_workers"
CHECKPOINTS = "checkpoints"  # under the PPO output directory: iter_NNNNNN/ and latest -> the newest
CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINTS_KEPT = 2


class WeightSyncError(RuntimeError):
    """After a weight sync an engine's logprobs differ from the learner's by more than allowed."""


def _get_small(refs, limit: int = SMALL_RESULT_BYTES):
    """The driver's only ray.get. It may hold stats dicts, versions and a drift probe, never a batch:
    anything over ``limit`` bytes (pickled) raises."""
    import ray

    value = ray.get(refs, timeout=GET_TIMEOUT_S)
    size = len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    if size > limit:
        raise RuntimeError(f"driver fetched {size} bytes ({type(value).__name__}); bulk data must stay "
                           f"in the object store and move actor to actor as refs (limit {limit})")
    return value


class RolloutPool:
    """The rollout workers of a job; resizable between iterations."""

    def __init__(self, model_path: str | Path, rollout_cfg: RolloutConfig, seed: int, log=print, version: int = 0,
                 **engine_options):
        """``version``: the policy version of the weights in ``model_path`` (0 unless resuming);
        ``engine_options``: RolloutWorker's ``max_model_len`` and ``chat_template``."""
        self.model_path, self.cfg, self.seed, self.log = str(model_path), rollout_cfg, seed, log
        self.engine_options = engine_options
        self.version = version
        self.workers: list = []
        self._next_id = 0
        self._weights = None  # (bucket refs, version) of the last sync, for workers added later
        self.shared: dict | None = None  # the shared-memory weights' spec, once the engines read them
        self._slot = (version % 2, version)  # (slot, version) the engines read, for workers added later
        self._shared_node = None  # the learner's node, where every engine must run to share memory

    def set_num_workers(self, n: int) -> None:
        """Start or stop workers so that ``n`` run. Call between iterations (no rollout in flight).
        A new worker gets the last synced weights before anything else."""
        import ray

        from rlhf_ray.ppo import actors

        if n < 1:
            raise ValueError(f"set_num_workers: need at least 1 worker, got {n}")
        need, have = actors.cpus_needed(n, self.cfg), ray.cluster_resources().get("CPU", 0)
        if need > have:  # an actor that cannot be placed would pend forever
            raise ValueError(f"set_num_workers({n}): the PPO actors would need {need} CPUs, the Ray cluster "
                             f"has {have}")
        while len(self.workers) < n:
            w = actors.start_rollout_worker(self.model_path, self.cfg, worker_id=self._next_id, seed=self.seed,
                                            version=self.version, **self.engine_options)
            self._next_id += 1
            # Actor tasks run in order: the weights arrive before any rollout.
            if self.shared is not None:
                node = _get_small(w.sync_info.remote())["node_id"]  # waits for the engine to start
                if node != self._shared_node:
                    ray.kill(w)
                    raise ValueError(f"set_num_workers({n}): the new rollout worker started on node {node}, "
                                     f"not on the learner's, where the engines share weights in memory")
                try:  # awaited: a failure surfaces here with its cause, not at the worker's first rollout
                    _get_small(w.attach_shared_weights.remote(self.shared, None, *self._slot))
                except Exception:
                    ray.kill(w)
                    raise
            elif self._weights is not None:
                w.update_weights.remote(*self._weights)
            self.workers.append(w)
        while len(self.workers) > n:
            w = self.workers.pop()
            _get_small(w.shutdown.remote())  # also waits for the worker's earlier tasks
            ray.kill(w)

    def wait_ready(self) -> None:
        _get_small([w.ready.remote() for w in self.workers])

    def generate(self, prompts: list, ppo: PPOConfig, seed: int) -> list:
        """Split the prompts (PromptRecords, text or chats) across the workers; returns one Rollout ref
        per worker."""
        sizes = [len(a) for a in np.array_split(np.arange(len(prompts)), len(self.workers))]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        parts = [list(prompts[a:b]) for a, b in zip(starts[:-1], starts[1:]) if b > a]
        return [w.generate.remote(part, ppo.max_new_tokens, ppo.temperature, ppo.top_p, seed)
                for w, part in zip(self.workers, parts)]

    def attach_shared_weights(self, learner, required: bool) -> str | None:
        """Move the engines onto shared-memory weights written by ``learner`` (before the first
        update). Returns None when done, else why not; raises instead when ``required``."""
        import ray

        infos = _get_small([w.sync_info.remote() for w in self.workers])
        node = _get_small(learner.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))
        why = None
        if any(i["node_id"] != node for i in infos):
            why = "a rollout worker runs on another node than the learner"
        elif any(i["device"] != "cpu" for i in infos):
            why = "the engines run on GPUs"
        elif any(i["dtype"] != "float32" for i in infos):
            dtypes = "/".join(sorted({i["dtype"] for i in infos} - {"float32"}))
            why = f"the engines compute in {dtypes} (shared memory holds float32 weights)"
        elif any(i["mode"] != "in_place" for i in infos):
            why = ("the engines keep packed weights (rollout.cpu_plain_weights=false, or engines in their own "
                   "process: VLLM_ENABLE_V1_MULTIPROCESSING=1)")
        else:
            shapes = learner.weight_shapes.remote()  # a ref: learner to engine
            version = self._weights[1] if self._weights is not None else self.version  # what the engines hold
            # Version v lives in slot v % 2 and the first write (v + 1) waits for nothing: the engines
            # must read the other slot, or a run resumed at an odd version overwrites the weights that
            # its queued rollouts sample. Both slots start as a copy of the first engine's weights.
            slot, spec = version % 2, None
            try:
                spec = _get_small(self.workers[0].attach_shared_weights.remote(None, shapes, slot, version))
                _get_small([w.attach_shared_weights.remote(spec, None, slot, version) for w in self.workers[1:]])
                self.shared, self._slot, self._shared_node = spec, (slot, version), node
            except Exception as e:
                # An engine's code refused (RayTaskError): the job goes on with the object store. Else an
                # engine or the learner died, or a call timed out: the run fails (or restarts). Either
                # way no engine may stay on the files and the files go (self.shared is not set, so the
                # run's cleanup would not remove them).
                failed = not isinstance(e, ray.exceptions.RayTaskError)
                if spec is not None:
                    from rlhf_ray.ppo.shared_weights import unlink_slots

                    try:
                        if not failed:  # back to private weights
                            _get_small([w.detach_shared_weights.remote() for w in self.workers])
                            _get_small(learner.close_shared_weights.remote(spec))
                    finally:
                        unlink_slots(spec)  # from the driver too: on the learner's node in most setups
                if failed:
                    raise
                why = f"{type(e.cause).__name__}: {e.cause}"
        if why is not None and required:
            raise WeightSyncError(f"rollout.weight_sync=shared_memory: {why}")
        return why

    def sync_shared(self, written_ref, version: int, slot: int) -> list:
        """Every engine switches to ``slot`` once the learner's write (``written_ref``) is done."""
        self._slot = (slot, version)
        return [w.use_shared_weights.remote(written_ref, version) for w in self.workers]

    def sync(self, bucket_refs, version: int) -> list:
        """Load the same weights (refs: put once) into every worker; returns refs of their info dicts."""
        self._weights = (bucket_refs, version)
        return [w.update_weights.remote(bucket_refs, version) for w in self.workers]

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            try:
                _get_small(w.shutdown.remote())
            except Exception:  # a dead worker: kill it anyway
                pass
            ray.kill(w)
        self.workers = []


@dataclass
class IterationContext:
    """What ``on_iteration`` callbacks get besides the metrics: handles, not data. In one-step-off
    mode the learner has the next batch queued already: a call on ``learner`` runs after its next
    PPO epochs (synchronous mode: the learner is idle and holds exactly the synced weights)."""

    iteration: int
    pool: RolloutPool
    learner: object  # actor handle
    scored: object  # ObjectRef[ScoredRollout] of this iteration


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


def _requested_workers(path: Path, log) -> int | None:
    """The worker count an operator wrote into the control file, if any (bad content is ignored)."""
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError:
        log(f"[ppo] ignoring {path}: expected an integer")
        return None


def _workers_at_start(path: Path, configured: int, continuing: bool, log) -> int:
    """The rollout workers a start of the actors begins with. A resumed or restarted run goes on with
    what an operator wrote into the control file ``path``; a fresh run uses ``configured``
    (rollout.num_workers) and removes a control file that an earlier job left, which would
    otherwise resize it after its first iteration."""
    if not continuing:
        if path.exists():
            path.unlink()
            log(f"[ppo] starting fresh: removed {path} (left by an earlier run); rollout.num_workers={configured}")
        return configured
    wanted = _requested_workers(path, log)
    if wanted is not None and wanted < 1:
        log(f"[ppo] ignoring {path}: need at least 1 rollout worker, got {wanted}")
        wanted = None
    if wanted is not None and wanted != configured:
        log(f"[ppo] rollout workers: {wanted} ({path}), not rollout.num_workers={configured}")
    return configured if wanted is None else wanted


def _recover_aside(root: Path) -> None:
    """Finish what a crash inside :func:`_commit_checkpoint` left in the checkpoints directory ``root``:
    an ``.old-iter_N`` whose ``iter_N`` is missing goes back into place (``latest`` may name it); one
    whose replacement is in place is deleted."""
    for aside in root.glob(".old-iter_*") if root.is_dir() else ():
        final = root / aside.name[len(".old-"):]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that ``ppo.resume_from`` names: a checkpoint itself
    (``.../checkpoints/iter_NNNNNN``), a checkpoints directory or a PPO output directory (their latest)."""
    p = Path(path).expanduser()
    for root in (p.parent, p, p / CHECKPOINTS):
        _recover_aside(root)
    for cand in (p, p / "latest", p / CHECKPOINTS / "latest"):
        if (cand / CHECKPOINT_STATE).is_file():
            return cand.resolve()
    raise ConfigError(f"ppo.resume_from: {p} is not a PPO checkpoint (no {CHECKPOINT_STATE} in it, in "
                     f"{p / 'latest'} or in {p / CHECKPOINTS / 'latest'})")


def read_checkpoint(ckpt: Path, reference_policy: str | Path) -> dict:
    """A checkpoint's trainer state plus ``history`` (its metrics lines), checked: every error names
    the file. The checkpoint's policy must have the reference policy's shape (the KL terms compare
    their token distributions)."""
    state_file, metrics_file = ckpt / CHECKPOINT_STATE, ckpt / "metrics.jsonl"
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{state_file}: not valid JSON ({e})") from None
    for key in ("iteration", "policy_version", "kl_coef", "before"):
        if key not in state:
            raise ConfigError(f"{state_file}: no {key!r}")
    if not (ckpt / "policy" / "config.json").is_file():
        raise ConfigError(f"{ckpt}: no policy/config.json (an incomplete checkpoint)")
    lines = []
    for n, line in enumerate(metrics_file.read_text().splitlines() if metrics_file.is_file() else [], 1):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{metrics_file}, line {n}: not valid JSON ({e})") from None
    if [x.get("step") for x in lines] != list(range(state["iteration"] + 1)):
        raise ConfigError(f"{metrics_file}: expected steps 0..{state['iteration']}, one line each")
    mine = _model_config(ckpt / "policy", f"ppo.resume_from: the checkpoint's policy ({ckpt / 'policy'})")
    ref = _model_config(reference_policy, f"the reference policy ({reference_policy})")
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if mine.get(key) != ref.get(key):
            raise ConfigError(f"ppo.resume_from: the checkpoint's policy ({ckpt / 'policy'}) has {key}="
                             f"{mine.get(key)!r}, the reference policy ({reference_policy}) {ref.get(key)!r}")
    return {**state, "lines": lines}


def _model_config(path: str | Path, what: str) -> dict:
    """The model config of a local directory or a Hugging Face hub name (its cache, or the hub) as a
    dict; ConfigError naming ``what`` when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path)).to_dict()
    except Exception as e:  # OSError (no such directory / name, no config.json), ValueError (bad file)
        raise ConfigError(f"{what}: cannot read its config.json ({type(e).__name__}: {e})") from None


def _policy_id(path: str | Path) -> str:
    """How a checkpoint records its reference policy: a local directory's absolute path, else the
    hub name as given."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def resume_point(ppo: PPOConfig, reference_policy: str | Path) -> tuple[Path | None, dict | None]:
    """(checkpoint directory, its state) that ``ppo.resume_from`` names, checked; (None, None) when
    starting fresh. Raises ConfigError naming the path or file. The run must repeat the checkpoint's
    ppo.seed (prompts, sampling and engine seeds derive from it) and its reference policy (the KL
    terms are relative to it; a directory the checkpoint names that no longer exists, as after moving
    a run, is taken to have moved: only its shape is checked)."""
    if not ppo.resume_from:
        return None, None
    ckpt = find_checkpoint(ppo.resume_from)
    state = read_checkpoint(ckpt, reference_policy)
    state_file = ckpt / CHECKPOINT_STATE
    if state["iteration"] >= ppo.iterations:
        raise ConfigError(f"ppo.resume_from: {ckpt} is at iteration {state['iteration']}; set ppo.iterations "
                          f"above {state['iteration']} to train on from it")
    if "seed" in state and state["seed"] != ppo.seed:  # (checkpoints of older versions have neither key)
        raise ConfigError(f"ppo.seed={ppo.seed}, but the checkpoint was trained with ppo.seed={state['seed']} "
                          f"({state_file}); set ppo.seed={state['seed']} to resume it")
    recorded = state.get("reference_policy")
    moved = recorded is not None and Path(recorded).is_absolute() and not Path(recorded).exists()
    if recorded is not None and not moved and _policy_id(recorded) != _policy_id(reference_policy):
        raise ConfigError(f"ppo.resume_from: the reference policy is {_policy_id(reference_policy)}, but the "
                          f"checkpoint was trained against {state['reference_policy']} ({state_file}); resume "
                          f"with that policy (--policy or model.name_or_path)")
    return ckpt, state


def _commit_checkpoint(tmp: Path, final: Path, state: dict, metrics_path: Path) -> None:
    """Complete the checkpoint the learner wrote into ``tmp`` (trainer state, metrics so far), move it
    to ``final`` and point ``latest`` at it; a crash before the move leaves only a ``.tmp-`` directory.
    An existing ``final`` (a resumed run redoing an iteration; ``latest`` may name it) is renamed aside
    and deleted only after the new one is in place: a crash in between leaves it whole (``.old-``)."""
    (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1))
    shutil.copyfile(metrics_path, tmp / "metrics.jsonl")
    aside = final.parent / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)  # left by a crash here
        os.replace(final, aside)
    os.replace(tmp, final)
    link = final.parent / ".latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, final.parent / "latest")
    shutil.rmtree(aside, ignore_errors=True)


def _cleanup(log, what: str, step: Callable, *args) -> None:
    """One cleanup step of an attempt: an error is logged, not raised. Raised in the ``finally`` it
    would replace the attempt's own error (an actor's death would then not restart the run)."""
    try:
        step(*args)
    except Exception as e:
        log(f"[ppo] cleanup: {what} failed: {type(e).__name__}: {e}")


def _progress(m: dict, iterations: int) -> str:
    held_out = ""
    if "eval_rm_score" in m:  # an evaluated iteration; eval_reward is NaN without an eval function
        ev = m["eval_reward"]
        held_out = f"(held-out: {'' if ev != ev else f'eval {ev:+.3f} '}rm {m['eval_rm_score']:+.3f}) "
    return (f"[ppo] it {m['iteration']}/{iterations} v{m['policy_version']} "
            f"reward {m['reward']:+.3f} rm {m['rm_score']:+.3f} {held_out}"
            f"kl_ref {m['kl_ref']:.3f} | pg {m['policy_loss']:+.4f} vf {m['value_loss']:.4f} "
            f"clip {m['clip_frac']:.3f} ent {m['entropy']:.2f} | gen {m['gen_seconds']:.2f}s "
            f"score {m['score_seconds']:.2f}s learn {m['learn_seconds']:.2f}s sync {m['sync_seconds']:.3f}s "
            f"drift {m['drift']:.1e} | {m['iteration_seconds']:.1f}s workers {m['num_workers']} "
            f"lag {m['version_lag']}")


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


def prepare_task(cfg: Config, policy_dir: str | Path) -> PromptTask:
    """The prompts, held-out prompts and evaluation function of ``cfg.ppo``, read and checked (local
    files before Ray starts; remote URIs need a Ray cluster), and the engines' size checked against the
    policy's config (``check_engine_fit``). Raises ConfigError or DataError naming the field or file."""
    from transformers import AutoTokenizer

    from rlhf_ray.data.chat import ChatRenderer, resolve_chat_template
    from rlhf_ray.data.prompts import load_prompt_task
    from rlhf_ray.ppo.rollout import check_engine_fit
    from rlhf_ray.reward.functions import RewardFunctionError, load_eval_function, load_reward_functions

    try:
        template = resolve_chat_template(cfg.data.chat_template)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model_config = _model_config(policy_dir, f"the policy ({policy_dir})")
    check_engine_fit(model_config, cfg.ppo.max_prompt_tokens, cfg.ppo.max_new_tokens, cfg.rollout,
                     on_gpu=cfg.rollout.gpus_per_worker > 0)
    task = load_prompt_task(cfg.ppo, ChatRenderer(AutoTokenizer.from_pretrained(str(policy_dir)), template))
    try:  # importable here, from the driver's working directory (they travel to the scorer by value)
        load_reward_functions(cfg.ppo.reward_functions)
        load_eval_function(task.eval_reward)
    except RewardFunctionError as e:
        raise ConfigError(str(e)) from None
    return task


def run_ppo(cfg: Config, policy_dir: str | Path, rm_dir: str | Path | None, out_dir: str | Path, log=print, *,
            rm_handle=None, on_iteration: Callable[[dict, IterationContext], None] | None = None,
            bucket_bytes: int | None = None, eval_every: int | None = None,
            task: PromptTask | None = None) -> PPOResult:
    """PPO on Ray (joins the running Ray; see rlhf_ray.runtime.init_ray). Starts its actors, runs
    ``cfg.ppo.iterations`` iterations, saves the policy to ``out_dir/policy``, writes
    ``out_dir/metrics.jsonl`` (+ TensorBoard) and ``out_dir/ppo.png``, and stops its actors.

    ``rm_handle``: a Serve handle of the RM (rlhf_ray.reward.serve.deploy_rm) used instead of loading
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

    ``task``: what :func:`prepare_task` returns (the CLI calls it before starting Ray); None reads it here.
    """
    task = task or prepare_task(cfg, policy_dir)
    log(f"[ppo] prompts: {task.describe}; eval reward: {task.eval_reward or 'none'}")
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
    import ray

    from rlhf_ray.ppo import actors
    from rlhf_ray.ppo.plots import plot_ppo
    from rlhf_ray.ppo.rollout import engine_max_len
    from rlhf_ray.ppo.weights import drift_limit, logprob_drift
    from rlhf_ray.reward.functions import load_eval_function, load_reward_functions

    ppo, rc = cfg.ppo, cfg.rollout
    bucket_bytes = bucket_bytes or rc.weight_bucket_mib << 20
    eval_every = ppo.eval_every if eval_every is None else eval_every
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    control_file = out_dir / CONTROL_FILE
    ckpt_root = out_dir / CHECKPOINTS
    resume_dir, resumed = resume_point(ppo, policy_dir)
    start_it = resumed["iteration"] if resumed else 0
    restarted = progress.get("attempts", 0) > 0  # (from the start when no checkpoint was committed yet)
    progress["attempts"] = progress.get("attempts", 0) + 1
    # Checks first: an error leaves this directory (metrics, checkpoints, control file) as it was.
    need, have = actors.cpus_needed(rc.num_workers, rc), ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise ConfigError(f"rollout.num_workers={rc.num_workers} x rollout.cpus_per_worker={rc.cpus_per_worker} "
                          f"+ learner + scorer + advantage: PPO needs {need} CPUs, the Ray cluster has {have}")
    num_workers = _workers_at_start(control_file, rc.num_workers, bool(resumed) or restarted, log)
    # metrics.jsonl holds this run: fresh, or the checkpoint's lines (a failed run's later lines go);
    # TensorBoard likewise drops what earlier runs in this directory logged from that step on.
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in resumed["lines"])
                                           if resumed else "")
    for partial in ckpt_root.glob(".tmp-iter_*"):  # a crashed run's incomplete checkpoints: never resumable
        shutil.rmtree(partial, ignore_errors=True)
    if not resumed and (ckpt_root / "latest").is_symlink():  # "latest" must not name an earlier run's
        (ckpt_root / "latest").unlink()
        log(f"[ppo] starting fresh: {ckpt_root} keeps an earlier run's checkpoints (resume one with "
            f"ppo.resume_from=DIR); its 'latest' link is removed")
    start = time.perf_counter()

    # ---- actors
    deployed = False  # ppo.rm_scoring=serve without a handle: the running app "rm", or one of ours
    if rm_handle is None and ppo.rm_scoring == "serve":
        from rlhf_ray.reward.serve import rm_service

        try:
            url, rm_handle, deployed = rm_service(cfg.serve, rm_dir, cfg.rm.max_length, chat_template=task.chat_template)
        except ValueError as e:
            raise ConfigError(f"ppo.rm_scoring=serve: {e}") from None
        log(f"[ppo] RM scores through the Serve app 'rm': "
            f"{f'deployed at {url}' if deployed else 'already running'}")
    # A resumed run: learner and engines start from the checkpoint's policy, the reference stays.
    start_policy = resume_dir / "policy" if resumed else policy_dir
    learner = actors.start_learner(start_policy, ppo, chat_template=task.chat_template)
    advantage = actors.start_advantage(policy_dir, ppo)
    scorer = actors.start_scorer(rm_dir, cfg.rm.max_length, rm_handle,
                                 max_pairs=cfg.serve.max_prompts * cfg.serve.max_responses,
                                 reward_functions=load_reward_functions(ppo.reward_functions),
                                 eval_function=load_eval_function(task.eval_reward), chat_template=task.chat_template)
    pool = RolloutPool(start_policy, rc, seed=ppo.seed, log=log, version=resumed["policy_version"] if resumed else 0,
                       max_model_len=engine_max_len(ppo.max_prompt_tokens, ppo.max_new_tokens),
                       chat_template=task.chat_template)
    metrics_log = None
    try:
        metrics_log = MetricsLog(out_dir / "metrics.jsonl", purge_step=start_it + 1 if resumed else 0)
        if resumed:
            version = _get_small(learner.load_checkpoint.remote(str(resume_dir / "policy")))
            if version != resumed["policy_version"]:
                raise ValueError(f"{resume_dir}: the learner's state is at version {version}, "
                                 f"{CHECKPOINT_STATE} says {resumed['policy_version']}")
            if ppo.adaptive_kl:  # a fixed coefficient comes from the config, as set now
                advantage.set_kl_coef.remote(resumed["kl_coef"])
            log(f"[ppo] resuming from {resume_dir}: iteration {start_it}, policy version {version}")
        try:
            pool.set_num_workers(num_workers)
        except ValueError as e:  # the control file's count does not fit the cluster (the config's does)
            if num_workers == rc.num_workers:
                raise
            log(f"[ppo] not starting {num_workers} rollout workers ({control_file}): {e}; "
                f"rollout.num_workers={rc.num_workers} instead")
            pool.set_num_workers(rc.num_workers)
        pool.wait_ready()
        engines = _get_small([w.sync_info.remote() for w in pool.workers])
        # The engines' 16-bit dtype if they share one (they would round float32 to it: half the bytes).
        wire_dtypes = {i["wire_dtype"] for i in engines}
        wire_dtype = wire_dtypes.pop() if len(wire_dtypes) == 1 else "float32"
        n_buckets = _get_small(learner.num_buckets.remote(bucket_bytes, wire_dtype))
        max_drift = drift_limit(rc.max_logprob_drift, {i["dtype"] for i in engines})
        log(f"[ppo] {len(pool.workers)} rollout workers, learner, scorer and advantage actors up "
            f"in {time.perf_counter() - start:.1f}s")
        why = "rollout.weight_sync=object_store"
        if rc.weight_sync != "object_store":
            why = pool.attach_shared_weights(learner, required=rc.weight_sync == "shared_memory")
        log("[ppo] weight sync: " + (f"object store ({why}), {wire_dtype} weights" if why else
                                    f"shared memory, 2 x {pool.shared['numel'] * 4 >> 20} MiB in "
                                    f"{pool.shared['paths'][0][:-1]}{{0,1}}")
            + f"; drift limit {max_drift:g} ({'/'.join(sorted({i['dtype'] for i in engines}))} engines)")
        if pool.shared is not None and pool.shared.get("stale_removed"):
            log(f"[ppo] removed {len(pool.shared['stale_removed'])} slot file(s) left by killed jobs")

        def evaluate() -> dict:
            """Mean eval reward (``ppo.eval_reward``) and RM reward of samples on the held-out prompts
            (rollout worker 0)."""
            t = time.perf_counter()
            ro = pool.workers[0].generate.remote(task.held_out, ppo.max_new_tokens, ppo.temperature, ppo.top_p,
                                                 EVAL_SEED)
            s = _get_small(scorer.summary.remote(ro))
            return {"eval_reward": s["eval_reward"], "eval_rm_score": s["rm_score"],
                    "eval_response_len": s["response_len"],
                    "eval_truncated_frac": s["truncated_frac"], "eval_policy_version": s["policy_version"],
                    "eval_examples": s["examples"], "eval_seconds": time.perf_counter() - t}

        def launch_rollout(it: int) -> tuple:
            """Rollout of iteration ``it``, its RM scoring and reference logprobs (each starts as soon as
            the chunks exist; none needs the learner); returns (ScoredRollout ref, reference ref)."""
            scored = scorer.score.remote(*pool.generate(task.train.batch(it), ppo, seed=ppo.seed * 1_000_003 + it))
            return scored, advantage.reference.remote(scored)

        def prepare(launched: tuple) -> tuple:
            """pi_old and values (Learner.evaluate, which runs after every learner call submitted before
            it) -> advantages; returns (scored, TrainBatch ref, None: the PPO epochs, once submitted)."""
            scored, ref = launched
            return scored, advantage.compute.remote(scored, learner.evaluate.remote(scored), ref), None

        if resumed:
            before, history = resumed["before"], [x for x in resumed["lines"] if x["step"] > 0]
        else:
            before, history = evaluate(), []
            metrics_log.write(0, {k: v for k, v in before.items() if k != "eval_examples"})
        evaluated = f"eval reward {before['eval_reward']:+.3f} " if task.eval_reward else ""
        log(f"[ppo] before: held-out {evaluated}rm {before['eval_rm_score']:+.3f} e.g. {before['eval_examples'][0]!r}")
        after = before

        # Every call below only submits work; the driver waits once per iteration (train stats, sync
        # infos, drift probe). Actor tasks run in submission order, which is what orders the stages:
        #   learner: train(t), export(t)[, evaluate(t+1)], probe(t)[, train(t+1)]
        #   engines: update_weights(t)[, generate(t+2)], logprobs_of (drift check)
        # (bracketed: one-step-off mode; synchronous mode queues evaluate(t+1) after the checks).
        # One-step-off mode keeps one rollout ahead: rollout t+1 was generated with the weights of
        # t-1 while batch t was learned, rollout t+2 is queued right behind this update (so it samples
        # version t+1 without waiting for the driver), and batch t+1 is queued whole (up to its PPO
        # epochs) before the driver waits on iteration t, so the learner never idles while the driver
        # checks the sync and logs.
        one_step_off = rc.async_one_step_off
        synced: list = []  # refs of the last weight sync
        # This run's kept checkpoints, oldest first: when it resumed from one in ckpt_root, those that
        # the run it continues had kept up to there.
        saved = [ckpt_root / name for name in resumed.get("run_checkpoints", [resume_dir.name])] \
            if resumed and resume_dir.parent == ckpt_root else []
        pending = prepare(launch_rollout(start_it))
        launched = launch_rollout(start_it + 1) if one_step_off and start_it + 1 < ppo.iterations else None
        for it in range(start_it, ppo.iterations):
            t_it = time.perf_counter()
            last = it + 1 == ppo.iterations
            scored, batch, train = pending
            version = it + 1  # the learner counts its train calls; checked against its stats below
            if train is None:
                train = learner.train.remote(batch)

            # ---- weight sync: the learner writes the engines' shared memory, or its buckets are put
            # once (its return values) and the same refs go to every engine; then the drift check on
            # one engine (round robin): its logprobs of a few sampled sequences vs the learner's, after
            # the engine has taken the update.
            if pool.shared is not None:
                # Slot version % 2; the write waits until every engine has left that slot (last sync).
                slot = version % 2
                synced = pool.sync_shared(learner.write_shared_weights.remote(pool.shared, slot, *synced),
                                          version, slot)
            else:
                buckets = learner.weight_buckets.options(num_returns=n_buckets).remote(bucket_bytes, copy=False,
                                                                                       dtype=wire_dtype)
                synced = pool.sync(buckets, version)
            checked = it % len(pool.workers)
            saving = None  # the learner's part of a checkpoint: before it trains on (one-step-off)
            if ppo.checkpoint_every and (it + 1) % ppo.checkpoint_every == 0:
                tmp_ckpt = ckpt_root / f".tmp-iter_{it + 1:06d}"
                shutil.rmtree(tmp_ckpt, ignore_errors=True)
                saving = learner.save_checkpoint.remote(str(tmp_ckpt / "policy"))
            if one_step_off and not last:
                # pi_old of batch it+1 = the policy after this train; rollout it+2 after this update.
                # Both before the drift probe, which then takes the learner while the advantage actor
                # computes batch it+1 (the learner would idle), and the engine while it generates
                # first. Both still hold exactly ``version`` then: the next update is submitted only
                # after this iteration's checks.
                pending = prepare(launched)
                launched = launch_rollout(it + 2) if it + 2 < ppo.iterations else None
            ids, attn, resp, learner_lp = learner.probe.options(num_returns=4).remote(scored, DRIFT_PROBE_ROWS)
            engine_lp = pool.workers[checked].logprobs_of.remote(ids, attn, resp)
            if one_step_off and not last:
                pending = (*pending[:2], learner.train.remote(pending[1]))  # after the probe

            stats = _get_small(train)
            if stats["policy_version"] != version:
                raise RuntimeError(f"learner reports policy version {stats['policy_version']}, expected {version}")
            t_sync = time.perf_counter()  # how long every engine's update takes beyond training
            infos = _get_small(synced)
            sync_wall = time.perf_counter() - t_sync
            drift = logprob_drift(*_get_small([engine_lp, learner_lp, resp]))  # one-step-off: after generate
            if any(info["version"] != version for info in infos):
                raise WeightSyncError(f"engines report versions {[i['version'] for i in infos]}, expected {version}")
            if not drift <= max_drift:
                dtype = _get_small(pool.workers[checked].sync_info.remote()).get("dtype", "float32")
                hint = ("" if dtype == "float32" else f" (the engine computes in {dtype}: even with the learner's "
                        f"weights its logprobs differ from the float32 learner's; if this is that noise, not "
                        f"wrong weights, set rollout.max_logprob_drift above it)")
                limit = (f"rollout.max_logprob_drift={max_drift:g}" if rc.max_logprob_drift > 0 else
                         f"{max_drift:g} (rollout.max_logprob_drift=0: the limit for {dtype} engines)")
                raise WeightSyncError(f"iteration {it + 1}: rollout worker {checked} logprobs differ from the "
                                      f"learner's by {drift:.3g} > {limit} after syncing version {version}{hint}")

            # ---- held-out evaluation of the new weights
            evaluation = evaluate() if last or (eval_every and (it + 1) % eval_every == 0) else {}
            after = {**after, **evaluation} if evaluation else after

            # ---- metrics
            # Shared memory: one write serves every engine (each reports it); else one load per engine.
            shared = infos[0]["mode"] == "shared_memory"
            sync_bytes = infos[0]["bytes"] if shared else sum(i["bytes"] for i in infos)
            sync_busy = max(i["seconds"] for i in infos) if shared else sum(i["seconds"] for i in infos)
            m = {
                "iteration": it + 1, **stats, **{k: v for k, v in evaluation.items() if k != "eval_examples"},
                "num_workers": len(pool.workers),
                "learn_seconds": stats["evaluate_seconds"] + stats["advantage_seconds"] + stats["train_seconds"],
                "sync_seconds": max(i["seconds"] for i in infos), "sync_wall_seconds": sync_wall,
                "sync_bytes": sync_bytes, "sync_mode": infos[0]["mode"],
                "sync_gb_per_s": sync_bytes / 1e9 / max(sync_busy, 1e-9),
                "drift": drift, "drift_limit": max_drift, "drift_worker": checked,
                "rollout_tokens_per_s": stats["gen_tokens"] / max(stats["gen_seconds"], 1e-9),
                "score_tokens_per_s": stats["total_tokens"] / max(stats["score_seconds"], 1e-9),
                "evaluate_tokens_per_s": stats["total_tokens"] / max(stats["evaluate_seconds"], 1e-9),
                "advantage_tokens_per_s": stats["total_tokens"] / max(stats["advantage_seconds"], 1e-9),
                "iteration_seconds": time.perf_counter() - t_it,
            }
            history.append(m)
            metrics_log.write(it + 1, m)
            log(_progress(m, ppo.iterations))
            if "eval_examples" in evaluation:
                log(f"[ppo]   e.g. {evaluation['eval_examples'][0]!r}")
            if saving is not None and not Path(_get_small(saving)).is_dir():
                log(f"[ppo] checkpoint not completed: the learner wrote it to {tmp_ckpt} on its own node, which "
                    f"this driver does not see (put output_dir on shared storage, or ppo.checkpoint_every=0)")
            elif saving is not None:
                final = ckpt_root / f"iter_{it + 1:06d}"
                saved.append(final)
                stale, saved[:] = saved[:-CHECKPOINTS_KEPT], saved[-CHECKPOINTS_KEPT:]
                # kl_coef_next: the controller after this batch (batch it+1 may have moved it already).
                _commit_checkpoint(tmp_ckpt, final, {
                    "iteration": it + 1, "policy_version": version, "kl_coef": stats["kl_coef_next"],
                    "before": before, "reference_policy": _policy_id(policy_dir), "seed": ppo.seed,
                    "run_checkpoints": [p.name for p in saved]}, metrics_log.path)
                for p in stale:
                    shutil.rmtree(p, ignore_errors=True)
                progress.update(checkpoint=final, iteration=it + 1)
                log(f"[ppo] checkpoint {final} (resume with ppo.resume_from={out_dir})")

            # ---- between iterations: resize the rollout pool, then (sync mode) the next rollout
            if on_iteration is not None:
                on_iteration(m, IterationContext(it + 1, pool, learner, scored))
            wanted = _requested_workers(control_file, log)
            if wanted is not None and wanted != len(pool.workers):
                try:
                    pool.set_num_workers(wanted)
                    log(f"[ppo] rollout workers -> {wanted} ({control_file})")
                except ValueError as e:
                    log(f"[ppo] not resizing: {e}")
            if not one_step_off and not last:
                pending = prepare(launch_rollout(it + 1))

        policy_out = Path(_get_small(learner.save.remote(str(out_dir / "policy"))))
        plot = plot_ppo(history, out_dir / "ppo.png", before, eval_name=task.eval_reward)
        seconds = time.perf_counter() - start
        evaluated = (f"eval reward {before['eval_reward']:+.3f} -> {after['eval_reward']:+.3f}, " if task.eval_reward
                     else "")
        log(f"[ppo] done in {seconds:.0f}s: held-out {evaluated}rm {before['eval_rm_score']:+.3f} -> "
            f"{after['eval_rm_score']:+.3f}, "
            f"kl_ref {history[-1]['kl_ref']:.3f}; policy {policy_out}, plot {plot}")
        return PPOResult(before=before, after=after, history=history, policy_dir=policy_out, eval_reward_name=task.eval_reward,
                         metrics_path=metrics_log.path, plot_path=plot, seconds=seconds)
    finally:
        def close_shared(spec: dict) -> None:
            try:
                _get_small(learner.close_shared_weights.remote(spec))
            except Exception:  # a dead learner: remove them from here (same node in most setups)
                from rlhf_ray.ppo.shared_weights import unlink_slots

                unlink_slots(spec)

        def shutdown_deployed_rm() -> None:
            from rlhf_ray.reward.serve import shutdown_rm

            shutdown_rm("rm")

        if metrics_log is not None:  # a restarted attempt opens its own writer on the same directory
            _cleanup(log, "closing the TensorBoard writer", metrics_log.close)
        if pool.shared is not None:
            _cleanup(log, "removing the shared-memory weights", close_shared, pool.shared)
        _cleanup(log, "stopping the rollout workers", pool.shutdown)
        for name, actor in (("learner", learner), ("advantage", advantage), ("scorer", scorer)):
            _cleanup(log, f"stopping the {name} actor", ray.kill, actor)
        if deployed:
            _cleanup(log, "shutting down the Serve app 'rm'", shutdown_deployed_rm)
