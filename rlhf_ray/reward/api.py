"""The reward-model service's HTTP contract: request and response schemas (pydantic, sized by
ServeConfig), the error type and its JSON body, and the ASGI middleware for bearer tokens and request
size. The routes themselves are in ``rlhf_ray.reward.serve`` (its docstring is the API reference)."""

import hmac
from typing import Annotated, Any, NamedTuple, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from rlhf_ray.config import ServeConfig


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


def plain_prompt(prompt):
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


def validate_request(model: type[BaseModel], payload: dict) -> BaseModel:
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


# ----------------------------------------------------------------------------- HTTP middleware

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
