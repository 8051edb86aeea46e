"""Validation: the held-out loss, greedy sample answers and their exact-match accuracy, on its own cadence.

Runs on every rank (the loss is summed over ranks; sharded models generate in lock step), logs on rank 0."""

from __future__ import annotations

from typing import Any

from llama2_sft.data.chat import IGNORE_INDEX, answer_split
from llama2_sft.data.loader import eval_batches
from llama2_sft.distributed import DistContext, all_reduce_sum
from llama2_sft.inference.generate import SamplingConfig, generate_ids
from llama2_sft.loss import batch_loss_sum
from llama2_sft.strategy.base import Strategy
from llama2_sft.train.metrics import MetricsWriter
from llama2_sft.train.step import to_device


class Validator:
    """Eval loss every `eval_steps` (and at start and end), greedy answers for W&B, accuracy at the end."""

    def __init__(self, strategy: Strategy, ctx: DistContext, tokenizer: Any, eval_set: Any | None, metrics: MetricsWriter,
                 *, eval_steps: int, batch_size: int, max_samples: int, generate_samples: int, accuracy_samples: int,
                 max_new_tokens: int, fused_loss: bool, varlen: bool):
        self.strategy, self.ctx, self.tokenizer, self.metrics = strategy, ctx, tokenizer, metrics
        self.eval_set, self.eval_steps, self.batch_size, self.max_samples = eval_set, eval_steps, batch_size, max_samples
        self.generate_samples, self.accuracy_samples = generate_samples, accuracy_samples
        self.max_new_tokens, self.fused_loss, self.varlen = max_new_tokens, fused_loss, varlen
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
            self.first_loss = self.evaluate()
            self.metrics.log({"step": step, "eval_loss": self.first_loss})

    def should_run(self, step: int, last_step: int) -> bool:
        """Every `eval_steps`, except the last step (`final` runs there)."""
        return bool(self.eval_steps) and step % self.eval_steps == 0 and step != last_step

    def run(self, step: int) -> None:
        self.last_loss = self.evaluate()
        self.metrics.log({"step": step, "eval_loss": self.last_loss})
        self.metrics.log_generations(step, self.sample_answers(self.generate_samples))

    def final(self, step: int) -> tuple[float | None, list[dict]]:
        """Eval loss and exact-match accuracy over `accuracy_samples` held-out dialogs; returns (accuracy, answers)."""
        self.last_loss = self.evaluate()
        answers = self.sample_answers(self.accuracy_samples)
        accuracy = sum(a["generated"] == a["reference"] for a in answers) / len(answers) if answers else None
        per_task = accuracy_per_task(answers)
        record = {"step": step, "eval_loss": self.last_loss, "eval_accuracy": accuracy}
        if per_task:
            record["eval_accuracy_per_task"] = per_task
        self.metrics.log(record)
        self.metrics.log_generations(step, answers[: self.generate_samples])
        return accuracy, answers

    # --- measurements ---------------------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        """Token-normalised loss over the held-out split (summed over ranks)."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return None
        dataset = self.eval_set
        if self.max_samples and len(dataset) > self.max_samples:
            dataset = dataset.select(range(self.max_samples))
        loss_sum, supervised = 0.0, 0
        strategy = self.strategy
        with strategy.eval_mode():
            for batch in eval_batches(dataset, self.batch_size, self.ctx.rank, self.ctx.world_size, self.tokenizer.pad_token_id):
                batch = to_device(batch, self.ctx.device)
                with strategy.forward_context():
                    loss_sum += float(batch_loss_sum(strategy.model, batch, self.fused_loss, self.varlen))
                supervised += int((batch["target_ids"] != IGNORE_INDEX).sum())
        total_loss, total_supervised = all_reduce_sum([loss_sum, supervised], self.ctx.device)
        return total_loss / max(total_supervised, 1)

    def sample_answers(self, count: int) -> list[dict]:
        """Greedy answers to the last turn of the first `count` held-out dialogs (same prompts on every rank)."""
        if self.eval_set is None or count <= 0:
            return []
        rows = self.eval_set.select(range(min(count, len(self.eval_set))))
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
