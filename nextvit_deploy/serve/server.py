"""``nextvit-deploy serve``: an artifact behind a real Triton Inference Server, on the project's runner.

The ``tritonserver`` binary (Triton 2.51 with its Python backend) comes from the ``nvidia-pytriton``
wheel; only the binary is used, not PyTriton's Python API (whose stub-side data path needs NumPy 1).
``serve`` writes a temporary model repository with two Python-backend models (see
:mod:`.backend_model`):

* ``<name>``: the normalised tensor, named like the artifact's input, dynamic batching up to the
  artifact's max batch;
* ``<name>_image``: the bytes of one encoded image file per request (UINT8 ``[1, L]``), decoded and
  preprocessed in the server, ragged-batched the same way.

The server binds 127.0.0.1 unless told otherwise, runs until SIGINT/SIGTERM (or ``timeout_s``), and is
stopped with SIGINT, then SIGKILL after a grace period; it runs in its own process group, which is
killed at the end so no Python-backend stub survives it, and it dies with its parent
(``PR_SET_PDEATHSIG``) if ``serve`` itself is killed.

Trap handled here: the backend stub loads ``libpython`` through the dynamic linker, so the running
interpreter's ``LIBDIR`` is put first on the server's ``LD_LIBRARY_PATH``; otherwise a pyenv/venv
interpreter gets the system ``libpython`` and model loading fails with ``'_thread.RLock' object has no
attribute '_recursion_count'``.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifact import Artifact
from ..errors import BadInput, DeployError, MissingDependency

__all__ = ["ServeOptions", "ServeInfo", "TritonProcess", "SERVE_INSTALL", "find_tritonserver", "check_port_free",
           "open_artifact_runner", "write_serve_repository", "server_environment", "serve"]

SERVE_INSTALL = "pip install 'nextvit-deploy[serve]' && pip install --no-deps nvidia-pytriton==0.7.0"
MIN_GLIBC = (2, 35)  # the nvidia-pytriton 0.7.0 wheel is manylinux_2_35


class ServerError(DeployError):
    """tritonserver could not start, or stopped unexpectedly (the message carries its last log lines)."""


@dataclass(frozen=True)
class ServeOptions:
    """How ``serve`` runs Triton.

    Attributes:
        host: address the HTTP, gRPC and metrics endpoints bind. Defaults to "127.0.0.1" (loopback only).
        http_port / grpc_port / metrics_port: TCP ports. Defaults to 8000 / 8001 / 8002.
        instances: model instances (each with its own runner). Defaults to 1.
        max_queue_delay_us: how long the dynamic batcher may hold a request to fill a batch (microseconds).
        threads: intra-op threads per runner; ``None`` lets the runtime choose. Defaults to None.
        image_input: also serve ``<name>_image`` (encoded image bytes). Defaults to True.
        timeout_s: stop by itself after this many seconds of serving; ``None`` runs until a signal.
        name: model name; defaults to the artifact's file name without suffix.
        exit_timeout_s: grace period for in-flight requests at shutdown (seconds). Defaults to 5.
        startup_timeout_s: give up when the server is not ready after this long (seconds). Defaults to 120.
        log_path: also keep the server's log here. Defaults to None (temporary, shown on failure).
    """

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    max_queue_delay_us: int = 1000
    threads: int | None = None
    image_input: bool = True
    timeout_s: float | None = None
    name: str | None = None
    exit_timeout_s: int = 5
    startup_timeout_s: float = 120.0
    log_path: Path | None = None


@dataclass(frozen=True)
class ServeInfo:
    """What a started server offers (printed by the CLI once the models are ready)."""

    model: str
    image_model: str | None
    input_name: str
    input_shape: tuple[int, ...]  # without the batch axis
    max_batch_size: int
    http_url: str
    grpc_url: str
    metrics_url: str
    pid: int


def _glibc() -> tuple[int, int] | None:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return None
    try:
        major, minor = text.split()[-1].split(".")[:2]
        return int(major), int(minor)
    except (ValueError, IndexError):
        return None


def find_tritonserver() -> Path:
    """The ``tritonserver`` distribution folder inside the installed nvidia-pytriton wheel (not imported).

    Raises:
        MissingDependency: not Linux, glibc too old, wheel missing, or no backend stub for this Python.
    """
    import importlib.util

    if not sys.platform.startswith("linux"):
        raise MissingDependency(f"serve needs Linux (the tritonserver binary is a Linux build), this is {sys.platform}")
    libc = _glibc()
    if libc is None or libc < MIN_GLIBC:
        have = ".".join(map(str, libc)) if libc else "not glibc"
        raise MissingDependency(f"serve needs glibc >= {'.'.join(map(str, MIN_GLIBC))} for the tritonserver binary "
                                f"(this system has {have}): use the Triton container (see README, 'Serving with Triton')")
    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise MissingDependency(f"serve needs the tritonserver binary from nvidia-pytriton; install with: {SERVE_INSTALL}")
    dist = Path(spec.origin).parent / "tritonserver"
    stub = dist / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    if not (dist / "bin" / "tritonserver").is_file():
        raise MissingDependency(f"nvidia-pytriton is installed without its tritonserver binary ({dist}/bin): "
                                f"reinstall with: {SERVE_INSTALL}")
    if not stub.is_file():
        raise MissingDependency(f"nvidia-pytriton has no Python-backend stub for Python "
                                f"{sys.version_info.major}.{sys.version_info.minor}: run serve with Python 3.8-3.13")
    return dist


def check_port_free(host: str, port: int, flag: str) -> None:
    """Raise :class:`BadInput` naming ``flag`` when ``host:port`` cannot be bound."""
    if not 0 < port < 65536:
        raise BadInput(f"{flag} {port} is not a TCP port: use 1-65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise BadInput(f"port {port} on {host} is not free ({exc.strerror}): choose another with {flag}") from None


def open_artifact_runner(artifact: Artifact, *, threads: int | None = None) -> Any:
    """The artifact's runner through ``TARGETS`` (not yet entered); ``threads`` where the runner takes it."""
    from ..targets import runner_for

    return runner_for(artifact, threads=threads or None)


def _io_for_serving(artifact: Artifact) -> tuple[tuple[int, ...], list[tuple[str, tuple[int, ...]]]]:
    """(input dims without batch, [(output name, dims without batch)])."""
    from .repo import REPO_PLATFORMS, model_io

    _, c, h, w = artifact.input_shape
    if artifact.path.suffix in REPO_PLATFORMS:
        io = model_io(artifact)
        return (c, h, w), [(t.name, tuple(t.shape[1:])) for t in io.outputs]
    if artifact.features_only:
        raise BadInput(f"{artifact.path.name}: serve describes backbone outputs from an ONNX graph; "
                       "export --target onnx --backbone to serve the feature maps")
    return (c, h, w), [(n, (artifact.num_classes,)) for n in artifact.output_names]


def _config(name: str, *, mode: str, artifact: Artifact, in_dims: tuple[int, ...],
            outputs: list[tuple[str, tuple[int, ...]]], opts: ServeOptions) -> str:
    hi = artifact.batch[2] if artifact.dynamic_batch else artifact.batch[0]
    lo, opt, _ = artifact.batch
    preferred = sorted({b for b in (opt, hi) if b > 1}) or [hi]
    if mode == "image":
        inputs = '  { name: "image" data_type: TYPE_UINT8 dims: [ -1 ] allow_ragged_batch: true }'
    else:
        inputs = f'  {{ name: "{artifact.input_name}" data_type: TYPE_FP32 dims: [ {", ".join(map(str, in_dims))} ] }}'
    outs = ",\n".join(f'  {{ name: "{n}" data_type: TYPE_FP32 dims: [ {", ".join(map(str, d))} ] }}'
                      for n, d in outputs)
    params = {"artifact": str(artifact.path.resolve()), "mode": mode, "threads": str(opts.threads or ""),
              "sys_path": json.dumps([p for p in sys.path if p]),
              "site_dirs": json.dumps([*site.getsitepackages(), site.getusersitepackages()])}
    param_text = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}'
                           for k, v in params.items())
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {hi}\ninput [\n{inputs}\n]\noutput [\n{outs}\n]\n'
            f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, preferred))} ] "
            f"max_queue_delay_microseconds: {opts.max_queue_delay_us} }}\n"
            f"instance_group [ {{ count: {opts.instances} kind: KIND_CPU }} ]\n{param_text}\n")


def write_serve_repository(artifact: Artifact, repo: Path, opts: ServeOptions) -> tuple[str, str | None]:
    """Write the Python-backend model(s) for ``artifact`` into ``repo``; returns (model, image model or None)."""
    from .repo import model_name_for

    name = opts.name or model_name_for(artifact)
    in_dims, outputs = _io_for_serving(artifact)
    models = [(name, "tensor")] + ([(f"{name}_image", "image")] if opts.image_input else [])
    source = Path(__file__).with_name("backend_model.py")
    for model, mode in models:
        (repo / model / "1").mkdir(parents=True)
        shutil.copy2(source, repo / model / "1" / "model.py")
        (repo / model / "config.pbtxt").write_text(
            _config(model, mode=mode, artifact=artifact, in_dims=in_dims, outputs=outputs, opts=opts))
    return name, (models[1][0] if opts.image_input else None)


def _backends_dir(dist: Path, into: Path) -> Path:
    """``backends/python`` with the stub for this interpreter (symlinks into the wheel's files)."""
    py = into / "backends" / "python"
    py.mkdir(parents=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for src in (dist / "backends" / "python").iterdir():
        if src.is_file():
            (py / src.name).symlink_to(src)
    (py / "triton_python_backend_stub").symlink_to(dist / "python_backend_stubs" / version / "triton_python_backend_stub")
    return into / "backends"


def server_environment(dist: Path) -> dict[str, str]:
    """The server's environment: this interpreter's LIBDIR first on LD_LIBRARY_PATH (see module docstring)."""
    env = dict(os.environ)
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", str(dist.parent.parent / "nvidia_pytriton.libs")]
    old = env.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in libdirs if d and Path(d).is_dir()] + ([old] if old else []))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()  # own process group: the whole tree (server + stubs) can be signalled at once
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TritonProcess:
    """A ``tritonserver`` child process: start, wait until models are ready, stop (no orphans)."""

    def __init__(self, dist: Path, repo: Path, backends: Path, opts: ServeOptions, log_path: Path):
        self.dist, self.repo, self.backends, self.opts, self.log_path = dist, repo, backends, opts, log_path
        self.proc: subprocess.Popen | None = None
        self._log: Any = None

    @property
    def process(self) -> subprocess.Popen:
        """The running tritonserver (after :meth:`start`)."""
        if self.proc is None:
            raise ServerError("internal: tritonserver was not started")
        return self.proc

    @property
    def probe_host(self) -> str:
        return "127.0.0.1" if self.opts.host in ("0.0.0.0", "") else ("::1" if self.opts.host == "::" else self.opts.host)

    def command(self) -> list[str]:
        o = self.opts
        return [str(self.dist / "bin" / "tritonserver"), f"--model-repository={self.repo}",
                f"--backend-directory={self.backends}", f"--http-address={o.host}", f"--http-port={o.http_port}",
                f"--grpc-address={o.host}", f"--grpc-port={o.grpc_port}", f"--metrics-address={o.host}",
                f"--metrics-port={o.metrics_port}", "--allow-gpu-metrics=false", f"--exit-timeout-secs={o.exit_timeout_s}",
                "--strict-readiness=true", "--log-verbose=0"]

    def start(self) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=server_environment(self.dist), preexec_fn=_die_with_parent)

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        keep = [t for t in text if t[:1] in ("E", "W") or "rror" in t][-lines:]
        return " | ".join(t.strip() for t in keep)

    def _ready(self, path: str) -> bool:
        host = f"[{self.probe_host}]" if ":" in self.probe_host else self.probe_host
        try:
            with urllib.request.urlopen(f"http://{host}:{self.opts.http_port}{path}", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, models: list[str], stop: threading.Event) -> None:
        deadline = time.monotonic() + self.opts.startup_timeout_s
        while time.monotonic() < deadline and not stop.is_set():
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting: "
                                  f"{self.log_tail() or 'no log'} (full log: {self.log_path})")
            if self._ready("/v2/health/ready") and all(self._ready(f"/v2/models/{m}/ready") for m in models):
                return
            stop.wait(0.2)
        if not stop.is_set():
            raise ServerError(f"tritonserver was not ready after {self.opts.startup_timeout_s:.0f} s: "
                              f"{self.log_tail() or 'no log'}")

    def stop(self) -> int | None:
        """SIGINT (in-flight requests finish), SIGKILL after the grace period, then the whole group."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=self.opts.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stubs left in the server's own group
        except (ProcessLookupError, PermissionError):
            pass
        if self._log is not None:
            self._log.close()
        return self.proc.returncode


def serve(path: str | Path, opts: ServeOptions = ServeOptions(), *,
          on_ready: Callable[[ServeInfo], None] | None = None, stop: threading.Event | None = None) -> int:
    """Serve the artifact at ``path`` until SIGINT/SIGTERM, ``opts.timeout_s`` or ``stop`` is set.

    Everything that can be checked before the server starts is (artifact, runner availability, ports,
    the binary), each failure one line naming the fix. Signal handlers are installed only when called
    from the main thread.

    Returns:
        0 after a requested stop (signal, timeout, ``stop``).

    Raises:
        ServerError: the server failed to start or died while serving.
    """
    artifact = Artifact.load(path)
    if opts.instances < 1:
        raise BadInput(f"--instances must be at least 1, got {opts.instances}")
    if opts.max_queue_delay_us < 0:
        raise BadInput(f"--max-queue-delay-us must be >= 0, got {opts.max_queue_delay_us}")
    if opts.timeout_s is not None and opts.timeout_s <= 0:
        raise BadInput(f"--timeout-s must be positive, got {opts.timeout_s}")
    ports = {"--http-port": opts.http_port, "--grpc-port": opts.grpc_port, "--metrics-port": opts.metrics_port}
    if len(set(ports.values())) != 3:
        raise BadInput(f"--http-port, --grpc-port and --metrics-port must differ, got {sorted(ports.values())}")
    for flag, port in ports.items():
        check_port_free(opts.host, port, flag)
    dist = find_tritonserver()
    with open_artifact_runner(artifact) as probe:  # fails here, in one line, if this machine cannot run it
        spec = probe.inputs()[0]
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    work = Path(tempfile.mkdtemp(prefix="nextvit-serve-"))
    server: TritonProcess | None = None
    try:
        repo = work / "models"
        model, image_model = write_serve_repository(artifact, repo, opts)
        server = TritonProcess(dist, repo, _backends_dir(dist, work), opts, opts.log_path or work / "tritonserver.log")
        server.start()
        server.wait_ready([model] + ([image_model] if image_model else []), stop)
        if stop.is_set():
            return 0
        lo, _, hi = artifact.batch
        host = server.probe_host if opts.host in ("0.0.0.0", "::", "") else opts.host
        if on_ready is not None:
            on_ready(ServeInfo(model=model, image_model=image_model, input_name=spec.name,
                               input_shape=tuple(artifact.input_shape[1:]),
                               max_batch_size=hi if artifact.dynamic_batch else lo,
                               http_url=f"http://{host}:{opts.http_port}", grpc_url=f"{host}:{opts.grpc_port}",
                               metrics_url=f"http://{host}:{opts.metrics_port}/metrics", pid=server.process.pid))
        deadline = None if opts.timeout_s is None else time.monotonic() + opts.timeout_s
        while not stop.is_set():
            if server.process.poll() is not None:
                raise ServerError(f"tritonserver stopped unexpectedly (code {server.process.returncode}): "
                                  f"{server.log_tail() or 'no log'}")
            if deadline is not None and time.monotonic() >= deadline:
                break
            stop.wait(0.2)
        return 0
    finally:
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(work, ignore_errors=True)
