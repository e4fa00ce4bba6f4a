"""Adversarial sweep (issue #14): bad inputs against the real ``nextvit-deploy`` CLI, one subprocess each.

Categories: export options, checkpoints, verify (malformed manifests, tampered artifacts), bench/doctor,
calibration folders, and signals / full disk / concurrency. Every case runs in its own folder under a
temporary root (its cwd) and is checked against the promise:

* the exit code is the documented one (2 for a user error, 130 for Ctrl-C, 0 for a valid request);
* on exit 2, exactly one message line on stderr (progress lines, which start with "- ", are not
  counted; validation errors come before any progress); never a traceback, never "internal error";
* nothing is left behind: the case folder is unchanged after a failure (only the declared outputs
  appear after a success), and a sentinel folder outside it is never touched.

Usage:
    python benchmarks/adversarial_sweep.py [--out benchmarks/results] [--only CATEGORY] [--keep]

Prints a table and "N of M keep the promise", and writes ``adversarial_sweep.md`` to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_EXE = Path(sys.executable).with_name("nextvit-deploy")
CLI = [str(_EXE)] if _EXE.exists() else [sys.executable, "-c", "from nextvit_deploy.cli import main; main()"]
SMALL_DEPTHS = (1, 1, 5, 1)
ARTIFACT = "nextvit_small-onnx-fp32-64.onnx"

Setup = Callable[[Path], None]


@dataclass
class Case:
    category: str
    name: str
    args: list[str]
    setup: Setup | None = None
    expect: int = 2
    contains: str = ""  # a fragment the stderr line must hold (the fix it names)
    creates: tuple[str, ...] = ()  # paths a success may add (relative to the case folder)
    timeout: float = 180.0
    runner: Callable[[Case, Path], Outcome] | None = None  # special cases (signals, concurrency)


@dataclass
class Outcome:
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ----------------------------------------------------------------------------------------- fixtures

def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


def _images(d: Path, n: int) -> None:
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (48, 40), (i * 7 % 255, 90, 30)).save(d / f"img{i:03d}.png")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def _torch_save(obj, path: Path) -> None:
    import torch

    torch.save(obj, path)


def _small_state(num_classes: int = 1000):
    from nextvit_model import create_model

    return create_model("nextvit_small", num_classes=num_classes).state_dict()


class Fixtures:
    """Built once per sweep: a small verified artifact and a full-size Next-ViT-S state dict."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root / "base"
        self._state = None

    def build(self) -> None:
        from nextvit_deploy.export import ExportRequest, export

        export(ExportRequest(image_size=(64, 64), out_dir=self.base, depths=SMALL_DEPTHS, seed=5))

    @property
    def state(self):
        if self._state is None:
            self._state = _small_state()
        return self._state

    def artifact_copy(self, d: Path, *, edit: dict | None = None, copy_bytes: bool = False,
                      raw_manifest: str | None = None) -> Path:
        src = self.base / ARTIFACT
        dst = d / ARTIFACT
        if copy_bytes:
            shutil.copyfile(src, dst)
        else:
            os.link(src, dst)
        m = json.loads((self.base / (ARTIFACT + ".manifest.json")).read_text())
        m.update(edit or {})
        (d / (ARTIFACT + ".manifest.json")).write_text(raw_manifest if raw_manifest is not None else json.dumps(m))
        return dst


# ----------------------------------------------------------------------------------------- the cases

def export_cases() -> list[Case]:
    c = "export options"

    def precious(d: Path) -> None:
        (d / "precious" / "sub").mkdir(parents=True)
        (d / "precious" / "results.csv").write_text("x\n")

    def afile(d: Path) -> None:
        (d / "afile").write_text("a file")

    def loop(d: Path) -> None:
        (d / "loop").symlink_to(d / "loop")

    def labels(d: Path) -> None:
        (d / "labels.txt").write_text("\n".join(f"c{i}" for i in range(1000)) + "\n")

    def foreign(d: Path) -> None:
        (d / "out").mkdir()
        (d / "out" / "nextvit_small-onnx-fp32-224.onnx").write_bytes(b"somebody else's file")

    def other_seed(d: Path) -> None:
        (d / "out").mkdir()
        (d / "out" / "nextvit_small-onnx-fp32-224.onnx").write_bytes(b"old")
        (d / "out" / "nextvit_small-onnx-fp32-224.onnx.manifest.json").write_text(json.dumps({"seed": 0}))

    def ckpt_file(d: Path) -> None:
        (d / "w.pth").write_bytes(b"x")

    e = ["export", "-o", "out"]
    rows = [
        ("batch 100000", ["--batch", "100000"], None, "--batch"),
        ("batch 0", ["--batch", "0"], None, "--batch"),
        ("batch -1", ["--batch", "-1"], None, "--batch"),
        ("batch 8:2", ["--batch", "8:2"], None, "min <= opt <= max"),
        ("batch 1:2:3:4", ["--batch", "1:2:3:4"], None, "--batch"),
        ("batch abc", ["--batch", "abc"], None, "--batch"),
        ("batch 1:300", ["--batch", "1:300"], None, "--batch"),
        ("image-size 10000x10000", ["-s", "10000x10000"], None, "--image-size"),
        ("image-size 16", ["-s", "16"], None, "--image-size"),
        ("image-size 0", ["-s", "0"], None, "--image-size"),
        ("image-size abc", ["-s", "abc"], None, "--image-size"),
        ("image-size 64x64x3", ["-s", "64x64x3"], None, "--image-size"),
        ("image-size 2049", ["-s", "2049"], None, "--image-size"),
        ("opset 99", ["--opset", "99"], None, "--opset"),
        ("opset 7", ["--opset", "7"], None, "--opset"),
        ("opset x", ["--opset", "x"], None, "--opset"),
        ("workspace-gb -1", ["-t", "trt", "--workspace-gb", "-1"], None, "--workspace-gb"),
        ("workspace-gb 0", ["-t", "trt", "--workspace-gb", "0"], None, "--workspace-gb"),
        ("workspace-gb nan", ["-t", "trt", "--workspace-gb", "nan"], None, "--workspace-gb"),
        ("opt-level 9", ["-t", "trt", "--opt-level", "9"], None, "--opt-level"),
        ("opt-level -1", ["-t", "trt", "--opt-level", "-1"], None, "--opt-level"),
        ("target onx", ["--target", "onx"], None, "--target"),
        ("target empty", ["--target", ""], None, "--target"),
        ("precision int4", ["--precision", "int4"], None, "--precision"),
        ("coreml int8", ["-t", "coreml", "-p", "int8"], None, "choose one of fp32, fp16"),
        ("variant nextvit_tiny", ["--variant", "nextvit_tiny"], None, "choose one of"),
        ("variant empty", ["--variant", ""], None, "variant"),
        ("input-kind image for onnx", ["--input-kind", "image"], None, "--target coreml"),
        ("input-kind jpeg", ["--input-kind", "jpeg"], None, "--input-kind"),
        ("labels with onnx", ["--labels", "labels.txt"], labels, "drop --labels"),
        ("min-target with onnx", ["--min-target", "iOS16"], None, "drop --min-target"),
        ("workspace-gb with onnx", ["--workspace-gb", "2"], None, "drop --workspace-gb"),
        ("opt-level with onnx", ["--opt-level", "2"], None, "drop --opt-level"),
        ("timing-cache with onnx", ["--timing-cache", "t.cache"], None, "drop --timing-cache"),
        ("calib-dir with fp32", ["--calib-dir", "imgs"], None, "drop --calib-dir"),
        ("calib-images with fp32", ["--calib-images", "8"], None, "drop --calib-images"),
        ("opset with coreml", ["-t", "coreml", "--opset", "17"], None, "drop --opset"),
        ("coreml labels missing", ["-t", "coreml", "--labels", "nolabels.txt"], None, "--labels"),
        ("coreml backbone + labels", ["-t", "coreml", "--backbone", "--labels", "labels.txt"], labels, "--backbone"),
        ("coreml dynamic batch", ["-t", "coreml", "-b", "1:4"], None, "--batch"),
        ("coreml min-target iOS13", ["-t", "coreml", "--min-target", "iOS13"], None, "--min-target"),
        ("json onto a folder", ["--json", "precious"], precious, "--json"),
        ("json under a file", ["--json", "afile/x.json"], afile, "--json"),
        ("out is a file", ["-o", "afile"], afile, "--out"),
        ("out under a file", ["-o", "afile/sub"], afile, "--out"),
        ("out symlink loop", ["-o", "loop"], loop, "--out"),
        ("out under symlink loop", ["-o", "loop/sub"], loop, "--out"),
        ("unknown option", ["--bogus"], None, "--bogus"),
        ("seed abc", ["--seed", "abc"], None, "--seed"),
        ("seed with checkpoint", ["--checkpoint", "w.pth", "--seed", "3"], ckpt_file, "drop --seed"),
        ("foreign file of the same name", [], foreign, "--force"),
        ("artifact of another seed", ["--seed", "3"], other_seed, "--force"),
        ("int8 calib-images 10000", ["-p", "int8", "--calib-images", "10000"], None, "--calib-images"),
        ("int8 calib-images 0", ["-p", "int8", "--calib-images", "0"], None, "--calib-images"),
    ]
    out = []
    for name, args, setup, frag in rows:
        argv = (["export", *args] if any(a in ("-o", "--out") for a in args) else [*e, *args])
        out.append(Case(c, name, argv, setup, contains=frag))
    return out


def checkpoint_cases(fx: Fixtures) -> list[Case]:
    c = "checkpoints"

    def write(name: str, make: Callable[[Path], None]) -> Setup:
        return lambda d: make(d / name)

    def nan(key_index: int, value: float) -> Setup:
        def make(d: Path) -> None:
            state = {k: v.clone() for k, v in fx.state.items()}
            key = [k for k, v in state.items() if v.is_floating_point() and v.dim() > 1][key_index]
            state[key].view(-1)[0] = value
            _torch_save(state, d / "w.pth")
        return make

    def huge_head(d: Path) -> None:
        import torch

        state = dict(fx.state)
        state["head.fc.weight"] = torch.zeros(1, state["head.fc.weight"].shape[1]).expand(10**9, -1)
        state["head.fc.bias"] = torch.zeros(1).expand(10**9)
        _torch_save(state, d / "w.pth")

    def base_layout(d: Path) -> None:
        import torch

        from nextvit_model import VARIANTS

        n = sum(VARIANTS["nextvit_base"].depths)
        _torch_save({f"features.{i}.norm.weight": torch.ones(2) for i in range(n)}, d / "w.pth")

    def truncated(d: Path) -> None:
        full = d / "full.tmpsrc"
        _torch_save(fx.state, full)
        data = full.read_bytes()
        full.unlink()
        (d / "w.pth").write_bytes(data[: len(data) // 2])

    def fine_tuned(d: Path) -> None:
        _torch_save(_small_state(num_classes=10), d / "w.pth")

    e = ["export", "-o", "out", "-s", "64", "--checkpoint", "w.pth"]
    return [
        Case(c, "missing file", e, None, contains="does not exist"),
        Case(c, "garbage bytes", e, write("w.pth", lambda p: p.write_bytes(os.urandom(4096))), contains="corrupt"),
        Case(c, "raw pickle", e, write("w.pth", lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=4))),
             contains="checkpoint"),
        Case(c, "os.system payload", e, write("w.pth", lambda p: _torch_save({"x": _Payload()}, p)),
             contains="refused"),
        Case(c, "empty file", e, write("w.pth", lambda p: p.write_bytes(b"")), contains="checkpoint"),
        Case(c, "fake zip", e, write("w.pth", lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 60)),
             contains="checkpoint"),
        Case(c, "no tensors", e, write("w.pth", lambda p: _torch_save({"epoch": 3}, p)), contains="no tensors"),
        Case(c, "unknown layout", e, write("w.pth", lambda p: _torch_save({"foo.weight": __import__("torch").ones(2)},
                                                                            p)), contains="unknown layout"),
        Case(c, "base checkpoint for small", e, base_layout, contains="--variant b"),
        Case(c, "head claims 1e9 classes", e, huge_head, contains="classifier head"),
        Case(c, "NaN weight", e, nan(3, float("nan")), contains="non-finite weights"),
        Case(c, "Inf weight", e, nan(10, float("inf")), contains="non-finite weights"),
        Case(c, "truncated file", e, truncated, contains="corrupt"),
        Case(c, "checkpoint is a folder", e, lambda d: (d / "w.pth").mkdir(), contains="--checkpoint"),
        Case(c, "10-class fine-tuned head exports", e, fine_tuned, expect=0,
             creates=("out", "out/nextvit_small-onnx-fp32-64.onnx", "out/nextvit_small-onnx-fp32-64.onnx.manifest.json"),
             runner=_fine_tuned_then_verify),
    ]


def verify_cases(fx: Fixtures) -> list[Case]:
    c = "verify"
    v = ["verify", ARTIFACT]

    def edit(**changes) -> Setup:
        return lambda d: fx.artifact_copy(d, edit=changes)

    def raw(text: str) -> Setup:
        return lambda d: fx.artifact_copy(d, raw_manifest=text)

    def tampered(d: Path) -> None:
        p = fx.artifact_copy(d, copy_bytes=True)
        with open(p, "r+b") as fh:
            fh.seek(p.stat().st_size // 2)
            fh.write(b"\xff\xfe\xfd\xfc")

    def corrupt_same_hash(d: Path) -> None:
        from nextvit_deploy.artifact import sha256_path

        p = d / ARTIFACT
        p.write_bytes(b"\x08\x07 not a protobuf " * 40)
        m = json.loads((fx.base / (ARTIFACT + ".manifest.json")).read_text())
        m["sha256"] = sha256_path(p)
        (d / (ARTIFACT + ".manifest.json")).write_text(json.dumps(m))

    def no_manifest(d: Path) -> None:
        os.link(fx.base / ARTIFACT, d / ARTIFACT)

    def engine(d: Path) -> None:
        (d / "model.engine").write_bytes(b"serialized engine?")

    def precious(d: Path) -> None:
        fx.artifact_copy(d)
        (d / "precious" / "sub").mkdir(parents=True)

    def afile(d: Path) -> None:
        fx.artifact_copy(d)
        (d / "afile").write_text("x")

    sha = "0" * 64
    return [
        Case(c, "missing artifact", v, None, contains="does not exist"),
        Case(c, "no manifest", v, no_manifest, contains="has no manifest"),
        Case(c, "manifest not JSON", v, raw("{not json"), contains="not readable JSON"),
        Case(c, "manifest is a list", v, raw("[1, 2]"), contains="not a JSON object"),
        Case(c, "unknown field", v, edit(colour="red"), contains="unknown fields"),
        Case(c, "variant nextvit_huge", v, edit(variant="nextvit_huge"), contains="variant"),
        Case(c, "precision int9", v, edit(precision="int9"), contains="precision"),
        Case(c, "precision edited to int8", v, edit(precision="int8"), contains="the graph is fp32"),
        Case(c, "precision edited to fp16", v, edit(precision="fp16"), contains="the graph is fp32"),
        Case(c, "target onx", v, edit(target="onx"), contains="target"),
        Case(c, "target coreml on an .onnx", v, edit(target="coreml"), contains="re-export"),
        Case(c, "seed abc", v, edit(seed="abc"), contains="seed"),
        Case(c, "no seed no checkpoint", v, edit(seed=None, checkpoint=None), contains="seed"),
        Case(c, "empty preprocessing", v, edit(preprocessing={}), contains="preprocessing"),
        Case(c, "std zero", v, edit(preprocessing={"mean": [0, 0, 0], "std": [0, 0, 0]}), contains="std"),
        Case(c, "mean NaN", v, lambda d: fx.artifact_copy(d, raw_manifest=_with_nan_mean(fx)), contains="mean"),
        Case(c, "depths [1, 2]", v, edit(depths=[1, 2]), contains="depths"),
        Case(c, "depths [100, 1, 1, 1]", v, edit(depths=[100, 1, 1, 1]), contains="depths"),
        Case(c, "output_names probs", v, edit(output_names=["probs"]), contains="output_names"),
        Case(c, "input_shape 3 dims", v, edit(input_shape=[1, 3, 64]), contains="input_shape"),
        Case(c, "input_shape other width", v, edit(input_shape=[1, 3, 64, 96]), contains="input shape"),
        Case(c, "batch [2, 1, 1]", v, edit(batch=[2, 1, 1]), contains="batch"),
        Case(c, "num_classes 10", v, edit(num_classes=10), contains="classes"),
        Case(c, "num_classes 1e9", v, edit(num_classes=10**9), contains="num_classes"),
        Case(c, "tampered bytes", v, tampered, contains="sha256 differs"),
        Case(c, "corrupt ONNX, matching hash", v, corrupt_same_hash, contains="cannot be read as ONNX"),
        Case(c, "checkpoint in manifest gone", v, edit(seed=None, checkpoint="/nonexistent/w.pth",
                                                     checkpoint_sha256=sha), contains="is gone"),
        Case(c, "max-batch 0", [*v, "--max-batch", "0"], edit(), contains="--max-batch"),
        Case(c, "json onto a folder", [*v, "--json", "precious"], precious, contains="--json"),
        Case(c, "json under a file", [*v, "--json", "afile/x.json"], afile, contains="--json"),
        Case(c, "engine without manifest", ["verify", "model.engine"], engine, contains="manifest"),
        Case(c, "artifact is a folder", v, lambda d: (d / ARTIFACT).mkdir(), contains="manifest"),
        Case(c, "unknown option", [*v, "--bogus"], edit(), contains="--bogus"),
        Case(c, "no argument", ["verify"], None, contains="Missing argument"),
        Case(c, "valid artifact passes", [*v, "--json", "parity.json"], edit(), expect=0, creates=("parity.json",)),
    ]


def _with_nan_mean(fx: Fixtures) -> str:
    m = json.loads((fx.base / (ARTIFACT + ".manifest.json")).read_text())
    m["preprocessing"]["mean"] = [float("nan"), 0.4, 0.4]
    return json.dumps(m)


def bench_cases() -> list[Case]:
    c = "bench/doctor"
    b = ["bench", "--out", "benchout"]
    rows = [
        ("models empty", ["--models", ""], "--models"),
        ("models comma", ["--models", " , "], "--models"),
        ("backends empty", ["--backends", ""], "--backends"),
        ("backends cuda", ["--backends", "cuda"], "backend"),
        ("batch 0", ["--batch", "0"], "--batch"),
        ("batch -1", ["--batch", "-1"], "--batch"),
        ("batch 100000", ["--batch", "100000"], "--batch"),
        ("image-size 8", ["--image-size", "8"], "--image-size"),
        ("image-size abc", ["--image-size", "abc"], "--image-size"),
        ("image-size 5000", ["--image-size", "5000"], "--image-size"),
        ("precision int8", ["--precision", "int8"], "--precision"),
        ("task seg", ["--task", "seg"], "--task"),
        ("duration -1", ["--duration", "-1"], "--duration"),
        ("iters 0", ["--iters", "0", "--models", "nextvit_small", "--backends", "onnxruntime"], "--iters"),
        ("warmup -1", ["--warmup", "-1", "--models", "nextvit_small", "--backends", "onnxruntime"], "--warmup"),
        ("threads 0", ["--threads", "0", "--models", "nextvit_small", "--backends", "onnxruntime"], "--threads"),
        ("full and models", ["--full", "--models", "nextvit_small"], "--full"),
        ("unknown model", ["--models", "resnet_nope"], "unknown model"),
        ("unknown option", ["--bogus"], "--bogus"),
    ]
    out = [Case(c, name, [*b, *args], contains=frag) for name, args, frag in rows]
    out.append(Case(c, "doctor", ["doctor"], expect=0))
    out.append(Case(c, "doctor unknown option", ["doctor", "--bogus"], contains="--bogus"))
    return out


def calibration_cases() -> list[Case]:
    c = "calibration"
    e = ["export", "-o", "out", "-s", "64", "-p", "int8", "--calib-dir", "imgs"]

    def empty(d: Path) -> None:
        (d / "imgs").mkdir()

    def text_only(d: Path) -> None:
        (d / "imgs").mkdir()
        (d / "imgs" / "notes.txt").write_text("hi")

    def broken(d: Path) -> None:
        (d / "imgs").mkdir()
        (d / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")

    def bomb(d: Path) -> None:
        (d / "imgs").mkdir()
        _png_header_only(d / "imgs" / "bomb.png", 20000, 20000)

    def fifo(d: Path) -> None:
        (d / "imgs").mkdir()
        os.mkfifo(d / "imgs" / "pipe.jpg")

    def devzero(d: Path) -> None:
        (d / "imgs").mkdir()
        (d / "imgs" / "zero.jpg").symlink_to("/dev/zero")

    def loop(d: Path) -> None:
        (d / "imgs").mkdir()
        (d / "imgs" / "loop").symlink_to(d / "imgs" / "loop")

    return [
        Case(c, "folder missing", e, None, contains="does not exist"),
        Case(c, "folder empty", e, empty, contains="has no images"),
        Case(c, "only non-images", e, text_only, contains="non-image files"),
        Case(c, "one broken jpg", e, broken, contains="broken.jpg"),
        Case(c, "8 images, default count", e, lambda d: _images(d / "imgs", 8), contains="--calib-images 8"),
        Case(c, "decompression bomb only", e, bomb, contains="decompression-bomb"),
        Case(c, "FIFO named .jpg", e, fifo, contains="has no images"),
        Case(c, "/dev/zero named .jpg", e, devzero, contains="has no images"),
        Case(c, "symlink loop inside", e, loop, contains="has no images"),
        Case(c, "calib-dir is a file", e, lambda d: (d / "imgs").write_text("x"), contains="does not exist"),
    ]


# --------------------------------------------------------------------------------- special runners

def _fine_tuned_then_verify(case: Case, d: Path) -> Outcome:
    first = _run(case.args, d, case.timeout)
    if first.rc != 0:
        first.problems.append(f"export exit {first.rc}")
        return first
    m = json.loads((d / "out" / (ARTIFACT + ".manifest.json")).read_text())
    second = _run(["verify", f"out/{ARTIFACT}"], d, case.timeout)
    second.seconds += first.seconds
    if m.get("num_classes") != 10:
        second.problems.append(f"manifest num_classes {m.get('num_classes')}, not 10")
    if second.rc != 0:
        second.problems.append(f"verify exit {second.rc}")
    return second


def _default_signals() -> None:
    # A sweep started in the background of a non-interactive shell inherits SIGINT ignored, and Python
    # then never raises KeyboardInterrupt: give every case the signal handling of a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(args: list[str], cwd: Path, *, preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "NEXTVIT_DEBUG"}

    def prepare() -> None:
        _default_signals()
        if preexec_fn is not None:
            preexec_fn()

    return subprocess.Popen([*CLI, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=prepare)


def _signal_case(sig: int, *, after_s: float = 0.0, when: str = "",
                 then_clean: bool = False) -> Callable[[Case, Path], Outcome]:
    """Send ``sig`` after ``after_s`` seconds, or once a stderr progress line contains ``when``."""
    def run(case: Case, d: Path) -> Outcome:
        t0 = time.perf_counter()
        proc = _popen(case.args, d)
        seen = []
        if when:
            for line in proc.stderr:  # progress lines arrive one per step
                seen.append(line)
                if when in line:
                    time.sleep(after_s)
                    break
        else:
            time.sleep(after_s)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=case.timeout)
        err = "".join(seen) + err
        if then_clean:  # what the next export does first: take the name's lock, remove temps of dead pids
            subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from nextvit_deploy.artifact import artifact_lock, clean_stale_temps, manifest_path; "
                            "f = Path(sys.argv[1]); lock = artifact_lock(f); lock.__enter__(); "
                            "clean_stale_temps(f); clean_stale_temps(manifest_path(f)); lock.__exit__(None, None, None)",
                            str(d / "out" / "nextvit_small-onnx-fp32-224.onnx")], check=True)
        return Outcome(proc.returncode, out, err, time.perf_counter() - t0)
    return run


def _full_disk(case: Case, d: Path) -> Outcome:
    t0 = time.perf_counter()
    limit = 8 * 2**20  # files may grow to 8 MiB: the 127 MB ONNX hits EFBIG, like a full disk

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _popen(case.args, d, preexec_fn=cap)
    out, err = proc.communicate(timeout=case.timeout)
    return Outcome(proc.returncode, out, err, time.perf_counter() - t0)


def _concurrent(case: Case, d: Path) -> Outcome:
    t0 = time.perf_counter()
    first = _popen(case.args, d)
    for line in first.stderr:  # start the second export while the first holds the name's lock (it is tracing)
        if "tracing" in line:
            break
    second = _popen([*case.args, "--force", "--seed", "1"], d)
    out2, err2 = second.communicate(timeout=case.timeout)
    out1, err1 = first.communicate(timeout=case.timeout)
    o = Outcome(second.returncode, out2, err2, time.perf_counter() - t0)
    if first.returncode != 0:
        o.problems.append(f"first export exit {first.returncode}: {err1.strip().splitlines()[-1:]}")
    try:
        from nextvit_deploy.artifact import Artifact

        art = Artifact.load(d / "out" / "nextvit_small-onnx-fp32-64.onnx")
        if art.seed != 0:
            o.problems.append(f"the published pair is seed {art.seed}, not the first writer's 0")
    except Exception as exc:  # the sweep reports, it does not stop
        o.problems.append(f"published pair does not load: {exc}")
    return o


def special_cases() -> list[Case]:
    c = "signals/disk/concurrency"
    e = ["export", "-o", "out"]
    pair = ("out", "out/nextvit_small-onnx-fp32-64.onnx", "out/nextvit_small-onnx-fp32-64.onnx.manifest.json")
    return [
        Case(c, "SIGINT during imports", e, expect=130, runner=_signal_case(signal.SIGINT, after_s=0.3)),
        Case(c, "SIGINT while tracing", e, expect=130, runner=_signal_case(signal.SIGINT, when="tracing", after_s=1.0)),
        Case(c, "SIGINT while simplifying", e, expect=130, runner=_signal_case(signal.SIGINT, when="simplifying")),
        Case(c, "SIGKILL mid-export, then temps cleaned", e, expect=-9, creates=("out",),
             runner=_signal_case(signal.SIGKILL, when="tracing", after_s=2.0, then_clean=True)),
        Case(c, "full disk while writing the ONNX", [*e, "-s", "64"], creates=("out",), runner=_full_disk,
             contains="free some space"),
        Case(c, "two exports of one name at once", [*e, "-s", "64"], creates=pair, runner=_concurrent,
             contains="another export is writing"),
    ]


# ------------------------------------------------------------------------------------------ engine

def _run(args: list[str], cwd: Path, timeout: float) -> Outcome:
    t0 = time.perf_counter()
    proc = _popen(args, cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        o = Outcome(None, out, err, time.perf_counter() - t0)
        o.problems.append(f"hung (killed after {timeout:.0f} s)")
        return o
    return Outcome(proc.returncode, out, err, time.perf_counter() - t0)


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        try:
            st = p.lstat()
        except OSError:
            continue
        kind = "l" if p.is_symlink() else "d" if p.is_dir() else "f"
        out[str(p.relative_to(root))] = (kind, st.st_size if kind == "f" else 0, st.st_mtime_ns if kind == "f" else 0)
    return out


def run_case(case: Case, d: Path, outside: Path) -> Outcome:
    d.mkdir(parents=True)
    if case.setup is not None:
        case.setup(d)
    before, before_outside = _snapshot(d), _snapshot(outside)
    o = case.runner(case, d) if case.runner else _run(case.args, d, case.timeout)
    text = o.stdout + o.stderr
    # progress lines ("- building ...", printed to stderr when it is not a terminal) are not messages
    lines = [ln for ln in o.stderr.splitlines() if ln.strip() and not ln.startswith("- ")]
    if o.rc != case.expect:
        o.problems.append(f"exit {o.rc}, expected {case.expect}")
    if "Traceback" in text:
        o.problems.append("traceback")
    if "internal error" in text:
        o.problems.append("internal error")
    if o.rc in (2, 130):
        if len(lines) != 1:
            o.problems.append(f"{len(lines)} stderr lines")
        if case.contains and case.contains not in o.stderr:
            o.problems.append(f"message lacks {case.contains!r}")
    after = _snapshot(d)
    new = sorted(set(after) - set(before) - set(case.creates))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k] and before[k][0] == "f")
    if new:
        o.problems.append(f"left {', '.join(new[:3])}")
    if gone or changed:
        o.problems.append(f"touched {', '.join((gone + changed)[:3])}")
    if _snapshot(outside) != before_outside:
        o.problems.append("touched a file outside its folder")
    if (d / "pwned.txt").exists():
        o.problems.append("PICKLE PAYLOAD RAN")
    return o


def render_markdown(results: list[tuple[Case, Outcome]], wall_s: float) -> str:
    kept = sum(o.ok for _, o in results)
    lines = [
        "# Adversarial sweep (issue #14)",
        "",
        f"Every case is a subprocess of `nextvit-deploy` in a fresh folder; machine: {platform.platform()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}. Generated by "
        "`python benchmarks/adversarial_sweep.py`.",
        "",
        f"**{kept} of {len(results)} keep the promise** (documented exit code; on exit 2 or 130 exactly one "
        f"message line on stderr, progress lines starting with `- ` not counted; no traceback; nothing left "
        f"behind; nothing outside the case folder touched). Wall time {wall_s:.0f} s.",
        "",
        "Simulations: a full disk is `RLIMIT_FSIZE` = 8 MiB (writes fail with EFBIG as on a full disk); after "
        "SIGKILL the sweep runs what the next export of that name runs first (take the name's lock, "
        "`clean_stale_temps`) and then checks that nothing is left.",
        "",
        "| category | cases | kept |",
        "|---|---:|---:|",
    ]
    cats: dict[str, list[bool]] = {}
    for case, o in results:
        cats.setdefault(case.category, []).append(o.ok)
    for cat, oks in cats.items():
        lines.append(f"| {cat} | {len(oks)} | {sum(oks)} |")
    lines += ["", "| # | category | case | exit | s | result | stderr (last line) |", "|---:|---|---|---:|---:|---|---|"]
    for i, (case, o) in enumerate(results, 1):
        last = (o.stderr.strip().splitlines() or [""])[-1].replace("|", "\\|")[:160]
        verdict = "kept" if o.ok else "BROKEN: " + "; ".join(o.problems)
        lines.append(f"| {i} | {case.category} | {case.name} | {o.rc} | {o.seconds:.1f} | {verdict} | {last} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--only", help="run one category (substring match)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="nextvit-sweep-"))
    outside = root / "outside"
    outside.mkdir()
    (outside / "sentinel.txt").write_text("must not change\n")
    fx = Fixtures(root)
    cases = (export_cases() + checkpoint_cases(fx) + verify_cases(fx) + bench_cases() + calibration_cases()
             + special_cases())
    if args.only:
        cases = [c for c in cases if args.only in c.category]
    if any(c.category == "verify" for c in cases):
        print("building the small verify fixture ...", flush=True)
        fx.build()
    results = []
    try:
        for i, case in enumerate(cases, 1):
            o = run_case(case, root / "cases" / f"{i:03d}", outside)
            results.append((case, o))
            mark = "ok " if o.ok else "BAD"
            print(f"{mark} {i:3d}/{len(cases)} {case.category:24s} {case.name:38s} exit {o.rc!s:>4} "
                  f"{o.seconds:5.1f}s {'; '.join(o.problems)}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - t0
    kept = sum(o.ok for _, o in results)
    print(f"\n{kept} of {len(results)} keep the promise ({wall:.0f} s)")
    if not args.only:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "adversarial_sweep.md").write_text(render_markdown(results, wall))
        print(f"wrote {args.out / 'adversarial_sweep.md'}")
    return 0 if kept == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
