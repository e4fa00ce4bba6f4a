"""Core ML export: the deploy form traced with ``torch.jit.trace`` and converted to an ML Program
(``.mlpackage``) by coremltools. Conversion runs on any OS; running the package needs macOS (or the
MIL evaluator in ``backends/coreml_mil.py`` for parity on Linux).

Input kinds:

* ``"image"`` (what an iOS/macOS developer expects in Xcode, and what Vision's ``VNCoreMLRequest``
  feeds): an RGB image input whose pixels arrive as 0..255. Core ML's image preprocessing has a single
  scale and a per-channel bias, so ImageNet's per-channel *std* cannot live there. The exact
  normalisation ``(pixel / 255 - mean) / std`` is therefore baked into the traced model
  (:class:`CoreMLWrapper`), and the image input is declared with ``scale=1, bias=0``: the program
  receives the raw 0..255 pixels and normalises them itself, per channel, exactly.
* ``"tensor"``: a float32 multi-array input that expects already-normalised NCHW data (the same
  contract as the ONNX artifacts).

Inputs and outputs are float32 at the model's interface in both precisions (an fp16 program casts at
its boundaries), the batch is fixed at export time, and outputs are named ``logits`` or
``feat_s4..feat_s32`` like every other artifact. With a class-labels file the classifier becomes a Core
ML classifier: ``classLabel`` plus a score dictionary ``classLabel_probs`` that holds *probabilities*
(a softmax inside the model, since Vision hands these scores to apps as confidences), and the raw
``logits`` as a third output, which is what parity is checked on; the manifest records the mapping.

Workaround for coremltools 9.0 with torch 2.14 / numpy 2.4: a traced ``reshape(b, c, h * w)`` leaves
``aten::size -> prim::NumToTensor -> aten::mul -> aten::Int`` in the TorchScript graph, and
coremltools' ``int`` converter calls ``int()`` on a one-element array, which numpy >= 2.3 rejects
("only 0-dimensional arrays can be converted to Python scalars"). Since the exported shape is static,
:func:`freeze_traced_shapes` replaces every ``aten::size`` of the traced graph with its traced constant
and constant-folds the arithmetic away before conversion, so no ``int`` op reaches the converter.
A backbone with several enumerated input sizes (``image_sizes``) is traced unfrozen instead, where the
crash does not occur: see :mod:`.coreml_shapes`.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from .._deps import import_coremltools
from ..artifact import Artifact, tool_versions
from ..errors import BadInput, DeployError
from ..manifest import output_names_for, preprocessing_for
from . import ExportRequest, build_deploy_model
from .coreml_compress import (
    add_compression_pass,
    check_target,
    compression_for,
    compression_record,
    package_bytes,
    size_line,
)
from .coreml_shapes import check_trace_sizes, enumerated_shapes, shape_details, size_label
from .pipeline import export_stage

__all__ = ["CoreMLWrapper", "freeze_traced_shapes", "conversion_pipeline", "parse_deployment_target", "read_class_labels",
           "export_coreml", "INPUT_KINDS", "CLASSIFIER_LABEL_OUTPUT",
           "CLASSIFIER_SCORES_OUTPUT"]

INPUT_KINDS = ("tensor", "image")
CLASSIFIER_LABEL_OUTPUT = "classLabel"
CLASSIFIER_SCORES_OUTPUT = "classLabel_probs"  # coremltools names the score dictionary <label output>_probs
PROBABILITIES = "probabilities"  # the softmax the classify op reads (not a package output itself)
AUTHOR = "nextvit-deploy"
LICENSE = ("Apache-2.0 (Next-ViT architecture and nextvit-deploy); trained weights carry their checkpoint's "
           "own terms")
PREVIEW_TYPE_KEY = "com.apple.coreml.model.preview.type"  # Xcode's model preview: an image classifier


@contextlib.contextmanager
def _quiet_conversion() -> Iterator[None]:
    """Keep coremltools' progress bars (tqdm, on stderr) and its torch-version warning off the console
    during a conversion; exceptions still propagate unchanged."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


class CoreMLWrapper(nn.Module):
    """What gets traced: optional exact ImageNet normalisation, then the deploy-form model.

    Args:
        model: the fused Next-ViT (classifier or backbone).
        image_input: the input carries RGB pixels in 0..255; normalise them inside the model as
            ``pixel * (1 / (255 * std)) + (-mean / std)``, which equals ``(pixel / 255 - mean) / std``.
        mean: per-channel mean in [0, 1] units. Defaults to none (required with ``image_input``).
        std: per-channel std in [0, 1] units. Defaults to none (required with ``image_input``).
        probabilities: a classifier returns ``(softmax(logits), logits)`` (what a Core ML classifier
            declares as probabilities, plus the raw logits for parity). Defaults to False (logits only).

    Backbone outputs (a list) are returned as a tuple so tracing names four outputs.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, model: nn.Module, *, image_input: bool, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, probabilities: bool = False):
        super().__init__()
        self.model = model
        self.image_input = image_input
        self.probabilities = probabilities
        if image_input:
            if mean is None or std is None:
                raise ValueError("image_input needs mean and std")
            m = torch.tensor(mean, dtype=torch.float64)
            s = torch.tensor(std, dtype=torch.float64)
            self.register_buffer("scale", (1.0 / (255.0 * s)).float().reshape(1, -1, 1, 1))
            self.register_buffer("shift", (-m / s).float().reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor):
        if self.image_input:
            x = x * self.scale + self.shift
        out = self.model(x)
        if self.probabilities:
            return torch.softmax(out, dim=-1), out
        return tuple(out) if isinstance(out, (list, tuple)) else out


@torch.no_grad()
def freeze_traced_shapes(traced: torch.jit.ScriptModule) -> int:
    """Replace every ``aten::size`` in a traced module's (inlined) graph by the size seen while tracing.

    Only valid for static shapes (the Core ML export fixes batch and image size). Returns how many
    size queries were replaced. See the module docstring for why (coremltools' ``int`` converter).
    """
    graph: Any = traced.graph  # torch._C.Graph: its stubs lack findAllNodes/insertConstant
    torch._C._jit_pass_inline(graph)
    replaced = 0
    for node in list(graph.findAllNodes("aten::size")):
        ttype = node.inputsAt(0).type()
        sizes = ttype.sizes() if isinstance(ttype, torch._C.TensorType) else None
        args = list(node.inputs())
        dim = args[1].toIValue() if len(args) > 1 else None
        if sizes is None or dim is None or sizes[dim] is None:
            continue  # leave it: the converter will say what it cannot handle
        with graph.insert_point_guard(node):
            const = graph.insertConstant(int(sizes[dim]))
        node.output().replaceAllUsesWith(const)
        node.destroy()
        replaced += 1
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_dce(graph)
    return replaced


def conversion_pipeline(ct):
    """coremltools' default pass pipeline minus ``fuse_elementwise_to_batchnorm``.

    That pass rewrites a per-channel ``x * gamma + beta`` (our image normalisation and the backbone's
    folded output norms) into ``batch_norm(mean=0, variance=1, epsilon=1e-5)``, which computes
    ``x * gamma / sqrt(1 + 1e-5) + beta``: every value shrinks by 5e-6 relative, enough to move
    Next-ViT-S feature maps by ~3e-4 and fail the fp32 gate (max abs 1e-4). Without it the program
    keeps the exact ``mul`` + ``add``.
    """
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(["common::fuse_elementwise_to_batchnorm"])
    return pipeline


_CLASSIFIER_PASS = "nextvit::drop_declared_output_types"


def classifier_pipeline(ct):
    """:func:`conversion_pipeline` plus a last pass that forgets the declared output types.

    coremltools 9's backend indexes the declared output types by the *final* output position after it
    prepends ``classLabel``/``classLabel_probs``, so a classifier with a second tensor output (our raw
    logits) overruns the list (IndexError in ``get_func_output``). By the end of the pipeline names and
    float32 output casts are already in place, so dropping the list changes nothing else.
    """
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

    if _CLASSIFIER_PASS not in PASS_REGISTRY:
        @register_pass(namespace="nextvit")
        class drop_declared_output_types(AbstractGraphPass):  # noqa: N801 - coremltools names passes so
            def apply(self, prog):
                for func in prog.functions.values():
                    func.output_types = None

    pipeline = conversion_pipeline(ct)
    pipeline.append_pass(_CLASSIFIER_PASS)
    return pipeline


def parse_deployment_target(name: str):
    """``"iOS16"`` / ``"macos13"`` -> ``ct.target`` member; ML Programs need iOS 15 / macOS 12 or newer."""
    ct = import_coremltools()
    members = {k.lower(): v for k, v in ct.target.__members__.items()}
    key = str(name).strip().lower().replace(" ", "").replace("_", "")
    target = members.get(key)
    ok = sorted(k for k, v in ct.target.__members__.items() if v >= ct.target.iOS15)
    if target is None:
        raise BadInput(f"unknown minimum deployment target {name!r}: choose one of {', '.join(ok)} "
                       "with --min-target")
    if target < ct.target.iOS15:
        raise BadInput(f"minimum deployment target {name} is too old for an ML Program (needs iOS15/macOS12 "
                       "or newer): pass --min-target iOS16")
    return target


def read_class_labels(path: str | Path, *, num_classes: int) -> list[str]:
    """One label per line (blank lines at the end ignored); the count must equal the classifier width."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"class labels file {p} does not exist: pass a text file with one label per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise BadInput(f"class labels file {p} is not UTF-8 text: save it as UTF-8, one label per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    labels = [line.strip() for line in lines]
    if len(labels) != num_classes:
        raise BadInput(f"class labels file {p} has {len(labels)} labels but the classifier has {num_classes} "
                       f"classes: give exactly {num_classes} lines")
    empty = [i + 1 for i, lab in enumerate(labels) if not lab]
    if empty:
        raise BadInput(f"class labels file {p} has empty labels on line(s) {empty[:5]}: fill them in")
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1}) if len(set(labels)) != len(labels) else []
    if dupes:
        raise BadInput(f"class labels file {p} repeats labels {dupes[:3]}: Core ML needs unique labels")
    return labels


def _validate(req: ExportRequest) -> None:
    if req.input_kind not in INPUT_KINDS:
        raise BadInput(f"--input-kind {req.input_kind!r} is not supported: choose one of {', '.join(INPUT_KINDS)}")
    if req.dynamic_batch:
        raise BadInput(f"the coreml target exports a fixed batch, got the range {req.batch[0]}:{req.batch[2]}: "
                       "pass a single --batch N")
    if req.class_labels is not None and req.features_only:
        raise BadInput("--labels needs a classifier, but --backbone exports a backbone: drop one of them")
    if req.input_kind == "image" and req.batch[1] != 1:
        raise BadInput(f"a Core ML image input takes one image at a time, got --batch {req.batch[1]}: "
                       "pass --batch 1, or --input-kind tensor for batched input")
    if req.class_labels is not None and req.batch[1] != 1:
        raise BadInput(f"a Core ML classifier (--labels) takes one image at a time, got --batch {req.batch[1]}: "
                       "pass --batch 1 or drop --labels")


def _program_facts(prog) -> dict[str, Any]:
    """Op histogram and interface of the saved package's ML Program (``prog``: read back as coremltools would)."""
    func = prog.functions["main"]
    ops: dict[str, int] = {}
    for op in func.operations:
        ops[op.op_type] = ops.get(op.op_type, 0) + 1
    return {"op_counts": dict(sorted(ops.items())), "ops": sum(ops.values()),
            "program_outputs": [v.name for v in func.outputs]}


def _rename_output(ct, mlmodel, name: str):
    """Name a classifier's one tensor output (the logits next to classLabel/classLabel_probs) ``name``."""
    spec = mlmodel.get_spec()
    others = [o.name for o in spec.description.output
              if o.name not in (CLASSIFIER_LABEL_OUTPUT, CLASSIFIER_SCORES_OUTPUT)]
    if len(others) != 1:
        raise DeployError(f"internal: expected one logits output next to the classifier's, got {others}")
    if spec.description.output[[o.name for o in spec.description.output].index(others[0])].type.multiArrayType \
            .dataType != ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32:
        raise DeployError("internal: the classifier's logits output is not float32")
    if others[0] == name:
        return mlmodel
    ct.utils.rename_feature(spec, others[0], name)
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)


def export_coreml(req: ExportRequest, *, progress: Callable[[str], None]) -> Artifact:
    """``nextvit-deploy export --target coreml``: an ML Program package plus its manifest.

    Args:
        req: the request; uses ``precision`` (fp16|fp32 compute precision), ``image_size``, ``batch``
            (fixed), ``input_kind`` (``"tensor"`` or ``"image"``), ``min_deployment_target`` (defaults to
            ``"iOS16"``), ``class_labels`` (optional file, classifier only), ``features_only``,
            ``calib_dir``/``calib_images``/``calibrate_fp16`` (fp16: the overflow guard of :mod:`.coreml_fp16`),
            ``checkpoint``/``seed``/``depths``.
        progress: callback for step messages.

    Returns:
        The artifact (``<name>.mlpackage`` with ``<name>.mlpackage.manifest.json``, written last).

    Raises:
        BadInput: an option the coreml target cannot honour (the message names the fix).
        MissingDependency: coremltools is not installed.
    """
    _validate(req)
    ct = import_coremltools()
    target = parse_deployment_target(req.min_deployment_target)
    compression = compression_for(req)  # int8: int8 weights on an fp16 program (export/coreml_compress.py)
    check_target(ct, target, compression)
    compute = compression.compute_precision if compression is not None else req.precision
    precision = {"fp16": ct.precision.FLOAT16, "fp32": ct.precision.FLOAT32}.get(compute)
    if precision is None:
        raise BadInput(f"precision {req.precision} is not supported for target coreml: choose fp16, fp32 or int8")

    fused = build_deploy_model(req, progress=progress)
    labels = None
    if req.class_labels is not None:
        net: Any = fused.model  # a NextViT classifier (mypy sees nn.Module attributes as Tensor | Module)
        labels = read_class_labels(req.class_labels, num_classes=net.head.fc.out_features)
    pre = preprocessing_for(req.variant, input_kind=req.input_kind)
    image_input = req.input_kind == "image"
    wrapper = CoreMLWrapper(fused.model, image_input=image_input, mean=pre["mean"], std=pre["std"],
                            probabilities=labels is not None).eval()

    h, w = req.image_size
    shape = (req.batch[1], 3, h, w)
    progress(f"tracing with torch.jit.trace at {'x'.join(map(str, shape))}")
    example = torch.rand(shape) * 255.0 if image_input else torch.randn(shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    sizes = req.image_sizes
    flexible = {}
    if sizes:  # enumerated sizes: symbolic sizes, nothing to freeze (coreml_shapes.py says why it converts)
        sizes_frozen = 0
        flexible = shape_details(sizes, check_trace_sizes(wrapper, traced, sizes, batch=req.batch[1],
                                                          image_input=image_input, progress=progress))
    else:
        sizes_frozen = freeze_traced_shapes(traced)
    with torch.no_grad():
        want, got = wrapper(example), traced(example)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    drift = max(float((a - b).abs().max() / a.abs().max().clamp_min(1.0)) for a, b in zip(want, got))
    if drift > 1e-5:
        raise DeployError(f"internal: the shape-frozen trace differs from the model by {drift:.2e}")

    names = output_names_for(req.features_only)
    input_shape = enumerated_shapes(ct, sizes, req.batch[1]) if sizes else shape
    if image_input:
        ct_input = ct.ImageType(name="input", shape=input_shape, color_layout=ct.colorlayout.RGB, scale=1.0,
                                bias=[0.0, 0.0, 0.0], channel_first=True)
    else:
        ct_input = ct.TensorType(name="input", shape=input_shape, dtype=np.float32)
    classifier = None
    outputs = [ct.TensorType(name=n, dtype=np.float32) for n in names]
    if labels is not None:
        # Traced outputs: (softmax, logits); classify consumes the softmax (see classifier_pipeline).
        outputs = [ct.TensorType(name=PROBABILITIES, dtype=np.float32), *outputs]
        classifier = ct.ClassifierConfig(labels, predicted_feature_name=CLASSIFIER_LABEL_OUTPUT,
                                         predicted_probabilities_output=PROBABILITIES)
    make_pipeline = conversion_pipeline if labels is None else classifier_pipeline

    def convert(to: str, compute_precision, pipeline=None):
        with _quiet_conversion():
            return ct.convert(traced, source="pytorch", inputs=[ct_input], outputs=outputs,
                              classifier_config=classifier, convert_to=to, compute_precision=compute_precision,
                              minimum_deployment_target=target, skip_model_load=True,
                              pass_pipeline=pipeline if pipeline is not None else make_pipeline(ct))

    guard = None
    if compute == "fp16":  # the FP16 overflow guard: ops kept in fp32 (export/coreml_fp16.py)
        from .coreml_fp16 import plan_coreml_fp16

        guard = plan_coreml_fp16(req, lambda: convert("milinternal", ct.precision.FLOAT32), progress=progress)
        precision = guard.compute_precision(ct)
    progress(f"converting to an ML Program ({compute}, minimum target {target.name})")
    started = time.perf_counter()
    mlmodel, dense = convert("mlprogram", precision), None
    if compression is not None:  # converted again with the compression pass: the dense one gives the size before
        progress(f"converting with {compression.bits}-bit {compression.mode} weights ({compression.granularity})")
        dense, mlmodel = mlmodel, convert("mlprogram", precision, add_compression_pass(ct, make_pipeline(ct), compression))
    convert_s = time.perf_counter() - started
    if labels is not None:
        mlmodel = _rename_output(ct, mlmodel, names[0])

    versions = tool_versions("coremltools")
    mlmodel.author = AUTHOR
    kind = "classifier" if not req.features_only else "backbone (feat_s4..feat_s32)"
    takes = ("RGB image input 0..255 (ImageNet normalisation inside)" if image_input
             else "normalised float32 NCHW input")
    size_text = f"sizes {size_label(sizes).replace('+', ', ')}" if sizes else f"{h}x{w}"
    label = req.precision if compression is None else (
        f"{compression.bits}-bit {'int' if compression.mode == 'linear_symmetric' else 'palettized'} weights, "
        f"{compression.compute_precision} compute")
    mlmodel.short_description = f"Next-ViT {req.variant} {kind}, {label}, {size_text}, {takes}"
    model_version = f"{req.variant}@" + (f"sha256:{req.checkpoint_sha256[:12]}" if req.checkpoint_sha256
                                         else f"random-seed{req.seed}")
    mlmodel.version = model_version  # the model's version (weights); the exporter's is nextvit.exporter_version
    mlmodel.license = LICENSE
    meta = mlmodel.user_defined_metadata
    meta["nextvit.variant"] = req.variant
    meta["nextvit.precision"] = req.precision
    if compression is not None:
        meta["nextvit.weight_compression"] = f"{compression.mode} {compression.bits}-bit {compression.granularity}"
    meta["nextvit.preprocessing"] = json.dumps(pre, sort_keys=True)
    meta["nextvit.checkpoint_sha256"] = req.checkpoint_sha256 or f"none (random weights, seed {req.seed})"
    meta["nextvit.toolchain"] = json.dumps(versions, sort_keys=True)
    meta["nextvit.features_only"] = str(bool(req.features_only)).lower()
    meta["nextvit.exporter_version"] = __version__
    if labels is not None:
        meta[PREVIEW_TYPE_KEY] = "imageClassifier"
    any_of = size_label(sizes).replace("+", " or ") if sizes else ""  # HEIGHTxWIDTH each
    dims = f"{req.batch[1]}x3x({any_of})" if sizes else "x".join(map(str, shape))
    mlmodel.input_description["input"] = (
        f"RGB image {f'(HxW) {any_of}' if sizes else f'{w}x{h}'}, pixels 0..255 (normalised inside with ImageNet "
        "mean/std)" if image_input
        else f"float32 {dims} NCHW, normalised: (pixel/255 - mean) / std, "
             f"mean={pre['mean']}, std={pre['std']}")
    if labels is not None:
        mlmodel.output_description[CLASSIFIER_LABEL_OUTPUT] = "most likely class label"
        mlmodel.output_description[CLASSIFIER_SCORES_OUTPUT] = "probability per class label (softmax; sums to 1)"
        mlmodel.output_description[names[0]] = "raw class logits (before the softmax), for parity checks"
    else:
        for n, red in zip(names, (4, 8, 16, 32)):
            mlmodel.output_description[n] = ("class logits (no softmax)" if n == "logits"
                                              else f"stage feature map, stride {red}")

    final = req.output_path()
    output_map = {n: n for n in names}  # a classifier's logits are a program output of their own
    with export_stage(req, final, kind="dir") as stage:
        tmp = stage.path
        progress(f"saving {final.name}")
        # coremltools insists on the .mlpackage suffix: save into a staging folder, then move into place.
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.stem}-") as staging:
            staged = Path(staging) / final.name
            mlmodel.save(str(staged))
            os.replace(staged, tmp)
            if dense is not None:
                dense.save(str(Path(staging) / f"dense-{final.name}"))
                dense_bytes = package_bytes(Path(staging) / f"dense-{final.name}")
        from ..backends.coreml_mil import load_program

        saved = load_program(tmp)  # read back once: the facts and the fp16 guard's check both use it
        facts = _program_facts(saved)
        if guard is not None:
            facts["precision_transform"] = guard.details(saved, progress=progress)
        squeezed = None if dense is None or compression is None else compression_record(
            compression, dense_bytes=dense_bytes, compressed_bytes=package_bytes(tmp), op_counts=facts["op_counts"])
        if squeezed is not None:
            progress(size_line(squeezed))
        details = {
            "convert_to": "mlprogram",
            "compute_precision": compute,
            "weight_compression": squeezed,
            "minimum_deployment_target": target.name,
            "input_kind": req.input_kind,
            "coreml_input": "ImageType RGB scale=1 bias=0" if image_input else "TensorType float32",
            "output_map": output_map,  # artifact output name -> Core ML output name
            "class_labels": labels,
            "classifier_scores": ({"output": CLASSIFIER_SCORES_OUTPUT, "kind": "softmax probabilities",
                                   "label_output": CLASSIFIER_LABEL_OUTPUT, "parity_output": names[0]}
                                  if labels is not None else None),
            "fused_batchnorms": fused.folded,
            "traced_sizes_frozen": sizes_frozen,
            **flexible,
            "converter": "torch.jit.trace + coremltools.convert",
            "removed_passes": ["common::fuse_elementwise_to_batchnorm"],
            "convert_seconds": round(convert_s, 1),
            "metadata": {"author": AUTHOR, "version": model_version, "exporter_version": __version__,
                         "license": LICENSE, "short_description": mlmodel.short_description,
                         **({PREVIEW_TYPE_KEY: "imageClassifier"} if labels is not None else {})},
            **facts,
        }
        return stage.publish(details, target="coreml", extra_versions=("coremltools",), opset=None)

