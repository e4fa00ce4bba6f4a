"""Manifest checks: the schema of ``<artifact>.manifest.json``, and the manifest against the artifact itself.

A manifest is input like any other file: it may be hand-edited, truncated or written by another
version. :func:`validate_fields` turns every malformed field into one line naming the field;
:func:`check_onnx_contents` compares what the ONNX graph itself says (input and output names, input
shape, class count, precision) with what the manifest claims, so that editing a manifest cannot
loosen a parity gate (an "int8" manifest on a graph without Q/DQ nodes is an error, not int8 tolerances).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ArtifactError

__all__ = ["MAX_CLASSES", "FEATURE_NAMES", "validate_fields", "check_suffix", "check_onnx_contents", "graph_precision",
           "output_names_for", "preprocessing_for"]

from nextvit_model.checkpoint import MAX_CLASSES  # noqa: E402  (the model package owns the cap)

FEATURE_NAMES = ("feat_s4", "feat_s8", "feat_s16", "feat_s32")


def output_names_for(features_only: bool) -> tuple[str, ...]:
    """The output names every exporter gives the graph: the four stage maps (backbone) or ``logits``."""
    return FEATURE_NAMES if features_only else ("logits",)


def preprocessing_for(variant: str, *, input_kind: str = "tensor") -> dict[str, Any]:
    """The manifest's ``preprocessing`` record of ``variant`` (its published eval transform)."""
    from nextvit_model import resolve_variant

    cfg = resolve_variant(variant)
    return {"mean": list(cfg.mean), "std": list(cfg.std), "crop_pct": cfg.crop_pct,
            "interpolation": cfg.interpolation, "color": "RGB", "layout": "NCHW",
            "input_kind": input_kind,
            "input_range": "normalized: (x/255 - mean) / std" if input_kind == "tensor" else "RGB 0..255"}


_SHA = re.compile(r"^[0-9a-f]{64}$")
_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(v: Any, n: int) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == n and all(_is_int(x) and x > 0 for x in v)


def _numbers(v: Any, n: int) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == n and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)


def validate_fields(raw: Mapping[str, Any], where: Path) -> None:
    """Raise :class:`ArtifactError` (one line naming the field) unless ``raw`` is a well-formed manifest."""
    from nextvit_model import VARIANTS

    from .targets import TARGETS

    def bad(key: str, why: str) -> ArtifactError:
        return ArtifactError(f"manifest {where} is malformed: {key} {why}; re-export the artifact")

    required = ("target", "precision", "variant", "input_shape", "batch", "dynamic_batch", "features_only",
                "input_name", "output_names", "preprocessing", "sha256")
    for key in required:
        if key not in raw:
            raise bad(key, "is missing")
    target, precision, variant = raw["target"], raw["precision"], raw["variant"]
    for key in ("target", "precision", "variant"):
        if not isinstance(raw[key], str):
            raise bad(key, f"{raw[key]!r} is not a name")
    if target not in TARGETS:
        raise bad("target", f"{target!r} is not one of {', '.join(TARGETS)}")
    if precision not in TARGETS[target].precisions:
        raise bad("precision", f"{precision!r} is not one of {', '.join(TARGETS[target].precisions)} "
                               f"(target {target})")
    if variant not in VARIANTS:
        raise bad("variant", f"{variant!r} is not one of {', '.join(VARIANTS)}")
    if not _ints(raw["input_shape"], 4) or raw["input_shape"][1] != 3:
        raise bad("input_shape", f"{raw['input_shape']!r} is not [batch, 3, height, width] of positive integers")
    batch = raw["batch"]
    if not _ints(batch, 3) or not batch[0] <= batch[1] <= batch[2]:
        raise bad("batch", f"{batch!r} is not [min, opt, max] positive integers with min <= opt <= max")
    if raw["input_shape"][0] != batch[1]:
        raise bad("input_shape", f"batch {raw['input_shape'][0]} differs from batch opt {batch[1]}")
    for key in ("dynamic_batch", "features_only"):
        if not isinstance(raw[key], bool):
            raise bad(key, f"{raw[key]!r} is not true or false")
    if raw["dynamic_batch"] != (batch[0] != batch[2]):
        raise bad("dynamic_batch", f"{raw['dynamic_batch']} contradicts batch {batch}")
    if not isinstance(raw["input_name"], str) or not raw["input_name"]:
        raise bad("input_name", f"{raw['input_name']!r} is not a tensor name")
    expected = list(output_names_for(raw["features_only"]))
    if list(raw["output_names"] or []) != expected:
        raise bad("output_names", f"{raw['output_names']!r} should be {expected} "
                                  f"(features_only {str(raw['features_only']).lower()})")
    pre = raw["preprocessing"]
    if not isinstance(pre, dict):
        raise bad("preprocessing", "is not an object")
    if not _numbers(pre.get("mean"), 3):
        raise bad("preprocessing.mean", f"{pre.get('mean')!r} is not 3 numbers")
    if not _numbers(pre.get("std"), 3) or min(pre["std"]) <= 0:
        raise bad("preprocessing.std", f"{pre.get('std')!r} is not 3 positive numbers")
    crop = pre.get("crop_pct", 0.95)
    if not isinstance(crop, (int, float)) or isinstance(crop, bool) or not 0 < crop <= 1:  # NaN fails too
        raise bad("preprocessing.crop_pct", f"{crop!r} is not in (0, 1]")
    if pre.get("input_kind", "tensor") not in ("tensor", "image"):
        raise bad("preprocessing.input_kind", f"{pre.get('input_kind')!r} is not 'tensor' or 'image'")
    if not isinstance(raw["sha256"], str) or not _SHA.match(raw["sha256"]):
        raise bad("sha256", "is not a sha256 hex digest")
    seed, ckpt = raw.get("seed"), raw.get("checkpoint")
    if seed is not None and not _is_int(seed):
        raise bad("seed", f"{seed!r} is not an integer")
    if ckpt is not None and not isinstance(ckpt, str):
        raise bad("checkpoint", f"{ckpt!r} is not a path")
    if seed is None and ckpt is None:
        raise bad("seed", "and checkpoint are both empty (the reference cannot be rebuilt)")
    depths = raw.get("depths")
    if depths is not None and (not _ints(depths, 4) or max(depths) > 64):
        raise bad("depths", f"{depths!r} is not 4 block counts between 1 and 64")
    classes = raw.get("num_classes", 1000)
    if not _is_int(classes) or not 1 <= classes <= MAX_CLASSES:
        raise bad("num_classes", f"{classes!r} is not an integer between 1 and {MAX_CLASSES}")
    opset = raw.get("opset")
    if opset is not None and not _is_int(opset):
        raise bad("opset", f"{opset!r} is not an integer")
    for key in ("versions", "details"):
        if not isinstance(raw.get(key, {}), dict):
            raise bad(key, "is not an object")
    sha = raw.get("checkpoint_sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA.match(sha)):
        raise bad("checkpoint_sha256", "is not a sha256 hex digest")
    hub = raw.get("checkpoint_hub")
    if hub is not None and (not isinstance(hub, dict) or not all(
            isinstance(hub.get(k), str) and hub[k] for k in ("repo_id", "revision", "filename"))):
        raise bad("checkpoint_hub", f"{hub!r} is not {{repo_id, revision, filename}}")
    if not isinstance(raw.get("created_utc", ""), str):
        raise bad("created_utc", f"{raw.get('created_utc')!r} is not a timestamp")
    interp = pre.get("interpolation", "bicubic")
    if not isinstance(interp, str):
        raise bad("preprocessing.interpolation", f"{interp!r} is not a name")


def check_suffix(target: str, path: Path) -> None:
    """The artifact's file type must be the manifest target's (a TensorRT manifest may describe its ONNX)."""
    from .targets import TARGETS

    want = TARGETS[target].suffix
    if path.suffix != want and not (target == "trt" and path.suffix == ".onnx"):
        raise ArtifactError(f"manifest of {path.name} says target {target}, whose artifacts end in {want}: "
                            "re-export the artifact")


def graph_precision(model_proto) -> str:
    """What an ONNX graph's own nodes say about its precision: ``int8`` (Q/DQ nodes), ``fp16`` (fp16
    tensors or casts) or ``fp32``."""
    from onnx import TensorProto

    graph = model_proto.graph
    if any(n.op_type in _QDQ for n in graph.node):
        return "int8"
    half = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    if any(i.data_type in half for i in graph.initializer):
        return "fp16"
    for n in graph.node:
        if n.op_type == "Cast" and any(a.name == "to" and a.i in half for a in n.attribute):
            return "fp16"
    return "fp32"


def _dims(value_info) -> list[int | str]:
    return [d.dim_value if d.dim_value > 0 else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def check_onnx_contents(art: Any) -> None:
    """Compare an ONNX artifact's graph with its manifest; raise :class:`ArtifactError` on a contradiction."""
    import onnx

    path = Path(art.path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ... for damaged bytes
        raise ArtifactError(f"{path} cannot be read as ONNX ({type(exc).__name__}) although its manifest's "
                            "sha256 matches: re-export it") from None
    graph = proto.graph
    init = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init]

    def contradiction(what: str) -> ArtifactError:
        return ArtifactError(f"manifest of {path.name} contradicts the graph: {what}; re-export the artifact")

    if [i.name for i in inputs] != [art.input_name]:
        raise contradiction(f"inputs are {[i.name for i in inputs]}, manifest says {[art.input_name]}")
    outs = [o.name for o in graph.output]
    if outs != list(art.output_names):
        raise contradiction(f"outputs are {outs}, manifest says {list(art.output_names)}")
    dims = _dims(inputs[0])
    want = list(art.input_shape)
    if len(dims) != 4 or dims[1:] != want[1:]:
        raise contradiction(f"input shape is {dims}, manifest says {want}")
    if isinstance(dims[0], int) and (art.dynamic_batch or dims[0] != want[0]):
        raise contradiction(f"input batch is fixed at {dims[0]}, manifest says batch {list(art.batch)}")
    if not isinstance(dims[0], int) and not art.dynamic_batch:
        raise contradiction(f"input batch is dynamic ({dims[0]}), manifest says static batch {want[0]}")
    if not art.features_only:
        out_dims = _dims(graph.output[0])
        if len(out_dims) == 2 and isinstance(out_dims[1], int) and out_dims[1] != art.num_classes:
            raise contradiction(f"the graph has {out_dims[1]} classes, manifest says num_classes {art.num_classes}")
    found = graph_precision(proto)
    if found != art.precision:
        raise contradiction(f"the graph is {found}, manifest says precision {art.precision}")
