"""Several input sizes in one Core ML backbone package (``export --target coreml --backbone --image-sizes``).

A detection or segmentation user feeds the backbone images of a few fixed sizes; Core ML's answer is an
input declared with ``ct.EnumeratedShapes``: one program, one copy of the weights, and the sizes listed
in the package (Core ML refuses any other size; the Neural Engine can precompile each).

Why this needs an *unfrozen* trace, and why that works with coremltools 9.0:

* The fixed-size export freezes every traced ``aten::size`` (``coreml.freeze_traced_shapes``) because
  9.0's torch frontend crashes on ``aten::Int`` of a *known* size: with a static input the size product
  ``h * w`` of ``reshape(b, c, h * w)`` is a compile-time value held as a one-element array, and the
  ``int`` converter's ``_cast`` calls ``int()`` on it, which numpy >= 2.4 rejects ("only 0-dimensional
  arrays can be converted to Python scalars", apple/coremltools#2633; fixed on main by
  apple/coremltools#2632, so far only in a pre-release, not in 9.0).
* With ``EnumeratedShapes`` (or ``RangeDim``) the input's height/width are *symbolic*, the product has
  no compile-time value, and the converter emits a real ``cast`` instead of folding it: no crash. The
  reshapes come out as ``[1, C, -1]`` and every other op is one the fixed-size program already has.
* Freezing and flexible shapes must never be combined: a frozen trace still converts, but its reshapes
  hold the traced size and would be wrong (or fail) at every other size.

* When only one side varies the reshape targets are constants with a ``-1``; when both vary coremltools
  rebuilds them at run time with ``shape -> gather -> concat -> reshape`` (ops the MIL evaluator knows).

Alternative checked and not used: one frozen trace per size as the functions of a multifunction package
(``ct.utils.MultiFunctionDescriptor`` + ``save_multifunction``). It converts, the weights are stored once
(a tiny backbone: 57.6 MB for two functions vs 57.5 MB for one) and the evaluator runs each function
exactly, but it needs iOS 18 / macOS 15 and the app must pick a function by name when loading, whereas
enumerated shapes work from iOS 16 and Core ML picks the shape from the input.

So the package is traced once, at the first (default) size, *without* freezing; :func:`check_trace_sizes`
runs the trace at every listed size against the eager model before conversion (a trace that baked in a
size would fail there, not on a user's device), and ``verify`` checks the package at every size.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import BadInput, DeployError
from ..sizes import parse_image_size

__all__ = ["MAX_IMAGE_SIZES", "SIZE_MULTIPLE", "parse_image_sizes", "check_image_sizes", "size_label",
           "enumerated_shapes", "check_trace_sizes", "shape_details"]

MAX_IMAGE_SIZES = 8  # each size is traced-checked at export and verified by `verify`: the cost grows with the list
SIZE_MULTIPLE = 32  # stride of feat_s32: every stage's map is exactly size / stride, with no ceil-mode overhang


def _fmt(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def size_label(sizes: Sequence[tuple[int, int]]) -> str:
    """``[(64, 64), (96, 64)]`` -> ``"64x64+96x64"`` (the size part of the package's file name)."""
    return "+".join(_fmt(s) for s in sizes)


def parse_image_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"512x512,640x640,800x1216"`` -> ((512, 512), (640, 640), (800, 1216)); ``"512"`` means 512x512.

    Only the syntax and the count are checked here; :func:`check_image_sizes` checks the sizes themselves.
    """
    sizes = []
    for item in (t.strip() for t in str(text).split(",")):
        try:
            sizes.append(parse_image_size(item))  # each item is an --image-size
        except BadInput:
            raise BadInput(f"--image-sizes {text!r}: {item!r} is not a size: use HEIGHTxWIDTH items separated by "
                           "commas, e.g. 512x512,640x640") from None
    if len(sizes) < 2:
        raise BadInput(f"--image-sizes {text!r} lists one size: list two or more (512x512,640x640), or pass one size "
                       "with --image-size")
    if len(sizes) > MAX_IMAGE_SIZES:
        raise BadInput(f"--image-sizes lists {len(sizes)} sizes, more than the limit of {MAX_IMAGE_SIZES}: "
                       "keep the sizes you deploy")
    dupes = sorted({_fmt(s) for s in sizes if sizes.count(s) > 1})
    if dupes:
        raise BadInput(f"--image-sizes repeats {', '.join(dupes)}: list each size once")
    return tuple(sizes)


def check_image_sizes(req: Any, *, sr_ratios: Sequence[int], max_side: int) -> None:
    """Refuse a request whose ``image_sizes`` Core ML's enumerated shapes cannot honour (one line each)."""
    from nextvit_model import InputSizeError, check_input_size

    sizes = req.image_sizes
    if not sizes:
        return
    if req.target != "coreml":
        raise BadInput(f"--image-sizes applies only to --target coreml, not {req.target}: drop --image-sizes")
    if not req.features_only:
        raise BadInput("--image-sizes needs --backbone (several sizes are for feature maps; a classifier takes "
                       "one): add --backbone or pass one --image-size")
    if tuple(req.image_size) != tuple(sizes[0]):
        raise BadInput(f"--image-size {_fmt(req.image_size)} and --image-sizes {size_label(sizes)} disagree: "
                       "drop --image-size (the first of --image-sizes is the default size)")
    if not 2 <= len(sizes) <= MAX_IMAGE_SIZES:
        raise BadInput(f"--image-sizes lists {len(sizes)} sizes: list 2 to {MAX_IMAGE_SIZES}")
    if len(set(map(tuple, sizes))) != len(sizes):
        raise BadInput(f"--image-sizes {size_label(sizes)} repeats a size: list each size once")
    for h, w in sizes:
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise BadInput(f"--image-sizes {h}x{w} is not a multiple of {SIZE_MULTIPLE} on each side (the stride of "
                           f"feat_s32): use {_round(h)}x{_round(w)}")
        if max(h, w) > max_side:
            raise BadInput(f"--image-sizes {h}x{w} is above the limit of {max_side} pixels a side: use smaller sizes")
        try:
            check_input_size(h, w, sr_ratios)
        except InputSizeError as exc:
            raise BadInput(f"{exc} (in --image-sizes)") from None


def _round(n: int) -> int:
    return max(SIZE_MULTIPLE, round(n / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def enumerated_shapes(ct, sizes: Sequence[tuple[int, int]], batch: int):
    """The ``ct.EnumeratedShapes`` of the NCHW input, the first size as the default."""
    shapes = [(batch, 3, h, w) for h, w in sizes]
    return ct.EnumeratedShapes(shapes=shapes, default=shapes[0])


@torch.no_grad()
def check_trace_sizes(wrapper: nn.Module, traced: torch.jit.ScriptModule, sizes: Sequence[tuple[int, int]], *,
                      batch: int, image_input: bool, progress=None) -> dict[str, float]:
    """Run the (unfrozen) trace and the eager model at every size; returns the relative drift per size.

    Raises:
        DeployError: the trace does not follow the model at some size (it baked in a traced size).
    """
    drifts = {}
    gen = torch.Generator().manual_seed(0)
    for h, w in sizes:
        if progress is not None:
            progress(f"checking the trace at {h}x{w}")
        x = torch.rand((batch, 3, h, w), generator=gen) * 255.0 if image_input else \
            torch.randn((batch, 3, h, w), generator=gen)
        want = wrapper(x)
        try:
            got = traced(x)
        except RuntimeError as exc:  # e.g. a reshape that kept the traced size
            raise DeployError(f"internal: the trace does not run at {h}x{w} (it kept a traced size): "
                              f"{str(exc).splitlines()[0][:200]}") from None
        want = want if isinstance(want, tuple) else (want,)
        got = got if isinstance(got, tuple) else (got,)
        if [tuple(a.shape) for a in want] != [tuple(b.shape) for b in got]:
            raise DeployError(f"internal: the trace gives other output shapes than the model at {h}x{w}")
        drift = max(float((a - b).abs().max() / a.abs().max().clamp_min(1.0)) for a, b in zip(want, got))
        if drift > 1e-5:
            raise DeployError(f"internal: the trace differs from the model by {drift:.2e} at {h}x{w}")
        drifts[_fmt((h, w))] = drift
    return drifts


def shape_details(sizes: Sequence[tuple[int, int]], drifts: dict[str, float]) -> dict[str, Any]:
    """What the manifest records about a flexible-shape package (``verify`` reads ``image_sizes``)."""
    return {
        "flexible_shapes": "EnumeratedShapes",
        "image_sizes": [list(s) for s in sizes],
        "default_image_size": list(sizes[0]),
        "trace_drift_per_size": {k: float(f"{v:.3g}") for k, v in drifts.items()},
    }
