"""`serve` on a real Triton server (the tritonserver binary from nvidia-pytriton), loopback only.

Every server here binds 127.0.0.1 on free ports, is started through the real CLI in a subprocess,
carries --timeout-s as a backstop so it stops by itself, and is stopped by a signal; each client call
has a timeout. Nothing here is timed.
"""
from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from nextvit_deploy.artifact import Artifact
from nextvit_deploy.backends.onnxrt import runner_for_artifact
from nextvit_deploy.data import noise_images, normalize, photos, preprocess_pil
from nextvit_deploy.errors import MissingDependency
from nextvit_deploy.export import ExportRequest, export
from nextvit_deploy.parity import compare_outputs, tolerance_for

from conftest import SMALL_DEPTHS, requires


def _why_not() -> str | None:
    from nextvit_deploy.serve.server import find_tritonserver

    try:
        find_tritonserver()
    except MissingDependency as exc:
        return str(exc)
    return None


_SKIP = _why_not()
pytestmark = [requires("tritonclient"), pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

HOST = "127.0.0.1"
START_TIMEOUT_S = 180
CLIENT_TIMEOUT_S = 60


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def children_of(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Served:
    """A `nextvit-deploy serve` subprocess, its ports and the tritonserver pid it printed."""

    def __init__(self, artifact: Path, *extra: str):
        self.http, self.grpc, self.metrics = free_ports(3)
        env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}  # as from a plain shell
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from nextvit_deploy.cli import main; main()", "serve", str(artifact),
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
             "--timeout-s", "600", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if "tritonserver pid" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(START_TIMEOUT_S) or self.proc.poll() is not None:
            self.proc.kill()
            raise AssertionError(f"serve did not start: {''.join(self.lines)} {self.proc.stderr.read()[-2000:]}")
        head = "".join(self.lines)
        self.model = re.search(r"serving '([^']+)'", head).group(1)
        self.server_pid = int(re.search(r"tritonserver pid (\d+)", head).group(1))
        self.tree = {self.server_pid} | children_of(self.server_pid)  # server + Python-backend stubs

    def stop(self, sig: int) -> int:
        self.tree |= children_of(self.server_pid)
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=90)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Artifact:
    return export(ExportRequest(target="onnx", depths=SMALL_DEPTHS, image_size=(64, 64), batch=(1, 4, 8),
                                out_dir=tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory) -> Iterator[Served]:
    # a long queue delay so that a burst from 8 threads is batched on this small CPU
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    s = Served(artifact.path, "--max-queue-delay-us", "50000", "--threads", "1", "--server-log", str(log))
    yield s
    code = s.stop(signal.SIGTERM)
    assert code == 0, s.proc.stderr.read()[-2000:]
    assert not [p for p in s.tree if alive(p)], "processes left after SIGTERM"
    text = log.read_text(errors="replace")
    assert "successfully loaded" in text and "Traceback" not in text, text[-3000:]  # errors are responses, not crashes


def _http(server: Served):
    import tritonclient.http as httpclient

    return httpclient, httpclient.InferenceServerClient(f"{HOST}:{server.http}", connection_timeout=CLIENT_TIMEOUT_S,
                                                        network_timeout=CLIENT_TIMEOUT_S)


def _grpc(server: Served):
    import tritonclient.grpc as grpcclient

    return grpcclient, grpcclient.InferenceServerClient(f"{HOST}:{server.grpc}")


def _infer(server: Served, x: np.ndarray, *, protocol: str, model: str | None = None, name: str = "input",
           datatype: str = "FP32") -> np.ndarray:
    mod, client = (_http if protocol == "http" else _grpc)(server)
    inp = mod.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    kwargs = {"client_timeout": CLIENT_TIMEOUT_S} if protocol == "grpc" else {}
    try:
        return client.infer(model or server.model, [inp], **kwargs).as_numpy("logits")
    finally:
        client.close()


def _direct(artifact: Artifact, x: np.ndarray) -> np.ndarray:
    with runner_for_artifact(artifact, threads=1) as r:
        return r.infer({"input": x})["logits"]


@pytest.mark.slow  # starts tritonserver
def test_concurrent_burst_matches_direct_runner_and_is_batched(server, artifact):
    from tritonclient.grpc import InferenceServerClient

    inputs = normalize(np.concatenate([photos(32, 64), noise_images(32, 64, seed=7)]), (0.485, 0.456, 0.406),
                       (0.229, 0.224, 0.225))
    with ThreadPoolExecutor(8) as pool:  # 64 requests of batch 1 from 8 client threads, HTTP and gRPC
        futures = [pool.submit(_infer, server, inputs[i:i + 1], protocol="http" if i % 2 else "grpc")
                   for i in range(64)]
        served = np.concatenate([f.result(timeout=CLIENT_TIMEOUT_S * 2) for f in futures])
    assert served.shape == (64, 1000)
    report = compare_outputs({"logits": _direct(artifact, inputs[:8])}, {"logits": served[:8]},
                             tolerance=tolerance_for(artifact.precision), case="photos")
    assert report, report
    for lo in range(8, 64, 8):
        case = compare_outputs({"logits": _direct(artifact, inputs[lo:lo + 8])}, {"logits": served[lo:lo + 8]},
                               tolerance=tolerance_for(artifact.precision), case="photos")
        assert case, case
    stats = InferenceServerClient(f"{HOST}:{server.grpc}").get_inference_statistics(server.model, as_json=True)
    model = stats["model_stats"][0]
    inferences, executions = int(model["inference_count"]), int(model["execution_count"])
    assert inferences >= 64
    assert executions < inferences, "Triton never batched two requests together"
    assert max(int(b["batch_size"]) for b in model["batch_stats"]) > 1


@pytest.mark.slow  # starts tritonserver
def test_malformed_requests_fail_alone(server, artifact):
    from tritonclient.utils import InferenceServerException

    good = normalize(photos(8, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    bad = [dict(x=np.zeros((1, 3, 32, 32), np.float32)),  # wrong image size
           dict(x=np.zeros((1, 3, 64, 64), np.float64), datatype="FP64"),  # wrong dtype
           dict(x=np.zeros((16, 3, 64, 64), np.float32)),  # above the max batch
           dict(x=np.frombuffer(b"not an image at all", np.uint8)[None], model=server.model + "_image",
                name="image", datatype="UINT8")]  # undecodable image
    with ThreadPoolExecutor(8) as pool:
        good_f = [pool.submit(_infer, server, good[i:i + 1], protocol="http") for i in range(8)]
        bad_f = [pool.submit(_infer, server, protocol="grpc" if i % 2 else "http", **b) for i, b in enumerate(bad)]
        outs = np.concatenate([f.result(timeout=CLIENT_TIMEOUT_S * 2) for f in good_f])
        for f in bad_f:
            with pytest.raises(InferenceServerException):
                f.result(timeout=CLIENT_TIMEOUT_S * 2)
    assert compare_outputs({"logits": _direct(artifact, good)}, {"logits": outs},
                           tolerance=tolerance_for(artifact.precision), case="photos")
    again = _infer(server, good[:1], protocol="grpc")  # still serving
    assert compare_outputs({"logits": _direct(artifact, good[:1])}, {"logits": again},
                           tolerance=tolerance_for(artifact.precision), case="photos")


@pytest.mark.slow  # starts tritonserver
def test_encoded_image_is_preprocessed_like_verify(server, artifact):
    import skimage.data
    from PIL import Image

    pictures = [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.chelsea())]
    blobs = []
    for fmt, pic in zip(("PNG", "JPEG"), pictures):
        buf = io.BytesIO()
        pic.save(buf, fmt)
        blobs.append(buf.getvalue())
    with ThreadPoolExecutor(2) as pool:  # different lengths: one ragged batch
        futures = [pool.submit(_infer, server, np.frombuffer(b, np.uint8)[None], protocol="http",
                               model=server.model + "_image", name="image", datatype="UINT8") for b in blobs]
        served = np.concatenate([f.result(timeout=CLIENT_TIMEOUT_S * 2) for f in futures])
    expected = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            expected.append(preprocess_pil(im, 64, crop_pct=artifact.preprocessing["crop_pct"]))
    x = normalize(np.stack(expected), artifact.preprocessing["mean"], artifact.preprocessing["std"])
    assert compare_outputs({"logits": _direct(artifact, x)}, {"logits": served},
                           tolerance=tolerance_for(artifact.precision), case="photos")


@pytest.mark.slow  # starts tritonserver
def test_sigint_stops_cleanly_and_static_batch_is_padded(tmp_path):
    art = export(ExportRequest(target="onnx", depths=SMALL_DEPTHS, image_size=(64, 64), batch=(4, 4, 4),
                               out_dir=tmp_path))
    s = Served(art.path, "--no-image-input", "--instances", "2")
    try:
        x = normalize(photos(3, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        served = _infer(s, x, protocol="http")  # 3 images into a batch-4 artifact: padded in the server
        padded = np.concatenate([x, np.zeros((1, *x.shape[1:]), np.float32)])
        assert compare_outputs({"logits": _direct(art, padded)[:3]}, {"logits": served},
                               tolerance=tolerance_for(art.precision), case="photos")
        assert len(children_of(s.server_pid)) >= 2  # one Python-backend stub per instance
    finally:
        code = s.stop(signal.SIGINT)
    assert code == 0
    assert not [p for p in s.tree if alive(p)], "processes left after SIGINT"


def test_errors_before_start_are_one_line(artifact, tmp_path):
    from typer.testing import CliRunner

    from nextvit_deploy.cli import app

    runner = CliRunner()
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = runner.invoke(app, ["serve", str(artifact.path), "--http-port", str(port)])
    assert r.exit_code == 2 and f"port {port} on 127.0.0.1 is not free" in r.output and "--http-port" in r.output
    r = runner.invoke(app, ["serve", str(tmp_path / "nope.onnx")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["serve", str(artifact.path), "--instances", "0"])
    assert r.exit_code == 2 and "--instances must be at least 1" in r.output
    help_text = runner.invoke(app, ["serve", "--help"]).output
    for flag in ("--host", "--http-port", "--grpc-port", "--metrics-port", "--instances", "--max-queue-delay-us",
                 "--timeout-s", "--threads", "--no-image-input"):
        assert flag in help_text
    # without the wheel: one line with the install command (pytriton blocked in a fresh interpreter)
    ports = free_ports(3)
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'pytriton':
                    raise ModuleNotFoundError('blocked by test', name=name)
        sys.meta_path.insert(0, _Block())
        sys.argv = ['nextvit-deploy', 'serve', {str(artifact.path)!r}, '--http-port', '{ports[0]}',
                    '--grpc-port', '{ports[1]}', '--metrics-port', '{ports[2]}']
        from nextvit_deploy.cli import main
        main()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install --no-deps nvidia-pytriton==0.7.0" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow  # starts tritonserver
def test_triton_repo_preprocessing_model_runs_on_triton(artifact, tmp_path, monkeypatch):
    """The `<name>_preprocess` step that `triton-repo --image-input` writes, on the real server: it returns
    exactly what verify's preprocessing computes. (The ensemble's ONNX step needs the onnxruntime backend,
    which the bundled server lacks; its config is parsed in test_triton_repo.py.)"""
    import shutil

    import skimage.data
    import tritonclient.http as httpclient
    from PIL import Image

    import nextvit_deploy
    from nextvit_deploy.serve.repo import RepoOptions, write_repository
    from nextvit_deploy.serve.server import ServeOptions, TritonProcess, _backends_dir, find_tritonserver

    full = tmp_path / "full"
    write_repository([artifact], full, options=RepoOptions(image_input=True, kind="cpu"))
    only = tmp_path / "only"
    only.mkdir()
    name = next(p.name for p in full.iterdir() if p.name.endswith("_preprocess"))
    shutil.copytree(full / name, only / name)
    # as in a container with `pip install --no-deps nextvit-deploy pillow`: the package is importable
    monkeypatch.setenv("PYTHONPATH", str(Path(nextvit_deploy.__file__).resolve().parent.parent))
    http, grpc, metrics = free_ports(3)
    dist = find_tritonserver()
    server = TritonProcess(dist, only, _backends_dir(dist, tmp_path / "rt"),
                           ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics), tmp_path / "log.txt")
    server.start()
    try:
        server.wait_ready([name], threading.Event())
        buf = io.BytesIO()
        picture = Image.fromarray(skimage.data.coffee())
        picture.save(buf, "PNG")
        blob = np.frombuffer(buf.getvalue(), np.uint8)[None]
        client = httpclient.InferenceServerClient(f"{HOST}:{http}", network_timeout=CLIENT_TIMEOUT_S)
        inp = httpclient.InferInput("image", list(blob.shape), "UINT8")
        inp.set_data_from_numpy(blob)
        got = client.infer(name, [inp]).as_numpy("input")
        client.close()
        tree = {server.proc.pid} | children_of(server.proc.pid)
    finally:
        server.stop()
    pre = artifact.preprocessing
    want = normalize(preprocess_pil(picture, 64, crop_pct=pre["crop_pct"])[None], pre["mean"], pre["std"])
    assert got.shape == (1, 3, 64, 64) and np.array_equal(got, want)
    assert not [p for p in tree if alive(p)]
