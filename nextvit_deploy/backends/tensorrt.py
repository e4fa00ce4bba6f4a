"""TensorRT: build an engine from a TensorRT-ready ONNX, and run it (TensorRT 10.x and 11.x Python API).

One build path for both major versions: the network is **strongly typed** (``STRONGLY_TYPED``, in
TensorRT since 9.0; every network is strongly typed in 11), so the precision of every layer is the
precision the ONNX graph carries (see :mod:`nextvit_deploy.export.precision`): no FP16/INT8 builder
flag, no calibrator, no per-layer precision pinning. :func:`~nextvit_deploy.backends.trt_build.build_engine`
(in :mod:`~nextvit_deploy.backends.trt_build`, with :func:`trtexec_command`) therefore refuses a
``precision`` the graph does not carry, and clears ``BuilderFlag.TF32`` for FP32 builds on every
version (TensorRT 11 keeps the flag, on by default). It parses with ``OnnxParser`` (all parser errors
reported), adds one optimization profile for the batch range, limits the workspace, loads/saves a
timing cache (a rejected one is replaced by a fresh cache, with a warning) and reports progress
through ``IProgressMonitor``.

An engine is tied to the TensorRT version and the GPU architecture it was built with, so it is saved
(atomically) with a JSON sidecar ``<engine>.build.json`` and :func:`check_engine_environment` refuses
to load it elsewhere, naming the rebuild command. An engine built with the printed ``trtexec``
command has no sidecar: :func:`engine_artifact` identifies it by the manifest of the TensorRT-ready
ONNX it came from, and the runner then relies on TensorRT's own deserialization check.

Device memory, streams and CUDA events come from PyTorch's CUDA runtime (torch is a dependency
already; pycuda has no wheels and needs the CUDA toolkit at install time), on the device given as
``cuda:N`` everywhere (build, deserialization, buffers, stream).
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require
from ..artifact import MANIFEST_SUFFIX, Artifact, manifest_path, sha256_path
from ..errors import ArtifactError, BadInput, DeployError, MissingDependency
from .base import Availability, Runner, TensorSpec

__all__ = ["SIDECAR_SUFFIX", "EngineMismatch", "EngineBuildError", "sidecar_path", "current_environment",
           "check_engine_environment", "TrtRunner", "runner_for_artifact", "engine_artifact", "trt_major",
           "cuda_index", "read_sidecar", "availability"]

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


def cuda_index(device: str) -> int:
    """``"cuda"`` / ``"cuda:N"`` -> N (0 for plain ``"cuda"``).

    Raises:
        BadInput: anything else.
    """
    text = str(device).strip().lower()
    if text == "cuda":
        return 0
    head, _, idx = text.partition(":")
    if head != "cuda" or not idx.isdigit():
        raise BadInput(f"device {device!r} is not a CUDA device: use cuda or cuda:N (TensorRT runs on NVIDIA GPUs)")
    return int(idx)


class TorchCuda:
    """The CUDA calls this module makes, through PyTorch (one seam, so device handling is testable)."""

    def __init__(self) -> None:
        self.torch = require("torch")

    def device_count(self) -> int:
        return int(self.torch.cuda.device_count()) if self.torch.cuda.is_available() else 0

    def describe(self, index: int) -> tuple[str, str]:
        major, minor = self.torch.cuda.get_device_capability(index)
        return self.torch.cuda.get_device_name(index), f"{major}.{minor}"

    @contextmanager
    def on(self, index: int) -> Iterator[None]:
        """Make ``index`` the current device (TensorRT builds and deserializes on the current device)."""
        with self.torch.cuda.device(index):
            yield

    def stream(self, index: int):
        return self.torch.cuda.Stream(device=index)

    @contextmanager
    def using(self, stream) -> Iterator[None]:
        with self.torch.cuda.stream(stream):
            yield

    def upload(self, arr: np.ndarray, index: int):
        return self.torch.from_numpy(np.ascontiguousarray(arr)).to(f"cuda:{index}", non_blocking=True)

    def empty(self, shape: Sequence[int], dtype: np.dtype, index: int):
        return self.torch.empty(tuple(shape), dtype=getattr(self.torch, np.dtype(dtype).name), device=f"cuda:{index}")

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    @staticmethod
    def download(t) -> np.ndarray:
        return t.float().cpu().numpy()


def _cuda() -> TorchCuda:
    return TorchCuda()


def current_environment(device: str = "cuda:0", *, cuda: TorchCuda | None = None) -> dict[str, str]:
    """TensorRT version and GPU of ``device``: ``{"tensorrt_version", "gpu_name", "compute_capability", "device"}``."""
    trt = require("tensorrt", purpose="TensorRT engines")
    index = cuda_index(device)
    cuda = cuda or _cuda()
    count = cuda.device_count()
    if count == 0:
        raise MissingDependency("TensorRT engines need an NVIDIA GPU with a CUDA driver, and torch sees none: "
                                "run on a GPU machine (or verify the TensorRT-ready .onnx with ONNX Runtime)")
    if index >= count:
        raise BadInput(f"device cuda:{index} does not exist: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    name, cc = cuda.describe(index)
    return {"tensorrt_version": trt.__version__, "gpu_name": name, "compute_capability": cc, "device": f"cuda:{index}"}


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


class TrtRunner(Runner):
    """Run a serialized TensorRT engine on a GPU; I/O by tensor name.

    Args:
        engine_path: the ``.engine`` file (normally with its ``.build.json`` sidecar).
        device: CUDA device, ``cuda:N``. Defaults to "cuda:0".
        check_environment: refuse engines whose sidecar names another TensorRT/GPU. Defaults to True.
        rebuild: the command that rebuilds the engine (named in errors). Defaults to the sidecar's.
        require_sidecar: refuse an engine without a sidecar. Defaults to True; False for engines built
            outside the tool (then TensorRT's deserialization is the version check).
        cuda: the CUDA seam. Defaults to PyTorch's CUDA runtime.

    Attributes:
        last_gpu_ms: GPU time of the last ``infer`` (CUDA events around ``execute_async_v3``), ms.
        notes: environment notes (e.g. a different GPU model of the same architecture).
    """

    def __init__(self, engine_path: str | Path, *, device: str = "cuda:0", check_environment: bool = True,
                 rebuild: str = "", require_sidecar: bool = True, cuda: TorchCuda | None = None):
        super().__init__()
        self.path = Path(engine_path)
        self.index = cuda_index(device)
        self.device = f"cuda:{self.index}"
        self.check_environment = check_environment
        self.rebuild = rebuild
        self.require_sidecar = require_sidecar
        self.name = f"TrtRunner({self.path.name})"
        self.notes: list[str] = []
        self.last_gpu_ms: float | None = None
        self._cuda = cuda
        self._engine: Any = None  # tensorrt.ICudaEngine, IExecutionContext and a CUDA stream while active
        self._context: Any = None
        self._stream: Any = None
        self._trt: Any = None

    def _activate_impl(self) -> None:
        self._trt = trt = require("tensorrt", purpose="running TensorRT engines")
        cuda = self._cuda = self._cuda or _cuda()
        env = current_environment(f"cuda:{self.index}", cuda=cuda)
        sidecar: dict[str, Any] = {}
        if self.require_sidecar or sidecar_path(self.path).is_file():
            sidecar = read_sidecar(self.path)
        else:
            self.notes.append("engine built outside nextvit-deploy (no sidecar): TensorRT's deserialization "
                              "checks the TensorRT version and GPU")
        rebuild = self.rebuild or sidecar.get("rebuild") or "re-run the trtexec command of its ONNX manifest"
        if self.check_environment and sidecar:
            self.notes += check_engine_environment({**sidecar, "rebuild": rebuild}, env, engine=self.path.name)
        self.device = f"cuda:{self.index} ({env['gpu_name']}, TensorRT {env['tensorrt_version']})"
        with cuda.on(self.index):
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise EngineMismatch(f"TensorRT {env['tensorrt_version']} could not deserialize {self.path.name} on "
                                     f"{env['gpu_name']} (built by another TensorRT version or for another GPU?): "
                                     f"rebuild it here ({rebuild})")
            self._context = self._engine.create_execution_context()
            self._stream = cuda.stream(self.index)

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
        cuda, ctx, idx = self._cuda, self._context, self.index
        assert cuda is not None
        keep = []
        with cuda.on(idx), cuda.using(self._stream):
            for name, arr in feed.items():
                t = cuda.upload(arr, idx)
                keep.append(t)
                ctx.set_input_shape(name, tuple(arr.shape))
                ctx.set_tensor_address(name, t.data_ptr())
            outputs = {}
            for name in self._names(False):
                shape = tuple(ctx.get_tensor_shape(name))
                out = cuda.empty(shape, np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name))), idx)
                ctx.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            start, end = cuda.event(), cuda.event()
            start.record(self._stream)
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise DeployError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")
            end.record(self._stream)
        self._stream.synchronize()
        self.last_gpu_ms = float(start.elapsed_time(end))
        return {n: cuda.download(t) for n, t in outputs.items()}


def engine_artifact(engine: str | Path) -> Artifact:
    """The artifact of an engine: its own manifest, or (an engine built with the printed ``trtexec``
    command) the manifest of the TensorRT-ready ONNX beside it whose ``trtexec`` command saves this
    engine, or whose name differs only by the suffix.

    Raises:
        ArtifactError: the engine is missing or no TensorRT-ready ONNX manifest describes it.
    """
    p = Path(engine)
    if manifest_path(p).is_file():
        return Artifact.load(p)
    if not p.is_file():
        raise ArtifactError(f"engine {p} does not exist: check the path or build it first")
    for m in sorted(p.parent.glob(f"*.onnx{MANIFEST_SUFFIX}")):
        onnx_path = m.with_name(m.name[: -len(MANIFEST_SUFFIX)])
        try:
            raw = json.loads(m.read_text())
        except ValueError:
            continue
        trtexec = str((raw.get("details") or {}).get("trtexec") or "")
        names_it = any(part.startswith("--saveEngine=") and Path(part.split("=", 1)[1]).name == p.name
                       for part in trtexec.split())
        if raw.get("target") == "trt" and (names_it or onnx_path.stem == p.stem):
            art = Artifact.load(onnx_path)
            details = {**art.details, "engine": None, "built_outside": True, "onnx": onnx_path.name,
                       "onnx_sha256": art.sha256}
            return art.replace(path=p, sha256=sha256_path(p), details=details)
    raise ArtifactError(f"{p.name} has no manifest and no TensorRT-ready ONNX manifest beside it names it: keep the "
                        "engine next to the .onnx (and its manifest) it was built from, with the same name")


def runner_for_artifact(artifact, **kw: Any) -> Runner:
    """``TARGETS['trt'].runner``: a :class:`TrtRunner` for an ``.engine`` (a TensorRT-ready ``.onnx`` runs
    on ONNX Runtime: :func:`nextvit_deploy.targets.runner_for` sends it there)."""
    if Path(artifact.path).suffix != ".engine":
        raise DeployError(f"internal: {Path(artifact.path).name} is not an engine; open it with targets.runner_for")
    outside = bool(artifact.details.get("built_outside"))
    return TrtRunner(artifact.path, rebuild=str(artifact.details.get("trtexec") or ""), require_sidecar=not outside,
                     **{k: v for k, v in kw.items() if k in ("device", "check_environment")})


def availability(precision: str = "fp32") -> Availability:
    """TensorRT here: installed, importable (the PyPI stubs fail at import) and a CUDA GPU visible."""
    from importlib import metadata

    from .._deps import INSTALL_HINTS, available

    if not available("tensorrt"):
        return Availability("tensorrt", False, f"tensorrt is not installed: {INSTALL_HINTS['tensorrt']}")
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the stub packages raise anything at import time
        return Availability("tensorrt", False, f"tensorrt import fails ({type(exc).__name__}); "
                            f"{INSTALL_HINTS['tensorrt']}")
    cuda = _cuda()
    if not cuda.device_count():
        return Availability("tensorrt", False, "TensorRT needs a CUDA GPU (this machine has none)",
                            metadata.version("tensorrt"))
    return Availability("tensorrt", True, "", metadata.version("tensorrt"), f"cuda:0 ({cuda.describe(0)[0]})")
