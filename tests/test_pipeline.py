"""One exporter pipeline: the checkpoint is read and hashed once per export, and every exporter publishes
through the same write step (temp file -> hash -> rename -> manifest)."""
from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch

import nextvit_model.checkpoint as checkpoint_module
from nextvit_deploy.artifact import Artifact, sha256_path
from nextvit_deploy.errors import EngineNotBuilt
from nextvit_deploy.export import ExportRequest, export
from nextvit_deploy.reference import random_model

from conftest import requires

DEPTHS = (1, 1, 5, 1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "weights.pth"
    torch.save(random_model("nextvit_small", seed=3, depths=DEPTHS).state_dict(), path)
    return path


@pytest.fixture
def counted(monkeypatch, ckpt):
    """Counts torch.load calls on checkpoints and every open() of the checkpoint file (reads and hashes)."""
    counts = {"loads": 0, "opens": 0}
    real_load, real_open = checkpoint_module._torch_load, builtins.open

    def load(path):
        counts["loads"] += 1
        return real_load(path)

    def opener(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).resolve() == ckpt.resolve():
            counts["opens"] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "_torch_load", load)
    monkeypatch.setattr(builtins, "open", opener)
    return counts


def _export(req: ExportRequest) -> Artifact:
    try:
        return export(req)
    except EngineNotBuilt as exc:  # no TensorRT here: the TensorRT-ready ONNX is the artifact
        return exc.artifact


@pytest.mark.parametrize("target", ["onnx", "trt", pytest.param("coreml", marks=requires("coremltools"))])
def test_export_reads_and_hashes_the_checkpoint_once(tmp_path, ckpt, counted, target):
    art = _export(ExportRequest(target=target, image_size=(64, 64), out_dir=tmp_path, depths=DEPTHS, checkpoint=ckpt,
                                simplify=False))
    assert counted == {"loads": 1, "opens": 2}  # one torch.load, one sha256 pass
    assert art.checkpoint_sha256 == sha256_path(ckpt)
    assert Artifact.load(art.path).checkpoint_sha256 == art.checkpoint_sha256


def test_every_exporter_publishes_through_the_shared_stage():
    """The write step lives in export/pipeline.py: no exporter renames files, hashes or writes manifests itself."""
    root = Path(__file__).resolve().parents[1] / "nextvit_deploy" / "export"
    for name in ("onnx.py", "trt.py", "coreml.py"):
        text = (root / name).read_text()
        assert "export_stage(" in text, name
        for private in ("publishing(", "sha256_path(", "save_manifest(", "check_overwrite("):
            assert private not in text, f"{name} calls {private}"
