"""Loss curves from metrics.jsonl: the series a picture is drawn from, and the picture itself."""

from __future__ import annotations

import json

import pytest

from llama2_sft.plot import main, plot_runs, read_metrics


def write_run(path, records, tail=""):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return str(path)


RECORDS = [{"step": 0, "eval_loss": 7.0}, {"step": 1, "loss": 5.0, "lr": 1e-3, "tokens_per_s": 100.0},
           {"step": 2, "loss": 4.0, "lr": 9e-4, "tokens_per_s": 110.0},
           {"step": 2, "loss": 3.5, "lr": 9e-4, "tokens_per_s": 120.0},  # re-run after a crash: the last one counts
           {"step": 2, "eval_loss": 3.0, "eval_accuracy": 0.25}]


def test_series_keep_the_last_record_of_a_step_and_a_torn_last_line_is_ignored(tmp_path):
    run = write_run(tmp_path / "run", RECORDS, tail='{"step": 3, "lo')
    series = read_metrics(run)
    assert series["loss"] == [(1, 5.0), (2, 3.5)]
    assert series["eval_loss"] == [(0, 7.0), (2, 3.0)] and series["eval_accuracy"] == [(2, 0.25)]
    assert series["tokens_per_s"] == [(1, 100.0), (2, 120.0)]


def test_a_broken_line_inside_the_file_is_an_error_naming_file_and_line(tmp_path):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        read_metrics(str(run))
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_metrics(str(tmp_path / "missing"))


def test_several_runs_are_drawn_into_one_png(tmp_path):
    a = write_run(tmp_path / "a", RECORDS)
    b = write_run(tmp_path / "b", [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "tokens_per_s": 50.0} for s in range(1, 5)])
    out = tmp_path / "figs" / "compare.png"
    assert main([a, b, f"out={out}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert plot_runs({"a": read_metrics(a)}, str(tmp_path / "one.png")).endswith("one.png")


def test_a_mixs_per_source_eval_losses_are_read_and_drawn_and_its_count_dicts_ignored(tmp_path):
    records = [{"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0, "source_samples": {"chat": 3, "zh": 1}},
               {"step": 1, "eval_loss": 1.5, "eval_loss/chat": 1.0, "eval_loss/zh": 3.0},
               {"step": 2, "eval_loss": 1.25, "eval_loss/chat": 0.75, "eval_loss/zh": 2.5}]
    run = write_run(tmp_path / "mix", records)
    series = read_metrics(run)
    assert series["eval_loss/chat"] == [(1, 1.0), (2, 0.75)] and series["eval_loss/zh"] == [(1, 3.0), (2, 2.5)]
    assert not any(key.startswith("source_") for key in series)
    assert main([run]) == 0 and (tmp_path / "mix" / "curves.png").stat().st_size > 10_000
