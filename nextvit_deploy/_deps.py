"""Optional dependencies, imported only inside the functions that need them.

``require("tensorrt")`` returns the module or raises :class:`MissingDependency` naming the install
command; ``available("coremltools")`` answers without importing (``importlib.util.find_spec``).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import warnings
from types import ModuleType

from .errors import MissingDependency

__all__ = ["require", "available", "import_coremltools", "INSTALL_HINTS"]

# module -> how to install it (one line, shown verbatim in errors and in `nextvit-deploy doctor`)
INSTALL_HINTS: dict[str, str] = {
    "tensorrt": "pip install 'nextvit-deploy[trt]' (needs an NVIDIA GPU with a CUDA driver; "
                "its wheels fetch their libraries from NVIDIA's package index)",
    "coremltools": "pip install 'nextvit-deploy[coreml]'",
    "timm": "pip install 'nextvit-deploy[timm]'",
    "matplotlib": "pip install 'nextvit-deploy[bench]'",
    "onnxruntime": "pip install onnxruntime",
    "onnxsim": "pip install onnxsim",
    "onnxslim": "pip install onnxslim",
}


def available(module: str) -> bool:
    """True when ``module`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, *, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = INSTALL_HINTS.get(module.split(".")[0], f"pip install {module.split('.')[0]}")
        why = f" for {purpose}" if purpose else ""
        detail = "" if isinstance(exc, ModuleNotFoundError) and exc.name == module.split(".")[0] else f" ({exc})"
        raise MissingDependency(f"{module} is needed{why} but not installed{detail}; install with: {hint}") from None


def import_coremltools(purpose: str = "Core ML export") -> ModuleType:
    """Import coremltools quietly (its import logs warnings about macOS-only parts on Linux)."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return require("coremltools", purpose=purpose)
