"""Exporters. ``export(request)`` validates a request, dispatches to the target's exporter through
``TARGETS`` and returns the :class:`~nextvit_deploy.artifact.Artifact` it wrote."""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifact import Artifact, check_creatable_dir
from ..errors import BadInput
from ..hub import is_hub_spec, resolve_hub_file
from ..sizes import parse_image_size
from ..targets import artifact_name, check_precision, get_target, load_object

if TYPE_CHECKING:
    from nextvit_model import LoadedCheckpoint

    from ..fuse import FuseResult

__all__ = ["ExportRequest", "CheckpointSource", "export", "build_deploy_model", "parse_batch", "parse_image_size",
           "validate_request", "estimate_export_bytes", "check_overwrite", "opset_range", "MAX_BATCH", "MAX_SIDE",
           "MAX_CALIB_IMAGES"]

# Caps on what one export may ask for (a request beyond them is a typo or an attack, not a model).
MAX_BATCH = 256
MAX_SIDE = 2048
MAX_CALIB_IMAGES = 2048
MAX_WORKSPACE_GB = 1024.0
OPT_LEVELS = range(0, 6)
PALETTE_BITS = (4, 6, 8)  # Core ML --palettize-bits (export/coreml_compress.py)


# progress(message) callback: exporters report long steps through it (the CLI shows a spinner/bar).
Progress = Callable[[str], None]


@dataclass(frozen=True)
class CheckpointSource:
    """A request's checkpoint, read and hashed once (by :func:`validate_request`) for the whole export."""

    path: Path
    sha256: str
    loaded: LoadedCheckpoint


@dataclass(frozen=True)
class ExportRequest:
    """Everything an exporter needs. ``batch`` is (min, opt, max); min == max means a static batch."""

    target: str = "onnx"
    precision: str = "fp32"
    variant: str = "nextvit_small"
    image_size: tuple[int, int] = (224, 224)
    batch: tuple[int, int, int] = (1, 1, 1)
    opset: int = 17
    out_dir: Path = Path("build")
    checkpoint: Path | None = None  # a file, or hf-hub:ORG/NAME[@REVISION] (validate_request resolves it)
    checkpoint_hub: dict[str, str] | None = None  # repo_id, revision (commit), filename of a hub checkpoint
    seed: int = 0  # random weights (with realistic BatchNorm statistics) when there is no checkpoint
    features_only: bool = False
    simplify: bool = True
    depths: tuple[int, int, int, int] | None = None  # small test models only
    # INT8 calibration (trt int8, onnx int8)
    calib_dir: Path | None = None
    calib_images: int = 64
    # Core ML fp16: measure activation ranges for the fp32-keep guard (the CLI sets it when --calib-dir or
    # --calib-images is given; a calib_dir alone implies it). Without it only static rules apply.
    calibrate_fp16: bool = False
    # TensorRT builder
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    builder_opt_level: int = 3
    # Core ML
    min_deployment_target: str = "iOS16"
    input_kind: str = "tensor"  # "tensor" (normalised float input) or "image" (RGB 0..255)
    class_labels: Path | None = None
    # Core ML backbone with enumerated input sizes (the first is image_size, the default); see coreml_shapes.py
    image_sizes: tuple[tuple[int, int], ...] | None = None
    palettize_bits: int | None = None  # Core ML: N-bit lookup-table weights (export/coreml_compress.py)
    extra: dict[str, Any] = field(default_factory=dict)
    # INT8, TensorRT convention (see export/int8.py Int8Options)
    calib_method: str = "max"
    int8_attention: bool = False  # also quantize MatMul -> Softmax -> MatMul
    int8_residual: bool = True  # Q/DQ on the skip input of Conv + Add
    int8_high_precision: str = "fp16"  # type of the unquantized regions: fp16 (opset >= 19) or fp32
    int8_weight_bits: int | None = None  # ONNX Runtime x86 INT8: 8 with VNNI/AMX, 7 without; None = this CPU's
    device: str = "cuda:0"  # TensorRT: the GPU that builds (and runs) the engine
    # Replace an existing artifact of the same name that holds other weights (another seed/checkpoint).
    force: bool = False
    # Classifier width; None = the checkpoint head's (validate_request fills it in), else 1000.
    num_classes: int | None = None
    # The checkpoint read and hashed once; validate_request fills it in (not part of the request's identity).
    checkpoint_source: CheckpointSource | None = field(default=None, compare=False, repr=False)

    @property
    def checkpoint_sha256(self) -> str | None:
        """sha256 of the checkpoint file (from :attr:`checkpoint_source` once validated), None without one."""
        if self.checkpoint is None:
            return None
        if self.checkpoint_source is not None:
            return self.checkpoint_source.sha256
        from ..artifact import sha256_path

        return sha256_path(self.checkpoint)

    @property
    def dynamic_batch(self) -> bool:
        return self.batch[0] != self.batch[2]

    def int8_options(self):
        """The TensorRT-convention INT8 options of this request."""
        from .int8 import Int8Options

        return Int8Options(method=self.calib_method, residual=self.int8_residual, attention=self.int8_attention,
                           high_precision=self.int8_high_precision)

    @property
    def effective_opset(self) -> int:
        """The opset the graph is exported at: TensorRT INT8 with fp16 regions needs fp16 Q/DQ scales,
        which need opset 19, so a lower ``opset`` is raised to 19 there (the manifest records it)."""
        from .int8 import FP16_SCALE_OPSET

        if self.target == "trt" and self.precision == "int8" and self.int8_high_precision == "fp16":
            return max(self.opset, FP16_SCALE_OPSET)
        return self.opset

    def output_path(self, suffix: str | None = None) -> Path:
        h, w = self.image_size
        if self.palettize_bits is not None and suffix is None:  # beside, not over, the dense package
            suffix = f"-pal{self.palettize_bits}{get_target(self.target).suffix}"
        return self.out_dir / artifact_name(self.variant, self.target, self.precision, h, w,
                                            features_only=self.features_only, suffix=suffix, sizes=self.image_sizes)


def parse_batch(text: str) -> tuple[int, int, int]:
    """``"8"`` -> (8, 8, 8); ``"1:8"`` -> (1, 8, 8); ``"1:4:16"`` -> (1, 4, 16) (min:opt:max)."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise BadInput(f"--batch {text!r} is not a number or a range: use 8, 1:8 or 1:4:16") from None
    if not 1 <= len(parts) <= 3:
        raise BadInput(f"--batch {text!r} has too many parts: use 8, 1:8 or 1:4:16")
    if any(p <= 0 for p in parts):
        raise BadInput(f"--batch must be at least 1, got {text}: use 8, 1:8 or 1:4:16")
    lo, opt, hi = (parts * 3)[:3] if len(parts) == 1 else (parts[0], parts[-1], parts[-1]) if len(parts) == 2 \
        else tuple(parts)
    if not lo <= opt <= hi:
        raise BadInput(f"--batch {text}: need min <= opt <= max")
    return lo, opt, hi


def opset_range() -> tuple[int, int]:
    """ONNX opsets the installed torch's TorchScript exporter writes (and that our graph needs: >= 13)."""
    try:
        from torch.onnx import _constants as c

        return max(13, int(c.ONNX_MIN_OPSET)), int(getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", c.ONNX_MAX_OPSET))
    except (ImportError, AttributeError):  # private module moved: fall back to what torch 2.x supports
        return 13, 20


def _physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate_export_bytes(batch: int, height: int, width: int) -> int:
    """Rough peak memory of tracing + checking one export (bytes): a linear part of ~400 bytes per input
    pixel (stem and stage activations) plus the attention matrices of stages 1-3 (heads x queries x
    pooled keys x 4 bytes), which grow with the square of the pixel count."""
    per_image = 400 * height * width
    for stride, sr, heads in ((8, 4, 6), (16, 2, 12), (32, 1, 24)):
        n = math.ceil(height / stride) * math.ceil(width / stride)
        per_image += heads * n * max(1, n // (sr * sr)) * 4
    return batch * per_image


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def _check_palettize(req: ExportRequest) -> None:
    """``--palettize-bits``: Core ML only, one of :data:`PALETTE_BITS`, and not with int8 weights."""
    bits = req.palettize_bits
    if bits is None:
        return
    if req.target != "coreml":
        raise BadInput(f"--palettize-bits applies only to --target coreml, not {req.target}: drop --palettize-bits")
    if bits not in PALETTE_BITS:
        raise BadInput(f"--palettize-bits must be one of {', '.join(map(str, PALETTE_BITS))}, got {bits}")
    if req.precision == "int8":
        raise BadInput("--palettize-bits replaces the weights by a lookup table, --precision int8 by int8 values: "
                       "pass --precision fp16 with --palettize-bits, or drop --palettize-bits")


def validate_request(req: ExportRequest) -> ExportRequest:
    """Check everything that can be checked before work starts (one-line errors naming the fix).

    Returns the request with facts found on the way filled in (``num_classes`` from a checkpoint's head).
    """
    from nextvit_model import InputSizeError, check_input_size, resolve_variant

    check_precision(req.target, req.precision)
    _check_palettize(req)
    cfg = resolve_variant(req.variant)
    if min(req.batch) <= 0:
        raise BadInput(f"--batch must be at least 1, got {req.batch}")
    if req.batch[2] > MAX_BATCH:
        raise BadInput(f"--batch {req.batch[2]} is above the limit of {MAX_BATCH}: use a smaller --batch")
    h, w = req.image_size
    if max(h, w) > MAX_SIDE:
        raise BadInput(f"--image-size {h}x{w} is above the limit of {MAX_SIDE} pixels a side: use a smaller --image-size")
    from .int8 import CALIBRATION_METHODS

    if req.calib_method not in CALIBRATION_METHODS:
        raise BadInput(f"--calib-method {req.calib_method!r} is unknown: choose {', '.join(CALIBRATION_METHODS)}")
    if req.int8_high_precision not in ("fp16", "fp32"):
        raise BadInput(f"--int8-float {req.int8_high_precision!r} is unknown: choose fp16 or fp32")
    if req.target == "trt":
        from ..backends.tensorrt import cuda_index

        cuda_index(req.device)
    try:
        check_input_size(h, w, cfg.sr_ratios)
    except InputSizeError as exc:
        raise BadInput(f"{exc} (pass --image-size)") from None
    if req.image_sizes is not None:
        from .coreml_shapes import check_image_sizes

        check_image_sizes(req, sr_ratios=cfg.sr_ratios, max_side=MAX_SIDE)
        h, w = max(req.image_sizes, key=lambda s: s[0] * s[1])  # the memory check below: the largest size
    need, have = estimate_export_bytes(req.batch[2], h, w), _physical_memory_bytes()
    if have is not None and need > 0.8 * have:
        raise BadInput(f"--batch {req.batch[2]} at --image-size {h}x{w} needs about {_gb(need)} to export but this "
                       f"machine has {_gb(have)}: use a smaller --batch or --image-size")
    if req.target in ("onnx", "trt"):
        lo, hi = opset_range()
        if not lo <= req.opset <= hi:
            raise BadInput(f"--opset {req.opset} is not supported by the installed torch exporter: use {lo} to {hi}")
    if not math.isfinite(req.workspace_gb) or not 0 < req.workspace_gb <= MAX_WORKSPACE_GB:
        raise BadInput(f"--workspace-gb must be above 0 and at most {MAX_WORKSPACE_GB:g}, got {req.workspace_gb:g}")
    if req.timing_cache is not None and Path(req.timing_cache).is_dir():
        raise BadInput(f"--timing-cache {req.timing_cache} is a folder: pass a file path such as "
                       f"{Path(req.timing_cache) / 'timing.cache'}")
    if req.builder_opt_level not in OPT_LEVELS:
        raise BadInput(f"--opt-level must be 0 to 5, got {req.builder_opt_level}")
    if req.calib_images < 1:
        raise BadInput(f"--calib-images must be at least 1, got {req.calib_images}")
    if req.calib_images > MAX_CALIB_IMAGES:
        raise BadInput(f"--calib-images must be at most {MAX_CALIB_IMAGES}, got {req.calib_images}")
    if req.input_kind not in ("tensor", "image"):
        raise BadInput(f"--input-kind {req.input_kind!r} is not supported: choose one of tensor, image")
    if req.input_kind == "image" and req.target != "coreml":
        raise BadInput(f"--input-kind image applies only to --target coreml; {req.target} inputs are normalised "
                       "tensors: drop --input-kind")
    if req.class_labels is not None:
        if req.target != "coreml":
            raise BadInput(f"--labels applies only to --target coreml, not {req.target}: drop --labels")
        if req.features_only:
            raise BadInput("--labels needs a classifier, but --backbone exports a backbone: drop one of them")
        if not Path(req.class_labels).is_file():
            raise BadInput(f"class labels file {req.class_labels} does not exist: pass a text file with one label "
                           "per line to --labels")
    if req.calibrate_fp16 and (req.target, req.precision) != ("coreml", "fp16"):
        raise BadInput(f"calibrate_fp16 applies only to --target coreml --precision fp16 (onnx/trt fp16 always "
                       f"measure), not {req.precision} {req.target}: drop it")
    if req.calib_dir is not None:
        if req.precision == "fp32":
            raise BadInput("--calib-dir applies only to --precision fp16 or int8, not fp32: drop --calib-dir")
        from ..data import scan_image_dir

        scan_image_dir(req.calib_dir, limit=req.calib_images)
    if is_hub_spec(req.checkpoint):
        found = resolve_hub_file(str(req.checkpoint))
        req = dataclasses.replace(req, checkpoint=found.path, checkpoint_hub=found.record())
    num_classes, source = req.num_classes, req.checkpoint_source
    if req.checkpoint is not None and (source is None or source.path != Path(req.checkpoint)):
        source = _read_checkpoint(Path(req.checkpoint), cfg.name)
    if source is not None and num_classes is None and source.loaded.num_classes is not None:
        num_classes = source.loaded.num_classes
    check_creatable_dir(req.out_dir)
    req = dataclasses.replace(req, num_classes=num_classes, checkpoint_source=source)
    check_overwrite(req)
    return req


def _source_of(seed: Any, checkpoint_sha: Any, depths: Any) -> str:
    what = f"checkpoint sha256 {str(checkpoint_sha)[:12]}" if checkpoint_sha else f"random weights seed {seed}"
    return what + (f", depths {tuple(depths)}" if depths else "")


def check_overwrite(req: ExportRequest) -> None:
    """Refuse to replace an artifact of the same name that holds other weights, unless ``req.force``.

    An export of the same weights (same seed, or same checkpoint bytes, same depths) replaces the old one;
    a file of that name without a manifest is not ours and is never replaced without ``--force``.
    """
    if req.force:
        return
    from ..artifact import manifest_path, read_manifest

    paths = [req.output_path()] + ([req.output_path(suffix=".onnx")] if req.target == "trt" else [])
    new = _source_of(None if req.checkpoint else req.seed, req.checkpoint_sha256, req.depths)
    for path in paths:
        if not (path.exists() or path.is_symlink()):
            continue
        raw = read_manifest(path)
        if raw is None:
            raise BadInput(f"{path} exists but has no readable manifest ({manifest_path(path).name}), so it is not an "
                           "export to replace: move it away, pass --force, or choose another --out")
        old = _source_of(raw.get("seed"), raw.get("checkpoint_sha256"), raw.get("depths"))
        if old != new:
            raise BadInput(f"{path} holds an export of {old}, not {new}: pass --force to replace it, "
                           "or choose another --out")


def _read_checkpoint(path: Path, variant: str) -> CheckpointSource:
    """Read and hash the checkpoint once; fail before any work when it is missing, unsafe, corrupt or of
    another variant."""
    from nextvit_model import CheckpointError, read_checkpoint

    from ..artifact import sha256_path
    from ..errors import CheckpointMismatch

    if not path.is_file():
        raise CheckpointMismatch(f"checkpoint {path} does not exist: check the path given to --checkpoint")
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointMismatch(str(exc)) from None
    if ckpt.variant is not None and ckpt.variant != variant:
        short = ckpt.variant.split("_")[1]
        raise CheckpointMismatch(f"checkpoint {path} is a {ckpt.variant} checkpoint but {variant} was requested: "
                                 f"pass --variant {short}")
    return CheckpointSource(path=path, sha256=sha256_path(path), loaded=ckpt)


def build_deploy_model(req: ExportRequest, *, progress: Progress) -> FuseResult:
    """The model every exporter starts from: the request's weights, every BatchNorm folded (a copy)."""
    from ..errors import DeployError
    from ..fuse import fuse_model
    from ..reference import build_model

    progress(f"building {req.variant} ({'checkpoint' if req.checkpoint else f'random weights, seed {req.seed}'})")
    source = req.checkpoint_source
    model = build_model(req.variant, checkpoint=source.loaded if source is not None else req.checkpoint,
                        seed=req.seed, features_only=req.features_only,
                        depths=req.depths, num_classes=req.num_classes)
    progress("folding BatchNorms (deploy form)")
    fused = fuse_model(model)
    if fused.remaining:
        raise DeployError(f"internal: {fused.remaining} BatchNorm layers survived fusion")
    return fused


def canonical_variant(name: str) -> str:
    """The canonical variant name for ``name`` (an alias such as ``s`` or ``Next-ViT-S``), or :class:`BadInput`."""
    from nextvit_model import UnknownVariantError, resolve_variant

    try:
        return resolve_variant(name).name
    except UnknownVariantError as exc:
        raise BadInput(f"{exc} (pass one to --variant)") from None


def export(req: ExportRequest, *, progress: Progress | None = None) -> Artifact:
    """Validate ``req`` and run the target's exporter. Returns the written artifact."""
    from ..targets import get_target

    req = dataclasses.replace(req, variant=canonical_variant(req.variant))  # aliases -> canonical name
    req = validate_request(req)
    exporter = load_object(get_target(req.target).exporter)
    return exporter(req, progress=progress or (lambda _msg: None))
