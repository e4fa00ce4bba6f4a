"""``nextvit-deploy eval``: top-1/top-5 of an artifact on a labelled image folder, beside its PyTorch reference.

The folder is an ImageFolder: one sub-folder per class, class index = position in sorted order (or in a
``--labels`` file). It is streamed ``batch`` images at a time, so memory stays at one batch whatever the
folder holds. Each image is decoded, preprocessed with the artifact's recorded eval transform
(:mod:`nextvit_deploy.preprocess`), and fed to both the artifact (through ``targets.runner_for``) and the
PyTorch reference rebuilt from the manifest, so the drop measures the export alone. Files that cannot be
decoded are counted, named and skipped.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import Artifact
from .backends.torch import TorchRunner
from .data import IMAGE_SUFFIXES, UnusableImage, decode_rgb
from .errors import BadInput
from .preprocess import normalize_chw, preprocess_pil
from .reference import reference_model
from .targets import runner_for
from .verify import candidate_input

__all__ = ["LabelledFolder", "EvalReport", "scan_labelled_folder", "evaluate_artifact"]

Progress = Callable[[int, int], None]  # (images done, images total)
DEFAULT_BATCH = 16


@dataclass(frozen=True)
class LabelledFolder:
    root: Path
    classes: tuple[str, ...]  # class index -> folder name
    items: tuple[tuple[Path, int], ...]  # (image file, class index), in evaluation order


def _read_labels(path: Path) -> list[str]:
    """A labels file: one class folder name per line (line i is class i), or a JSON object name -> index."""
    if not path.is_file():
        raise BadInput(f"--labels {path} does not exist: pass a text file with one class folder name per line")
    text = path.read_text(errors="replace")
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except ValueError:
            raise BadInput(f"--labels {path} is not valid JSON: write {{\"folder\": index, ...}}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in mapping.values()):
            raise BadInput(f"--labels {path}: every value must be a class index (integer >= 0)")
        names = [""] * (max(mapping.values(), default=-1) + 1)
        for name, index in mapping.items():
            names[index] = str(name)
        return names
    return [line.strip() for line in text.splitlines()]


def scan_labelled_folder(data: str | Path, *, labels: str | Path | None = None,
                         limit: int | None = None) -> LabelledFolder:
    """List an ImageFolder (no decoding). ``limit`` keeps that many files spread evenly over every class.

    Raises:
        BadInput: the folder is missing, has no class sub-folders, holds no image, or a class folder is not
            in the labels file.
    """
    root = Path(data)
    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be at least 1, got {limit}")
    if not root.is_dir():
        raise BadInput(f"--data {root} is not a folder: pass a folder with one sub-folder of images per class")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise BadInput(f"--data {root} has no class sub-folders: put each class's images in its own sub-folder "
                       "(ImageFolder layout, e.g. DIR/cat/1.jpg, DIR/dog/2.jpg)")
    if labels is not None:
        classes = _read_labels(Path(labels))
        index = {name: i for i, name in enumerate(classes) if name}
        missing = [f for f in folders if f not in index]
        if missing:
            raise BadInput(f"class folder {missing[0]!r} of {root} is not in --labels {labels} "
                           f"({len(missing)} folders missing): add it, or remove the folder")
    else:
        classes, index = folders, {name: i for i, name in enumerate(folders)}
    items: list[tuple[Path, int]] = []
    for name in folders:
        files = sorted(f for f in (root / name).rglob("*") if f.is_file() and not f.name.startswith(".")
                       and f.suffix.lower() in IMAGE_SUFFIXES)
        items.extend((f, index[name]) for f in files)
    if not items:
        raise BadInput(f"--data {root} has {len(folders)} class sub-folders but no "
                       f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in them")
    if limit is not None and limit < len(items):
        step = len(items) / limit
        items = [items[int(i * step)] for i in range(limit)]
    return LabelledFolder(root=root, classes=tuple(classes), items=tuple(items))


@dataclass
class Scores:
    top1: int = 0
    top5: int = 0

    def add(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        k = min(5, logits.shape[1])
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        self.top1 += int((top[:, 0] == labels).sum())
        self.top5 += int((top == labels[:, None]).any(axis=1).sum())
        return top[:, 0]


@dataclass
class EvalReport:
    artifact: str
    target: str
    precision: str
    reference: str
    candidate: str
    candidate_device: str
    data: str
    classes: int
    images: int  # evaluated
    reference_top1: float  # percent
    reference_top5: float
    candidate_top1: float
    candidate_top5: float
    top1_drop: float  # percentage points, reference - candidate
    top1_agreement: float  # percent of images where both predict the same class
    images_per_s: float
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(folder: LabelledFolder, batch: int, artifact: Artifact,
             skipped: list[dict[str, str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    pre = artifact.preprocessing
    crop, interp = pre.get("crop_pct", 0.95), pre.get("interpolation", "bicubic")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for path, label in folder.items:
        try:
            images.append(preprocess_pil(decode_rgb(path), artifact.image_size, crop_pct=crop, interpolation=interp))
        except (UnusableImage, BadInput) as exc:  # BadInput: preprocessing refused the decoded image
            skipped.append({"file": str(path.relative_to(folder.root)), "reason": str(exc)})
            continue
        labels.append(label)
        if len(images) == batch:
            yield np.stack(images), np.asarray(labels)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels)


def _feed_batch(artifact: Artifact, requested: int | None) -> int:
    lo, opt, hi = artifact.batch
    if requested is not None and requested < 1:
        raise BadInput(f"--batch must be at least 1, got {requested}")
    if not artifact.dynamic_batch:
        if requested is not None and requested != lo:
            raise BadInput(f"{artifact.path.name} has a static batch of {lo}: pass --batch {lo}, or re-export with "
                           f"--batch 1:{requested}")
        return lo
    if requested is not None and not lo <= requested <= hi:
        raise BadInput(f"--batch {requested} is outside {artifact.path.name}'s batch range {lo}..{hi}: pass a "
                       f"batch in that range")
    return requested or max(lo, min(hi, max(opt, DEFAULT_BATCH)))


def _pad(x: np.ndarray, lo: int) -> np.ndarray:
    """Repeat the last image up to the artifact's smallest batch (the extra rows are dropped afterwards)."""
    if x.shape[0] >= lo:
        return x
    return np.concatenate([x, np.repeat(x[-1:], lo - x.shape[0], axis=0)])


def evaluate_artifact(artifact: Artifact, data: str | Path, *, labels: str | Path | None = None,
                      limit: int | None = None, batch: int | None = None, runner_options: dict | None = None,
                      progress: Progress | None = None) -> EvalReport:
    """Top-1/top-5 of ``artifact`` and of its PyTorch reference on an ImageFolder; never raises on a drop."""
    if artifact.features_only:
        raise BadInput(f"{artifact.path.name} is a backbone (feature maps, no logits): eval needs a classifier; "
                       "export without --backbone")
    feed = _feed_batch(artifact, batch)
    folder = scan_labelled_folder(data, labels=labels, limit=limit)
    if len(folder.classes) > artifact.num_classes:
        raise BadInput(f"--data {folder.root} has {len(folder.classes)} classes but {artifact.path.name} predicts "
                       f"{artifact.num_classes}: evaluate on a folder of at most {artifact.num_classes} classes")
    pre = artifact.preprocessing
    reference = TorchRunner(reference_model(artifact), output_names=artifact.output_names,
                            name=f"TorchRunner({artifact.variant}, fp32)")
    candidate = runner_for(artifact, **(runner_options or {}))
    ref_scores, cand_scores = Scores(), Scores()
    agree = done = 0
    skipped: list[dict[str, str]] = []
    total = len(folder.items)
    start = time.perf_counter()
    with reference, candidate:
        for images, y in _batches(folder, feed, artifact, skipped):
            n = images.shape[0]
            x = _pad(images, artifact.batch[0])
            ref = reference.infer({"input": normalize_chw(x, pre["mean"], pre["std"])})["logits"][:n]
            cand = candidate.infer({artifact.input_name: candidate_input(x, artifact)})
            cand_logits = np.asarray(cand[artifact.output_names[0]], dtype=np.float32)[:n]
            agree += int((ref_scores.add(ref, y) == cand_scores.add(cand_logits, y)).sum())
            done += n
            if progress:
                progress(done + len(skipped), total)
    seconds = time.perf_counter() - start
    if done == 0:
        first = skipped[0]
        raise BadInput(f"no image of {folder.root} could be read (e.g. {first['file']}: {first['reason']}): "
                       "replace the files")

    def pct(v: int) -> float:
        return round(100.0 * v / done, 3)

    notes = []
    if artifact.seed is not None:
        notes.append(f"random weights (seed {artifact.seed}): accuracies are chance level; the agreement and the "
                     "drop still measure the export")
    return EvalReport(artifact=artifact.path.name, target=artifact.target, precision=artifact.precision,
                      reference=reference.name, candidate=candidate.name, candidate_device=candidate.device,
                      data=str(folder.root), classes=len(folder.classes), images=done,
                      reference_top1=pct(ref_scores.top1), reference_top5=pct(ref_scores.top5),
                      candidate_top1=pct(cand_scores.top1), candidate_top5=pct(cand_scores.top5),
                      top1_drop=round(100.0 * (ref_scores.top1 - cand_scores.top1) / done, 3),
                      top1_agreement=pct(agree), images_per_s=round(done / seconds, 2) if seconds else 0.0,
                      skipped=skipped, notes=notes)
