"""The one chat layer: message rules with reason codes, the one place a system prompt is applied, and the cancellable
stream every consumer (infer, API, demo) reads, exercised with a stub model so each test is fast."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from llama2_sft.data.chat import MessageError, generation_prompt, validate_messages, with_system_prompt
from llama2_sft.inference.chat import ChatGenerator, ChatPrompt, ChatStream
from llama2_sft.inference.generate import SamplingConfig

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}
SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("messages, reason", [
    ([], "empty_messages"),
    ([ASSISTANT], "first_turn_not_human"),
    ([SYSTEM, ASSISTANT], "first_turn_not_human"),
    ([USER, USER], "consecutive_same_role"),
    ([USER, ASSISTANT, ASSISTANT], "consecutive_same_role"),
    ([USER, SYSTEM], "misplaced_system"),
    ([SYSTEM], "system_only"),
    ([{"role": "bot", "content": "x"}], "unknown_role"),
    ([{"role": "user", "content": 3}], "bad_content"),
    (["hi"], "bad_message"),
])
def test_each_broken_rule_has_its_reason_code(messages, reason):
    with pytest.raises(MessageError) as error:
        validate_messages(messages)
    assert error.value.reason == reason


def test_system_prompt_leads_unless_the_messages_bring_their_own_or_it_is_blank():
    assert with_system_prompt([USER], "Be brief.") == [SYSTEM, USER]
    assert with_system_prompt([{"role": "system", "content": "mine"}, USER], "Be brief.")[0]["content"] == "mine"
    assert with_system_prompt([USER], None) == with_system_prompt([USER], "  ") == [USER]


def test_a_generation_prompt_error_names_the_callers_position_not_the_one_after_the_added_system(hf_tokenizer):
    with pytest.raises(MessageError, match=r"messages\[0\]"):
        generation_prompt(hf_tokenizer, [ASSISTANT], "Be brief.")
    with pytest.raises(MessageError, match="end with a user message"):
        generation_prompt(hf_tokenizer, [USER, ASSISTANT], "Be brief.")
    assert generation_prompt(hf_tokenizer, [USER], "Be brief.") == generation_prompt(hf_tokenizer, [SYSTEM, USER])


class StubGenerator:
    """`ChatGenerator`'s stream contract without a model: `complete` emits `pieces`, a little apart."""

    def __init__(self, pieces=("a", "b", "c"), error: Exception | None = None):
        self.lock = threading.RLock()
        self.pieces, self.error = pieces, error
        self.emitted = 0

    def complete(self, prompt, sampling, *, seed=None, on_text=None) -> dict:
        with self.lock:
            for piece in self.pieces:
                time.sleep(0.002)
                on_text(piece)
                self.emitted += 1
            if self.error is not None:
                raise self.error
            return {"text": "".join(self.pieces), "prompt_tokens": 1, "completion_tokens": len(self.pieces),
                    "finish_reason": "length"}


PROMPT = ChatPrompt(messages=[USER], ids=[1, 2], room=10)


def make_stream(stub, **kwargs) -> ChatStream:
    return ChatStream(stub, PROMPT, SamplingConfig(), **kwargs)


def test_a_stream_yields_every_piece_then_holds_the_result():
    stream = make_stream(StubGenerator())
    assert list(stream) == ["a", "b", "c"]
    assert stream.result["text"] == "abc" and not stream.cancelled


def test_leaving_a_stream_early_stops_the_generation_at_the_next_piece():
    stub = StubGenerator(pieces=tuple("x" * 500))
    with make_stream(stub) as stream:
        assert next(iter(stream)) == "x"
    assert stub.lock.acquire(timeout=10)  # the worker let go of the model
    stub.lock.release()
    assert stub.emitted < 500


def test_a_stream_cancelled_while_it_waits_for_the_model_never_starts():
    stub = StubGenerator()
    finished = threading.Event()
    with stub.lock:  # another generation holds the model
        stream = make_stream(stub, on_finish=finished.set)
        stream.cancel()
    assert list(stream) == [] and stream.cancelled and stream.result is None
    assert finished.is_set() and stub.emitted == 0


def test_a_worker_error_is_raised_to_the_reader_and_on_finish_still_runs():
    finished = threading.Event()
    stream = make_stream(StubGenerator(error=RuntimeError("boom")), on_finish=finished.set)
    with pytest.raises(RuntimeError, match="boom"):
        list(stream)
    assert finished.is_set()


def test_an_async_stream_is_read_without_blocking_the_event_loop():
    async def read() -> tuple[list[str], int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        stub = StubGenerator(pieces=tuple("abcdef"))
        pieces = [piece async for piece in ChatStream(stub, PROMPT, SamplingConfig(), loop=asyncio.get_running_loop())]
        ticker.cancel()
        return pieces, ticks

    pieces, ticks = asyncio.run(read())
    assert pieces == list("abcdef") and ticks > 6  # the loop kept running while the worker generated


def test_the_generator_answers_a_real_model_the_same_streamed_or_not(tiny_checkpoint):
    from llama2_sft.inference.load import load_model

    generator = ChatGenerator(load_model(tiny_checkpoint, "cpu", "fp32"))
    prompt = generator.prepare([USER], "Be brief.")
    assert prompt.messages == [SYSTEM, USER] and prompt.room == generator.context - len(prompt.ids)
    sampling = SamplingConfig(max_new_tokens=6)
    whole = generator.complete(prompt, sampling)
    with generator.stream(prompt, sampling) as stream:
        pieces = list(stream)
    assert stream.result == whole and "".join(pieces).strip() == whole["text"]
