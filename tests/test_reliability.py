"""Issue #14: nothing lost, nothing half-written, every bad input one line. One test (or more) per
numbered case of the issue; the case number is in each test's name."""
from __future__ import annotations

import errno
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from nextvit_deploy.artifact import (
    Artifact,
    ArtifactBusy,
    artifact_lock,
    atomic_path,
    atomic_write_text,
    clean_stale_temps,
    manifest_path,
    publishing,
    sha256_path,
)
from nextvit_deploy.cli import app
from nextvit_deploy.data import iter_image_dir, load_image_dir, scan_image_dir
from nextvit_deploy.errors import ArtifactError, BadInput, CheckpointMismatch
from nextvit_deploy.export import ExportRequest, check_overwrite, export, validate_request

from conftest import SMALL_DEPTHS

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def one_line_error(result, pattern: str) -> str:
    """Exit 2, no traceback, exactly one non-empty stderr line, matching ``pattern``."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory) -> Artifact:
    out = tmp_path_factory.mktemp("art")
    return export(ExportRequest(image_size=(64, 64), batch=(1, 2, 2), out_dir=out, depths=SMALL_DEPTHS, seed=7))


# 1. --json onto a folder, and the atomic-write helper ---------------------------------------------

def test_1_json_onto_a_folder_is_refused_and_the_folder_survives(tmp_path):
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "results.csv").write_text("x\n")
    before = tree(tmp_path)
    one_line_error(run("export", "-s", "64", "-o", str(tmp_path / "out"), "--json", str(precious)),
                   r"^error: --json .*precious is a folder; refusing to replace it with a file")
    assert tree(tmp_path) == before


def test_1_atomic_path_never_swaps_file_and_folder(tmp_path):
    folder = tmp_path / "d"
    (folder / "keep").mkdir(parents=True)
    with pytest.raises(BadInput, match="is a folder; refusing to replace it with a file"):
        atomic_write_text(folder, "x")
    assert (folder / "keep").is_dir()
    afile = tmp_path / "f.mlpackage"
    afile.write_text("mine")
    with pytest.raises(BadInput, match="is a file; refusing to replace it with a folder"):
        with atomic_path(afile, kind="dir") as tmp:
            tmp.mkdir()
    assert afile.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.mlpackage"]


def test_1_verify_json_onto_a_folder(small_onnx, tmp_path):
    (tmp_path / "keep").mkdir()
    one_line_error(run("verify", str(small_onnx.path), "--json", str(tmp_path)), r"is a folder; refusing")
    assert (tmp_path / "keep").is_dir()


# 2. input contract and options that do not apply to the target -----------------------------------

@pytest.mark.parametrize("args,pattern", [
    (["--input-kind", "image"], r"--input-kind image applies only to --target coreml"),
    (["--labels", "labels.txt"], r"--labels applies only to --target coreml, not onnx: drop --labels"),
    (["--min-target", "iOS17"], r"--min-target applies only to --target coreml, not onnx: drop --min-target"),
    (["--workspace-gb", "2"], r"--workspace-gb applies only to --target trt, not onnx"),
    (["--opt-level", "2"], r"--opt-level applies only to --target trt, not onnx"),
    (["--timing-cache", "t.cache"], r"--timing-cache applies only to --target trt, not onnx"),
    (["--calib-dir", "imgs"], r"--calib-dir applies only to --precision fp16/int8 .* not fp32 onnx"),
    (["--calib-images", "8"], r"--calib-images applies only to --precision fp16/int8"),
    (["--target", "coreml", "--opset", "17"], r"--opset applies only to --target onnx/trt, not coreml"),
    (["--target", "coreml", "--precision", "fp32", "--calib-images", "8"], r"or --precision fp16 with --target coreml, "
                                                                          r"not fp32 coreml: drop --calib-images"),
    (["--target", "trt", "--input-kind", "image"], r"--input-kind image applies only to --target coreml; trt"),
])
def test_2_options_that_do_not_apply_are_errors(tmp_path, args, pattern):
    out = tmp_path / "out"
    one_line_error(run("export", "-o", str(out), *args), pattern)
    assert not out.exists()


def test_2_the_same_options_at_their_defaults_are_not_errors(tmp_path):
    """Only options the user typed count: validation of the default onnx request passes."""
    validate_request(ExportRequest(out_dir=tmp_path / "o", image_size=(64, 64)))


# 3. fine-tuned checkpoints: the class count comes from the head ---------------------------------

def test_3_ten_class_checkpoint_exports_with_ten_classes_and_verifies(tmp_path):
    from nextvit_deploy.reference import random_model
    from nextvit_deploy.verify import verify

    ckpt = tmp_path / "ft.pth"
    torch.save(random_model("nextvit_small", seed=2, depths=SMALL_DEPTHS, num_classes=10).state_dict(), ckpt)
    art = export(ExportRequest(image_size=(64, 64), out_dir=tmp_path / "o", depths=SMALL_DEPTHS, checkpoint=ckpt))
    assert art.num_classes == 10 and Artifact.load(art.path).num_classes == 10
    assert verify(art.path)


# 4. atomic publishing, overwrite refusal, lock, stale temps --------------------------------------

def _fake_artifact(out: Path, name: str, *, seed=0, sha=None) -> Path:
    p = out / name
    p.write_bytes(b"old bytes")
    manifest_path(p).write_text(json.dumps({"seed": seed, "checkpoint_sha256": sha, "depths": None}))
    return p


def test_4_full_disk_at_the_manifest_step_leaves_the_previous_pair(tmp_path, monkeypatch, small_onnx):
    final = tmp_path / "m.onnx"
    final.write_bytes(b"previous")
    manifest_path(final).write_text("{\"previous\": true}")
    real = Path.write_text

    def full_disk(self, *a, **k):
        if self.name.startswith(".m.onnx.manifest.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(BadInput, match="No space left on device.*free some space"):
        with publishing(final) as stage:
            stage.path.write_bytes(b"new")
            stage.publish(small_onnx)
    assert final.read_bytes() == b"previous" and json.loads(manifest_path(final).read_text()) == {"previous": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.manifest.json"]


def test_4_publish_writes_the_manifest_last_and_both_together(tmp_path, small_onnx):
    final = tmp_path / "x.onnx"
    with publishing(final) as stage:
        stage.path.write_bytes(small_onnx.path.read_bytes())
        published = stage.publish(small_onnx.replace(sha256=sha256_path(stage.path)))
    assert published.path == final and Artifact.load(final).sha256 == sha256_path(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx", "x.onnx.manifest.json"]


def test_4_a_failed_export_removes_the_folders_it_made_and_nothing_else(tmp_path):
    (tmp_path / "keep").mkdir()
    with pytest.raises(RuntimeError, match="exporter failed"):
        with publishing(tmp_path / "keep" / "a" / "b" / "m.onnx") as stage:
            stage.path.write_bytes(b"half")
            raise RuntimeError("exporter failed")
    assert [p.name for p in tmp_path.rglob("*")] == ["keep"]


def test_4_a_package_folder_replaces_the_previous_package(tmp_path):
    final = tmp_path / "m.mlpackage"
    (final / "Data").mkdir(parents=True)
    (final / "Data" / "old.bin").write_bytes(b"old")
    with publishing(final, kind="dir") as stage:
        (stage.path / "Data").mkdir(parents=True)
        (stage.path / "Data" / "new.bin").write_bytes(b"new")
        stage.publish(Artifact(path=final, target="coreml", precision="fp32", variant="nextvit_small",
                               input_shape=(1, 3, 64, 64), batch=(1, 1, 1), dynamic_batch=False,
                               features_only=False, input_name="input", output_names=("logits",),
                               preprocessing={"mean": [0.5] * 3, "std": [0.2] * 3}, sha256=sha256_path(stage.path),
                               seed=0))
    assert [p.name for p in (final / "Data").iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage", "m.mlpackage.manifest.json"]
    assert Artifact.load(final).sha256 == sha256_path(final)


def test_4_another_seed_does_not_overwrite_without_force(tmp_path):
    name = "nextvit_small-onnx-fp32-224.onnx"
    _fake_artifact(tmp_path, name, seed=0)
    req = ExportRequest(out_dir=tmp_path, seed=3)
    with pytest.raises(BadInput, match=r"holds an export of random weights seed 0, not random weights seed 3: "
                                       r"pass --force to replace it"):
        check_overwrite(req)
    check_overwrite(ExportRequest(out_dir=tmp_path, seed=0))  # same weights: a re-export replaces it
    check_overwrite(ExportRequest(out_dir=tmp_path, seed=3, force=True))


def test_4_a_file_without_manifest_is_never_replaced_silently(tmp_path):
    (tmp_path / "nextvit_small-onnx-fp32-224.onnx").write_bytes(b"someone else's file")
    one_line_error(run("export", "-o", str(tmp_path)), r"exists but has no readable manifest .* pass --force")
    assert (tmp_path / "nextvit_small-onnx-fp32-224.onnx").read_bytes() == b"someone else's file"


def test_4_second_export_of_the_same_name_fails_clearly_while_the_first_holds_the_lock(tmp_path):
    final = tmp_path / "a.onnx"
    with artifact_lock(final):
        with pytest.raises(ArtifactBusy, match=rf"another export is writing .*a.onnx right now \(pid {os.getpid()}\)"):
            with artifact_lock(final):
                pass
    with artifact_lock(final):  # released: the next one gets it
        pass
    assert list(tmp_path.iterdir()) == []  # the lock file goes with its holder


def test_4_temps_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    final = tmp_path / "model.onnx"
    dead = tmp_path / f".model.onnx.{dead_pid()}-0123abcd.tmp"
    alive = tmp_path / f".model.onnx.{os.getppid()}-0123abcd.tmp"
    other = tmp_path / f".other.onnx.{dead_pid()}-0123abcd.tmp"
    for p in (dead, alive, other):
        p.write_bytes(b"partial")
    assert clean_stale_temps(final) == [dead]
    assert not dead.exists() and alive.exists() and other.exists()


# 5. sizes checked before allocating ----------------------------------------------------------------

@pytest.mark.parametrize("args,pattern", [
    (["--batch", "100000"], r"^error: --batch 100000 is above the limit of 256: use a smaller --batch$"),
    (["--image-size", "10000x10000"], r"--image-size 10000x10000 is above the limit of 2048 pixels a side"),
    (["--precision", "int8", "--calib-images", "10000"], r"--calib-images must be at most 2048, got 10000"),
])
def test_5_sizes_are_capped(tmp_path, args, pattern):
    one_line_error(run("export", "-o", str(tmp_path / "o"), *args), pattern)


def test_5_checkpoint_head_claiming_a_billion_classes(tmp_path):
    from nextvit_deploy.reference import random_model

    state = random_model("nextvit_small", seed=0, depths=SMALL_DEPTHS).state_dict()
    state["head.fc.weight"] = torch.zeros(1, state["head.fc.weight"].shape[1]).expand(10**9, -1)
    state["head.fc.bias"] = torch.zeros(1).expand(10**9)
    ckpt = tmp_path / "huge.pth"
    torch.save(state, ckpt)
    assert ckpt.stat().st_size < 200 * 2**20  # the head is a stride-0 view: tiny on disk
    one_line_error(run("export", "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt)),
                   r"classifier head of shape \(1000000000, \d+\); expected .* 1 to 100000 classes")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (no pixel data): what a decompression bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_5_decompression_bomb_and_strip_are_skipped_with_reasons(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    Image.new("L", (60000, 1)).save(tmp_path / "strip.png")
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "ok.png")
    stream = iter_image_dir(tmp_path, 32)
    images = list(stream)
    assert [p.name for _, p in images] == ["ok.png"]
    reasons = {s.path.name: s.reason for s in stream.skipped}
    assert "decompression-bomb guard" in reasons["bomb.png"] and "aspect ratio beyond 64:1" in reasons["strip.png"]
    assert "2 skipped (bomb.png:" in stream.summary()


def test_5_calibration_streams_in_batches_and_repeats_passes(tmp_path):
    for i in range(5):
        Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    stream = iter_image_dir(tmp_path, 32, limit=4)
    shapes = [b.shape for b in stream.batches(3)]
    assert shapes == [(3, 3, 32, 32), (1, 3, 32, 32)]
    assert [p.name for p in stream.used] == ["0.png", "1.png", "2.png", "3.png"]
    assert sum(b.shape[0] for b in stream.batches(3)) == 4 and len(stream.used) == 4  # a second pass
    assert [s.path.name for s in stream.skipped] == []  # bad.jpg sorts after the 4 images used


# 6. bad values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,pattern", [
    (["--target", "trt", "--workspace-gb", "-1"], r"--workspace-gb must be above 0 and at most 1024, got -1"),
    (["--target", "trt", "--workspace-gb", "nan"], r"--workspace-gb must be above 0"),
    (["--target", "trt", "--opt-level", "9"], r"--opt-level must be 0 to 5, got 9"),
    (["--opset", "99"], r"--opset 99 is not supported by the installed torch exporter: use 13 to \d+"),
    (["--opset", "7"], r"--opset 7 is not supported"),
    (["--target", "trt", "--timing-cache", "."], r"--timing-cache \. is a folder: pass a file path"),
])
def test_6_bad_values_fail_before_any_work(tmp_path, args, pattern):
    out = tmp_path / "o"
    one_line_error(run("export", "-o", str(out), *args), pattern)
    assert not out.exists()


# 7. every --flag an error message names exists in that command's --help --------------------------

# The static scan of every message in the sources (each flag an option of a command that prints it) is
# tests/test_flags.py; here: the errors as the commands print them.


def _help_flags(*command: str) -> set[str]:
    # wide enough that rich's option column never truncates a long flag ("--quantize-atte...")
    text = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "240"}).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", text))


def test_7_flags_in_runtime_errors_exist_in_that_commands_help(tmp_path):
    cases = {"export": [["--target", "onnx", "--labels", "x"], ["--batch", "0"], ["--opset", "3"],
                        ["--target", "trt", "--opt-level", "7"], ["--image-size", "16"], ["--variant", "smol"],
                        ["--target", "onnx", "--timing-cache", "t.cache"]],
             "bench": [["--models", ""], ["--image-size", "8"], ["--full", "--models", "x"]],
             "verify": [[str(tmp_path / "none.onnx"), "--max-batch", "0"]]}
    for command, argsets in cases.items():
        flags = _help_flags(command)
        for args in argsets:
            line = one_line_error(run(command, "-o" if command != "verify" else "--json",
                                      str(tmp_path / "o" / "r.json"), *args), r"^error:")
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", line):
                assert flag in flags, (command, args, flag, line)


# 8. malformed manifests ---------------------------------------------------------------------------

@pytest.mark.parametrize("edit,pattern", [
    ({"variant": "nextvit_huge"}, r"variant 'nextvit_huge' is not one of"),
    ({"precision": "int9"}, r"precision 'int9' is not one of fp32, fp16, int8"),
    ({"target": "onx"}, r"target 'onx' is not one of onnx, trt, coreml"),
    ({"seed": "abc"}, r"seed 'abc' is not an integer"),
    ({"preprocessing": {}}, r"preprocessing.mean None is not 3 numbers"),
    ({"depths": [1, 2]}, r"depths \[1, 2\] is not 4 block counts"),
    ({"output_names": ["probs"]}, r"output_names \['probs'\] should be \['logits'\]"),
    ({"input_shape": [1, 3, 64]}, r"input_shape \[1, 3, 64\] is not \[batch, 3, height, width\]"),
    ({"num_classes": 10}, r"the graph has 1000 classes, manifest says num_classes 10"),
    ({"precision": "int8"}, r"the graph is fp32, manifest says precision int8"),
    ({"input_shape": [2, 3, 64, 96]}, r"input shape is \[.batch., 3, 64, 64\], manifest says \[2, 3, 64, 96\]"),
    ({"batch": [1, 2, 2], "dynamic_batch": False}, r"dynamic_batch False contradicts batch"),
])
def test_8_malformed_manifest_is_one_line(small_onnx, tmp_path, edit, pattern):
    art = tmp_path / small_onnx.path.name
    art.write_bytes(small_onnx.path.read_bytes())
    m = json.loads(small_onnx.manifest.read_text())
    m.update(edit)
    manifest_path(art).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=pattern):
        Artifact.load(art)
    one_line_error(run("verify", str(art)), pattern)


def test_8_corrupt_onnx_whose_hash_matches(small_onnx, tmp_path):
    art = tmp_path / small_onnx.path.name
    art.write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
    m = json.loads(small_onnx.manifest.read_text())
    m["sha256"] = sha256_path(art)
    manifest_path(art).write_text(json.dumps(m))
    one_line_error(run("verify", str(art)), r"cannot be read as ONNX .* although its manifest's sha256 matches")


# 9. NaN / Inf weights -------------------------------------------------------------------------------

def test_9_nan_weights_are_refused_naming_the_tensor(tmp_path):
    from nextvit_deploy.reference import random_model

    state = random_model("nextvit_small", seed=0, depths=SMALL_DEPTHS).state_dict()
    key = "stages.1.blocks.0.mlp.fc1.weight" if "stages.1.blocks.0.mlp.fc1.weight" in state else next(
        k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    state[key].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    ckpt = tmp_path / "nan.pth"
    torch.save(state, ckpt)
    with pytest.raises(CheckpointMismatch, match=rf"non-finite weights in {re.escape(key)} \(1 NaN, 2 Inf values\)"):
        export(ExportRequest(image_size=(64, 64), out_dir=tmp_path / "o", depths=SMALL_DEPTHS, checkpoint=ckpt))
    assert not (tmp_path / "o").exists()
    # refused while validating, before any progress line: the CLI prints exactly one line
    one_line_error(run("export", "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt)), r"non-finite weights in")


# 10. Ctrl-C during imports, bench options, early calibration checks, usage errors ---------------

def test_10_ctrl_c_during_imports_is_one_line_and_130(tmp_path):
    (tmp_path / "typer").mkdir()
    (tmp_path / "typer" / "__init__.py").write_text("raise KeyboardInterrupt\n")  # Ctrl-C while typer loads
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", "from nextvit_deploy.cli import main; main()", "export"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130
    assert proc.stderr.strip().splitlines() == ["interrupted; no artifact was written"]


def test_10_ctrl_c_inside_a_native_import_is_deferred_until_it_finishes(tmp_path):
    """Ctrl-C while torch._C initialises crashed CPython (SystemError, SIGSEGV); now the import finishes first.

    The stand-in ``onnx`` module presses Ctrl-C on itself, then records that its import ran to the end.
    """
    (tmp_path / "onnx").mkdir()
    done = tmp_path / "import-finished"
    (tmp_path / "onnx" / "__init__.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n"
        f"open({str(done)!r}, 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    import signal

    # a test run started in the background of a shell inherits SIGINT ignored: give the child a terminal's
    proc = subprocess.run([sys.executable, "-c", "from nextvit_deploy.cli import main; main()", "export"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["interrupted; no artifact was written"]
    assert done.exists()


@pytest.mark.parametrize("args,pattern", [
    (["--models", ""], r"--models is empty: name at least one"),
    (["--backends", " , "], r"--backends is empty"),
    (["--image-size", "8"], r"image size 8x8 is too small"),
    (["--batch", "0"], r"--batch must be at least 1, got 0: use 8, 1:8"),  # the shared --batch parser
    (["--task", "seg"], r"unknown --task 'seg'"),
    (["--duration", "-1"], r"--duration must be 0 or more"),
    (["--iters", "0", "--models", "nextvit_small", "--backends", "onnxruntime"], r"--iters must be at least 1"),
    (["--backends", "cuda"], r"unknown backend 'cuda'"),
])
def test_10_bench_bad_options_leave_no_folder(tmp_path, args, pattern):
    out = tmp_path / "bench"
    one_line_error(run("bench", "--out", str(out), *args), pattern)
    assert not out.exists()


def test_10_calibration_folder_checked_before_the_fp32_export(tmp_path, monkeypatch):
    import nextvit_deploy.export as ex

    def must_not_run(*a, **k):
        raise AssertionError("the model was built before the calibration folder was checked")

    monkeypatch.setattr(ex, "build_deploy_model", must_not_run)
    (tmp_path / "imgs").mkdir()
    for i in range(8):
        Image.new("RGB", (40, 40), (i * 30, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    one_line_error(run("export", "-p", "int8", "--calib-dir", str(tmp_path / "imgs"), "-o", str(tmp_path / "o")),
                   r"has 8 usable images: add at least 32, or pass --calib-images 8 to calibrate on fewer")
    one_line_error(run("export", "-p", "int8", "--calib-dir", str(tmp_path / "nope"), "-o", str(tmp_path / "o")),
                   r"calibration folder .*nope does not exist")


@pytest.mark.parametrize("args,pattern", [
    (["export", "--bogus"], r"^error: No such option: --bogus .*\(see nextvit-deploy export --help\)$"),
    (["export", "--target", "onx"], r"^error: Invalid value for '--target'.*'onx' is not one of"),
    (["expor"], r"^error: No such command 'expor'. Did you mean 'export'\?"),
    (["verify"], r"^error: Missing argument 'ARTIFACT'|^error: Missing argument 'artifact'"),
    (["export", "--batch"], r"^error: Option '--batch' requires an argument"),
    (["bench", "--batch", "x"], r"^error: --batch 'x' is not a number or a range: use 8"),  # shared with export
])
def test_10_usage_errors_are_one_line(args, pattern):
    one_line_error(run(*args), pattern)


def test_10_usage_error_through_the_real_entry_point():
    exe = Path(sys.executable).with_name("nextvit-deploy")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from nextvit_deploy.cli import main; main()"]
    proc = subprocess.run([*cmd, "export", "--target", "onx"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# 11. calibration image quality, pickles, .DS_Store, symlink loops ---------------------------------

def test_11_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # mode I;16
    images, _ = load_image_dir(tmp_path, 32, crop_pct=1.0)
    assert 0.4 < float(images.mean()) < 0.6  # clipping to 255 would make it ~99 % white
    assert float((images >= 0.999).mean()) < 0.1


def test_11_palette_cmyk_alpha_grey_and_gif_are_used(tmp_path):
    rgb = Image.new("RGB", (40, 30), (200, 40, 10))
    rgb.convert("P").save(tmp_path / "a_palette.png")
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "b_palette_alpha.png", transparency=0)
    rgb.convert("CMYK").save(tmp_path / "c_cmyk.jpg")
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(tmp_path / "d_transparent.png")
    Image.new("LA", (40, 30), (100, 255)).save(tmp_path / "e_grey_alpha.png")
    Image.new("1", (40, 30), 1).save(tmp_path / "f_bilevel.png")
    rgb.save(tmp_path / "g_anim.gif", save_all=True, append_images=[Image.new("RGB", (40, 30))])
    stream = iter_image_dir(tmp_path, 32)
    images = {p.name: img for img, p in stream}
    assert stream.skipped == [] and len(images) == 7
    assert np.allclose(images["d_transparent.png"], 1.0)  # fully transparent -> the white background
    assert abs(float(images["g_anim.gif"][0].mean()) - 200 / 255) < 0.05  # the first frame


def test_11_fewer_than_32_images_only_when_asked_for(tmp_path):
    for i in range(8):
        Image.new("RGB", (40, 40), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(BadInput, match=r"has 8 usable images: add at least 32, or pass --calib-images 8"):
        scan_image_dir(tmp_path, limit=64)
    usable, skipped = scan_image_dir(tmp_path, limit=8)
    assert len(usable) == 8 and skipped == []


def test_11_raw_pickle_checkpoint_is_one_line_without_torch_warning(tmp_path):
    import pickle

    ckpt = tmp_path / "raw.pkl"
    ckpt.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    one_line_error(run("export", "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt)), r"checkpoint .*raw.pkl")


def test_11_ds_store_in_a_package_does_not_make_it_stale(tmp_path):
    pkg = tmp_path / "m.mlpackage"
    (pkg / "Data").mkdir(parents=True)
    (pkg / "Data" / "weights.bin").write_bytes(b"w" * 100)
    (pkg / "Manifest.json").write_text("{}")
    before = sha256_path(pkg)
    (pkg / ".DS_Store").write_bytes(b"finder")
    (pkg / "Data" / "._weights.bin").write_bytes(b"fork")
    assert sha256_path(pkg) == before
    (pkg / "Data" / "weights.bin").write_bytes(b"x" * 100)
    assert sha256_path(pkg) != before  # real content still counts


def test_11_symlink_loop_out(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    one_line_error(run("export", "-o", str(loop / "sub")), r"output directory .*cannot be created .*symlink")
    one_line_error(run("export", "-o", str(loop)), r"output directory .*loop.* broken or looping symlink")
