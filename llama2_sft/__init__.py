"""llama2_sft: supervised fine-tuning of Llama-2 chat models."""

__version__ = "0.1.0"
