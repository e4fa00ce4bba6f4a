"""ONNX export of the deploy form: no BatchNormalization, standard ops only, dynamic batch, manifest."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from nextvit_deploy.artifact import Artifact, manifest_path
from nextvit_deploy.export import ExportRequest, export
from nextvit_deploy.export.onnx import STANDARD_DOMAINS, graph_facts, simplify_onnx, to_onnx
from nextvit_deploy.fuse import fuse_model
from nextvit_deploy.reference import build_model

from conftest import SMALL_DEPTHS, np_rel, photo_batch


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def dynamic_small(tmp_path_factory) -> Artifact:
    out = tmp_path_factory.mktemp("onnx")
    return export(ExportRequest(batch=(1, 2, 4), out_dir=out, depths=SMALL_DEPTHS, seed=5))


def test_graph_is_clean(dynamic_small):
    model = onnx.load(str(dynamic_small.path))
    facts = graph_facts(model)
    assert facts["batchnorm_nodes"] == 0
    assert facts["nonstandard_ops"] == []
    assert all(node.domain in STANDARD_DOMAINS for node in model.graph.node)
    assert {"Conv", "MatMul", "Softmax", "AveragePool"} <= set(facts["op_counts"])
    assert dynamic_small.details["simplifier"] in ("onnxsim", "onnxslim")
    assert dynamic_small.details["fused_batchnorms"] > 0


def test_dynamic_batch_runs_at_min_and_max(dynamic_small):
    model = build_model("nextvit_small", seed=5, depths=SMALL_DEPTHS)
    sess = _session(dynamic_small.path)
    assert sess.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 4):
        x = photo_batch(batch)
        with torch.no_grad():
            ref = model(x).numpy()
        (got,) = sess.run(None, {"input": x.numpy()})
        assert got.shape == (batch, 1000)
        assert np_rel(ref, got) <= 1e-5


def test_manifest_describes_the_file(dynamic_small):
    m = json.loads(manifest_path(dynamic_small.path).read_text())
    assert m["variant"] == "nextvit_small" and m["target"] == "onnx" and m["precision"] == "fp32"
    assert m["batch"] == [1, 2, 4] and m["dynamic_batch"] is True and m["input_shape"] == [2, 3, 224, 224]
    assert m["opset"] == 17 and m["seed"] == 5 and m["checkpoint"] is None
    assert m["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and m["preprocessing"]["crop_pct"] == 0.95
    assert {"torch", "onnx", "onnxruntime", "nextvit-deploy"} <= set(m["versions"])
    assert m["created_utc"].endswith("Z")
    art = Artifact.load(dynamic_small.path)
    assert art.sha256 == dynamic_small.sha256
    # no temporary files are left behind
    assert sorted(p.name for p in dynamic_small.path.parent.iterdir()) == sorted(
        [dynamic_small.path.name, manifest_path(dynamic_small.path).name])


def test_static_batch_backbone_at_non_square_size(tmp_path):
    art = export(ExportRequest(batch=(2, 2, 2), image_size=(256, 320), out_dir=tmp_path, depths=SMALL_DEPTHS,
                               features_only=True, seed=6))
    assert art.path.name == "nextvit_small-backbone-onnx-fp32-256x320.onnx"
    sess = _session(art.path)
    assert [o.name for o in sess.get_outputs()] == ["feat_s4", "feat_s8", "feat_s16", "feat_s32"]
    assert sess.get_inputs()[0].shape == [2, 3, 256, 320]
    model = build_model("nextvit_small", seed=6, depths=SMALL_DEPTHS, features_only=True)
    x = photo_batch(2, (256, 320))
    with torch.no_grad():
        refs = [t.numpy() for t in model(x)]
    for ref, got in zip(refs, sess.run(None, {"input": x.numpy()})):
        assert np_rel(ref, got) <= 1e-5
    assert graph_facts(onnx.load(str(art.path)))["batchnorm_nodes"] == 0


def test_unfused_export_would_contain_batchnorms(tmp_path, small_model):
    """The check above can fail: exporting the unfused model in training mode keeps BatchNormalization."""
    path = tmp_path / "unfused.onnx"
    model = small_model
    h, w = 224, 224
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, h, w),), str(path), dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    assert graph_facts(onnx.load(str(path)))["batchnorm_nodes"] > 0


def test_simplifier_result_is_checked_and_kept_only_if_equal(tmp_path, small_model):
    path = tmp_path / "raw.onnx"
    to_onnx(fuse_model(small_model).model, path, image_size=(64, 64), batch=1, dynamic_batch=False, opset=17,
            output_names=("logits",))
    raw = onnx.load(str(path))
    feed = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
    simplified, tool, notes = simplify_onnx(raw, check_feeds=[feed])
    assert tool in ("onnxsim", "onnxslim") and "outputs unchanged" in notes[-1]
    assert len(simplified.graph.node) <= len(raw.graph.node)
