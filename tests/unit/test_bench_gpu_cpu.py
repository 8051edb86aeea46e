"""CPU check of experiments/bench_gpu.py: its step function runs every CPU-capable variant (tiny shape, 2 steps each)
and reports finite figures; the loss variants agree; the FLOP accounting matches the PaLM formula for Llama-2-7B.
No timing assertions."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import bench_gpu  # noqa: E402

CPU = torch.device("cpu")
SEQ = 96


@pytest.fixture(scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def group(one_thread):
    with bench_gpu.one_rank_group(CPU):
        yield


@pytest.fixture(scope="module")
def batches():
    return bench_gpu.packed_batches(2, 1, SEQ, bench_gpu.PRESETS["tiny"]["vocab_size"], seed=0, mean_len=24)


def cpu_variants() -> list:
    return [v for v in bench_gpu.ALL_VARIANTS if v.attn == "sdpa"]


def test_7b_flops_per_token_is_the_palm_formula():
    params = bench_gpu.param_count("7b")
    assert params == 6_738_415_616  # Llama-2-7B, embeddings and LM head included
    expected = 6 * 6.74e9 + 12 * 32 * 32 * 128 * 4096
    assert bench_gpu.shape_flops_per_token("7b", 4096) == pytest.approx(expected, rel=1e-3)
    assert 1.2e9 < bench_gpu.param_count("1.3b") < 1.5e9


def test_param_count_matches_the_built_model(group):
    bench = bench_gpu.StepBench("tiny", CPU, "pure", want_compile=False, compute_dtype=torch.float32)
    assert bench.num_params == bench_gpu.param_count("tiny")


def test_packed_batches_fill_rows_and_restart_positions(batches):
    for batch in batches:
        assert batch["input_ids"].shape == (1, SEQ)
        assert int(batch["seq_lens"].sum()) == SEQ  # no padding: samples fill the row exactly
        assert (batch["position_ids"] == 0).sum() == (batch["seq_lens"] > 0).sum()  # one restart per sample
        assert int((batch["target_ids"] != -100).sum()) > 0


@pytest.mark.parametrize("precision", ["fsdp", "pure"])
def test_every_cpu_variant_steps_with_finite_figures(group, batches, precision):
    bench = bench_gpu.StepBench("tiny", CPU, precision, compile_backend="aot_eager", want_compile=True,
                                compute_dtype=torch.float32, max_position_embeddings=SEQ)
    cursor = [0]
    losses = []
    for variant in cpu_variants():
        block = bench_gpu.run_block(bench, variant, batches, warmup=0, steps=2, cursor=cursor)
        assert len(block["timed"]) == 2
        for record in block["timed"]:
            assert math.isfinite(record["loss"]) and record["loss"] > 0, (variant, record)
            assert math.isfinite(record["grad_norm"]), (variant, record)
            assert record["seconds"] > 0
            assert record["tokens"] == SEQ and 0 < record["supervised"] < SEQ
            losses.append(record["loss"])
    assert all(math.isfinite(x) for x in losses)
    # 12 steps at lr 2e-5 from a random init: the loss must not blow up
    assert losses[-1] < losses[0] + 0.5


def test_loss_variants_agree_and_training_lowers_the_loss(group, batches):
    bench = bench_gpu.StepBench("tiny", CPU, "fsdp", want_compile=False, compute_dtype=torch.float32, lr=1e-2,
                                max_position_embeddings=SEQ)
    batch = batches[0]
    values = {}
    with torch.no_grad():
        for variant in (v for v in cpu_variants() if not v.compile):
            bench.set_variant(variant)
            values[variant.name] = float(bench.module(batch))
    reference = values["baseline"]
    for name, value in values.items():
        assert value == pytest.approx(reference, rel=1e-4), (name, values)
    bench.set_variant(bench_gpu.BASELINE)
    first = bench.step(batch)["loss"]
    for _ in range(4):
        last = bench.step(batch)["loss"]
    assert last < first


def test_bf16_compute_step(group, batches):
    """The GPU path's dtype (FSDP2 mixed precision: fp32 master, bf16 compute), one short step."""
    bench = bench_gpu.StepBench("tiny", CPU, "fsdp", want_compile=False, compute_dtype=torch.bfloat16,
                                max_position_embeddings=SEQ)
    bench.set_variant(bench_gpu.BASELINE)
    record = bench.step(batches[0])
    assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
    assert all(p.dtype == torch.float32 for p in bench.module.parameters())  # master copy stays fp32


def test_cli_writes_the_report(group, tmp_path):
    prefix = tmp_path / "bench_gpu"
    assert bench_gpu.main(["--device", "cpu", "--shape", "tiny", "--seq", str(SEQ), "--reps", "1", "--steps", "1",
                           "--variants", "baseline,compile,flash-attn varlen", "--out", str(prefix)]) == 0
    out = json.loads(prefix.with_suffix(".json").read_text())
    (result,) = out["results"]
    assert "flash-attn varlen" in result["skipped"]  # no CUDA here: skipped with a reason
    for name in ("baseline", "compile"):
        entry = result["variants"][name]
        assert math.isfinite(entry["tokens_per_s"]) and entry["tokens_per_s"] > 0
        assert entry["mfu"] is None and entry["peak_allocated_gb"] is None
    text = prefix.with_suffix(".md").read_text()
    assert "No GPU in this run" in text and "| tiny |" in text
    assert prefix.with_suffix(".png").exists()
