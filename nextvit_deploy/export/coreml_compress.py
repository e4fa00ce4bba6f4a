"""Compressed weights for Core ML packages (``coremltools.optimize.coreml``), applied inside the conversion.

Two kinds, both weight-only (activations keep the compute precision):

* ``--precision int8``: linear symmetric int8 weights, one scale per output channel
  (``OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")``), on an
  fp16 program: the weights are quantized from their fp16 values, the scales are fp16 and every op
  computes in fp16, which is how Core ML runs int8-weight models on the GPU and Neural Engine. At
  iOS16/iOS17 targets the program holds ``constexpr_affine_dequantize`` ops, at iOS18
  ``constexpr_blockwise_shift_scale``.
* ``--palettize-bits N`` (4, 6 or 8) with ``--precision fp16`` or ``fp32``: every weight tensor is
  replaced by an ``N``-bit index into a lookup table of ``2**N`` values found by k-means
  (``OpPalettizerConfig(mode="kmeans", nbits=N)``, one table per tensor). The program holds
  ``constexpr_lut_to_dense`` ops (the iOS16 or iOS18 form, per target).

Tensors with at most :data:`WEIGHT_THRESHOLD` elements (biases, norms, the input normalisation) stay
dense, as coremltools does by default. coremltools' public ``linear_quantize_weights`` /
``palettize_weights`` re-run its *default* pass pipeline, which puts back the
``fuse_elementwise_to_batchnorm`` pass the export removes on purpose (and which fails outright on an
fp16 image-input program); so the compression pass is instead appended to the export's own pipeline
(``compression::linear_quantize_weights`` / ``compression::palettize_weights`` with the config as its
option), after every other pass, when the weights already have their final dtype.

The size reduction is measured, not estimated: the exporter converts the same traced model once
without compression (the package a plain export would write) and once with it, and the manifest
records both package sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInput
from . import PALETTE_BITS

if TYPE_CHECKING:  # pragma: no cover
    from . import ExportRequest

__all__ = ["PALETTE_BITS", "WEIGHT_THRESHOLD", "WeightCompression", "compression_for",
           "check_target", "add_compression_pass", "package_bytes", "compression_record", "size_line"]

WEIGHT_THRESHOLD = 2048  # coremltools' default: tensors with at most this many elements stay dense
_PASSES = {"linear_symmetric": "compression::linear_quantize_weights", "kmeans": "compression::palettize_weights"}


@dataclass(frozen=True)
class WeightCompression:
    """What is done to the weights: ``mode`` ``"linear_symmetric"`` (int8, per output channel) or
    ``"kmeans"`` (an ``bits``-bit lookup table per tensor)."""

    mode: str
    bits: int
    granularity: str
    compute_precision: str  # the program's activations/compute: fp16 or fp32

    @property
    def pass_name(self) -> str:
        return _PASSES[self.mode]

    def config(self, cto) -> Any:
        """The ``coremltools.optimize.coreml.OptimizationConfig`` for this compression."""
        if self.mode == "linear_symmetric":
            op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity=self.granularity,
                                             weight_threshold=WEIGHT_THRESHOLD)
        else:
            op = cto.OpPalettizerConfig(mode="kmeans", nbits=self.bits, granularity=self.granularity,
                                        weight_threshold=WEIGHT_THRESHOLD)
        return cto.OptimizationConfig(global_config=op)


def compression_for(req: ExportRequest) -> WeightCompression | None:
    """The weight compression ``req`` asks for (None: dense weights); ``validate_request`` checked the bits."""
    if req.precision == "int8":
        return WeightCompression("linear_symmetric", 8, "per_channel", compute_precision="fp16")
    if req.palettize_bits is not None:
        return WeightCompression("kmeans", int(req.palettize_bits), "per_tensor", compute_precision=req.precision)
    return None


def check_target(ct, target, compression: WeightCompression | None) -> None:
    """Compressed-weight ops exist from iOS16 / macOS13 on: refuse an older ``--min-target``."""
    if compression is not None and target < ct.target.iOS16:
        flag = "--precision int8" if compression.mode == "linear_symmetric" else "--palettize-bits"
        raise BadInput(f"{flag} stores compressed weights, which need iOS16/macOS13 or newer, not {target.name}: "
                       "pass --min-target iOS16")


def add_compression_pass(ct, pipeline, compression: WeightCompression | None):
    """``pipeline`` (a ``ct.PassPipeline``) with the compression pass appended, configured; unchanged for None."""
    if compression is None:
        return pipeline
    import coremltools.optimize.coreml as cto

    pipeline.append_pass(compression.pass_name)
    pipeline.set_options(compression.pass_name, {"config": compression.config(cto)})
    pipeline.append_pass("common::dead_code_elimination")  # the dense consts the pass replaced
    return pipeline


def package_bytes(path: str | Path) -> int:
    """Bytes of a package: a file's size, or the sum over a folder's files."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def compression_record(compression: WeightCompression, *, dense_bytes: int, compressed_bytes: int,
                       op_counts: dict[str, int]) -> dict[str, Any]:
    """The manifest's ``weight_compression`` entry."""
    constexpr = {k: v for k, v in op_counts.items() if k.startswith("constexpr_")}
    return {
        "mode": compression.mode,
        "bits": compression.bits,
        "dtype": "int8" if compression.mode == "linear_symmetric" else f"uint{compression.bits} lookup-table indices",
        "granularity": compression.granularity,
        "compute_precision": compression.compute_precision,
        "weight_threshold": WEIGHT_THRESHOLD,
        "compressed_tensors": sum(constexpr.values()),
        "ops": constexpr,
        "api": f"coremltools.optimize.coreml {compression.pass_name} (in the export's pass pipeline)",
        "package_bytes_dense": dense_bytes,
        "package_bytes": compressed_bytes,
        "size_ratio": round(compressed_bytes / dense_bytes, 4) if dense_bytes else None,
    }


def size_line(record: dict[str, Any]) -> str:
    """One line for the console: ``weights int8 (linear_symmetric, per_channel): 12.3 MB -> 6.4 MB (52%)``."""
    what = "int8" if record["mode"] == "linear_symmetric" else f"{record['bits']}-bit palette"
    before, after = record["package_bytes_dense"], record["package_bytes"]
    return (f"weights {what} ({record['mode']}, {record['granularity']}): package {before / 1e6:.1f} MB -> "
            f"{after / 1e6:.1f} MB ({100.0 * after / max(before, 1):.0f}% of the {record['compute_precision']} package)")
