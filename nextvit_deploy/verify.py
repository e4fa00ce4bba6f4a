"""``nextvit-deploy verify``: run an artifact and its PyTorch reference on the same inputs and compare.

Inputs: real photos from ``skimage.data`` with the model's preprocessing, and uniform-noise images, each
at batch 1 and at the largest batch the artifact accepts, and at every input size the artifact declares (a
Core ML backbone with enumerated sizes is checked at each). The reference is rebuilt from the manifest
alone (checkpoint + sha256, or the seed of a random initialisation with realistic BatchNorm
statistics). The candidate runner comes from the artifact's target row in ``TARGETS``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .backends.torch import TorchRunner
from .data import noise_images, normalize, photos
from .errors import BadInput
from .parity import ParityReport, Tolerance, compare_outputs, tolerance_for
from .reference import reference_model
from .targets import runner_for

__all__ = ["verify", "verify_artifact", "load_artifact", "candidate_input", "parity_cases", "image_sizes_of"]

Progress = Callable[[str], None]
MAX_INPUT_IMAGES = 256  # verify --inputs compares at most this many (eval streams any number)


def candidate_input(images01: np.ndarray, artifact: Artifact) -> np.ndarray:
    """What the artifact's input expects for ``images01`` (float32 NCHW in [0, 1])."""
    if artifact.preprocessing.get("input_kind") == "image":
        return (images01 * 255.0).astype(np.float32)
    return normalize(images01, artifact.preprocessing["mean"], artifact.preprocessing["std"])


def user_input_cases(artifact: Artifact, inputs: str | Path, batch: int) -> tuple[list[tuple[str, np.ndarray]], str]:
    """The first :data:`MAX_INPUT_IMAGES` images of ``inputs`` (sorted, recursive) as cases of ``batch``
    images, the last one padded to the artifact's smallest batch by repeating its last image; and the
    one-line summary (unreadable files skipped)."""
    from .data import iter_image_dir

    pre = artifact.preprocessing
    stream = iter_image_dir(inputs, artifact.image_size, limit=MAX_INPUT_IMAGES, crop_pct=pre.get("crop_pct", 0.95),
                            interpolation=pre.get("interpolation", "bicubic"), flag="--inputs")
    lo = artifact.batch[0]
    cases = []
    for i, chunk in enumerate(stream.batches(batch)):
        if chunk.shape[0] < lo:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], lo - chunk.shape[0], axis=0)])
        cases.append((f"inputs #{i + 1} x{chunk.shape[0]}", chunk))
    if not cases:
        raise BadInput(f"--inputs {inputs} has no usable image ({stream.summary()}): add .jpg/.png images")
    return cases, stream.summary()


def image_sizes_of(artifact: Artifact) -> list[tuple[int, int]]:
    """Every input size the artifact accepts: its enumerated sizes (``details.image_sizes``), else its one size."""
    sizes = artifact.details.get("image_sizes")
    return [(int(h), int(w)) for h, w in sizes] if sizes else [artifact.image_size]


def parity_cases(artifact: Artifact, *, max_batch: int | None = None,
                 image_size: tuple[int, int] | None = None) -> list[tuple[str, np.ndarray]]:
    """(case name, images in [0, 1]) pairs: photos and noise, at batch 1 and the artifact's largest batch,
    at ``image_size`` (defaults to the artifact's; a size passed here is named in the case)."""
    lo, _, hi = artifact.batch
    batches = sorted({lo, min(hi, max_batch) if max_batch else hi})
    crop = artifact.preprocessing.get("crop_pct", 0.95)
    size = tuple(image_size or artifact.image_size)
    at = "" if image_size is None else f" @{size[0]}x{size[1]}"
    cases = []
    for b in batches:
        cases.append((f"photos x{b}{at}", photos(b, size, crop_pct=crop)))
        cases.append((f"noise x{b}{at}", noise_images(b, size, seed=b)))
    # 8-bit pixels, as a camera or an image input (Core ML) delivers them: both sides then see the same values.
    return [(name, np.rint(images * 255.0).astype(np.float32) / 255.0) for name, images in cases]


def verify_artifact(artifact: Artifact, *, tolerance: Tolerance | None = None, max_batch: int | None = None,
                    runner_options: dict | None = None, progress: Progress | None = None,
                    inputs: str | Path | None = None) -> ParityReport:
    """Compare ``artifact`` against its PyTorch fp32 reference. Returns a report; never raises on mismatch.

    ``inputs``: a folder of the user's own images, an extra case gated like the photos (unreadable files
    are skipped and named in the notes).
    """
    say = progress or (lambda _m: None)
    tol = tolerance or tolerance_for(artifact.precision, weight_compression=artifact.details.get("weight_compression"))
    sizes = image_sizes_of(artifact)
    if len(sizes) == 1:
        cases = parity_cases(artifact, max_batch=max_batch)
        notes = []
    else:  # every enumerated size, each case named with its size
        cases = [c for s in sizes for c in parity_cases(artifact, max_batch=max_batch, image_size=s)]
        notes = [f"verified at each of the {len(sizes)} enumerated input sizes: "
                 + ", ".join(f"{h}x{w}" for h, w in sizes)]
    if inputs is not None:
        hi = artifact.batch[2]
        extra, summary = user_input_cases(artifact, inputs, min(hi, max_batch) if max_batch else hi)
        cases += extra
        notes.append(f"--inputs: {summary}")
    say("rebuilding the PyTorch reference from the manifest")
    reference = TorchRunner(reference_model(artifact), output_names=artifact.output_names,
                            name=f"TorchRunner({artifact.variant}, fp32)")
    candidate = runner_for(artifact, **(runner_options or {}))
    results = []
    with reference, candidate:
        for case, images in cases:
            say(f"running {case}")
            ref = reference.infer({"input": normalize(images, artifact.preprocessing["mean"],
                                                      artifact.preprocessing["std"])})
            cand = candidate.infer({artifact.input_name: candidate_input(images, artifact)})
            results.append(compare_outputs(ref, cand, tolerance=tol, case=case))
    if artifact.seed is not None:
        notes.append(f"random weights (seed {artifact.seed}) with realistic BatchNorm statistics; "
                     "top-1 is not gated (near-tied logits)")
    return ParityReport(artifact=artifact.path.name, target=artifact.target, precision=artifact.precision,
                        reference=reference.name, candidate=candidate.name, candidate_device=candidate.device,
                        tolerance=tol, cases=results, notes=notes)


def load_artifact(path: str | Path) -> Artifact:
    """The artifact at ``path`` from its manifest; a TensorRT engine built with the printed ``trtexec``
    command (no manifest of its own) is described by the manifest of the TensorRT-ready ONNX beside it."""
    p = Path(path)
    if p.suffix == ".engine":
        from .backends.tensorrt import engine_artifact

        return engine_artifact(p)
    return Artifact.load(p)


def verify(path: str | Path, **kwargs) -> ParityReport:
    """Load the artifact at ``path`` (see :func:`load_artifact`) and verify it."""
    return verify_artifact(load_artifact(path), **kwargs)
