"""The OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions` and the legacy `POST /v1/completions`
(streaming SSE or not).

Any OpenAI client works against it (`base_url=http://HOST:PORT/v1`, `api_key=` a key from `alignloop keys
create` or /admin/keys). `model` is a registered policy/SFT version's name or `default`; `temperature`,
`top_p`, `max_tokens` (or `max_completion_tokens`), `stop`, `seed` and `stream` are honoured and usage is
counted; one extra field, `preset`, applies an L1 prompting preset (`alignloop.core.presets`; when the preset
defines an answer delimiter, the reasoning before it is left out of the reply). Errors come back in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with its status codes (400 invalid request,
401 bad key, 404 unknown model), never a traceback. Concurrent requests for one model are decoded together
(`serve.engine`), or run in llama.cpp for versions with a GGUF file (`serve.backend`); the endpoints are the same.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import Session

from alignloop.core import AlignloopError, crud, websec
from alignloop.core.http import SessionDep
from alignloop.core.models import User
from alignloop.core.presets import ReasoningFilter, apply_preset, get_preset
from serve.engine import Request as EngineRequest

router = APIRouter(prefix="/v1", tags=["openai"])
MAX_TOKENS = 4096
API_ROLES = ("reviewer", "admin")


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# In the schema, not only in a validator: clients (and the schema fuzzer) see what is accepted.
StopString = Annotated[str, Field(min_length=1, max_length=100)]
Stops = StopString | Annotated[list[StopString], Field(max_length=4)] | None


def _stop_list(value) -> list[str]:
    """At most 4 non-empty strings of at most 100 characters (the schema checks it), as a list."""
    return [value] if isinstance(value, str) else (value or [])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class SamplingRequest(BaseModel):
    """What chat and text completions share: the model, sampling, stops, streaming."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=200)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: Stops = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        return _stop_list(value)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    preset: str | None = Field(default=None, max_length=80, description="alignloop: an L1 prompting preset")

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, value):
        if value[-1].role != "user":
            raise ValueError("the last message must be the user's")
        return value


OnePrompt = Annotated[str, Field(min_length=1, max_length=100_000)]


class CompletionRequest(SamplingRequest):
    """The legacy text completion: the prompt is continued as written, no chat template."""

    # The schema says what the validator enforces (one non-empty prompt), so clients and fuzzers see the rule.
    prompt: OnePrompt | Annotated[list[OnePrompt], Field(min_length=1, max_length=1)] = Field(
        description="one prompt (a list of one is accepted; batches are not supported)"
    )
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_TOKENS)  # OpenAI's default for this endpoint

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        return value if isinstance(value, str) else value[0]


# OpenAI's response shapes, as much of them as alignloop fills in (the official client parses these).
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str  # stop | length | cancelled
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "with `stream: true`: chunks as SSE"}}


# --- auth ----------------------------------------------------------------------------------------------------


def api_user(request: Request, session: SessionDep) -> User:
    """A Bearer API key, or the browser's login session; a reviewer's or an admin's, like /chat (annotators
    label, they do not get a model to query: it would let them have a model write their rationales)."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        user = crud.user_for_api_key(session, key=header[7:].strip())
    else:
        user = websec.session_user(session, request)
    session.commit()  # end the read: no transaction held across the thread hop
    if user is None:
        raise OpenAIError(
            401,
            "Incorrect or missing API key: pass `Authorization: Bearer <key>` (alignloop keys create)",
            type="authentication_error",
            code="invalid_api_key",
        )
    if user.role not in API_ROLES:
        raise OpenAIError(
            403,
            f"the /v1 API is for the roles {' and '.join(API_ROLES)}; this key's user is an {user.role}",
            type="permission_error",
            code="insufficient_role",
        )
    return user


ApiUser = Annotated[User, Depends(api_user)]


def model_ref(session: Session, name: str, default_policy: str) -> str:
    if name == "default":
        return default_policy
    version = crud.get_model_version(session, name=name)
    if version is None or version.kind not in crud.SERVABLE_KINDS:
        raise OpenAIError(
            404,
            f"The model '{name}' does not exist (GET /v1/models lists them)",
            code="model_not_found",
            param="model",
        )
    return name


# --- endpoints -----------------------------------------------------------------------------------------------


@router.get("/models", response_model=ModelList)
def list_models(user: ApiUser, session: SessionDep) -> dict:
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "alignloop"}
            for n in crud.servable_models(session)
        ],
    }


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request, user: ApiUser, session: SessionDep):
    state = request.app.state
    ref = model_ref(session, body.model, state.settings.default_policy)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    delimiter = None  # a preset's reasoning delimiter: the client gets only the answer after it
    if body.preset:
        try:
            preset = get_preset(session, body.preset)
            messages, delimiter = apply_preset(preset, messages), preset.answer_delimiter
        except AlignloopError as exc:
            raise OpenAIError(400, str(exc), param="preset") from None
    session.commit()
    job, events = await _start(
        state,
        ref,
        body,
        lambda engine: engine.render(messages),
        body.max_completion_tokens or body.max_tokens,
    )
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _sse(events, job, completion_id, created, body.model, include_usage, ReasoningFilter(delimiter)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store"},
        )
    text, finish, usage = await _collect(events, job)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _visible(text, delimiter)},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": _total(usage),
    }


@router.post("/completions", response_model=TextCompletion, responses=STREAMED)
async def completions(body: CompletionRequest, request: Request, user: ApiUser, session: SessionDep):
    """The legacy completions endpoint: `prompt` is continued as written (no chat template)."""
    state = request.app.state
    ref = model_ref(session, body.model, state.settings.default_policy)
    session.commit()
    job, events = await _start(state, ref, body, lambda engine: engine.encode(body.prompt), body.max_tokens)
    completion_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(text: str, finish: str | None = None) -> dict:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        }

    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def stream():
            try:
                while True:
                    event = await events.get()
                    if event[0] == "text":
                        yield f"data: {json.dumps(chunk(event[1]))}\n\n"
                    elif event[0] == "error":
                        failed = {"error": {"message": "generation failed", "type": "server_error"}}
                        yield f"data: {json.dumps(failed)}\n\n"
                        break
                    else:
                        _, finish, usage = event
                        yield f"data: {json.dumps(chunk('', _finish(finish)))}\n\n"
                        if include_usage:
                            yield f"data: {json.dumps({**chunk(''), 'choices': [], 'usage': _total(usage)})}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )
    text, finish, usage = await _collect(events, job)
    return {**chunk(text, finish), "usage": _total(usage)}


async def _start(state, ref: str, body, prompt_of, asked: int | None) -> tuple[EngineRequest, asyncio.Queue]:
    """Load the model (whichever backend serves it), tokenize the prompt, check it fits, submit the request;
    returns it and the queue its events arrive on."""
    try:
        engine = await run_in_threadpool(state.model_pool.get, ref)
    except AlignloopError as exc:
        raise OpenAIError(
            500, f"model {body.model!r} could not be loaded: {exc}", type="server_error"
        ) from None
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    prompt_ids = await run_in_threadpool(prompt_of, engine)
    max_tokens = asked or MAX_TOKENS // 8
    context = engine.context_length
    if context is not None:
        # OpenAI's own answer to an over-long request; the engine would otherwise decode past the positions the
        # model knows. Without an explicit max_tokens the reply may use whatever room the prompt leaves.
        max_tokens = asked or max(1, min(max_tokens, context - len(prompt_ids)))
        if len(prompt_ids) + max_tokens > context:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or "
                "completion.",
                param="messages",
                code="context_length_exceeded",
            )
    job = EngineRequest(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop or [],
        seed=body.seed,
        emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
    )
    engine.submit(job)
    return job, events


async def _collect(events: asyncio.Queue, job: EngineRequest) -> tuple[str, str, dict]:
    """A whole reply: (text, finish_reason, usage)."""
    parts, finish, usage = [], "stop", {}
    try:
        while True:
            event = await events.get()
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "error":
                raise OpenAIError(500, "generation failed", type="server_error")
            else:
                _, finish, usage = event
                break
    finally:
        job.cancelled.set()
    return "".join(parts), finish, usage


def _total(usage: dict) -> dict:
    return {**usage, "total_tokens": usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)}


def _finish(finish: str) -> str:
    return "length" if finish == "length" else "stop"


def _visible(text: str, delimiter: str | None) -> str:
    shown = ReasoningFilter(delimiter)
    return shown.feed(text) + shown.flush()


async def _sse(
    events: asyncio.Queue,
    job: EngineRequest,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    shown: ReasoningFilter,
):
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if usage is not None:
            body = {**body, "choices": [], "usage": usage}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if event[0] == "text":
                if piece := shown.feed(event[1]):
                    yield chunk({"content": piece})
            elif event[0] == "error":
                yield f"data: {json.dumps({'error': {'message': 'generation failed', 'type': 'server_error'}})}\n\n"
                break
            else:
                _, finish, usage = event
                if rest := shown.flush():  # a reply that never wrote the delimiter is shown whole
                    yield chunk({"content": rest})
                yield chunk({}, finish=_finish(finish))
                if include_usage:
                    total = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
                    yield chunk({}, usage={**usage, "total_tokens": total})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that hangs up frees its row in the batch


# --- wiring --------------------------------------------------------------------------------------------------


def install(app: FastAPI) -> None:
    """The router plus OpenAI-shaped errors for every /v1 path (validation, auth, unknown routes)."""
    app.include_router(router)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return exc.response()

    previous_validation = app.exception_handlers.get(RequestValidationError)
    previous_http = app.exception_handlers.get(HTTPException)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        if not request.url.path.startswith("/v1/"):
            from fastapi.exception_handlers import request_validation_exception_handler

            return await (previous_validation or request_validation_exception_handler)(request, exc)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg", "invalid request"))
        return OpenAIError(400, message, param=where, code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if not request.url.path.startswith("/v1/"):
            from fastapi.exception_handlers import http_exception_handler

            return await (previous_http or http_exception_handler)(request, exc)
        kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return OpenAIError(exc.status_code, str(exc.detail), type=kind).response()
