"""python -m llama2_sft.export ckpt=PATH format=hf out=DIR [dtype=bf16]"""

from __future__ import annotations

import sys


def parse(argv: list[str]) -> dict:
    options = {"format": "hf", "dtype": "bf16", "device": "cpu"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("ckpt", "format", "out", "dtype", "quant", "device"):
            raise SystemExit(f"unknown argument {arg!r}; usage: python -m llama2_sft.export ckpt=PATH format=hf|gguf out=PATH [dtype=bf16|fp16|fp32] [quant=f16|q8_0|q4_0]")
        options[key] = value
    for key in ("ckpt", "out"):
        if key not in options:
            raise SystemExit(f"missing {key}=...")
    return options


def main(argv: list[str]) -> None:
    from llama2_sft.inference.load import load_model

    options = parse(argv)
    loaded = load_model(options["ckpt"], options["device"], "fp32")
    if options["format"] == "hf":
        from llama2_sft.export.hf import export_hf

        path = export_hf(loaded, options["out"], options["dtype"])
    elif options["format"] == "gguf":
        from llama2_sft.export.gguf import export_gguf

        path = export_gguf(loaded, options["out"], options.get("quant", "f16"))
    else:
        raise SystemExit(f"format={options['format']!r}: expected hf or gguf")
    print(f"exported {loaded.source} ({loaded.kind}) -> {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
