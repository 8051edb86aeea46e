"""Validation: the held-out loss, greedy sample answers and their exact-match accuracy, on its own cadence.

Runs on every rank (the loss is summed over ranks; sharded models run their forwards and generate in lock step), logs
on rank 0. An eval set with a `source` column (a mix's per-source held-out splits, llama2_sft.data.mixing) is scored
per source too: `eval_loss/NAME`, each token-normalised over that source's supervised tokens, so `eval_loss` is their
token-weighted mean. Exact-match accuracy is measured on chat rows only (a row's `type` column, else the eval set's
`eval_type`): a plain-text row has no reply to match."""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np

from llama2_sft.data.chat import IGNORE_INDEX, answer_split
from llama2_sft.data.collate import collate_padded
from llama2_sft.distributed import DistContext, all_reduce_sum
from llama2_sft.inference.generate import SamplingConfig, generate_ids
from llama2_sft.loss import batch_loss_sum
from llama2_sft.strategy.base import Strategy
from llama2_sft.train.metrics import MetricsWriter
from llama2_sft.train.step import to_device

log = logging.getLogger(__name__)


class Validator:
    """Eval loss every `eval_steps` (and at start and end), greedy answers for W&B, accuracy at the end."""

    def __init__(self, strategy: Strategy, ctx: DistContext, tokenizer: Any, eval_set: Any | None, metrics: MetricsWriter,
                 *, eval_steps: int, batch_size: int, max_samples: int, generate_samples: int, accuracy_samples: int,
                 max_new_tokens: int, fused_loss: bool, varlen: bool, eval_type: str = "chat"):
        self.strategy, self.ctx, self.tokenizer, self.metrics = strategy, ctx, tokenizer, metrics
        self.eval_set, self.eval_steps, self.batch_size, self.max_samples = eval_set, eval_steps, batch_size, max_samples
        self.generate_samples, self.accuracy_samples = generate_samples, accuracy_samples
        self.max_new_tokens, self.fused_loss, self.varlen = max_new_tokens, fused_loss, varlen
        self.eval_type = str(eval_type)  # the type (chat / text) of rows without a `type` column (dataset.type)
        self.first_loss: float | None = None  # before training (kept across resumes, for the summary)
        self.last_loss: float | None = None

    def state_dict(self) -> dict:
        return {"first_eval_loss": self.first_loss, "last_eval_loss": self.last_loss}

    def load_state_dict(self, state: dict) -> None:
        self.first_loss = state.get("first_eval_loss")
        self.last_loss = state.get("last_eval_loss")

    # --- cadence --------------------------------------------------------------------------------------------
    def start(self, step: int) -> None:
        """The baseline eval loss, unless a resumed run already has it."""
        if step == 0 or self.first_loss is None:
            self.first_loss, per_source = self.evaluate_sources()
            self.metrics.log({"step": step, "eval_loss": self.first_loss, **per_source})

    def should_run(self, step: int, last_step: int) -> bool:
        """Every `eval_steps`, except the last step (`final` runs there)."""
        return bool(self.eval_steps) and step % self.eval_steps == 0 and step != last_step

    def run(self, step: int) -> None:
        self.last_loss, per_source = self.evaluate_sources()
        self.metrics.log({"step": step, "eval_loss": self.last_loss, **per_source})
        self.metrics.log_generations(step, self.sample_answers(self.generate_samples))

    def final(self, step: int) -> tuple[float | None, list[dict]]:
        """Eval loss and exact-match accuracy over `accuracy_samples` held-out dialogs; returns (accuracy, answers)."""
        self.last_loss, per_source = self.evaluate_sources()
        if self.accuracy_samples > 0 and self.eval_set is not None and len(self.eval_set) and not self.chat_rows():
            if self.ctx.is_main:
                log.info("held-out exact-match accuracy skipped: the eval set has no chat rows (%s rows of plain text "
                         "have no reply to match)", f"{len(self.eval_set):,}")
        answers = self.sample_answers(self.accuracy_samples)
        accuracy = sum(a["generated"] == a["reference"] for a in answers) / len(answers) if answers else None
        per_task = accuracy_per_task(answers)
        record = {"step": step, "eval_loss": self.last_loss, **per_source, "eval_accuracy": accuracy}
        if per_task:
            record["eval_accuracy_per_task"] = per_task
        self.metrics.log(record)
        self.metrics.log_generations(step, answers[: self.generate_samples])
        return accuracy, answers

    # --- measurements ---------------------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        """Token-normalised loss over the held-out split (summed over ranks)."""
        return self.evaluate_sources()[0]

    def evaluate_sources(self) -> tuple[float | None, dict[str, float]]:
        """(token-normalised loss over the held-out split, {"eval_loss/NAME": loss over source NAME's rows}), summed
        over ranks; the dict is empty unless the eval set has a `source` column."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return None, {}
        groups = eval_groups(self.eval_set, self.max_samples)
        sums: list[float] = []
        strategy = self.strategy
        with strategy.eval_mode():
            for _, indices in groups:
                loss_sum, supervised = 0.0, 0
                for batch in lockstep_batches(self.eval_set, indices, self.batch_size, self.ctx.rank,
                                              self.ctx.world_size, self.tokenizer.pad_token_id):
                    batch = to_device(batch, self.ctx.device)
                    with strategy.forward_context():
                        loss_sum += float(batch_loss_sum(strategy.model, batch, self.fused_loss, self.varlen))
                    supervised += int((batch["target_ids"] != IGNORE_INDEX).sum())
                sums += [loss_sum, supervised]
        totals = all_reduce_sum(sums, self.ctx.device)
        losses, tokens = totals[0::2], totals[1::2]
        overall = sum(losses) / max(sum(tokens), 1)
        per_source = {f"eval_loss/{name}": loss / token_count
                      for (name, _), loss, token_count in zip(groups, losses, tokens) if name is not None and token_count}
        return overall, per_source

    def chat_rows(self) -> list[int]:
        """Indices of the eval rows that are dialogs (the only rows with a reply to match)."""
        if self.eval_set is None:
            return []
        if "type" in self.eval_set.column_names:
            return [i for i, kind in enumerate(self.eval_set["type"]) if kind == "chat"]
        return list(range(len(self.eval_set))) if self.eval_type == "chat" else []

    def sample_answers(self, count: int) -> list[dict]:
        """Greedy answers to the last turn of the first `count` held-out dialogs (same prompts on every rank)."""
        if self.eval_set is None or count <= 0:
            return []
        chat = self.chat_rows()[:count]
        if not chat:
            return []
        rows = self.eval_set.select(chat)
        split = [answer_split(ids, labels) for ids, labels in zip(rows["input_ids"], rows["labels"])]
        prompts = [prompt for prompt, _ in split]
        sampling = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=0.0)
        model = self.strategy.unwrapped_model()
        outputs: list[list[int]] = []
        with self.strategy.eval_mode(), self.strategy.forward_context():
            for start in range(0, len(prompts), self.batch_size):
                outputs += generate_ids(model, prompts[start: start + self.batch_size], pad_id=self.tokenizer.pad_token_id,
                                        eos_id=self.tokenizer.eos_token_id, sampling=sampling, device=self.ctx.device,
                                        synced_ranks=self.ctx.distributed)
        decode = self.tokenizer.decode
        tasks = rows["task"] if "task" in rows.column_names else [""] * len(rows)
        return [
            {"prompt": decode(prompt[-200:]), "reference": decode(reference).strip(), "generated": decode(output).strip(),
             "task": task}
            for (prompt, reference), output, task in zip(split, outputs, tasks)
        ]


def accuracy_per_task(answers: list[dict]) -> dict[str, dict]:
    """{task: {"accuracy", "correct", "count"}} over answers labelled with a task (rows with a `task` field)."""
    out: dict[str, dict] = {}
    for answer in answers:
        if answer.get("task"):
            entry = out.setdefault(answer["task"], {"correct": 0, "count": 0})
            entry["correct"] += int(answer["generated"] == answer["reference"])
            entry["count"] += 1
    for entry in out.values():
        entry["accuracy"] = entry["correct"] / entry["count"]
    return dict(sorted(out.items()))


def eval_groups(dataset: Any, max_samples: int) -> list[tuple[str | None, list[int]]]:
    """The eval rows to score, as (source name or None, row indices) groups.

    Without a `source` column: one group, the first `max_samples` rows (all when 0). With one: a group per source,
    in the order of first appearance; a capped set takes `max_samples` rows evenly spaced over the whole set, so each
    source keeps its share of the rows."""
    size = len(dataset)
    if max_samples and size > max_samples:
        chosen = (np.arange(max_samples, dtype=np.int64) * size // max_samples if "source" in dataset.column_names
                  else np.arange(max_samples, dtype=np.int64))
    else:
        chosen = np.arange(size, dtype=np.int64)
    if "source" not in dataset.column_names:
        return [(None, chosen.tolist())]
    names = np.asarray(dataset["source"], dtype=object)[chosen]
    groups: dict[str, list[int]] = {}
    for name, index in zip(names, chosen.tolist()):
        groups.setdefault(str(name), []).append(index)
    return list(groups.items())


def lockstep_batches(dataset: Any, indices: list[int], batch_size: int, rank: int, world_size: int,
                     pad_id: int) -> Iterator[dict]:
    """Padded eval batches of `indices`, this rank's share (rank-strided; the loss is summed over ranks, so the split
    is free). Every rank yields the same number of batches, so a sharded model (FSDP, ZeRO-3) runs its forwards in
    lock step: a rank whose share ran out runs the group's first row with every label masked (adds nothing)."""
    mine = indices[rank::world_size]
    per_rank = -(-len(indices) // world_size)
    for start in range(0, per_rank, batch_size):
        part = mine[start: start + batch_size]
        columns = dataset[part if part else indices[:1]]
        samples = [{"input_ids": i, "labels": l if part else [IGNORE_INDEX] * len(l)}
                   for i, l in zip(columns["input_ids"], columns["labels"])]
        yield collate_padded(samples, pad_id)
