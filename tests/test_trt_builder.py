"""The TensorRT builder and runner logic, driven against a recording TEST DOUBLE of the ``tensorrt`` module
(``tests/trt_double.py``), one per major version's API surface (10.x and 11.x).

The double builds and computes nothing; these tests assert *which calls our code makes*: network
typing, builder flags set and cleared, optimization-profile shapes, timing-cache handling, device
selection, and the refusals. Real engines are built and verified only where TensorRT is installed
(``tests/test_trt.py::test_build_engine_and_run``, skipped here with the reason).
"""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nextvit_deploy.backends import tensorrt as trt_backend
from nextvit_deploy.backends.tensorrt import EngineBuildError, EngineMismatch, TrtRunner, read_sidecar, sidecar_path
from nextvit_deploy.backends.trt_build import BuildOptions, build_engine, graph_precision, trtexec_command
from nextvit_deploy.errors import ArtifactError, BadInput
from nextvit_deploy.export.fp16 import convert_to_mixed
from nextvit_deploy.export.int8 import Int8Options, quantize_trt

from trt_double import RecordingCuda, make_tensorrt

VERSIONS = ["10.13.3.9", "11.1.0.8"]
H100, L4 = ("NVIDIA H100 80GB HBM3", "9.0"), ("NVIDIA L4", "8.9")


def _conv_graph(opset: int = 19) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["logits"], name="flat")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 8])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """fp32, fp16 (mixed) and int8 (Q/DQ, fp16 regions) versions of one small graph, on disk."""
    d = tmp_path_factory.mktemp("trt_graphs")
    fp32 = _conv_graph()
    fp16, _ = convert_to_mixed(fp32, set())
    calib = np.random.default_rng(1).random((4, 3, 16, 16), dtype=np.float32)
    int8 = quantize_trt(fp32, calib, options=Int8Options(method="max")).model
    paths = {}
    for name, m in (("fp32", fp32), ("fp16", fp16), ("int8", int8)):
        paths[name] = d / f"g-{name}.onnx"
        onnx.save(m, str(paths[name]))
    return paths


@pytest.fixture()
def double(monkeypatch):
    """Install the recording double of ``tensorrt`` ``version`` and of the CUDA seam; returns a factory."""

    def install(version: str, gpus=(H100,), **kw):
        cuda = RecordingCuda(list(gpus), [])
        mod = make_tensorrt(version, cuda, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", mod)
        monkeypatch.setattr(trt_backend, "_cuda", lambda: cuda)
        return mod, cuda

    return install


def _build_record(log):
    builds = [c[1] for c in log if c[0] == "builder.build_serialized_network"]
    assert len(builds) == 1
    return builds[0]


def _opts(precision, **kw):
    return BuildOptions(precision=precision, batch=kw.pop("batch", (1, 4, 8)), image_size=(16, 16), **kw)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_one_strongly_typed_path_no_precision_flags(double, graphs, tmp_path, version, precision):
    """Every build is strongly typed on both major versions; no FP16/INT8/precision-constraint flag is set and
    no layer is pinned (the 10.x FP16 path used to set FP16 + OBEY_PRECISION_CONSTRAINTS by layer name)."""
    mod, cuda = double(version)
    side = build_engine(graphs[precision], tmp_path / "m.engine", _opts(precision))
    strongly = 1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    rec = _build_record(cuda.log)
    assert rec["network_flags"] == strongly and side["strongly_typed"] is True
    set_flags = {c[1] for c in cuda.log if c[0] == "config.set_flag"}
    assert not set_flags & {"FP16", "INT8", "BF16", "FP8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}
    assert not {"FP16", "INT8"} & set(rec["flags"]) and rec["pinned_layers"] == []
    assert side["precision"] == precision and side["graph"]["precision"] == precision


@pytest.mark.parametrize("version", VERSIONS)
def test_fp32_build_clears_tf32_on_every_version(double, graphs, tmp_path, version):
    """TensorRT 11 keeps BuilderFlag.TF32, on by default: an FP32 engine must clear it there too."""
    _, cuda = double(version)
    side = build_engine(graphs["fp32"], tmp_path / "m.engine", _opts("fp32"))
    assert ("config.clear_flag", "TF32") in cuda.log
    assert "TF32" not in _build_record(cuda.log)["flags"] and side["tf32"] is False


@pytest.mark.parametrize("requested, graph", [("fp16", "fp32"), ("int8", "fp16"), ("fp32", "int8"), ("fp16", "int8")])
def test_refuses_a_precision_the_graph_does_not_carry(double, graphs, tmp_path, requested, graph):
    """bench used to build its fp16 TensorRT rows from the plain fp32 graph: on 11.x that is an fp32 engine."""
    _, cuda = double("11.1.0.8")
    with pytest.raises(BadInput) as info:
        build_engine(graphs[graph], tmp_path / "m.engine", _opts(requested))
    msg = str(info.value)
    assert "\n" not in msg and f"carries {graph}" in msg and f"--precision {requested}" in msg
    assert not [c for c in cuda.log if c[0] == "builder.build_serialized_network"]
    assert not (tmp_path / "m.engine").exists()


def test_graph_precision_reads_the_types(graphs):
    assert {k: graph_precision(p)["precision"] for k, p in graphs.items()} == {"fp32": "fp32", "fp16": "fp16",
                                                                              "int8": "int8"}


@pytest.mark.parametrize("version", VERSIONS)
def test_profile_shapes_and_options(double, graphs, tmp_path, version):
    _, cuda = double(version)
    build_engine(graphs["fp32"], tmp_path / "m.engine", _opts("fp32", batch=(2, 4, 16), builder_opt_level=5))
    assert ("profile.set_shape", "input", (2, 3, 16, 16), (4, 3, 16, 16), (16, 3, 16, 16)) in cuda.log
    assert _build_record(cuda.log)["opt_level"] == 5


def test_parser_errors_are_listed_on_one_line(double, graphs, tmp_path):
    double("10.13.3.9", parse_errors=("In node 3 (importConv): UNSUPPORTED_NODE", "Assertion failed: x"))
    with pytest.raises(EngineBuildError) as info:
        build_engine(graphs["fp32"], tmp_path / "m.engine", _opts("fp32"))
    msg = str(info.value)
    assert "2 error(s)" in msg and "importConv" in msg and "Assertion failed" in msg and "\n" not in msg


@pytest.mark.parametrize("cache_bytes", [
    json.dumps({"timing_cache_double": "sm_89/other-gpu", "entries": 7}).encode(),  # made on another device
    b"\x00garbage\xff",  # not a timing cache at all
])
def test_rejected_timing_cache_falls_back_to_a_fresh_one(double, graphs, tmp_path, cache_bytes):
    """set_timing_cache's result used to be ignored: a cache from another device silently failed."""
    _, cuda = double("11.1.0.8", cache_device="sm_90/this-gpu")
    cache = tmp_path / "t.cache"
    cache.write_bytes(cache_bytes)
    said = []
    side = build_engine(graphs["fp32"], tmp_path / "m.engine", _opts("fp32", timing_cache=cache), progress=said.append)
    warnings = [m for m in said if m.startswith("warning: timing cache")]
    assert len(warnings) == 1 and "fresh" in warnings[0] and "\n" not in warnings[0]
    assert side["timing_cache_state"] == "rejected"
    assert ("config.set_timing_cache", "sm_90/this-gpu", True) in cuda.log  # the fresh cache took its place
    assert json.loads(cache.read_bytes())["timing_cache_double"] == "sm_90/this-gpu"  # saved for this device


def test_matching_timing_cache_is_loaded_without_warning(double, graphs, tmp_path):
    _, cuda = double("11.1.0.8", cache_device="sm_90/this-gpu")
    cache = tmp_path / "t.cache"
    cache.write_bytes(json.dumps({"timing_cache_double": "sm_90/this-gpu", "entries": 3}).encode())
    said = []
    side = build_engine(graphs["fp32"], tmp_path / "m.engine", _opts("fp32", timing_cache=cache), progress=said.append)
    assert side["timing_cache_state"] == "loaded" and not [m for m in said if "warning" in m]
    assert json.loads(cache.read_bytes())["entries"] == 4


def test_build_and_run_on_the_requested_device(double, graphs, tmp_path):
    """cuda:1 used to deserialize on one device and allocate on another: everything must happen on cuda:1."""
    _, cuda = double("11.1.0.8", gpus=(H100, L4))
    engine = tmp_path / "m.engine"
    side = build_engine(graphs["fp32"], engine, _opts("fp32", device="cuda:1"))
    assert _build_record(cuda.log)["device"] == 1
    assert side["device"] == "cuda:1" and side["gpu_name"] == "NVIDIA L4" and side["compute_capability"] == "8.9"
    cuda.log.clear()
    with TrtRunner(engine, device="cuda:1") as runner:
        out = runner.infer({"input": np.zeros((3, 3, 16, 16), np.float32)})
    assert ("runtime.deserialize_cuda_engine", 1) in cuda.log and ("cuda.stream", 1) in cuda.log
    assert ("cuda.upload", 1, (3, 3, 16, 16)) in cuda.log and ("cuda.empty", 1, (3, 1000)) in cuda.log
    assert ("context.set_input_shape", "input", (3, 3, 16, 16)) in cuda.log
    assert [c for c in cuda.log if c[0] == "context.execute_async_v3"] == [("context.execute_async_v3", 0xC0DE + 1, 1)]
    assert not [c for c in cuda.log if c[0] in ("cuda.upload", "cuda.empty", "cuda.stream") and c[1] != 1]
    assert out["logits"].shape == (3, 1000)  # shape plumbing only: the double computes nothing


def test_unknown_device_is_one_line(double, graphs, tmp_path):
    double("10.13.3.9", gpus=(H100,))
    with pytest.raises(BadInput, match=r"cuda:1 does not exist: this machine has 1 GPU\(s\), cuda:0..cuda:0"):
        build_engine(graphs["fp32"], tmp_path / "m.engine", _opts("fp32", device="cuda:1"))
    with pytest.raises(BadInput, match="use cuda or cuda:N"):
        TrtRunner(tmp_path / "m.engine", device="gpu1")


def test_engine_of_another_tensorrt_version_is_refused(double, graphs, tmp_path):
    double("10.13.3.9")
    engine = tmp_path / "m.engine"
    build_engine(graphs["fp32"], engine, _opts("fp32", rebuild_hint="trtexec --onnx=g.onnx --saveEngine=m.engine"))
    double("11.1.0.8")
    with pytest.raises(EngineMismatch, match=r"TensorRT 10.13.3.9 but this machine runs TensorRT 11.1.0.8.*trtexec"):
        TrtRunner(engine).__enter__()
    sidecar_path(engine).unlink()  # as built by trtexec: TensorRT's deserialization is the check
    with pytest.raises(ArtifactError, match="no build sidecar"):
        TrtRunner(engine).__enter__()
    with pytest.raises(EngineMismatch, match="could not deserialize m.engine.*rebuild it here"):
        TrtRunner(engine, require_sidecar=False, rebuild="trtexec ...").__enter__()


def test_engine_built_outside_the_tool_is_identified_by_its_onnx_manifest(double, tmp_path):
    """An engine built with the printed trtexec command is verified/benchmarked through the manifest of the
    TensorRT-ready ONNX it came from (no sidecar), with TensorRT's own deserialization as the version check."""
    from nextvit_deploy.backends.tensorrt import engine_artifact, runner_for_artifact
    from nextvit_deploy.errors import EngineNotBuilt
    from nextvit_deploy.export import ExportRequest, export

    with pytest.raises(EngineNotBuilt) as info:  # real environment: no TensorRT
        export(ExportRequest(target="trt", precision="fp32", depths=(1, 1, 5, 1), image_size=(64, 64),
                             batch=(1, 2, 2), out_dir=tmp_path))
    onnx_art = info.value.artifact
    saved = next(p.split("=", 1)[1] for p in info.value.trtexec.split() if p.startswith("--saveEngine="))
    mod, cuda = double("10.13.3.9")
    build_engine(onnx_art.path, saved, _opts("fp32", batch=(1, 2, 2)))  # stands in for running trtexec
    sidecar_path(saved).unlink()
    art = engine_artifact(saved)
    assert art.path.name == onnx_art.path.with_suffix(".engine").name and art.details["built_outside"]
    assert art.details["onnx_sha256"] == onnx_art.sha256 and art.variant == onnx_art.variant
    runner = runner_for_artifact(art)
    assert isinstance(runner, TrtRunner) and not runner.require_sidecar and "trtexec" in runner.rebuild
    with runner:
        assert runner.inputs()[0].batch_range == (1, 2) and runner.notes
    (tmp_path / "other.engine").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="no TensorRT-ready ONNX manifest beside it names it"):
        engine_artifact(tmp_path / "other.engine")


def test_export_builds_the_engine_through_the_double(double, tmp_path):
    """With a TensorRT present, export writes the engine, its sidecar and its manifest, built from the graph
    that carries the precision (fp16 here), strongly typed."""
    from nextvit_deploy.artifact import Artifact
    from nextvit_deploy.export import ExportRequest, export

    _, cuda = double("11.1.0.8")
    art = export(ExportRequest(target="trt", precision="fp16", depths=(1, 1, 5, 1), image_size=(64, 64),
                               batch=(1, 2, 4), out_dir=tmp_path, calib_images=4))
    assert art.path.suffix == ".engine" and Artifact.load(art.path).details["engine"]["precision"] == "fp16"
    side = read_sidecar(art.path)
    assert side["graph"]["precision"] == "fp16" and side["batch_profile"] == {"min": 1, "opt": 2, "max": 4}
    assert not [c for c in cuda.log if c[0] == "config.set_flag"]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_trtexec_command_matches_the_build(precision):
    cmd = trtexec_command("m.onnx", "m.engine", precision=precision, batch=(1, 4, 8), image_size=(224, 224),
                          device="cuda:1")
    parts = cmd.split()
    assert "--stronglyTyped" in parts and "--device=1" in parts
    assert not {"--fp16", "--int8", "--best", "--precisionConstraints=obey"} & set(parts)  # removed in 11.x
    assert ("--noTF32" in parts) == (precision == "fp32")


def test_bench_trt_rows_build_from_the_precision_transform(tmp_path):
    """bench's TensorRT fp16 row builds from the fp16 graph (the export transform), not from the fp32 graph."""
    from nextvit_deploy.bench import BenchConfig, trt_ready_onnx

    src = tmp_path / "g.onnx"
    m = _conv_graph()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 32
    m.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 32
    onnx.save(m, str(src))
    cfg = BenchConfig(batch=2, image_size=(32, 32))
    assert trt_ready_onnx(src, "fp32", cfg, tmp_path / "x.onnx") == src
    out = trt_ready_onnx(src, "fp16", cfg, tmp_path / "g16.onnx")
    assert graph_precision(out)["precision"] == "fp16" and graph_precision(src)["precision"] == "fp32"
