"""The one contract every backend shares: a Runner is a context manager that runs a feed.

``__enter__`` does the heavy work (session creation, engine deserialisation, package loading),
``__exit__`` frees it, construction stays cheap. ``infer`` validates the feed against ``inputs()``
before running, so a wrong image size or dtype fails with a message that names the fix.
No backend imports another; ``nextvit_deploy.targets.open_runner`` picks one for an artifact.
"""
from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ..errors import BadInput

__all__ = ["TensorSpec", "Runner", "check_feed", "Availability"]

R = TypeVar("R", bound="Runner")  # __enter__ returns the runner itself, typed as its own class


@dataclass(frozen=True)
class Availability:
    """Whether a backend runs on this machine: each backend module's ``availability()`` returns one, and
    ``bench``, ``doctor`` and error messages all read it. ``reason`` says why not (with the install hint
    from ``_deps.INSTALL_HINTS``), ``version`` what runs, ``device`` where."""

    name: str
    available: bool
    reason: str = ""
    version: str = ""
    device: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "available": self.available, "reason": self.reason, "version": self.version,
                "device": self.device}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a runner input; ``None`` in ``shape`` is a dynamic dimension.

    ``batch_range`` gives the (min, max) batch a dynamic first dimension accepts.
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    batch_range: tuple[int, int] | None = None


def check_feed(feed: Mapping[str, np.ndarray], specs: list[TensorSpec], *, runner: str) -> None:
    """Raise :class:`BadInput` when ``feed`` does not fit ``specs`` (names, rank, shape, dtype, batch)."""
    expected = {s.name for s in specs}
    if set(feed) != expected:
        raise BadInput(f"{runner} expects inputs {sorted(expected)}, got {sorted(feed)}: rename the feed")
    for spec in specs:
        arr = feed[spec.name]
        if str(arr.dtype) != spec.dtype:
            raise BadInput(f"{runner} input {spec.name!r} must be {spec.dtype}, got {arr.dtype}: "
                           f"convert with .astype(np.{spec.dtype})")
        want = "x".join("N" if d is None else str(d) for d in spec.shape)
        if arr.ndim != len(spec.shape) or any(d is not None and d != a for d, a in zip(spec.shape, arr.shape)):
            got = "x".join(map(str, arr.shape))
            fix = ""
            if arr.ndim == 4 and len(spec.shape) == 4 and spec.shape[2:] != arr.shape[2:]:
                fix = (f": re-export with --image-size {spec.shape[2]}x{spec.shape[3]} to accept "
                       f"{arr.shape[2]}x{arr.shape[3]}, or resize the input")
            raise BadInput(f"{runner} input {spec.name!r} is {got} but the artifact takes {want}{fix}")
        if spec.batch_range is not None:
            lo, hi = spec.batch_range
            if not lo <= arr.shape[0] <= hi:
                raise BadInput(f"{runner} input {spec.name!r} has batch {arr.shape[0]} outside the artifact's "
                               f"range {lo}..{hi}: re-export with --batch {lo}:{arr.shape[0]}:{max(hi, arr.shape[0])}")


class Runner(abc.ABC):
    """Template-method runner: subclasses implement the ``_impl`` methods.

    Attributes:
        name: ``<Backend>Runner`` plus what it runs, shown in reports.
        device: what computed the numbers (``"cpu"``, ``"cuda:0 (NVIDIA H100)"``, ``"MIL evaluator (numpy)"``).
    """

    name: str = "Runner"
    device: str = "cpu"

    def __init__(self) -> None:
        self._active = False

    # lifecycle ------------------------------------------------------------------------------------
    def __enter__(self: R) -> R:
        self._activate_impl()
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._deactivate_impl()
        finally:
            self._active = False

    @property
    def is_active(self) -> bool:
        return self._active

    # contract -------------------------------------------------------------------------------------
    def inputs(self) -> list[TensorSpec]:
        self._require_active("inputs")
        return self._inputs_impl()

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``feed`` (input name -> array) and return output name -> float32/float64 array."""
        self._require_active("infer")
        check_feed(feed, self._inputs_impl(), runner=self.name)
        return self._infer_impl(feed)

    def _require_active(self, what: str) -> None:
        if not self._active:
            raise RuntimeError(f"{self.name}.{what}() called outside 'with runner:'; activate it first")

    # to implement ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def _activate_impl(self) -> None: ...

    def _deactivate_impl(self) -> None:
        return None

    @abc.abstractmethod
    def _inputs_impl(self) -> list[TensorSpec]: ...

    @abc.abstractmethod
    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...
