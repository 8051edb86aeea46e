"""The one chat generator: messages -> a validated prompt -> a reply streamed from a worker thread, cancellable.

`infer.py`, the HTTP API and the Gradio demo all answer through `ChatGenerator`:

    generator = ChatGenerator(loaded)
    prompt = generator.prepare(messages, system_prompt)     # ValueError naming the message that breaks the order
    with generator.stream(prompt, sampling) as stream:     # `async with generator.astream(...)` in an event loop
        for piece in stream:
            ...                                            # stream.cancel() stops at the next token
    stream.result                                          # {text, prompt_tokens, completion_tokens, finish_reason}

One generation runs at a time per model (`lock`); a stream that is cancelled while it waits for the lock never
starts.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from llama2_sft.data.chat import generation_prompt, with_system_prompt
from llama2_sft.inference.generate import SamplingConfig, generate_reply


class Cancelled(Exception):
    """Raised from the token callback to abort `model.generate` once its stream is cancelled."""


@dataclass
class ChatPrompt:
    """A conversation ready to answer: the messages the model sees (system prompt included) and their ids."""

    messages: list[dict]
    ids: list[int]
    room: int  # new tokens that still fit in the model's context (<= 0: the prompt alone fills it)


class ChatGenerator:
    """Answers chats with one loaded model (a `LoadedModel`), one generation at a time."""

    def __init__(self, loaded: Any):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = next(loaded.model.parameters()).device
        self.context = int(getattr(loaded.model.config, "max_position_embeddings", 4096))
        # Reentrant: a stream's worker holds it across its cancel check and `complete`.
        self.lock = threading.RLock()

    def prepare(self, messages: Sequence[dict], system_prompt: str | None) -> ChatPrompt:
        """Validate `messages` (led by `system_prompt` unless they bring their own) and build the prompt ids."""
        ids = generation_prompt(self.tokenizer, messages, system_prompt)
        return ChatPrompt(with_system_prompt(messages, system_prompt), ids, self.context - len(ids))

    def complete(self, prompt: ChatPrompt, sampling: SamplingConfig, *, seed: int | None = None,
                 on_text: Callable[[str], None] | None = None) -> dict:
        """The reply to `prompt`, blocking: {text, prompt_tokens, completion_tokens, finish_reason}."""
        with self.lock:
            return generate_reply(self.model, self.tokenizer, prompt.ids, sampling, self.device, on_text=on_text,
                                  seed=seed)

    def stream(self, prompt: ChatPrompt, sampling: SamplingConfig, *, seed: int | None = None,
               on_finish: Callable[[], None] | None = None) -> ChatStream:
        """Start generating in a worker thread; iterate the returned stream for text pieces."""
        return ChatStream(self, prompt, sampling, seed=seed, on_finish=on_finish)

    def astream(self, prompt: ChatPrompt, sampling: SamplingConfig, *, seed: int | None = None,
                on_finish: Callable[[], None] | None = None) -> ChatStream:
        """`stream` for a running event loop: read it with `async for`; waiting never blocks the loop."""
        return ChatStream(self, prompt, sampling, seed=seed, on_finish=on_finish, loop=asyncio.get_running_loop())


class ChatStream:
    """One reply generated in a worker thread, read as text pieces (`for`, or `async for` when made by `astream`).

    `cancel()` stops the generation at its next token; leaving a `with` block or the loop early cancels too. After
    the loop, `result` holds the reply, or stays None when the stream was cancelled first (`cancelled` is then
    True); an error in the worker is raised by the loop. `on_finish` runs in the worker when it is done, whatever
    happened, so a caller's resources are freed even if nobody reads the stream to its end.
    """

    def __init__(self, generator: ChatGenerator, prompt: ChatPrompt, sampling: SamplingConfig, *,
                 seed: int | None = None, on_finish: Callable[[], None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.result: dict | None = None
        self.cancelled = False
        self._cancel = threading.Event()
        self._loop = loop
        self._events: Any = asyncio.Queue() if loop is not None else queue.Queue()
        self._worker = threading.Thread(target=self._work, args=(generator, prompt, sampling, seed, on_finish),
                                        name="chat-stream", daemon=True)
        self._worker.start()

    def cancel(self) -> None:
        """Stop the generation at its next token (or before it starts)."""
        self._cancel.set()

    def _put(self, kind: str, value: Any) -> None:
        if self._loop is None:
            self._events.put((kind, value))
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is reading any more
            pass

    def _on_text(self, piece: str) -> None:
        if self._cancel.is_set():
            raise Cancelled()
        self._put("text", piece)

    def _work(self, generator: ChatGenerator, prompt: ChatPrompt, sampling: SamplingConfig, seed: int | None,
              on_finish: Callable[[], None] | None) -> None:
        try:
            with generator.lock:
                if self._cancel.is_set():
                    raise Cancelled()
                outcome = ("done", generator.complete(prompt, sampling, seed=seed, on_text=self._on_text))
        except Cancelled:
            outcome = ("cancelled", None)
        except BaseException as error:  # noqa: BLE001 - handed to the reading thread
            outcome = ("error", error)
        finally:
            # before the end is announced: whoever has read a stream to its end sees the resources freed
            if on_finish is not None:
                on_finish()
        self._put(*outcome)

    def _settle(self, kind: str, value: Any) -> None:
        if kind == "done":
            self.result = value
        elif kind == "cancelled":
            self.cancelled = True
        else:
            raise value

    def __iter__(self) -> Iterator[str]:
        if self._loop is not None:
            raise TypeError("a stream made by astream() is read with `async for`")
        try:
            while True:
                kind, value = self._events.get()
                if kind != "text":
                    self._settle(kind, value)
                    return
                yield value
        finally:
            self.cancel()  # a no-op after the end; stops the generation when the reader leaves early

    async def _aiterate(self) -> AsyncIterator[str]:
        try:
            while True:
                kind, value = await self._events.get()
                if kind != "text":
                    self._settle(kind, value)
                    return
                yield value
        finally:
            self.cancel()

    def __aiter__(self) -> AsyncIterator[str]:
        if self._loop is None:
            raise TypeError("a stream made by stream() is read with `for`")
        return self._aiterate()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.cancel()

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.cancel()
