"""Chat with a trained model.

    python infer.py ckpt=outputs/embedded "prompt=3 加 4 等于几？"            # one answer, streamed (free text as typed)
    python infer.py ckpt=outputs/embedded                                    # interactive (/reset, /system TEXT, /exit)
    python infer.py ckpt=outputs/embedded input=q.jsonl output=a.jsonl       # batch: {"messages": [...]} per line

ckpt may be a training run dir, one checkpoint (FSDP/DCP or DeepSpeed shards, consolidated on the fly; a LoRA / QLoRA
run merged into its base, or into base=PATH) or a Hugging Face model dir. Settings: conf/infer.yaml (schema: InferConfig in llama2_sft/config.py). Prompts are built by the
same encode_dialog that built the training data; answers come from the one chat generator the API and the demo use.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from llama2_sft.config import CONF_DIR, FREE_TEXT_KEYS, free_text_argv, register_app_configs


def _batch(cfg: DictConfig, generator, sampling, system: str | None) -> None:
    from tqdm import tqdm

    from llama2_sft.inference.generate import decode_reply, generate_ids

    with open(cfg.input, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    prompts = []
    for number, row in enumerate(rows, 1):
        messages = row.get("messages") or ([{"role": "user", "content": row["prompt"]}] if "prompt" in row else None)
        if not messages:
            raise ValueError(f"{cfg.input}:{number}: expected a 'messages' list or a 'prompt' string")
        try:
            prompts.append(generator.prepare(messages, system).ids)
        except ValueError as error:
            raise ValueError(f"{cfg.input}:{number}: {error}") from error
    tokenizer = generator.tokenizer
    with open(cfg.output, "w", encoding="utf-8") as out:
        for start in tqdm(range(0, len(prompts), cfg.batch_size), desc="generating", unit="batch"):
            ids = generate_ids(generator.model, prompts[start: start + cfg.batch_size], pad_id=tokenizer.pad_token_id,
                               eos_id=tokenizer.eos_token_id, sampling=sampling, device=generator.device)
            for row, answer in zip(rows[start: start + cfg.batch_size], ids):
                row = dict(row, response=decode_reply(tokenizer, answer).strip())  # as a streamed reply reads
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} answers to {cfg.output}")


def _answer(generator, messages: list[dict], system: str | None, sampling, seed: int) -> str | None:
    """Print the reply to `messages` as it streams; Ctrl-C stops it. The reply, or None when stopped."""
    prompt = generator.prepare(messages, system)
    with generator.stream(prompt, sampling, seed=seed) as stream:
        try:
            for piece in stream:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stream.cancel()
            print(" (stopped)", end="")
    print()
    return None if stream.result is None else stream.result["text"]


def _interactive(cfg: DictConfig, generator, sampling, system: str | None) -> None:
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
        print("assistant> ", end="", flush=True)
        try:
            reply = _answer(generator, [*history, {"role": "user", "content": text}], system, sampling, cfg.seed)
        except ValueError as error:  # e.g. the conversation outgrew the context: say so and keep the chat going
            print(f"\n(error: {error}; /reset starts over)")
            continue
        if reply is not None:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


@hydra.main(config_path=CONF_DIR, config_name="infer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from llama2_sft.inference.chat import ChatGenerator
    from llama2_sft.inference.generate import SamplingConfig
    from llama2_sft.inference.load import load_model, system_prompt_setting

    if cfg.input and not cfg.output:
        raise ValueError("batch mode needs output=FILE.jsonl as well as input=")
    loaded = load_model(cfg.ckpt, cfg.device.value, cfg.dtype.value, base=cfg.base)
    generator = ChatGenerator(loaded)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty)
    system = system_prompt_setting(loaded, cfg.system)
    if cfg.input:
        _batch(cfg, generator, sampling, system)
    elif cfg.prompt is not None:
        _answer(generator, [{"role": "user", "content": str(cfg.prompt)}], system, sampling, cfg.seed)
    else:
        _interactive(cfg, generator, sampling, system)
    sys.stdout.flush()


if __name__ == "__main__":
    register_app_configs()
    sys.argv = free_text_argv(sys.argv, FREE_TEXT_KEYS["infer"])  # prompt=你好 as typed
    main()
