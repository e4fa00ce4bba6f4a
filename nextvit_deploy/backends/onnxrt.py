"""OrtRunner: an ONNX file on ONNX Runtime (CPU here; any provider the installed build has)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require
from ..errors import BadInput
from .base import Availability, Runner, TensorSpec

__all__ = ["OrtRunner", "availability"]

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}


class OrtRunner(Runner):
    """Run an ONNX model with ONNX Runtime.

    Args:
        path: the ``.onnx`` file.
        providers: execution providers by name. Defaults to ``["CPUExecutionProvider"]``.
        threads: intra-op threads; ``None`` lets ONNX Runtime choose. Defaults to None.
        batch_range: (min, max) batch a dynamic first dimension accepts, from the manifest.
    """

    def __init__(self, path: str | Path, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None, batch_range: tuple[int, int] | None = None,
                 graph_optimization: str = "all"):
        super().__init__()
        self.path = Path(path)
        self.providers = list(providers)
        self.threads = threads
        self.batch_range = batch_range
        self.graph_optimization = graph_optimization
        self.name = f"OrtRunner({self.path.name})"
        self.device = "cpu" if self.providers == ["CPUExecutionProvider"] else ",".join(self.providers)
        self.session: Any = None  # an onnxruntime.InferenceSession while active

    def _activate_impl(self) -> None:
        ort = require("onnxruntime", purpose="running ONNX models")
        have = ort.get_available_providers()
        missing = [p for p in self.providers if p not in have]
        if missing:
            raise BadInput(f"ONNX Runtime provider(s) {missing} are not available; this build has {have}")
        opts = ort.SessionOptions()
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        opts.graph_optimization_level = levels[self.graph_optimization]
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=self.providers)

    def _deactivate_impl(self) -> None:
        self.session = None

    def _inputs_impl(self) -> list[TensorSpec]:
        specs = []
        for i in self.session.get_inputs():
            shape = tuple(d if isinstance(d, int) else None for d in i.shape)
            rng = self.batch_range if shape and shape[0] is None else None
            specs.append(TensorSpec(i.name, _ORT_TYPES.get(i.type, i.type), shape, rng))
        return specs

    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        outs = self.session.run(names, dict(feed))
        return dict(zip(names, outs))


def runner_for_artifact(artifact, *, threads: int | None = None,
                        providers: Sequence[str] = ("CPUExecutionProvider",)) -> OrtRunner:
    """The runner ``verify``/``bench`` use for an ``.onnx`` artifact (``TARGETS['onnx'].runner``)."""
    lo, _, hi = artifact.batch
    return OrtRunner(artifact.path, providers=providers, threads=threads,
                     batch_range=(lo, hi) if artifact.dynamic_batch else None)


def availability(precision: str = "fp32") -> Availability:
    """ONNX Runtime here: version and device (CUDA EP when this build has it and a GPU is visible)."""
    from .._deps import INSTALL_HINTS, available

    if not available("onnxruntime"):
        return Availability("onnxruntime", False, f"onnxruntime is not installed: {INSTALL_HINTS['onnxruntime']}")
    import onnxruntime as ort

    if precision == "fp16":
        return Availability("onnxruntime", False, "fp16 ONNX Runtime rows are not measured by bench: use --precision "
                            "fp32 (or export --precision fp16 and bench the artifact)", ort.__version__)
    gpu = "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_visible()
    return Availability("onnxruntime", True, "", ort.__version__, "cuda:0 (CUDA EP)" if gpu else "cpu")


def _cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
