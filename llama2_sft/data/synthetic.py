"""Deterministic synthetic ShareGPT rows shaped like LinkSoul/instruction_merge_set, for tests and benchmarks.

Each row is ``{"id", "conversations": [{"from": "human"|"gpt", "value"}], "instruction"}``, as in the reference data
set. What is modelled (the data set itself cannot be fetched here):

* size: about 1.3 KB of UTF-8 per row on average (the JSON line), long-tailed (log-normal target sizes): most rows are
  a few hundred bytes, a few percent are 5-15 KB;
* 1-5 (user, assistant) turn pairs, mostly one;
* language: about half the rows Chinese-dominant (Chinese prose with some English terms and numbers), the rest
  English-dominant (with the odd Chinese phrase, e.g. translation requests);
* about 15% of rows carry a non-empty ``instruction`` (a system prompt); the rest get the default system prompt;
* about 12% of rows hold code (fenced, indented Python / JavaScript / shell), markdown lists and numbers appear too.

The text is assembled from embedded word and phrase lists, so it is not meaningful prose, but its characters, word
lengths, whitespace and script mix give token counts close to real text with the Llama-2 tokenizer (common CJK
characters are single pieces, rarer ones fall back to 3 byte pieces, as in real Chinese text).

``generate(n, seed)`` returns the same rows for the same arguments on every machine (one `random.Random(seed)`);
``write_jsonl`` saves them for ``dataset=jsonl dataset.source=...``; ``describe`` summarises sizes and mix.
"""

from __future__ import annotations

import json
import math
import random
import statistics

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary

EN_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so what can more about no out up into them some "
    "could time these two may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year off come since against go came right used take three "
    "system data model value function number result example answer question problem important different "
    "information process however following provide include support user application performance approach method "
    "analysis research develop experience research because customer business product service market language "
    "learning network design quality security health energy water environment community education student teacher "
    "history science technology computer software algorithm memory variable string integer return list table "
    "database server request response error message output input file directory configuration option parameter "
    "training dataset accuracy feature layer weight gradient loss batch token sequence attention transformer "
    "recommend consider ensure improve increase reduce create manage maintain describe explain summarize translate "
    "write rewrite generate classify identify compare evaluate calculate determine suggest briefly carefully "
    "typically usually generally specifically significantly especially additionally therefore furthermore"
).split()
EN_TERMS = EN_WORDS + ["AI", "GPT", "Python", "API", "Excel", "iPhone", "CPU", "SQL", "PDF", "ChatGPT"]

EN_PUNCT_END = (".", ".", ".", ".", "?", "!", ":")

# Common Chinese words (most characters are single pieces in the Llama-2 vocabulary; some are not, as in real text).
ZH_WORDS = (
    "我们 你们 他们 这个 那个 什么 怎么 为什么 可以 需要 应该 已经 如果 因为 所以 但是 而且 或者 虽然 然后 "
    "问题 答案 方法 系统 数据 模型 用户 时间 工作 学习 生活 社会 经济 发展 技术 研究 分析 结果 影响 重要 "
    "主要 不同 一些 许多 能够 进行 提供 使用 通过 关于 以及 其中 例如 首先 其次 最后 总之 另外 同时 "
    "中国 国家 世界 城市 地区 公司 企业 市场 产品 服务 管理 教育 学生 老师 学校 健康 医疗 环境 能源 "
    "文化 历史 科学 知识 信息 网络 计算机 软件 程序 代码 算法 函数 变量 文件 数据库 服务器 请求 "
    "回答 解释 描述 总结 翻译 写作 生成 改写 判断 比较 评价 计算 建议 推荐 考虑 确保 提高 降低 "
    "非常 比较 特别 尤其 一般 通常 可能 必须 能力 质量 安全 效率 成本 价格 客户 团队 项目 计划 "
    "目标 任务 过程 方式 方面 因素 条件 原因 情况 内容 部分 作用 意义 价值 标准 规则 要求 "
    "孩子 父母 朋友 家庭 食物 天气 旅行 运动 音乐 电影 书籍 故事 文章 句子 词语 语言 英文 中文 "
    "北京 上海 春天 夏天 秋天 冬天 早上 晚上 今天 明天 去年 现在 未来 过去 经验 感受 心情 "
    "简单 复杂 清楚 准确 有效 合理 积极 消极 快速 缓慢 容易 困难 新的 旧的 大的 小的 "
    "了 的 是 在 有 和 就 不 人 都 一 上 也 很 到 说 要 去 会 着 没有 看 好 自己 这 那 "
    "垃圾 分类 污染 气候 变化 碳排放 疫苗 病毒 症状 治疗 饮食 睡眠 锻炼 压力 焦虑 沟通 "
    "贷款 利率 投资 股票 基金 保险 税收 工资 消费 储蓄 预算 供应链 物流 电商 直播 短视频"
).split()

ZH_PUNCT_MID = ("，", "，", "，", "、", "；")
ZH_PUNCT_END = ("。", "。", "。", "？", "！", "：")

ZH_INSTRUCTIONS = (
    "你是一个乐于助人的助手，请用中文回答用户的问题。",
    "请根据给定的内容，简洁准确地回答问题，不要编造信息。",
    "你是一名经验丰富的老师，请耐心、详细地解释每一个步骤。",
    "请将下面的内容翻译成英文，保持原意，语言自然流畅。",
    "作为一名专业的程序员，请给出可以运行的代码并解释关键部分。",
)
EN_INSTRUCTIONS = (
    "You are a helpful assistant. Answer concisely and accurately.",
    "You are an AI assistant that helps people find information. Provide a detailed answer so the user does not "
    "need to search outside to understand the answer.",
    "You are a teacher. Given a task, explain in simple steps what the task is asking, any guidelines it provides "
    "and how to use those guidelines to find the answer.",
    "User will give you a task. Your goal is to complete the task as faithfully as you can. While performing the "
    "task think step-by-step and justify your steps.",
    "You are a senior software engineer. Write clean, well documented code.",
)

ZH_REQUESTS = ("请解释一下", "帮我写一段关于", "如何理解", "请总结下面这段话：", "请问", "给我一些建议，关于",
               "请把下面的句子翻译成英文：", "用简单的语言说明", "请列出", "为什么")
EN_REQUESTS = ("Explain", "Write a short paragraph about", "Summarize the following text:", "What is",
               "Give me some tips on", "Translate the following sentence into Chinese:", "How do I",
               "Classify the sentiment of this review:", "List", "Why does")

CODE_SNIPPETS = (
    "def {name}({arg}):\n    \"\"\"{doc}\"\"\"\n    result = []\n    for item in {arg}:\n        if item is None:\n"
    "            continue\n        result.append(item * {num})\n    return result\n",
    "class {cname}:\n    def __init__(self, {arg}):\n        self.{arg} = {arg}\n\n    def {name}(self):\n"
    "        total = 0\n        for i in range({num}):\n            total += self.{arg}[i]\n        return total\n",
    "import json\n\nwith open(\"{arg}.json\", encoding=\"utf-8\") as f:\n    data = json.load(f)\n\n"
    "for key, value in data.items():\n    print(f\"{{key}}: {{value}}\")\n",
    "function {name}({arg}) {{\n  const out = [];\n  for (let i = 0; i < {arg}.length; i++) {{\n"
    "    if ({arg}[i] > {num}) {{\n      out.push({arg}[i]);\n    }}\n  }}\n  return out;\n}}\n",
    "SELECT {arg}, COUNT(*) AS n\nFROM {cname}\nWHERE created_at >= '2023-0{digit}-01'\nGROUP BY {arg}\n"
    "ORDER BY n DESC\nLIMIT {num};\n",
    "#!/bin/bash\nfor f in *.{arg}; do\n    echo \"processing $f\"\n    python {name}.py --input \"$f\" --limit {num}\n"
    "done\n",
)
CODE_LANGS = ("python", "python", "python", "javascript", "sql", "bash")
CODE_NAMES = ("process_data", "load_config", "compute_total", "parse_line", "train_model", "filter_items",
              "get_user", "update_cache", "merge_lists", "run_task")
CODE_ARGS = ("items", "values", "records", "numbers", "users", "rows", "config", "scores")
CODE_CLASSES = ("DataLoader", "UserService", "Counter", "Matrix", "Inventory", "orders", "events")


# ----------------------------------------------------------------------------------------------------------------
# Text pieces


def _en_sentence(rng: random.Random, zh_share: float) -> str:
    words = [rng.choice(EN_WORDS) for _ in range(rng.randint(5, 22))]
    if rng.random() < 0.25:
        words.insert(rng.randrange(len(words)), str(rng.choice((rng.randint(0, 100), rng.randint(1000, 2030)))))
    if zh_share and rng.random() < zh_share:
        words.insert(rng.randrange(len(words)), "".join(rng.choice(ZH_WORDS) for _ in range(rng.randint(1, 3))))
    words[0] = words[0].capitalize()
    if rng.random() < 0.2:
        words[rng.randrange(1, len(words))] += ","
    return " ".join(words) + rng.choice(EN_PUNCT_END)


def _zh_sentence(rng: random.Random, en_share: float) -> str:
    parts = []
    for clause in range(rng.randint(1, 3)):
        words = []
        for _ in range(rng.randint(3, 9)):
            if rng.random() < en_share:
                words.append((" " if rng.random() < 0.6 else "") + rng.choice(EN_TERMS)
                             + (" " if rng.random() < 0.6 else ""))
            elif rng.random() < 0.06:
                words.append(str(rng.randint(1, 2024)))
            else:
                words.append(rng.choice(ZH_WORDS))
        parts.append("".join(words))
    return "".join(p + rng.choice(ZH_PUNCT_MID) for p in parts[:-1]) + parts[-1] + rng.choice(ZH_PUNCT_END)


def _code_block(rng: random.Random) -> str:
    k = rng.randrange(len(CODE_SNIPPETS))
    body = CODE_SNIPPETS[k].format(
        name=rng.choice(CODE_NAMES), arg=rng.choice(CODE_ARGS), cname=rng.choice(CODE_CLASSES),
        num=rng.randint(2, 100), digit=rng.randint(1, 9), doc=rng.choice(("Return the scaled items.",
                                                                           "处理输入数据并返回结果。")))
    return f"```{CODE_LANGS[k]}\n{body}```"


def _text(rng: random.Random, zh: bool, target_bytes: int, code: bool, allow_list: bool) -> str:
    """Prose (and optionally a list / a code block) of about `target_bytes` UTF-8 bytes."""
    target_bytes = max(target_bytes, 8)
    paragraphs: list[str] = []
    size = 0
    code_done = not code
    while size < target_bytes:
        if not code_done and (size > target_bytes * 0.3 or rng.random() < 0.3):
            block = _code_block(rng)
            code_done = True
        elif allow_list and rng.random() < 0.12:
            block = "\n".join(
                f"{i}. " + (_zh_sentence(rng, 0.05) if zh else _en_sentence(rng, 0.0)) for i in range(1, rng.randint(3, 6))
            )
        else:
            sentences = []
            for _ in range(rng.randint(1, 4)):
                sentences.append(_zh_sentence(rng, 0.06) if zh else _en_sentence(rng, 0.03))
            block = ("" if zh else " ").join(sentences)
        paragraphs.append(block)
        size += len(block.encode("utf-8")) + 2
    text = "\n\n".join(paragraphs)
    if len(paragraphs) == 1 and len(text.encode("utf-8")) > target_bytes * 1.5 and not code:
        # a single short answer: cut to size at a character boundary ("YES", "北京", a number ...)
        text = text.encode("utf-8")[: target_bytes].decode("utf-8", errors="ignore").strip() or text[:4]
    return text


def _request(rng: random.Random, zh: bool, target_bytes: int, code: bool) -> str:
    head = rng.choice(ZH_REQUESTS if zh else EN_REQUESTS)
    body = _text(rng, zh, target_bytes - len(head.encode("utf-8")), code=False, allow_list=False)
    if code and rng.random() < 0.5:  # "what does this code do?" prompts carry the code themselves
        body += "\n\n" + _code_block(rng)
    return head + ("" if zh else " ") + body


# ----------------------------------------------------------------------------------------------------------------
# Rows

TURN_WEIGHTS = (0.62, 0.16, 0.10, 0.07, 0.05)  # 1..5 (user, assistant) pairs
# Log-normal row size (content bytes, before the JSON overhead): median ~520 B; clipped to [60 B, 12.5 KB].
SIZE_MU, SIZE_SIGMA = math.log(520), 1.05
SIZE_MIN, SIZE_MAX = 60, 12_500


def _row(rng: random.Random, index: int, seed: int) -> dict:
    zh = rng.random() < 0.5
    code = rng.random() < 0.12
    pairs = rng.choices(range(1, 6), TURN_WEIGHTS)[0]
    total = int(min(SIZE_MAX, max(SIZE_MIN, rng.lognormvariate(SIZE_MU, SIZE_SIGMA))))
    instruction = ""
    if rng.random() < 0.15:
        instruction = rng.choice(ZH_INSTRUCTIONS if zh else EN_INSTRUCTIONS)
    # Per pair: the user gets ~25% of the pair's bytes (at least a short question), the assistant the rest.
    shares = [rng.uniform(0.5, 1.5) for _ in range(pairs)]
    conversations = []
    for p, share in enumerate(shares):
        pair_bytes = total * share / sum(shares)
        user_bytes = max(12, int(pair_bytes * rng.uniform(0.1, 0.4)))
        answer_bytes = max(2, int(pair_bytes - user_bytes))
        with_code = code and p == 0
        conversations.append({"from": "human", "value": _request(rng, zh, user_bytes, with_code)})
        conversations.append({"from": "gpt", "value": _text(rng, zh, answer_bytes, code=with_code, allow_list=True)})
    return {"id": f"gen-{seed}-{index:08d}", "conversations": conversations, "instruction": instruction}


def generate(n: int, seed: int = 0) -> list[dict]:
    """`n` rows, identical for the same (n, seed) on every machine; a prefix of generate(m, seed) for m > n."""
    rng = random.Random(seed)
    return [_row(rng, i, seed) for i in range(n)]


def row_bytes(row: dict) -> int:
    """UTF-8 size of the row as one JSON line (what a jsonl file of the data set holds)."""
    return len(json.dumps(row, ensure_ascii=False).encode("utf-8")) + 1


def is_chinese_dominant(row: dict) -> bool:
    """Whether the row's text is mostly Chinese (CJK characters weighed against Latin letters)."""
    text = "".join(t["value"] for t in row["conversations"])
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    latin = sum(1 for ch in text if ch.isascii() and ch.isalpha())
    return cjk > latin / 4  # a CJK character carries about as much as a 4-letter English word


def describe(rows: list[dict]) -> dict:
    """Sizes (bytes per JSON line), turn counts and language / instruction / code shares of `rows`."""
    sizes = sorted(row_bytes(r) for r in rows)
    pairs = [len(r["conversations"]) // 2 for r in rows]
    q = lambda f: sizes[min(len(sizes) - 1, int(f * len(sizes)))]  # noqa: E731
    return {
        "rows": len(rows),
        "mean_bytes": round(statistics.fmean(sizes), 1),
        "median_bytes": q(0.5),
        "p90_bytes": q(0.9),
        "p99_bytes": q(0.99),
        "max_bytes": sizes[-1],
        "share_over_5KB": round(sum(s > 5000 for s in sizes) / len(sizes), 4),
        "pairs_histogram": {k: pairs.count(k) for k in range(1, 6)},
        "share_chinese_dominant": round(sum(map(is_chinese_dominant, rows)) / len(rows), 3),
        "share_with_instruction": round(sum(bool(r["instruction"]) for r in rows) / len(rows), 3),
        "share_with_code": round(sum("```" in "".join(t["value"] for t in r["conversations"]) for r in rows) / len(rows), 3),
    }


def write_jsonl(rows: list[dict], path: str) -> None:
    """One JSON object per line, UTF-8 (what `dataset=jsonl` reads)."""
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
