"""bench on exported artifacts, interleaved rounds, ratio spread, peak clamp, availability (cheap: tiny models)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from nextvit_deploy._deps import available
from nextvit_deploy.backends.base import Availability
from nextvit_deploy.bench import bench_artifacts, cpu_flags, int8_weight_bits, render_markdown
from nextvit_deploy.bench.machine import backend_status
from nextvit_deploy.bench.measure import Timed, interleave, iqr, spread_of
from nextvit_deploy.bench.peaks import UNDER_MEASURED, gemm_sweep, peak_fraction
from nextvit_deploy.bench.types import PeakResult
from nextvit_deploy.errors import BadInput
from nextvit_deploy.latency import LatencyStats

needs_ort = pytest.mark.skipif(not available("onnxruntime"), reason="onnxruntime is not installed")
SMALL = (1, 1, 5, 1)


# ---- pure logic -----------------------------------------------------------------------------------
def test_rounds_interleave_rows():
    order: list[str] = []
    items = [Timed(k, (lambda k=k: order.append(k))) for k in "ABC"]
    timings = interleave(items, warmup=1, iters=6, rounds=3, duration_s=None)
    assert order[:3] == ["A", "B", "C"]  # warm-up, once per row before the first round
    timed = order[3:]
    assert timed == ["A", "A", "B", "B", "C", "C"] * 3  # A, B, C, A, B, C, ... two runs per row per round
    assert all(t.stats.runs == 6 and len(t.round_medians_ms) == 3 for t in timings.values())


def test_iters_fewer_than_rounds_keeps_iters():
    timings = interleave([Timed("A", lambda: None)], warmup=0, iters=2, rounds=5, duration_s=None)
    assert timings["A"].stats.runs == 2 and len(timings["A"].round_medians_ms) == 2


def test_spread_is_the_iqr_of_per_round_ratios():
    assert iqr([1.0]) is None
    assert iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0)
    steady = spread_of([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])  # drift hits both rows alike: ratio 2 every round
    assert steady == pytest.approx(0.0)
    drifting = spread_of([2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 1.0, 2.0])
    assert drifting is not None and drifting > 0.3


def _peak(gflops: float) -> PeakResult:
    stats = LatencyStats.from_samples([1.0], warmup=0, stopped_by="iters")
    return PeakResult("onnxruntime", "fp32", "cpu", 64, gflops, stats, shape=(64, 64, 64))


def test_peak_fraction_never_above_one():
    assert peak_fraction(50.0, _peak(100.0)) == (0.5, "")
    assert peak_fraction(150.0, _peak(100.0)) == (None, UNDER_MEASURED)
    assert peak_fraction(50.0, None) == (None, "")
    assert gemm_sweep(False, [(3136, 64, 256), (512, 512, 512)])[-1] == (3136, 64, 256)
    assert len(gemm_sweep(False, [(512, 512, 512)])) == 3  # a model GEMM equal to a square is not repeated


def test_availability_rows_come_from_the_backends():
    for name in ("torch", "torch-cudagraph", "onnxruntime", "tensorrt", "coreml"):
        a = backend_status(name)
        assert isinstance(a, Availability) and a.name == name
        assert a.available or a.reason
    if not available("tensorrt"):
        assert "pip install 'nextvit-deploy[trt]'" in backend_status("tensorrt").reason
    with pytest.raises(BadInput, match="did you mean 'onnxruntime'"):
        backend_status("onnxrt")


def test_int8_weight_bits_follow_the_cpu_flags():
    assert cpu_flags("flags\t\t: fpu sse avx2 avx512f avx512_vnni\n") == ("avx2", "avx512f", "avx512_vnni")
    assert int8_weight_bits(("avx2", "avx512f")) == 7
    assert int8_weight_bits(("avx2", "avx_vnni")) == 8 and int8_weight_bits(("amx_int8",)) == 8


# ---- real runs on two tiny exported artifacts ----------------------------------------------------
@pytest.fixture(scope="module")
def two_artifacts(tmp_path_factory):
    """One tiny export, and a copy of it (file + manifest) in a second folder: two artifacts for one export."""
    import shutil

    from nextvit_deploy.artifact import manifest_path
    from nextvit_deploy.export import ExportRequest, export

    out = tmp_path_factory.mktemp("arts")
    a = export(ExportRequest(image_size=(64, 64), depths=SMALL, out_dir=out / "a", seed=1, batch=(2, 2, 2),
                             simplify=False)).path
    (out / "b").mkdir()
    b = out / "b" / a.name
    shutil.copy(a, b)
    shutil.copy(manifest_path(a), manifest_path(b))
    return a, b


@needs_ort
def test_bench_two_artifacts_with_ratios_spread_and_peaks(two_artifacts, tmp_path):
    a, b = two_artifacts
    report = bench_artifacts([a, b], iters=4, rounds=2, warmup=0, duration_s=None, threads=1, peak_squares=(128, 256))
    assert report and report.artifacts
    rows = {r.model: r for r in report.rows}
    ra, rb = rows[str(a)], rows[str(b)]  # same file name in two folders: the full paths name the rows
    assert ra.ratio_baseline == 1.0 and ra.spread_baseline is None
    assert rb.ratio_baseline == pytest.approx(rb.median_ms / ra.median_ms)
    assert rb.spread_baseline is not None and rb.spread_baseline >= 0
    assert all(r.latency.stats.runs == 4 and len(r.round_medians_ms) == 2 and r.backend == "onnxruntime"
               and r.latency.batch == 2 for r in report.rows)
    (peak,) = report.peaks
    assert peak.precision == "fp32" and len(peak.sweep) == 4 and peak.gflops > 0  # 2 squares + 2 model GEMMs
    for r in report.rows:
        assert r.achieved_gflops > 0
        assert (r.peak_fraction is not None and 0 < r.peak_fraction <= 1) or r.peak_note == UNDER_MEASURED
    again = bench_artifacts([a, b], baseline=b, iters=2, rounds=2, warmup=0, duration_s=None, threads=1,
                            peak_squares=(128,))
    assert {r.model: r.ratio_baseline for r in again.rows}[str(b)] == 1.0
    md = render_markdown(json.loads(json.dumps(report.to_dict())))
    assert "× " in md and "GEMM peak" in md and "CPU flags" in md


@needs_ort
def test_cli_bench_artifacts(two_artifacts, tmp_path):
    from nextvit_deploy.cli import app

    a, b = two_artifacts
    res = CliRunner().invoke(app, ["bench", str(a), str(b), "--iters", "2", "--rounds", "2", "--warmup", "0",
                                   "--duration", "0", "--threads", "1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert d["artifacts"] and len(d["rows"]) == 2 and d["rows"][0]["ratio_baseline"] == 1.0
    for args, fragment in ((["--models", "resnet101"], "--models applies to the table"),
                           (["--no-int8"], "--int8/--no-int8 applies to the table"),
                           (["--baseline", "nope.onnx"], "--baseline nope.onnx is not among"),
                           (["--batch", "1:4"], "one batch size")):
        res = CliRunner().invoke(app, ["bench", str(a), *args, "--out", str(tmp_path / "x")])
        assert res.exit_code == 2 and fragment in res.output and "Traceback" not in res.output, res.output
    res = CliRunner().invoke(app, ["bench", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "does not exist" in res.output


@needs_ort
@pytest.mark.slow
def test_int8_artifact_records_weight_bits_and_meets_the_int8_peak(two_artifacts, tmp_path):
    from nextvit_deploy.artifact import Artifact
    from nextvit_deploy.export import ExportRequest, export

    art = export(ExportRequest(precision="int8", image_size=(64, 64), depths=SMALL, out_dir=tmp_path, seed=1,
                               batch=(2, 2, 2), simplify=False, calib_images=3, int8_weight_bits=7))
    bits = Artifact.load(art.path).details["precision_transform"]["weight_bits"]
    assert bits == {"bits": 7, "source": "requested"}
    report = bench_artifacts([two_artifacts[0], art.path], iters=2, rounds=2, warmup=0, duration_s=None, threads=1,
                             peak_squares=(128,))
    assert {p.precision for p in report.peaks} == {"fp32", "int8"}
    assert [r.latency.precision for r in report.rows] == ["fp32", "int8"]


def test_int8_weight_bits_flag_is_checked(tmp_path):
    from nextvit_deploy.cli import app

    for args, fragment in ((["--int8-weight-bits", "8"], "applies only to --target onnx --precision int8"),
                           (["--precision", "int8", "--int8-weight-bits", "6"], "must be 7 or 8")):
        res = CliRunner().invoke(app, ["export", *args, "--out", str(tmp_path)])
        assert res.exit_code == 2 and fragment in res.output, res.output


@needs_ort
@pytest.mark.slow
def test_default_table_int8_rows_through_the_export_transform():
    from nextvit_deploy.bench import BenchConfig, bench

    cfg = BenchConfig(models=("nextvit_small",), backends=("onnxruntime",), batch=1, image_size=(64, 64), warmup=0,
                      iters=2, rounds=2, duration_s=None, threads=1, int8=True)
    report = bench(cfg)
    assert report and [r.latency.precision for r in report.rows] == ["fp32", "int8"]
    fp32, int8 = report.rows
    assert fp32.speedup_vs_fp32 is None and int8.speedup_vs_fp32 == pytest.approx(fp32.median_ms / int8.median_ms)
    assert int8.ratio_nextvit_s == 1.0  # an int8 row is compared with the int8 reference, not with fp32
    assert {(p.backend, p.precision) for p in report.peaks} == {("onnxruntime", "fp32"), ("onnxruntime", "int8")}
    md = render_markdown(json.loads(json.dumps(report.to_dict())))
    assert "Precision rows" in md and "onnxruntime int8" in md
