"""Choose the kernel module for this CPU, once, at import.

setup.py compiles ``_kernels.pxi`` once per instruction-set level. Here the widest
level that both the CPU supports and the build produced is imported; the environment
variable ``FASTOPTIM_ISA`` (``baseline``, ``avx2`` or ``avx512``) forces a lower one.
"""
import importlib
import importlib.util
import os

from . import _kernels_baseline as _baseline

#: instruction-set levels, widest first: (module suffix, x86-64 level it needs)
LEVELS = (("avx512", 4), ("avx2", 3), ("baseline", 0))

_ALIASES = {"avx512": "avx512", "x86-64-v4": "avx512", "avx2": "avx2",
            "x86-64-v3": "avx2", "baseline": "baseline", "sse": "baseline",
            "generic": "baseline", "": None}


def _available():
    return [name for name, _level in LEVELS
            if importlib.util.find_spec(f"{__package__}._kernels_{name}") is not None]


def _choose():
    cpu_level = _baseline.cpu_isa_level()
    built = _available()
    supported = [name for name, level in LEVELS if name in built and cpu_level >= level]
    forced = os.environ.get("FASTOPTIM_ISA", "").strip().lower()
    if forced not in _ALIASES:
        raise ImportError(f"FASTOPTIM_ISA={forced!r} is not one of "
                          f"baseline, avx2, avx512")
    forced = _ALIASES[forced]
    if forced is not None:
        order = [n for n, _ in LEVELS]
        supported = [n for n in supported if order.index(n) >= order.index(forced)]
    name = supported[0] if supported else "baseline"
    return name, built, cpu_level


ISA, BUILT, CPU_LEVEL = _choose()
kernels = importlib.import_module(f"{__package__}._kernels_{ISA}")
