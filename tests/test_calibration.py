"""INT8 calibration folders: real image files in every supported format; bad folders fail in one line."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image
from typer.testing import CliRunner

from nextvit_deploy.artifact import Artifact
from nextvit_deploy.data import load_image_dir
from nextvit_deploy.errors import BadInput
from nextvit_deploy.export import ExportRequest, export

from conftest import SMALL_DEPTHS

SOURCES = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    for name, suffix in zip(SOURCES, (".jpg", ".png", ".bmp", ".webp")):
        Image.fromarray(getattr(skimage.data, name)()).save(d / f"{name}{suffix}")
    return d


def test_every_format_loads_and_the_count_is_capped(photo_dir):
    images, files = load_image_dir(photo_dir, 64)
    assert images.shape == (4, 3, 64, 64) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert sorted(f.suffix for f in files) == [".bmp", ".jpg", ".png", ".webp"]
    capped, capped_files = load_image_dir(photo_dir, (48, 80), limit=3)
    assert capped.shape == (3, 3, 48, 80) and len(capped_files) == 3


def test_int8_export_calibrates_on_the_folder(photo_dir, tmp_path):
    art = export(ExportRequest(target="onnx", precision="int8", image_size=(64, 64), out_dir=tmp_path,
                               depths=SMALL_DEPTHS, calib_dir=photo_dir, calib_images=3))
    calib = Artifact.load(art.path).details["precision_transform"]["calibration"]
    assert calib["images"] == 3 and len(calib["files"]) == 3


def test_empty_folder(tmp_path):
    with pytest.raises(BadInput, match=r"calibration folder .* has no images: add at least 32"):
        load_image_dir(tmp_path, 64)


def test_folder_of_non_images(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(BadInput, match=r"has no images \(it holds 1 non-image files such as notes.txt\)"):
        load_image_dir(tmp_path, 64)


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(BadInput, match=r"calibration image .*broken\.jpg cannot be read .*remove or replace it"):
        load_image_dir(tmp_path, 64)


def test_missing_folder(tmp_path):
    with pytest.raises(BadInput, match=r"does not exist: pass a folder"):
        load_image_dir(tmp_path / "nope", 64)


def test_cli_empty_calibration_folder_leaves_nothing(tmp_path):
    from nextvit_deploy.cli import app

    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "--target", "onnx", "--precision", "int8", "--image-size", "64",
                                      "--calib-dir", str(empty), "--out", str(out)])
    assert result.exit_code == 2
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "has no images" in errors[0]
    assert not out.exists() or list(out.iterdir()) == []
