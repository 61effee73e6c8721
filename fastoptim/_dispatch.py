"""Which kernel modules this process may run, and the only place that imports them.

setup.py compiles ``_kernels.pxi`` once per instruction-set level. A module built for a
level the CPU lacks must never be *imported*, not only never called: the AVX-512
module's own start-up code already executes AVX-512 instructions, and importing it on
a CPU without them kills the process (SIGILL). So:

* :data:`RUNNABLE` lists the built levels this process may run, widest first: those the
  CPU (and OS) support, capped by the environment variable ``FASTOPTIM_ISA``
  (``baseline``, ``avx2`` or ``avx512``), which makes a wider machine behave exactly like
  a smaller one. :data:`ISA` is the first of them, :data:`kernels` its module.
* :func:`load` is the one way to get a kernel module; it refuses a level outside
  :data:`RUNNABLE` with an ImportError instead of crashing.
* The process-wide kernel settings (the serial threshold; the calibration lives inside
  each module and runs at its first use) are kept here and applied to every module
  :func:`load` has loaded, and to each one it loads later: they never reach a module the
  CPU may not run.
"""
import importlib
import importlib.util
import os
import sys

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _source_folder_error():
    """The ImportError for an import of this package from a folder that has no
    compiled kernels: the source checkout (NumPy and scikit-learn do the same)."""
    in_checkout = os.path.isfile(os.path.join(os.path.dirname(_PACKAGE_DIR), "setup.py"))
    where = ("the source checkout, which has no compiled kernels"
             if in_checkout else "a folder without its compiled kernels")
    return ImportError(
        f"fastoptim is being imported from {_PACKAGE_DIR}, {where} "
        f"(fastoptim/_kernels_baseline*.so). Python looks in the current directory "
        f"first: run from another directory once it is installed (pip install .), use "
        f"the console scripts (fastoptim-bench, fastoptim-demo), or build the kernels "
        f"in place for development (pip install -e . or python setup.py build_ext "
        f"--inplace).")


def _here(name):
    """The spec of kernel module ``name`` if it lies in this package's folder (an
    editable install's finder may otherwise answer with another folder's module)."""
    spec = importlib.util.find_spec(f"{__package__}._kernels_{name}")
    if spec is None or spec.origin is None:
        return None
    return spec if os.path.dirname(os.path.abspath(spec.origin)) == _PACKAGE_DIR else None


if _here("baseline") is None:
    raise _source_folder_error()

from . import _kernels_baseline as _baseline  # noqa: E402  (every x86-64 CPU runs it)

#: instruction-set levels, widest first: (module suffix, x86-64 level it needs)
LEVELS = (("avx512", 4), ("avx2", 3), ("baseline", 0))

_ALIASES = {"avx512": "avx512", "x86-64-v4": "avx512", "avx2": "avx2",
            "x86-64-v3": "avx2", "baseline": "baseline", "sse": "baseline",
            "generic": "baseline", "": None}


def _forced():
    forced = os.environ.get("FASTOPTIM_ISA", "").strip().lower()
    if forced not in _ALIASES:
        raise ImportError(f"FASTOPTIM_ISA={forced!r} is not one of "
                          f"baseline, avx2, avx512")
    return _ALIASES[forced]


#: the CPU's x86-64 level (0 = below v3 or not x86-64; 3 = AVX2/FMA; 4 = AVX-512)
CPU_LEVEL = int(_baseline.cpu_isa_level())
#: the levels this installation built (their modules are found, not imported)
BUILT = tuple(name for name, _level in LEVELS if _here(name) is not None)
#: the level named by FASTOPTIM_ISA, or None
FORCED = _forced()


def _runnable():
    order = [name for name, _level in LEVELS]
    cap = order.index(FORCED) if FORCED is not None else 0
    return tuple(name for name, level in LEVELS
                 if name in BUILT and CPU_LEVEL >= level and order.index(name) >= cap)


#: the built levels this process may run, widest first (always ends with "baseline")
RUNNABLE = _runnable()
#: the level the kernels run on
ISA = RUNNABLE[0]


def why_not(name):
    """Why the ``name`` kernels cannot run in this process ("" when they can)."""
    levels = dict(LEVELS)
    if name not in levels:
        return f"{name!r} is not one of {', '.join(levels)}"
    if name not in BUILT:
        return f"the {name} kernels were not built on this platform"
    if CPU_LEVEL < levels[name]:
        return (f"this CPU (x86-64 level {CPU_LEVEL}) cannot run the {name} kernels "
                f"(x86-64-v{levels[name]})")
    if name not in RUNNABLE:
        return f"FASTOPTIM_ISA={os.environ.get('FASTOPTIM_ISA')} rules out the {name} kernels"
    return ""


_settings = {"serial_threshold": None}
_loaded = {}


def load(name):
    """The kernel module for level ``name``, imported (once) only if this process may
    run it; the process-wide settings are applied to it."""
    mod = _loaded.get(name)
    if mod is not None:
        return mod
    reason = why_not(name)
    if reason:
        raise ImportError(f"refusing to import fastoptim._kernels_{name}: {reason}")
    mod = importlib.import_module(f"{__package__}._kernels_{name}")
    _apply(mod)
    _loaded[name] = mod
    return mod


def loaded():
    """The kernel modules loaded so far, by level."""
    return dict(_loaded)


def _apply(mod):
    n = _settings["serial_threshold"]
    mod.set_serial_threshold(None if n is None else min(int(n), sys.maxsize))


def serial_threshold():
    """The serial threshold the user set (None: each rule calibrates its own)."""
    return _settings["serial_threshold"]


def set_serial_threshold(n):
    """Record the serial threshold (None: calibrate) and apply it to every loaded
    kernel module (arguments are checked by ``fastoptim.set_serial_threshold``)."""
    _settings["serial_threshold"] = n
    for mod in _loaded.values():
        _apply(mod)


kernels = load(ISA)
