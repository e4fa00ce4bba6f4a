"""`triton-repo`: every generated config is parsed with Triton's own model_config.proto messages."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
from typer.testing import CliRunner

from nextvit_deploy.artifact import Artifact, sha256_path
from nextvit_deploy.cli import app
from nextvit_deploy.errors import BadInput, EngineNotBuilt
from nextvit_deploy.export import ExportRequest, export
from nextvit_deploy.serve.repo import RepoOptions, render_config, write_repository

from conftest import SMALL_DEPTHS, requires

pytestmark = requires("tritonclient")


def parse(text: str):
    """Parse config.pbtxt text into Triton's ModelConfig message (raises on anything Triton would reject)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> dict[str, Artifact]:
    d = tmp_path_factory.mktemp("arts")
    small = dict(depths=SMALL_DEPTHS, image_size=(64, 64))
    dyn = export(ExportRequest(target="onnx", batch=(1, 4, 8), out_dir=d / "dyn", **small))
    static = export(ExportRequest(target="onnx", batch=(4, 4, 4), out_dir=d / "static", **small))
    # batch range 2..8: the same graph with another manifest (the check reads only the manifest's range)
    (d / "min2").mkdir()
    minb = dyn.replace(path=d / "min2" / dyn.path.name, batch=(2, 4, 8))
    shutil.copy2(dyn.path, minb.path)
    minb.save_manifest()
    with pytest.raises(EngineNotBuilt) as info:  # no TensorRT here: the TensorRT-ready ONNX is written
        export(ExportRequest(target="trt", batch=(1, 8, 16), out_dir=d / "trt", **small))
    trt_onnx: Artifact = info.value.artifact
    # Test double: bytes standing in for a serialized engine (only its manifest is read; nothing runs it),
    # with the manifest an engine export writes (details.onnx names the source graph beside it).
    engine = trt_onnx.path.with_suffix(".engine")
    engine.write_bytes(b"test double: not a TensorRT engine")
    eng = trt_onnx.replace(path=engine, sha256=sha256_path(engine), details={"onnx": trt_onnx.path.name})
    eng.save_manifest()
    lone = d / "lone" / engine.name
    lone.parent.mkdir()
    shutil.copy2(engine, lone)
    lone_art = eng.replace(path=lone, details={})
    lone_art.save_manifest()
    return {"dyn": dyn, "static": static, "min2": minb, "engine": eng, "engine_alone": lone_art}


def test_dynamic_onnx_repository_parses_with_triton_messages(arts, tmp_path):
    pb = _pb()
    repo = tmp_path / "repo"
    [folder] = write_repository([arts["dyn"]], repo, options=RepoOptions(instances=2, kind="cpu",
                                                                         max_queue_delay_us=250))
    cfg = parse((folder / "config.pbtxt").read_text())
    assert cfg.name == folder.name == "nextvit_small-onnx-fp32-64"
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("input", pb.TYPE_FP32, [3, 64, 64])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("logits", pb.TYPE_FP32, [1000])]
    assert cfg.HasField("dynamic_batching")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, pb.ModelInstanceGroup.KIND_CPU)]
    model = folder / "1" / "model.onnx"
    assert model.read_bytes() == arts["dyn"].path.read_bytes()
    copy = Artifact.load(model)  # the manifest beside it describes these exact bytes
    assert copy.batch == (1, 4, 8) and copy.sha256 == arts["dyn"].sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no temporary folder left behind


def test_static_batch_gets_full_dims_and_no_batcher(arts, tmp_path):
    cfg = parse((write_repository([arts["static"]], tmp_path / "r")[0] / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 0
    assert list(cfg.input[0].dims) == [4, 3, 64, 64]
    assert list(cfg.output[0].dims) == [4, 1000]
    assert not cfg.HasField("dynamic_batching")
    assert cfg.instance_group[0].kind == _pb().ModelInstanceGroup.KIND_GPU


def test_engine_repository_is_tensorrt_plan(arts, tmp_path):
    pb = _pb()
    [folder] = write_repository([arts["engine"]], tmp_path / "r", options=RepoOptions(preferred_batch_sizes=(4, 16)))
    cfg = parse((folder / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan"
    assert cfg.max_batch_size == 16
    assert list(cfg.input[0].dims) == [3, 64, 64] and cfg.input[0].data_type == pb.TYPE_FP32
    assert list(cfg.output[0].dims) == [1000]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert (folder / "1" / "model.plan").read_bytes() == arts["engine"].path.read_bytes()
    assert (folder / "1" / "model.plan.manifest.json").is_file()


def test_engine_without_its_onnx_is_described_from_the_manifest(arts):
    cfg = parse(render_config(arts["engine_alone"], name="e"))
    assert list(cfg.input[0].dims) == [3, 64, 64] and list(cfg.output[0].dims) == [1000]
    backbone = dataclasses.replace(arts["engine_alone"], features_only=True)
    with pytest.raises(BadInput, match="keep that file beside the engine"):
        render_config(backbone, name="e")


def test_refusals_name_the_fix(arts, tmp_path):
    with pytest.raises(BadInput, match=r"re-export with --batch 1:8"):
        render_config(arts["min2"], name="m")
    with pytest.raises(BadInput, match="runs only on a GPU: use --kind gpu"):
        render_config(arts["engine"], name="m", options=RepoOptions(kind="cpu"))
    with pytest.raises(BadInput, match="outside the artifact's batch range 1..8"):
        render_config(arts["dyn"], name="m", options=RepoOptions(preferred_batch_sizes=(16,)))
    with pytest.raises(BadInput, match="--instances must be at least 1"):
        render_config(arts["dyn"], name="m", options=RepoOptions(instances=0))


def test_existing_model_folder_is_never_replaced(arts, tmp_path):
    repo = tmp_path / "repo"
    mine = repo / "nextvit_small-onnx-fp32-64"
    mine.mkdir(parents=True)
    (mine / "keep.txt").write_text("user data")
    with pytest.raises(BadInput, match="already exists"):
        write_repository([arts["dyn"]], repo)
    assert (mine / "keep.txt").read_text() == "user data" and sorted(p.name for p in mine.iterdir()) == ["keep.txt"]
    # a second model goes into the existing repository beside it
    write_repository([arts["static"]], repo, names=["static4"])
    assert sorted(p.name for p in repo.iterdir()) == ["nextvit_small-onnx-fp32-64", "static4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_cli_writes_repository_and_errors_in_one_line(arts, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["triton-repo", str(arts["dyn"].path), str(arts["engine"].path), "--out",
                            str(tmp_path / "r"), "--instances", "3", "--max-queue-delay-us", "500"])
    assert r.exit_code == 0, r.output
    cfgs = {p.parent.name: parse(p.read_text()) for p in (tmp_path / "r").glob("*/config.pbtxt")}
    assert {c.platform for c in cfgs.values()} == {"onnxruntime_onnx", "tensorrt_plan"}
    assert all(c.instance_group[0].count == 3 and c.dynamic_batching.max_queue_delay_microseconds == 500
               for c in cfgs.values())
    r = runner.invoke(app, ["triton-repo", str(arts["min2"].path), "--out", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "re-export with --batch 1:8" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r2").exists()  # nothing half-written
    r = runner.invoke(app, ["triton-repo", str(arts["dyn"].path), "--out", str(tmp_path / "r3"), "--kind", "tpu"])
    assert r.exit_code == 2 and "--kind must be 'gpu' or 'cpu'" in r.output
    r = runner.invoke(app, ["triton-repo", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "r4")])
    assert r.exit_code == 2 and "does not exist" in r.output
    help_text = runner.invoke(app, ["triton-repo", "--help"]).output
    for flag in ("--kind", "--instances", "--max-queue-delay-us", "--preferred-batch", "--name", "--out", "--image-input"):
        assert flag in help_text


def test_doctor_reports_the_serve_extra():
    import subprocess
    import sys
    import textwrap

    r = CliRunner().invoke(app, ["doctor"])
    assert r.exit_code == 0 and "serve (Triton)" in r.output
    code = textwrap.dedent("""
        import sys, importlib.abc
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'pytriton':
                    raise ModuleNotFoundError('blocked by test', name=name)
        sys.meta_path.insert(0, _Block())
        from nextvit_deploy.cli.doctor import serve_row
        print(serve_row())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'missing'" in done.stdout
    assert "pip install 'nextvit-deploy[serve]' && pip install --no-deps nvidia-pytriton==0.7.0" in done.stdout


def test_image_input_writes_preprocessing_and_ensemble(arts, tmp_path):
    pb = _pb()
    repo = tmp_path / "r"
    write_repository([arts["dyn"]], repo, options=RepoOptions(image_input=True, kind="cpu"))
    name = "nextvit_small-onnx-fp32-64"
    assert sorted(p.name for p in repo.iterdir()) == [name, f"{name}_image", f"{name}_preprocess"]
    pre = parse((repo / f"{name}_preprocess" / "config.pbtxt").read_text())
    assert pre.backend == "python" and pre.max_batch_size == 8
    assert (pre.input[0].name, pre.input[0].data_type, list(pre.input[0].dims), pre.input[0].allow_ragged_batch) == \
        ("image", pb.TYPE_UINT8, [-1], True)
    assert (pre.output[0].name, list(pre.output[0].dims)) == ("input", [3, 64, 64])
    assert pre.parameters["mode"].string_value == "preprocess"
    assert (repo / f"{name}_preprocess" / "1" / "model.py").is_file()
    ens = parse((repo / f"{name}_image" / "config.pbtxt").read_text())
    assert ens.platform == "ensemble" and ens.max_batch_size == 8
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == [f"{name}_preprocess", name]
    assert dict(steps[0].output_map) == {"input": "preprocessed"} and dict(steps[1].input_map) == {"input": "preprocessed"}
    assert dict(steps[1].output_map) == {"logits": "logits"}
    assert [(o.name, list(o.dims)) for o in ens.output] == [("logits", [1000])]
    with pytest.raises(BadInput, match="--image-input needs a dynamic-batch artifact"):
        write_repository([arts["static"]], tmp_path / "s", options=RepoOptions(image_input=True))
    assert not (tmp_path / "s").exists()
