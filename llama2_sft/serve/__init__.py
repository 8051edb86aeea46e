"""Serving: the original `{"prompt", "history"}` API and an OpenAI-compatible one (`api.py`), and a web demo (`demo.py`)."""
