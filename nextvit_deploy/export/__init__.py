"""Exporters. ``export(request)`` validates a request, dispatches to the target's exporter through
``TARGETS`` and returns the :class:`~nextvit_deploy.artifact.Artifact` it wrote."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..artifact import Artifact, check_writable_dir
from ..errors import BadInput
from ..targets import artifact_name, check_precision, load_object

if TYPE_CHECKING:
    from ..fuse import FuseResult

__all__ = ["ExportRequest", "export", "build_deploy_model", "parse_batch", "parse_image_size"]

# progress(message) callback: exporters report long steps through it (the CLI shows a spinner/bar).
Progress = Callable[[str], None]


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
    checkpoint: Optional[Path] = None
    seed: int = 0  # random weights (with realistic BatchNorm statistics) when there is no checkpoint
    features_only: bool = False
    simplify: bool = True
    depths: Optional[tuple[int, int, int, int]] = None  # small test models only
    # INT8 calibration (trt int8, onnx int8)
    calib_dir: Optional[Path] = None
    calib_images: int = 64
    # TensorRT builder
    workspace_gb: float = 4.0
    timing_cache: Optional[Path] = None
    builder_opt_level: int = 3
    # Core ML
    min_deployment_target: str = "iOS16"
    input_kind: str = "tensor"  # "tensor" (normalised float input) or "image" (RGB 0..255)
    class_labels: Optional[Path] = None
    extra: dict[str, Any] = field(default_factory=dict)
    # INT8, TensorRT convention (see export/int8.py Int8Options)
    calib_method: str = "max"
    int8_attention: bool = False  # also quantize MatMul -> Softmax -> MatMul
    int8_residual: bool = True  # Q/DQ on the skip input of Conv + Add
    int8_high_precision: str = "fp16"  # type of the unquantized regions: fp16 (opset >= 19) or fp32
    device: str = "cuda:0"  # TensorRT: the GPU that builds (and runs) the engine

    @property
    def dynamic_batch(self) -> bool:
        return self.batch[0] != self.batch[2]

    def int8_options(self):
        """The TensorRT-convention INT8 options of this request."""
        from .int8 import Int8Options

        return Int8Options(method=self.calib_method, residual=self.int8_residual, attention=self.int8_attention,
                           high_precision=self.int8_high_precision)  # type: ignore[arg-type]

    @property
    def effective_opset(self) -> int:
        """The opset the graph is exported at: TensorRT INT8 with fp16 regions needs fp16 Q/DQ scales,
        which need opset 19, so a lower ``opset`` is raised to 19 there (the manifest records it)."""
        from .int8 import FP16_SCALE_OPSET

        if self.target == "trt" and self.precision == "int8" and self.int8_high_precision == "fp16":
            return max(self.opset, FP16_SCALE_OPSET)
        return self.opset

    def output_path(self, suffix: Optional[str] = None) -> Path:
        h, w = self.image_size
        return self.out_dir / artifact_name(self.variant, self.target, self.precision, h, w,
                                            features_only=self.features_only, suffix=suffix)


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


def parse_image_size(text: str | int) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"256x320"`` -> (256, 320) (height x width)."""
    s = str(text).lower().replace(",", "x")
    try:
        parts = [int(p) for p in s.split("x")]
    except ValueError:
        raise BadInput(f"--image-size {text!r} is not a size: use 224 or HEIGHTxWIDTH such as 256x320") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise BadInput(f"--image-size {text!r} is not a size: use 224 or HEIGHTxWIDTH such as 256x320")
    return parts[0], parts[1]


def validate_request(req: ExportRequest) -> None:
    """Check everything that can be checked before work starts (one-line errors naming the fix)."""
    from nextvit_model import InputSizeError, check_input_size, resolve_variant

    check_precision(req.target, req.precision)
    cfg = resolve_variant(req.variant)
    if min(req.batch) <= 0:
        raise BadInput(f"--batch must be at least 1, got {req.batch}")
    if req.calib_images < 1:
        raise BadInput(f"--calib-images must be at least 1, got {req.calib_images}")
    from .int8 import CALIBRATION_METHODS

    if req.calib_method not in CALIBRATION_METHODS:
        raise BadInput(f"--calib-method {req.calib_method!r} is unknown: choose {', '.join(CALIBRATION_METHODS)}")
    if req.int8_high_precision not in ("fp16", "fp32"):
        raise BadInput(f"--int8-float {req.int8_high_precision!r} is unknown: choose fp16 or fp32")
    if req.target == "trt":
        from ..backends.tensorrt import cuda_index

        cuda_index(req.device)
    try:
        check_input_size(*req.image_size, cfg.sr_ratios)
    except InputSizeError as exc:
        raise BadInput(f"{exc} (pass --image-size)") from None
    if req.checkpoint is not None:
        _check_checkpoint(Path(req.checkpoint), cfg.name)
    check_writable_dir(req.out_dir)


def _check_checkpoint(path: Path, variant: str) -> None:
    """Fail before any work when the checkpoint is missing, unsafe, corrupt or of another variant."""
    from nextvit_model import CheckpointError, read_checkpoint

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


def build_deploy_model(req: ExportRequest, *, progress: Progress) -> "FuseResult":
    """The model every exporter starts from: the request's weights, every BatchNorm folded (a copy)."""
    from ..errors import DeployError
    from ..fuse import fuse_model
    from ..reference import build_model

    progress(f"building {req.variant} ({'checkpoint' if req.checkpoint else f'random weights, seed {req.seed}'})")
    model = build_model(req.variant, checkpoint=req.checkpoint, seed=req.seed, features_only=req.features_only,
                        depths=req.depths)
    progress("folding BatchNorms (deploy form)")
    fused = fuse_model(model)
    if fused.remaining:
        raise DeployError(f"internal: {fused.remaining} BatchNorm layers survived fusion")
    return fused


def export(req: ExportRequest, *, progress: Optional[Progress] = None) -> Artifact:
    """Validate ``req`` and run the target's exporter. Returns the written artifact."""
    from ..targets import get_target

    from nextvit_model import resolve_variant

    try:
        req = dataclasses.replace(req, variant=resolve_variant(req.variant).name)  # aliases -> canonical name
    except KeyError as exc:
        raise BadInput(exc.args[0]) from None
    validate_request(req)
    exporter = load_object(get_target(req.target).exporter)
    return exporter(req, progress=progress or (lambda _msg: None))
