"""Compressed-weight ops of ML Programs, decompressed to dense numpy arrays (once, when a program loads).

A compressed Core ML package stores a weight as a ``constexpr_*`` op whose inputs are constants; Core
ML expands it at load time (or on the fly), and so does :class:`~.coreml_mil.MilEvaluator` through
:func:`decompress`. Each function below follows the formula in the op's documentation in coremltools
9.0 (``mil/ops/defs/iOS16/constexpr_ops.py``, ``mil/ops/defs/iOS18/compression.py``); none calls
coremltools, so the tests can hold coremltools' own ``decompress`` against them.

* ``constexpr_affine_dequantize`` (iOS16): ``scale * (quantized_data - zero_point)``, with a vector
  ``scale``/``zero_point`` broadcast along ``axis``.
* ``constexpr_blockwise_shift_scale`` (iOS18): ``scale * (data - offset)`` where ``scale`` and
  ``offset`` have the data's rank and each covers a block of ``data.shape[i] / scale.shape[i]`` along dim i.
* ``constexpr_lut_to_dense`` (iOS16): ``lut[indices]`` with ``n_bits = log2(len(lut))``-bit indices
  packed into bytes starting at the least significant bit, reshaped to ``shape``.
* ``constexpr_lut_to_dense`` (iOS18): indices already of the output's shape (sub-byte types), one
  lookup table per block: ``lut`` has rank ``indices.rank + 2`` (``[..blocks.., palettes, vector]``);
  scalar palettization (vector size 1) only.

Arithmetic is float32 (int8 differences and fp16 scales are exact there) and the result is stored in
the op's declared output dtype by the evaluator, as for every other op. Anything else (sparse
weights, vector palettization, chained constexpr ops) is refused, never approximated.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["CONSTEXPR_OPS", "affine_dequantize", "blockwise_shift_scale", "unpack_lsb_first", "lut_to_dense_packed",
           "lut_to_dense_blocked", "decompress"]

Refuse = Callable[[str], Any]  # raises UnsupportedMilOp (never returns)


def affine_dequantize(quantized_data: np.ndarray, zero_point: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """iOS16 ``constexpr_affine_dequantize``: ``scale * (quantized_data - zero_point)`` (float32)."""
    q = np.asarray(quantized_data).astype(np.float32)
    axis = axis + q.ndim if axis < 0 else axis

    def along_axis(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v).astype(np.float32)
        if v.ndim == 0:
            return v
        shape = [1] * q.ndim
        shape[axis] = v.shape[0]
        return v.reshape(shape)

    return along_axis(scale) * (q - along_axis(zero_point))


def blockwise_shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """iOS18 ``constexpr_blockwise_shift_scale``: ``scale * (data - offset)`` per block (float32)."""
    d = np.asarray(data).astype(np.float32)
    s = np.asarray(scale).astype(np.float32)
    o = None if offset is None else np.asarray(offset).astype(np.float32)
    for dim, (n, m) in enumerate(zip(d.shape, s.shape)):
        if n % m:
            raise ValueError(f"data dim {dim} ({n}) is not a multiple of the scale's ({m})")
        s = np.repeat(s, n // m, axis=dim)
        if o is not None:
            o = np.repeat(o, n // m, axis=dim)
    return s * (d - o) if o is not None else s * d


def unpack_lsb_first(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """``count`` unsigned ``nbits``-bit fields packed one byte at a time from the least significant bit up
    (a field split across bytes continues in the next byte's low bits). Returns int64 values."""
    data = np.asarray(packed).astype(np.uint8).reshape(-1)
    if data.size * 8 < nbits * count:
        raise ValueError(f"{data.size} bytes hold fewer than {count} fields of {nbits} bits")
    start = np.arange(count, dtype=np.int64) * nbits  # first bit of each field, bit 0 = byte 0's LSB
    out = np.zeros(count, dtype=np.int64)
    for j in range(nbits):
        bit = start + j
        out |= ((data[bit // 8].astype(np.int64) >> (bit % 8)) & 1) << j
    return out


def lut_to_dense_packed(indices: np.ndarray, lut: np.ndarray, shape) -> np.ndarray:
    """iOS16 ``constexpr_lut_to_dense``: ``lut[index]`` for each packed index, reshaped to ``shape``."""
    table = np.asarray(lut).reshape(-1)
    nbits = int(round(np.log2(table.size)))
    if 2 ** nbits != table.size or nbits not in (1, 2, 4, 6, 8):
        raise ValueError(f"a lookup table of {table.size} entries (needs 2, 4, 16, 64 or 256)")
    dims = [int(d) for d in np.asarray(shape).reshape(-1)]
    count = int(np.prod(dims))
    return table.astype(np.float32)[unpack_lsb_first(indices, nbits, count)].reshape(dims)


def lut_to_dense_blocked(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """iOS18 ``constexpr_lut_to_dense`` with scalar entries: element ``i`` reads the table of its block,
    ``lut[i // block][indices[i]]`` with ``block = indices.shape / lut.shape[:-2]``."""
    idx = np.asarray(indices).astype(np.int64)
    table = np.asarray(lut).astype(np.float32)
    if table.ndim != idx.ndim + 2 or table.shape[-1] != 1:
        raise ValueError(f"lut of shape {table.shape} for indices of shape {idx.shape} (scalar palettes only)")
    grid = table.shape[:-2]
    if any(n % m for n, m in zip(idx.shape, grid)):
        raise ValueError(f"indices {idx.shape} are not whole blocks of the lut grid {grid}")
    block = [np.arange(n) // (n // m) for n, m in zip(idx.shape, grid)]
    return table[tuple(np.ix_(*block)) + (idx, 0)]


def _affine(v: Mapping[str, Any], refuse: Refuse) -> np.ndarray:
    return affine_dequantize(v["quantized_data"], v["zero_point"], v["scale"], int(v["axis"]))


def _shift_scale(v: Mapping[str, Any], refuse: Refuse) -> np.ndarray:
    return blockwise_shift_scale(v["data"], v["scale"], v.get("offset"))


def _lut(v: Mapping[str, Any], refuse: Refuse) -> np.ndarray:
    if v.get("shape") is not None:  # the iOS16 form: packed bytes + rank-1 lut + shape
        return lut_to_dense_packed(v["indices"], v["lut"], v["shape"])
    if v.get("vector_axis") is not None or np.asarray(v["lut"]).shape[-1] != 1:
        refuse("vector palettization (lut entries longer than 1)")
    return lut_to_dense_blocked(v["indices"], v["lut"])


CONSTEXPR_OPS: dict[str, Callable[[Mapping[str, Any], Refuse], np.ndarray]] = {
    "constexpr_affine_dequantize": _affine,
    "constexpr_blockwise_shift_scale": _shift_scale,
    "constexpr_lut_to_dense": _lut,
}
"""Compressed-weight op type -> decompression. Other ``constexpr_*`` ops are refused like unknown ops."""


def decompress(op, refuse: Refuse) -> np.ndarray:
    """The dense float32 value of the compressed-weight op ``op`` (a MIL Operation whose inputs are constants)."""
    values: dict[str, Any] = {}
    for name, var in op.inputs.items():
        if var is None:
            continue
        if getattr(var, "val", None) is None:
            refuse(f"input {name!r} computed by another op ({var.op.op_type if var.op is not None else 'none'}); "
                   "only constant inputs are implemented")
        values[name] = var.val
    try:
        return CONSTEXPR_OPS[op.op_type](values, refuse)
    except (ValueError, IndexError) as exc:
        refuse(f"inputs outside the op's definition ({exc})")
        raise  # unreachable: refuse raises
