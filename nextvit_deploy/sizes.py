"""Image-size syntax shared by every command: ``224`` or ``HEIGHTxWIDTH`` (a leaf: no toolchain imports)."""
from __future__ import annotations

from .errors import BadInput

__all__ = ["parse_image_size"]


def parse_image_size(text: str | int) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"256x320"`` -> (256, 320) (height x width)."""
    s = str(text).lower().replace(",", "x")
    try:
        parts = [int(p) for p in s.split("x")]
    except ValueError:
        raise BadInput(f"--image-size {text!r} is not a size: use 224 or HEIGHTxWIDTH such as 256x320") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise BadInput(f"--image-size {text!r} is not a size: use 224 or HEIGHTxWIDTH such as 256x320")
    return parts[0], parts[1]
