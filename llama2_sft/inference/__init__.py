"""Inference: load any saved checkpoint (`load.py`) and generate from it (`generate.py`, `chat.py`)."""
