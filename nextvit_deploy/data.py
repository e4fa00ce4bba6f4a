"""Real images and the model's preprocessing.

Photos come from ``skimage.data`` (they ship inside scikit-image, nothing is downloaded). Preprocessing
is :mod:`nextvit_deploy.preprocess`: timm's eval transform of the variant (resize the shorter side to
``size / crop_pct``, centre-crop to ``size``, scale to [0, 1], then normalise with the mean/std), with
timm's and torchvision's rounding. Images are handled as float32 NCHW in [0, 1] until the last step, so the
same pixels can feed a runner that normalises inside the model (CoreML image input) or outside.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInput
from .preprocess import MAX_ASPECT, preprocess_pil, to_rgb

__all__ = [
    "UnusableImage",
    "decode_rgb",
    "SKIMAGE_PHOTOS",
    "IMAGE_SUFFIXES",
    "photos",
    "calibration_photos",
    "noise_images",
    "preprocess_pil",
    "load_image_dir",
    "iter_image_dir",
    "scan_image_dir",
    "open_rgb",
    "ImageStream",
    "Skipped",
    "normalize",
    "MAX_IMAGE_PIXELS",
    "MAX_ASPECT",
    "RECOMMENDED_CALIB_IMAGES",
]

# RGB or grey photos bundled with scikit-image (no download): name -> loader attribute.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "colorwheel", "camera", "coins", "brick", "grass", "gravel")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 64_000_000  # 8000x8000: anything larger is refused before decoding (decompression bombs)
RECOMMENDED_CALIB_IMAGES = 32
# Calibration photos, disjoint from SKIMAGE_PHOTOS (which `verify` gates on): scikit-learn's two sample
# photos and the scikit-image photos that `verify` does not use ("cat" is "chelsea" again, so it is left out).
CALIBRATION_SOURCES = ("sklearn:china.jpg", "sklearn:flower.jpg", "skimage:retina", "skimage:stereo_motorcycle:0",
                       "skimage:stereo_motorcycle:1", "skimage:moon", "skimage:clock", "skimage:cell")
# Crops (top, left, side as fractions of the shorter side) and mirroring: 8 views of each source photo.
CALIBRATION_VIEWS = ((None, None, 1.0, False), (None, None, 1.0, True), (0.0, 0.0, 0.6, False),
                     (0.0, 1.0, 0.6, True), (1.0, 0.0, 0.6, True), (1.0, 1.0, 0.6, False),
                     (0.5, 0.5, 0.45, False), (0.5, 0.5, 0.45, True))


def _to_size(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def photos(count: int, size: int | Sequence[int], *, crop_pct: float = 0.95, offset: int = 0) -> np.ndarray:
    """``count`` real photos from scikit-image as float32 NCHW in [0, 1] (cycling through the set)."""
    import skimage.data
    from PIL import Image

    out = []
    for i in range(count):
        name = SKIMAGE_PHOTOS[(offset + i) % len(SKIMAGE_PHOTOS)]
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        out.append(preprocess_pil(Image.fromarray(arr), size, crop_pct=crop_pct))
    return np.stack(out)


def _calibration_source(spec: str) -> np.ndarray:
    """One calibration photo as an HxWx3 uint8 array (both libraries ship these files; nothing is downloaded)."""
    kind, name, *index = spec.split(":")
    if kind == "sklearn":
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(name)
    else:
        import skimage.data

        arr = getattr(skimage.data, name)()
        if index:
            arr = arr[int(index[0])]
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def calibration_photos(count: int, size: int | Sequence[int], *, crop_pct: float = 0.95) -> np.ndarray:
    """``count`` calibration images as float32 NCHW in [0, 1], none of them from :func:`photos`.

    Views (whole photo, mirrored, corner and centre crops) of :data:`CALIBRATION_SOURCES`: 64 distinct
    images, cycled beyond that. Calibrating on these and verifying on :func:`photos` keeps the INT8
    parity check off the data it was tuned on.
    """
    from PIL import Image

    sources: dict[str, np.ndarray] = {}
    out = []
    n_src = len(CALIBRATION_SOURCES)
    for i in range(count):  # source-minor order: a small count still spans every source photo
        spec = CALIBRATION_SOURCES[i % n_src]
        top, left, side, mirror = CALIBRATION_VIEWS[(i // n_src) % len(CALIBRATION_VIEWS)]
        arr = sources.setdefault(spec, _calibration_source(spec))
        if top is not None:
            h, w = arr.shape[:2]
            k = max(16, int(min(h, w) * side))
            y0, x0 = int((h - k) * top), int((w - k) * left)
            arr = arr[y0:y0 + k, x0:x0 + k]
        if mirror:
            arr = arr[:, ::-1]
        out.append(preprocess_pil(Image.fromarray(np.ascontiguousarray(arr)), size, crop_pct=crop_pct))
    return np.stack(out)


def noise_images(count: int, size: int | Sequence[int], *, seed: int = 0) -> np.ndarray:
    """Uniform random images, float32 NCHW in [0, 1]."""
    h, w = _to_size(size)
    return np.random.default_rng(seed).random((count, 3, h, w), dtype=np.float32)


def normalize(images01: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[0, 1] NCHW -> model input: ``(x - mean) / std`` per channel, float32."""
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((images01 - m) / s).astype(np.float32)


@dataclass(frozen=True)
class Skipped:
    """A file of an image folder that was not used, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path.name}: {self.reason}"


class UnusableImage(Exception):
    """A file that cannot be used as an image; the message is the reason alone (callers add the file name)."""


def _folder_files(directory: str | Path, flag: str = "--calib-dir") -> tuple[Path, list[Path], list[Path]]:
    d = Path(directory)
    what = "calibration folder" if flag == "--calib-dir" else f"{flag} folder"
    if not d.is_dir():
        raise BadInput(f"{what} {d} does not exist: pass a folder of .jpg/.png images with {flag}")
    files = sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith("."))
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    others = [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
    if not images:
        extra = f" (it holds {len(others)} non-image files such as {others[0].name})" if others else ""
        want = f"at least {RECOMMENDED_CALIB_IMAGES} " if flag == "--calib-dir" else ""
        raise BadInput(f"{what} {d} has no images{extra}: add {want}{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files")
    return d, images, others


def _open_checked(path: Path):
    """Open ``path`` lazily (header only) and refuse bombs and extreme strips before any decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnusableImage(f"more than {MAX_IMAGE_PIXELS // 1_000_000} M pixels (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise UnusableImage("not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnusableImage(f"cannot be read ({type(exc).__name__})") from None
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise UnusableImage(f"{w}x{h} is more than {MAX_IMAGE_PIXELS // 1_000_000} M pixels (decompression-bomb guard)")
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT:
        im.close()
        raise UnusableImage(f"{w}x{h} has an aspect ratio beyond {MAX_ASPECT:g}:1")
    return im


def open_rgb(path: str | Path):
    """Decode an image file to an 8-bit RGB PIL image (first frame of an animation).

    Raises:
        BadInput: the file is not an image, cannot be decoded, is a decompression bomb (more than
            :data:`MAX_IMAGE_PIXELS`) or a strip beyond :data:`MAX_ASPECT`; the message names the file.
    """
    try:
        return decode_rgb(Path(path))
    except UnusableImage as exc:
        raise BadInput(f"image {path} cannot be used ({exc}): remove or replace it") from None


def decode_rgb(path: Path):
    """:func:`open_rgb` without the file name in the error: raises :class:`UnusableImage` with the reason."""
    im = _open_checked(path)
    try:
        with im:
            im.seek(0)
            im.load()
            return to_rgb(im)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UnusableImage(f"cannot be read ({type(exc).__name__})") from None


@dataclass
class ImageStream:
    """Preprocessed images of a folder, decoded one at a time (see :func:`iter_image_dir`).

    Iterating yields ``(image, path)`` with ``image`` float32 CHW in [0, 1]; files that cannot be used are
    appended to ``skipped`` with the reason, and ``used`` lists the files yielded so far. Each iteration
    is a fresh pass over the folder (``used``/``skipped`` start again), so calibration may take several
    passes while holding one image (or one :meth:`batches` batch) in memory.
    """

    directory: Path
    files: list[Path]
    size: tuple[int, int]
    limit: int | None = None
    crop_pct: float = 0.95
    interpolation: str = "bicubic"
    skipped: list[Skipped] = field(default_factory=list)
    used: list[Path] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[np.ndarray, Path]]:
        self.used, self.skipped = [], []
        for f in self.files:
            if self.limit is not None and len(self.used) >= self.limit:
                return
            try:
                image = decode_rgb(f)
            except UnusableImage as exc:
                self.skipped.append(Skipped(f, str(exc)))
                continue
            self.used.append(f)
            yield preprocess_pil(image, self.size, crop_pct=self.crop_pct, interpolation=self.interpolation), f

    def batches(self, batch: int) -> Iterator[np.ndarray]:
        """One pass as float32 NCHW arrays of ``batch`` images (the last one may be smaller)."""
        chunk: list[np.ndarray] = []
        for image, _ in self:
            chunk.append(image)
            if len(chunk) == batch:
                yield np.stack(chunk)
                chunk = []
        if chunk:
            yield np.stack(chunk)

    def summary(self) -> str:
        """One line: how many images were used and which were skipped, e.g. for a manifest or a warning."""
        text = f"{len(self.used)} images used from {self.directory}"
        if self.skipped:
            shown = "; ".join(str(s) for s in self.skipped[:3])
            more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            text += f", {len(self.skipped)} skipped ({shown}{more})"
        return text


def iter_image_dir(directory: str | Path, size: int | Sequence[int], *, limit: int | None = None,
                   crop_pct: float = 0.95, interpolation: str = "bicubic", flag: str = "--calib-dir") -> ImageStream:
    """Stream the images of ``directory`` (sorted, recursive) one at a time, so memory stays at one image.

    Args:
        directory: folder of jpg/png/bmp/webp/gif/tif images (hidden files are ignored).
        size: output ``(height, width)`` or a side, in pixels.
        limit: stop after this many usable images. Defaults to all.
        crop_pct: centre-crop fraction of the variant's preprocessing. Defaults to 0.95.
        interpolation: resize filter of the variant's preprocessing. Defaults to bicubic.
        flag: the option that named the folder, for error messages.

    Returns:
        An :class:`ImageStream`; iterate it, then read ``.skipped`` (files not used, with reasons).

    Raises:
        BadInput: the folder is missing or holds no image file, or ``limit < 1``.
    """
    if limit is not None and limit <= 0:
        raise BadInput(f"--calib-images must be at least 1, got {limit}")
    d, images, _ = _folder_files(directory, flag)
    return ImageStream(directory=d, files=images, size=_to_size(size), limit=limit, crop_pct=crop_pct,
                       interpolation=interpolation)


def _no_usable(d: Path, skipped: list[Skipped]) -> BadInput:
    first = skipped[0]
    others = f" (and {len(skipped) - 1} more files cannot be used either)" if len(skipped) > 1 else ""
    return BadInput(f"calibration image {first.path} cannot be read ({first.reason}) and {d} has no other usable "
                    f"image{others}: remove or replace it")


def _enough(d: Path, usable: int, limit: int | None, skipped: list[Skipped]) -> None:
    want = min(RECOMMENDED_CALIB_IMAGES, limit) if limit is not None else 1  # a library call without a count
    if usable == 0:
        raise _no_usable(d, skipped)
    if usable < want:
        note = f" ({len(skipped)} files skipped, e.g. {skipped[0]})" if skipped else ""
        raise BadInput(f"calibration folder {d} has {usable} usable images{note}: add at least "
                       f"{RECOMMENDED_CALIB_IMAGES}, or pass --calib-images {usable} to calibrate on fewer")


def scan_image_dir(directory: str | Path, *, limit: int | None = None) -> tuple[list[Path], list[Skipped]]:
    """Check a calibration folder from the file headers alone (no decoding): cheap, run before any export.

    Accepts the folder when it holds at least ``min(32, limit)`` usable images, so fewer than 32 are
    used only when asked for with ``--calib-images`` (without ``limit``, one image is enough).
    Returns (usable files up to ``limit``, skipped).
    """
    d, images, _ = _folder_files(directory)
    usable: list[Path] = []
    skipped: list[Skipped] = []
    for f in images:
        if limit is not None and len(usable) >= limit:
            break
        try:
            _open_checked(f).close()
        except UnusableImage as exc:
            skipped.append(Skipped(f, str(exc)))
            continue
        usable.append(f)
    _enough(d, len(usable), limit, skipped)
    return usable, skipped


def load_image_dir(directory: str | Path, size: int | Sequence[int], *, limit: int | None = None,
                   crop_pct: float = 0.95, skipped: list[Skipped] | None = None) -> tuple[np.ndarray, list[Path]]:
    """Load and preprocess the images of ``directory`` (sorted, recursive) as float32 NCHW in [0, 1].

    Files that cannot be used (not decodable, decompression bombs, extreme strips) are skipped and, when
    ``skipped`` is given, appended to it with the reason. Prefer :func:`iter_image_dir` for large folders.

    Raises:
        BadInput: the folder is missing, holds no usable image, or fewer than ``min(32, limit)`` (one
            without ``limit``).
    """
    stream = iter_image_dir(directory, size, limit=limit, crop_pct=crop_pct)
    out = [image for image, _ in stream]
    if skipped is not None:
        skipped.extend(stream.skipped)
    _enough(stream.directory, len(out), limit, stream.skipped)
    return np.stack(out), list(stream.used)
