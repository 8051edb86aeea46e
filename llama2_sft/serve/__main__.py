"""python -m llama2_sft.serve ckpt=PATH [port=8000] [host=127.0.0.1] [api_key=KEY] ... (settings: conf/serve.yaml)"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from llama2_sft.config import CONF_DIR, FREE_TEXT_KEYS, free_text_argv, register_app_configs


@hydra.main(config_path=CONF_DIR, config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Load `cfg.ckpt` and serve the HTTP API (see `llama2_sft.serve.api`)."""
    import uvicorn

    from llama2_sft.inference.load import load_model, system_prompt_setting
    from llama2_sft.serve.api import ServeSettings, create_app

    loaded = load_model(cfg.ckpt, cfg.device.value, cfg.dtype.value, base=cfg.base)
    settings = ServeSettings(model_name=os.path.basename(os.path.normpath(cfg.ckpt)), max_queue=cfg.max_queue,
                             max_new_tokens_limit=cfg.max_new_tokens_limit, api_key=cfg.api_key or None,
                             system_prompt=system_prompt_setting(loaded, cfg.system))
    uvicorn.run(create_app(loaded, settings), host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    register_app_configs()
    sys.argv = free_text_argv(sys.argv, FREE_TEXT_KEYS["serve"])  # prompt=你好 as typed
    main()
