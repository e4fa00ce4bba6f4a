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
    "noise_images",
    "preprocess_pil",
    "load_image_dir",
    "normalize",
]

# RGB or grey photos bundled with scikit-image (no download): name -> loader attribute.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "colorwheel", "camera", "coins", "brick", "grass", "gravel")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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
