"""Exporters: a consolidated checkpoint -> Hugging Face safetensors dir (`hf.py`) or a GGUF file (`gguf.py`); a LoRA
run's adapters -> a stock PEFT adapter dir (`adapter.py`)."""
