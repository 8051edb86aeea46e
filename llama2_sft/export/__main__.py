"""python -m llama2_sft.export ckpt=PATH format=hf|gguf|peft out=PATH [dtype=bf16] [quant=f16] [base=PATH]
(settings: conf/export.yaml)"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llama2_sft.config import CONF_DIR, ExportFormat, register_app_configs


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Consolidate `cfg.ckpt` in fp32 (a LoRA run merged into its base) and write it in `cfg.format`; format=peft
    writes a LoRA run's adapters alone (its base is not loaded)."""
    from llama2_sft.inference.load import load_adapters, load_model

    out = cfg.out  # a missing out= fails here, naming it, before the checkpoint is loaded
    if cfg.format == ExportFormat.peft:
        from llama2_sft.export.adapter import export_peft

        adapters = load_adapters(cfg.ckpt, base=cfg.base)
        path = export_peft(adapters, out)
        print(f"exported the adapters of {adapters.source} (base {adapters.base}) -> {path}")
        return
    loaded = load_model(cfg.ckpt, cfg.device.value, "fp32", base=cfg.base)
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
