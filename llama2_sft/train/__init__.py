"""The training loop and its components: the step, validation, checkpointing, metrics. The loop only calls them;
each owns its own cadence and arithmetic (the torchtitan way)."""
