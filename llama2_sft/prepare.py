"""Build the token cache before training (e.g. on a CPU node before the GPUs are allocated):

    python -m llama2_sft.prepare +experiment=sft_7b [dataset.num_proc=64]

Takes the same overrides as train.py and writes the cache train.py will then load in seconds.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from llama2_sft.config import register_configs
    from llama2_sft.data.tokenize import format_summary, prepare_dataset
    from llama2_sft.model import load_tokenizer, tokenizer_path

    register_configs()
    conf_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(version_base="1.3", config_dir=conf_dir):
        cfg = compose(config_name="train", overrides=argv)
    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare_dataset(cfg.dataset, tokenizer, tokenizer_path(cfg.model))
    print(f"token cache: {prepared.path}\n{format_summary(prepared.summary)}")


if __name__ == "__main__":
    main(sys.argv[1:])
