"""The OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions` (streaming SSE or not).

Any OpenAI client works against it (`base_url=http://HOST:PORT/v1`, `api_key=` a key from `alignloop keys
create` or /admin/keys). `model` is a registered policy/SFT version's name or `default`; `temperature`,
`top_p`, `max_tokens` (or `max_completion_tokens`), `stop`, `seed` and `stream` are honoured and usage is
counted; one extra field, `preset`, applies an L1 prompting preset (`serve.prompting`). Errors come back in
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with its status codes (400 invalid request,
401 bad key, 404 unknown model), never a traceback. Concurrent requests for one model are decoded together
(`serve.engine`).
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

from alignloop.core import AlignloopError, crud
from alignloop.core.http import SessionDep
from alignloop.core.models import User
from serve.engine import Request as EngineRequest

router = APIRouter(prefix="/v1", tags=["openai"])
SERVABLE_KINDS = ("policy", "sft")
MAX_TOKENS = 4096


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    seed: int | None = None
    preset: str | None = Field(default=None, max_length=80, description="alignloop: an L1 prompting preset")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s or len(s) > 100 for s in stops):
            raise ValueError("stop: at most 4 non-empty strings of at most 100 characters")
        return stops

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, value):
        if value[-1].role != "user":
            raise ValueError("the last message must be the user's")
        return value


# --- auth ----------------------------------------------------------------------------------------------------


def api_user(request: Request, session: SessionDep) -> User:
    """A Bearer API key, or the browser's login session."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        user = crud.user_for_api_key(session, key=header[7:].strip())
    else:
        user_id = request.session.get("user_id")
        user = session.get(User, user_id) if user_id is not None else None
        user = None if user is None or user.disabled else user
    session.commit()  # end the read: no transaction held across the thread hop
    if user is None:
        raise OpenAIError(401, "Incorrect or missing API key: pass `Authorization: Bearer <key>` (alignloop keys "
                          "create)", type="authentication_error", code="invalid_api_key")  # fmt: skip
    return user


ApiUser = Annotated[User, Depends(api_user)]


def servable_models(session: Session) -> list[str]:
    return ["default"] + [v.name for v in crud.list_model_versions(session) if v.kind in SERVABLE_KINDS]


def model_ref(session: Session, name: str, default_policy: str) -> str:
    if name == "default":
        return default_policy
    version = crud.get_model_version(session, name=name)
    if version is None or version.kind not in SERVABLE_KINDS:
        raise OpenAIError(404, f"The model '{name}' does not exist (GET /v1/models lists them)",
                          code="model_not_found", param="model")  # fmt: skip
    return name


# --- endpoints -----------------------------------------------------------------------------------------------


@router.get("/models")
def list_models(user: ApiUser, session: SessionDep) -> dict:
    created = int(time.time())
    return {"object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "alignloop"}
                     for n in servable_models(session)]}  # fmt: skip


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, user: ApiUser, session: SessionDep):
    state = request.app.state
    ref = model_ref(session, body.model, state.settings.default_policy)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    if body.preset:
        from alignloop.core.presets import apply_preset, get_preset

        try:
            messages = apply_preset(get_preset(session, body.preset), messages)
        except AlignloopError as exc:
            raise OpenAIError(400, str(exc), param="preset") from None
    session.commit()
    try:
        engine = await run_in_threadpool(state.model_pool.get, ref)
    except AlignloopError as exc:
        raise OpenAIError(
            500, f"model {body.model!r} could not be loaded: {exc}", type="server_error"
        ) from None
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    prompt_ids = engine.render(messages)
    job = EngineRequest(
        prompt_ids=prompt_ids, max_tokens=body.max_completion_tokens or body.max_tokens or MAX_TOKENS // 8,
        temperature=body.temperature, top_p=body.top_p, stop=body.stop or [], seed=body.seed,
        emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
    )  # fmt: skip
    engine.submit(job)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(events, job, completion_id, created, body.model, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-store"})  # fmt: skip
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
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                     "finish_reason": finish, "logprobs": None}],
        "usage": {**usage, "total_tokens": usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)},
    }  # fmt: skip


async def _sse(events: asyncio.Queue, job: EngineRequest, completion_id: str, created: int, model: str,
               include_usage: bool):  # fmt: skip
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}  # fmt: skip
        if usage is not None:
            body = {**body, "choices": [], "usage": usage}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if event[0] == "text":
                yield chunk({"content": event[1]})
            elif event[0] == "error":
                yield f"data: {json.dumps({'error': {'message': 'generation failed', 'type': 'server_error'}})}\n\n"
                break
            else:
                _, finish, usage = event
                yield chunk({}, finish="length" if finish == "length" else "stop")
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
