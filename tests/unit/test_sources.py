"""ShareGPT rows -> messages: every bad-row class is skipped for a named reason; loading errors name the file."""

from __future__ import annotations

import pytest

from llama2_sft.data.sources import load_rows, resolve_system_prompt, row_to_messages, source_identity
from tests.conftest import make_row

GOOD = make_row("ok", [("human", "hi"), ("gpt", "hello")])


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"id": "a", "instruction": ""}, "missing_conversations"),
        ({"id": "a", "conversations": None}, "missing_conversations"),
        (make_row("a", []), "empty_conversations"),
        ({"id": "a", "conversations": ["hi"]}, "bad_turn"),
        ({"id": "a", "conversations": [{"from": "human"}]}, "bad_turn"),
        (make_row("a", [("robot", "hi"), ("gpt", "x")]), "unknown_role"),
        (make_row("a", [("human", "hi"), ("gpt", "")]), "bad_value"),
        (make_row("a", [("human", "   "), ("gpt", "x")]), "bad_value"),
        ({"id": "a", "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]}, "bad_value"),
        (make_row("a", [("gpt", "hi"), ("human", "x"), ("gpt", "y")]), "first_turn_not_human"),
        (make_row("a", [("human", "a"), ("human", "b"), ("gpt", "c")]), "consecutive_same_role"),
        (make_row("a", [("human", "a"), ("gpt", "b"), ("gpt", "c")]), "consecutive_same_role"),
        (make_row("a", [("human", "a"), ("system", "s"), ("gpt", "c")]), "misplaced_system"),
        (make_row("a", [("human", "only a question")]), "no_assistant_turn"),
        ({"id": "a", "conversations": GOOD["conversations"], "instruction": 7}, "bad_instruction"),
    ],
)
def test_untrainable_row_is_skipped_with_its_reason(row, reason):
    messages, got = row_to_messages(row, None)
    assert messages is None and got == reason


def test_human_gpt_become_user_assistant_and_instruction_becomes_system():
    row = make_row("x", [("human", "q1"), ("gpt", "a1"), ("human", "q2"), ("gpt", "a2")], instruction="be brief")
    messages, reason = row_to_messages(row, "default text")
    assert reason is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "be brief"


def test_empty_instruction_gets_the_configured_default_system_prompt_or_none():
    messages, _ = row_to_messages(GOOD, resolve_system_prompt("meta"))
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("You are a helpful, respectful")
    assert not messages[0]["content"].startswith(" ")
    messages, _ = row_to_messages(GOOD, resolve_system_prompt("none"))
    assert messages[0]["role"] == "user"
    messages, _ = row_to_messages(GOOD, resolve_system_prompt("Be terse."))
    assert messages[0]["content"] == "Be terse."


def test_openai_style_roles_and_a_leading_system_turn_are_accepted():
    row = make_row("x", [("system", "sys"), ("user", "q"), ("assistant", "a")], instruction="ignored")
    messages, reason = row_to_messages(row, "default")
    assert reason is None and messages[0] == {"role": "system", "content": "sys"} and len(messages) == 3


def test_trailing_unanswered_user_turn_is_dropped_not_the_row():
    row = make_row("x", [("human", "q1"), ("gpt", "a1"), ("human", "q2")])
    messages, reason = row_to_messages(row, None)
    assert reason is None and [m["role"] for m in messages] == ["user", "assistant"]


def test_jsonl_parquet_glob_and_directory_sources_load_the_same_rows(tmp_path, write_jsonl):
    import datasets

    rows = [make_row(str(i), [("human", f"q{i}"), ("gpt", f"a{i}")]) for i in range(5)]
    jsonl = write_jsonl(rows, "part-0.jsonl")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for source in (jsonl, str(tmp_path / "p.parquet"), str(tmp_path / "part-*.jsonl"), str(tmp_path / "saved")):
        loaded = load_rows(source)
        assert sorted(loaded["id"]) == [str(i) for i in range(5)], source


def test_invalid_json_line_error_names_the_file_and_line(write_jsonl):
    path = write_jsonl([GOOD, GOOD, '{"id": "broken", "conversations": [', GOOD])
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: invalid JSON"):
        load_rows(path)


def test_missing_file_and_empty_glob_are_named(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="glob matches no file"):
        load_rows(str(tmp_path / "*.parquet"))


def test_truncated_parquet_file_is_named(tmp_path):
    import datasets

    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([GOOD] * 50).to_parquet(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="bad.parquet"):
        load_rows(str(path))


def test_source_identity_changes_when_a_file_changes(write_jsonl):
    path = write_jsonl([GOOD])
    before = source_identity(path)
    write_jsonl([GOOD, GOOD])
    assert source_identity(path) != before
    assert source_identity("some-org/some-dataset", "abc") == {"sources": [{"hub": "some-org/some-dataset", "revision": "abc"}]}
