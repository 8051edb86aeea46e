#!/usr/bin/env python3
"""Deterministic generator for the embedded bilingual (English / Chinese) SFT data set.

Writes ``data/train.jsonl`` and ``data/eval.jsonl`` (a held-out split), one row per line
in the ShareGPT schema::

    {"id": "train-00000",
     "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...],
     "instruction": "<system prompt or empty string>"}

The data is built so that a *tiny* random-init Llama (1-4M parameters, a few hundred
optimizer steps on a CPU) can measurably learn it: every answer is short, unique,
exactly checkable (greedy decode + exact match), has no surrounding whitespace, and
follows a rule that generalizes to held-out prompts.

Measured (this data, ``data/tokenizer`` at 1024 pieces, Meta's per-turn llama-2-chat encoding,
loss on answers only): a 2.2M-parameter Llama (hidden 192, 4 layers) trained for 350 AdamW
steps of batch 16 (lr 3e-3, cosine) brings the answer-token loss from ~6.9 (uniform) to
~1.2-1.5 (short, EOS-terminated answers, mostly of the wrong task type still), and greedy
exact match on eval is only ~4-6% (lr 1e-2: worse). A few hundred steps show learning in the
loss; exact-match accuracy needs many more steps.

Tasks (two English and two Chinese phrasings each; the first task of a row is drawn
uniformly; about half the rows are Chinese):

============  ================================================  ================================  =================
task          English example                                   Chinese example                   answer
============  ================================================  ================================  =================
reverse       Reverse the letters: a b c                        把 a b c 倒过来写                 c b a
upper         Write cat in uppercase.                           把 cat 改成大写。                 CAT
repeat        Repeat the word dog 3 times.                      把“猫”重复三遍。                  dog dog dog / 猫猫猫
next_num      What number comes after 37?  (0-97)               37 后面的数是几？                 38
prev_num      What number comes before 37?  (2-99)              37 前面的数是几？                 36
next_letter   Which letter comes after c?                       字母 c 的下一个字母是什么？       d
prev_letter   Which letter comes before c?                      字母 c 的前一个字母是什么？       b
kth_item      What is the 2nd item in the list: red, cat, sun?  列表 苹果、猫、书 中的第二个是什么？  cat / 猫
sort_digits   Sort these digits from smallest to largest: 3 1 2  把 3 1 2 从小到大排序。          1 2 3
add           What is 3 + 4?  (one-digit operands)              3 加 4 等于几？                   7
compare       Is 7 greater than 3?  (distinct digits)           7 比 3 大吗？                     yes / no, 是 / 否
max_of_two    Which is larger, 7 or 3?  (distinct digits)       7 和 3 哪个大？                   7
============  ================================================  ================================  =================

Letter sequences are written space separated ("a b c") so that every letter is its own
token and the reversal rule is learnable by a tiny model; words come from small fixed
English / Chinese word lists.

Multi-turn rows (about 30%, 2-5 user turns) continue with follow-up questions about the
same item, which can only be answered from context ("And the one after that?" -> 39,
"What about the other way around?" -> no, "那第三个呢？" -> 书, "从大到小呢？" -> 3 2 1), or
with a fresh, self-contained task.

``instruction`` (the system prompt) is empty in a bit more than half the rows; otherwise it
is a short persona / format instruction in the row's language ("Answer with only the
result." / "只回答结果。"). One system prompt changes the answer format of yes/no
questions: "Reply YES or NO in capitals." (answers YES / NO) and "用“对”或“错”回答。"
(answers 对 / 错), so a model has to read the system prompt to get those right.

Held-out split: the eval rows (all distinct) are generated first; no self-contained eval
prompt (a first turn, or a later turn that starts a fresh task) appears as any human turn in
train, so no train row equals an eval row. Only generic follow-up phrasings ("And the one
after that?") are shared between the splits. Train rows may repeat each other: the small
tasks (letters, one-digit numbers) have few distinct prompts, and deduplicating would skew
the task mix.

The output depends only on ``--seed``, ``--num-train`` and ``--num-eval``: running the
script twice produces byte-identical files (``random.Random`` seeded with a string, no set
iteration, ``\\n`` line endings, UTF-8).

Usage::

    python data/make_embedded.py                      # defaults: seed 1234, 6000 train, 300 eval
    python data/make_embedded.py --seed 7 --num-train 100 --num-eval 20 --out-dir /tmp/d
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
from typing import Callable

DEFAULT_SEED = 1234
DEFAULT_NUM_TRAIN = 6000
DEFAULT_NUM_EVAL = 300
MULTI_TURN_FRACTION = 0.3
CHINESE_FRACTION = 0.5
EMPTY_INSTRUCTION_FRACTION = 0.55

LETTERS = string.ascii_lowercase
EN_WORDS = [
    "cat", "dog", "sun", "red", "blue", "tree", "book", "fish", "bird", "milk",
    "car", "star", "moon", "rain", "hat", "cup", "pen", "box", "key", "egg",
    "map", "bus", "ice", "owl", "cake", "door", "lamp", "rose",
]
ZH_WORDS = [
    "苹果", "香蕉", "猫", "狗", "太阳", "月亮", "书", "花", "水", "山",
    "河", "鱼", "鸟", "车", "茶", "米", "星星", "雨", "雪", "树",
    "桌子", "椅子", "老师", "学生", "门", "灯", "风", "云",
]
ZH_NUMERALS = {1: "一", 2: "两", 3: "三", 4: "四", 5: "五"}
ZH_ORDINALS = {1: "第一", 2: "第二", 3: "第三", 4: "第四", 5: "第五"}
EN_ORDINAL_WORDS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth"}
EN_ORDINAL_SHORT = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 5: "5th"}

EN_SYSTEM = [
    "Answer with only the result.",
    "You are a helpful assistant. Keep answers short.",
    "Be concise.",
    "You are a precise assistant. Reply with the answer only.",
]
ZH_SYSTEM = [
    "只回答结果。",
    "你是一个乐于助人的助手，回答要简短。",
    "请简洁回答。",
    "直接给出答案。",
]
# System prompts that change the format of yes/no answers.
EN_YESNO_SYSTEM = "Reply YES or NO in capitals."
ZH_YESNO_SYSTEM = "用“对”或“错”回答。"


class Ctx:
    """Per-row state: language, yes/no answer style and the item the conversation is about."""

    def __init__(self, lang: str, caps_yes_no: bool = False) -> None:
        self.lang = lang  # "en" or "zh"
        self.caps_yes_no = caps_yes_no  # system prompt asks for YES/NO (en) or 对/错 (zh)
        self.task = ""
        self.state: dict = {}

    def yes_no(self, value: bool) -> str:
        if self.lang == "en":
            return ("YES" if value else "NO") if self.caps_yes_no else ("yes" if value else "no")
        return ("对" if value else "错") if self.caps_yes_no else ("是" if value else "否")


# A task starter returns (prompt, answer) and stores what follow-ups need in ctx.state.
# A follow-up returns (prompt, answer) or None when it does not apply to the current state.
Turn = tuple[str, str]


def _letters(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(n)]


def start_reverse(rng: random.Random, ctx: Ctx) -> Turn:
    seq = _letters(rng, rng.randint(3, 4))
    s = " ".join(seq)
    ctx.state = {"seq": seq}
    if ctx.lang == "en":
        prompt = rng.choice([f"Reverse the letters: {s}", f"Write backwards: {s}"])
    else:
        prompt = rng.choice([f"把 {s} 倒过来写", f"倒序写出字母：{s}"])
    return prompt, " ".join(reversed(seq))


def start_upper(rng: random.Random, ctx: Ctx) -> Turn:
    word = rng.choice(EN_WORDS)
    ctx.state = {"word": word}
    if ctx.lang == "en":
        prompt = rng.choice([f"Write {word} in uppercase.", f"Uppercase: {word}"])
    else:
        prompt = rng.choice([f"把 {word} 改成大写。", f"{word} 的大写是什么？"])
    return prompt, word.upper()


def _repeat_answer(lang: str, word: str, n: int) -> str:
    return " ".join([word] * n) if lang == "en" else word * n


def start_repeat(rng: random.Random, ctx: Ctx) -> Turn:
    n = rng.randint(2, 4)
    if ctx.lang == "en":
        word = rng.choice(EN_WORDS)
        prompt = rng.choice([f"Repeat the word {word} {n} times.", f"Say {word} {n} times."])
    else:
        word = rng.choice(ZH_WORDS)
        prompt = rng.choice([f"把“{word}”重复{ZH_NUMERALS[n]}遍。", f"重复{ZH_NUMERALS[n]}次：{word}"])
    ctx.state = {"word": word, "n": n}
    return prompt, _repeat_answer(ctx.lang, word, n)


def start_next_num(rng: random.Random, ctx: Ctx) -> Turn:
    n = rng.randint(0, 97)
    ctx.state = {"n": n + 1}
    if ctx.lang == "en":
        prompt = rng.choice([f"What number comes after {n}?", f"Count one up from {n}."])
    else:
        prompt = rng.choice([f"{n} 后面的数是几？", f"比 {n} 大一的数是几？"])
    return prompt, str(n + 1)


def start_prev_num(rng: random.Random, ctx: Ctx) -> Turn:
    n = rng.randint(2, 99)
    ctx.state = {"n": n - 1}
    if ctx.lang == "en":
        prompt = rng.choice([f"What number comes before {n}?", f"Count one down from {n}."])
    else:
        prompt = rng.choice([f"{n} 前面的数是几？", f"比 {n} 小一的数是几？"])
    return prompt, str(n - 1)


def start_next_letter(rng: random.Random, ctx: Ctx) -> Turn:
    i = rng.randint(0, 24)
    c = LETTERS[i]
    ctx.state = {"i": i + 1}
    if ctx.lang == "en":
        prompt = rng.choice([f"Which letter comes after {c}?", f"Next letter after {c}?"])
    else:
        prompt = rng.choice([f"字母 {c} 的下一个字母是什么？", f"{c} 之后的字母是？"])
    return prompt, LETTERS[i + 1]


def start_prev_letter(rng: random.Random, ctx: Ctx) -> Turn:
    i = rng.randint(1, 25)
    c = LETTERS[i]
    ctx.state = {"i": i - 1}
    if ctx.lang == "en":
        prompt = rng.choice([f"Which letter comes before {c}?", f"Previous letter before {c}?"])
    else:
        prompt = rng.choice([f"字母 {c} 的前一个字母是什么？", f"{c} 之前的字母是？"])
    return prompt, LETTERS[i - 1]


def start_kth_item(rng: random.Random, ctx: Ctx) -> Turn:
    n = rng.randint(3, 5)
    words = rng.sample(EN_WORDS if ctx.lang == "en" else ZH_WORDS, n)
    k = rng.randint(1, n)
    ctx.state = {"words": words, "asked": [k]}
    if ctx.lang == "en":
        items = ", ".join(words)
        prompt = rng.choice([
            f"What is the {EN_ORDINAL_SHORT[k]} item in the list: {items}?",
            f"List: {items}. Which word is {EN_ORDINAL_WORDS[k]}?",
        ])
    else:
        items = "、".join(words)
        prompt = rng.choice([f"列表 {items} 中的{ZH_ORDINALS[k]}个是什么？", f"{items}：{ZH_ORDINALS[k]}个是？"])
    return prompt, words[k - 1]


def start_sort_digits(rng: random.Random, ctx: Ctx) -> Turn:
    digits = [rng.randint(0, 9) for _ in range(3)]
    s = " ".join(map(str, digits))
    ctx.state = {"digits": digits}
    if ctx.lang == "en":
        prompt = rng.choice([f"Sort these digits from smallest to largest: {s}", f"Put {s} in ascending order."])
    else:
        prompt = rng.choice([f"把 {s} 从小到大排序。", f"将数字 {s} 按升序排列"])
    return prompt, " ".join(map(str, sorted(digits)))


def start_add(rng: random.Random, ctx: Ctx) -> Turn:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    ctx.state = {"total": a + b}
    if ctx.lang == "en":
        prompt = rng.choice([f"What is {a} + {b}?", f"{a} plus {b} equals?"])
    else:
        prompt = rng.choice([f"{a} 加 {b} 等于几？", f"{a} + {b} 等于多少？"])
    return prompt, str(a + b)


def start_compare(rng: random.Random, ctx: Ctx) -> Turn:
    a, b = rng.sample(range(0, 10), 2)
    greater = rng.random() < 0.5
    ctx.state = {"a": a, "b": b, "greater": greater}
    if ctx.lang == "en":
        word = "greater" if greater else "smaller"
        prompt = rng.choice([f"Is {a} {word} than {b}?", f"True or false: {a} is {word} than {b}."])
    else:
        word = "大" if greater else "小"
        prompt = rng.choice([f"{a} 比 {b} {word}吗？", f"{a} 是否比 {b} {word}？"])
    return prompt, ctx.yes_no(a > b if greater else a < b)


def start_max_of_two(rng: random.Random, ctx: Ctx) -> Turn:
    a, b = rng.sample(range(0, 10), 2)
    ctx.state = {"a": a, "b": b}
    if ctx.lang == "en":
        prompt = rng.choice([f"Which is larger, {a} or {b}?", f"Which number is bigger: {a} or {b}?"])
    else:
        prompt = rng.choice([f"{a} 和 {b} 哪个大？", f"{a} 与 {b} 中较大的是哪个？"])
    return prompt, str(max(a, b))


# ---------------------------------------------------------------------------------------
# Follow-ups (context dependent; never self-contained)


def fu_reverse_first_last(rng: random.Random, ctx: Ctx) -> Turn | None:
    seq = ctx.state["seq"]
    left = [w for w in ("first", "last") if w not in ctx.state.setdefault("asked", [])]
    if not left:
        return None
    which = rng.choice(left)
    ctx.state["asked"].append(which)
    if which == "first":
        return ("What is the first letter?" if ctx.lang == "en" else "第一个字母是什么？"), seq[0]
    return ("And the last letter?" if ctx.lang == "en" else "最后一个字母呢？"), seq[-1]


def fu_upper_lower(rng: random.Random, ctx: Ctx) -> Turn | None:
    word = ctx.state["word"]
    if ctx.lang == "en":
        return rng.choice(["Now write it in lowercase.", "And in lowercase?"]), word
    return rng.choice(["再改回小写。", "小写呢？"]), word


def fu_repeat_other_n(rng: random.Random, ctx: Ctx) -> Turn | None:
    used = ctx.state.setdefault("counts", [ctx.state["n"]])
    left = [k for k in (2, 3, 4, 5) if k not in used]
    if not left:
        return None
    n = rng.choice(left)
    used.append(n)
    ctx.state["n"] = n
    word = ctx.state["word"]
    prompt = f"Now {n} times." if ctx.lang == "en" else f"那重复{ZH_NUMERALS[n]}遍呢？"
    return prompt, _repeat_answer(ctx.lang, word, n)


def fu_next_num(rng: random.Random, ctx: Ctx) -> Turn | None:
    n = ctx.state["n"]
    if n >= 99:
        return None
    ctx.state["n"] = n + 1
    return ("And the one after that?" if ctx.lang == "en" else "再下一个呢？"), str(n + 1)


def fu_prev_num(rng: random.Random, ctx: Ctx) -> Turn | None:
    n = ctx.state["n"]
    if n <= 0:
        return None
    ctx.state["n"] = n - 1
    return ("And the one before that?" if ctx.lang == "en" else "再前一个呢？"), str(n - 1)


def fu_next_letter(rng: random.Random, ctx: Ctx) -> Turn | None:
    i = ctx.state["i"]
    if i >= 25:
        return None
    ctx.state["i"] = i + 1
    return ("And the one after that?" if ctx.lang == "en" else "再下一个呢？"), LETTERS[i + 1]


def fu_prev_letter(rng: random.Random, ctx: Ctx) -> Turn | None:
    i = ctx.state["i"]
    if i <= 0:
        return None
    ctx.state["i"] = i - 1
    return ("And the one before that?" if ctx.lang == "en" else "再前一个呢？"), LETTERS[i - 1]


def fu_kth_other(rng: random.Random, ctx: Ctx) -> Turn | None:
    words, asked = ctx.state["words"], ctx.state["asked"]
    left = [k for k in range(1, len(words) + 1) if k not in asked]
    if not left:
        return None
    k = rng.choice(left)
    asked.append(k)
    if ctx.lang == "en":
        prompt = rng.choice([f"And the {EN_ORDINAL_SHORT[k]} one?", f"What about the {EN_ORDINAL_WORDS[k]}?"])
    else:
        prompt = rng.choice([f"那{ZH_ORDINALS[k]}个呢？", f"{ZH_ORDINALS[k]}个是什么？"])
    return prompt, words[k - 1]


def fu_kth_count(rng: random.Random, ctx: Ctx) -> Turn | None:
    prompt = "How many items are in the list?" if ctx.lang == "en" else "列表里一共有几个？"
    return prompt, str(len(ctx.state["words"]))


def fu_sort_desc(rng: random.Random, ctx: Ctx) -> Turn | None:
    prompt = "Now sort them from largest to smallest." if ctx.lang == "en" else "从大到小呢？"
    return prompt, " ".join(map(str, sorted(ctx.state["digits"], reverse=True)))


def fu_sort_max(rng: random.Random, ctx: Ctx) -> Turn | None:
    prompt = "Which of them is the largest?" if ctx.lang == "en" else "最大的是几？"
    return prompt, str(max(ctx.state["digits"]))


def fu_add_more(rng: random.Random, ctx: Ctx) -> Turn | None:
    k = rng.randint(1, 5)
    ctx.state["total"] += k
    prompt = f"Now add {k} more." if ctx.lang == "en" else f"再加 {k} 呢？"
    return prompt, str(ctx.state["total"])


def fu_compare_swap(rng: random.Random, ctx: Ctx) -> Turn | None:
    a, b, greater = ctx.state["b"], ctx.state["a"], ctx.state["greater"]
    ctx.state.update(a=a, b=b)
    prompt = "What about the other way around?" if ctx.lang == "en" else "反过来呢？"
    return prompt, ctx.yes_no(a > b if greater else a < b)


def fu_min_of_two(rng: random.Random, ctx: Ctx) -> Turn | None:
    prompt = "And which one is smaller?" if ctx.lang == "en" else "哪个小？"
    return prompt, str(min(ctx.state["a"], ctx.state["b"]))


TASKS: dict[str, tuple[Callable[[random.Random, Ctx], Turn], list[Callable]]] = {
    "reverse": (start_reverse, [fu_reverse_first_last]),
    "upper": (start_upper, [fu_upper_lower]),
    "repeat": (start_repeat, [fu_repeat_other_n]),
    "next_num": (start_next_num, [fu_next_num]),
    "prev_num": (start_prev_num, [fu_prev_num]),
    "next_letter": (start_next_letter, [fu_next_letter]),
    "prev_letter": (start_prev_letter, [fu_prev_letter]),
    "kth_item": (start_kth_item, [fu_kth_other, fu_kth_count]),
    "sort_digits": (start_sort_digits, [fu_sort_desc, fu_sort_max]),
    "add": (start_add, [fu_add_more]),
    "compare": (start_compare, [fu_compare_swap]),
    "max_of_two": (start_max_of_two, [fu_min_of_two]),
}
TASK_NAMES = list(TASKS)  # fixed order (dict insertion order)
# Follow-ups that make sense at most once per item (asking again would repeat a turn).
ONCE_ONLY = {fu_upper_lower, fu_kth_count, fu_sort_desc, fu_sort_max, fu_compare_swap, fu_min_of_two}


def follow_up(rng: random.Random, ctx: Ctx) -> Turn | None:
    fu = rng.choice(TASKS[ctx.task][1])
    if fu in ONCE_ONLY:
        used = ctx.state.setdefault("used", [])
        if fu.__name__ in used:
            return None
        used.append(fu.__name__)
    return fu(rng, ctx)


def make_row(rng: random.Random, first_task: str) -> tuple[dict, list[str]]:
    """One conversation opening with ``first_task``; returns (row without id, self-contained human prompts)."""
    lang = "zh" if rng.random() < CHINESE_FRACTION else "en"
    ctx = Ctx(lang=lang)
    if first_task == "compare" and rng.random() < 0.35:
        ctx.caps_yes_no = True
        instruction = EN_YESNO_SYSTEM if lang == "en" else ZH_YESNO_SYSTEM
    elif rng.random() < EMPTY_INSTRUCTION_FRACTION:
        instruction = ""
    else:
        instruction = rng.choice(EN_SYSTEM if lang == "en" else ZH_SYSTEM)

    n_turns = rng.randint(2, 5) if rng.random() < MULTI_TURN_FRACTION else 1
    conversations: list[dict] = []
    self_contained: list[str] = []
    task = first_task
    for turn in range(n_turns):
        qa = None
        if turn > 0 and rng.random() < 0.65:
            qa = follow_up(rng, ctx)
        if qa is None:
            if turn > 0:
                task = rng.choice(TASK_NAMES)
            ctx.task = task
            asked = [c["value"] for c in conversations if c["from"] == "human"]
            for _ in range(20):  # a fresh task must not repeat an earlier prompt of the row
                qa = TASKS[task][0](rng, ctx)
                if qa[0] not in asked:
                    break
            self_contained.append(qa[0])
        prompt, answer = qa
        assert answer == answer.strip() and answer, (prompt, answer)
        conversations.append({"from": "human", "value": prompt})
        conversations.append({"from": "gpt", "value": answer})
    return {"conversations": conversations, "instruction": instruction, "task": task}, self_contained


def _row_key(row: dict) -> str:
    return json.dumps([row["instruction"], row["conversations"]], ensure_ascii=False)


def generate(seed: int = DEFAULT_SEED, num_train: int = DEFAULT_NUM_TRAIN,
             num_eval: int = DEFAULT_NUM_EVAL) -> tuple[list[dict], list[dict]]:
    """Return (train_rows, eval_rows). Pure function of its arguments."""
    eval_rng = random.Random(f"{seed}-eval")
    train_rng = random.Random(f"{seed}-train")

    # The first task of every row is drawn uniformly and kept while a row is redrawn (eval: a
    # duplicate row; train: a row using a held-out prompt), so rejections do not skew the task mix.
    eval_rows: list[dict] = []
    eval_prompts: dict[str, None] = {}  # ordered "set" of held-out self-contained prompts
    seen: dict[str, None] = {}
    while len(eval_rows) < num_eval:
        task = eval_rng.choice(TASK_NAMES)
        for _ in range(1000):
            row, prompts = make_row(eval_rng, task)
            key = _row_key(row)
            if key not in seen:
                break
        else:
            raise RuntimeError(f"could not generate enough distinct eval rows for task {task!r}")
        seen[key] = None
        eval_prompts.update(dict.fromkeys(prompts))
        eval_rows.append({"id": f"eval-{len(eval_rows):05d}", **row})

    # Train rows may repeat each other (small tasks have few distinct prompts); they never
    # contain a self-contained eval prompt, hence never equal an eval row.
    train_rows: list[dict] = []
    while len(train_rows) < num_train:
        task = train_rng.choice(TASK_NAMES)
        for _ in range(1000):
            row, _ = make_row(train_rng, task)
            if not any(t["value"] in eval_prompts for t in row["conversations"] if t["from"] == "human"):
                break
        else:
            raise RuntimeError(f"could not generate training rows for task {task!r} outside the eval split")
        train_rows.append({"id": f"train-{len(train_rows):05d}", **row})
    return train_rows, eval_rows


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--num-eval", type=int, default=DEFAULT_NUM_EVAL)
    parser.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)),
                        help="directory for train.jsonl / eval.jsonl (default: next to this script)")
    args = parser.parse_args(argv)

    train_rows, eval_rows = generate(args.seed, args.num_train, args.num_eval)
    os.makedirs(args.out_dir, exist_ok=True)
    write_jsonl(os.path.join(args.out_dir, "train.jsonl"), train_rows)
    write_jsonl(os.path.join(args.out_dir, "eval.jsonl"), eval_rows)
    print(f"wrote {len(train_rows)} train / {len(eval_rows)} eval rows to {args.out_dir}")


if __name__ == "__main__":
    main()
