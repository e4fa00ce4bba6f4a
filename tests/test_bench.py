"""The latency harness: published data, model/backend resolution, ratios, a real small run, and the CLI.

Runs are real (ONNX Runtime and torch on this machine) but tiny; nothing asserts on timings.
"""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources

import pytest
from typer.testing import CliRunner

from nextvit_deploy import published
from nextvit_deploy._deps import available
from nextvit_deploy.bench import (
    BenchConfig,
    BenchRow,
    _with_ratios,
    backend_status,
    bench,
    ordering_flag,
    render_markdown,
    resolve_models,
    write_outputs,
)
from nextvit_deploy.errors import BadInput
from nextvit_deploy.latency import LatencyReport, LatencyStats

needs_ort = pytest.mark.skipif(not available("onnxruntime"), reason="onnxruntime is not installed")
needs_timm = pytest.mark.skipif(not available("timm"), reason="timm is not installed (pip install 'nextvit-deploy[timm]')")


# ---- published data ------------------------------------------------------------------------------
def test_published_table_is_packaged_with_provenance():
    rows = published.published_rows()
    assert len(rows) == 45
    readme = resources.files("nextvit_deploy").joinpath("resources", "README.md").read_text()
    assert "2207.05501" in readme and "digitized" in readme and "TensorRT 8.0.3" in readme
    s = published.lookup("nextvit_small")
    assert (s.trt_fp16_ms_batch8, s.coreml_ms_batch1, s.metric_value, s.status) == (7.7, 3.5, 82.5, "confirmed")
    assert published.lookup("Next-ViT-L", image_size=384).trt_fp16_ms_batch8 == 36.0
    assert published.lookup("resnet101", task="det-maskrcnn", image_size=512).trt_fp16_ms_batch8 == 32.5
    assert published.lookup("convnext_base").coreml_ms_batch1 is None  # empty cells stay empty
    assert published.lookup("resnet101", image_size=300) is None
    assert published.display_name("efficientformer_l7") == "EfficientFormer-L7"
    assert all(r.timm_name for r in published.rows_for("cls", 224))


# ---- pure logic -----------------------------------------------------------------------------------
@pytest.mark.parametrize("measured, paper, flag", [
    (1.5, 1.3, ""), (0.7, 0.8, ""), (1.2, 0.8, "flip"), (0.8, 1.2, "flip"), (1.3, 0.987, "flip~"),
    (None, 1.0, None), (1.0, None, None)])
def test_ordering_flag(measured, paper, flag):
    assert ordering_flag(measured, paper) == flag


def _row(model: str, backend: str, median_ms: float) -> BenchRow:
    stats = LatencyStats.from_samples([median_ms] * 3, warmup=1, stopped_by="iters")
    lat = LatencyReport(name=model, backend=backend, precision="fp32", batch=8, input_shape=(8, 3, 224, 224),
                        device="cpu", threads=2, stats=stats)
    pub = published.lookup(model)
    return BenchRow(model=model, display=published.display_name(model), backend=backend, latency=lat, gmacs=1.0,
                    params_m=1.0, achieved_gflops=1.0, peak_fraction=None, paper_trt_ms=pub.trt_fp16_ms_batch8,
                    paper_coreml_ms=pub.coreml_ms_batch1, paper_metric=pub.metric_value, metric=pub.metric,
                    paper_status=pub.status, paper_column="trt_fp16_ms_batch8")


def test_ratios_use_same_backend_and_published_column():
    rows = [_row("resnet101", "torch", 100.0), _row("nextvit_small", "torch", 150.0),
            _row("convnext_tiny", "torch", 120.0), _row("nextvit_small", "onnxruntime", 50.0)]
    by = {(r.model, r.backend): r for r in _with_ratios(rows, task="cls", side=224)}
    nv = by["nextvit_small", "torch"]
    assert nv.ratio_resnet101 == pytest.approx(1.5)
    assert nv.paper_ratio_resnet101 == pytest.approx(7.7 / 7.8)
    assert nv.flag_resnet101 == "flip~"  # slower here, a near tie in the paper
    cx = by["convnext_tiny", "torch"]
    assert cx.ratio_nextvit_s == pytest.approx(0.8) and cx.paper_ratio_nextvit_s == pytest.approx(19.1 / 7.7)
    assert cx.flag_nextvit_s == "flip"  # ConvNeXt-T faster than Next-ViT-S here, 2.5x slower in the paper
    ort = by["nextvit_small", "onnxruntime"]
    assert ort.ratio_resnet101 is None  # no ResNet-101 on that backend in this run
    assert ort.paper_ratio_resnet101 == pytest.approx(7.7 / 7.8) and ort.flag_resnet101 is None
    assert ort.ratio_nextvit_s == 1.0


def test_resolve_models():
    assert resolve_models(BenchConfig()) == list(published.DEFAULT_MODELS["cls"])
    full = resolve_models(BenchConfig(full=True))
    assert "resnet152" in full and "twins_svt_large" in full and len(full) == len(set(full)) == 24
    assert resolve_models(BenchConfig(full=True, task="det")) == [
        "nextvit_small", "nextvit_base", "nextvit_large", "resnet101", "efficientformer_l7"]
    assert resolve_models(BenchConfig(models=("Next-ViT-S", "s", "ResNet-101"))) == ["nextvit_small", "resnet101"]
    with pytest.raises(BadInput, match="not in timm"):
        resolve_models(BenchConfig(models=("CSWin-T",)))
    with pytest.raises(BadInput, match="did you mean 'resnet101'"):
        resolve_models(BenchConfig(models=("resnet10l",)))
    with pytest.raises(BadInput, match="no published cls rows at 300x300"):
        resolve_models(BenchConfig(full=True, image_size=(300, 300)))


def test_backend_status_says_why():
    import torch

    assert backend_status("torch").available
    cg = backend_status("torch-cudagraph")
    assert cg.available == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "CUDA GPU" in cg.reason
        assert not backend_status("tensorrt").available
        assert "fp16" in backend_status("torch", precision="fp16").reason
    if sys.platform != "darwin":
        assert "macOS" in backend_status("coreml").reason
    with pytest.raises(BadInput, match="unknown backend"):
        backend_status("tflite")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"backends": ("onnxrt",)}, "did you mean 'onnxruntime'"), ({"precision": "int8"}, "fp32 or fp16"),
    ({"batch": 0}, "--batch"), ({"task": "seg"}, "--task"), ({"threads": 0}, "--threads")])
def test_bench_rejects_bad_config_before_work(kwargs, fragment):
    with pytest.raises(BadInput, match=fragment):
        bench(BenchConfig(models=("nextvit_small",), **kwargs))


# ---- a real run -----------------------------------------------------------------------------------
@needs_ort
def test_small_run_measures_every_backend_present(tmp_path):
    cfg = BenchConfig(models=("nextvit_small",), backends=("torch", "onnxruntime", "coreml"), batch=2,
                      image_size=(64, 64), warmup=0, iters=2, duration_s=None, threads=1, int8=False)
    report = bench(cfg)
    assert report and not report.failures
    assert [r.backend for r in report.rows] == ["torch", "onnxruntime"] or sys.platform == "darwin"
    assert {"backend": "onnxruntime", "precision": "int8", "reason": "turned off (--no-int8)"} in \
        report.skipped_precisions
    for row in report.rows:
        s = row.latency.stats
        assert s.runs == 2 and s.warmup == 0 and s.median_ms > 0
        assert row.latency.threads == 1 and row.latency.batch == 2
        assert row.gmacs == pytest.approx(5.7944 * (64 * 64) / (224 * 224), rel=0.15)
        assert row.achieved_gflops > 0 and row.peak_fraction is not None and row.peak_fraction > 0
        assert row.ratio_nextvit_s == 1.0 and row.paper_ratio_nextvit_s is None  # no published 64x64 row
        assert any("BatchNorms folded" in n for n in row.notes)
    assert {p.backend for p in report.peaks} == {"torch", "onnxruntime"}
    assert all(p.gflops > 0 for p in report.peaks)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["labels"]["threads"] == 1 and d["labels"]["versions"]["onnxruntime"]
    assert any(b["name"] == "torch-cudagraph" and b["reason"] for b in d["backends"]) or d["labels"]["gpu"]
    paths = write_outputs(report, tmp_path)
    assert set(paths) == {"json", "csv", "md"}  # no published metric at 64x64: nothing to plot
    csv_text = paths["csv"].read_text()
    assert csv_text.startswith("# ") and "median_ms" in csv_text.splitlines()[1]
    md = render_markdown(d)
    assert "Backends not measured here" in md
    if sys.platform != "darwin":  # Core ML is skipped with its reason and the configuration its rows would use
        assert "coreml (the Core ML runtime is macOS-only" in md and "batch 1, minimum deployment target iOS16" in md


def test_nextvit_rows_do_not_need_timm():
    code = ("import sys; sys.modules['timm'] = None\n"
            "from nextvit_deploy.bench import BenchConfig, bench, build_bench_model\n"
            "from nextvit_deploy.errors import MissingDependency\n"
            "b = build_bench_model('nextvit_small', task='det', image_size=(64, 64))\n"
            "assert b.output_names == ('feat_s4', 'feat_s8', 'feat_s16', 'feat_s32')\n"
            "try:\n"
            "    bench(BenchConfig(models=('nextvit_small', 'resnet101')))\n"
            "except MissingDependency as e:\n"
            "    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "timm is needed for resnet101" in res.stdout and "pip install 'nextvit-deploy[timm]'" in res.stdout


# ---- the CLI --------------------------------------------------------------------------------------
def _app():
    from nextvit_deploy.cli import app

    return app


@needs_ort
@needs_timm
def test_cli_bench_writes_table_files_and_plot(tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(_app(), [
        "bench", "--models", "nextvit_small,resnet101", "--backends", "onnxruntime", "--batch", "1",
        "--iters", "2", "--warmup", "0", "--duration", "0", "--threads", "2", "--no-int8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for header in ("×R101", "×NV-S", "TRT ms", "median"):
        assert header in res.output
    assert "skipped coreml" in res.output and "not run: onnxruntime int8 (turned off (--no-int8))" in res.output
    d = json.loads((out / "bench.json").read_text())
    rows = {r["model"]: r for r in d["rows"]}
    assert rows["resnet101"]["ratio_resnet101"] == 1.0 and rows["resnet101"]["paper_ratio_resnet101"] == 1.0
    assert rows["nextvit_small"]["paper_ratio_resnet101"] == pytest.approx(7.7 / 7.8, abs=1e-4)
    assert rows["nextvit_small"]["flag_resnet101"] in ("", "flip", "flip~")
    assert rows["resnet101"]["gmacs"] == pytest.approx(7.8, abs=0.05)
    assert rows["nextvit_small"]["runs"] == 2
    md = (out / "bench.md").read_text()
    assert "paper × ResNet-101" in md and "bench.png" in md and "cores" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bench.csv").read_text().count("\n") == 4  # comment, header, two rows


@needs_ort
@pytest.mark.slow  # about 10-25 s on 2 shared cores: calibrating and quantizing the full Next-ViT-S graph
def test_cli_bench_default_table_has_int8_rows(tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(_app(), [
        "bench", "--models", "nextvit_small", "--backends", "onnxruntime", "--image-size", "64", "--batch", "1",
        "--iters", "2", "--rounds", "2", "--warmup", "0", "--duration", "0", "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads((out / "bench.json").read_text())
    assert d["config"]["int8"] is True
    assert [(r["backend"], r["precision"]) for r in d["rows"]] == [("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    fp32, int8 = d["rows"]
    assert int8["speedup_vs_fp32"] == pytest.approx(fp32["median_ms"] / int8["median_ms"], rel=1e-3)
    assert any("-bit weights" in n for n in int8["notes"])  # the weight range the transform picked, and why
    assert {p["precision"] for p in d["peaks"]} == {"fp32", "int8"}
    assert "Next-ViT-S on onnxruntime int8:" in res.output and "x the fp32 row" in res.output
    assert (out / "bench.csv").read_text().count("\n") == 4  # comment, header, fp32 row, int8 row
    assert "### Precision rows" in (out / "bench.md").read_text()


@pytest.mark.parametrize("args, fragment", [
    (["--backends", "foo"], "unknown backend 'foo'"), (["--task", "seg"], "unknown --task"),
    (["--full", "--models", "resnet101"], "--full and --models conflict"), (["--duration", "-1"], "--duration"),
    (["--models", "CSWin-T"], "not in timm")])
def test_cli_errors_are_one_line(args, fragment, tmp_path):
    res = CliRunner().invoke(_app(), ["bench", "--out", str(tmp_path), *args])
    assert res.exit_code == 2
    assert fragment in res.output and "Traceback" not in res.output
