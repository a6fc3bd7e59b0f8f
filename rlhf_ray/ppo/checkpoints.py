"""A PPO run's checkpoints: ``<out_dir>/checkpoints/iter_NNNNNN/`` (the learner's ``policy/``, the
trainer state and the metrics so far) and ``latest`` -> the newest; finding, checking and resuming one.

A checkpoint is written in two steps that cannot leave a half one behind: the learner saves its policy
into a ``.tmp-`` directory (:meth:`CheckpointStore.begin`), then the driver adds the trainer state and
metrics and moves it into place (:func:`commit_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rlhf_ray.config import ConfigError, PPOConfig
from rlhf_ray.private import make_private, private_dir

CHECKPOINTS = "checkpoints"  # under the PPO output directory: iter_NNNNNN/ and latest -> the newest
CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINTS_KEPT = 2


class CheckpointStore:
    """The checkpoints of one run in ``out_dir/checkpoints``, every ``every`` iterations (0: none); the
    run keeps its CHECKPOINTS_KEPT newest. Opening it removes what a crashed run left half-written,
    and, on a fresh run, the ``latest`` link of an earlier run's checkpoints."""

    def __init__(self, out_dir: Path, every: int, resume_dir: Path | None, resumed: dict | None, log=print):
        self.root, self.every, self.log = Path(out_dir) / CHECKPOINTS, every, log
        for partial in self.root.glob(".tmp-iter_*"):  # a crashed run's incomplete checkpoints: never resumable
            shutil.rmtree(partial, ignore_errors=True)
        if not resumed and (self.root / "latest").is_symlink():  # "latest" must not name an earlier run's
            (self.root / "latest").unlink()
            log(f"[ppo] starting fresh: {self.root} keeps an earlier run's checkpoints (resume one with "
                f"ppo.resume_from=DIR); its 'latest' link is removed")
        # This run's kept checkpoints, oldest first: when it resumed from one in root, those that the
        # run it continues had kept up to there.
        self.saved = [self.root / name for name in resumed.get("run_checkpoints", [resume_dir.name])] \
            if resumed and resume_dir.parent == self.root else []

    def _tmp(self, iteration: int) -> Path:
        return self.root / f".tmp-iter_{iteration:06d}"

    def begin(self, iteration: int, learner):
        """When checkpoint ``iteration`` is due: the learner saves its part (a ref of the directory it
        wrote; submitted before it trains on). Else None."""
        if not (self.every and iteration % self.every == 0):
            return None
        tmp = self._tmp(iteration)
        shutil.rmtree(tmp, ignore_errors=True)
        private_dir(self.root)
        private_dir(tmp)  # (on this node; the learner's save makes its own files private where it runs)
        return learner.save_checkpoint.remote(str(tmp / "policy"))

    def commit(self, iteration: int, written: str, state: dict, metrics_path: Path) -> Path | None:
        """Complete checkpoint ``iteration`` (``written``: where the learner says it saved) with
        ``state`` and the metrics so far, and drop this run's older ones beyond CHECKPOINTS_KEPT.
        Returns the checkpoint, or None when the learner wrote it where this process does not see it."""
        tmp = self._tmp(iteration)
        if not Path(written).is_dir():
            self.log(f"[ppo] checkpoint not completed: the learner wrote it to {tmp} on its own node, which "
                     f"this driver does not see (put output_dir on shared storage, or ppo.checkpoint_every=0)")
            return None
        final = self.root / f"iter_{iteration:06d}"
        self.saved.append(final)
        stale, self.saved[:] = self.saved[:-CHECKPOINTS_KEPT], self.saved[-CHECKPOINTS_KEPT:]
        commit_checkpoint(tmp, final, {**state, "run_checkpoints": [p.name for p in self.saved]}, metrics_path)
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return final


def _recover_aside(root: Path) -> None:
    """Finish what a crash inside :func:`commit_checkpoint` left in the checkpoints directory ``root``:
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
    mine = model_config(ckpt / "policy", f"ppo.resume_from: the checkpoint's policy ({ckpt / 'policy'})")
    ref = model_config(reference_policy, f"the reference policy ({reference_policy})")
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if mine.get(key) != ref.get(key):
            raise ConfigError(f"ppo.resume_from: the checkpoint's policy ({ckpt / 'policy'}) has {key}="
                             f"{mine.get(key)!r}, the reference policy ({reference_policy}) {ref.get(key)!r}")
    return {**state, "lines": lines}


def model_config(path: str | Path, what: str) -> dict:
    """The model config of a local directory or a Hugging Face hub name (its cache, or the hub) as a
    dict; ConfigError naming ``what`` when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path)).to_dict()
    except Exception as e:  # OSError (no such directory / name, no config.json), ValueError (bad file)
        raise ConfigError(f"{what}: cannot read its config.json ({type(e).__name__}: {e})") from None


def policy_id(path: str | Path) -> str:
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
    if recorded is not None and not moved and policy_id(recorded) != policy_id(reference_policy):
        raise ConfigError(f"ppo.resume_from: the reference policy is {policy_id(reference_policy)}, but the "
                          f"checkpoint was trained against {state['reference_policy']} ({state_file}); resume "
                          f"with that policy (--policy or model.name_or_path)")
    return ckpt, state


def commit_checkpoint(tmp: Path, final: Path, state: dict, metrics_path: Path) -> None:
    """Complete the checkpoint the learner wrote into ``tmp`` (trainer state, metrics so far), move it
    to ``final`` and point ``latest`` at it; a crash before the move leaves only a ``.tmp-`` directory.
    An existing ``final`` (a resumed run redoing an iteration; ``latest`` may name it) is renamed aside
    and deleted only after the new one is in place: a crash in between leaves it whole (``.old-``)."""
    (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1))
    shutil.copyfile(metrics_path, tmp / "metrics.jsonl")
    make_private(tmp)
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
