"""Real images and the model's preprocessing.

Photos come from ``skimage.data`` (they ship inside scikit-image, nothing is downloaded). Preprocessing
follows the variant's config (timm ``nextvit_*.bd_in1k``): resize the shorter side to
``size / crop_pct`` with bicubic interpolation, centre-crop to ``size``, scale to [0, 1], then normalise
with the ImageNet mean/std. Images are handled as float32 NCHW in [0, 1] until the last step, so the
same pixels can feed a runner that normalises inside the model (CoreML image input) or outside.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import BadInput

__all__ = [
    "SKIMAGE_PHOTOS",
    "IMAGE_SUFFIXES",
    "photos",
    "calibration_photos",
    "noise_images",
    "preprocess_pil",
    "load_image_dir",
    "normalize",
]

# RGB or grey photos bundled with scikit-image (no download): name -> loader attribute.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "colorwheel", "camera", "coins", "brick", "grass", "gravel")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
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


def preprocess_pil(image, size: int | Sequence[int], *, crop_pct: float = 0.95) -> np.ndarray:
    """PIL image -> float32 CHW in [0, 1]: bicubic resize of the shorter side, then centre crop."""
    from PIL import Image

    h, w = _to_size(size)
    image = image.convert("RGB")
    scale_to = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    iw, ih = image.size
    ratio = max(scale_to[0] / ih, scale_to[1] / iw)
    new_w, new_h = max(w, round(iw * ratio)), max(h, round(ih * ratio))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - w) // 2, (new_h - h) // 2
    image = image.crop((left, top, left + w, top + h))
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0


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


def load_image_dir(directory: str | Path, size: int | Sequence[int], *, limit: Optional[int] = None,
                   crop_pct: float = 0.95) -> tuple[np.ndarray, list[Path]]:
    """Load and preprocess the images of ``directory`` (sorted, recursive) as float32 NCHW in [0, 1].

    Raises:
        BadInput: the folder is missing or holds no image, or a file cannot be decoded (the error names it).
    """
    from PIL import Image, UnidentifiedImageError

    d = Path(directory)
    if not d.is_dir():
        raise BadInput(f"calibration folder {d} does not exist: pass a folder of .jpg/.png images with --calib-dir")
    files = sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith("."))
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    others = [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
    if not images:
        extra = f" (it holds {len(others)} non-image files such as {others[0].name})" if others else ""
        raise BadInput(f"calibration folder {d} has no images{extra}: add at least 32 "
                       f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files")
    if limit is not None:
        if limit <= 0:
            raise BadInput(f"--calib-images must be at least 1, got {limit}")
        images = images[:limit]
    out = []
    for f in images:
        try:
            with Image.open(f) as im:
                im.load()
                out.append(preprocess_pil(im, size, crop_pct=crop_pct))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise BadInput(f"calibration image {f} cannot be read ({type(exc).__name__}): "
                           "remove or replace it") from None
    return np.stack(out), images
