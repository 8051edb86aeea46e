"""Chat with a trained model.

    python infer.py ckpt=outputs/embedded prompt="3 加 4 等于几？"            # one answer, streamed
    python infer.py ckpt=outputs/embedded                                    # interactive (/reset, /system TEXT, /exit)
    python infer.py ckpt=outputs/embedded input=q.jsonl output=a.jsonl       # batch: {"messages": [...]} per line

ckpt may be a training run dir, one checkpoint (FSDP/DCP or DeepSpeed shards, consolidated on the fly) or a Hugging
Face model dir. Prompts are built by the same encode_dialog that built the training data.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig


def _system_prompt(cfg: DictConfig, loaded) -> str | None:
    from llama2_sft.inference.load import training_system_prompt
    from llama2_sft.data.sources import resolve_system_prompt

    if cfg.system == "default":
        return training_system_prompt(loaded)
    return resolve_system_prompt(cfg.system)


def _with_system(system: str | None, messages: list[dict]) -> list[dict]:
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _batch(cfg: DictConfig, loaded, sampling, system: str | None) -> None:
    from tqdm import tqdm

    from llama2_sft.data.chat import generation_prompt
    from llama2_sft.inference.generate import generate_ids

    with open(cfg.input, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    prompts = []
    for number, row in enumerate(rows, 1):
        messages = row.get("messages") or ([{"role": "user", "content": row["prompt"]}] if "prompt" in row else None)
        if not messages:
            raise ValueError(f"{cfg.input}:{number}: expected a 'messages' list or a 'prompt' string")
        try:
            prompts.append(generation_prompt(loaded.tokenizer, _with_system(system, messages)))
        except ValueError as error:
            raise ValueError(f"{cfg.input}:{number}: {error}") from error
    device = next(loaded.model.parameters()).device
    with open(cfg.output, "w", encoding="utf-8") as out:
        for start in tqdm(range(0, len(prompts), cfg.batch_size), desc="generating", unit="batch"):
            ids = generate_ids(loaded.model, prompts[start: start + cfg.batch_size], pad_id=loaded.tokenizer.pad_token_id,
                               eos_id=loaded.tokenizer.eos_token_id, sampling=sampling, device=device)
            for row, answer in zip(rows[start: start + cfg.batch_size], ids):
                row = dict(row, response=loaded.tokenizer.decode(answer, skip_special_tokens=True).strip())
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} answers to {cfg.output}")


def _interactive(cfg: DictConfig, loaded, sampling, system: str | None) -> None:
    from llama2_sft.inference.generate import chat_reply

    device = next(loaded.model.parameters()).device
    history: list[dict] = []
    print("chat with the model: /reset clears the history, /system TEXT sets the system prompt, /exit quits")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(history cleared)")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'removed'}; history cleared)")
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        result = chat_reply(loaded.model, loaded.tokenizer, _with_system(system, history), sampling, device,
                            on_text=lambda piece: print(piece, end="", flush=True), seed=cfg.seed)
        print()
        history.append({"role": "assistant", "content": result["text"]})


@hydra.main(config_path="conf", config_name="infer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from llama2_sft.inference.load import load_model
    from llama2_sft.inference.generate import SamplingConfig, chat_reply

    loaded = load_model(cfg.ckpt, cfg.device, cfg.dtype)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty)
    system = _system_prompt(cfg, loaded)
    if cfg.input:
        if not cfg.output:
            raise ValueError("batch mode needs output=FILE.jsonl as well as input=")
        _batch(cfg, loaded, sampling, system)
    elif cfg.prompt is not None:
        device = next(loaded.model.parameters()).device
        messages = _with_system(system, [{"role": "user", "content": str(cfg.prompt)}])
        chat_reply(loaded.model, loaded.tokenizer, messages, sampling, device,
                   on_text=lambda piece: print(piece, end="", flush=True), seed=cfg.seed)
        print()
    else:
        _interactive(cfg, loaded, sampling, system)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
