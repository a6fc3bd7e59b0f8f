"""The reward model as a service: Ray Serve replicas of a RewardScorer behind a FastAPI app.

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

The same scoring is reachable through the DeploymentHandle that :func:`deploy_rm` returns:
``handle.score.remote(prompt, responses)``, ``handle.score_batch.remote(items)`` and
``handle.score_pairs.remote(prompts, responses)`` return the dicts above (a bad request raises
:class:`RequestError`). Concurrent requests are merged into one forward pass by ``@serve.batch``.
A new checkpoint rolls on with :func:`deploy_rm` again (old replicas serve until new ones are up)
or, under ``serve deploy``, by changing ``user_config: {checkpoint: ...}`` (in-place reload).
"""

import asyncio
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, NamedTuple, Union

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf_ray.config import ServeConfig
from rlhf_ray.reward.scorer import Group, GroupScore, RewardScorer

logger = logging.getLogger("ray.serve")

OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


# ----------------------------------------------------------------------------- requests and errors

class RequestError(ValueError):
    """A request the service refuses; ``status`` is the HTTP code, ``fields`` name what is wrong."""

    def __init__(self, status: int, type: str, message: str, fields: tuple = ()):
        super().__init__(status, type, message, tuple(fields))  # args match __init__: picklable
        self.status, self.type, self.message, self.fields = status, type, message, tuple(fields)

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict:
        return {"error": {"type": self.type, "message": self.message, "fields": list(self.fields)}}


def _field_name(loc) -> str:
    """``("body", "items", 3, "responses")`` -> ``"items[3].responses"``; the tags pydantic puts in for
    a union's member (``"chat prompt"``, ``"list[Message]"``: never identifiers) are left out."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and not part.isidentifier():
            continue
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def validation_error(errors: list[dict]) -> RequestError:
    """A pydantic/FastAPI error list as a RequestError (400 for unparsable JSON, else 422)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        where = f" at character {e['loc'][-1]}" if isinstance(e["loc"][-1], int) else ""
        reason = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return RequestError(400, "invalid_json", f"body: invalid JSON{where}: {reason}",
                            [{"field": "body", "message": f"invalid JSON: {reason}"}])
    fields = [{"field": _field_name(e.get("loc", ())), "message": e.get("msg", "")} for e in errors]
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    if len(fields) > 5:
        message += f"; and {len(fields) - 5} more"
    return RequestError(422, "validation_error", message, fields)


def body_error(e: Exception) -> RequestError | None:
    """FastAPI's bare 400 "error parsing the body" (raised from the JSON decoder's non-JSONDecodeError
    failures) as an ``invalid_json`` error naming the body and why; None for other HTTP errors."""
    cause = e.__cause__
    if getattr(e, "status_code", None) != 400 or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        reason = f"not UTF-8 text (byte {cause.start})"
    elif isinstance(cause, RecursionError):
        reason = "nested too deeply"
    else:
        reason = f"{type(cause).__name__}: {cause}"
    return RequestError(400, "invalid_json", f"body: invalid JSON: {reason}",
                        [{"field": "body", "message": f"invalid JSON: {reason}"}])


class RequestModels(NamedTuple):
    score: type[BaseModel]
    batch: type[BaseModel]
    pairs: type[BaseModel]
    get_reward: type[BaseModel]


class Message(BaseModel):
    """One chat message; other keys (name, tool calls, ...) reach the chat template as they are."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str


def _plain(prompt):
    """A validated prompt as the scorer takes it: text, or the messages as dicts."""
    return prompt if isinstance(prompt, str) else [m.model_dump() for m in prompt]


def request_models(cfg: ServeConfig) -> RequestModels:
    """Request bodies with this deployment's limits: strict types, unknown fields rejected."""
    Text = Annotated[str, Field(max_length=cfg.max_chars)]
    Chat = Annotated[list[Message], Field(min_length=1, max_length=cfg.max_responses * 4)]
    # Text or chat, told apart by the JSON type, so that an error names the one the client meant.
    PromptField = Annotated[Union[Annotated[Text, Tag("text prompt")], Annotated[Chat, Tag("chat prompt")]],
                            Discriminator(lambda v: "chat prompt" if isinstance(v, list) else "text prompt")]
    strict = ConfigDict(strict=True, extra="forbid")

    class ScoreRequest(BaseModel):
        model_config = strict
        prompt: PromptField = Field(description=f"the prompt x: text (at most {cfg.max_chars} characters) or a "
                                                f"chat, a list of {{role, content}} messages")
        responses: list[Text] = Field(min_length=1, max_length=cfg.max_responses,
                                      description=f"1..{cfg.max_responses} candidate responses y_i")

        @model_validator(mode="after")
        def _chat_length(self):
            if not isinstance(self.prompt, str) and sum(len(m.content) for m in self.prompt) > cfg.max_chars:
                raise ValueError(f"prompt: the messages hold more than {cfg.max_chars} characters")
            return self

    class ScoreBatchRequest(BaseModel):
        model_config = strict
        items: list[ScoreRequest] = Field(min_length=1, max_length=cfg.max_prompts,
                                          description=f"1..{cfg.max_prompts} prompts with their responses")

    class PairsRequest(BaseModel):
        model_config = strict
        prompts: list[PromptField] = Field(max_length=cfg.max_prompts * cfg.max_responses)
        responses: list[Text] = Field(max_length=cfg.max_prompts * cfg.max_responses)

        @model_validator(mode="after")
        def _aligned(self):
            if len(self.prompts) != len(self.responses):
                raise ValueError(f"{len(self.prompts)} prompts but {len(self.responses)} responses")
            return self

    Rendered = Annotated[str, Field(max_length=2 * cfg.max_chars)]  # prompt and response together

    class GetRewardRequest(BaseModel):
        model_config = strict
        query: list[Rendered] = Field(min_length=1, max_length=cfg.max_prompts * cfg.max_responses,
                                      description="texts already rendered: prompt and response in one string")
        prompts: list[Rendered] | None = Field(None, description="the prompt of each query (optional)")
        labels: list[Any] | None = Field(None, description="accepted for OpenRLHF's client; not used")

        @model_validator(mode="after")
        def _aligned(self):
            if self.prompts is not None and len(self.prompts) != len(self.query):
                raise ValueError(f"{len(self.query)} queries but {len(self.prompts)} prompts")
            return self

    return RequestModels(ScoreRequest, ScoreBatchRequest, PairsRequest, GetRewardRequest)


def split_queries(query: list[str], prompts: list[str] | None) -> tuple[list[str], list[str]]:
    """OpenRLHF's (query, prompts) as (prompt, response) pairs for the plain-text rule: where a query
    starts with its (non-empty) prompt the rest is the response; else the prompt is empty (scored whole)."""
    out_p, out_r = [], []
    for i, q in enumerate(query):
        p = prompts[i] if prompts is not None else ""
        if p and q.startswith(p):
            out_p.append(p)
            out_r.append(q[len(p):])
        else:
            out_p.append("")
            out_r.append(q)
    return out_p, out_r


def _validate(model: type[BaseModel], payload: dict) -> BaseModel:
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


class ScoreResponse(BaseModel):
    rewards: list[float]
    probs: list[float]
    best: int
    truncated: list[bool]
    model_version: str


class ScoreBatchResponse(BaseModel):
    results: list[ScoreResponse]
    model_version: str


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]  # the same list: OpenRLHF versions read one key or the other
    model_version: str


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    type: str
    message: str
    fields: list[FieldError]


class ErrorResponse(BaseModel):
    error: ErrorBody


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

    def __init__(self, cfg: ServeConfig, max_length: int = 64, auth_token: str | None = None,
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
        return await self._score_request(_validate(self.models.score, {"prompt": prompt, "responses": responses}))

    async def score_batch(self, items: list[dict]) -> dict:
        return await self._score_batch_request(_validate(self.models.batch, {"items": items}))

    async def score_pairs(self, prompts: list, responses: list[str]) -> dict:
        """Flat R(x_i, y_i) for aligned lists (PPO): {"rewards", "truncated", "model_version"}."""
        req = _validate(self.models.pairs, {"prompts": prompts, "responses": responses})
        return await self._score_flat([_plain(p) for p in req.prompts], req.responses)

    async def get_reward(self, query: list[str], prompts: list[str] | None = None, labels=None) -> dict:
        """OpenRLHF's remote-RM protocol (see the module docstring)."""
        return await self._get_reward_request(_validate(self.models.get_reward, {
            "query": query, "prompts": prompts, "labels": labels}))

    # -- one implementation per request kind, shared by the handle API and HTTP

    async def _score_request(self, req) -> dict:
        version, [result] = await self._score([(_plain(req.prompt), req.responses)])
        return _result_json(result, version)

    async def _score_batch_request(self, req) -> dict:
        version, results = await self._score([(_plain(it.prompt), it.responses) for it in req.items])
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
                "max_length": self.max_length, "batching": self.batching, "load_error": self._load_error,
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

class BearerAuth:
    """ASGI middleware: 401 unless ``Authorization: Bearer <token>``, except on ``open_paths``."""

    def __init__(self, app, token: str, open_paths: frozenset[str] = OPEN_PATHS):
        self.app, self.expected, self.open_paths = app, f"Bearer {token}".encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):] or "/"
            given = dict(scope["headers"]).get(b"authorization", b"")
            if path not in self.open_paths and not hmac.compare_digest(given, self.expected):
                body = RequestError(401, "unauthorized", "missing or wrong token: send 'Authorization: Bearer <token>'",
                                    [{"field": "Authorization", "message": "missing or wrong bearer token"}])
                response = JSONResponse(body.to_json(), 401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: 413 with the service's error JSON for a body over ``limit`` bytes, judged by its
    Content-Length before anything is read, or as it streams in (chunked bodies)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _error(self) -> JSONResponse:
        e = RequestError(413, "request_too_large", f"body: over {self.limit} bytes (serve.max_request_mib)",
                         [{"field": "body", "message": f"larger than {self.limit} bytes"}])
        return JSONResponse(e.to_json(), 413)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._error()(scope, receive, send)
        seen, over = 0, False

        async def guarded_receive():
            # Past the limit the app gets an empty end of body; whatever it answers then is replaced by
            # the 413 (FastAPI would turn an exception raised here into its own 400).
            nonlocal seen, over
            if over:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message):
            if not over:
                await send(message)
            elif message["type"] == "http.response.start":
                await self._error()(scope, receive, send)

        await self.app(scope, guarded_receive, guarded_send)


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


def build_app(serve_cfg: ServeConfig, checkpoint_dir: str | Path, max_length: int = 64, *,
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
            "target_ongoing_requests": cfg.target_ongoing_requests}
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
    max_length = int(args.pop("max_length", 64))
    batching = str(args.pop("batching", "true")).lower() in ("1", "true", "yes")
    from rlhf_ray.data.chat import resolve_chat_template

    chat_template = resolve_chat_template(str(args.pop("chat_template", "auto")), "chat_template")
    cfg = load_config(None, [f"serve.{k}={v}" for k, v in args.items()]).serve
    return build_app(cfg, checkpoint, max_length, auth_token=os.environ.get(cfg.auth_token_env) or None,
                     batching=batching, chat_template=chat_template)


def service_url(serve_cfg: ServeConfig, route_prefix: str = "/") -> str:
    host = "127.0.0.1" if serve_cfg.host in ("0.0.0.0", "::", "") else serve_cfg.host
    return f"http://{host}:{serve_cfg.port}{route_prefix.rstrip('/')}"


def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    import requests

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200 and r.json().get("status") == "ok":
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except (requests.RequestException, ValueError) as e:
            last = str(e)
        time.sleep(0.2)
    raise TimeoutError(f"{url}/healthz not healthy after {timeout_s:.0f} s ({last}); if Serve was already "
                       f"running on another port, serve.start ignored this one")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_exposure(serve_cfg: ServeConfig, token: str | None) -> None:
    """Refuse to serve without a token on a host other machines reach, unless told to."""
    from rlhf_ray.config import ConfigError

    if serve_cfg.host not in LOOPBACK and not token and not serve_cfg.allow_unauthenticated:
        raise ConfigError(f"serve.host={serve_cfg.host} reaches other machines, and no bearer token is set: set "
                          f"${serve_cfg.auth_token_env} (serve.auth_token_env), or serve.allow_unauthenticated=true "
                          f"to serve it open")


def deploy_rm(serve_cfg: ServeConfig, checkpoint_dir: str | Path, max_length: int = 64, name: str = "rm", *,
              route_prefix: str = "/", batching: bool = True, timeout_s: float = 120.0, chat_template: str = "auto"):
    """Start Serve on serve_cfg.host:port (joining or starting Ray), run the RM app, wait until it
    answers /healthz; returns ``(url, handle)``. Called again with another checkpoint, it rolls the
    running app onto it without dropping requests. Auth is on when the env var
    ``serve_cfg.auth_token_env`` is set (read here, in the driver)."""
    from rlhf_ray.runtime import init_ray

    token = os.environ.get(serve_cfg.auth_token_env) or None
    check_exposure(serve_cfg, token)
    init_ray()
    app = build_app(serve_cfg, checkpoint_dir, max_length, auth_token=token, batching=batching,
                    chat_template=chat_template)
    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    handle = serve.run(app, name=name, route_prefix=route_prefix)
    url = service_url(serve_cfg, route_prefix)
    wait_healthy(url, timeout_s)
    return url, handle


def rm_service(serve_cfg: ServeConfig, checkpoint_dir: str | Path | None, max_length: int = 64,
               name: str = "rm", chat_template: str = "auto") -> tuple[str | None, object, bool]:
    """The RM as a service for a client job (PPO): the app ``name`` if it already runs on this Ray
    cluster (``rlhf-ray serve-rm``, another job), else one deployed from ``checkpoint_dir``.
    Returns ``(url or None for a running app, handle, deployed_here)``; remove what was deployed
    here with :func:`shutdown_rm`."""
    from ray.serve.schema import ApplicationStatus

    from rlhf_ray.runtime import init_ray

    init_ray()
    app = serve.status().applications.get(name)
    if app is not None and app.status == ApplicationStatus.RUNNING:
        return None, serve.get_app_handle(name), False
    if checkpoint_dir is None:
        raise ValueError(f"no Serve app {name!r} is running on this Ray cluster, and no RM checkpoint was "
                         f"given to deploy one")
    url, handle = deploy_rm(serve_cfg, checkpoint_dir, max_length, name, chat_template=chat_template)
    return url, handle, True


def shutdown_rm(name: str | None = None) -> None:
    """Delete the app ``name``, or (None) shut Serve down entirely; do this before ``ray.shutdown()``."""
    if name is None:
        serve.shutdown()
    else:
        serve.delete(name)


def serve_rm_forever(serve_cfg: ServeConfig, checkpoint_dir: str | Path, max_length: int = 64,
                     chat_template: str = "auto") -> None:
    """For ``rlhf-ray serve-rm``: deploy, print the URL, serve until Ctrl-C (or SIGTERM), shut down
    Serve, and Ray too if this call started it."""
    import signal
    import threading

    import ray
    import requests

    def stop(_signum, _frame):
        raise KeyboardInterrupt

    started_ray = not ray.is_initialized()
    try:
        url, _ = deploy_rm(serve_cfg, checkpoint_dir, max_length, chat_template=chat_template)
        if threading.current_thread() is threading.main_thread():  # after ray.init, which sets its own
            signal.signal(signal.SIGTERM, stop)  # docker stop, systemd: the same clean stop as Ctrl-C
        token = os.environ.get(serve_cfg.auth_token_env)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        version = requests.get(f"{url}/version", headers=headers, timeout=10).json().get("model_version")
        print(f"reward model {version} serving at {url}  (docs: {url}/docs; auth: "
              f"{'bearer token from $' + serve_cfg.auth_token_env if token else 'off'}); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down the reward model service", flush=True)
    finally:
        if ray.is_initialized():
            shutdown_rm()
            if started_ray:
                ray.shutdown()
