"""Latency measurement with the hygiene a reader can trust.

``measure(fn_or_runner, feed)`` discards warm-up runs, then times runs until ``iters`` runs are done or,
once at least :data:`MIN_RUNS` runs are done, ``min_duration_s`` seconds of timed runs have passed, so
every statistic rests on at least ``iters`` runs or at least ``min_duration_s`` seconds of measurement.
Wall time comes from ``time.perf_counter``; on a GPU each run is also bracketed by CUDA events and the
device is synchronised, so GPU time and end-to-end time are reported separately. The result is a frozen
:class:`LatencyStats`; :class:`LatencyReport` adds the labels (backend, threads, device, batch) that a
number needs to be read correctly. A spread (p90 / median) above :data:`SPREAD_WARN` marks the
measurement as noisy: ``bool(stats)`` is False and ``warnings`` says so.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .backends.base import Runner
from .errors import BadInput

__all__ = ["LatencyStats", "LatencyReport", "measure", "set_threads", "SPREAD_WARN", "MIN_RUNS",
           "TARGET_RUNS"]

SPREAD_WARN = 1.10  # p90 / median above this: the machine was noisy during the measurement
MIN_RUNS = 3  # never fewer timed runs, whatever the duration
TARGET_RUNS = 20  # percentiles from fewer runs than this are coarse (p99 is then the slowest run)


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass(frozen=True)
class LatencyStats:
    """Statistics of one measurement; all times in milliseconds per call (one call = one batch).

    Attributes:
        runs: timed runs (warm-up excluded).
        warmup: warm-up runs that were executed and discarded.
        median_ms, p90_ms, p99_ms, mean_ms, min_ms, max_ms: end-to-end wall time per call.
        timed_s: wall time spent in the timed runs, seconds.
        stopped_by: ``"iters"`` (``iters`` runs done) or ``"duration"`` (``min_duration_s`` reached).
        samples_ms: every timed run, in order.
        gpu_median_ms, gpu_p90_ms, gpu_p99_ms: CUDA-event time per call on the GPU, None on a CPU.
    """

    runs: int
    warmup: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    timed_s: float
    stopped_by: str
    samples_ms: tuple[float, ...] = ()
    gpu_median_ms: float | None = None
    gpu_p90_ms: float | None = None
    gpu_p99_ms: float | None = None

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], *, warmup: int, stopped_by: str,
                     gpu_samples_ms: Sequence[float] | None = None) -> LatencyStats:
        """Summarise per-run times (milliseconds)."""
        if not samples_ms:
            raise ValueError("no timed runs to summarise")
        s = [float(v) for v in samples_ms]
        gpu = [float(v) for v in gpu_samples_ms] if gpu_samples_ms else None
        return cls(runs=len(s), warmup=warmup, median_ms=statistics.median(s), p90_ms=_percentile(s, 90),
                   p99_ms=_percentile(s, 99), mean_ms=statistics.fmean(s), min_ms=min(s), max_ms=max(s),
                   timed_s=sum(s) / 1e3, stopped_by=stopped_by, samples_ms=tuple(round(v, 4) for v in s),
                   gpu_median_ms=statistics.median(gpu) if gpu else None,
                   gpu_p90_ms=_percentile(gpu, 90) if gpu else None,
                   gpu_p99_ms=_percentile(gpu, 99) if gpu else None)

    @property
    def spread(self) -> float:
        """p90 / median (1.0 = perfectly steady)."""
        return self.p90_ms / self.median_ms if self.median_ms > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        return self.spread > SPREAD_WARN

    @property
    def warnings(self) -> list[str]:
        out = []
        if self.noisy:
            out.append(f"noisy: p90/median = {self.spread:.2f} > {SPREAD_WARN:.2f}; close other programs, "
                       f"fix the CPU frequency or raise --duration")
        if self.runs < TARGET_RUNS:
            out.append(f"{self.runs} timed runs (stopped by {self.stopped_by}): p99 is close to the slowest run")
        return out

    def throughput(self, batch: int) -> float:
        """Images per second at the median latency for ``batch`` images per call."""
        return batch * 1e3 / self.median_ms if self.median_ms > 0 else 0.0

    def __bool__(self) -> bool:
        return self.runs > 0 and not self.noisy

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples_ms"] = list(self.samples_ms)
        d["spread"] = round(self.spread, 4)
        d["noisy"] = self.noisy
        return d


@dataclass(frozen=True)
class LatencyReport:
    """A measurement with everything needed to read it: what ran, where, with how many threads.

    Attributes:
        name: what was measured (``"nextvit_small"``, ``"matmul 2048"``).
        backend: ``torch``, ``torch-cudagraph``, ``onnxruntime``, ``tensorrt`` or ``coreml``.
        precision: ``fp32`` / ``fp16`` / ``int8``.
        batch: images per call; ``input_shape`` the full input shape.
        device: what computed it (``"cpu"``, ``"cuda:0 (NVIDIA H100)"``).
        threads: intra-op threads the backend was pinned to.
        stats: the :class:`LatencyStats`.
    """

    name: str
    backend: str
    precision: str
    batch: int
    input_shape: tuple[int, ...]
    device: str
    threads: int
    stats: LatencyStats
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return self.stats.median_ms

    @property
    def throughput_ips(self) -> float:
        return self.stats.throughput(self.batch)

    def __bool__(self) -> bool:
        return bool(self.stats)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "precision": self.precision, "batch": self.batch,
                "input_shape": list(self.input_shape), "device": self.device, "threads": self.threads,
                "throughput_ips": round(self.throughput_ips, 4), "versions": dict(self.versions),
                "stats": self.stats.to_dict()}


def set_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads (``None``: all cores) and return the number in effect."""
    import torch

    n = threads or os.cpu_count() or 1
    if n < 1:
        raise BadInput(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(n)
    return torch.get_num_threads()


def _as_call(fn_or_runner: Runner | Callable[..., Any], feed: Any) -> Callable[[], Any]:
    if isinstance(fn_or_runner, Runner):
        if not fn_or_runner.is_active:
            raise RuntimeError(f"{fn_or_runner.name} must be activated ('with runner:') before measuring")
        return lambda: fn_or_runner.infer(feed)
    if not callable(fn_or_runner):
        raise TypeError(f"expected a Runner or a callable, got {type(fn_or_runner).__name__}")
    return (lambda: fn_or_runner(feed)) if feed is not None else fn_or_runner


def measure(fn_or_runner: Runner | Callable[..., Any], feed: Any = None, *, warmup: int = 1,
            iters: int = TARGET_RUNS, min_duration_s: float | None = None, cuda_events: bool = False,
            on_run: Callable[[int, float], None] | None = None) -> LatencyStats:
    """Time ``fn_or_runner`` on ``feed``.

    Args:
        fn_or_runner: an active :class:`~nextvit_deploy.backends.base.Runner` (``runner.infer(feed)`` is
            timed) or a callable (``fn(feed)``, or ``fn()`` when ``feed`` is None).
        feed: what each call receives. Defaults to None.
        warmup: runs executed first and discarded. Defaults to 1.
        iters: timed runs wanted. Defaults to 20.
        min_duration_s: seconds of timed runs after which timing may stop early, provided at least
            :data:`MIN_RUNS` runs are done; so the statistics rest on ``iters`` runs or on at least this
            many seconds. Defaults to None (exactly ``iters`` runs).
        cuda_events: also record CUDA-event GPU time per run and synchronise the device around every
            run (use on a GPU; end-to-end time then includes the synchronisation). Defaults to False.
        on_run: called after each timed run with (run index, milliseconds), e.g. to advance a progress bar.

    Returns:
        :class:`LatencyStats` in milliseconds per call.
    """
    if warmup < 0:
        raise BadInput(f"--warmup must be 0 or more, got {warmup}")
    if iters < 1:
        raise BadInput(f"--iters must be at least 1, got {iters}")
    if min_duration_s is not None and min_duration_s < 0:
        raise BadInput(f"--duration must be 0 or more seconds, got {min_duration_s}")
    call = _as_call(fn_or_runner, feed)
    torch_cuda = None
    if cuda_events:
        import torch

        if not torch.cuda.is_available():
            raise BadInput("CUDA-event timing needs a CUDA GPU; measure without cuda_events on this machine")
        torch_cuda = torch.cuda
    for _ in range(warmup):
        call()
    if torch_cuda is not None:
        torch_cuda.synchronize()
    samples: list[float] = []
    gpu: list[float] = []
    spent = 0.0
    stopped_by = "iters"
    while len(samples) < iters:
        if min_duration_s is not None and len(samples) >= min(MIN_RUNS, iters) and spent >= min_duration_s:
            stopped_by = "duration"
            break
        if torch_cuda is not None:
            start_ev, end_ev = torch_cuda.Event(enable_timing=True), torch_cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start_ev.record()
            call()
            end_ev.record()
            torch_cuda.synchronize()
            dt = time.perf_counter() - t0
            gpu.append(start_ev.elapsed_time(end_ev))
        else:
            t0 = time.perf_counter()
            call()
            dt = time.perf_counter() - t0
        spent += dt
        samples.append(dt * 1e3)
        if on_run is not None:
            on_run(len(samples), dt * 1e3)
    return LatencyStats.from_samples(samples, warmup=warmup, stopped_by=stopped_by,
                                     gpu_samples_ms=gpu or None)
