"""TensorRT: build an engine from a TensorRT-ready ONNX, and run it (TensorRT 10.x and 11.x Python API).

Kept thin on purpose: every precision decision is already in the ONNX graph (see
``nextvit_deploy.export.precision``). The builder parses it with ``OnnxParser`` (all parser errors
reported), adds one optimization profile for the batch range, limits the workspace, loads/saves a
timing cache and reports progress through ``IProgressMonitor``. Network typing:

* TensorRT >= 11: every network is strongly typed (the graph's types are the precision).
* TensorRT 10.x: strongly typed for Q/DQ (int8) graphs and fp32; for the fp16 graph the classic
  weakly-typed path with ``BuilderFlag.FP16``, with the FP32-kept layers pinned to fp32
  (``OBEY_PRECISION_CONSTRAINTS``).

An engine is tied to the TensorRT version and the GPU architecture it was built with, so it is saved
(atomically) with a JSON sidecar ``<engine>.build.json`` and :func:`check_engine_environment` refuses
to load it elsewhere, naming the rebuild command. That check is pure Python.

Device memory, streams and CUDA events come from PyTorch's CUDA runtime (torch is a dependency
already; pycuda has no wheels and needs the CUDA toolkit at install time).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from .._deps import require
from ..artifact import atomic_path, atomic_write_text, sha256_path, utc_now
from ..errors import ArtifactError, DeployError, MissingDependency
from .base import Runner, TensorSpec

__all__ = ["SIDECAR_SUFFIX", "EngineMismatch", "EngineBuildError", "sidecar_path", "current_environment",
           "check_engine_environment", "build_engine", "TrtRunner", "runner_for_artifact", "trt_major"]

SIDECAR_SUFFIX = ".build.json"


class EngineMismatch(ArtifactError):
    """The engine was built for another TensorRT version or GPU architecture."""


class EngineBuildError(DeployError):
    """TensorRT could not parse the ONNX or build the engine."""


def sidecar_path(engine: str | Path) -> Path:
    p = Path(engine)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def trt_major(version: str) -> int:
    """``"10.13.3.9"`` -> 10."""
    return int(str(version).split(".")[0])


def current_environment() -> dict[str, str]:
    """TensorRT version and GPU of this machine: ``{"tensorrt_version", "gpu_name", "compute_capability"}``."""
    trt = require("tensorrt", purpose="TensorRT engines")
    torch = require("torch")
    if not torch.cuda.is_available():
        raise MissingDependency("TensorRT engines need an NVIDIA GPU with a CUDA driver, and torch sees none: "
                                "run on a GPU machine (or verify the TensorRT-ready .onnx with ONNX Runtime)")
    major, minor = torch.cuda.get_device_capability(0)
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(0),
            "compute_capability": f"{major}.{minor}"}


def check_engine_environment(sidecar: Mapping[str, Any], current: Mapping[str, str], *,
                             engine: str = "engine") -> list[str]:
    """Refuse an engine whose sidecar does not match ``current`` (from :func:`current_environment`).

    The TensorRT version and the GPU compute capability must match exactly (engines are not portable
    across either unless built version/hardware compatible); a different GPU name with the same
    compute capability is allowed and returned as a note.

    Returns:
        Notes (possibly empty).

    Raises:
        EngineMismatch: with the rebuild hint.
    """
    rebuild = sidecar.get("rebuild") or "re-run nextvit-deploy export --target trt on this machine"
    built_trt, have_trt = str(sidecar.get("tensorrt_version")), str(current.get("tensorrt_version"))
    if built_trt != have_trt:
        raise EngineMismatch(f"{engine} was built with TensorRT {built_trt} but this machine runs TensorRT {have_trt}: "
                             f"rebuild it here ({rebuild})")
    built_cc, have_cc = str(sidecar.get("compute_capability")), str(current.get("compute_capability"))
    if built_cc != have_cc:
        raise EngineMismatch(f"{engine} was built for a GPU of compute capability {built_cc} "
                             f"({sidecar.get('gpu_name')}) but this GPU is {current.get('gpu_name')} "
                             f"(compute capability {have_cc}): rebuild it here ({rebuild})")
    notes = []
    if sidecar.get("gpu_name") != current.get("gpu_name"):
        notes.append(f"engine built on {sidecar.get('gpu_name')}, running on {current.get('gpu_name')} "
                     "(same compute capability; timings may differ)")
    return notes


def read_sidecar(engine: str | Path) -> dict[str, Any]:
    p = sidecar_path(engine)
    if not p.is_file():
        raise ArtifactError(f"{Path(engine).name} has no build sidecar ({p.name}): rebuild it with "
                            "nextvit-deploy export --target trt, which writes one")
    try:
        return json.loads(p.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{p} is malformed ({exc}): rebuild the engine") from None


def _progress_monitor(trt, say: Callable[[str], None]):
    """An ``IProgressMonitor`` that forwards phase starts to ``say`` (never cancels)."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            say(f"tensorrt: {phase_name}" + (f" ({num_steps} steps)" if num_steps > 1 else ""))

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            return None

    return _Monitor()


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings (units in the names)."""

    precision: str
    batch: tuple[int, int, int]
    image_size: tuple[int, int]
    input_name: str = "input"
    workspace_gb: float = 4.0
    timing_cache: Optional[Path] = None
    builder_opt_level: int = 3
    fp32_layers: tuple[str, ...] = ()  # FP16 graph on 10.x: layers pinned to fp32
    rebuild_hint: str = ""


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: BuildOptions, *,
                 progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Parse ``onnx_path``, build, and save the engine at ``engine_path`` with its sidecar.

    Args:
        onnx_path: the TensorRT-ready ONNX (its precision transform already applied).
        engine_path: where the serialized engine goes (written atomically).
        options: :class:`BuildOptions`.
        progress: one-line progress callback. Defaults to silent.

    Returns:
        The sidecar dict (also written to ``<engine>.build.json``).

    Raises:
        EngineBuildError: a parser error (all of them listed) or a failed build.
        MissingDependency: no TensorRT or no GPU.
    """
    say = progress or (lambda _m: None)
    trt = require("tensorrt", purpose="building TensorRT engines")
    env = current_environment()
    major = trt_major(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = major >= 11 or options.precision in ("int8", "fp32")
    flags = 0
    if strongly_typed and major < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    say(f"tensorrt {trt.__version__}: parsing {Path(onnx_path).name}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {Path(onnx_path).name} with {len(errors)} error(s): "
                               + " | ".join(errors) + "; check the trt_compat report in the manifest")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    config.builder_optimization_level = int(options.builder_opt_level)
    config.progress_monitor = _progress_monitor(trt, say)
    if options.precision == "fp32" and major < 11:
        config.clear_flag(trt.BuilderFlag.TF32)  # strict fp32 parity
    if options.precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = set(options.fp32_layers)
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                if layer.name in pinned:
                    layer.precision = trt.float32
                    for o in range(layer.num_outputs):
                        layer.set_output_type(o, trt.float32)
    lo, opt, hi = options.batch
    h, w = options.image_size
    profile = builder.create_optimization_profile()
    profile.set_shape(options.input_name, (lo, 3, h, w), (opt, 3, h, w), (hi, 3, h, w))
    config.add_optimization_profile(profile)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {Path(onnx_path).name} (see the log above); "
                               "try a larger --workspace-gb or --builder-opt-level 3")
    build_s = time.perf_counter() - start
    with atomic_path(engine_path) as tmp:
        Path(tmp).write_bytes(bytes(serialized))
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            Path(tmp).write_bytes(bytes(config.get_timing_cache().serialize()))
    sidecar = {**env, "precision": options.precision, "strongly_typed": strongly_typed,
               "batch_profile": {"min": lo, "opt": opt, "max": hi}, "image_size": [h, w],
               "input_name": options.input_name, "onnx": Path(onnx_path).name,
               "onnx_sha256": sha256_path(onnx_path), "engine_sha256": sha256_path(engine_path),
               "workspace_gb": options.workspace_gb, "builder_opt_level": options.builder_opt_level,
               "timing_cache": str(cache_path) if cache_path else None, "build_seconds": round(build_s, 1),
               "rebuild": options.rebuild_hint, "created_utc": utc_now()}
    atomic_write_text(sidecar_path(engine_path), json.dumps(sidecar, indent=2) + "\n")
    return sidecar


class TrtRunner(Runner):
    """Run a serialized TensorRT engine on the GPU; I/O by tensor name.

    Args:
        engine_path: the ``.engine`` file (with its ``.build.json`` sidecar).
        device: CUDA device. Defaults to "cuda:0".
        check_environment: refuse engines built for another TensorRT/GPU. Defaults to True.

    Attributes:
        last_gpu_ms: GPU time of the last ``infer`` (CUDA events around ``execute_async_v3``), ms.
        notes: environment notes (e.g. a different GPU model of the same architecture).
    """

    def __init__(self, engine_path: str | Path, *, device: str = "cuda:0", check_environment: bool = True):
        super().__init__()
        self.path = Path(engine_path)
        self.device = device
        self.check_environment = check_environment
        self.name = f"TrtRunner({self.path.name})"
        self.notes: list[str] = []
        self.last_gpu_ms: Optional[float] = None
        self._engine = self._context = self._stream = None
        self._torch = self._trt = None

    def _activate_impl(self) -> None:
        self._trt = trt = require("tensorrt", purpose="running TensorRT engines")
        self._torch = torch = require("torch")
        sidecar = read_sidecar(self.path)
        env = current_environment()
        if self.check_environment:
            self.notes = check_engine_environment(sidecar, env, engine=self.path.name)
        self.device = f"{self.device} ({env['gpu_name']}, TensorRT {env['tensorrt_version']})"
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise EngineMismatch(f"TensorRT could not deserialize {self.path.name}: rebuild it on this machine")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self._cuda())

    def _cuda(self) -> str:
        return self.device.split(" ")[0]

    def _deactivate_impl(self) -> None:
        self._context = self._engine = self._stream = None

    def _names(self, mode_input: bool) -> list[str]:
        trt, eng = self._trt, self._engine
        want = trt.TensorIOMode.INPUT if mode_input else trt.TensorIOMode.OUTPUT
        return [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)
                if eng.get_tensor_mode(eng.get_tensor_name(i)) == want]

    def _inputs_impl(self) -> list[TensorSpec]:
        specs = []
        for name in self._names(True):
            shape = tuple(None if d < 0 else int(d) for d in self._engine.get_tensor_shape(name))
            dtype = np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name))).name
            rng = None
            if shape and shape[0] is None:
                lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
                rng = (int(lo[0]), int(hi[0]))
            specs.append(TensorSpec(name, dtype, shape, rng))
        return specs

    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, ctx, dev = self._torch, self._context, self._cuda()
        keep = []
        with torch.cuda.stream(self._stream):
            for name, arr in feed.items():
                t = torch.from_numpy(np.ascontiguousarray(arr)).to(dev, non_blocking=True)
                keep.append(t)
                ctx.set_input_shape(name, tuple(arr.shape))
                ctx.set_tensor_address(name, t.data_ptr())
            outputs = {}
            for name in self._names(False):
                shape = tuple(ctx.get_tensor_shape(name))
                np_dtype = np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))
                out = torch.empty(shape, dtype=getattr(torch, np_dtype.name), device=dev)
                ctx.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self._stream)
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise DeployError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")
            end.record(self._stream)
        self._stream.synchronize()
        self.last_gpu_ms = float(start.elapsed_time(end))
        return {n: t.float().cpu().numpy() for n, t in outputs.items()}


def runner_for_artifact(artifact, **kw: Any) -> Runner:
    """``TARGETS['trt'].runner``: an ``.engine`` gets a :class:`TrtRunner`; the TensorRT-ready ``.onnx``
    written where TensorRT is absent runs on ONNX Runtime (``OrtRunner``), so ``verify`` works on it."""
    if Path(artifact.path).suffix == ".engine":
        return TrtRunner(artifact.path, **{k: v for k, v in kw.items() if k in ("device", "check_environment")})
    from .onnxrt import runner_for_artifact as ort_runner  # the graph itself is plain ONNX

    return ort_runner(artifact, **{k: v for k, v in kw.items() if k in ("threads", "providers")})


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, *, precision: str,
                    batch: tuple[int, int, int], image_size: tuple[int, int], input_name: str = "input",
                    workspace_gb: float = 4.0, timing_cache: Optional[Path] = None, builder_opt_level: int = 3,
                    dynamic_batch: bool = True, flags: Sequence[str] = ()) -> str:
    """The ``trtexec`` command equivalent to :func:`build_engine` (TensorRT 10.x/11.x flags).

    FP16 and INT8 graphs carry their precision, so the command builds them ``--stronglyTyped``
    (required on 11.x; on 10.x before 10.12 use ``--fp16`` instead for the FP16 graph).
    """
    lo, opt, hi = batch
    h, w = image_size
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if dynamic_batch:
        parts += [f"--minShapes={input_name}:{lo}x3x{h}x{w}", f"--optShapes={input_name}:{opt}x3x{h}x{w}",
                  f"--maxShapes={input_name}:{hi}x3x{h}x{w}"]
    parts += [f"--memPoolSize=workspace:{int(workspace_gb * 1024)}M", f"--builderOptimizationLevel={builder_opt_level}"]
    if timing_cache:
        parts.append(f"--timingCacheFile={timing_cache}")
    if precision in ("fp16", "int8"):
        parts.append("--stronglyTyped")
    if precision == "fp32":
        parts.append("--noTF32")
    parts += list(flags)
    return " ".join(str(p) for p in parts)
