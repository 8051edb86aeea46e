"""HTTP API over one loaded model (FastAPI).

- POST /                      the original contract: {"prompt", "history": [[q, a], ...], "max_length"?, "top_p"?,
                              "temperature"?} -> {"response", "history", "status": 200, "time"}; sampling honoured.
- POST /v1/chat/completions   OpenAI-compatible (messages, temperature, top_p, max_tokens, stop, stream via SSE).
- GET  /v1/models, GET /health

Generation runs in a worker thread (the event loop never blocks), one request at a time; at most `max_queue` requests
wait, the next gets 429. A streaming client that disconnects stops its generation and frees its slot. Prompts are
built by encode_dialog, exactly as in training. With an API key set, every route but /health requires it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from llama2_sft.data.chat import generation_prompt, validate_messages
from llama2_sft.inference.generate import SamplingConfig, chat_reply


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


class Cancelled(Exception):
    """The client went away: generation stops."""


class _Engine:
    """Runs generations one at a time in worker threads and counts the requests admitted."""

    def __init__(self, loaded: Any, settings: ServeSettings):
        self.loaded = loaded
        self.settings = settings
        self.device = next(loaded.model.parameters()).device
        self.lock = threading.Lock()
        self.admitted = 0
        self.admit_lock = threading.Lock()
        self.context = int(getattr(loaded.model.config, "max_position_embeddings", 4096))

    def admit(self) -> None:
        with self.admit_lock:
            if self.admitted >= self.settings.max_queue:
                raise HTTPException(status_code=429, detail=f"server busy: {self.admitted} requests in flight",
                                    headers={"Retry-After": "1"})
            self.admitted += 1

    def release(self) -> None:
        with self.admit_lock:
            self.admitted -= 1

    def prepare(self, messages: list[dict], max_tokens: int | None) -> tuple[list[dict], int]:
        """Validate a conversation and its budget; 400 with a message when it cannot be answered."""
        if self.settings.system_prompt and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.settings.system_prompt}, *messages]
        try:
            validate_messages(messages)
            prompt = generation_prompt(self.loaded.tokenizer, messages)
        except ValueError as error:
            raise HTTPException(status_code=400, detail=str(error)) from error
        limit = self.settings.max_new_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise HTTPException(status_code=400, detail=f"max_tokens={max_tokens} exceeds this server's limit {limit}")
        budget = max_tokens or self.settings.default_max_new_tokens
        room = self.context - len(prompt)
        if room < 1:
            raise HTTPException(status_code=400, detail=f"prompt is {len(prompt)} tokens; the model's context is {self.context}")
        return messages, min(budget, room)

    def generate(self, messages: list[dict], sampling: SamplingConfig, seed: int | None, stops: list[str],
                 on_text=None, cancelled: threading.Event | None = None) -> dict:
        """Blocking generation (call from a worker thread); stops at EOS, a stop string, or cancellation."""
        emitted: list[str] = []

        def on_piece(piece: str) -> None:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled()
            emitted.append(piece)
            if on_text is not None:
                on_text(piece)

        with self.lock:
            result = chat_reply(self.loaded.model, self.loaded.tokenizer, messages, sampling, self.device,
                                on_text=on_piece if (on_text is not None or cancelled is not None) else None, seed=seed)
        text = result["text"]
        for stop in stops:
            if stop and stop in text:
                text = text[: text.index(stop)]
                result["finish_reason"] = "stop"
        result["text"] = text
        return result


def create_app(loaded: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app for one loaded model (see module docstring)."""
    settings = settings or ServeSettings()
    engine = _Engine(loaded, settings)
    app = FastAPI(title="llama2_sft", version="1")
    app.state.engine = engine

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {settings.api_key}" and request.headers.get("x-api-key") != settings.api_key:
            raise HTTPException(status_code=401, detail="missing or wrong API key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "in_flight": engine.admitted}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "llama2_sft"}]}

    @app.post("/", dependencies=[Depends(check_key)])
    async def legacy(body: LegacyRequest) -> dict:
        history = body.history or []
        messages = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        messages.append({"role": "user", "content": body.prompt})
        messages, budget = engine.prepare(messages, body.max_length)
        sampling = SamplingConfig(max_new_tokens=budget, temperature=body.temperature, top_p=body.top_p)
        engine.admit()
        try:
            result = await asyncio.to_thread(engine.generate, messages, sampling, None, [])
        finally:
            engine.release()
        return {"response": result["text"], "history": [*[list(h) for h in history], [body.prompt, result["text"]]],
                "status": 200, "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages, budget = engine.prepare([m.model_dump() for m in body.messages], body.max_tokens)
        sampling = SamplingConfig(max_new_tokens=budget, temperature=body.temperature, top_p=body.top_p)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        engine.admit()
        if not body.stream:
            try:
                result = await asyncio.to_thread(engine.generate, messages, sampling, body.seed, stops)
            finally:
                engine.release()
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"]}],
                "usage": {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                          "total_tokens": result["prompt_tokens"] + result["completion_tokens"]},
            }
        return StreamingResponse(_stream(engine, request, messages, sampling, body.seed, stops, completion_id, created,
                                         settings.model_name), media_type="text/event-stream")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": {"message": error.detail, "code": error.status_code}}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    return app


async def _stream(engine: _Engine, request: Request, messages, sampling, seed, stops, completion_id, created, model_name):
    """SSE chunks as text arrives; `data: [DONE]` at the end. A disconnect cancels the generation."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def work() -> None:
        try:
            result = engine.generate(messages, sampling, seed, stops,
                                     on_text=lambda piece: loop.call_soon_threadsafe(queue.put_nowait, ("text", piece)),
                                     cancelled=cancelled)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
        except Cancelled:
            loop.call_soon_threadsafe(queue.put_nowait, ("cancelled", None))
        except Exception as error:  # noqa: BLE001 - reported to the client as an error event
            loop.call_soon_threadsafe(queue.put_nowait, ("error", str(error)))
        finally:
            engine.release()  # here, not in the response: the slot is freed even if the response is never closed

    async def watch_disconnect() -> None:
        # Starlette does not tell a streaming body that its client left; poll for it and stop the generation.
        while not cancelled.is_set():
            if await request.is_disconnected():
                cancelled.set()
                return
            await asyncio.sleep(0.2)

    worker = loop.run_in_executor(None, work)
    watcher = asyncio.create_task(watch_disconnect())
    sent = ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "text":
                # hold back text that may be the start of a stop string; never send past one
                sent_candidate = sent + value
                cut = min((sent_candidate.index(s) for s in stops if s and s in sent_candidate), default=None)
                if cut is not None:
                    if cut > len(sent):
                        yield chunk({"content": sent_candidate[len(sent):cut]})
                    sent = sent_candidate[:cut]
                    cancelled.set()  # enough: stop generating
                    continue
                yield chunk({"content": value})
                sent = sent_candidate
            elif kind == "done":
                usage = {"prompt_tokens": value["prompt_tokens"], "completion_tokens": value["completion_tokens"],
                         "total_tokens": value["prompt_tokens"] + value["completion_tokens"]}
                yield chunk({}, value["finish_reason"], usage)
                break
            elif kind == "cancelled":
                yield chunk({}, "stop")
                break
            else:
                yield f"data: {json.dumps({'error': {'message': value}})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()  # client gone (or finished): stop the generation; the worker frees the slot
        watcher.cancel()
