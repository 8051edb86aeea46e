"""Gradio chat with a trained model: streaming, retry, undo, stop and clear.

    python -m llama2_sft.serve.demo ckpt=outputs/embedded                      # http://127.0.0.1:7860
    python -m llama2_sft.serve.demo ckpt=PATH port=7861 host=0.0.0.0 device=cuda dtype=bf16 share=false

ckpt is anything `llama2_sft.inference.load.load_model` accepts (run dir, checkpoint dir, LoRA run, Hugging Face
dir); the settings are `conf/demo.yaml`. The system prompt box starts with the prompt training used; the chat
history becomes alternating user/assistant messages and every answer is streamed by the one chat generator
(`llama2_sft.inference.chat`), so the prompt is built by the same `encode_dialog` that built the training data. One
generation runs at a time (queue concurrency 1, plus the generator's lock, which also covers a generation that is
still winding down after Stop).

Endpoints (also usable with `gradio_client`): /chat (message, history, system, temperature, top_p, max_new_tokens)
-> ("", history), /retry (history, system, temperature, top_p, max_new_tokens) -> history, /undo (history) ->
(history, message), /clear () -> (history, message). The generating ones stream.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, Iterator

import hydra
from omegaconf import DictConfig

from llama2_sft.config import CONF_DIR, FREE_TEXT_KEYS, free_text_argv, register_app_configs

if TYPE_CHECKING:  # torch is imported when a model is served, not when the command line is checked
    from llama2_sft.inference.chat import ChatGenerator
    from llama2_sft.inference.generate import SamplingConfig

log = logging.getLogger(__name__)

# Slider defaults: Meta's llama-2 chat example settings.
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_NEW_TOKENS = 512
MAX_NEW_TOKENS_LIMIT = 2048


def message_text(content: Any) -> str:
    """Chatbot message content (a string, a {"type": "text", "text": ...} part, or a list of parts) -> plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if content.get("type", "text") == "text" and isinstance(content.get("text"), str):
            return content["text"]
        return ""  # files / components: a text-only model does not see them
    if isinstance(content, (list, tuple)):
        return "\n".join(text for text in (message_text(part) for part in content) if text)
    return str(content)


def history_to_messages(history: list[dict] | None) -> list[dict]:
    """Chatbot history -> alternating user/assistant messages (consecutive same-role messages merged)."""
    messages: list[dict] = []
    for message in history or []:
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        if role not in ("user", "assistant"):
            continue
        text = message_text(content)
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def sampling_from_controls(temperature: float, top_p: float, max_new_tokens: float) -> SamplingConfig:
    """The three sliders -> SamplingConfig (temperature 0 = greedy)."""
    from llama2_sft.inference.generate import SamplingConfig

    return SamplingConfig(max_new_tokens=max(1, int(round(float(max_new_tokens)))), temperature=float(temperature),
                          top_p=float(top_p))


def stream_reply(generator: ChatGenerator, history: list[dict] | None, system: str | None,
                 sampling: SamplingConfig) -> Iterator[str]:
    """Yield the growing reply to the chat `history`; the last value is the whole reply as the generator returns it.

    Closing the iterator (Stop, Clear, a closed tab) cancels the generation at its next token. Bad input (a
    malformed history, a prompt longer than the context) raises ValueError.
    """
    prompt = generator.prepare(history_to_messages(history), system)
    text = ""
    with generator.stream(prompt, sampling) as stream:
        for piece in stream:
            text += piece
            yield text.lstrip()
    if stream.result is not None:
        yield stream.result["text"]


def build_demo(loaded: Any, default_system: str | None):
    """The Gradio app for `loaded` (a `LoadedModel`), with `default_system` in the system prompt box."""
    import gradio as gr

    from llama2_sft.inference.chat import ChatGenerator

    generator = ChatGenerator(loaded)
    context = getattr(loaded.model.config, "max_position_embeddings", None) or MAX_NEW_TOKENS_LIMIT
    max_tokens_limit = max(1, min(MAX_NEW_TOKENS_LIMIT, int(context)))

    def reply_into(history: list[dict], system: str, temperature: float, top_p: float,
                   max_new_tokens: float) -> Iterator[list[dict]]:
        sampling = sampling_from_controls(temperature, top_p, max_new_tokens)
        try:
            for text in stream_reply(generator, history, system, sampling):
                yield history + [{"role": "assistant", "content": text}]
        except ValueError as error:  # malformed history, prompt too long, ...
            raise gr.Error(str(error)) from error

    def chat(message: str, history: list[dict], system: str, temperature: float, top_p: float,
             max_new_tokens: float):
        """Add `message` to the history and stream the assistant's answer."""
        history = list(history or [])
        if not message or not message.strip():
            yield message, history
            return
        history.append({"role": "user", "content": message})
        yield "", history
        for updated in reply_into(history, system, temperature, top_p, max_new_tokens):
            yield "", updated

    def retry(history: list[dict], system: str, temperature: float, top_p: float, max_new_tokens: float):
        """Drop the last answer and generate it again."""
        history = list(history or [])
        while history and history[-1].get("role") != "user":
            history.pop()
        if not history:
            yield history
            return
        yield history
        yield from reply_into(history, system, temperature, top_p, max_new_tokens)

    def undo(history: list[dict]):
        """Remove the last exchange and put its question back in the textbox."""
        history = list(history or [])
        while history and history[-1].get("role") != "user":
            history.pop()
        if not history:
            return history, ""
        last = history.pop()
        return history, message_text(last.get("content"))

    def clear():
        return [], ""

    with gr.Blocks(title="llama2_sft chat", analytics_enabled=False) as demo:
        gr.Markdown(f"### llama2_sft chat\n`{loaded.source}` ({loaded.kind})")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=520, elem_id="chatbot")
                with gr.Row():
                    textbox = gr.Textbox(label="Message", placeholder="Type a message and press Enter",
                                         lines=1, scale=5, autofocus=True, elem_id="message")
                    send_button = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    retry_button = gr.Button("Retry", elem_id="retry")
                    undo_button = gr.Button("Undo", elem_id="undo")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear_button = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1):
                system_box = gr.Textbox(label="System prompt", value=default_system or "", lines=8,
                                        elem_id="system_prompt")
                temperature = gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature",
                                        info="0 = greedy", elem_id="temperature")
                top_p = gr.Slider(0.0, 1.0, value=DEFAULT_TOP_P, step=0.05, label="Top-p", elem_id="top_p")
                max_new_tokens = gr.Slider(1, max_tokens_limit, value=min(DEFAULT_MAX_NEW_TOKENS, max_tokens_limit),
                                           step=1, label="Max new tokens", elem_id="max_new_tokens")

        controls = [system_box, temperature, top_p, max_new_tokens]
        generating = dict(concurrency_limit=1, concurrency_id="generate")
        chat_event = textbox.submit(chat, [textbox, chatbot, *controls], [textbox, chatbot], api_name="chat",
                                    **generating)
        send_event = send_button.click(chat, [textbox, chatbot, *controls], [textbox, chatbot],
                                       api_visibility="private", **generating)
        retry_event = retry_button.click(retry, [chatbot, *controls], [chatbot], api_name="retry", **generating)
        icon_retry_event = chatbot.retry(retry, [chatbot, *controls], [chatbot], api_visibility="private",
                                         **generating)
        running = [chat_event, send_event, retry_event, icon_retry_event]
        undo_button.click(undo, [chatbot], [chatbot, textbox], api_name="undo", cancels=running, queue=False)
        chatbot.undo(undo, [chatbot], [chatbot, textbox], api_visibility="private", cancels=running, queue=False)
        stop_button.click(None, None, None, cancels=running, queue=False, api_visibility="private")
        clear_button.click(clear, None, [chatbot, textbox], api_name="clear", cancels=running, queue=False)
        chatbot.clear(clear, None, [chatbot, textbox], api_visibility="private", cancels=running, queue=False)

    demo.queue(default_concurrency_limit=1)
    return demo


@hydra.main(config_path=CONF_DIR, config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Load `cfg.ckpt` and serve the chat page (conf/demo.yaml)."""
    from llama2_sft.inference.load import load_model, system_prompt_setting

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = load_model(cfg.ckpt, cfg.device.value, cfg.dtype.value, base=cfg.base)
    log.info("loaded %s (%s) on %s", loaded.source, loaded.kind, next(loaded.model.parameters()).device)
    demo = build_demo(loaded, system_prompt_setting(loaded, cfg.system))
    demo.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, show_error=True)


if __name__ == "__main__":
    register_app_configs()
    sys.argv = free_text_argv(sys.argv, FREE_TEXT_KEYS["demo"])  # prompt=你好 as typed
    main()
