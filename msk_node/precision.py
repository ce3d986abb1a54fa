"""Numeric precision by what this CPU executes natively.

bfloat16 pays off only where the CPU has bf16 instructions (AVX512_BF16 or AMX on x86,
the BF16 extension on Arm). Elsewhere PyTorch and OpenVINO emulate it, and the image
encoder runs about 20x slower than in float32. ``auto`` picks bf16 only where it is
native; an explicit ``bf16`` is honoured but warned about.
"""
from __future__ import annotations

import logging
import os
import platform
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
#: /proc/cpuinfo flags that mean bf16 arithmetic in hardware (x86: AVX-512 BF16, AMX; Arm: BF16).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
#: Measured on a 2-core AVX2-only EPYC: LiteMedSAM encoder 56-63 s/slice under emulated bf16, 2.6 s in fp32.
EMULATED_BF16_SLOWDOWN = 20


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, object]:
    """CPU model name and feature flags from ``/proc/cpuinfo`` (empty flags where it is unreadable)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": model, "flags": flags}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in (platform.machine(), ""):
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return {"model": model, "flags": flags}


def isa_capped_below_bf16() -> bool:
    """True where the environment caps PyTorch or oneDNN (OpenVINO) below the bf16 instructions.

    ``ATEN_CPU_CAPABILITY=avx2`` or ``ONEDNN_MAX_CPU_ISA=AVX2`` make the libraries run as
    on an AVX2-only CPU, where bf16 is emulated whatever /proc/cpuinfo says.
    """
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    onednn_capped = bool(onednn) and onednn != "ALL" and not any(k in onednn for k in ("BF16", "FP16", "AMX",
                                                                                         "AVX10"))
    return aten in ("default", "avx2") or onednn_capped


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where the CPU executes bf16 arithmetic in hardware (``flags``: /proc/cpuinfo's, by default)."""
    if flags is None:
        flags = cpu_info()["flags"] if not isa_capped_below_bf16() else frozenset()
    return bool(NATIVE_BF16_FLAGS & flags)


def resolve_precision(requested: str, flags: frozenset[str] | None = None) -> str:
    """The precision to run: ``auto`` becomes bf16 where native, else fp32.

    Raises
    ------
    ValueError
        If ``requested`` is not one of :data:`PRECISIONS`.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    native = native_bf16(flags)
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16" and not native:
        logger.warning("precision bf16 requested, but this CPU has no native bf16 (AVX512_BF16 or AMX): "
                       "it is emulated and about %dx slower than fp32; use 'auto' or 'fp32'",
                       EMULATED_BF16_SLOWDOWN)
    return requested
