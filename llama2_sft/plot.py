"""Loss curves as pictures, from `metrics.jsonl` (for users without W&B).

    python -m llama2_sft.plot outputs/embedded                                  # -> outputs/embedded/curves.png
    python -m llama2_sft.plot outputs/packed outputs/padded out=compare.png     # several runs overlaid

Four panels against the optimizer step: train loss (solid) and eval loss (dots; hollow markers: each source's eval
loss in a mix), learning rate, tokens/s, and the held-out exact-match accuracy where a run measured it. Training writes `output_dir/curves.png` at its end (rank 0).
"""

from __future__ import annotations

import json
import os
import sys

METRICS = "metrics.jsonl"
SERIES = ("loss", "lr", "tokens_per_s", "eval_loss", "eval_accuracy")  # and `eval_loss/NAME` of a mix's sources
SOURCE_MARKERS = "s^vD<>p*"
CURVES = "curves.png"


def read_metrics(run: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of a run: train `loss`, `lr`, `tokens_per_s`, `eval_loss` (and `eval_loss/NAME` per source
    of a mix), `eval_accuracy`. A step logged
    twice (a run resumed after a crash re-runs the steps after its checkpoint) keeps its last record."""
    path = run if run.endswith(".jsonl") else os.path.join(run, METRICS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run}: no {METRICS} (not a training run's output_dir?)")
    latest: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if line.endswith("\n"):  # a torn last line of a killed run is expected; anything else is not
                    raise ValueError(f"{path}:{number}: not JSON: {error}") from error
                continue
            for key, value in record.items():
                if value is not None and (key in SERIES or key.startswith("eval_loss/")):
                    latest.setdefault(key, {})[int(record["step"])] = float(value)
    return {key: sorted(values.items()) for key, values in latest.items()}


def plot_runs(runs: dict[str, dict], out: str) -> str:
    """Draw the runs' series (label -> read_metrics result) into one PNG at `out`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss (train solid, eval dots)"), ("lr", "learning rate"), ("tokens_per_s", "tokens / s"),
              ("eval_accuracy", "held-out exact match")]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for index, (label, series) in enumerate(runs.items()):
        color = f"C{index % 10}"
        for axis, (key, title) in zip(axes.flat, panels):
            axis.set_title(title, fontsize=10)
            points = series.get(key, [])
            if key == "eval_accuracy" and points:
                axis.plot(*zip(*points), "o-", color=color, label=label)
            elif points:
                axis.plot(*zip(*points), color=color, linewidth=1.2, label=label)
            if key == "loss" and series.get("eval_loss"):
                axis.plot(*zip(*series["eval_loss"]), "o", color=color, markersize=5)
            if key == "loss":  # a mix: each source's eval loss, one marker per source
                sources = sorted(k for k in series if k.startswith("eval_loss/"))
                for marker, name in zip(SOURCE_MARKERS * len(sources), sources):
                    axis.plot(*zip(*series[name]), marker, color=color, markersize=4, fillstyle="none",
                              label=f"{label}: eval {name.split('/', 1)[1]}")
    for axis in axes[1]:
        axis.set_xlabel("optimizer step")
    axes.flat[0].legend(fontsize=8)
    if not any(series.get("eval_accuracy") for series in runs.values()):
        axes.flat[3].text(0.5, 0.5, "not measured\n(trainer.accuracy_samples=0)", ha="center", va="center",
                          transform=axes.flat[3].transAxes, color="gray")
    axes.flat[0].set_yscale("log")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def write_curves(output_dir: str) -> str:
    """`output_dir/curves.png` of one run (what training writes at its end)."""
    return plot_runs({os.path.basename(os.path.normpath(output_dir)): read_metrics(output_dir)},
                     os.path.join(output_dir, CURVES))


def main(argv: list[str]) -> int:
    runs = [arg for arg in argv if not arg.startswith("out=")]
    outs = [arg.split("=", 1)[1] for arg in argv if arg.startswith("out=")]
    if not runs or any(arg.startswith("-") for arg in runs):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    labels = [os.path.basename(os.path.normpath(run)) for run in runs]
    if len(set(labels)) < len(labels):  # e.g. two runs named outputs/a/embedded and outputs/b/embedded
        labels = [os.path.normpath(run) for run in runs]
    out = outs[-1] if outs else os.path.join(runs[0], CURVES)
    print(plot_runs({label: read_metrics(run) for label, run in zip(labels, runs)}, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
