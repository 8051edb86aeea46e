#!/usr/bin/env python3
"""Deterministic generator for the bundled plain-text corpus `data/text_zh.txt` (continued pretraining, dataset=text).

Documents separated by blank lines (dataset.txt_documents=blank_lines), mostly Chinese with some English, about the
facts the embedded chat tasks ask for (data/make_embedded.py): which number follows which, the alphabet, sums of
digits, which of two digits is larger, the words of the embedded lists. A model that reads it sees in prose what the
SFT rows later ask in dialog. Some documents are long (counting runs, tables), longer than a 128-token row, so a
pretraining run exercises the splitting of documents into pieces.

    python data/make_text_corpus.py            # writes data/text_zh.txt
"""

from __future__ import annotations

import argparse
import random
import string
from pathlib import Path

ZH_DIGITS = "零一二三四五六七八九"
ZH_WORDS = ["苹果", "香蕉", "猫", "狗", "太阳", "月亮", "书", "花", "水", "山", "河", "鱼", "鸟", "车", "茶", "米",
            "星星", "雨", "雪", "树", "桌子", "椅子", "老师", "学生", "门", "灯", "风", "云"]
EN_WORDS = ["cat", "dog", "sun", "red", "blue", "tree", "book", "fish", "bird", "milk", "car", "star", "moon", "rain",
            "hat", "cup", "pen", "box", "key", "egg", "map", "bus", "ice", "owl", "cake", "door", "lamp", "rose"]
ZH_ADJ = ["很大", "很小", "很美", "很好", "很亮", "很高", "很安静", "很干净"]
ZH_PLACES = ["学校", "公园", "家里", "河边", "山上", "城里", "村子里", "图书馆"]


def zh_number(n: int) -> str:
    """0-99 in Chinese numerals."""
    if n < 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    head = "" if tens == 1 else ZH_DIGITS[tens]
    return head + "十" + (ZH_DIGITS[ones] if ones else "")


def counting(rng: random.Random) -> str:
    start = rng.randint(0, 60)
    length = rng.randint(8, 30)
    lines = [f"我们来数数，从 {start} 开始。"]
    for n in range(start, min(start + length, 99)):
        lines.append(rng.choice([f"{n} 后面是 {n + 1}。", f"{zh_number(n)}的下一个数是{zh_number(n + 1)}，写作 {n + 1}。",
                                 f"{n + 1} 前面的数是 {n}。"]))
    return "".join(lines)


def alphabet(rng: random.Random) -> str:
    start = rng.randint(0, 15)
    letters = string.ascii_lowercase[start: start + rng.randint(5, 10)]
    parts = [f"字母 {a} 的下一个字母是 {b}。" for a, b in zip(letters, letters[1:])]
    if rng.random() < 0.5:
        parts.append(f"In English: the letters {' '.join(letters)} come one after another.")
    return "".join(parts)


def sums(rng: random.Random) -> str:
    a = rng.randint(0, 9)
    rows = [f"{a} 加 {b} 等于 {a + b}。" for b in range(10)]
    return f"这是 {a} 的加法表。" + "".join(rows)


def comparisons(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(3, 8)):
        a, b = rng.sample(range(10), 2)
        out.append(rng.choice([f"{a} 和 {b} 比，{max(a, b)} 更大。", f"{a} 比 {b} {'大' if a > b else '小'}。",
                               f"{max(a, b)} is larger than {min(a, b)}. "]))
    return "".join(out).strip()


def story(rng: random.Random) -> str:
    words = rng.sample(ZH_WORDS, rng.randint(2, 5))
    place = rng.choice(ZH_PLACES)
    sentences = [f"在{place}，我看见了{'、'.join(words)}。"]
    for word in words:
        sentences.append(rng.choice([f"{word}{rng.choice(ZH_ADJ)}。", f"我喜欢{word}。", f"{word}在{place}。"]))
    if rng.random() < 0.3:
        english = rng.sample(EN_WORDS, 3)
        sentences.append(f"The English words of the day are {', '.join(english)}.")
    return "".join(sentences)


def lists(rng: random.Random) -> str:
    items = rng.sample(ZH_WORDS, rng.randint(3, 5))
    ordinals = ["第一", "第二", "第三", "第四", "第五"]
    return f"列表 {'、'.join(items)} 里，" + "，".join(f"{ordinals[k]}个是{item}" for k, item in enumerate(items)) + "。"


KINDS = [counting, alphabet, sums, comparisons, story, story, lists]


def generate(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(KINDS)(rng) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=600)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--out", default=str(Path(__file__).with_name("text_zh.txt")))
    args = parser.parse_args()
    documents = generate(args.documents, args.seed)
    Path(args.out).write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(documents)} documents, {sum(map(len, documents)):,} characters")


if __name__ == "__main__":
    main()
