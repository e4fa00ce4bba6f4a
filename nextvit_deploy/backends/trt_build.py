"""TensorRT engine building (TensorRT 10.x and 11.x Python API): :func:`build_engine` and the equivalent
``trtexec`` command line (:func:`trtexec_command`). The strongly typed build and the engine's sidecar are
described in :mod:`nextvit_deploy.backends.tensorrt`, which runs the engines this module builds."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._deps import require
from ..artifact import atomic_path, atomic_write_text, sha256_path, utc_now
from ..errors import BadInput
from . import tensorrt as _rt
from .tensorrt import EngineBuildError, TorchCuda, cuda_index, current_environment, sidecar_path

__all__ = ["graph_precision", "BuildOptions", "build_engine", "write_sidecar_file", "trtexec_command"]


def graph_precision(onnx_path: str | Path) -> dict[str, Any]:
    """The precision an ONNX graph carries, read off its types (what a strongly typed build will be).

    Returns:
        ``{"precision": "int8" | "fp16" | "fp32", "qdq_nodes": n, "fp16_tensors": n}``: int8 when the
        graph has Q/DQ nodes, else fp16 when any tensor or initializer is float16, else fp32.
    """
    onnx = require("onnx")
    from onnx import TensorProto

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node)
    half = sum(i.data_type == TensorProto.FLOAT16 for i in g.initializer)
    half += sum(vi.type.tensor_type.elem_type == TensorProto.FLOAT16 for vi in (*g.value_info, *g.input, *g.output))
    half += sum(1 for n in g.node if n.op_type == "Cast"
                and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in n.attribute))
    precision = "int8" if qdq else "fp16" if half else "fp32"
    return {"precision": precision, "qdq_nodes": qdq, "fp16_tensors": half}


def _progress_monitor(trt, say: Callable[[str], None]):
    """An ``IProgressMonitor`` that forwards phase starts to ``say`` (never cancels)."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            say(f"tensorrt: {phase_name}" + (f" ({num_steps} steps)" if num_steps > 1 else ""))

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            return None

    return _Monitor()


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings (units in the names).

    ``precision`` is what the caller expects the graph to carry; the build refuses a mismatch.
    """

    precision: str
    batch: tuple[int, int, int]
    image_size: tuple[int, int]
    input_name: str = "input"
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    builder_opt_level: int = 3
    rebuild_hint: str = ""
    device: str = "cuda:0"


def _network_flags(trt) -> int:
    """``STRONGLY_TYPED`` where the bindings still expose it (10.x; 11.x accepts and ignores it)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _set_timing_cache(trt, config, path: Path | None, say: Callable[[str], None]) -> str:
    """Load ``path`` into ``config``; a cache TensorRT rejects (other GPU/version, corrupt) is replaced
    by a fresh one with a one-line warning. Returns "loaded", "fresh" or "rejected"."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    state = "loaded" if data else "fresh"
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # noqa: BLE001 - the bindings raise on bytes they cannot read
        cache = None
    ok = cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))
    if not ok:
        say(f"warning: timing cache {path} was rejected by TensorRT (made on another GPU or TensorRT version, or "
            "corrupt); building with a fresh cache, which will replace it")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        state = "rejected"
    return state


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: BuildOptions, *,
                 progress: Callable[[str], None] | None = None, cuda: TorchCuda | None = None,
                 write_sidecar: bool = True) -> dict[str, Any]:
    """Parse ``onnx_path`` into a strongly typed network, build, and save the engine with its sidecar.

    Args:
        onnx_path: the TensorRT-ready ONNX (its precision transform already applied).
        engine_path: where the serialized engine goes (written atomically).
        options: :class:`BuildOptions`.
        progress: one-line progress callback. Defaults to silent.
        cuda: the CUDA seam. Defaults to PyTorch's CUDA runtime.
        write_sidecar: write ``<engine>.build.json`` beside ``engine_path``. Defaults to True; an exporter
            that builds into a temporary path writes it next to the published engine itself.

    Returns:
        The sidecar dict.

    Raises:
        BadInput: ``options.precision`` is not the precision the graph carries, or the device is unknown.
        EngineBuildError: a parser error (all of them listed) or a failed build.
        MissingDependency: no TensorRT or no GPU.
    """
    say = progress or (lambda _m: None)
    trt = require("tensorrt", purpose="building TensorRT engines")
    cuda = cuda or _rt._cuda()  # looked up on the module: tests put a CUDA stand-in there
    env = current_environment(options.device, cuda=cuda)
    carried = graph_precision(onnx_path)
    if carried["precision"] != options.precision:
        raise BadInput(f"{Path(onnx_path).name} carries {carried['precision']} (a strongly typed build takes the "
                       f"precision from the graph) but {options.precision} was requested: export the "
                       f"{options.precision} graph with nextvit-deploy export --target trt --precision "
                       f"{options.precision}")
    index = cuda_index(options.device)
    with cuda.on(index):
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = _network_flags(trt)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        say(f"tensorrt {trt.__version__}: parsing {Path(onnx_path).name} (strongly typed, on cuda:{index})")
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError(f"TensorRT's ONNX parser rejected {Path(onnx_path).name} with {len(errors)} "
                                   "error(s): " + " | ".join(errors) + "; check the trt_compat report in the manifest")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
        config.builder_optimization_level = int(options.builder_opt_level)
        config.progress_monitor = _progress_monitor(trt, say)
        tf32_flag = getattr(trt.BuilderFlag, "TF32", None)
        if options.precision == "fp32" and tf32_flag is not None:
            config.clear_flag(tf32_flag)  # strict fp32 parity; TF32 is on by default in 10.x and 11.x
        tf32 = bool(config.get_flag(tf32_flag)) if tf32_flag is not None else False
        lo, opt, hi = options.batch
        h, w = options.image_size
        profile = builder.create_optimization_profile()
        profile.set_shape(options.input_name, (lo, 3, h, w), (opt, 3, h, w), (hi, 3, h, w))
        config.add_optimization_profile(profile)
        cache_path = Path(options.timing_cache) if options.timing_cache else None
        cache_state = _set_timing_cache(trt, config, cache_path, say)
        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"TensorRT could not build an engine from {Path(onnx_path).name} (see the log "
                                   "above); try a larger --workspace-gb or --opt-level 3")
        build_s = time.perf_counter() - start
        with atomic_path(engine_path) as tmp:
            Path(tmp).write_bytes(bytes(serialized))
        if cache_path is not None:
            with atomic_path(cache_path) as tmp:
                Path(tmp).write_bytes(bytes(config.get_timing_cache().serialize()))
    sidecar = {**env, "precision": options.precision, "strongly_typed": True, "network_flags": flags,
               "tf32": tf32, "graph": carried, "batch_profile": {"min": lo, "opt": opt, "max": hi},
               "image_size": [h, w], "input_name": options.input_name, "onnx": Path(onnx_path).name,
               "onnx_sha256": sha256_path(onnx_path), "engine_sha256": sha256_path(engine_path),
               "workspace_gb": options.workspace_gb, "builder_opt_level": options.builder_opt_level,
               "timing_cache": str(cache_path) if cache_path else None, "timing_cache_state": cache_state,
               "build_seconds": round(build_s, 1), "rebuild": options.rebuild_hint, "created_utc": utc_now()}
    if write_sidecar:
        write_sidecar_file(engine_path, sidecar)
    return sidecar


def write_sidecar_file(engine: str | Path, sidecar: Mapping[str, Any]) -> Path:
    """Write ``<engine>.build.json`` atomically."""
    p = sidecar_path(engine)
    atomic_write_text(p, json.dumps(dict(sidecar), indent=2) + "\n")
    return p


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, *, precision: str,
                    batch: tuple[int, int, int], image_size: tuple[int, int], input_name: str = "input",
                    workspace_gb: float = 4.0, timing_cache: Path | None = None, builder_opt_level: int = 3,
                    dynamic_batch: bool = True, device: str = "cuda:0", flags: Sequence[str] = ()) -> str:
    """The ``trtexec`` command equivalent to :func:`build_engine` (same flags on TensorRT 10.x and 11.x).

    Every graph carries its precision, so the command is always ``--stronglyTyped`` (no ``--fp16`` or
    ``--int8``); FP32 adds ``--noTF32``.
    """
    lo, opt, hi = batch
    h, w = image_size
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped"]
    if dynamic_batch:
        parts += [f"--minShapes={input_name}:{lo}x3x{h}x{w}", f"--optShapes={input_name}:{opt}x3x{h}x{w}",
                  f"--maxShapes={input_name}:{hi}x3x{h}x{w}"]
    parts += [f"--memPoolSize=workspace:{int(workspace_gb * 1024)}M", f"--builderOptimizationLevel={builder_opt_level}"]
    if timing_cache:
        parts.append(f"--timingCacheFile={timing_cache}")
    if precision == "fp32":
        parts.append("--noTF32")
    if cuda_index(device):
        parts.append(f"--device={cuda_index(device)}")
    parts += list(flags)
    return " ".join(str(p) for p in parts)
