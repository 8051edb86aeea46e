"""Plumbing shared by the benchmarks in this folder: machine info, running `train.py`, and writing the results
(`PREFIX.json` with every figure, `PREFIX.md` with one generated table, `PREFIX.png`)."""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def llama2_tokenizer(choice: str) -> Path | None:
    """The real Llama-2 tokenizer directory (rebuilt by tests/assets/make_llama2_tokenizer.py), or None for
    `--tokenizer tiny` or when it cannot be built (then `--tokenizer real` stops instead)."""
    if choice == "tiny":
        return None
    sys.path.insert(0, str(ROOT / "tests" / "assets"))
    import make_llama2_tokenizer

    built = make_llama2_tokenizer.build()
    if built is None and choice == "real":
        raise SystemExit("--tokenizer real: the Llama-2 tokenizer could not be built (npm registry unreachable?)")
    return None if built is None else Path(built)


def machine_info(*packages: str) -> dict:
    """CPU model, core count, GPU (if any), Python and platform, and the `__version__` of each named package."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    info.update({name: importlib.import_module(name).__version__ for name in packages})
    if "torch" in packages:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]  # the machine may be shared: say how busy
    except OSError:
        pass
    return info


def rotated(items: list, rep: int) -> list:
    """`items` starting at position `rep`: repetitions alternate the order, so drift does not favour one method."""
    shift = rep % len(items)
    return items[shift:] + items[:shift]


def median(values) -> float | None:
    """The median of the values that are not None (None if there are none)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def child_env(threads: int, cpu_only: bool = False) -> dict:
    """Environment of a benchmark's child process: `threads` intra-op threads, offline, no W&B, one rank."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_train(overrides: list[str], run_dir: Path, steps: int, threads: int = 1, cpu_only: bool = False) -> dict:
    """`python train.py +experiment=bench_throughput OVERRIDES` in a fresh process for `steps` steps; returns its
    step records from metrics.jsonl and the process's wall time.

    The process is ended once `steps` step records exist: what follows (final eval, checkpoint) is not measured,
    and a 7B checkpoint with its optimizer state (~80 GB) would not even fit on a benchmark machine's disk."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics, log_path = run_dir / "metrics.jsonl", run_dir / "train.log"
    cmd = [sys.executable, "train.py", "+experiment=bench_throughput", f"trainer.max_steps={steps}", *overrides,
           f"output_dir={run_dir}"]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(threads, cpu_only), stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None and len(step_records(metrics)) < steps:
            time.sleep(0.5)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif proc.returncode != 0:
            raise RuntimeError(f"train.py failed ({proc.returncode}): {' '.join(cmd)}\n{log_path.read_text()[-3000:]}")
    return {"records": step_records(metrics), "process_seconds": time.perf_counter() - started}


def step_records(path: Path) -> list[dict]:
    """The per-step records of a metrics.jsonl (those with a training loss)."""
    if not path.exists():
        return []
    with open(path) as handle:
        lines = handle.read().splitlines()
    return [record for record in (json.loads(line) for line in lines if line.endswith("}")) if "loss" in record]


def write_results(prefix: Path, title: str, out: dict, header: list[str], rows: list[list], plot: Callable) -> None:
    """PREFIX.json (`out` + the table), PREFIX.md (the table under the command and machine), PREFIX.png (`plot`)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out = {**out, "table": {"header": header, "rows": rows}}
    prefix.with_suffix(".json").write_text(json.dumps(out, indent=1, ensure_ascii=False, default=str) + "\n")
    machine = out["machine"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['cores']} cores"
    lines = [f"# {title}", "", f"Generated by `{out['command']}` on {where} (load {machine.get('load_average')}); "
             f"do not edit. Figures: `{prefix.name}.json`. Notes: `README.md`.", "",
             f"![{prefix.name}]({prefix.name}.png)", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(_align(rows, i) for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot(plt, out)
    fig.tight_layout()
    fig.savefig(prefix.with_suffix(".png"), dpi=100)
    plt.close(fig)


def _align(rows: list[list], column: int) -> str:
    """Numbers right-aligned: a column whose first non-empty cell starts with a digit."""
    first = next((str(row[column]) for row in rows if str(row[column])), "")
    return "---:" if first[:1].isdigit() else "---"


def fmt(value, spec: str = ",.0f") -> str:
    """A table cell: `value` formatted, or n/a."""
    return "n/a" if value is None else format(value, spec)


def command_line(script: str, argv: list[str] | None) -> str:
    """How this run was started, for the table's header."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"experiments/{script}", *args])
