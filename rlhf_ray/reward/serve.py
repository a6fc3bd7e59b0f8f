"""The reward model as a service: Ray Serve replicas of a RewardScorer behind a FastAPI app.

This module is the deployment (``RewardModelServer``, its HTTP app, ``build_app`` and the ``serve run``
entry point ``app_builder``); the request schemas and errors are in ``rlhf_ray.reward.api``, deploying
it from Python (``deploy_rm``, ``rm_service``) and serving from the CLI in ``rlhf_ray.reward.service``.

HTTP API (JSON; OpenAPI docs at ``<url>/docs``)::

    POST /score        {"prompt": str | [{"role", "content"}, ...], "responses": [str, ...]}
                    -> {"rewards": [R_i], "probs": [P(y_i|x)], "best": argmax_i R_i,
                        "truncated": [bool], "model_version": str}
    POST /score_batch  {"items": [{"prompt": ..., "responses": [...]}, ...]}
                    -> {"results": [<as /score>, ...], "model_version": str}
    POST /get_reward   {"query": [str], "prompts": [str] (optional), "labels": [...] (ignored)}
                    -> {"rewards": [R_i], "scores": [R_i], "model_version": str}
    GET  /version      -> {"model_version", "checkpoint", "max_length", "batching", "limits", "load_error"}
    GET  /healthz      -> {"status": "ok"}

A chat prompt (a list of messages) is rendered with the checkpoint's chat template, each response
as the assistant's turn, exactly as in training (``rlhf_ray.data.chat``). ``/get_reward`` is
OpenRLHF's remote reward-model protocol (its ``--remote_rm_url``): each query is a text already
rendered (prompt and response); where ``prompts`` is given and a query starts with its prompt, the
query is scored as that (prompt, response) pair, else whole.

Errors are 4xx with ``{"error": {"type": ..., "message": ..., "fields": [{"field", "message"}]}}``:
400 invalid JSON, 401 missing/wrong bearer token, 404/405 unknown route, 413 a body over
``serve.max_request_mib``, 422 a field is wrong
(``message`` and ``fields`` name it, e.g. ``items[2].responses``) or scoring that input failed.

Limits (ServeConfig): 1..max_responses responses per prompt, 1..max_prompts items per batch,
at most max_chars characters in each prompt and each response. Inputs longer than the RM's
``max_length`` tokens are cut by the training rule (BOS, then the last tokens, ending in EOS) and
flagged in ``truncated``.

Auth: when the env var named by ``ServeConfig.auth_token_env`` is set where the app is built (the
driver), every route except /healthz, /docs and /openapi.json needs ``Authorization: Bearer <token>``.
Handle calls (in-cluster) are not checked.

The same scoring is reachable through the DeploymentHandle that ``rlhf_ray.reward.service.deploy_rm`` returns:
``handle.score.remote(prompt, responses)``, ``handle.score_batch.remote(items)`` and
``handle.score_pairs.remote(prompts, responses)`` return the dicts above (a bad request raises
:class:`RequestError`). Concurrent requests are merged into one forward pass by ``@serve.batch``.
A new checkpoint rolls on with ``deploy_rm`` again (old replicas serve until new ones are up)
or, under ``serve deploy``, by changing ``user_config: {checkpoint: ...}`` (in-place reload).
"""

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf_ray.config import ServeConfig
from rlhf_ray.reward.api import (BearerAuth, BodyLimit, ErrorResponse, GetRewardResponse, RequestError,
                                 ScoreBatchResponse, ScoreResponse, plain_prompt, validate_request, body_error, request_models,
                                 split_queries, validation_error)
from rlhf_ray.reward.scorer import Group, GroupScore, RewardScorer

logger = logging.getLogger("ray.serve")


# ----------------------------------------------------------------------------- scoring

def score_jobs(scorer: RewardScorer, jobs: list[list[Group]]) -> list[list[GroupScore] | Exception]:
    """Score several requests' groups in one forward pass. If that fails, score each request on its
    own, so one request that breaks the scorer fails alone: its slot holds the exception."""
    try:
        flat = scorer.score_groups([g for job in jobs for g in job])
    except Exception as e:
        if len(jobs) == 1:
            return [e]
        out: list = []
        for job in jobs:
            try:
                out.append(scorer.score_groups(job))
            except Exception as e_job:
                out.append(e_job)
        return out
    out, start = [], 0
    for job in jobs:
        out.append(flat[start:start + len(job)])
        start += len(job)
    return out


def _timed_score_jobs(scorer: RewardScorer, jobs: list[list[Group]]) -> tuple[list, float]:
    start = time.perf_counter()  # in the forward thread: excludes waiting for it
    return score_jobs(scorer, jobs), time.perf_counter() - start


@dataclass
class ReplicaStats:
    requests: int = 0  # scoring calls (one /score, /score_batch or handle call each)
    batches: int = 0  # forward passes (several requests each with @serve.batch)
    items: int = 0  # (prompt, response) pairs scored
    forward_s: float = 0.0  # seconds inside the scorer: tokenize + model forward (ours)
    in_replica_s: float = 0.0  # summed over requests: time from the handler to its answer
    failed: int = 0  # requests whose scoring raised


# ----------------------------------------------------------------------------- the deployment

@serve.deployment
@serve.ingress()
class RewardModelServer:
    """One replica. The model is loaded by ``reconfigure({"checkpoint": path})`` (Serve's user_config)."""

    def __init__(self, cfg: ServeConfig, max_length: int | None = None, auth_token: str | None = None,
                 batching: bool = True, chat_template: str = "auto"):
        """``chat_template``: ``auto`` (the checkpoint's own), ``none``, or Jinja source."""
        from rlhf_ray.runtime import quiet_libraries

        quiet_libraries()  # no per-load progress bars in replica logs (also under plain `serve run`)
        self.cfg, self.max_length, self.batching = cfg, max_length, batching
        self.chat_template = chat_template
        self.models = request_models(cfg)
        self._token = auth_token or None
        # One forward at a time, off the event loop (so /healthz and batching stay responsive).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rm-forward")
        self._scorer: RewardScorer | None = None
        self._checkpoint: str | None = None
        self._load_error: str | None = None
        self._stats = ReplicaStats()
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    async def reconfigure(self, user_config: dict) -> None:
        """Load ``user_config["checkpoint"]``; requests keep using the old model until it is ready.
        A failed reload keeps the old model (reported as ``load_error`` by /version)."""
        path = str((user_config or {}).get("checkpoint", ""))
        if not path:
            raise ValueError('user_config needs {"checkpoint": "<RM directory>"}')
        if path == self._checkpoint:
            return
        try:
            scorer = await asyncio.get_running_loop().run_in_executor(
                None, lambda: RewardScorer(path, self.max_length, chat_template=self.chat_template))
        except Exception as e:
            if self._scorer is None:
                raise
            logger.exception("reloading the reward model from %s failed; still serving %s", path, self._checkpoint)
            self._load_error = f"{path}: {type(e).__name__}: {e}"
            return
        self._scorer, self._checkpoint, self._load_error = scorer, path, None

    def check_health(self) -> None:
        if self._scorer is None:
            raise RuntimeError("no reward model loaded")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self)

    # -- the handle API (same dicts as HTTP) --

    async def score(self, prompt, responses: list[str]) -> dict:
        """``prompt``: text or a chat (a list of {"role", "content"} messages)."""
        return await self._score_request(validate_request(self.models.score, {"prompt": prompt, "responses": responses}))

    async def score_batch(self, items: list[dict]) -> dict:
        return await self._score_batch_request(validate_request(self.models.batch, {"items": items}))

    async def score_pairs(self, prompts: list, responses: list[str]) -> dict:
        """Flat R(x_i, y_i) for aligned lists (PPO): {"rewards", "truncated", "model_version"}."""
        req = validate_request(self.models.pairs, {"prompts": prompts, "responses": responses})
        return await self._score_flat([plain_prompt(p) for p in req.prompts], req.responses)

    async def get_reward(self, query: list[str], prompts: list[str] | None = None, labels=None) -> dict:
        """OpenRLHF's remote-RM protocol (see the module docstring)."""
        return await self._get_reward_request(validate_request(self.models.get_reward, {
            "query": query, "prompts": prompts, "labels": labels}))

    # -- one implementation per request kind, shared by the handle API and HTTP

    async def _score_request(self, req) -> dict:
        version, [result] = await self._score([(plain_prompt(req.prompt), req.responses)])
        return _result_json(result, version)

    async def _score_batch_request(self, req) -> dict:
        version, results = await self._score([(plain_prompt(it.prompt), it.responses) for it in req.items])
        return {"results": [_result_json(r, version) for r in results], "model_version": version}

    async def _get_reward_request(self, req) -> dict:
        out = await self._score_flat(*split_queries(req.query, req.prompts))
        return {"rewards": out["rewards"], "scores": out["rewards"], "model_version": out["model_version"]}

    async def _score_flat(self, prompts: list, responses: list[str]) -> dict:
        if not prompts:
            return {"rewards": [], "truncated": [], "model_version": self._scorer.model_version}
        version, results = await self._score([(p, [r]) for p, r in zip(prompts, responses)])
        return {"rewards": [r.rewards[0] for r in results], "truncated": [r.truncated[0] for r in results],
                "model_version": version}

    async def version(self) -> dict:
        return {"model_version": self._scorer.model_version, "checkpoint": self._checkpoint,
                "max_length": self._scorer.max_length if self._scorer is not None else self.max_length,
                "batching": self.batching, "load_error": self._load_error,
                "limits": {k: getattr(self.cfg, k) for k in ("max_responses", "max_prompts", "max_chars")}}

    async def get_stats(self, reset: bool = False) -> dict:
        """This replica's counters (for benchmarks); ``torch_threads`` is the forward's thread count."""
        import torch

        stats = {**asdict(self._stats), "torch_threads": torch.get_num_threads()}
        if reset:
            self._stats = ReplicaStats()
        return stats

    # -- scoring --

    async def _score(self, groups: list[Group]) -> tuple[str, list[GroupScore]]:
        """Score one request's groups (merged with concurrent requests when batching is on)."""
        start = time.perf_counter()
        if self.batching:
            version, result = await self._batched(groups)
        else:
            [(version, result)] = await self._run_jobs([groups])
        self._stats.in_replica_s += time.perf_counter() - start
        if isinstance(result, Exception):
            raise RequestError(422, "scoring_failed", f"scoring failed: {type(result).__name__}: {result}")
        return version, result

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)  # reset from ServeConfig in __init__
    async def _batched(self, jobs: list[list[Group]]) -> list[tuple[str, Any]]:
        return await self._run_jobs(jobs)

    async def _run_jobs(self, jobs: list[list[Group]]) -> list[tuple[str, Any]]:
        scorer = self._scorer  # the whole batch sees one model, even if a reload lands meanwhile
        results, seconds = await asyncio.get_running_loop().run_in_executor(
            self._pool, _timed_score_jobs, scorer, jobs)
        s = self._stats
        s.forward_s += seconds
        s.batches += 1
        s.requests += len(jobs)
        s.items += sum(len(rs) for job in jobs for _, rs in job)
        s.failed += sum(isinstance(r, Exception) for r in results)
        return [(scorer.model_version, r) for r in results]


def _result_json(result: GroupScore, version: str) -> dict:
    return {**result._asdict(), "model_version": version}


# ----------------------------------------------------------------------------- HTTP

def build_http_app(server: RewardModelServer) -> FastAPI:
    """The FastAPI app of one replica; routes call the same methods as the handle API."""
    models = server.models
    errors = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422)}
    app = FastAPI(title="rlhf_ray reward model", version="1",
                  description="Listwise reward model: R(x, y_i) and P(y_i | x) = softmax_i R(x, y_i).")
    if server._token:
        app.add_middleware(BearerAuth, token=server._token)
    app.add_middleware(BodyLimit, limit=server.cfg.max_request_mib << 20)  # the outermost: before auth

    async def on_request_error(_request, e: RequestError):
        return JSONResponse(e.to_json(), status_code=e.status)

    async def on_validation_error(request, e: RequestValidationError):
        return await on_request_error(request, validation_error(e.errors()))

    async def on_http_error(request, e: StarletteHTTPException):
        return await on_request_error(request, body_error(e) or RequestError(e.status_code, "http_error",
                                                                             str(e.detail)))

    app.add_exception_handler(RequestError, on_request_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)

    @app.post("/score", response_model=ScoreResponse, responses=errors)
    async def score(body: models.score):
        return await server._score_request(body)

    @app.post("/score_batch", response_model=ScoreBatchResponse, responses=errors)
    async def score_batch(body: models.batch):
        return await server._score_batch_request(body)

    @app.post("/get_reward", response_model=GetRewardResponse, responses=errors)
    async def get_reward(body: models.get_reward):
        return await server._get_reward_request(body)

    @app.get("/version")
    async def version():
        return await server.version()

    @app.get("/healthz")
    async def healthz():
        server.check_health()
        return {"status": "ok"}

    return app


# ----------------------------------------------------------------------------- deploying

def check_checkpoint(checkpoint_dir: str | Path) -> Path:
    """Fail fast in the driver (a replica that cannot load would be retried by Serve)."""
    path = Path(checkpoint_dir).resolve()
    files = sorted(path.glob("model*.safetensors"))
    if not (path / "config.json").is_file() or not files:
        raise FileNotFoundError(f"{path}: not an RM directory (config.json and model*.safetensors expected)")
    from safetensors import safe_open

    for f in files:  # the header only: a damaged or truncated file fails here, not in every replica
        try:
            with safe_open(str(f), "np") as st:
                st.keys()
        except Exception as e:
            raise ValueError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return path


def build_app(serve_cfg: ServeConfig, checkpoint_dir: str | Path, max_length: int | None = None, *,
              auth_token: str | None = None, batching: bool = True, chat_template: str = "auto"):
    """The Serve application (``RewardModelServer`` bound with its options); nothing starts yet."""
    cfg = serve_cfg
    options: dict[str, Any] = dict(
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        user_config={"checkpoint": str(check_checkpoint(checkpoint_dir))},
        # Enough requests in a replica to fill a batch while the previous one runs.
        max_ongoing_requests=max(2 * cfg.max_batch_size, 8),
        # Rolling to a new checkpoint: old replicas serve until their replacements are ready.
        max_surge_percent=100,
        max_constructor_retry_count=3,
        logging_config={"enable_access_log": False},
    )
    if cfg.max_replicas > cfg.num_replicas:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "initial_replicas": min(max(cfg.num_replicas, cfg.min_replicas), cfg.max_replicas),
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
            "look_back_period_s": cfg.look_back_period_s}
    else:
        options["num_replicas"] = cfg.num_replicas
    return RewardModelServer.options(**options).bind(cfg, max_length, auth_token, batching, chat_template)


def app_builder(args: dict):
    """For ``serve run rlhf_ray.reward.serve:app_builder checkpoint=/path [max_length=64]
    [batching=false] [chat_template=FILE.jinja] [<ServeConfig field>=value ...]`` (host/port come from
    ``serve run``)."""
    from rlhf_ray.config import load_config

    args = dict(args)
    checkpoint = args.pop("checkpoint", None)
    if not checkpoint:
        raise ValueError("app_builder: checkpoint=<RM directory> is required")
    max_length = int(args.pop("max_length")) if "max_length" in args else None  # (None: the checkpoint's)
    batching = str(args.pop("batching", "true")).lower() in ("1", "true", "yes")
    from rlhf_ray.data.chat import resolve_chat_template

    chat_template = resolve_chat_template(str(args.pop("chat_template", "auto")), "chat_template")
    cfg = load_config(None, [f"serve.{k}={v}" for k, v in args.items()]).serve
    return build_app(cfg, checkpoint, max_length, auth_token=os.environ.get(cfg.auth_token_env) or None,
                     batching=batching, chat_template=chat_template)
