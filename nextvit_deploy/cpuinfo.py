"""CPU features that decide INT8 settings (a leaf: read by ``export`` and ``bench`` alike)."""
from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["INT8_FLAGS", "cpu_name", "cpu_flags", "int8_weight_bits"]

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags(text: str | None = None) -> tuple[str, ...]:
    """The INT8-relevant x86 flags of this CPU (from ``/proc/cpuinfo``, or ``text`` in its format)."""
    text = _cpuinfo() if text is None else text
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return tuple(f for f in INT8_FLAGS if f in have)
    return ()


def int8_weight_bits(flags: tuple[str, ...] | None = None) -> int:
    """8-bit weights where the CPU has VNNI or AMX (no u8 x s8 pair overflow: the dot product accumulates in
    int32), 7-bit without (AVX2/AVX-512BW's ``vpmaddubsw`` saturates int16 pairs of u8 x s8 products)."""
    flags = cpu_flags() if flags is None else flags
    return 8 if any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")) else 7
