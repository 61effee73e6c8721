"""Build script for fastoptim's compiled kernels.

Why it is built this way:

* One kernel source, ``fastoptim/_kernels.pxi``, is compiled into several extension
  modules, one per instruction-set level (``_kernels_baseline`` for any x86-64 or other
  CPU, ``_kernels_avx2`` for x86-64-v3, ``_kernels_avx512`` for x86-64-v4).
  ``fastoptim/_dispatch.py`` picks one at import from the CPU's features (NumPy's
  dispatch idea, at module granularity). The default build is portable: no
  flag that tunes for the build machine (``-march`` is only ever an x86-64 level).
* OpenMP is detected by compiling a probe program. Without it the build still
  succeeds and the kernels run single-threaded (a warning says so here, and
  ``fastoptim.show_config()`` says so at run time).
* ``-fno-math-errno`` lets ``sqrtf`` compile to a vector instruction; ``-ffast-math``
  is never used (it would allow approximate rsqrt and may enable flush-to-zero for the
  whole process).
"""
import glob
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

# Per-ISA variants: module suffix -> extra compiler flags (GCC/Clang spelling).
X86_VARIANTS = {
    "avx2": ["-march=x86-64-v3", "-mtune=generic"],
    "avx512": ["-march=x86-64-v4", "-mtune=generic", "-mprefer-vector-width=512"],
}

PROBE_OPENMP = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return omp_get_max_threads() > 0 && n > 0 ? 0 : 1;
}
"""

PROBE_ISA = r"""
int main(void) {
    float a[64], b[64];
    for (int i = 0; i < 64; i++) { a[i] = (float)i; b[i] = 1.0f; }
    for (int i = 0; i < 64; i++) a[i] = a[i] * b[i] + 1.0f;
    return a[3] > 0.0f ? 0 : 1;
}
"""


def _is_msvc(compiler):
    return getattr(compiler, "compiler_type", "") == "msvc"


def _try_compile(compiler, source, extra_compile=(), extra_link=()):
    """Return True when `source` compiles and links with the given flags.

    The probe is linked as an executable, and distutils' executable link does not
    read LDFLAGS (its shared-library link, used for the real modules, does): LDFLAGS
    are added here, so that e.g. ``LDFLAGS=-L$(brew --prefix libomp)/lib`` reaches
    the OpenMP probe as it reaches the modules."""
    tmp = tempfile.mkdtemp(prefix="fastoptim-probe-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        devnull = open(os.devnull, "w")
        old_out, old_err = os.dup(1), os.dup(2)
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=list(extra_compile))
            ldflags = [] if _is_msvc(compiler) else shlex.split(os.environ.get("LDFLAGS", ""))
            compiler.link_executable(objs, os.path.join(tmp, "probe"),
                                     extra_postargs=list(extra_link) + ldflags)
            return True
        except Exception:
            return False
        finally:
            os.dup2(old_out, 1)
            os.dup2(old_err, 2)
            os.close(old_out)
            os.close(old_err)
            devnull.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _openmp_flags(compiler):
    if os.environ.get("FASTOPTIM_NO_OPENMP"):
        return None
    if _is_msvc(compiler):
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    for cflags, lflags in candidates:
        if _try_compile(compiler, PROBE_OPENMP, cflags, lflags):
            return cflags, lflags
    return None


def _is_x86_64():
    machine = (os.environ.get("FASTOPTIM_TARGET_MACHINE") or platform.machine()).lower()
    return machine in ("x86_64", "amd64")


class BuildExt(build_ext):
    """Decide OpenMP and ISA variants from what the compiler accepts."""

    def finalize_options(self):
        super().finalize_options()
        # The kernel paths are three compiles of one large C file each, independent:
        # build them side by side unless told otherwise (pip and `python -m build` pass
        # no -j). FASTOPTIM_BUILD_JOBS=1 builds one at a time.
        if not self.parallel:
            jobs = os.environ.get("FASTOPTIM_BUILD_JOBS")
            self.parallel = int(jobs) if jobs else min(len(self.extensions),
                                                      os.cpu_count() or 1)

    def build_extensions(self):
        compiler = self.compiler
        msvc = _is_msvc(compiler)
        omp = _openmp_flags(compiler)
        if omp is None:
            warnings.warn(
                "fastoptim: the C compiler does not support OpenMP; the kernels are "
                "built single-threaded (fastoptim.show_config() reports this).")
            print("*** fastoptim: building WITHOUT OpenMP: kernels will run single-threaded ***",
                  file=sys.stderr)
        if msvc:
            base = ["/O2", "/fp:precise"]
        else:
            base = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                    "-Wno-unused-function", "-Wno-unreachable-code"]
        keep = []
        for ext in self.extensions:
            variant = ext.name.rsplit("_", 1)[-1]
            isa = []
            if variant in X86_VARIANTS:
                isa = X86_VARIANTS[variant]
                if msvc or not _try_compile(compiler, PROBE_ISA, isa):
                    print(f"fastoptim: compiler rejects {isa}; skipping {ext.name}",
                          file=sys.stderr)
                    continue
            ext.extra_compile_args = base + isa + (omp[0] if omp else [])
            ext.extra_link_args = (omp[1] if omp else [])
            ext.define_macros = list(ext.define_macros or []) + [
                ("FASTOPTIM_OPENMP", "1" if omp else "0"),
                ("FASTOPTIM_ISA", f'"{variant}"'),
                ("FASTOPTIM_CFLAGS", '"' + " ".join(ext.extra_compile_args) + '"'),
                ("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION"),
            ]
            keep.append(ext)
        self.extensions = keep
        super().build_extensions()


def _generate():
    """Expand the Tempita templates (``*.pxi.tp``) of the kernel sources next to them:
    the loops and dispatch that are generated around each rule's element math."""
    from Cython import Tempita
    for tp in glob.glob(os.path.join(HERE, "fastoptim", "_kernels", "**", "*.pxi.tp"),
                        recursive=True):
        out = tp[:-3]
        with open(tp, encoding="utf-8") as f:
            text = Tempita.sub(f.read())
        old = None
        if os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                old = f.read()
        if text != old:                  # unchanged output keeps its timestamp
            with open(out, "w", encoding="utf-8") as f:
                f.write(text)


def _extensions():
    _generate()
    variants = ["baseline"]
    if _is_x86_64() and not os.environ.get("FASTOPTIM_BASELINE_ONLY"):
        variants += list(X86_VARIANTS)
    exts = []
    for v in variants:
        exts.append(Extension(
            f"fastoptim._kernels_{v}",
            sources=[f"fastoptim/_kernels_{v}.pyx"],
            include_dirs=[np.get_include(), os.path.join(HERE, "src_c")],
            depends=["fastoptim/_kernels.pxi"] + sorted(
                glob.glob(os.path.join("fastoptim", "_kernels", "**", "*.pxi*"),
                          recursive=True)) + [
                os.path.join("src_c", f) for f in os.listdir(os.path.join(HERE, "src_c"))],
        ))
    return exts


setup(
    ext_modules=cythonize(
        _extensions(),
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "nonecheck": False,
        },
    ),
    cmdclass={"build_ext": BuildExt},
)
