# Compiled in-place update kernels for every rule in fastoptim.reference.
#
# Design, point by point (read with the project design notes and fastoptim/reference.py):
#
# * This file is compiled several times, once per instruction-set level
#   (_kernels_baseline.pyx, _kernels_avx2.pyx, _kernels_avx512.pyx each include it; see
#   setup.py). fastoptim/_dispatch.py imports the widest one the CPU runs. The element
#   loops are plain C loops over raw pointers that the compiler vectorizes for
#   whatever level the module was built for.
# * The code lives in parts, included at the end of this file: _kernels/runtime.pxi,
#   checks.pxi, step.pxi and objects.pxi (the machinery every rule shares), and one
#   file per rule in _kernels/rules/ (its element loop, per-array scalars and
#   prepare_* entry point).
# * One call updates a whole list of arrays ("multi-tensor"). It happens in two stages:
#   ``prepare_*`` (holding the GIL) checks every array and hyperparameter and builds a
#   ``Step``; ``Step.run()`` (GIL released once) cannot fail. Nothing is written before
#   every check has passed, so a refused call leaves all arrays bit-for-bit unchanged,
#   and an optimizer can prepare all its parameter groups before running any.
# * The concatenated element range of all arrays is split into one contiguous piece
#   per thread, on 64-byte boundaries of the parameter, inside ONE parallel region
#   (prange); each thread walks the arrays its piece covers. Below a size threshold
#   the step stays serial: a small step never pays for a thread team.
# * Per element the kernels do what torch.optim's default (for-each-free) path does,
#   operation for operation: x.add_(y, alpha=a) is x + a*y, addcmul is x + (v*a)*b,
#   addcdiv is x + (v*a)/b, lerp uses torch's two-sided formula. Scalars that depend
#   only on the step (bias corrections, decayed lr) are computed once per array in
#   double, then rounded to the array's dtype.
# * Elements are independent, so results do not depend on the thread count.
#
# Roles: every rule reads a parameter and a gradient and updates the parameter and
# zero to three state arrays of the same shape. ``grads[i] is None`` skips parameter i
# (its state and step are left alone), as a missing ``.grad`` does in torch.

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.math cimport sqrt, sqrtf, pow, fabs, fabsf, isfinite, log, exp, INFINITY
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t, INT64_MAX
from libc.stdlib cimport qsort
from libc.string cimport memset
from cython.parallel cimport prange
cimport numpy as cnp

import numbers

import numpy as np
try:
    from numpy.lib.array_utils import byte_bounds as _byte_bounds
except ImportError:                      # NumPy < 2
    from numpy import byte_bounds as _byte_bounds

cnp.import_array()

cdef extern from "fo_bf16.h" nogil:
    float fo_bf16_to_f32(uint16_t h)
    uint32_t fo_f32_bits(float f)
    uint16_t fo_f32_to_bf16_rne(float f)
    uint16_t fo_f32_to_bf16_sr(float f, uint32_t random_bits)
    uint32_t fo_hash32(uint32_t x)

cdef extern from "fo_runtime.h" nogil:
    void fo_prefetch_write(const void *p, long long nbytes)
    int fo_openmp_enabled()
    int fo_omp_max_threads()
    int fo_omp_num_procs()
    int fo_cpu_isa_level()
    const char *fo_build_isa()
    const char *fo_build_cflags()

ctypedef fused floating:
    float
    double

cdef enum:
    MAX_ROLES = 5        # param, grad and up to three state arrays
    ROLE_PARAM = 0
    ROLE_GRAD = 1
    ALIGN_BYTES = 64     # thread pieces start on cache-line boundaries of the parameter


# The parts, in this order (types before their users):
include "_kernels/runtime.pxi"      # build facts, threads, calibration, Batch
include "_kernels/checks.pxi"       # overlap, array and argument checks, non-finite scan
include "_kernels/step.pxi"         # Step: gather, reuse, run; the partition
include "_kernels/objects.pxi"      # data addresses of tensors, for kept torch steps
include "_kernels/storage.pxi"      # state formats: inline load and store per format
include "_kernels/rules/common.pxi"
include "_kernels/rules/sgd.pxi"
include "_kernels/rules/adagrad.pxi"
include "_kernels/rules/rmsprop.pxi"
include "_kernels/rules/adam.pxi"
include "_kernels/rules/adamax.pxi"
include "_kernels/rules/adadelta.pxi"
include "_kernels/rules/radam.pxi"
include "_kernels/rules/rprop.pxi"
include "_kernels/rules/nadam.pxi"
include "_kernels/rules/asgd.pxi"
include "_kernels/rules/lion.pxi"
include "_kernels/rules/adopt.pxi"
include "_kernels/rules/ademamix.pxi"
include "_kernels/rules/sophiah.pxi"
include "_kernels/rules/schedulefree.pxi"
include "_kernels/rules/adafactor.pxi"
include "_kernels/rules/traffic.pxi"
include "_kernels/rules/adahessian.pxi"
include "_kernels/segments.pxi"     # generated (setup.py, segments.pxi.tp): per-rule dispatch
