"""A recording TEST DOUBLE of the ``tensorrt`` Python module, and of the CUDA seam of our backend.

TensorRT cannot be installed on the machines that run this suite. To still test *which calls our
builder and runner make*, this module imitates the API surface of the real bindings of one major
version (names and enum members read from NVIDIA/TensorRT ``python/src/infer/pyCore.cpp`` /
``pyGraph.cpp`` and ``NvInfer.h`` of release/10.13 and release/11.1) and records every call. It builds
nothing and computes nothing: an "engine" is a JSON blob naming the inputs, and its outputs are
zeros. Nothing it returns is ever reported as a TensorRT result.

Facts modelled (each one is what a test asserts our code respects):

* ``NetworkDefinitionCreationFlag``: 10.x ``EXPLICIT_BATCH=0`` (deprecated), ``STRONGLY_TYPED=1``;
  11.x no ``EXPLICIT_BATCH``, ``STRONGLY_TYPED=0`` (accepted, ignored: every network is strongly typed).
* ``BuilderFlag``: 10.x has ``FP16``, ``BF16``, ``INT8``, ``FP8``, ``OBEY_PRECISION_CONSTRAINTS``,
  ``PREFER_PRECISION_CONSTRAINTS``; 11.x removed them. ``TF32`` exists in both and is **on** by default.
* ``IBuilderConfig.set_timing_cache(cache, ignore_mismatch)`` returns a bool (False for a cache made
  on another device); ``create_timing_cache`` on bytes it cannot read returns None here.
* ``Runtime.deserialize_cuda_engine`` returns None for a plan of another TensorRT version.
* Builds and deserializations happen on the *current* CUDA device (recorded from the CUDA double).
"""
from __future__ import annotations

import enum
import json
import types
from contextlib import contextmanager
from typing import Any

import numpy as np

PLAN_MAGIC = b"TEST-DOUBLE-PLAN\n"  # never a real plan


def _enum(name: str, members: list[str], start: int = 0) -> type[enum.IntEnum]:
    return enum.IntEnum(name, {m: i + start for i, m in enumerate(members)})  # type: ignore[return-value]


BUILDER_FLAGS_10 = ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
                    "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
                    "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8",
                    "ERROR_ON_TIMING_CACHE_MISS", "BF16", "DISABLE_COMPILATION_CACHE", "WEIGHTLESS", "STRIP_PLAN",
                    "REFIT_IDENTICAL", "WEIGHT_STREAMING", "INT4", "REFIT_INDIVIDUAL", "STRICT_NANS",
                    "MONITOR_MEMORY", "FP4", "EDITABLE_TIMING_CACHE"]
REMOVED_IN_11 = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                 "PREFER_PRECISION_CONSTRAINTS", "WEIGHTLESS", "REJECT_EMPTY_ALGORITHMS"}


class RecordingCuda:
    """Test double of ``nextvit_deploy.backends.tensorrt.TorchCuda``: ``gpus`` fake devices, calls recorded.

    Buffers are numpy arrays with a fake ``data_ptr``; nothing runs on a GPU.
    """

    def __init__(self, gpus: list[tuple[str, str]], log: list):
        self.gpus = gpus  # [(name, "major.minor")]
        self.log = log
        self.current = 0

    def device_count(self) -> int:
        return len(self.gpus)

    def describe(self, index: int) -> tuple[str, str]:
        return self.gpus[index]

    @contextmanager
    def on(self, index: int):
        before, self.current = self.current, index
        self.log.append(("cuda.on", index))
        try:
            yield
        finally:
            self.current = before

    def stream(self, index: int):
        self.log.append(("cuda.stream", index))
        return _Stream(index)

    @contextmanager
    def using(self, stream):
        yield

    def upload(self, arr: np.ndarray, index: int):
        self.log.append(("cuda.upload", index, tuple(arr.shape)))
        return _Buffer(np.array(arr), index)

    def empty(self, shape, dtype, index: int):
        self.log.append(("cuda.empty", index, tuple(shape)))
        return _Buffer(np.zeros(shape, dtype), index)

    def event(self):
        return _Event()

    @staticmethod
    def download(t) -> np.ndarray:
        return t.array.astype(np.float32)


class _Buffer:
    _next = 0x1000

    def __init__(self, array: np.ndarray, index: int):
        self.array, self.index = array, index
        _Buffer._next += 0x1000
        self.ptr = _Buffer._next

    def data_ptr(self) -> int:
        return self.ptr


class _Stream:
    def __init__(self, index: int):
        self.index = index
        self.cuda_stream = 0xC0DE + index

    def synchronize(self) -> None:
        return None


class _Event:
    def record(self, stream) -> None:
        return None

    def elapsed_time(self, other) -> float:
        return 1.0


def make_tensorrt(version: str, cuda: RecordingCuda, *, parse_errors: tuple[str, ...] = (),
                  cache_device: str = "") -> types.ModuleType:
    """A module object standing in for ``tensorrt`` ``version`` (e.g. "10.13.3.9", "11.1.0.8").

    Args:
        version: the version the double imitates; its major selects the API surface.
        cuda: the CUDA double (its current device is recorded at build and deserialization).
        parse_errors: errors the parser reports (parse_from_file then returns False).
        cache_device: the device tag of this machine's timing caches; a cache made elsewhere is rejected.
    """
    major = int(version.split(".")[0])
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version
    mod.__doc__ = "recording test double of the tensorrt module (not TensorRT)"
    log: list = cuda.log
    mod.calls = log  # type: ignore[attr-defined]
    if major >= 11:
        mod.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag",
                                                  ["STRONGLY_TYPED", "PREFER_JIT_PYTHON_PLUGINS",
                                                   "PREFER_AOT_PYTHON_PLUGINS"])
        mod.BuilderFlag = _enum("BuilderFlag", [f for f in BUILDER_FLAGS_10 if f not in REMOVED_IN_11])
    else:
        mod.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag",
                                                  ["EXPLICIT_BATCH", "STRONGLY_TYPED", "PREFER_JIT_PYTHON_PLUGINS",
                                                   "PREFER_AOT_PYTHON_PLUGINS"])
        mod.BuilderFlag = _enum("BuilderFlag", BUILDER_FLAGS_10)
    mod.MemoryPoolType = _enum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM",
                                                  "DLA_GLOBAL_DRAM", "TACTIC_DRAM"])
    mod.TensorIOMode = _enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    mod.DataType = _enum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL"])
    mod.float32 = mod.DataType.FLOAT

    def nptype(dt):
        return {mod.DataType.FLOAT: np.float32, mod.DataType.HALF: np.float16, mod.DataType.INT8: np.int8,
                mod.DataType.INT32: np.int32, mod.DataType.BOOL: np.bool_}[dt]

    mod.nptype = nptype

    class Logger:
        WARNING, ERROR, INFO, VERBOSE = 2, 1, 3, 4

        def __init__(self, severity: int = 2):
            self.severity = severity

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    class TimingCache:
        def __init__(self, device: str, entries: int = 0):
            self.device, self.entries = device, entries

        def serialize(self) -> bytes:
            return json.dumps({"timing_cache_double": self.device, "entries": self.entries}).encode()

    class Network:
        def __init__(self, flags: int):
            self.flags = flags
            self.layers: list[Any] = []
            self.inputs: list[str] = []

        @property
        def num_layers(self) -> int:
            return len(self.layers)

        def get_layer(self, i: int):
            return self.layers[i]

        def get_flag(self, flag) -> bool:
            return bool(self.flags & (1 << int(flag)))

    class Parser:
        def __init__(self, network: Network, logger: Logger):
            self.network, self.errors = network, list(parse_errors)

        def parse_from_file(self, path: str) -> bool:
            import onnx

            model = onnx.load(path)
            self.network.inputs = [i.name for i in model.graph.input]
            self.network.layers = [types.SimpleNamespace(name=n.name, precision=None) for n in model.graph.node]
            log.append(("parser.parse_from_file", path))
            return not self.errors

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name, lo, opt, hi) -> None:
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
            log.append(("profile.set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class Config:
        def __init__(self) -> None:
            self.flags = {mod.BuilderFlag.TF32}  # NvInfer.h: kTF32 "Enabled by default"
            self.pool: dict = {}
            self.builder_optimization_level = 3
            self.progress_monitor = None
            self.profiles: list[Profile] = []
            self.cache: TimingCache | None = None

        def set_flag(self, flag) -> None:
            log.append(("config.set_flag", flag.name))
            self.flags.add(flag)

        def clear_flag(self, flag) -> None:
            log.append(("config.clear_flag", flag.name))
            self.flags.discard(flag)

        def get_flag(self, flag) -> bool:
            return flag in self.flags

        def set_memory_pool_limit(self, pool, size: int) -> None:
            self.pool[pool] = size

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes):
            log.append(("config.create_timing_cache", len(data)))
            if not data:
                return TimingCache(cache_device)
            try:
                raw = json.loads(data)
                return TimingCache(raw["timing_cache_double"], raw["entries"])
            except (ValueError, KeyError, TypeError):
                return None

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            ok = ignore_mismatch or cache.device == cache_device
            log.append(("config.set_timing_cache", cache.device, ok))
            if ok:
                self.cache = cache
            return ok

        def get_timing_cache(self) -> TimingCache:
            return self.cache or TimingCache(cache_device)

    class Builder:
        def __init__(self, logger: Logger):
            self.logger = logger

        def create_network(self, flags: int = 0) -> Network:
            log.append(("builder.create_network", flags))
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config):
            log.append(("builder.build_serialized_network", {
                "device": cuda.current, "network_flags": network.flags,
                "flags": sorted(f.name for f in config.flags),
                "pinned_layers": [lay.name for lay in network.layers if lay.precision is not None],
                "profiles": [p.shapes for p in config.profiles],
                "opt_level": config.builder_optimization_level}))
            if config.cache is not None:
                config.cache.entries += 1
            spec = {"version": version, "inputs": network.inputs,
                    "profile": {k: v for p in config.profiles for k, v in p.shapes.items()}}
            return PLAN_MAGIC + json.dumps(spec).encode()

    class Engine:
        def __init__(self, spec: dict):
            self.spec = spec
            self.io = [(n, mod.TensorIOMode.INPUT) for n in spec["inputs"]] + [("logits", mod.TensorIOMode.OUTPUT)]

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, i: int) -> str:
            return self.io[i][0]

        def get_tensor_mode(self, name: str):
            return dict(self.io)[name]

        def get_tensor_dtype(self, name: str):
            return mod.DataType.FLOAT

        def get_tensor_shape(self, name: str):
            if name == "logits":
                return (-1, 1000)
            lo, _, _ = self.spec["profile"][name]
            return (-1, *lo[1:])

        def get_tensor_profile_shape(self, name: str, profile: int):
            return self.spec["profile"][name]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine: Engine):
            self.engine, self.shapes = engine, {}

        def set_input_shape(self, name: str, shape) -> bool:
            log.append(("context.set_input_shape", name, tuple(shape)))
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            log.append(("context.set_tensor_address", name))
            return True

        def get_tensor_shape(self, name: str):
            batch = next(iter(self.shapes.values()))[0]
            return (batch, 1000)

        def execute_async_v3(self, stream_handle: int) -> bool:
            log.append(("context.execute_async_v3", stream_handle, cuda.current))
            return True

    class Runtime:
        def __init__(self, logger: Logger):
            pass

        def deserialize_cuda_engine(self, data: bytes):
            log.append(("runtime.deserialize_cuda_engine", cuda.current))
            if not data.startswith(PLAN_MAGIC):
                return None
            spec = json.loads(data[len(PLAN_MAGIC):])
            if spec["version"] != version:  # "Version tag does not match": the real runtime returns None
                return None
            return Engine(spec)

    mod.Logger, mod.IProgressMonitor, mod.Builder, mod.Runtime = Logger, IProgressMonitor, Builder, Runtime
    mod.OnnxParser = Parser
    return mod
