"""A Triton model repository for exported artifacts (``nextvit-deploy triton-repo``).

Layout, one folder per artifact (Triton's standard repository)::

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.onnx                  (platform onnxruntime_onnx)   or  model.plan (tensorrt_plan)
    REPO/<name>/1/model.onnx.manifest.json    the artifact's manifest, so the copy is itself an artifact
    REPO/<name>_preprocess/, REPO/<name>_image/   with ``image_input``: Python-backend preprocessing of
                                                  encoded image bytes, and the ensemble preprocess -> model

Batching follows the manifest:

* dynamic batch ``(min, opt, max)`` with ``min == 1``: ``max_batch_size: max``, dims without the batch
  axis, and ``dynamic_batching`` with preferred sizes inside the range (``opt`` and ``max``).
* dynamic batch with ``min > 1``: refused. Triton's batcher can always form a batch of 1, which such a
  model rejects; re-export with ``--batch 1:MAX``.
* static batch ``B``: ``max_batch_size: 0`` and full dims ``[B, 3, H, W]``, no dynamic batcher (Triton
  cannot pad a batch to a fixed size; every request must carry exactly ``B`` images).

Configs are written as protobuf text by hand (no tritonclient needed); the tests parse every one with
Triton's own ``model_config.proto`` messages. The repository is written atomically: everything goes
to a temporary folder beside ``REPO`` and is renamed into place, and an existing model folder is never
replaced or deleted.
"""
from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..artifact import Artifact, check_writable_dir
from ..errors import BadInput

__all__ = ["TensorIO", "ModelIO", "RepoOptions", "model_io", "model_name_for", "render_config",
           "preferred_batch_sizes", "write_repository", "REPO_PLATFORMS"]

# artifact file suffix -> (Triton platform, file name Triton expects in the version folder)
REPO_PLATFORMS: dict[str, tuple[str, str]] = {
    ".onnx": ("onnxruntime_onnx", "model.onnx"),
    ".engine": ("tensorrt_plan", "model.plan"),
    ".plan": ("tensorrt_plan", "model.plan"),
}

# ONNX TensorProto element type -> Triton data type
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 2: "TYPE_UINT8", 3: "TYPE_INT8",
                   6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 16: "TYPE_BF16"}
_NAME_RE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class TensorIO:
    """One model input or output: name, Triton data type and full shape (``-1`` = dynamic)."""

    name: str
    data_type: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelIO:
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]


@dataclass(frozen=True)
class RepoOptions:
    """Options of the generated configs.

    Attributes:
        instances: model instances per device (``instance_group.count``). Defaults to 1.
        kind: ``"gpu"`` (KIND_GPU, the Triton container on a GPU machine) or ``"cpu"`` (KIND_CPU; ONNX only).
        max_queue_delay_us: how long the dynamic batcher may hold a request to fill a batch (microseconds).
        dynamic_batching: add ``dynamic_batching`` for dynamic-batch artifacts. Defaults to True.
        preferred_batch_sizes: override the preferred sizes (each inside the artifact's batch range).
        image_input: also write ``<name>_preprocess`` (Python backend: encoded image bytes -> the normalised
            tensor, the same code as ``verify``) and the ensemble ``<name>_image`` (preprocess -> model).
    """

    instances: int = 1
    kind: Literal["gpu", "cpu"] = "gpu"
    max_queue_delay_us: int = 100
    dynamic_batching: bool = True
    preferred_batch_sizes: tuple[int, ...] | None = None
    image_input: bool = False


def model_name_for(artifact: Artifact) -> str:
    """Triton model name from the artifact's file name: ``nextvit_small-onnx-fp32-224``."""
    stem = artifact.path.name
    for suffix in REPO_PLATFORMS:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return _NAME_RE.sub("_", stem)


def _platform(artifact: Artifact) -> tuple[str, str]:
    suffix = artifact.path.suffix
    if suffix not in REPO_PLATFORMS:
        raise BadInput(f"{artifact.path.name}: Triton serves ONNX (.onnx) and TensorRT (.engine) artifacts, not "
                       f"{suffix or 'folders'}: export with --target onnx or --target trt")
    return REPO_PLATFORMS[suffix]


def _onnx_io(path: Path) -> ModelIO:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    init = {i.name for i in graph.initializer}

    def conv(values) -> tuple[TensorIO, ...]:
        out = []
        for v in values:
            if v.name in init:
                continue
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append(TensorIO(v.name, _ONNX_TO_TRITON.get(t.elem_type, "TYPE_FP32"), dims))
        return tuple(out)

    return ModelIO(conv(graph.input), conv(graph.output))


def model_io(artifact: Artifact) -> ModelIO:
    """Inputs and outputs with full shapes (batch axis first).

    An ONNX artifact is read from its graph. An engine is read from the TensorRT-ready ONNX it was built
    from when that file sits beside it (``details["onnx"]``); otherwise a classifier engine is described
    from the manifest (float32 ``input``, ``[N, num_classes]`` logits).
    """
    lo, _, hi = artifact.batch
    batch_dim = -1 if artifact.dynamic_batch else artifact.batch[0]
    source: Path | None = artifact.path
    if artifact.path.suffix != ".onnx":
        beside = artifact.details.get("onnx")
        source = artifact.path.with_name(beside) if beside else None
        if source is None or not source.is_file():
            if artifact.features_only:
                raise BadInput(f"{artifact.path.name}: the output shapes of a backbone engine are read from the "
                               f"ONNX it was built from ({beside or 'details.onnx'}); keep that file beside the engine")
            _, c, h, w = artifact.input_shape
            return ModelIO((TensorIO(artifact.input_name, "TYPE_FP32", (batch_dim, c, h, w)),),
                           tuple(TensorIO(n, "TYPE_FP32", (batch_dim, artifact.num_classes))
                                 for n in artifact.output_names))
    assert source is not None  # an engine without its ONNX returned above
    io = _onnx_io(source)

    def fix(t: TensorIO) -> TensorIO:  # the batch axis follows the manifest, other dims stay as in the graph
        return TensorIO(t.name, t.data_type, (batch_dim, *t.shape[1:]))

    return ModelIO(tuple(fix(t) for t in io.inputs), tuple(fix(t) for t in io.outputs))


def preferred_batch_sizes(batch: tuple[int, int, int], override: Sequence[int] | None = None) -> tuple[int, ...]:
    """Preferred sizes for the dynamic batcher: ``opt`` and ``max`` (those above 1), or ``override``."""
    lo, opt, hi = batch
    if override:
        bad = [b for b in override if not lo <= b <= hi]
        if bad:
            raise BadInput(f"--preferred-batch {','.join(map(str, bad))} is outside the artifact's batch range "
                           f"{lo}..{hi}: choose sizes inside it")
        return tuple(sorted(set(override)))
    return tuple(sorted({b for b in (opt, hi) if b > 1})) or (hi,)


def _dims(shape: Sequence[int]) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def _tensor_block(tensors: Sequence[TensorIO], *, drop_batch: bool) -> str:
    items = []
    for t in tensors:
        dims = t.shape[1:] if drop_batch else t.shape
        items.append(f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: {_dims(dims)}\n  }}')
    return "[\n" + ",\n".join(items) + "\n]"


def render_config(artifact: Artifact, *, name: str, options: RepoOptions = RepoOptions()) -> str:
    """``config.pbtxt`` text for ``artifact`` (see the module docstring for the batching rules)."""
    platform, _ = _platform(artifact)
    if options.instances < 1:
        raise BadInput(f"--instances must be at least 1, got {options.instances}")
    if options.max_queue_delay_us < 0:
        raise BadInput(f"--max-queue-delay-us must be >= 0, got {options.max_queue_delay_us}")
    if options.kind == "cpu" and platform == "tensorrt_plan":
        raise BadInput(f"{artifact.path.name} is a TensorRT engine, which runs only on a GPU: use --kind gpu")
    lo, _, hi = artifact.batch
    if artifact.dynamic_batch and lo > 1:
        raise BadInput(f"{artifact.path.name} accepts batches {lo}..{hi}, but Triton's batcher can send a batch of 1: "
                       f"re-export with --batch 1:{hi}")
    io = model_io(artifact)
    batched = artifact.dynamic_batch
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {hi if batched else 0}",
             f"input {_tensor_block(io.inputs, drop_batch=batched)}",
             f"output {_tensor_block(io.outputs, drop_batch=batched)}"]
    if batched and options.dynamic_batching:
        sizes = preferred_batch_sizes(artifact.batch, options.preferred_batch_sizes)
        lines.append(f"dynamic_batching {{\n  preferred_batch_size: {_dims(sizes)}\n"
                     f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}")
    kind = "KIND_GPU" if options.kind == "gpu" else "KIND_CPU"
    lines.append(f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {kind}\n  }}\n]")
    return "\n".join(lines) + "\n"


def _image_models(artifact: Artifact, *, name: str, options: RepoOptions) -> dict[str, str]:
    """``{model name: config text}`` of the preprocessing model and the ensemble (``--image-input``)."""
    import json

    if not artifact.dynamic_batch:
        raise BadInput(f"{artifact.path.name} has a static batch: --image-input needs a dynamic-batch artifact "
                       f"(re-export with --batch 1:{artifact.batch[0]})")
    io = model_io(artifact)
    if len(io.inputs) != 1:
        raise BadInput(f"{artifact.path.name} has {len(io.inputs)} inputs: --image-input needs exactly one")
    model_in = io.inputs[0]
    if model_in.data_type not in ("TYPE_FP32", "TYPE_FP16"):
        raise BadInput(f"{artifact.path.name} takes {model_in.data_type}, not a float tensor: drop --image-input")
    hi = artifact.batch[2]
    pre = artifact.preprocessing
    h, w = artifact.image_size
    pre_name, ens_name = f"{name}_preprocess", f"{name}_image"
    params = {"mode": "preprocess", "height": str(h), "width": str(w), "crop_pct": str(pre.get("crop_pct", 0.95)),
              "mean": json.dumps(list(pre["mean"])), "std": json.dumps(list(pre["std"])),
              "dtype": "float16" if model_in.data_type == "TYPE_FP16" else "float32"}
    param_text = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}'
                           for k, v in params.items())
    image_in = ('input [\n  {\n    name: "image"\n    data_type: TYPE_UINT8\n    dims: [ -1 ]\n'
                '    allow_ragged_batch: true\n  }\n]')
    preprocess = "\n".join([
        f'name: "{pre_name}"', 'backend: "python"', f"max_batch_size: {hi}", image_in,
        f"output {_tensor_block([model_in], drop_batch=True)}",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: {options.instances}\n    kind: KIND_CPU\n  }}\n]", param_text]) + "\n"
    steps = [(pre_name, {"image": "image"}, {model_in.name: "preprocessed"}),
             (name, {model_in.name: "preprocessed"}, {o.name: o.name for o in io.outputs})]

    def maps(kind: str, m: dict[str, str]) -> str:
        return " ".join(f'{kind} {{ key: "{k}" value: "{v}" }}' for k, v in m.items())

    step_text = ",\n".join(f'    {{\n      model_name: "{m}"\n      model_version: -1\n      {maps("input_map", i)}\n'
                           f'      {maps("output_map", o)}\n    }}' for m, i, o in steps)
    ensemble = "\n".join([
        f'name: "{ens_name}"', 'platform: "ensemble"', f"max_batch_size: {hi}",
        'input [\n  {\n    name: "image"\n    data_type: TYPE_UINT8\n    dims: [ -1 ]\n  }\n]',
        f"output {_tensor_block(io.outputs, drop_batch=True)}",
        f"ensemble_scheduling {{\n  step [\n{step_text}\n  ]\n}}"]) + "\n"
    return {pre_name: preprocess, ens_name: ensemble}


def _write_model(artifact: Artifact, folder: Path, *, name: str, options: RepoOptions) -> None:
    _, filename = _platform(artifact)
    version = folder / "1"
    version.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(render_config(artifact, name=name, options=options))
    shutil.copy2(artifact.path, version / filename)
    shutil.copy2(artifact.manifest, version / f"{filename}.manifest.json")
    if options.image_input:
        for model, text in _image_models(artifact, name=name, options=options).items():
            (folder.parent / model / "1").mkdir(parents=True)
            (folder.parent / model / "config.pbtxt").write_text(text)
            if model.endswith("_preprocess"):
                shutil.copy2(Path(__file__).with_name("backend_model.py"), folder.parent / model / "1" / "model.py")


def write_repository(artifacts: Sequence[Artifact], out: str | Path, *, names: Sequence[str] | None = None,
                     options: RepoOptions = RepoOptions()) -> list[Path]:
    """Write one model folder per artifact into the repository ``out`` (created if missing).

    Every config is rendered (and so validated) before anything is written. The folders are built in a
    temporary directory beside ``out`` and renamed into place; an existing ``out/<name>`` is an error,
    never overwritten.

    Returns:
        The model folders written, in the order of ``artifacts``.
    """
    out = Path(out)
    if not artifacts:
        raise BadInput("no artifact given: pass one or more .onnx/.engine files")
    names = list(names) if names else [model_name_for(a) for a in artifacts]
    if len(names) != len(artifacts):
        raise BadInput("--name can only be used with a single artifact")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BadInput(f"two artifacts would both be model {dupes[0]!r}: pass them in separate runs with --name")
    for a, n in zip(artifacts, names):
        if not n or _NAME_RE.search(n):
            raise BadInput(f"model name {n!r} may only hold letters, digits, '_', '.' and '-': choose another --name")
        render_config(a, name=n, options=options)
        if options.image_input:
            _image_models(a, name=n, options=options)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out} exists and is not a folder: choose another --out")
    folders = [m for n in names for m in ([n, f"{n}_preprocess", f"{n}_image"] if options.image_input else [n])]
    taken = [n for n in folders if (out / n).exists()]
    if taken:
        raise BadInput(f"{out / taken[0]} already exists: remove it yourself or choose another --out or --name")
    check_writable_dir(out if out.exists() else out.parent)
    # the temporary folder sits beside the repository (never inside it, where a polling server would see it)
    tmp = check_writable_dir(out.parent) / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        for a, n in zip(artifacts, names):
            _write_model(a, tmp / n, name=n, options=options)
        if not out.exists():
            tmp.rename(out)
            return [out / n for n in names]
        for n in folders:  # into an existing repository: one atomic rename per model folder
            (tmp / n).rename(out / n)
        return [out / n for n in names]
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
