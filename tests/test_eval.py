"""``eval``: accuracy of an artifact and its PyTorch reference on a labelled ImageFolder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from nextvit_deploy.cli import app
from nextvit_deploy.data import normalize
from nextvit_deploy.errors import BadInput
from nextvit_deploy.evaluate import evaluate_artifact, scan_labelled_folder
from nextvit_deploy.export import ExportRequest, export
from nextvit_deploy.preprocess import preprocess_pil
from nextvit_deploy.reference import reference_model

DEPTHS = (1, 1, 5, 1)
CLASSES = 4
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def onnx_fp32(tmp_path_factory):
    return export(ExportRequest(image_size=(64, 64), batch=(1, 4, 8), out_dir=tmp_path_factory.mktemp("e"),
                                depths=DEPTHS, seed=5, num_classes=CLASSES, simplify=False))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, onnx_fp32):
    """30 images filed under the class the PyTorch reference predicts (so it scores 100 %), plus a corrupt file."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (48 + i, 80 - i, 3), dtype=np.uint8)) for i in range(30)]
    pre = onnx_fp32.preprocessing
    x = np.stack([preprocess_pil(p, 64, crop_pct=pre["crop_pct"]) for p in pictures])
    with torch.no_grad():
        pred = reference_model(onnx_fp32)(torch.from_numpy(normalize(x, pre["mean"], pre["std"]))).argmax(1).numpy()
    for c in range(CLASSES):
        (root / f"class_{c}").mkdir()
    for i, (p, c) in enumerate(zip(pictures, pred)):
        p.save(root / f"class_{c}" / f"{i:02d}.png")
    (root / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_scan_orders_classes_and_spreads_the_limit(folder):
    scanned = scan_labelled_folder(folder)
    assert scanned.classes == tuple(f"class_{c}" for c in range(CLASSES))
    assert len(scanned.items) == 31
    limited = scan_labelled_folder(folder, limit=8)
    assert len(limited.items) == 8 and len({label for _, label in limited.items}) > 1


def test_fp32_onnx_matches_its_reference_and_skips_the_corrupt_file(onnx_fp32, folder):
    seen = []
    report = evaluate_artifact(onnx_fp32, folder, batch=8, progress=lambda d, t: seen.append((d, t)))
    assert report.images == 30 and report.classes == CLASSES
    assert report.reference_top1 == 100.0 and report.reference_top5 == 100.0
    assert report.candidate_top1 == 100.0 and report.top1_agreement == 100.0 and report.top1_drop == 0.0
    assert [s["file"] for s in report.skipped] == ["class_0/broken.jpg"]
    assert seen[-1] == (31, 31) and len(seen) == 4  # 30 images in batches of 8
    assert "random weights" in report.notes[0]


def test_labels_file_reorders_classes(onnx_fp32, folder, tmp_path):
    labels = tmp_path / "labels.txt"
    sizes = {d.name: len(list(d.glob("*.png"))) for d in folder.iterdir()}
    a, b = sorted(sizes, key=sizes.get)[-2:]  # the two classes the reference predicts most
    assert sizes[a] > 0
    order = [f"class_{c}" for c in range(CLASSES)]
    ia, ib = order.index(a), order.index(b)
    order[ia], order[ib] = b, a  # swap them: the reference is now wrong on both, the artifact agrees with it
    labels.write_text("\n".join(order) + "\n")
    report = evaluate_artifact(onnx_fp32, folder, labels=labels, batch=4)
    assert report.reference_top1 == pytest.approx(100.0 * (30 - sizes[a] - sizes[b]) / 30, abs=1e-3)
    assert report.top1_agreement == 100.0
    labels.write_text("class_0\nclass_1\n")
    with pytest.raises(BadInput, match="class folder 'class_2' .* is not in --labels"):
        evaluate_artifact(onnx_fp32, folder, labels=labels)


def test_cli_eval_json_and_max_drop(onnx_fp32, folder, tmp_path):
    out = tmp_path / "r.json"
    result = run("eval", str(onnx_fp32.path), "--data", str(folder), "--max-drop", "0", "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable files: class_0/broken.jpg" in result.stdout
    payload = json.loads(out.read_text())
    assert payload["candidate_top1"] == 100.0 and payload["images"] == 30
    assert not list(tmp_path.glob("*.tmp*"))
    # a --json path that is a folder is refused before any work and the folder is left alone
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "x").write_text("mine")
    result = run("eval", str(onnx_fp32.path), "--data", str(folder), "--json", str(tmp_path / "keep"))
    assert result.exit_code == 2 and (tmp_path / "keep" / "x").read_text() == "mine"


def test_cli_max_drop_exceeded_exits_1(tmp_path, onnx_fp32, folder):
    # INT8 of a random-weight model: near-tied logits, so some top-1 predictions change
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)).save(calib / f"{i}.png")
    int8 = export(ExportRequest(precision="int8", image_size=(64, 64), batch=(1, 4, 8), out_dir=tmp_path,
                                depths=DEPTHS, seed=5, num_classes=CLASSES, simplify=False, calib_dir=calib,
                                calib_images=8))
    out = tmp_path / "int8.json"
    result = run("eval", str(int8.path), "--data", str(folder), "--json", str(out))
    assert result.exit_code == 0, result.output
    drop = json.loads(out.read_text())["top1_drop"]
    assert drop > 0  # the reference scores 100 % on this folder by construction
    result = run("eval", str(int8.path), "--data", str(folder), "--max-drop", f"{drop / 2:g}")
    assert result.exit_code == 1 and "FAIL: top-1 dropped" in result.stdout
    result = run("eval", str(int8.path), "--data", str(folder), "--max-drop", f"{drop + 0.01:g}")
    assert result.exit_code == 0


@pytest.mark.parametrize("make,pattern", [
    (lambda d: None, r"has no class sub-folders"),
    (lambda d: (d / "a").mkdir(), r"has 1 class sub-folders but no"),
    (lambda d: (d / "a.png").write_bytes(b"x"), r"has no class sub-folders"),
])
def test_empty_folders_are_one_line_exit_2(tmp_path, onnx_fp32, make, pattern):
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    result = run("eval", str(onnx_fp32.path), "--data", str(data))
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and pytest.importorskip("re").search(pattern, lines[0]), result.stderr


@pytest.mark.parametrize("args,pattern", [
    (["--batch", "9"], r"--batch 9 is outside .* batch range 1..8"),
    (["--limit", "0"], r"--limit must be at least 1"),
    (["--max-drop", "-1"], r"--max-drop must be a number of points >= 0"),
])
def test_bad_options_exit_2(onnx_fp32, folder, args, pattern):
    import re

    result = run("eval", str(onnx_fp32.path), "--data", str(folder), *args)
    assert result.exit_code == 2, result.output
    assert re.search(pattern, result.stderr), result.stderr


def test_missing_data_folder(onnx_fp32, tmp_path):
    result = run("eval", str(onnx_fp32.path), "--data", str(Path(tmp_path / "nope")))
    assert result.exit_code == 2 and "is not a folder" in result.stderr
