"""Exporters: a consolidated checkpoint -> Hugging Face safetensors dir (`hf.py`) or a GGUF file (`gguf.py`)."""
