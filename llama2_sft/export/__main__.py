"""python -m llama2_sft.export ckpt=PATH format=hf|gguf out=PATH [dtype=bf16] [quant=f16] (settings: conf/export.yaml)"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llama2_sft.config import CONF_DIR, ExportFormat, register_app_configs


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Consolidate `cfg.ckpt` in fp32 and write it in `cfg.format`."""
    from llama2_sft.inference.load import load_model

    out = cfg.out  # a missing out= fails here, naming it, before the checkpoint is loaded
    loaded = load_model(cfg.ckpt, cfg.device.value, "fp32")
    if cfg.format == ExportFormat.hf:
        from llama2_sft.export.hf import export_hf

        path = export_hf(loaded, out, cfg.dtype.value)
    else:
        from llama2_sft.export.gguf import export_gguf

        path = export_gguf(loaded, out, cfg.quant.value)
    print(f"exported {loaded.source} ({loaded.kind}) -> {path}")


if __name__ == "__main__":
    register_app_configs()
    main()
