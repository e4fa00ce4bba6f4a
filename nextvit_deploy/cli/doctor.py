"""``nextvit-deploy doctor``: which backends this machine has, and how to get the missing ones."""
from __future__ import annotations

import platform
from importlib import metadata

from rich.markup import escape
from rich.table import Table

from .._deps import INSTALL_HINTS, available
from ._common import handle_errors, out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def backend_rows() -> list[tuple[str, str, str]]:
    """(backend, status, detail) rows; status is 'ok', 'partial' or 'missing'."""
    from ..backends import coreml, onnxrt, tensorrt

    rows = []
    ort_status = onnxrt.availability()
    if ort_status.available:
        import onnxruntime as ort

        rows.append(("onnxruntime", "ok", f"{ort_status.version}; device {ort_status.device}; providers: "
                     f"{', '.join(ort.get_available_providers())}"))
    else:
        rows.append(("onnxruntime", "missing", ort_status.reason))
    import torch

    if torch.cuda.is_available():
        rows.append(("torch CUDA", "ok", f"torch {torch.__version__}; {torch.cuda.get_device_name(0)}"))
    else:
        why = "this torch is a CPU build" if torch.version.cuda is None else "no NVIDIA GPU/driver visible"
        rows.append(("torch CUDA", "missing", f"torch {torch.__version__}: {why}; CPU eager works"))
    trt_status = tensorrt.availability()
    if trt_status.available:
        rows.append(("tensorrt", "ok", f"{trt_status.version}; {trt_status.device}"))
    elif not available("tensorrt"):
        rows.append(("tensorrt", "missing", f"not installed; {INSTALL_HINTS['tensorrt']}. Without it, "
                     "'export --target trt' writes the TensorRT-ready ONNX and the trtexec command"))
    else:
        rows.append(("tensorrt", "missing", trt_status.reason))
    ct = _version("coremltools")
    if ct is None:
        rows.append(("coremltools", "missing", INSTALL_HINTS["coremltools"]))
    elif coreml.availability().available:
        rows.append(("coremltools", "ok", f"{ct}; conversion and Core ML prediction"))
    else:
        rows.append(("coremltools", "partial", f"{ct}; conversion works, Core ML prediction needs macOS "
                     "(verify uses the MIL evaluator here)"))
    rows.append(serve_row())
    for mod, dist, why in (("onnxsim", "onnxsim", "ONNX simplification"),
                           ("onnxslim", "onnxslim", "fallback ONNX simplification"),
                           ("timm", "timm", "baseline models for bench and the oracle test")):
        v = _version(dist)
        rows.append((mod, "ok" if v else "missing", f"{v} ({why})" if v else f"{INSTALL_HINTS[mod]} ({why})"))
    return rows


def serve_row() -> tuple[str, str, str]:
    """The serve extra: tritonclient plus the tritonserver binary from nvidia-pytriton (checked, not started)."""
    from ..errors import MissingDependency
    from ..serve.server import SERVE_INSTALL, find_tritonserver

    name = "serve (Triton)"
    client = _version("tritonclient")
    try:
        dist = find_tritonserver()
    except MissingDependency as exc:
        if "nvidia-pytriton" in str(exc):  # the binary is not installed
            what = "tritonclient and the tritonserver binary are" if client is None else "the tritonserver binary is"
            return name, "missing", f"{what} not installed; install with: {SERVE_INSTALL}"
        return name, "missing", str(exc)  # wrong OS / glibc / Python: the message says what to do
    if client is None:
        return name, "partial", f"tritonserver found ({dist}); tritonclient missing; install with: {SERVE_INSTALL}"
    return name, "ok", (f"tritonserver from nvidia-pytriton {_version('nvidia-pytriton')}, tritonclient {client}; "
                        "serve and triton-repo work")


@handle_errors
def doctor_cmd() -> None:
    """Show which backends this machine has and how to install the missing ones."""
    table = Table(title=f"nextvit-deploy doctor: {platform.platform()}, Python {platform.python_version()}",
                  title_justify="left")
    table.add_column("backend")
    table.add_column("status")
    table.add_column("detail / how to install")
    colors = {"ok": "green", "partial": "yellow", "missing": "red"}
    for name, status, detail in backend_rows():
        table.add_row(name, f"[{colors[status]}]{status}[/]", escape(detail))
    out.print(table)
