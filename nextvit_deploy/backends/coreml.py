"""Core ML runners: ``MLModel.predict`` on macOS, the MIL evaluator everywhere else.

:func:`runner_for_artifact` is the coreml target's runner (``TARGETS['coreml'].runner``): on macOS it
returns a :class:`CoreMLRunner` (Core ML itself, compute units selectable), elsewhere a
:class:`~nextvit_deploy.backends.coreml_mil.MilRunner` that evaluates the package's ML Program op by
op. Each runner's ``device`` says which one produced the numbers, and ``verify`` reports it.

:func:`measure_latency` is the macOS latency path: ``MLModel.predict`` timed per compute unit (ALL,
CPU_AND_NE, CPU_ONLY) over rounds with warm-up discarded and the fastest and slowest rounds trimmed,
returned as the latency harness's :class:`~nextvit_deploy.latency.LatencyReport`. Off macOS it raises
:class:`CoreMLUnavailable` saying why.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, MissingDependency
from .base import Availability, Runner, TensorSpec

__all__ = ["COMPUTE_UNITS", "CoreMLRunner", "CoreMLUnavailable", "availability", "runner_for_artifact", "measure_latency",
           "trimmed"]

COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_ONLY", "CPU_AND_GPU")
LATENCY_UNITS = ("ALL", "CPU_AND_NE", "CPU_ONLY")


class CoreMLUnavailable(MissingDependency):
    """Core ML predictions need macOS (coremltools converts anywhere but predicts only there)."""


def _is_macos() -> bool:
    return sys.platform == "darwin"


def _require_macos(what: str) -> None:
    if not _is_macos():
        raise CoreMLUnavailable(f"{what} needs Core ML, which runs only on macOS (this is {sys.platform}): "
                                "run it on a Mac; on Linux `nextvit-deploy verify` uses the MIL evaluator")


def _compute_unit(ct, name: str):
    key = str(name).upper()
    if key not in COMPUTE_UNITS:
        raise BadInput(f"unknown Core ML compute units {name!r}: choose one of {', '.join(COMPUTE_UNITS)}")
    return getattr(ct.ComputeUnit, key)


def _output_map(artifact) -> dict[str, str]:
    return dict(artifact.details.get("output_map") or {n: n for n in artifact.output_names})


class CoreMLRunner(Runner):
    """Run a ``.mlpackage`` with Core ML's ``MLModel.predict`` (macOS only).

    Args:
        path: the package.
        compute_units: ``ALL``, ``CPU_AND_NE``, ``CPU_ONLY`` or ``CPU_AND_GPU``. Defaults to ``"ALL"``.
        input_kind: ``"tensor"`` (float32 NCHW, normalised) or ``"image"`` (RGB 0..255; each sample is
            handed to Core ML as an 8-bit RGB image, so pixel values are rounded to integers).
            Defaults to ``"tensor"``.
        input_shape: the fixed (batch, 3, height, width) the package takes.
        output_map: artifact output name -> Core ML output name. Defaults to identity.
        class_labels: for a classifier package, the label order used to turn the score dictionary
            back into a ``logits`` array. Defaults to none.
        image_sizes: the (height, width) sizes of a package with enumerated input sizes (Core ML itself
            refuses any other size). Defaults to none (``input_shape`` only).
    """

    def __init__(self, path: str | Path, *, compute_units: str = "ALL", input_kind: str = "tensor",
                 input_shape: tuple[int, int, int, int] = (1, 3, 224, 224),
                 output_map: Mapping[str, str] | None = None, class_labels: Sequence[str] | None = None,
                 image_sizes: Sequence[Sequence[int]] | None = None):
        super().__init__()
        self.image_sizes = [tuple(s) for s in image_sizes] if image_sizes else []
        self.path = Path(path)
        self.compute_units = str(compute_units).upper()
        if self.compute_units not in COMPUTE_UNITS:
            raise BadInput(f"unknown Core ML compute units {compute_units!r}: choose one of {', '.join(COMPUTE_UNITS)}")
        self.input_kind = input_kind
        self.input_shape = tuple(input_shape)
        self.output_map = dict(output_map or {"logits": "logits"})
        self.class_labels: list[str] = list(class_labels) if class_labels else []
        self.name = f"CoreMLRunner({self.path.name}, {self.compute_units})"
        self.device = f"Core ML (macOS, {self.compute_units})"
        self.model: Any = None  # coremltools.models.MLModel while active

    def _activate_impl(self) -> None:
        _require_macos("CoreMLRunner")
        from .._deps import import_coremltools

        ct = import_coremltools(purpose="running Core ML packages")
        self.model = ct.models.MLModel(str(self.path), compute_units=_compute_unit(ct, self.compute_units))

    def _deactivate_impl(self) -> None:
        self.model = None

    def _inputs_impl(self) -> list[TensorSpec]:
        if len(self.image_sizes) > 1:  # enumerated sizes: Core ML checks the size itself
            return [TensorSpec("input", "float32", (*self.input_shape[:2], None, None))]
        return [TensorSpec("input", "float32", self.input_shape)]

    def _feeds(self, x: np.ndarray) -> list[dict[str, Any]]:
        if self.input_kind != "image":
            return [{"input": np.ascontiguousarray(x, dtype=np.float32)}]
        from PIL import Image

        pixels = np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return [{"input": Image.fromarray(p)} for p in pixels]

    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [self.model.predict(f) for f in self._feeds(feed["input"])]
        out: dict[str, np.ndarray] = {}
        for name, coreml_name in self.output_map.items():
            parts = []
            for r in results:
                value = r[coreml_name]
                if isinstance(value, dict):  # classifier score dictionary -> logits in label order
                    value = np.asarray([value[c] for c in self.class_labels], dtype=np.float32).reshape(1, -1)
                parts.append(np.asarray(value, dtype=np.float32))
            out[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return out


def runner_for_artifact(artifact, *, compute_units: str | None = None, backend: str = "auto",
                        accumulate: str | None = None) -> Runner:
    """The runner ``verify``/``bench`` use for a ``.mlpackage`` artifact (``TARGETS['coreml'].runner``).

    Args:
        artifact: the loaded :class:`~nextvit_deploy.artifact.Artifact`.
        compute_units: Core ML compute units (macOS only: Core ML is what uses them). Off macOS the MIL
            evaluator runs instead and the runner's device string says the units were not used.
            Defaults to ``"ALL"``.
        backend: ``"auto"`` (Core ML on macOS, MIL evaluator elsewhere), ``"coreml"`` or ``"mil"``.
            Defaults to ``"auto"``.
        accumulate: the MIL evaluator's fp16 arithmetic, ``"fp32"`` or ``"fp16"`` (see
            :class:`~nextvit_deploy.backends.coreml_mil.MilEvaluator`); Core ML picks its own. Defaults to
            ``"fp32"``.
    """
    if backend not in ("auto", "coreml", "mil"):
        raise BadInput(f"unknown Core ML backend {backend!r}: choose auto, coreml or mil")
    if compute_units is not None and str(compute_units).upper() not in COMPUTE_UNITS:
        raise BadInput(f"unknown Core ML compute units {compute_units!r}: choose one of {', '.join(COMPUTE_UNITS)} "
                       "with --compute-units")
    use_coreml = backend == "coreml" or (backend == "auto" and _is_macos())
    if use_coreml:
        if accumulate not in (None, "fp32"):
            raise BadInput("--accumulate chooses the MIL evaluator's arithmetic, but Core ML runs this package "
                           "(macOS): drop --accumulate, or pick the evaluator with its backend option")
        _require_macos("running a Core ML package with Core ML")
        return CoreMLRunner(artifact.path, compute_units=str(compute_units or "ALL").upper(),
                            input_kind=artifact.preprocessing.get("input_kind", "tensor"),
                            input_shape=artifact.input_shape, output_map=_output_map(artifact),
                            class_labels=artifact.details.get("class_labels"),
                            image_sizes=artifact.details.get("image_sizes"))
    from .coreml_mil import MilRunner

    runner = MilRunner(artifact.path, output_map=_output_map(artifact), input_name=artifact.input_name,
                       accumulate=accumulate or "fp32")
    if compute_units is not None:
        runner.device += (f"; compute units {str(compute_units).upper()} not used: only Core ML (macOS) "
                          "places work on compute units")
    return runner


def trimmed(samples_ms: Sequence[float], *, trim: float) -> list[float]:
    """Drop the fastest and slowest ``trim`` fraction of rounds (at least one each when ``trim > 0``)."""
    if not 0 <= trim < 0.5:
        raise BadInput(f"trim must be in [0, 0.5), got {trim}")
    s = sorted(samples_ms)
    k = max(1, math.floor(len(s) * trim)) if trim > 0 else 0
    if len(s) - 2 * k < 1:
        raise BadInput(f"{len(s)} rounds are too few to trim {k} from each end: raise the number of rounds")
    return s[k:len(s) - k] if k else s


def measure_latency(artifact, *, compute_units: Sequence[str] = LATENCY_UNITS, warmup: int = 5,
                    rounds: int = 50, trim: float = 0.1, feed: np.ndarray | None = None) -> list:
    """Time ``MLModel.predict`` per compute unit (macOS only).

    Args:
        artifact: the coreml artifact.
        compute_units: which units to time. Defaults to ``("ALL", "CPU_AND_NE", "CPU_ONLY")``.
        warmup: predictions run first and discarded (the first one also compiles for the device).
            Defaults to 5.
        rounds: timed predictions per unit. Defaults to 50.
        trim: fraction of the fastest and of the slowest rounds dropped before the statistics
            (at least one each). Defaults to 0.1.
        feed: the input; defaults to noise of the artifact's input shape (0..255 for image input).

    Returns:
        One :class:`~nextvit_deploy.latency.LatencyReport` per compute unit (times in ms per predict).

    Raises:
        CoreMLUnavailable: not on macOS.
    """
    _require_macos("Core ML latency measurement")
    from ..artifact import tool_versions
    from ..latency import LatencyReport, LatencyStats

    if rounds < 3:
        raise BadInput(f"rounds must be at least 3 to trim the fastest and slowest, got {rounds}")
    shape = tuple(artifact.input_shape)
    if feed is None:
        rng = np.random.default_rng(0)
        feed = rng.random(shape, dtype=np.float32) * (255.0 if artifact.preprocessing.get("input_kind") == "image"
                                                       else 1.0)
    reports = []
    for unit in compute_units:
        runner = runner_for_artifact(artifact, compute_units=unit, backend="coreml")
        assert isinstance(runner, CoreMLRunner)
        with runner:
            inputs = runner._feeds(feed)  # prepared once: time predict(), not image conversion

            def call(inputs=inputs, model=runner.model) -> None:
                for f in inputs:
                    model.predict(f)

            for _ in range(warmup):
                call()
            samples = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                call()
                samples.append((time.perf_counter() - t0) * 1e3)
        stats = LatencyStats.from_samples(trimmed(samples, trim=trim), warmup=warmup, stopped_by="iters")
        reports.append(LatencyReport(name=artifact.variant, backend="coreml", precision=artifact.precision,
                                     batch=shape[0], input_shape=shape, device=runner.device, threads=0,
                                     stats=stats, versions=tool_versions("coremltools")))
    return reports


def availability(precision: str = "fp32") -> Availability:
    """Core ML predictions here: macOS with coremltools (conversion works anywhere, prediction only there)."""
    from importlib import metadata

    from .._deps import INSTALL_HINTS, available

    if not _is_macos():
        return Availability("coreml", False, f"the Core ML runtime is macOS-only (this is {sys.platform}); "
                            "export --target coreml here and bench on a Mac")
    if not available("coremltools"):
        return Availability("coreml", False, f"coremltools is not installed: {INSTALL_HINTS['coremltools']}")
    return Availability("coreml", True, "", metadata.version("coremltools"), "Core ML (compute units ALL)")
