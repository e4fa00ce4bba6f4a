"""Property-based fuzzing (Hypothesis) of the CLI's option space and of manifest fields (issue #14).

The promise checked for every example: exit code in {0, 1, 2}; on 2 at most one stderr line; no
traceback and no "internal error"; no file created, changed or removed anywhere in the workspace
(so nothing outside the output folder is touched, and a failure leaves nothing behind).

Budget: derandomized (the same examples every run), fixed ``max_examples``, no deadline. The option
strategy mostly builds invalid combinations, which fail in validation. A combination that passes
validation is *not* exported (a Next-ViT export per example would take minutes): the test replaces
the exporter with one that runs the same validation (``validate_request`` plus the Core ML checks)
and stops with exit 0 without writing, so what is fuzzed here is every check that runs before work.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from nextvit_deploy.artifact import Artifact, manifest_path
from nextvit_deploy.cli import app
from nextvit_deploy.errors import ArtifactError
from nextvit_deploy.export import ExportRequest, export, validate_request

from conftest import SMALL_DEPTHS

FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "empty").mkdir()
    (root / "two").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 30), (i * 90, 20, 20)).save(root / "two" / f"{i}.png")
    (root / "precious" / "sub").mkdir(parents=True)
    (root / "precious" / "results.csv").write_text("keep me\n")
    (root / "labels.txt").write_text("\n".join(f"c{i}" for i in range(1000)) + "\n")
    (root / "garbage.pth").write_bytes(b"PK\x03\x04 not really a zip")
    (root / "afile").write_text("a file, not a folder")
    return root


def _tree(root: Path) -> dict[str, tuple[str, int, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st_ = p.lstat()
        out[str(p.relative_to(root))] = ("d" if p.is_dir() else "f", st_.st_size, st_.st_mtime_ns)
    return out


def _no_write_export(req: ExportRequest, *, progress=None):
    """Stand-in for ``export`` (see the module docstring): validate exactly as export does, write nothing."""
    import typer

    from nextvit_deploy.export.coreml import _validate as coreml_checks

    req = validate_request(req)
    if req.target == "coreml":
        coreml_checks(req)
    raise typer.Exit(0)


def _options(ws: Path):
    values = {
        "--target": ["onnx", "trt", "coreml", "onx", "", "TRT"],
        "--precision": ["fp32", "fp16", "int8", "int4", ""],
        "--variant": ["s", "nextvit_small", "b", "nextvit_tiny", ""],
        "--image-size": ["224", "64", "16", "8", "0", "-5", "10000x10000", "64x96", "abc", "3x", "2049", "64x64x3"],
        "--batch": ["1", "8", "1:8", "8:2", "0", "100000", "1:2:3:4", "a", "-1", "1:300"],
        "--opset": ["-1", "0", "7", "12", "13", "17", "20", "21", "99", "x"],
        "--workspace-gb": ["-1", "0", "nan", "inf", "4", "2000", "x"],
        "--opt-level": ["-1", "0", "3", "5", "6", "9"],
        "--calib-images": ["0", "-3", "1", "2", "64", "10000"],
        "--calib-dir": [str(ws / "nope"), str(ws / "empty"), str(ws / "afile"), str(ws / "two")],
        "--input-kind": ["tensor", "image", "jpeg"],
        "--labels": [str(ws / "nolabels.txt"), str(ws / "labels.txt")],
        "--min-target": ["iOS16", "iOS13", "xyz"],
        "--checkpoint": [str(ws / "none.pth"), str(ws / "garbage.pth")],
        "--seed": ["0", "3", "abc", "-1"],
        "--json": [str(ws / "precious"), str(ws / "out" / "a.json"), str(ws / "afile" / "x.json")],
        "--out": [str(ws / "out"), str(ws / "afile"), str(ws / "afile" / "sub"), str(ws / "out" / "deep")],
        "--timing-cache": [str(ws / "t.cache")],
        "--palettize-bits": ["4", "6", "5", "0", "x"],
    }
    pair = st.sampled_from(sorted(values)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(values[k])))
    switch = st.sampled_from(["--backbone", "--force", "--no-simplify", "--simplify", "--bogus"])
    return st.tuples(st.lists(pair, min_size=1, max_size=6, unique_by=lambda kv: kv[0]),
                     st.lists(switch, max_size=2, unique=True))


def _check_promise(result, before, after) -> None:
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    if result.exit_code == 2:
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) <= 1, result.stderr
    assert after == before, "the workspace changed"


def test_fuzz_export_options(workspace):
    runner = CliRunner()
    seen = {0: 0, 2: 0}

    @settings(FUZZ, max_examples=160)
    @given(_options(workspace))
    def check(opts):
        pairs, switches = opts
        args = ["export"] + [x for kv in pairs for x in kv] + switches
        if not any(k == "--out" for k, _ in pairs):
            args += ["--out", str(workspace / "out")]
        before = _tree(workspace)
        with mock.patch("nextvit_deploy.export.export", _no_write_export):
            result = runner.invoke(app, args)
        _check_promise(result, before, _tree(workspace))
        seen[result.exit_code] = seen.get(result.exit_code, 0) + 1

    check()
    assert seen[2] > 50 and seen[0] > 0, seen  # the strategy reaches both the errors and valid requests


def test_fuzz_bench_and_verify_options(workspace):
    runner = CliRunner()
    bench = {"--batch": ["0", "-1", "x", "100000"], "--models": ["", " , ", "resnet_nope", "nextvit_tiny"],
             "--backends": ["", "cuda", "onnxruntime,nope"], "--precision": ["int8", "fp64"],
             "--image-size": ["8", "abc", "0", "5000"], "--warmup": ["-1"], "--iters": ["0", "-2"],
             "--duration": ["-1", "x"], "--threads": ["0", "-4"], "--task": ["seg", ""]}
    pair = st.sampled_from(sorted(bench)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(bench[k])))

    @settings(FUZZ, max_examples=60)
    @given(st.lists(pair, min_size=1, max_size=3, unique_by=lambda kv: kv[0]),
           st.sampled_from(["bench", "verify"]))
    def check(pairs, command):
        if command == "verify":
            args = ["verify", str(workspace / pairs[0][1] if pairs[0][1] else workspace / "x.onnx"),
                    "--max-batch", pairs[-1][1] if pairs[-1][0] == "--batch" else "0"]
        else:
            args = ["bench", "--out", str(workspace / "bench")] + [x for kv in pairs for x in kv]
        before = _tree(workspace)
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)  # every combination here is a user error
        _check_promise(result, before, _tree(workspace))

    check()


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory) -> Artifact:
    return export(ExportRequest(image_size=(64, 64), out_dir=tmp_path_factory.mktemp("fz"), depths=SMALL_DEPTHS,
                                seed=11))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


def test_fuzz_manifest_fields(small_artifact, tmp_path_factory):
    runner = CliRunner()
    work = tmp_path_factory.mktemp("mf")
    art = work / small_artifact.path.name
    art.write_bytes(small_artifact.path.read_bytes())
    original = json.loads(small_artifact.manifest.read_text())
    keys = sorted(original) + ["unknown_field"]
    pre_keys = sorted(original["preprocessing"])
    counts = {"loaded": 0, "refused": 0}

    @settings(FUZZ, max_examples=250)
    @given(st.sampled_from(keys), JSON_VALUES, st.sampled_from(pre_keys), st.booleans())
    def check(key, value, pre_key, nested):
        m = json.loads(json.dumps(original))
        if nested:
            m["preprocessing"][pre_key] = value
        else:
            m[key] = value
        manifest_path(art).write_text(json.dumps(m))
        try:
            Artifact.load(art)
        except ArtifactError:
            counts["refused"] += 1
            result = runner.invoke(app, ["verify", str(art)])
            assert result.exit_code == 2 and "Traceback" not in result.output, result.output
            assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1, result.stderr
        else:
            counts["loaded"] += 1

    check()
    assert counts["refused"] > 100 and counts["loaded"] > 0, counts


@pytest.mark.parametrize("args", [
    ["export", "--batch", "100000"],
    ["export", "--target", "onnx", "--labels", "x.txt"],
    ["bench", "--models", ""],
])
def test_real_entry_point_keeps_the_promise(tmp_path, args):
    exe = Path(sys.executable).with_name("nextvit-deploy")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from nextvit_deploy.cli import main; main()"]
    proc = subprocess.run([*cmd, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []
