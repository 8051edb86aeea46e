"""HTTP API over one loaded model (FastAPI).

- POST /                      the original contract: {"prompt", "history": [[q, a], ...], "max_length"?, "top_p"?,
                              "temperature"?} -> {"response", "history", "status": 200, "time"}; sampling honoured.
- POST /v1/chat/completions   OpenAI-compatible (messages, temperature, top_p, max_tokens, stop, stream via SSE).
- GET  /v1/models, GET /health

Every answer comes from the one chat generator (`llama2_sft.inference.chat`): generation runs in a worker thread
(the event loop never blocks), one request at a time; at most `max_queue` requests wait, the next gets 429. A
streaming client that disconnects stops its generation and frees its slot. Prompts are built by encode_dialog,
exactly as in training. With an API key set, every route but /health requires it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from llama2_sft.inference.chat import ChatGenerator, ChatPrompt, ChatStream
from llama2_sft.inference.generate import SamplingConfig


@dataclass
class ServeSettings:
    """Limits and identity of the server."""

    model_name: str = "llama2_sft"
    max_queue: int = 8  # requests waiting or running; one more gets 429
    max_new_tokens_limit: int = 2048
    default_max_new_tokens: int = 512
    api_key: str | None = None
    system_prompt: str | None = None  # added when a request has no system message (what training used)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None


class LegacyRequest(BaseModel):
    prompt: str = Field(min_length=1)
    history: list[tuple[str, str]] | None = None
    max_length: int | None = Field(default=None, ge=1)  # the original's knob: here, new tokens at most
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)


class _ChatService:
    """The chat generator behind the routes, plus admission: counts the requests in flight against `max_queue`."""

    def __init__(self, loaded: Any, settings: ServeSettings):
        self.settings = settings
        self.generator = ChatGenerator(loaded)
        self.lock = self.generator.lock  # held while a generation runs
        self.admitted = 0
        self.admit_lock = threading.Lock()

    def admit(self) -> None:
        with self.admit_lock:
            if self.admitted >= self.settings.max_queue:
                raise HTTPException(status_code=429, detail=f"server busy: {self.admitted} requests in flight",
                                    headers={"Retry-After": "1"})
            self.admitted += 1

    def release(self) -> None:
        with self.admit_lock:
            self.admitted -= 1

    def prepare(self, messages: list[dict], max_tokens: int | None) -> tuple[ChatPrompt, int]:
        """The prompt and its new-token budget; 400 with a message when the request cannot be answered."""
        limit = self.settings.max_new_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise HTTPException(status_code=400, detail=f"max_tokens={max_tokens} exceeds this server's limit {limit}")
        try:
            prompt = self.generator.prepare(messages, self.settings.system_prompt)
        except ValueError as error:
            raise HTTPException(status_code=400, detail=str(error)) from error
        if prompt.room < 1:
            raise HTTPException(status_code=400,
                                detail=f"prompt is {len(prompt.ids)} tokens; the model's context is {self.generator.context}")
        return prompt, min(max_tokens or self.settings.default_max_new_tokens, prompt.room)

    def start(self, prompt: ChatPrompt, sampling: SamplingConfig, seed: int | None) -> ChatStream:
        """Generate in a worker thread (call after `admit`): the slot is freed by the worker when it ends."""
        return self.generator.astream(prompt, sampling, seed=seed, on_finish=self.release)

    async def reply(self, prompt: ChatPrompt, sampling: SamplingConfig, seed: int | None, stops: list[str]) -> dict:
        """The whole reply (call after `admit`), cut at the first stop string."""
        stream = self.start(prompt, sampling, seed)
        async for _ in stream:
            pass
        result = dict(stream.result)
        cut = min((result["text"].index(stop) for stop in stops if stop and stop in result["text"]), default=None)
        if cut is not None:  # at the earliest stop string, as the stream cuts
            result["text"] = result["text"][:cut]
            result["finish_reason"] = "stop"
        return result


def create_app(loaded: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app for one loaded model (see module docstring)."""
    settings = settings or ServeSettings()
    service = _ChatService(loaded, settings)
    app = FastAPI(title="llama2_sft", version="1")
    app.add_middleware(_FormBodyAsJson)
    app.state.service = service

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {settings.api_key}" and request.headers.get("x-api-key") != settings.api_key:
            raise HTTPException(status_code=401, detail="missing or wrong API key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "in_flight": service.admitted}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "llama2_sft"}]}

    @app.post("/", dependencies=[Depends(check_key)])
    async def legacy(body: LegacyRequest) -> dict:
        history = body.history or []
        messages = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        messages.append({"role": "user", "content": body.prompt})
        prompt, budget = service.prepare(messages, body.max_length)
        sampling = SamplingConfig(max_new_tokens=budget, temperature=body.temperature, top_p=body.top_p)
        service.admit()
        result = await service.reply(prompt, sampling, None, [])
        return {"response": result["text"], "history": [*[list(h) for h in history], [body.prompt, result["text"]]],
                "status": 200, "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        prompt, budget = service.prepare([m.model_dump() for m in body.messages], body.max_tokens)
        sampling = SamplingConfig(max_new_tokens=budget, temperature=body.temperature, top_p=body.top_p)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        service.admit()
        if not body.stream:
            result = await service.reply(prompt, sampling, body.seed, stops)
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"]}],
                "usage": {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                          "total_tokens": result["prompt_tokens"] + result["completion_tokens"]},
            }
        stream = service.start(prompt, sampling, body.seed)
        return StreamingResponse(_sse(stream, request, stops, completion_id, created, settings.model_name),
                                 media_type="text/event-stream")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": {"message": error.detail, "code": error.status_code}}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    return app


class _FormBodyAsJson:
    """`curl URL -d '{...}'` sends its JSON as `application/x-www-form-urlencoded`, which FastAPI would not parse: every
    route here takes JSON only, so such a POST body is read as JSON (a body that is not JSON still gets its 4xx)."""

    FORM = b"application/x-www-form-urlencoded"

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = scope["headers"]
            if any(name == b"content-type" and value.split(b";")[0].strip().lower() == self.FORM
                   for name, value in headers):
                scope = dict(scope, headers=[(name, b"application/json" if name == b"content-type" else value)
                                             for name, value in headers])
        await self.app(scope, receive, send)


async def _sse(stream: ChatStream, request: Request, stops: list[str], completion_id: str, created: int,
               model_name: str) -> AsyncIterator[str]:
    """SSE chunks as text arrives; `data: [DONE]` at the end. A disconnect or a stop string cancels the generation."""

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def watch_disconnect() -> None:
        # Starlette does not tell a streaming body that its client left; poll for it and stop the generation.
        while True:
            if await request.is_disconnected():
                stream.cancel()
                return
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch_disconnect())
    text, sent = "", 0  # the reply so far, and how much of it was sent
    stopped = False  # a stop string was reached: nothing after it is sent
    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for piece in stream:
                if stopped:
                    continue
                text += piece
                cut = min((text.index(s) for s in stops if s and s in text), default=None)
                if cut is not None:  # nothing from the first stop string on is sent
                    if cut > sent:
                        yield chunk({"content": text[sent:cut]})
                    stopped = True
                    stream.cancel()  # enough: stop generating, then read on to the end of the stream
                    continue
                ready = len(text) - _stop_prefix_length(text, stops)  # a stop string may be starting: hold it back
                if ready > sent:
                    yield chunk({"content": text[sent:ready]})
                    sent = ready
            if not stopped and len(text) > sent:
                yield chunk({"content": text[sent:]})
        except Exception as error:  # noqa: BLE001 - reported to the client as an error event
            yield f"data: {json.dumps({'error': {'message': str(error)}})}\n\n"
        else:
            result = stream.result
            if result is None:  # cancelled before the end
                yield chunk({}, "stop")
            else:
                usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                         "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
                yield chunk({}, "stop" if stopped else result["finish_reason"], usage)
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()  # client gone (or finished): stop the generation; the worker frees the slot
        watcher.cancel()


def _stop_prefix_length(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that is the start of a stop string (0 when none)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
