"""Partial rollouts (``rollout.partial_rollouts``): a rollout worker's call returns once enough groups are
done; the samples still running wait in the worker and go on in its next call, under the weights it then
holds, beside that call's new prompts. An iteration never waits for its slowest samples.

A call (:meth:`PartialRollouts.generate`) admits its new groups (a prompt's ``ppo.samples_per_prompt``
samples), steps the engine and cuts as soon as

* ``quota`` groups (every sample of each) are done, and
* every group that could not wait for another call under ``rollout.max_staleness`` is done
  (:func:`must_finish`);

then it returns those groups (:func:`pick_groups`) and stops the rest, keeping their tokens. A sample's
**staleness** is the learner's version when it trains on the sample minus the version of the weights that
sampled its first token: 0 in a synchronous run, 1 one-step-off, and one more per call it was carried
through. A resumed sample is sent to the engine as its prompt and tokens so far (one prefill under the new
weights; the old ones' KV blocks are gone) and goes on to its token budget. Each token keeps the logprob
of the weights that sampled it, so the learner's importance correction (``ppo.tis_cap``: pi_old / the
sampling policy, per token) covers tokens of several policy versions in one sequence.

For a cut to happen a worker must have more groups in flight than it returns: its first call admits
twice its quota (the pool sends the extra groups: :func:`rlhf_ray.ppo.pool.generate_on`); after that each
call admits ``quota`` new groups and returns ``quota``. The carried samples live in the worker: a worker
stopped by a resize, or a run that ends or restarts, drops its own.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from rlhf_ray.data.prompts import PromptRecord
from rlhf_ray.ppo.tool_calls import Episode, episode_arrays
from rlhf_ray.ppo.types import Rollout


def must_finish(first_versions: np.ndarray, version: int, base_lag: int, max_staleness: int) -> np.ndarray:
    """Which groups must be done in this call: those that would train at a staleness over
    ``max_staleness`` if they waited for the next one. ``first_versions`` int [G]: the version that
    sampled each group's first tokens (this call's ``version`` for a group not started); ``base_lag``:
    the learner's lead on the engines when it trains a batch (0 synchronous, 1 one-step-off). -> bool [G].

    A group returned by the next call trains at learner version ``version + 1 + base_lag``."""
    return version + 1 + base_lag - np.asarray(first_versions) > max_staleness


def pick_groups(done: np.ndarray, forced: np.ndarray, quota: int) -> np.ndarray | None:
    """The groups a call returns, or None while it must go on. ``done``, ``forced`` bool [G] in admission
    order (oldest first): whether each group's samples are all done, whether it must be returned now.

    The call ends when every forced group is done and ``quota`` groups are (or every group is, when it
    holds fewer). Returned: the forced groups and the oldest other done groups, ``quota`` in all (more only
    when more are forced), in admission order. -> int [k] indices."""
    done, forced = np.asarray(done, bool), np.asarray(forced, bool)
    if (forced & ~done).any() or done.sum() < min(quota, len(done)):
        return None
    others = np.flatnonzero(done & ~forced)[:max(0, quota - int(forced.sum()))]
    return np.sort(np.concatenate([np.flatnonzero(forced), others]))


@dataclass
class _Sample:
    """One sample in a worker: its episode (prompt ids and the tokens so far; with tools, its turns), where
    it came from and what it has left. ``finish``: "stop" or "length" (cut) once it is done, else None."""

    episode: Episode
    record: PromptRecord
    budget: int  # tokens it may add after the prompt (ppo.max_new_tokens)
    seed: int | None
    first_version: int | None = None  # of the weights that sampled its first token (None: none yet)
    segments: int = 0  # calls it got tokens in
    requests: int = 0  # requests sent to the engine (each turn and each resumption is one)
    turn_start: int = 0  # where its current model turn began in episode.ids
    finish: str | None = None
    turn_regex: list | None = None  # per turn, a regex it must match (tests; rlhf_ray.ppo.episodes)

    def end(self, truncated: bool) -> None:
        self.finish = "length" if truncated else "stop"
        self.episode.done, self.episode.truncated = True, truncated


class PartialRollouts:
    """A rollout worker's partial rollouts: the samples it carries and the call that steps its engine
    (``worker``: the :class:`rlhf_ray.ppo.rollout.RolloutWorker`). With tools (``worker.toolbox``) a sample
    is an episode: a turn that calls tools gets its answers as soon as it ends and the next turn goes
    straight back to the engine, beside the other samples' requests (rlhf_ray.ppo.episodes)."""

    def __init__(self, worker, max_staleness: int, base_lag: int):
        self.worker, self.max_staleness, self.base_lag = worker, int(max_staleness), int(base_lag)
        self.groups: list[list[_Sample]] = []  # admission order
        self._ids = itertools.count()
        self.cache, self._later = None, set()

    @property
    def carried(self) -> int:
        """Samples waiting for the next call."""
        return sum(len(g) for g in self.groups)

    def generate(self, records: list[PromptRecord], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int | None, group_size: int, quota: int, turn_regex: list | None = None) -> Rollout:
        """Admit ``records`` (whole groups of ``group_size`` consecutive records), run until the cut, and
        return ``quota`` groups (more if the staleness bound forces them) as one Rollout, groups whole and
        in admission order. ``Rollout.versions`` has each sample's first version; ``stats`` counts the
        returned samples that ran in more than one call and the samples carried to the next.
        ``turn_regex``: as :func:`rlhf_ray.ppo.episodes.generate_episodes` takes it, for the turns that
        start in this call (a turn resumed after a cut goes on unguided)."""
        t0, w = time.perf_counter(), self.worker
        if group_size < 1 or len(records) % group_size or quota < 1:
            raise ValueError(f"partial rollouts: {len(records)} prompts are not whole groups of {group_size}, "
                             f"or quota {quota} < 1")
        self._admit(records, max_new_tokens, seed, group_size, turn_regex)
        version = w.version
        firsts = [min(s.first_version if s.first_version is not None else version for s in g) for g in self.groups]
        forced = must_finish(np.array(firsts), version, self.base_lag, self.max_staleness)
        generated = self._run(forced, quota, temperature, top_p)
        picked = pick_groups(self._done(), forced, quota)
        if picked is None:  # (every request ended, fewer groups than the quota)
            picked = np.flatnonzero(self._done())
        out = [s for i in picked for s in self.groups[i]]
        self.groups = [g for i, g in enumerate(self.groups) if i not in set(picked.tolist())]
        if not out:
            raise RuntimeError("partial rollouts: no group finished")
        versions = np.array([version if s.first_version is None else s.first_version for s in out], dtype=np.int64)
        stats = {"rollout_resumed": sum(s.segments > 1 for s in out), "rollout_carried": self.carried,
                 **(self.cache.stats() if w.toolbox is not None else {})}
        fields = {"policy_version": int(versions.min()), "num_tokens": generated, "versions": versions, "stats": stats}
        if w.toolbox is not None:
            from rlhf_ray.ppo.episodes import episodes_rollout

            return episodes_rollout(w, [s.episode for s in out], [s.record for s in out], time.perf_counter() - t0,
                                    **fields)
        return self._rollout(out, time.perf_counter() - t0, fields)

    def _admit(self, records: list[PromptRecord], max_new_tokens: int, seed: int | None, n: int,
               turn_regex: list | None) -> None:
        w = self.worker
        limit = w.max_model_len - 1  # longest sequence logprobs_of can score
        seeds = (np.random.SeedSequence([seed, w.worker_id]).generate_state(len(records))
                 if seed is not None else [None] * len(records))
        if w.toolbox is not None:
            from rlhf_ray.ppo.episodes import start_episodes

            episodes = start_episodes(w, records)
        else:
            episodes = [Episode(r.prompt, len(ids), list(ids))
                        for r, ids in zip(records, w.encode_prompts([r.prompt for r in records]))]
        for i, e in enumerate(episodes):
            if len(e.ids) >= limit:
                raise ValueError(f"prompt {i} is {len(e.ids)} tokens; the model takes at most {limit - 1} "
                                 f"prompt tokens to leave room for a response")
        samples = [_Sample(e, r, int(max_new_tokens), None if seeds[i] is None else int(seeds[i]),
                           turn_start=len(e.ids), turn_regex=turn_regex[i] if turn_regex else None)
                   for i, (e, r) in enumerate(zip(episodes, records))]
        self.groups += [samples[i:i + n] for i in range(0, len(samples), n)]

    def _done(self) -> np.ndarray:
        return np.array([all(s.finish is not None for s in g) for g in self.groups], dtype=bool)

    def _run(self, forced: np.ndarray, quota: int, temperature: float, top_p: float) -> int:
        """Step the engine on every unfinished sample until the cut (:func:`pick_groups`); stop the rest,
        keeping their tokens. Returns the tokens generated."""
        from rlhf_ray.ppo.episodes import PrefixCache, answer_calls, end_turn
        from rlhf_ray.ppo.rollout import _chosen_logprobs

        w, engine = self.worker, self.worker.llm.llm_engine
        running: dict[str, _Sample] = {}
        self.cache, self._later = PrefixCache(), set()  # (the requests of turns after a tool turn)
        for g in self.groups:
            for s in g:
                if s.finish is None:
                    self._submit(s, running, temperature, top_p)
        generated, sampled = 0, {}  # (the samples that got tokens in this call)
        try:
            while running and pick_groups(self._done(), forced, quota) is None:
                calling = {}
                for out in engine.step():
                    s = running.get(out.request_id)
                    if s is None:  # (an output of a request stopped at an earlier cut)
                        continue
                    if out.request_id in self._later:
                        self._later.discard(out.request_id)
                        self.cache.count(out, later_turn=True)
                    c = out.outputs[0]
                    toks = list(c.token_ids)
                    s.episode.add_model_turn(toks, _chosen_logprobs(c.logprobs, toks) if toks else [])
                    generated += len(toks)
                    if toks:
                        sampled[id(s)] = s
                        s.first_version = w.version if s.first_version is None else s.first_version
                    if not out.finished:
                        continue
                    del running[out.request_id]
                    stopped = c.finish_reason == "stop"
                    if w.toolbox is None:
                        s.end(truncated=not stopped)
                        continue
                    calls = end_turn(w, s.episode, s.episode.ids[s.turn_start:], stopped)
                    if calls:
                        calling[id(s)] = (s.episode, s.budget, calls, s)
                    else:
                        s.end(truncated=s.episode.truncated)
                answer_calls(w, {k: v[:3] for k, v in calling.items()})  # the step's tool calls, together
                for *_, s in calling.values():
                    if s.episode.done:
                        s.end(truncated=s.episode.truncated)
                    else:
                        self._submit(s, running, temperature, top_p)
        finally:
            if running:  # the cut: stop the rest (the engine must be idle for the next weight sync)
                engine.abort_request(list(running))
        for s in sampled.values():
            s.segments += 1
        return generated

    def _submit(self, s: _Sample, running: dict, temperature: float, top_p: float) -> None:
        """Send ``s`` on from where it is (its prompt and tokens so far), or end it when it has no room."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        from rlhf_ray.ppo.episodes import turn_seed

        w, e = self.worker, s.episode
        room = min(s.budget - e.used, w.max_model_len - 1 - len(e.ids))
        if room < 1:
            s.end(truncated=True)
            return
        regex, rid = None, f"partial-{next(self._ids)}"
        if e.model[-1:] != [True]:  # (a new turn, not a resumed one)
            s.turn_start = len(e.ids)
            regex = s.turn_regex[e.rounds] if s.turn_regex and e.rounds < len(s.turn_regex) else None
            if e.rounds:
                self._later.add(rid)
        seed = None if s.seed is None else turn_seed(s.seed, s.requests)
        params = SamplingParams(max_tokens=room, temperature=temperature, top_p=top_p, seed=seed, logprobs=0,
                                detokenize=False, flat_logprobs=True, stop_token_ids=w.stop_token_ids or None,
                                output_kind=RequestOutputKind.DELTA,
                                structured_outputs=StructuredOutputsParams(regex=regex) if regex else None)
        w.llm.llm_engine.add_request(rid, TokensPrompt(prompt_token_ids=list(e.ids)), params)
        running[rid] = s
        s.requests += 1

    def _rollout(self, samples: list[_Sample], seconds: float, fields: dict) -> Rollout:
        w = self.worker
        input_ids, attention_mask, response_mask, logprobs = episode_arrays([s.episode for s in samples], w.pad_id)
        truncated = np.array([s.finish != "stop" for s in samples], dtype=bool)
        texts = w.tokenizer.batch_decode([s.episode.ids[s.episode.prompt_len:len(s.episode.ids) - (not cut)]
                                          for s, cut in zip(samples, truncated)], skip_special_tokens=True)
        return Rollout(
            input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
            rollout_logprobs=logprobs, truncated=truncated, prompts=[s.record.prompt for s in samples],
            responses=texts, worker_id=w.worker_id, gen_seconds=seconds, columns=[s.record.columns for s in samples],
            sources=[s.record.source for s in samples], **fields)
