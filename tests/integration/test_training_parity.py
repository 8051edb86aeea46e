"""The loop's math does not depend on how the work is split, and a resumed run continues exactly.

Each test runs `train.py` for real (torchrun with 2 gloo ranks where it says so) on a tiny Llama saved like a Hugging
Face checkpoint, and compares the per-step losses in metrics.jsonl (fp32, CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
REL = 1e-5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("parity")
    with open(os.path.join(REPO, "data", "train.jsonl"), encoding="utf-8") as handle:
        lines = [next(handle) for _ in range(64)]
    (root / "rows.jsonl").write_text("".join(lines), encoding="utf-8")
    (root / "rows4.jsonl").write_text("".join(lines[:4]), encoding="utf-8")
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_train(workdir, tiny_checkpoint, name, overrides=(), nproc=1, rows="rows.jsonl", check=True, wandb_mode="disabled",
              compile=False):
    """Run train.py; returns (output_dir, completed process)."""
    output_dir = workdir / name
    args = [
        f"output_dir={output_dir}", f"model.name_or_path={tiny_checkpoint}", "model.tokenizer=null", "model.arch=null",
        f"dataset.source={workdir / rows}", "dataset.eval_source=null", "dataset.eval_fraction=0",
        "dataset.max_length=256", f"dataset.cache_dir={workdir / 'cache'}", "dataset.packing=false",
        "trainer.max_steps=4", "trainer.save_steps=0", "trainer.eval_steps=0", "trainer.accuracy_samples=0",
        "trainer.generate_samples=0", "trainer.log_steps=1", "scheduler.warmup_ratio=0", "optimizer.lr=1e-3",
        *overrides,
    ]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={free_port()}", "train.py", *args]
    else:
        command = [sys.executable, "train.py", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE=wandb_mode,
               TORCH_COMPILE_DISABLE="0" if compile else "1")  # the suite runs eagerly (tests/conftest.py)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"train.py failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return output_dir, done


def losses(output_dir) -> dict[int, float]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_losses(a: dict, b: dict, rel=REL):
    assert sorted(a) == sorted(b) and a
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=rel), f"step {step}: {a[step]} vs {b[step]}"


STRATEGIES = [("single", 1), ("ddp", 2), ("fsdp", 2), ("deepspeed_zero3", 2)]


def strategy_args(strategy, nproc):
    """Global batch 4 packed rows, 6 steps, a checkpoint every 3."""
    return [f"strategy={strategy}", f"trainer.micro_batch_size={4 // nproc}", "trainer.max_steps=6",
            "trainer.save_steps=3", "dataset.packing=true", "trainer.save_total_limit=1"]


@pytest.fixture(scope="module")
def straight_runs(workdir, tiny_checkpoint):
    """Uninterrupted runs of each strategy at the same global batch."""
    return {s: run_train(workdir, tiny_checkpoint, f"straight-{s}", strategy_args(s, n), nproc=n)[0] for s, n in STRATEGIES}


def test_single_ddp_fsdp_and_zero3_give_the_same_losses_at_the_same_global_batch(straight_runs):
    reference = losses(straight_runs["single"])
    assert len(set(reference.values())) == 6  # the model is learning: each step differs
    assert_same_losses(reference, losses(straight_runs["ddp"]))
    assert_same_losses(reference, losses(straight_runs["fsdp"]))
    assert_same_losses(reference, losses(straight_runs["deepspeed_zero3"]))


def test_every_fast_path_switched_on_or_off_gives_the_same_losses(workdir, tiny_checkpoint, straight_runs):
    """Straight runs use the defaults (fused LM head + cross-entropy, fused AdamW). Against them: everything off
    (logits + plain cross-entropy, foreach AdamW) and everything on (plus selective activation checkpointing and
    torch.compile of the decoder layers); and the plain loss under FSDP2 on 2 ranks, where the fused head runs inside
    the sharded root's forward."""
    off, _ = run_train(workdir, tiny_checkpoint, "all-off", [*strategy_args("single", 1), "trainer.save_steps=0",
                                                             "trainer.cross_entropy=logits", "optimizer.fused=false"])
    on, _ = run_train(workdir, tiny_checkpoint, "all-on", [*strategy_args("single", 1), "trainer.save_steps=0",
                                                           "model.gradient_checkpointing=true", "model.checkpoint_policy=selective",
                                                           "model.compile=true", "model.compile_scope=layers",
                                                           "trainer.ce_chunk_size=100"], compile=True)
    reference = losses(straight_runs["single"])
    assert_same_losses(reference, losses(off))
    assert_same_losses(reference, losses(on))
    fsdp_plain, _ = run_train(workdir, tiny_checkpoint, "fsdp-logits", [*strategy_args("fsdp", 2), "trainer.save_steps=0",
                                                                        "trainer.cross_entropy=logits"], nproc=2)
    assert_same_losses(losses(straight_runs["fsdp"]), losses(fsdp_plain))


def test_gradient_accumulation_split_does_not_change_losses(workdir, tiny_checkpoint):
    whole, _ = run_train(workdir, tiny_checkpoint, "mb4", ["trainer.micro_batch_size=4", "trainer.grad_accum_steps=1",
                                                           "trainer.peak_tflops=0.5"])
    split, _ = run_train(workdir, tiny_checkpoint, "mb1x4", ["trainer.micro_batch_size=1", "trainer.grad_accum_steps=4"])
    assert_same_losses(losses(whole), losses(split))
    check_mfu_records(whole, tiny_checkpoint, peak=0.5e12)


def check_mfu_records(output_dir, checkpoint, peak):
    """metrics.jsonl's mfu is the PaLM formula written out here independently: tokens/s x (6 N + 12 L H Q T) / peak."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(checkpoint).parameters())
    head_dim = config.hidden_size // config.num_attention_heads
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle if '"loss"' in line]
    assert records
    for r in records:
        flops = 6 * n + 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * r["row_length"]
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / peak, rel=1e-9)
        assert r["tokens_per_s"] == pytest.approx(r["num_tokens"] / r["step_seconds"], rel=1e-6)


def test_packed_and_padded_batches_of_the_same_samples_give_the_same_losses(workdir, tiny_checkpoint):
    # 4 short samples: padded, one global batch of 4 samples; packed, one row of <= 256 tokens holding all 4
    # (if they did not fit one row, steps would alternate between rows and the losses would differ).
    padded, _ = run_train(workdir, tiny_checkpoint, "padded4", ["trainer.micro_batch_size=4"], rows="rows4.jsonl")
    packed, _ = run_train(workdir, tiny_checkpoint, "packed4", ["trainer.micro_batch_size=1", "dataset.packing=true"],
                          rows="rows4.jsonl")
    with open(os.path.join(packed, "metrics.jsonl")) as handle:
        first = next(json.loads(line) for line in handle if '"loss"' in line)
    with open(os.path.join(padded, "metrics.jsonl")) as handle:
        assert first["num_tokens"] == next(json.loads(line) for line in handle if '"loss"' in line)["num_tokens"]
    assert_same_losses(losses(padded), losses(packed))


@pytest.mark.parametrize("strategy, nproc", STRATEGIES)
def test_resumed_run_continues_with_the_same_losses_as_an_uninterrupted_run(workdir, tiny_checkpoint, straight_runs,
                                                                             strategy, nproc):
    common = strategy_args(strategy, nproc)
    stopped, _ = run_train(workdir, tiny_checkpoint, f"resumed-{strategy}", [*common, "trainer.stop_after_steps=3"], nproc=nproc)
    assert sorted(losses(stopped)) == [1, 2, 3]
    resumed, done = run_train(workdir, tiny_checkpoint, f"resumed-{strategy}", common, nproc=nproc)
    assert "resumed from" in done.stderr + done.stdout
    assert losses(resumed) == losses(straight_runs[strategy])  # exactly: same batches, same RNG, same optimizer state


def test_a_half_written_checkpoint_is_never_loaded(workdir, tiny_checkpoint):
    common = ["trainer.micro_batch_size=4", "trainer.max_steps=4", "trainer.save_steps=2"]
    straight, _ = run_train(workdir, tiny_checkpoint, "straight-crash", common)
    out, _ = run_train(workdir, tiny_checkpoint, "crash", [*common, "trainer.stop_after_steps=2"])
    # Simulate a crash while writing step 3: its directory exists without the COMPLETE marker and even the
    # `latest` pointer names it; a temporary directory is left behind too.
    ckpts = out / "checkpoints"
    shutil.copytree(ckpts / "step_00000002", ckpts / "step_00000003")
    os.remove(ckpts / "step_00000003" / "COMPLETE")
    shutil.copytree(ckpts / "step_00000002", ckpts / ".tmp-step_00000004")
    (ckpts / "latest").write_text("step_00000003\n")
    resumed, done = run_train(workdir, tiny_checkpoint, "crash", common)
    log = done.stderr + done.stdout
    assert "resumed from" in log and "step_00000002" in log
    assert losses(resumed) == losses(straight)


def test_wandb_logs_offline_without_network_and_a_resumed_run_keeps_its_run_id(workdir, tiny_checkpoint):
    common = ["trainer.micro_batch_size=4", "trainer.max_steps=4", "trainer.save_steps=2", "logger=wandb",
              "logger.wandb.mode=offline"]
    out, _ = run_train(workdir, tiny_checkpoint, "wandb", [*common, "trainer.stop_after_steps=2"], wandb_mode="offline")
    run_train(workdir, tiny_checkpoint, "wandb", common, wandb_mode="offline")
    run_dirs = sorted(d for d in os.listdir(out / "wandb") if d.startswith("offline-run-"))
    assert len(run_dirs) == 2 and len({d.rsplit("-", 1)[1] for d in run_dirs}) == 1
    with open(out / "checkpoints" / "step_00000004" / "trainer_state.json") as handle:
        assert json.load(handle)["metrics"]["wandb_run_id"] == run_dirs[0].rsplit("-", 1)[1]


def test_two_nodes_of_one_process_over_c10d_rendezvous_match_the_single_process_losses(workdir, tiny_checkpoint, straight_runs):
    """Multi-node as documented: two torchrun 'nodes' on localhost, one process each, c10d rendezvous."""
    output_dir = workdir / "two-nodes"
    port = free_port()
    args = [f"output_dir={output_dir}", f"model.name_or_path={tiny_checkpoint}", "model.tokenizer=null", "model.arch=null",
            f"dataset.source={workdir / 'rows.jsonl'}", "dataset.eval_source=null", "dataset.eval_fraction=0",
            "dataset.max_length=256", f"dataset.cache_dir={workdir / 'cache'}", "trainer.eval_steps=0",
            "trainer.accuracy_samples=0", "trainer.generate_samples=0", "trainer.log_steps=1",
            "scheduler.warmup_ratio=0", "optimizer.lr=1e-3", *strategy_args("fsdp", 2)]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=parity",
                               "train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    assert_same_losses(losses(straight_runs["single"]), losses(output_dir))
