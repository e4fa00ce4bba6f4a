"""The eval transform of a Next-ViT variant, computed as timm and torchvision compute it, without torchvision.

timm's ``create_transform(**resolve_model_data_config(model))`` for ``nextvit_*.bd_in1k`` is, for a
PIL RGB image::

    Resize(floor(size / crop_pct), interpolation)   # shorter side; torchvision rounding
    CenterCrop(size)                                 # torchvision rounding, zero padding if too small
    ToTensor()                                       # uint8 HWC -> float32 CHW / 255
    Normalize(mean, std)                             # float32 (x - mean) / std

This module reproduces the integer arithmetic of each step (torchvision's ``_compute_resized_output_size``
truncates the long side, ``center_crop`` rounds half to even, timm's ``ResizeKeepRatio`` for non-square
targets rounds each side) and resizes with the same PIL filter, so the pixels are identical.
``tests/test_preprocess.py`` checks that against timm's own transform.

Why no torchvision: on PIL images torchvision only does the arithmetic above and calls ``Image.resize`` and
``Image.crop``; importing it costs about a second and a 20 MB wheel pinned to one torch version (its
wheels break on torch upgrades), for a dozen lines of arithmetic. It stays a test-only dependency.

Image modes are the loader's job in timm (``Image.open(f).convert("RGB")``); :func:`to_rgb` does the same
for grey, palette and CMYK, and does better where PIL's ``convert("RGB")`` loses the picture: 16-bit grey
is scaled to 8 bits (PIL clips everything above 255 to white) and transparency is composited on white
(PIL keeps whatever colour is stored under fully transparent pixels, often black).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import BadInput

__all__ = ["MAX_ASPECT", "INTERPOLATIONS", "resized_size", "crop_box", "resize_and_crop", "preprocess_pil",
           "to_rgb", "normalize_chw"]

# A strip longer than this ratio is refused: resizing its shorter side to ~235 px would make the longer
# side enormous (a 60000x1 strip becomes 235 x 14 million pixels) and a centre crop of it is not a photo.
MAX_ASPECT = 64.0
# timm interpolation names -> PIL filter names (torchvision's pil_modes_mapping)
INTERPOLATIONS = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "box": "BOX",
                  "hamming": "HAMMING", "lanczos": "LANCZOS"}


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_aspect(width: int, height: int) -> None:
    """Raise :class:`BadInput` for an empty image or one beyond :data:`MAX_ASPECT`."""
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT:
        raise BadInput(f"a {width}x{height} image has an aspect ratio beyond {MAX_ASPECT:g}:1: crop it to a "
                       "photo-like shape first")


def resized_size(width: int, height: int, size: int | Sequence[int], crop_pct: float) -> tuple[int, int]:
    """(width, height) after the eval resize of a ``width x height`` image for output ``size`` (h, w)."""
    th, tw = _hw(size)
    sh, sw = math.floor(th / crop_pct), math.floor(tw / crop_pct)
    if sh == sw:  # torchvision Resize(int): shorter side to sh, longer side truncated
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = sh, int(sh * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    ratio = min(height / sh, width / sw)  # timm ResizeKeepRatio(longest=0): each side rounded
    return round(width / ratio), round(height / ratio)


def crop_box(width: int, height: int, size: int | Sequence[int]) -> tuple[int, int, int, int]:
    """torchvision ``center_crop``'s (left, top, right, bottom) on a ``width x height`` image (no padding)."""
    th, tw = _hw(size)
    top = int(round((height - th) / 2.0))
    left = int(round((width - tw) / 2.0))
    return left, top, left + tw, top + th


def _pad_to(image: Any, th: int, tw: int) -> Any:
    """Zero-pad as torchvision's center_crop does when the image is smaller than the crop."""
    from PIL import Image

    w, h = image.size
    if w >= tw and h >= th:
        return image
    left = (tw - w) // 2 if tw > w else 0
    top = (th - h) // 2 if th > h else 0
    right = (tw - w + 1) // 2 if tw > w else 0
    bottom = (th - h + 1) // 2 if th > h else 0
    canvas = Image.new(image.mode, (w + left + right, h + top + bottom), 0)
    canvas.paste(image, (left, top))
    return canvas


def resize_and_crop(image: Any, size: int | Sequence[int], *, crop_pct: float = 0.95,
                    interpolation: str = "bicubic") -> Any:
    """PIL RGB image -> the resized and centre-cropped PIL image of timm's eval transform."""
    from PIL import Image

    if interpolation not in INTERPOLATIONS:
        raise BadInput(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    th, tw = _hw(size)
    w, h = image.size
    check_aspect(w, h)
    new_w, new_h = resized_size(w, h, (th, tw), crop_pct)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), getattr(Image.Resampling, INTERPOLATIONS[interpolation]))
    image = _pad_to(image, th, tw)
    width, height = image.size
    return image.crop(crop_box(width, height, (th, tw)))


def preprocess_pil(image: Any, size: int | Sequence[int], *, crop_pct: float = 0.95,
                   interpolation: str = "bicubic") -> np.ndarray:
    """PIL image (any mode) -> float32 CHW in [0, 1], pixel for pixel timm's eval transform before Normalize."""
    image = to_rgb(image)
    out = resize_and_crop(image, size, crop_pct=crop_pct, interpolation=interpolation)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)


def normalize_chw(images01: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[0, 1] (N)CHW -> ``(x - mean) / std`` per channel in float32, the operations of torchvision's Normalize."""
    shape = (-1, 1, 1)
    m = np.asarray(mean, dtype=np.float32).reshape(shape)
    s = np.asarray(std, dtype=np.float32).reshape(shape)
    return ((images01.astype(np.float32) - m) / s).astype(np.float32)


def to_rgb(im: Any) -> Any:
    """Any PIL mode -> 8-bit RGB: 16/32-bit grey scaled (not clipped), transparency composited on white."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            top = 65535.0
        elif mode == "F":
            top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        else:  # 32-bit integer grey: PIL's mode for 16-bit PNGs in some versions
            peak = float(arr.max()) if arr.size else 0.0
            top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else float(2**32 - 1)
        grey = np.clip(np.rint(np.nan_to_num(arr) / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if (mode == "P" and "transparency" in im.info) or mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
