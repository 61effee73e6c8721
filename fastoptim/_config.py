"""One home for threading policy and build facts (scikit-learn's _openmp_helpers idea).

* ``n_threads=None`` means what OpenMP would use: ``OMP_NUM_THREADS`` when set, else the
  processors OpenMP sees. A negative count counts back from the processors (-1 = all).
* Whether a step is worth a thread team is decided in the kernels: a step smaller than
  a per-rule threshold, calibrated at first use (or :func:`set_serial_threshold`), runs
  on the calling thread without entering an OpenMP region.
* After ``os.fork()`` (multiprocessing's "fork" start method) the child process runs
  every kernel on one thread. GNU OpenMP (libgomp, what GCC builds link) keeps the
  parent's thread team in the forking thread's state; the team's threads do not exist
  in the child, so the child's first parallel region would wait for them forever.
  One thread per forked worker is also what a pool of worker processes wants.
"""
import numbers
import os
import platform

from . import _dispatch

_kernels = _dispatch.kernels
_openmp = bool(_kernels.openmp_enabled())
_num_threads = None
_forked_child = False

#: most threads a step may use: a team far larger than the machine only costs thread
#: creation (and libgomp crashes when it cannot create the threads it is asked for)
MAX_THREADS = max(256, 4 * int(_kernels.omp_num_procs()))


def _after_fork_in_child():
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _default_threads():
    return max(1, int(_kernels.omp_max_threads()))


def set_num_threads(n=None):
    """Set the number of threads the kernels use.

    Parameters
    ----------
    n : int or None
        Positive: that many threads (at most :data:`MAX_THREADS`). Negative: the number
        of processors plus one plus ``n`` (-1 = all processors). None: back to the
        default (``OMP_NUM_THREADS``, else all processors).

    In a child process made by ``os.fork()`` the kernels stay on one thread whatever
    is set here (see the module's notes).
    """
    global _num_threads
    if n is None:
        _num_threads = None
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int or None, got {type(n).__name__}")
    n = int(n)
    if n == 0:
        raise ValueError("n must be nonzero (positive: a count; negative: counts back "
                         "from the number of processors)")
    if n > MAX_THREADS:
        raise ValueError(f"n must be at most {MAX_THREADS} (4x the processors, at least "
                         f"256), got {n}")
    if n < 0:
        n = max(1, _kernels.omp_num_procs() + 1 + n)
    _num_threads = n


def get_num_threads():
    """The number of threads a step may use (1 when built without OpenMP, and in a
    child process made by ``os.fork()``)."""
    if not _openmp or _forked_child:
        return 1
    return min(_num_threads if _num_threads is not None else _default_threads(),
               MAX_THREADS)


def set_serial_threshold(n):
    """Steps with fewer elements than ``n`` (summed over all arrays) stay serial.

    By default (``n=None``) each rule and dtype calibrates its own threshold at first
    use: the region cost of a thread team against that rule's per-element cost. A
    threshold beyond any possible size (e.g. ``2**70``) keeps every step serial."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral)
                          or n < 0):
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    _dispatch.set_serial_threshold(None if n is None else int(n))


def get_serial_threshold():
    """The threshold used before calibration, or the one set by the user."""
    return _kernels.get_serial_threshold()


if os.environ.get("FASTOPTIM_SERIAL_THRESHOLD"):
    set_serial_threshold(int(os.environ["FASTOPTIM_SERIAL_THRESHOLD"]))


def config():
    """Build and runtime facts as a dict (what :func:`show_config` prints)."""
    names = {0: "baseline", 3: "x86-64-v3 (AVX2, FMA)", 4: "x86-64-v4 (AVX-512)"}
    from . import __version__
    return {
        "version": __version__,
        "kernel_path": _dispatch.ISA,
        "kernel_paths_built": list(_dispatch.BUILT),
        "kernel_paths_runnable": list(_dispatch.RUNNABLE),
        "cpu_level": names.get(_dispatch.CPU_LEVEL, str(_dispatch.CPU_LEVEL)),
        "forced_by_FASTOPTIM_ISA": os.environ.get("FASTOPTIM_ISA") or None,
        "openmp": bool(_kernels.openmp_enabled()),
        "num_threads": get_num_threads(),
        "forked_child": _forked_child,
        "omp_max_threads": int(_kernels.omp_max_threads()),
        "serial_threshold": get_serial_threshold(),
        "calibration": _kernels.calibration(),
        "compile_flags": _kernels.build_cflags(),
        "8bit_decode": ("byte permutes (AVX512-VBMI)" if _kernels._q8_permute_decode()
                        else "gathers" if _dispatch.ISA != "baseline" else "scalar loads"),
        "machine": platform.machine(),
    }


def show_config():
    """Print which kernel path runs, OpenMP and threads, and the build flags."""
    cfg = config()
    width = max(len(k) for k in cfg)
    for key, value in cfg.items():
        print(f"{key:<{width}}  {value}")
    if not cfg["openmp"]:
        print("note: built without OpenMP; every kernel runs single-threaded")
