"""Strategies: how the model and optimizer are placed and stepped (single device, DDP, FSDP2, DeepSpeed ZeRO).
The loop talks to `Strategy` only; a strategy is chosen by `strategy._target_` in the config."""

from llama2_sft.strategy.base import ModelFactory, StepOutcome, StepSettings, Strategy

__all__ = ["ModelFactory", "StepOutcome", "StepSettings", "Strategy"]
