"""Build the bundled lm-evaluation-harness tasks from the embedded held-out split (data/eval.jsonl).

    python data/eval_tasks/make_tasks.py      # rewrites embedded_heldout.jsonl and embedded_choice.jsonl

Each held-out row opens with a self-contained task (data/make_embedded.py); its first exchange becomes one document:
* embedded_heldout.jsonl: {id, question, answer}: generation, greedy, exact match of the stripped answer;
* embedded_choice.jsonl: C-Eval's format {id, question, A, B, C, D, answer}: the right answer among three distractors,
  the answers of other held-out rows of the same kind (digits, Latin letters, Chinese), drawn with a fixed seed.
The rows' own system prompts are not carried: an evaluation applies one (`system=` of llama2_sft.evaluate).
"""

from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL = os.path.join(HERE, "..", "eval.jsonl")
SEED = 1234


def kind(answer: str) -> str:
    if answer.replace(" ", "").isdigit():
        return "digits"
    return "latin" if answer.isascii() else "other"


def main() -> None:
    with open(EVAL, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    docs = [{"id": row["id"], "question": row["conversations"][0]["value"], "answer": row["conversations"][1]["value"]}
            for row in rows]
    with open(os.path.join(HERE, "embedded_heldout.jsonl"), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
    rng = random.Random(SEED)
    pools: dict[str, list[str]] = {}
    for doc in docs:
        pools.setdefault(kind(doc["answer"]), [])
        if doc["answer"] not in pools[kind(doc["answer"])]:
            pools[kind(doc["answer"])].append(doc["answer"])
    with open(os.path.join(HERE, "embedded_choice.jsonl"), "w", encoding="utf-8") as handle:
        for doc in docs:
            others = [a for a in pools[kind(doc["answer"])] if a != doc["answer"]]
            options = rng.sample(others, 3) + [doc["answer"]]
            rng.shuffle(options)
            letters = "ABCD"
            choice = {"id": doc["id"], "question": doc["question"], **dict(zip(letters, options)),
                      "answer": letters[options.index(doc["answer"])]}
            handle.write(json.dumps(choice, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
