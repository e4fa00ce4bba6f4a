"""Precision transforms of a deploy-form fp32 ONNX graph: FP16 (mixed precision) and INT8 (Q/DQ).

Every precision decision lives in the ONNX graph, where ONNX Runtime on a CPU can execute and verify
it; TensorRT then builds whatever the graph says. This module holds what both transforms share:

* the calibration images (``--calib-dir`` capped by ``--calib-images``, else the bundled calibration
  photos, which are disjoint from the photos ``verify`` gates on; the manifest records which),
* :func:`measure_activations`, which runs the fp32 graph on ONNX Runtime with every intermediate
  tensor exposed as an output and returns per-tensor ranges.

It is a leaf: :mod:`.fp16` and :mod:`.int8` build on it, and :mod:`.transform` (the entry point the
exporters and ``bench`` call) dispatches to them.

Conventions: ``"tensorrt"`` (FP16: mixed-precision graph; INT8: symmetric int8 Q/DQ on the inputs of
Conv/Gemm/MatMul, see :mod:`.int8`) and ``"onnxruntime"`` (FP16: the same mixed-precision graph;
INT8: the U8 activation / S8 weight QDQ graph ONNX Runtime accelerates on x86).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._deps import require
from ..errors import BadInput

__all__ = ["Convention", "TensorRange", "CalibrationSet", "StreamFeeds", "feed_count", "feed_batches",
           "calibration_set", "measure_activations",
           "float_tensor_types", "static_batch", "Feeds", "FP16_MAX", "FP16_MIN_NORMAL"]

Convention = Literal["onnxruntime", "tensorrt"]
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14  # 6.1e-5; smaller magnitudes lose precision (subnormals), < 2**-24 flush to 0


HISTOGRAM_BINS = 2048  # bins of the |x| histograms that INT8 calibration reads (percentile, entropy)


@dataclass(frozen=True, eq=False)
class TensorRange:
    """Measured range of one tensor over the calibration images.

    Attributes:
        absmax: largest |x| seen.
        tiny_fraction: fraction of the non-zero values whose magnitude is below fp16's smallest normal
            number (they would lose precision or flush to zero in fp16).
        histogram: counts of |x| in :data:`HISTOGRAM_BINS` equal bins over ``[0, bin_width * bins]``
            (only for the tensors a histogram was asked for; INT8 calibration reads it).
        bin_width: width of one histogram bin, in the tensor's units.
    """

    absmax: float
    tiny_fraction: float
    histogram: np.ndarray | None = None
    bin_width: float = 0.0

    def quantile(self, q: float) -> float:
        """The ``q``-th percentile (0..100) of |x| from the histogram: the upper edge of the bin where the
        cumulative count reaches ``q`` %, so never below the true value by more than one bin."""
        if self.histogram is None or self.histogram.sum() == 0:
            return self.absmax
        cum = np.cumsum(self.histogram)
        k = int(np.searchsorted(cum, q / 100.0 * cum[-1], side="left"))
        return float(min(self.absmax, (k + 1) * self.bin_width))


class _AbsHistogram:
    """Histogram of |x| accumulated over batches with a range that grows by exact doubling.

    The first non-zero batch sets the bin width (``max / bins``); a later batch whose maximum lies
    beyond the covered range doubles the width (adjacent bins summed pairwise) until it fits, so bin
    edges always line up and no count is approximated.
    """

    def __init__(self, bins: int = HISTOGRAM_BINS):
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.width = 0.0

    def add(self, a: np.ndarray, amax: float) -> None:
        if amax <= 0:
            self.counts[0] += a.size
            return
        if self.width == 0.0:
            self.width = amax / self.bins
        while amax > self.width * self.bins:
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(1), np.zeros(self.bins // 2, np.int64)])
            self.width *= 2.0
        hist, _ = np.histogram(a, bins=self.bins, range=(0.0, self.width * self.bins))
        self.counts += hist


class StreamFeeds:
    """Calibration inputs decoded from a folder batch by batch, on every pass (memory: one batch).

    Args:
        stream: a :class:`nextvit_deploy.data.ImageStream` (images in [0, 1]).
        convert: [0, 1] NCHW -> the model's input convention.
    """

    def __init__(self, stream, convert: Callable[[np.ndarray], np.ndarray]):
        self.stream, self.convert = stream, convert

    @property
    def count(self) -> int:
        """Images per pass (files that turn out unusable are skipped, so this is an upper bound before one)."""
        n = len(self.stream.used) or len(self.stream.files)
        return min(n, self.stream.limit) if self.stream.limit else n

    def batches(self, batch: int, *, static: int | None = None) -> Iterator[np.ndarray]:
        """One pass in runs of ``batch`` images (exactly ``static`` for a static-batch graph, see :func:`_runs`)."""
        yielded = False
        for chunk in _runs((self.convert(c) for c in self.stream.batches(static or batch)), static):
            yielded = True
            yield chunk
        if not yielded:
            raise BadInput(f"no usable calibration image in {self.stream.directory} ({self.stream.summary()}): "
                           "add .jpg/.png photos to --calib-dir")


Feeds = np.ndarray | StreamFeeds


def feed_count(feeds: Feeds) -> int:
    """Number of calibration images in ``feeds`` (an array or a :class:`StreamFeeds`)."""
    return int(feeds.shape[0]) if isinstance(feeds, np.ndarray) else feeds.count


def _runs(chunks: Iterable[np.ndarray], static: int | None) -> Iterator[np.ndarray]:
    """float32 runs of ``chunks``; for a static-batch graph a short run is topped up with images of the first
    run to exactly ``static`` images (maxima and histograms barely move)."""
    first: np.ndarray | None = None
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if first is None:
            first = chunk
        if static and chunk.shape[0] < static:
            chunk = np.concatenate([chunk, first[np.arange(static - chunk.shape[0]) % first.shape[0]]])
        yield chunk


def feed_batches(feeds: Feeds, batch: int, *, static: int | None = None) -> Iterator[np.ndarray]:
    """One pass over ``feeds`` in runs of ``batch`` (exactly ``static`` for a static-batch graph)."""
    if isinstance(feeds, np.ndarray):
        size = static or batch
        return _runs((feeds[i:i + size] for i in range(0, feeds.shape[0], size)), static)
    return feeds.batches(batch, static=static)


@dataclass(frozen=True)
class CalibrationSet:
    """Model inputs used to measure activation ranges, and where they came from (for the manifest).

    ``feeds`` is an array (the bundled photos) or a :class:`StreamFeeds` (a ``--calib-dir`` folder,
    decoded again on each calibration pass so that a large folder never sits in memory at once).
    """

    feeds: Feeds
    source: str  # "calib-dir /abs/path" or "bundled calibration photos ..."
    files: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "images": feed_count(self.feeds)}
        if isinstance(self.feeds, StreamFeeds):
            st = self.feeds.stream
            names = [f.name for f in st.used]
            d.update({"files": names[:8] + (["..."] if len(names) > 8 else []), "summary": st.summary(),
                      "skipped": [str(x) for x in st.skipped]})
        else:
            d["files"] = list(self.files[:8]) + (["..."] if len(self.files) > 8 else [])
        return d


def calibration_set(*, image_size: tuple[int, int], calib_dir: Path | None, calib_images: int,
                    crop_pct: float, mean: Sequence[float], std: Sequence[float],
                    input_kind: str = "tensor") -> CalibrationSet:
    """The calibration images as model inputs (a folder is streamed, see :class:`StreamFeeds`).

    Args:
        image_size: (height, width) in pixels.
        calib_dir: folder of images; ``None`` uses the bundled calibration photos
            (:func:`nextvit_deploy.data.calibration_photos`, none of which ``verify`` uses).
        calib_images: cap on the number of images (sorted file order).
        crop_pct, mean, std: the variant's preprocessing.
        input_kind: ``"tensor"`` feeds normalised images, ``"image"`` RGB 0..255. Defaults to "tensor".

    Raises:
        BadInput: empty or missing folder, no usable image, ``calib_images < 1``.
    """
    from ..data import (
        CALIBRATION_SOURCES,
        CALIBRATION_VIEWS,
        calibration_photos,
        iter_image_dir,
        normalize,
        scan_image_dir,
    )

    if calib_images < 1:
        raise BadInput(f"--calib-images must be at least 1, got {calib_images}")

    def convert(images: np.ndarray) -> np.ndarray:
        return normalize(images, mean, std) if input_kind == "tensor" else (images * 255.0).astype(np.float32)

    if calib_dir is not None:
        scan_image_dir(calib_dir, limit=calib_images)  # headers only: a folder without usable images fails now
        stream = iter_image_dir(calib_dir, image_size, limit=calib_images, crop_pct=crop_pct)
        return CalibrationSet(feeds=StreamFeeds(stream, convert), source=f"calib-dir {Path(calib_dir).resolve()}")
    n = min(calib_images, len(CALIBRATION_SOURCES) * len(CALIBRATION_VIEWS))
    source = (f"bundled calibration photos (no --calib-dir; {n} views of scikit-learn/scikit-image photos "
              "that verify does not use)")
    return CalibrationSet(feeds=convert(calibration_photos(n, image_size, crop_pct=crop_pct)), source=source)


def float_tensor_types(model) -> dict[str, int]:
    """Element type (``onnx.TensorProto`` enum) of every typed tensor of ``model`` (after shape inference)."""
    onnx = require("onnx")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types: dict[str, int] = {}
    g = inferred.graph
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def static_batch(model) -> int | None:
    """The first input's batch size when the graph fixes it, else None (dynamic batch)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].dim_value > 0 else None


def measure_activations(model, feeds: Feeds, *, tensors: Iterable[str] | None = None,
                        histograms: Sequence[str] = (), batch: int = 4,
                        threads: int | None = None) -> dict[str, TensorRange]:
    """Run the fp32 ``model`` on ONNX Runtime CPU with intermediate tensors exposed; return their ranges.

    Args:
        model: an ``onnx.ModelProto`` with a single float32 input.
        feeds: float32 NCHW calibration inputs (an array or a :class:`StreamFeeds`); run ``batch`` at a time.
        tensors: names to measure. Defaults to every float32 tensor produced by a node.
        histograms: tensors that also get an |x| histogram (INT8 calibration reads percentiles and the
            entropy threshold off it, :meth:`TensorRange.quantile`).
        batch: images per ONNX Runtime run (memory: every intermediate of the batch is held at once).
        threads: intra-op threads. Defaults to ONNX Runtime's choice.

    Returns:
        tensor name -> :class:`TensorRange`.
    """
    onnx = require("onnx")
    ort = require("onnxruntime", purpose="calibration")
    types = float_tensor_types(model)
    produced = [o for n in model.graph.node for o in n.output if o]
    wanted = [t for t in produced if types.get(t) == onnx.TensorProto.FLOAT] if tensors is None else list(tensors)
    wanted = list(dict.fromkeys([*wanted, *histograms])) if tensors is None else list(dict.fromkeys(wanted))
    inputs = {vi.name for vi in model.graph.input}
    hist_names = set(histograms) & set(wanted)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in wanted:
        if name not in existing and name not in inputs:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as named
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(probe.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    fetch = [n for n in wanted if n not in inputs]
    absmax = dict.fromkeys(wanted, 0.0)
    tiny = dict.fromkeys(wanted, 0)
    nonzero = dict.fromkeys(wanted, 0)
    hists = {n: _AbsHistogram() for n in wanted if n in hist_names}
    for chunk in feed_batches(feeds, batch, static=static_batch(model)):
        outs = dict(zip(fetch, sess.run(fetch, {input_name: chunk}))) if fetch else {}
        outs.update({n: chunk for n in wanted if n in inputs})
        for name in wanted:
            a = np.abs(outs[name].astype(np.float32, copy=False)).ravel()
            if a.size == 0:
                continue
            top = float(a.max())
            absmax[name] = max(absmax[name], top)
            nz = a[a > 0]
            nonzero[name] += nz.size
            tiny[name] += int((nz < FP16_MIN_NORMAL).sum())
            if name in hists:
                hists[name].add(a, top)
    out = {}
    for n in wanted:
        h = hists.get(n)
        out[n] = TensorRange(absmax=absmax[n], tiny_fraction=tiny[n] / nonzero[n] if nonzero[n] else 0.0,
                             histogram=h.counts if h else None, bin_width=h.width if h else 0.0)
    return out
