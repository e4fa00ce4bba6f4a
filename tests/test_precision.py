"""FP16 mixed-precision graphs: FP32-kept nodes chosen from measured ranges, verified on ONNX Runtime CPU."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nextvit_deploy.artifact import Artifact
from nextvit_deploy.errors import BadInput, EngineNotBuilt
from nextvit_deploy.export import ExportRequest, export
from nextvit_deploy.export.fp16 import convert_to_mixed, to_mixed_fp16
from nextvit_deploy.export.precision import calibration_set, feed_batches, feed_count, measure_activations
from nextvit_deploy.verify import verify_artifact

SMALL = dict(variant="nextvit_small", depths=(1, 1, 5, 1), image_size=(64, 64))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _ort(model, x):
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


def _overflow_graph() -> onnx.ModelProto:
    """input -> Conv(w * 3e4) -> Relu -> Conv(w * 1e-4) -> out: the middle tensor overflows fp16."""
    rng = np.random.default_rng(0)
    w1 = (np.abs(rng.standard_normal((8, 3, 3, 3))) * 3e4).astype(np.float32)
    w2 = (rng.standard_normal((4, 8, 1, 1)) * 1e-4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w1"], ["big"], name="conv_big", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["big"], ["act"], name="relu"),
             helper.make_node("Conv", ["act", "w2"], ["out"], name="conv_small")]
    g = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_measured_overflow_keeps_nodes_in_fp32_and_all_fp16_would_fail():
    model = _overflow_graph()
    x = np.abs(np.random.default_rng(1).standard_normal((4, 3, 8, 8))).astype(np.float32)
    ranges = measure_activations(model, x)
    assert ranges["big"].absmax > 65504  # the fp32 graph really produces values fp16 cannot hold
    result = to_mixed_fp16(model, x)
    kept = {k.node: k.reason for k in result.kept_fp32}
    assert {"conv_big", "relu"} <= set(kept)
    assert "overflow" in kept["conv_big"] and "big" in kept["conv_big"]
    ref = _ort(model, x[:1])
    mixed = _ort(result.model, x[:1])
    np.testing.assert_allclose(mixed, ref, rtol=2e-2, atol=1e-3 * np.abs(ref).max())
    naive, _ = convert_to_mixed(model, set())  # everything fp16: the overflow becomes inf
    assert not np.isfinite(_ort(naive, x[:1])).all()
    # graph I/O stays float32
    assert result.model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert result.model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(i.data_type == TensorProto.FLOAT16 for i in naive.graph.initializer)
    assert result.details()["fp32_kept_count"] == len(result.kept_fp32)


def test_small_fp16_onnx_export_verifies(tmp_path):
    art = export(ExportRequest(target="onnx", precision="fp16", batch=(1, 2, 2), out_dir=tmp_path, calib_images=4,
                               **SMALL))
    art = Artifact.load(art.path)
    tr = art.details["precision_transform"]
    assert tr["convention"] == "onnxruntime" and "fp32_kept" in tr and tr["calibration"]["images"] == 4
    assert "bundled calibration photos" in tr["calibration"]["source"]
    m = onnx.load(str(art.path))
    assert sum(i.data_type == TensorProto.FLOAT16 for i in m.graph.initializer) > 10
    report = verify_artifact(art)
    assert report, report.to_dict()["worst"]
    assert report.worst()["min_cosine"] >= 0.9995


def test_calibration_folder_errors_and_cap(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    kw = dict(image_size=(64, 64), calib_images=4, crop_pct=0.95, mean=MEAN, std=STD)
    with pytest.raises(BadInput, match="has no images"):
        calibration_set(calib_dir=empty, **kw)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BadInput, match="broken.png cannot be read"):
        calibration_set(calib_dir=bad, **kw)
    good = tmp_path / "good"
    good.mkdir()
    from PIL import Image

    for i in range(6):
        Image.fromarray(np.full((40, 50, 3), i * 40, dtype=np.uint8)).save(good / f"img{i}.png")
    cs = calibration_set(calib_dir=good, **kw)
    assert cs.source.startswith("calib-dir") and feed_count(cs.feeds) == 4
    batches = feed_batches(cs.feeds, 3)
    assert not isinstance(batches, list)  # streamed: decoded batch by batch, on every pass
    assert [b.shape for b in batches] == [(3, 3, 64, 64), (1, 3, 64, 64)]
    assert [b.shape for b in feed_batches(cs.feeds, 3, static=3)] == [(3, 3, 64, 64)] * 2  # topped up
    assert cs.describe()["images"] == 4 and cs.describe()["files"] == [f"img{i}.png" for i in range(4)]
    with pytest.raises(BadInput, match="--calib-images"):
        calibration_set(calib_dir=good, **{**kw, "calib_images": 0})


@pytest.mark.slow
def test_nextvit_s_fp16_trt_ready_onnx_verifies(tmp_path):
    """Issue #3 acceptance: Next-ViT-S FP16 graph, batch 1..8, cosine >= 0.9995 on real photos (ORT CPU)."""
    req = ExportRequest(target="trt", precision="fp16", batch=(1, 8, 8), out_dir=tmp_path, calib_images=12)
    try:
        art = export(req)
    except EngineNotBuilt as exc:  # the expected outcome where TensorRT is absent
        art = exc.artifact
    art = Artifact.load(art.path)
    assert art.path.suffix == ".onnx" and art.details["trt_compat"]["passed"]
    report = verify_artifact(art, max_batch=8)
    assert report, report.to_dict()["worst"]
    assert report.worst()["min_cosine"] >= 0.9995
    for case in report.cases:
        assert case.outputs[0].top5_overlap is not None


def test_streamed_calibration_measures_what_the_loaded_folder_measures(tmp_path):
    """Calibration streams a --calib-dir folder (one batch in memory) and gets the same ranges as the whole
    folder loaded at once."""
    from PIL import Image

    from nextvit_deploy.data import calibration_photos, load_image_dir, normalize

    folder = tmp_path / "cal"
    folder.mkdir()
    for i, img in enumerate(calibration_photos(6, 48)):
        Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(folder / f"c{i}.png")
    model = _overflow_graph()
    cs = calibration_set(calib_dir=folder, image_size=(8, 8), calib_images=6, crop_pct=0.95, mean=MEAN, std=STD)
    streamed = measure_activations(model, cs.feeds, batch=4, histograms=["big"])
    loaded = measure_activations(model, normalize(load_image_dir(folder, 8, limit=6)[0], MEAN, STD), batch=4,
                                 histograms=["big"])
    assert set(streamed) == set(loaded)
    for name in loaded:
        assert streamed[name].absmax == pytest.approx(loaded[name].absmax, rel=1e-6)
    assert np.array_equal(streamed["big"].histogram, loaded["big"].histogram)
