"""latency.measure: warm-up discarded, run counts and stopping rules, statistics, runners. No timing asserts."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from nextvit_deploy.backends.torch import TorchRunner
from nextvit_deploy.errors import BadInput
from nextvit_deploy.latency import MIN_RUNS, SPREAD_WARN, LatencyReport, LatencyStats, measure, set_threads


class Counter:
    def __init__(self, sleep_s: float = 0.0):
        self.calls = 0
        self.sleep_s = sleep_s
        self.seen = []

    def __call__(self, feed=None):
        self.calls += 1
        self.seen.append(feed)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return feed


def test_warmup_runs_are_executed_and_discarded():
    fn = Counter()
    stats = measure(fn, "x", warmup=3, iters=7)
    assert fn.calls == 10
    assert stats.runs == 7 and stats.warmup == 3 and len(stats.samples_ms) == 7
    assert stats.stopped_by == "iters"
    assert fn.seen == ["x"] * 10  # the feed reaches every call


def test_callable_without_feed_is_called_bare():
    calls = []
    measure(lambda: calls.append(1), warmup=0, iters=4)
    assert len(calls) == 4


def test_duration_stops_before_iters_but_not_below_min_runs():
    fn = Counter(sleep_s=0.02)
    stats = measure(fn, warmup=0, iters=1000, min_duration_s=0.1)
    assert stats.stopped_by == "duration"
    assert MIN_RUNS <= stats.runs < 1000
    assert stats.timed_s >= 0.1  # the statistic rests on at least min_duration_s of measurement

    floor = measure(Counter(), warmup=0, iters=50, min_duration_s=0.0)
    assert floor.runs == MIN_RUNS and floor.stopped_by == "duration"


def test_iters_reached_first_keeps_iters():
    stats = measure(Counter(), warmup=0, iters=5, min_duration_s=60.0)
    assert stats.runs == 5 and stats.stopped_by == "iters"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"warmup": -1}, "--warmup"), ({"iters": 0}, "--iters"), ({"min_duration_s": -2.0}, "--duration")])
def test_bad_arguments_name_the_option(kwargs, fragment):
    with pytest.raises(BadInput, match=fragment):
        measure(Counter(), **kwargs)


def test_statistics_from_known_samples():
    samples = [10.0] * 9 + [30.0]
    s = LatencyStats.from_samples(samples, warmup=1, stopped_by="iters")
    assert s.median_ms == 10.0
    assert s.p90_ms == pytest.approx(12.0)  # linear interpolation between the 9th and 10th sorted values
    assert s.p99_ms == pytest.approx(28.2)
    assert s.min_ms == 10.0 and s.max_ms == 30.0 and s.mean_ms == pytest.approx(12.0)
    assert s.spread == pytest.approx(1.2)
    assert s.noisy and not s  # 1.2 > SPREAD_WARN: a noisy measurement is falsy and says why
    assert any(w.startswith("noisy") for w in s.warnings)
    assert s.throughput(8) == pytest.approx(800.0)

    steady = LatencyStats.from_samples([5.0] * 20, warmup=0, stopped_by="iters")
    assert steady.spread == 1.0 <= SPREAD_WARN and bool(steady) and steady.warnings == []


def test_few_runs_are_flagged():
    s = LatencyStats.from_samples([5.0, 5.0, 5.0], warmup=0, stopped_by="duration")
    assert any("3 timed runs" in w for w in s.warnings)


def test_empty_samples_rejected():
    with pytest.raises(ValueError):
        LatencyStats.from_samples([], warmup=0, stopped_by="iters")


def test_runner_is_timed_through_infer_and_must_be_active():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    runner = TorchRunner(model, image_size=(16, 16))
    feed = {"input": np.zeros((2, 3, 16, 16), np.float32)}
    with pytest.raises(RuntimeError, match="activate"):
        measure(runner, feed, iters=1)
    with runner:
        stats = measure(runner, feed, warmup=1, iters=3)
        assert stats.runs == 3
        bad = {"input": np.zeros((2, 3, 20, 20), np.float32)}
        with pytest.raises(BadInput, match="re-export with --image-size 16x16"):
            measure(runner, bad, iters=1)  # the runner's own feed check still applies


def test_non_callable_rejected():
    with pytest.raises(TypeError):
        measure(42, iters=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_events_need_a_gpu():
    with pytest.raises(BadInput, match="CUDA GPU"):
        measure(Counter(), cuda_events=True, iters=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for CUDA-event timing")
def test_cuda_events_report_gpu_time():
    a = torch.randn(512, 512, device="cuda")
    stats = measure(lambda: a @ a, warmup=2, iters=5, cuda_events=True)
    assert stats.gpu_median_ms is not None and stats.gpu_median_ms > 0
    assert stats.gpu_p90_ms >= stats.gpu_median_ms


def test_report_labels_and_json():
    stats = LatencyStats.from_samples([4.0, 5.0, 6.0], warmup=2, stopped_by="iters")
    rep = LatencyReport(name="m", backend="torch", precision="fp32", batch=8, input_shape=(8, 3, 224, 224),
                        device="cpu", threads=2, stats=stats, versions={"torch": torch.__version__})
    assert rep.throughput_ips == pytest.approx(8 * 1000 / 5.0)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["threads"] == 2 and d["stats"]["median_ms"] == 5.0 and d["stats"]["warmup"] == 2
    assert d["stats"]["samples_ms"] == [4.0, 5.0, 6.0] and d["stats"]["gpu_median_ms"] is None


def test_set_threads_pins_torch():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        with pytest.raises(BadInput, match="--threads"):
            set_threads(-1)
    finally:
        torch.set_num_threads(before)
