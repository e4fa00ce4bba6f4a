"""``nextvit-deploy export``: write an artifact (and its manifest) for a target and precision."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import BadInput, DeployError
from ._common import (
    DEFAULT_PRECISION,
    DEFAULT_TARGET,
    BatchOpt,
    CheckpointOpt,
    ImageSizeOpt,
    JsonOpt,
    PrecisionName,
    TargetName,
    VariantOpt,
    err,
    handle_errors,
    out,
    progress_status,
)

EXAMPLES = """
Examples:

  nextvit-deploy export --target onnx --batch 1:8            # dynamic-batch fp32 ONNX of Next-ViT-S

  nextvit-deploy export --target trt --precision fp16 --batch 8

  nextvit-deploy export --target trt --precision int8 --calib-dir images/ --calib-images 256

  nextvit-deploy export --target trt --precision int8 --calib-method entropy --int8-float fp32

  nextvit-deploy export --target coreml --precision fp16 --input-kind image

  nextvit-deploy export --target coreml --backbone --image-sizes 512x512,640x640,800x1216

  nextvit-deploy export --target coreml --precision fp16 --calib-dir images/   # FP16 overflow guard, measured

  nextvit-deploy export --target coreml --precision int8              # int8 weights, fp16 compute

  nextvit-deploy export --target coreml --precision fp16 --palettize-bits 6
"""


# Options that only some targets/precisions use: given by the user for another one, they are an error
# (naming the option and the target), not silently ignored. Keyed by the parameter name of export_cmd.
TARGET_ONLY: dict[str, tuple[str, tuple[str, ...]]] = {
    "opset": ("--opset", ("onnx", "trt")),
    "simplify": ("--simplify/--no-simplify", ("onnx", "trt")),
    "workspace_gb": ("--workspace-gb", ("trt",)),
    "timing_cache": ("--timing-cache", ("trt",)),
    "opt_level": ("--opt-level", ("trt",)),
    "device": ("--device", ("trt",)),
    "min_target": ("--min-target", ("coreml",)),
    "labels": ("--labels", ("coreml",)),
    "image_sizes": ("--image-sizes", ("coreml",)),
    "palettize_bits": ("--palettize-bits", ("coreml",)),
}
CALIBRATION_ONLY: dict[str, str] = {"calib_dir": "--calib-dir", "calib_images": "--calib-images"}
# TensorRT-convention INT8 options (export/int8.py Int8Options).
TRT_INT8_ONLY: dict[str, str] = {"calib_method": "--calib-method", "int8_float": "--int8-float",
                                 "quantize_attention": "--quantize-attention/--no-quantize-attention",
                                 "residual_qdq": "--residual-qdq/--no-residual-qdq"}


def given(ctx: typer.Context, name: str) -> bool:
    """True when the user set parameter ``name`` (command line or environment), not its default."""
    src = ctx.get_parameter_source(name)
    return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")


def check_applicable(ctx: typer.Context, *, target: str, precision: str, checkpoint: Path | None) -> None:
    """Refuse options that do not apply to ``target``/``precision`` (one line naming both)."""
    for name, (flag, targets) in TARGET_ONLY.items():
        if given(ctx, name) and target not in targets:
            raise BadInput(f"{flag} applies only to --target {'/'.join(targets)}, not {target}: drop {flag}")
    for name, flag in CALIBRATION_ONLY.items():
        if given(ctx, name) and (precision == "fp32" or (target == "coreml" and precision != "fp16")):
            raise BadInput(f"{flag} applies only to --precision fp16/int8 with --target onnx/trt or --precision "
                           f"fp16 with --target coreml, not {precision} {target}: drop {flag}")
    for name, flag in TRT_INT8_ONLY.items():
        if given(ctx, name) and (target, precision) != ("trt", "int8"):
            raise BadInput(f"{flag} applies only to --target trt --precision int8, not {precision} {target}: "
                           f"drop {flag}")
    if given(ctx, "int8_weight_bits") and (target, precision) != ("onnx", "int8"):
        raise BadInput(f"--int8-weight-bits applies only to --target onnx --precision int8, not {precision} {target}: "
                       "drop --int8-weight-bits")
    if given(ctx, "image_sizes") and given(ctx, "image_size"):
        raise BadInput("--image-size and --image-sizes both set the input size: drop --image-size (the first of "
                       "--image-sizes is the default size)")
    if given(ctx, "seed") and checkpoint is not None:
        raise BadInput("--seed applies only to random weights, not with --checkpoint: drop --seed")


@handle_errors
def export_cmd(
    ctx: typer.Context,
    target: Annotated[TargetName, typer.Option("--target", "-t", help="Where the model will run.")] = DEFAULT_TARGET,
    precision: Annotated[PrecisionName, typer.Option("--precision", "-p", help="Numeric precision.")] = DEFAULT_PRECISION,
    variant: VariantOpt = "nextvit_small",
    image_size: ImageSizeOpt = "224",
    batch: BatchOpt = "1",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("build"),
    checkpoint: CheckpointOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights when no checkpoint is given.")] = 0,
    backbone: Annotated[bool, typer.Option("--backbone", help="Export the 4 stage feature maps, not logits.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    simplify: Annotated[bool, typer.Option(help="Simplify the ONNX graph (onnxsim, else onnxslim).")] = True,
    calib_dir: Annotated[Path | None, typer.Option(
        help="FP16/INT8: folder of calibration images (default: bundled photos that verify does not use).")] = None,
    calib_images: Annotated[int, typer.Option(
        help="FP16/INT8: use at most this many calibration images. With --target coreml --precision fp16, "
             "either flag makes the overflow guard measure activation ranges.")] = 64,
    calib_method: Annotated[str, typer.Option(help="INT8 (trt): activation calibration: max, entropy or percentile.")]
    = "max",
    int8_float: Annotated[str, typer.Option(help="INT8 (trt): type of the unquantized regions: fp16 (opset >= 19) "
                                                 "or fp32.")] = "fp16",
    quantize_attention: Annotated[bool, typer.Option(help="INT8 (trt): also quantize attention's MatMul -> Softmax "
                                                          "-> MatMul.")] = False,
    residual_qdq: Annotated[bool, typer.Option(help="INT8 (trt): Q/DQ on the skip input of residual Conv + Add.")]
    = True,
    int8_weight_bits: Annotated[int | None, typer.Option(
        help="INT8 (onnx): weight bits, 8 (CPUs with VNNI/AMX) or 7 (without). Default: what this CPU has.")] = None,
    device: Annotated[str, typer.Option(help="TensorRT: GPU that builds the engine (cuda:N).")] = "cuda:0",
    workspace_gb: Annotated[float, typer.Option(help="TensorRT: builder workspace limit (GiB).")] = 4.0,
    timing_cache: Annotated[Path | None, typer.Option(help="TensorRT: timing cache file to load/save.")] = None,
    opt_level: Annotated[int, typer.Option(help="TensorRT: builder optimization level 0-5.")] = 3,
    min_target: Annotated[str, typer.Option(help="Core ML: minimum deployment target (iOS16, macOS13, ...).")] = "iOS16",
    input_kind: Annotated[str, typer.Option(help="Core ML: 'tensor' (normalised) or 'image' (RGB 0..255).")] = "tensor",
    labels: Annotated[Path | None, typer.Option(help="Core ML: class labels file, one per line.")] = None,
    image_sizes: Annotated[str | None, typer.Option(
        help="Core ML --backbone: several input sizes in one package (EnumeratedShapes), HEIGHTxWIDTH multiples of 32 "
             "separated by commas, e.g. 512x512,640x640,800x1216; the first is the default.")] = None,
    palettize_bits: Annotated[int | None, typer.Option(
        help="Core ML: store the weights as a 4-, 6- or 8-bit lookup table (k-means), with --precision fp16/fp32.")]
    = None,
    json_path: JsonOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing artifact of the same name that holds other weights.")] = False,
) -> None:
    """Export Next-ViT to ONNX, a TensorRT engine or a Core ML package, with a manifest next to it."""
    from ..artifact import check_output_file

    check_applicable(ctx, target=target.value, precision=precision.value, checkpoint=checkpoint)
    if int8_weight_bits not in (None, 7, 8):
        raise BadInput(f"--int8-weight-bits must be 7 or 8, got {int8_weight_bits}")
    if input_kind not in ("tensor", "image"):
        raise BadInput(f"--input-kind must be 'tensor' or 'image', got {input_kind!r}")
    if json_path is not None:
        check_output_file(json_path)
    from ..export import ExportRequest, canonical_variant, export, parse_batch, parse_image_size
    from ..report import artifact_table, write_json

    sizes = None
    if image_sizes is not None:
        from ..export.coreml_shapes import parse_image_sizes

        if not backbone:
            raise BadInput("--image-sizes needs --backbone (several sizes are for feature maps; a classifier takes "
                           "one): add --backbone or pass one --image-size")
        sizes = parse_image_sizes(image_sizes)
    canonical = canonical_variant(variant)
    req = ExportRequest(
        target=target.value, precision=precision.value, variant=canonical,
        image_size=sizes[0] if sizes else parse_image_size(image_size), image_sizes=sizes,
        batch=parse_batch(batch), opset=opset, out_dir=out_dir, checkpoint=checkpoint, seed=seed,
        features_only=backbone, simplify=simplify, calib_dir=calib_dir, calib_images=calib_images,
        workspace_gb=workspace_gb, timing_cache=timing_cache, builder_opt_level=opt_level,
        min_deployment_target=min_target, input_kind=input_kind, class_labels=labels, calib_method=calib_method,
        int8_high_precision=int8_float, int8_attention=quantize_attention, int8_residual=residual_qdq, device=device,
        int8_weight_bits=int8_weight_bits, palettize_bits=palettize_bits, force=force,
        calibrate_fp16=target.value == "coreml" and any(given(ctx, name) for name in CALIBRATION_ONLY))
    with progress_status(f"exporting {canonical} to {req.target} ({req.precision})") as say:
        try:
            art = export(req, progress=say)
        except DeployError as exc:
            partial = getattr(exc, "artifact", None)  # e.g. the TensorRT-ready ONNX when TensorRT is missing
            if partial is not None:
                out.print(artifact_table(partial))
                if partial.details.get("trtexec"):
                    out.print("equivalent trtexec command:\n  " + escape(partial.details["trtexec"]),
                          highlight=False, soft_wrap=True)
            raise
    out.print(artifact_table(art))
    if art.details.get("weight_compression"):
        from ..export.coreml_compress import size_line

        out.print(size_line(art.details["weight_compression"]), highlight=False)
    if json_path:
        write_json(json_path, art.to_dict())
        err.print(f"wrote {json_path}")
