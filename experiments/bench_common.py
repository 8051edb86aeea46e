"""What the benchmarks in this folder record about the machine they ran on."""

from __future__ import annotations

import importlib
import os
import platform


def machine_info(*packages: str) -> dict:
    """CPU model, core count, Python and platform, and the `__version__` of each named package."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    info.update({name: importlib.import_module(name).__version__ for name in packages})
    return info
