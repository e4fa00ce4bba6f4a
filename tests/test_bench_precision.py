"""bench's precision rows: which precisions each backend gets, Core ML rows' configuration, the precision table
(with the digits top-1 drop read from an accuracy report), and no fraction of a peak above 100 % in any report.

Pure logic and rendering of report dicts, plus one Core ML conversion of a tiny module; nothing is timed."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

from nextvit_deploy import published
from nextvit_deploy._deps import available
from nextvit_deploy.backends.base import Availability
from nextvit_deploy.bench import BenchConfig, BenchReport, BenchRow, render_markdown
from nextvit_deploy.bench.plan import coreml_rows, row_batch, row_precisions
from nextvit_deploy.bench.precision_table import load_accuracy, peak_cell, top1_drop
from nextvit_deploy.bench.ratios import with_speedups
from nextvit_deploy.errors import BadInput
from nextvit_deploy.latency import LatencyReport, LatencyStats

ROOT = Path(__file__).resolve().parents[1]
CPU = "cpu"
GPU = "cuda:0 (H100)"


def _avail(name: str, device: str, ok: bool = True, reason: str = "") -> Availability:
    return Availability(name, ok, reason, "1.0", device)


# ---- which precisions each backend times ---------------------------------------------------------
def test_cpu_backends_get_fp32_and_int8_in_their_convention_and_say_why_not_fp16():
    cfg = BenchConfig()
    assert cfg.int8  # INT8 rows are in the default table
    torch_cpu = _avail("torch", CPU)
    run, skipped = row_precisions(torch_cpu, cfg, _avail("torch", CPU, False, "fp16 on a CPU is emulated: use --x"))
    assert run == ["fp32"]
    reasons = {s["precision"]: s["reason"] for s in skipped}
    assert reasons["fp16"] == "fp16 on a CPU is emulated"  # the backend's reason, its flag advice dropped
    assert "no INT8 convention" in reasons["int8"]
    ort_cpu = _avail("onnxruntime", CPU)
    run, skipped = row_precisions(ort_cpu, cfg, _avail("onnxruntime", CPU, False, "not measured by bench"))
    assert run == ["fp32", "int8"] and [s["precision"] for s in skipped] == ["fp16"]
    # available in fp16 but on a CPU: still not run (bench never emulates fp16)
    run, skipped = row_precisions(ort_cpu, cfg, _avail("onnxruntime", CPU))
    assert run == ["fp32", "int8"] and "no native fp16" in skipped[0]["reason"]


def test_gpu_backends_add_fp16_and_ort_int8_stays_on_the_cpu_convention():
    cfg = BenchConfig()
    run, skipped = row_precisions(_avail("tensorrt", GPU), cfg, _avail("tensorrt", GPU))
    assert run == ["fp32", "fp16", "int8"] and not skipped
    run, skipped = row_precisions(_avail("torch", GPU), cfg, _avail("torch", GPU))
    assert run == ["fp32", "fp16"] and [s["precision"] for s in skipped] == ["int8"]
    run, skipped = row_precisions(_avail("onnxruntime", "cuda:0 (CUDA EP)"), cfg,
                                  _avail("onnxruntime", "cuda:0 (CUDA EP)", False, "not measured"))
    assert run == ["fp32"]
    assert "CPU execution provider" in {s["precision"]: s["reason"] for s in skipped}["int8"]
    run, skipped = row_precisions(_avail("tensorrt", GPU), dataclasses.replace(cfg, int8=False), _avail("tensorrt", GPU))
    assert run == ["fp32", "fp16"] and skipped == [{"backend": "tensorrt", "precision": "int8",
                                                    "reason": "turned off (--no-int8)"}]
    fp16_base = dataclasses.replace(cfg, precision="fp16")  # --precision fp16 still times fp32: the speed-up base
    assert row_precisions(_avail("torch", GPU), fp16_base, _avail("torch", GPU))[0] == ["fp32", "fp16"]


# ---- Core ML rows ---------------------------------------------------------------------------------
def test_coreml_rows_are_batch_1_at_the_exports_deployment_target():
    from nextvit_deploy.export import ExportRequest

    rows = coreml_rows()
    assert rows.batch == 1 and rows.min_target == ExportRequest().min_deployment_target == "iOS16"
    cfg = BenchConfig(batch=8)
    assert row_batch("coreml", cfg) == 1 and row_batch("onnxruntime", cfg) == 8 and row_batch("tensorrt", cfg) == 8
    assert "iOS16" in rows.describe() and "batch 1" in rows.describe()


@pytest.mark.skipif(not available("coremltools"), reason="coremltools is not installed")
def test_coreml_row_program_is_converted_for_ios16_at_batch_1():
    import torch

    from nextvit_deploy.bench.measure import coreml_program

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                 torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    cfg = BenchConfig(batch=row_batch("coreml", BenchConfig(batch=8)), image_size=(32, 32))
    spec = coreml_program(module, cfg).get_spec()
    assert spec.specificationVersion == 7  # Core ML 6 = iOS16 (iOS15, what coremltools picks by default, is 6)
    (inp,) = spec.description.input
    assert list(inp.type.multiArrayType.shape) == [1, 3, 32, 32]


def test_skipped_coreml_rows_say_why_and_how_they_would_run():
    if sys.platform == "darwin":
        pytest.skip("Core ML runs on macOS")
    from nextvit_deploy.bench.machine import backend_status

    d = _report([_row("nextvit_small", "onnxruntime", "fp32", 10.0)], backends=(backend_status("coreml"),))
    d["labels"]["flags"] = {"coreml_rows": coreml_rows().describe()}
    md = render_markdown(d)
    line = next(x for x in md.splitlines() if x.startswith("Backends not measured here"))
    assert "coreml (the Core ML runtime is macOS-only" in line
    assert "batch 1, minimum deployment target iOS16" in line


# ---- the precision table --------------------------------------------------------------------------
def _row(model: str, backend: str, precision: str, median_ms: float, *, fraction: float | None = 0.5,
         note: str = "", batch: int = 8) -> BenchRow:
    stats = LatencyStats.from_samples([median_ms] * 3, warmup=1, stopped_by="iters")
    lat = LatencyReport(name=model, backend=backend, precision=precision, batch=batch, input_shape=(batch, 3, 224, 224),
                        device="cpu", threads=2, stats=stats)
    pub = published.lookup(model)
    return BenchRow(model=model, display=published.display_name(model), backend=backend, latency=lat, gmacs=5.8,
                    params_m=31.7, achieved_gflops=100.0, peak_fraction=fraction, peak_note=note,
                    paper_trt_ms=pub.trt_fp16_ms_batch8, paper_coreml_ms=pub.coreml_ms_batch1,
                    paper_metric=pub.metric_value, metric=pub.metric, paper_status=pub.status,
                    paper_column="trt_fp16_ms_batch8")


def _report(rows: list[BenchRow], *, backends=(), skipped=()) -> dict:
    from nextvit_deploy.bench.machine import machine_labels

    report = BenchReport(config=BenchConfig(), labels=machine_labels(2), backends=tuple(backends), peaks=(),
                         rows=tuple(with_speedups(rows)), skipped_precisions=tuple(skipped))
    return json.loads(json.dumps(report.to_dict()))


def _accuracy(tmp_path: Path, drops: dict[str, float]) -> dict:
    rows = {k: {"top1_drop": v, "exit_code": 0} for k, v in drops.items()}
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"rows": rows, "environment": {"cpu_flags": "avx2 avx512_vnni"}, "test_images": 540}))
    return load_accuracy(path)


def _table_rows(md: str, heading: str) -> list[dict[str, str]]:
    """The rows of the Markdown table right after ``heading`` as dicts header -> cell."""
    lines = md.splitlines()
    i = next(k for k, x in enumerate(lines) if x.startswith(heading))
    start = next(k for k in range(i, len(lines)) if lines[k].startswith("| "))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    out = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        out.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return out


def test_precision_table_has_speedups_matching_peaks_and_the_digits_drop(tmp_path):
    rows = [_row("nextvit_small", "onnxruntime", "fp32", 40.0, fraction=0.56),
            _row("nextvit_small", "onnxruntime", "int8", 16.0, fraction=0.2),
            _row("nextvit_small", "torch", "fp32", 80.0, fraction=0.3),
            _row("nextvit_small", "tensorrt", "fp32", 10.0, fraction=None),
            _row("nextvit_small", "tensorrt", "fp16", 4.0, fraction=None),
            _row("nextvit_small", "tensorrt", "int8", 2.5, fraction=None)]
    skipped = [{"backend": "torch", "precision": "int8", "reason": "no INT8 convention for this backend"}]
    accuracy = _accuracy(tmp_path, {"onnx_fp32": 0.0, "onnx_int8": 0.37, "trt_int8": 1.5, "trt_fp16": 0.05})
    md = render_markdown(_report(rows, skipped=skipped), accuracy=accuracy)
    table = {(r["Model"], r["Backend"]): r for r in _table_rows(md, "### Precision rows")}
    ort = table["Next-ViT-S", "onnxruntime"]
    assert (ort["fp32 ms"], ort["int8 ms"], ort["int8 × fp32"]) == ("40.0", "16.0", "2.50x")
    assert ort["fp32 % of fp32 GEMM peak"] == "56 %" and ort["int8 % of int8 GEMM peak"] == "20 %"
    assert ort["digits top-1 drop int8 (pt)"] == "+0.37"  # the onnx_int8 row, not trt_int8's 1.5
    cpu = table["Next-ViT-S", "torch"]
    assert cpu["int8 ms"] == "–" and cpu["digits top-1 drop int8 (pt)"] == "–"
    trt = table["Next-ViT-S", "tensorrt"]
    assert (trt["fp16 ms"], trt["fp16 × fp32"], trt["int8 × fp32"]) == ("4.0", "2.50x", "4.00x")
    assert trt["digits top-1 drop fp16 (pt)"] == "+0.05" and trt["digits top-1 drop int8 (pt)"] == "+1.50"
    assert trt["fp16 % of fp16 GEMM peak"] == "–"  # no TensorRT peak is measured: empty, not borrowed
    assert ort["fp16 ms"] == "–" and ort["digits top-1 drop fp16 (pt)"] == "–"
    assert "Not run: torch int8 (no INT8 convention for this backend)." in md
    assert "acc.json" in md and "not measured by this bench run" in md
    assert "digits top-1 drop" not in render_markdown(_report(rows))  # no accuracy report, no column


def test_top1_drop_reads_the_backends_convention_and_skips_failed_rows(tmp_path):
    acc = _accuracy(tmp_path, {"trt_int8": 0.8, "onnx_int8": 0.2})
    assert top1_drop(acc, "tensorrt", "int8") == 0.8 and top1_drop(acc, "onnxruntime", "int8") == 0.2
    assert top1_drop(acc, "torch", "int8") is None and top1_drop(acc, "coreml", "fp16") is None
    acc["rows"]["onnx_int8"]["exit_code"] = 1
    assert top1_drop(acc, "onnxruntime", "int8") is None
    committed = load_accuracy(ROOT / "benchmarks/results/accuracy_digits_eval.json")
    assert top1_drop(committed, "onnxruntime", "int8") == committed["rows"]["onnx_int8"]["top1_drop"]


def test_load_accuracy_refuses_what_is_not_an_accuracy_report(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        load_accuracy(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BadInput, match="is not JSON"):
        load_accuracy(tmp_path / "bad.json")
    (tmp_path / "bench.json").write_text(json.dumps({"rows": [{"median_ms": 1.0}]}))
    with pytest.raises(BadInput, match="no eval rows with a top1_drop"):
        load_accuracy(tmp_path / "bench.json")


# ---- no fraction of a peak above 100 % in any report ---------------------------------------------
PCT = re.compile(r"^(\d+(?:\.\d+)?) %$")


def _peak_cells(md: str) -> list[str]:
    """Every cell of every Markdown table column whose header names a peak."""
    cells, header = [], None
    for line in md.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = parts
        elif not set(line) <= set("|-: "):
            cells += [c for h, c in zip(header, parts) if "peak" in h]
    return cells


def _assert_no_fraction_above_100(md: str) -> int:
    cells = _peak_cells(md)
    assert cells
    for c in cells:
        m = PCT.match(c)
        assert c in ("–", "peak under-measured") or (m and float(m.group(1)) <= 100), c
    return sum(c == "peak under-measured" for c in cells)


def test_a_fraction_above_one_never_renders_above_100_percent():
    assert peak_cell({"peak_fraction": 1.26, "peak_note": ""}) == "peak under-measured"
    assert peak_cell({"peak_fraction": 1.0, "peak_note": ""}) == "100 %"
    assert peak_cell({"peak_fraction": None, "peak_note": "peak under-measured"}) == "peak under-measured"
    rows = [_row("nextvit_small", "onnxruntime", "fp32", 40.0, fraction=0.9),
            _row("nextvit_small", "onnxruntime", "int8", 16.0, fraction=2.9)]  # as an unclamped writer would
    md = render_markdown(_report(rows))
    assert _assert_no_fraction_above_100(md) == 2  # main table and precision table


def test_committed_reports_regenerate_without_a_fraction_above_100_percent(tmp_path):
    """The committed cls-224 JSON is written by today's bench (no fraction above 1); a copy of it with fractions
    as an unclamped writer wrote them (the old report printed 107-126 %) must still render none above 100 %."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report_script", ROOT / "benchmarks/report.py")
    report_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report_script)
    src = ROOT / "benchmarks/results/cls-224/bench.json"
    d = json.loads(src.read_text())
    fractions = [r for r in d["rows"] if r.get("peak_fraction") is not None]
    assert fractions and all(r["peak_fraction"] <= 1 for r in fractions)  # bench itself never writes one above 1
    for r, bad in zip(fractions, (1.07, 1.26, 2.9)):  # as the pre-clamp writer did
        r["peak_fraction"] = bad
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(d))
    out = tmp_path / "README.md"
    assert report_script.main([str(src), "--accuracy", str(ROOT / "benchmarks/results/accuracy_digits_eval.json"),
                               "-o", str(out)]) == 0
    assert _assert_no_fraction_above_100(out.read_text()) >= 1
    with pytest.raises(SystemExit) as exc:
        report_script.main([str(src), "--accuracy", str(tmp_path / "none.json"), "-o", str(out)])
    assert exc.value.code == 2
