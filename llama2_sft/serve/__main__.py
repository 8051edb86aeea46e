"""python -m llama2_sft.serve ckpt=PATH [port=8000] [host=127.0.0.1] [api_key=...] [max_queue=8] [device=auto] [dtype=auto]"""

from __future__ import annotations

import os
import sys

USAGE = "usage: python -m llama2_sft.serve ckpt=PATH [port=8000] [host=127.0.0.1] [api_key=KEY] [max_queue=8] [max_new_tokens_limit=2048] [device=auto] [dtype=auto] [system=default|none|TEXT]"


def main(argv: list[str]) -> None:
    import uvicorn

    from llama2_sft.inference.load import load_model, training_system_prompt
    from llama2_sft.data.sources import resolve_system_prompt
    from llama2_sft.serve.api import ServeSettings, create_app

    options = {"port": "8000", "host": "127.0.0.1", "device": "auto", "dtype": "auto", "max_queue": "8",
               "max_new_tokens_limit": "2048", "system": "default", "api_key": os.environ.get("LLAMA2_SFT_API_KEY")}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in (*options, "ckpt"):
            raise SystemExit(f"unknown argument {arg!r}\n{USAGE}")
        options[key] = value
    if "ckpt" not in options:
        raise SystemExit(USAGE)
    loaded = load_model(options["ckpt"], options["device"], options["dtype"])
    system = training_system_prompt(loaded) if options["system"] == "default" else resolve_system_prompt(options["system"])
    settings = ServeSettings(model_name=os.path.basename(os.path.normpath(options["ckpt"])), max_queue=int(options["max_queue"]),
                             max_new_tokens_limit=int(options["max_new_tokens_limit"]), api_key=options["api_key"] or None,
                             system_prompt=system)
    uvicorn.run(create_app(loaded, settings), host=options["host"], port=int(options["port"]), log_level="info")


if __name__ == "__main__":
    main(sys.argv[1:])
