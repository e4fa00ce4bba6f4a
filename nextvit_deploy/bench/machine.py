"""What a bench run measures on: machine labels, CPU features, and which backends run here.

Each backend module answers for itself (``availability()`` in ``nextvit_deploy.backends.*``); this module
only maps bench's backend names onto them, so ``bench``, ``doctor`` and errors read one source.
"""
from __future__ import annotations

import difflib
import importlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from ..backends.base import Availability
from ..cpuinfo import cpu_flags, cpu_name, int8_weight_bits
from ..errors import BadInput
from .types import BACKENDS

__all__ = ["cpu_name", "cpu_flags", "int8_weight_bits", "machine_labels", "backend_status"]

# bench backend name -> (backends module, keyword options of its availability())
_AVAILABILITY: dict[str, tuple[str, dict[str, Any]]] = {
    "torch": ("nextvit_deploy.backends.torch", {}),
    "torch-cudagraph": ("nextvit_deploy.backends.torch", {"graphs": True}),
    "onnxruntime": ("nextvit_deploy.backends.onnxrt", {}),
    "tensorrt": ("nextvit_deploy.backends.tensorrt", {}),
    "coreml": ("nextvit_deploy.backends.coreml", {}),
}


def machine_labels(threads: int) -> dict[str, Any]:
    """What the numbers were measured on: CPU, flags, cores, load, OS, GPU, versions, threads."""
    import torch

    from ..artifact import tool_versions

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {
        "host": platform.node(), "cpu": cpu_name(), "cpu_flags": list(cpu_flags()), "cores": os.cpu_count(),
        "load_average": load, "os": platform.platform(), "python": platform.python_version(), "gpu": gpu,
        "threads": threads, "versions": tool_versions("timm", "onnxsim", "tensorrt", "coremltools", "numpy"),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]) if sys.argv else "",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def backend_status(name: str, *, precision: str = "fp32") -> Availability:
    """Whether backend ``name`` runs on this machine in ``precision``, and if not, why (the backend's own answer)."""
    if name not in _AVAILABILITY:
        close = difflib.get_close_matches(name, BACKENDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise BadInput(f"unknown backend {name!r}{hint}: choose from {', '.join(BACKENDS)}")
    module, options = _AVAILABILITY[name]
    return importlib.import_module(module).availability(precision, **options)
