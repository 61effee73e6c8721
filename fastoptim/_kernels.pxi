# Compiled in-place update kernels for every rule in fastoptim.reference.
#
# Design, point by point (read with the project design notes and fastoptim/reference.py):
#
# * This file is compiled several times, once per instruction-set level
#   (_kernels_baseline.pyx, _kernels_avx2.pyx, _kernels_avx512.pyx each include it; see
#   setup.py). fastoptim/_dispatch.py imports the widest one the CPU runs. The element
#   loops below are plain C loops over raw pointers that the compiler vectorizes for
#   whatever level the module was built for.
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
from libc.math cimport sqrt, sqrtf, pow, isfinite, INFINITY
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t, uintptr_t, INT64_MAX
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
    uint16_t fo_f32_to_bf16_rne(float f)
    uint16_t fo_f32_to_bf16_sr(float f, uint32_t random_bits)
    uint32_t fo_hash32(uint32_t x)

cdef extern from "fo_runtime.h" nogil:
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


# ---------------------------------------------------------------------------------
# Build facts and threading knobs
# ---------------------------------------------------------------------------------

def openmp_enabled():
    """True when this module was compiled with OpenMP."""
    return bool(fo_openmp_enabled())


def omp_max_threads():
    """omp_get_max_threads() (honours OMP_NUM_THREADS), or 1 without OpenMP."""
    return fo_omp_max_threads()


def omp_num_procs():
    return fo_omp_num_procs()


def cpu_isa_level():
    """0 baseline, 3 x86-64-v3 (AVX2+FMA), 4 x86-64-v4 (AVX-512)."""
    return fo_cpu_isa_level()


def build_isa():
    return fo_build_isa().decode()


def build_cflags():
    return fo_build_cflags().decode()


# When is a step worth a thread team? A parallel region costs a fixed time (about a
# microsecond with warm threads); splitting n elements of per-element cost c over two
# threads saves n*c/2. So the break-even size is 2 * region / c, and c depends on the
# rule and dtype. Each (rule, dtype) calibrates itself at first use: its first
# CALIBRATION_RUNS steps of a mid size run serially and are timed (they are real
# updates, nothing extra is computed), the region cost is measured once, and from then
# on steps below the computed threshold stay serial. Until then, and whenever the user
# sets a threshold, _serial_threshold applies.

cdef enum:
    N_KINDS = 8                  # rule kinds (Step.kind), see the prepare_* functions
    KIND_SGD = 0
    KIND_ADAGRAD = 1
    KIND_RMSPROP = 2
    KIND_ADAM = 3
    KIND_ADAM_BF16 = 4
    KIND_TRAFFIC = 5
    KIND_ADAHESSIAN = 6
    CALIBRATION_RUNS = 3
    CALIBRATION_MIN = 4096
    CALIBRATION_MAX = 1 << 18

cdef Py_ssize_t _serial_threshold = 1 << 15
cdef bint _user_threshold = False
cdef Py_ssize_t _thresholds[N_KINDS][2]
cdef double _calib_ns_per_elem[N_KINDS][2]
cdef int _calib_runs[N_KINDS][2]
cdef double _region_ns = -1.0
cdef int _region_sink[64]


def set_serial_threshold(n):
    """Steps with fewer elements than `n` (summed over arrays) run on one thread;
    None returns to the per-rule thresholds calibrated at first use."""
    global _serial_threshold, _user_threshold
    if n is None:
        _user_threshold = False
        _serial_threshold = 1 << 15
    else:
        _user_threshold = True
        _serial_threshold = max(<Py_ssize_t> n, 0)


def get_serial_threshold():
    """The fixed threshold in force before calibration (or set by the user)."""
    return _serial_threshold


def calibration():
    """{"rule/dtype": threshold} for the rules calibrated so far, and the region cost."""
    names = ("sgd", "adagrad", "rmsprop", "adam", "adam-bf16", "traffic", "adahessian",
             "kind7")
    out = {}
    cdef int k, d
    for k in range(N_KINDS):
        for d in range(2):
            if _calib_runs[k][d] >= CALIBRATION_RUNS:
                out[names[k] + ("/float64" if d else "/float32")] = dict(
                    threshold=_thresholds[k][d], ns_per_element=_calib_ns_per_elem[k][d])
    return {"region_ns": _region_ns if _region_ns >= 0 else None, "rules": out}


cdef double _measure_region(int n_threads):
    """Median cost (ns) of an OpenMP region with warm threads."""
    from time import perf_counter_ns
    cdef int r, c
    cdef list times = []
    for r in range(40):
        t0 = perf_counter_ns()
        with nogil:
            for c in prange(n_threads, num_threads=n_threads, schedule="static", chunksize=1):
                _region_sink[c % 64] = r
        times.append(perf_counter_ns() - t0)
    times = sorted(times[10:])
    return <double> times[len(times) // 2]


# ---------------------------------------------------------------------------------
# The prepared step
# ---------------------------------------------------------------------------------

cdef struct Batch:
    Py_ssize_t n                 # arrays updated this step (grad not None)
    int nroles
    void **ptr[MAX_ROLES]        # ptr[role][t]: data of array t for that role (NULL if unused)
    char *is_double              # is_double[t]: dtype of array t
    Py_ssize_t *offsets          # offsets[t]: start of array t in the concatenated range; n+1
    Py_ssize_t *index            # index[t]: position of array t in the caller's lists
    int64_t *steps               # per-parameter step counters (caller's array) or NULL
    double *ts0                  # per-array scalars, filled by run() from the steps
    double *ts1
    # hyperparameters (double; rounded to each array's dtype inside the loop)
    double lr, momentum, dampening, weight_decay, eps, alpha, lr_decay
    double beta1, beta2
    double hessian_power         # AdaHessian (_kernels_hessian.pxi)
    bint maximize, nesterov, centered, amsgrad, decoupled
    # bfloat16 state (Adam/AdamW): state arrays hold uint16 bfloat16 bits
    bint bf16, stochastic
    uint32_t seed
    uint32_t *tkey               # per-array key for stochastic rounding (from the step)


ctypedef void (*segment_fn)(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                            Py_ssize_t hi) noexcept nogil
ctypedef void (*scalars_fn)(Batch *b, Py_ssize_t t) noexcept nogil


cdef struct Interval:
    uintptr_t start
    uintptr_t end
    int written
    int role
    Py_ssize_t index


cdef bint _first_conflict(Interval *iv, Py_ssize_t n, Py_ssize_t *a,
                          Py_ssize_t *b) noexcept nogil:
    """Sort the intervals; find one that overlaps another where at least one of the two
    is written. Sets iv[*a] (the later one) and iv[*b]; True when found."""
    cdef Py_ssize_t k, who_all = -1, who_w = -1
    cdef uintptr_t max_end_all = 0, max_end_w = 0
    qsort(iv, n, sizeof(Interval), _cmp_interval)
    for k in range(n):
        if iv[k].written and who_all >= 0 and iv[k].start < max_end_all:
            a[0], b[0] = k, who_all
            return True
        if not iv[k].written and who_w >= 0 and iv[k].start < max_end_w:
            a[0], b[0] = k, who_w
            return True
        if iv[k].end > max_end_all or who_all < 0:
            max_end_all = iv[k].end
            who_all = k
        if iv[k].written and (iv[k].end > max_end_w or who_w < 0):
            max_end_w = iv[k].end
            who_w = k
    return False


def first_overlap(list written, list read):
    """Memory overlap across lists of arrays (None entries and empty arrays skipped):
    None, or (list_a, index_a, written_a, list_b, index_b, written_b) for an array that
    overlaps another where at least one of them is in `written`. List numbers count
    the `written` lists first, then the `read` ones. (For optimizers with several
    parameter groups: each group's own call checks only within the group.)"""
    cdef Py_ssize_t total = 0, n = 0, k = 0, who = 0, r, i
    cdef list lists = written + read
    cdef Interval *iv
    cdef cnp.ndarray a
    for r in range(len(lists)):
        total += len(lists[r])
    iv = <Interval *> PyMem_Malloc(max(total, 1) * sizeof(Interval))
    if iv == NULL:
        raise MemoryError()
    try:
        for r in range(len(lists)):
            for i in range(len(lists[r])):
                obj = lists[r][i]
                if obj is None or not cnp.PyArray_Check(obj):
                    continue
                a = <cnp.ndarray> obj
                if cnp.PyArray_NBYTES(a) == 0:
                    continue
                lo, hi = _byte_bounds(a) if not (cnp.PyArray_IS_C_CONTIGUOUS(a) or
                                                    cnp.PyArray_IS_F_CONTIGUOUS(a)) \
                    else (<uintptr_t> cnp.PyArray_DATA(a),
                          <uintptr_t> cnp.PyArray_DATA(a) + cnp.PyArray_NBYTES(a))
                iv[n].start = lo
                iv[n].end = hi
                iv[n].written = r < len(written)
                iv[n].role = r
                iv[n].index = i
                n += 1
        if not _first_conflict(iv, n, &k, &who):
            return None
        return (iv[k].role, iv[k].index, bool(iv[k].written),
                iv[who].role, iv[who].index, bool(iv[who].written))
    finally:
        PyMem_Free(iv)


cdef int _cmp_interval(const void *a, const void *b) noexcept nogil:
    cdef const Interval *x = <const Interval *> a
    cdef const Interval *y = <const Interval *> b
    if x.start < y.start:
        return -1
    if x.start > y.start:
        return 1
    return 0


cdef str _layout(cnp.ndarray a):
    """'A' when the memory order does not matter (C and F at once), else 'C' or 'F'."""
    cdef bint c = cnp.PyArray_IS_C_CONTIGUOUS(a)
    cdef bint f = cnp.PyArray_IS_F_CONTIGUOUS(a)
    if c and f:
        return "A"
    if c:
        return "C"
    if f:
        return "F"
    return ""


cdef cnp.ndarray _check_array(object obj, str name, Py_ssize_t i, bint written,
                              cnp.ndarray like, str like_name, bint bf16=False):
    """Return obj as an ndarray after checking it; raise TypeError/ValueError naming it.
    With bf16, obj must be a uint16 array of bfloat16 bits shaped like `like`."""
    cdef cnp.ndarray a
    cdef int typenum
    if not cnp.PyArray_Check(obj):
        raise TypeError(f"{name}[{i}] must be a numpy.ndarray, got {type(obj).__name__}")
    a = <cnp.ndarray> obj
    typenum = cnp.PyArray_TYPE(a)
    if bf16:
        if typenum != cnp.NPY_UINT16:
            raise TypeError(f"{name}[{i}] must have dtype uint16 (bfloat16 bits) for "
                            f"bfloat16 state, got {a.dtype}")
    elif typenum != cnp.NPY_FLOAT and typenum != cnp.NPY_DOUBLE:
        raise TypeError(f"{name}[{i}] must have dtype float32 or float64, got {a.dtype}")
    if not cnp.PyArray_ISNOTSWAPPED(a):
        raise TypeError(f"{name}[{i}] must be in native byte order, got dtype {a.dtype.str}")
    if like is not None:
        if not bf16 and typenum != cnp.PyArray_TYPE(like):
            raise TypeError(f"{name}[{i}] has dtype {a.dtype} but {like_name}[{i}] has "
                            f"dtype {like.dtype}; they must match")
        if a.ndim != like.ndim or not cnp.PyArray_SAMESHAPE(a, like):
            raise ValueError(f"{name}[{i}] has shape {(<object>a).shape} but {like_name}[{i}] has "
                             f"shape {(<object>like).shape}; they must match")
    if written:
        if not cnp.PyArray_ISWRITEABLE(a):
            raise ValueError(f"{name}[{i}] is read-only; it is updated in place")
        if not cnp.PyArray_ISALIGNED(a):
            raise ValueError(f"{name}[{i}] is not aligned to its dtype")
        lay = _layout(a)
        if not lay:
            raise ValueError(f"{name}[{i}] is not contiguous (strides {(<object>a).strides}); "
                             f"updated arrays must be C- or F-contiguous")
        if like is not None:
            like_lay = _layout(like)
            if lay != "A" and like_lay != "A" and lay != like_lay:
                raise ValueError(f"{name}[{i}] is {lay}-contiguous but {like_name}[{i}] "
                                 f"is {like_lay}-contiguous; they must share a memory order")
    return a


def check_array(obj, str name, Py_ssize_t index, bint written=True):
    """Check one array as the kernels would check a parameter; return it or raise."""
    return _check_array(obj, name, index, written, None, None)


#: role names for messages of a reused step (the prepare_* functions name their lists)
_ROLE_NAMES = ("params", "grads", "state", "state", "state")


def gather_counts(cnp.ndarray addresses, cnp.ndarray doubles, cnp.ndarray out):
    """For the torch drop-in's ``state["step"]`` tensors: ``out[i]`` = the step count
    stored at ``addresses[i]`` (int64 array of addresses of live 0-d tensors the caller
    holds; a float64 there if ``doubles[i]`` else a float32). Returns -1, or the first i
    whose value is not a whole number in [0, 2**63 - 1) (``out`` is then partly
    written)."""
    cdef Py_ssize_t i, n = cnp.PyArray_SIZE(out)
    cdef int64_t *a = <int64_t *> cnp.PyArray_DATA(addresses)
    cdef char *dbl = <char *> cnp.PyArray_DATA(doubles)
    cdef int64_t *o = <int64_t *> cnp.PyArray_DATA(out)
    cdef double x
    if (cnp.PyArray_TYPE(addresses) != cnp.NPY_INT64 or cnp.PyArray_SIZE(addresses) != n
            or cnp.PyArray_ITEMSIZE(doubles) != 1 or cnp.PyArray_SIZE(doubles) != n
            or cnp.PyArray_TYPE(out) != cnp.NPY_INT64
            or not (cnp.PyArray_IS_C_CONTIGUOUS(addresses) and
                    cnp.PyArray_IS_C_CONTIGUOUS(doubles) and cnp.PyArray_IS_C_CONTIGUOUS(out))):
        raise TypeError("gather_counts takes contiguous int64 addresses, 1-byte flags and "
                        "an int64 output of one length")
    for i in range(n):
        x = (<double *> <uintptr_t> a[i])[0] if dbl[i] else (<float *> <uintptr_t> a[i])[0]
        if not (x >= 0 and x < 9.2233720368547748e18 and x == <double> <int64_t> x):
            return i
        o[i] = <int64_t> x
    return -1


def scatter_counts(cnp.ndarray addresses, cnp.ndarray doubles, cnp.ndarray counts):
    """The reverse of :func:`gather_counts`: store ``counts[i]`` at ``addresses[i]``."""
    cdef Py_ssize_t i, n = cnp.PyArray_SIZE(counts)
    cdef int64_t *a = <int64_t *> cnp.PyArray_DATA(addresses)
    cdef char *dbl = <char *> cnp.PyArray_DATA(doubles)
    cdef int64_t *c = <int64_t *> cnp.PyArray_DATA(counts)
    if (cnp.PyArray_TYPE(addresses) != cnp.NPY_INT64 or cnp.PyArray_SIZE(addresses) != n
            or cnp.PyArray_ITEMSIZE(doubles) != 1 or cnp.PyArray_SIZE(doubles) != n
            or cnp.PyArray_TYPE(counts) != cnp.NPY_INT64
            or not (cnp.PyArray_IS_C_CONTIGUOUS(addresses) and
                    cnp.PyArray_IS_C_CONTIGUOUS(doubles) and cnp.PyArray_IS_C_CONTIGUOUS(counts))):
        raise TypeError("scatter_counts takes contiguous int64 addresses, 1-byte flags and "
                        "int64 counts of one length")
    for i in range(n):
        if dbl[i]:
            (<double *> <uintptr_t> a[i])[0] = <double> c[i]
        else:
            (<float *> <uintptr_t> a[i])[0] = <float> c[i]


cdef class Step:
    """A checked, ready-to-run update of a list of arrays. ``run()`` cannot fail."""
    cdef Batch b
    cdef list keep                 # arrays (and grad copies) kept alive until run()
    cdef cnp.ndarray steps_arr
    cdef segment_fn segment
    cdef scalars_fn scalars
    cdef Py_ssize_t total
    cdef bint done
    cdef int kind                  # KIND_*: which rule, for the serial-size calibration
    cdef bint reusable             # run() may be called again (see make_reusable)
    cdef Interval *wiv             # reusable: written arrays' byte intervals, by start
    cdef Py_ssize_t nwiv

    def __cinit__(self):
        memset(&self.b, 0, sizeof(Batch))
        self.wiv = NULL
        self.nwiv = 0
        self.reusable = False
        self.keep = []
        self.done = False

    def __dealloc__(self):
        cdef int r
        for r in range(MAX_ROLES):
            PyMem_Free(self.b.ptr[r])
        PyMem_Free(self.b.is_double)
        PyMem_Free(self.b.offsets)
        PyMem_Free(self.b.index)
        PyMem_Free(self.b.ts0)
        PyMem_Free(self.b.ts1)
        PyMem_Free(self.b.tkey)
        PyMem_Free(self.wiv)

    @property
    def size(self):
        """Number of elements this step updates (summed over arrays)."""
        return self.total

    @property
    def count(self):
        """Number of arrays this step updates."""
        return self.b.n

    cdef _gather(self, tuple names, tuple lists, tuple written, object steps):
        """Check every array, copy grads whose layout differs from their parameter's,
        check that no updated array overlaps another array, and record pointers."""
        cdef list params = lists[0]
        cdef list grads = lists[1]
        cdef Py_ssize_t n = len(params), i, t, k, r, nint = 0
        cdef int nroles = len(lists)
        cdef cnp.ndarray p, a
        cdef Interval *iv = NULL
        cdef Py_ssize_t who = 0
        cdef Py_ssize_t nbytes
        cdef object obj, lst

        for r in range(1, nroles):
            lst = lists[r]
            if lst is not None and len(lst) != n:
                raise ValueError(f"{names[r]} has {len(lst)} entries, expected {n} "
                                 f"(one per parameter)")
        if steps is not None:
            if not cnp.PyArray_Check(steps):
                raise TypeError(f"steps must be a numpy.ndarray of int64, got "
                                f"{type(steps).__name__}")
            a = <cnp.ndarray> steps
            if cnp.PyArray_TYPE(a) != cnp.NPY_INT64 or not cnp.PyArray_ISNOTSWAPPED(a):
                raise TypeError(f"steps must have dtype int64, got {a.dtype}")
            if a.ndim != 1 or a.shape[0] != n:
                raise ValueError(f"steps must have shape ({n},), got {(<object>a).shape}")
            if not cnp.PyArray_ISWRITEABLE(a) or not cnp.PyArray_IS_C_CONTIGUOUS(a):
                raise ValueError("steps must be a writeable contiguous array "
                                 "(it is incremented in place)")
            for i in range(n):
                # < INT64_MAX: the counter is incremented in place (no signed overflow)
                if not 0 <= (<int64_t *> cnp.PyArray_DATA(a))[i] < INT64_MAX:
                    raise ValueError(f"steps[{i}] is {(<object>a)[i]}; steps must be >= 0 "
                                     f"and < 2**63 - 1")
            self.steps_arr = a

        self.b.nroles = nroles
        for r in range(nroles):
            self.b.ptr[r] = <void **> PyMem_Malloc(max(n, 1) * sizeof(void *))
        self.b.is_double = <char *> PyMem_Malloc(max(n, 1) * sizeof(char))
        self.b.offsets = <Py_ssize_t *> PyMem_Malloc((n + 1) * sizeof(Py_ssize_t))
        self.b.index = <Py_ssize_t *> PyMem_Malloc(max(n, 1) * sizeof(Py_ssize_t))
        self.b.ts0 = <double *> PyMem_Malloc(max(n, 1) * sizeof(double))
        self.b.ts1 = <double *> PyMem_Malloc(max(n, 1) * sizeof(double))
        self.b.tkey = <uint32_t *> PyMem_Malloc(max(n, 1) * sizeof(uint32_t))
        if (self.b.is_double == NULL or self.b.offsets == NULL or self.b.index == NULL
                or self.b.ts0 == NULL or self.b.ts1 == NULL or self.b.tkey == NULL):
            raise MemoryError()
        for r in range(nroles):
            if self.b.ptr[r] == NULL:
                raise MemoryError()

        iv = <Interval *> PyMem_Malloc((n * nroles + 1) * sizeof(Interval))   # + steps
        if iv == NULL:
            raise MemoryError()
        try:
            t = 0
            self.b.offsets[0] = 0
            for i in range(n):
                obj = grads[i]
                if obj is None:
                    continue
                p = _check_array(params[i], names[0], i, True, None, None)
                if self.b.bf16 and cnp.PyArray_TYPE(p) != cnp.NPY_FLOAT:
                    raise TypeError(f"{names[0]}[{i}] has dtype {p.dtype}; bfloat16 state "
                                    f"is for float32 parameters")
                self.b.is_double[t] = cnp.PyArray_TYPE(p) == cnp.NPY_DOUBLE
                self.b.index[t] = i
                nbytes = cnp.PyArray_NBYTES(p)
                for r in range(nroles):
                    lst = lists[r]
                    if r == ROLE_PARAM:
                        a = p
                    elif lst is None:
                        self.b.ptr[r][t] = NULL
                        continue
                    elif r == ROLE_GRAD:
                        a = _check_array(obj, names[r], i, False, p, names[0])
                        if _layout(a) not in ("A", _layout(p)) or not cnp.PyArray_ISALIGNED(a):
                            # Read-only input in another memory order: a copy in the
                            # parameter's order keeps the element-wise walk correct.
                            a = np.array(a, order="F" if _layout(p) == "F" else "C")
                            self.keep.append(a)
                    else:
                        obj = lst[i]
                        if obj is None:
                            raise ValueError(f"{names[r]}[{i}] is None but grads[{i}] "
                                             f"is not; state is needed for every updated "
                                             f"parameter")
                        a = _check_array(obj, names[r], i, True, p, names[0],
                                         self.b.bf16)
                        obj = grads[i]
                    self.b.ptr[r][t] = cnp.PyArray_DATA(a)
                    if nbytes > 0:
                        iv[nint].start = <uintptr_t> cnp.PyArray_DATA(a)
                        iv[nint].end = iv[nint].start + <uintptr_t> cnp.PyArray_NBYTES(a)
                        iv[nint].written = r != ROLE_GRAD
                        iv[nint].role = r
                        iv[nint].index = i
                        nint += 1
                self.b.offsets[t + 1] = self.b.offsets[t] + cnp.PyArray_SIZE(p)
                t += 1
            self.b.n = t
            self.total = self.b.offsets[t]
            if self.steps_arr is not None and cnp.PyArray_NBYTES(self.steps_arr) > 0:
                # the step counters are written too: they may not overlap any array
                iv[nint].start = <uintptr_t> cnp.PyArray_DATA(self.steps_arr)
                iv[nint].end = iv[nint].start + <uintptr_t> cnp.PyArray_NBYTES(self.steps_arr)
                iv[nint].written = 1
                iv[nint].role = -1
                iv[nint].index = 0
                nint += 1

            # No updated array may overlap any other array of the call.
            if _first_conflict(iv, nint, &k, &who):
                self._overlap_error(names, iv[k], iv[who])
        finally:
            PyMem_Free(iv)
        self.keep.append(lists)
        if self.steps_arr is not None:
            self.b.steps = <int64_t *> cnp.PyArray_DATA(self.steps_arr)

    cdef _overlap_error(self, tuple names, Interval a, Interval b):
        x = "steps" if a.role < 0 else f"{names[a.role]}[{a.index}]"
        y = "steps" if b.role < 0 else f"{names[b.role]}[{b.index}]"
        if a.role == b.role and a.index == b.index:
            raise ValueError(f"{x} appears twice")
        raise ValueError(f"{x} overlaps {y} in memory; arrays that are updated in place "
                         f"must not share memory with any other argument")

    # --- reuse: the torch drop-in keeps a prepared step for as long as its parameters,
    # state and options stay the same, and per step only points it at the new gradients

    cdef Py_ssize_t _itemsize(self, Py_ssize_t t, int role) noexcept nogil:
        if role >= 2 and self.b.bf16:
            return 2
        return 8 if self.b.is_double[t] else 4

    def make_reusable(self):
        """Let ``run()`` be called any number of times; between runs, ``set_grads()`` may
        point the gradients at new memory. The arrays, hyperparameters and step
        counters array stay those of ``prepare_*`` (the caller keeps them alive and
        unchanged in layout: the step holds only their addresses)."""
        cdef Py_ssize_t t, n = 0, nbytes, a, b
        cdef int r
        if self.reusable:
            return
        for t in range(self.b.n):
            if self.b.offsets[t + 1] == self.b.offsets[t]:
                continue
            for r in range(self.b.nroles):
                if r == ROLE_GRAD or self.b.ptr[r][t] == NULL:
                    continue
                n += 1
        self.wiv = <Interval *> PyMem_Malloc((n + 1) * sizeof(Interval))
        if self.wiv == NULL:
            raise MemoryError()
        n = 0
        for t in range(self.b.n):
            if self.b.offsets[t + 1] == self.b.offsets[t]:
                continue
            for r in range(self.b.nroles):
                if r == ROLE_GRAD or self.b.ptr[r][t] == NULL:
                    continue
                nbytes = (self.b.offsets[t + 1] - self.b.offsets[t]) * self._itemsize(t, r)
                self.wiv[n].start = <uintptr_t> self.b.ptr[r][t]
                self.wiv[n].end = self.wiv[n].start + <uintptr_t> nbytes
                self.wiv[n].written = 1
                self.wiv[n].role = r
                self.wiv[n].index = self.b.index[t]
                n += 1
        if self.steps_arr is not None and cnp.PyArray_NBYTES(self.steps_arr) > 0:
            self.wiv[n].start = <uintptr_t> cnp.PyArray_DATA(self.steps_arr)
            self.wiv[n].end = self.wiv[n].start + <uintptr_t> cnp.PyArray_NBYTES(self.steps_arr)
            self.wiv[n].written = 1
            self.wiv[n].role = -1
            self.wiv[n].index = 0
            n += 1
        # written arrays never overlap one another (checked by _gather): sorted by start,
        # they are sorted by end too
        qsort(self.wiv, n, sizeof(Interval), _cmp_interval)
        self.nwiv = n
        self.reusable = True

    def set_grads(self, list addresses):
        """Point the gradient of each updated array (in this step's order: the arrays
        whose gradient was not None) at a new address, given as an int: memory laid out
        exactly as the gradient given to ``prepare_*`` (dtype, shape, dense in the
        parameter's memory order), which the caller guarantees and keeps alive until
        the next ``run()``. Checked here: alignment, and no overlap with any array the
        step writes. A refused call raises ValueError naming ``grads[i]`` and changes
        nothing."""
        cdef Py_ssize_t n = self.b.n, t, lo, hi, mid, itemsize, nbytes
        cdef uintptr_t addr, end
        cdef void **tmp
        cdef Interval g
        if not self.reusable:
            raise RuntimeError("set_grads() needs make_reusable() first")
        if len(addresses) != n:
            raise ValueError(f"addresses has {len(addresses)} entries, expected {n}")
        tmp = <void **> PyMem_Malloc(max(n, 1) * sizeof(void *))
        if tmp == NULL:
            raise MemoryError()
        try:
            for t in range(n):
                try:
                    addr = <uintptr_t> (<unsigned long long> addresses[t])
                except (TypeError, OverflowError):
                    raise ValueError(f"grads[{self.b.index[t]}]: the address must be an "
                                     f"int in [0, 2**64), got {addresses[t]!r}") from None
                itemsize = self._itemsize(t, ROLE_GRAD)
                nbytes = (self.b.offsets[t + 1] - self.b.offsets[t]) * itemsize
                tmp[t] = <void *> addr
                if nbytes == 0:
                    continue
                if addr == 0 or addr % itemsize != 0:
                    raise ValueError(f"grads[{self.b.index[t]}] is not aligned to its dtype")
                end = addr + <uintptr_t> nbytes
                # the last written interval that starts before this one ends
                lo, hi = 0, self.nwiv
                while lo < hi:
                    mid = (lo + hi) // 2
                    if self.wiv[mid].start < end:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo > 0 and self.wiv[lo - 1].end > addr:
                    g.start, g.end, g.written, g.role = addr, end, 0, ROLE_GRAD
                    g.index = self.b.index[t]
                    self._overlap_error(_ROLE_NAMES, g, self.wiv[lo - 1])
            for t in range(n):
                self.b.ptr[ROLE_GRAD][t] = tmp[t]
        finally:
            PyMem_Free(tmp)

    def take_hyperparameters(self, Step other):
        """Copy the hyperparameters of ``other`` -- a step of the same rule prepared for
        no arrays, which checked them -- into this reusable step (a scheduler changed
        ``lr``, ...). False, and nothing copied, when ``other`` runs another loop or
        another storage format; the caller also keeps the state arrays the same (an
        option that adds or removes one needs a new step)."""
        if (other.segment != self.segment or other.scalars != self.scalars
                or other.kind != self.kind or other.b.nroles != self.b.nroles
                or other.b.bf16 != self.b.bf16 or other.b.stochastic != self.b.stochastic
                or other.b.amsgrad != self.b.amsgrad or other.b.centered != self.b.centered):
            return False
        self.b.lr, self.b.momentum, self.b.dampening = other.b.lr, other.b.momentum, other.b.dampening
        self.b.weight_decay, self.b.eps, self.b.alpha = other.b.weight_decay, other.b.eps, other.b.alpha
        self.b.lr_decay, self.b.beta1, self.b.beta2 = other.b.lr_decay, other.b.beta1, other.b.beta2
        self.b.hessian_power, self.b.seed = other.b.hessian_power, other.b.seed
        self.b.maximize, self.b.nesterov = other.b.maximize, other.b.nesterov
        self.b.decoupled = other.b.decoupled
        return True

    def run(self, int n_threads=1):
        """Apply the update in place. Runs at most once (unless made reusable)."""
        cdef int k = self.kind, d
        cdef Py_ssize_t threshold = _serial_threshold
        if self.done and not self.reusable:
            raise RuntimeError("this step has already run")
        self.done = True
        d = 1 if (self.b.n > 0 and self.b.is_double[0]) else 0
        if n_threads > 1 and not _user_threshold and fo_openmp_enabled():
            if _calib_runs[k][d] >= CALIBRATION_RUNS:
                threshold = _thresholds[k][d]
            elif CALIBRATION_MIN <= self.total <= CALIBRATION_MAX:
                self._calibration_run(k, d, n_threads)
                return
        with nogil:
            _run_batch(&self.b, self.segment, self.scalars, n_threads, threshold)

    cdef _calibration_run(self, int k, int d, int n_threads):
        """Run serially, timed; after CALIBRATION_RUNS of them set the threshold."""
        global _region_ns
        from time import perf_counter_ns
        t0 = perf_counter_ns()
        with nogil:
            _run_batch(&self.b, self.segment, self.scalars, 1, 0)
        cdef double ns = <double> (perf_counter_ns() - t0) / self.total
        if _calib_runs[k][d] == 0 or ns < _calib_ns_per_elem[k][d]:
            _calib_ns_per_elem[k][d] = ns
        _calib_runs[k][d] += 1
        if _calib_runs[k][d] == CALIBRATION_RUNS:
            if _region_ns < 0:
                _region_ns = _measure_region(n_threads)
            _thresholds[k][d] = <Py_ssize_t> min(max(
                2.0 * _region_ns / max(_calib_ns_per_elem[k][d], 1e-3), 2048.0), 1 << 20)


cdef void _run_batch(Batch *b, segment_fn seg, scalars_fn scal, int n_threads,
                     Py_ssize_t threshold) noexcept nogil:
    cdef Py_ssize_t t, c, nchunks, total = b.offsets[b.n]
    for t in range(b.n):
        if b.steps != NULL:
            b.steps[b.index[t]] += 1
        if scal != NULL:
            scal(b, t)
    if total == 0:
        return
    if n_threads <= 1 or total < threshold or not fo_openmp_enabled():
        for t in range(b.n):
            if b.offsets[t + 1] > b.offsets[t]:
                seg(b, t, 0, b.offsets[t + 1] - b.offsets[t])
        return
    nchunks = n_threads
    for c in prange(nchunks, num_threads=n_threads, schedule="static", chunksize=1):
        _run_piece(b, seg, c, nchunks)


cdef Py_ssize_t _find(const Batch *b, Py_ssize_t pos) noexcept nogil:
    """The array t with offsets[t] <= pos < offsets[t+1] (pos < total)."""
    cdef Py_ssize_t lo = 0, hi = b.n, mid
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if b.offsets[mid] <= pos:
            lo = mid
        else:
            hi = mid
    return lo


cdef Py_ssize_t _boundary(const Batch *b, Py_ssize_t c, Py_ssize_t nchunks) noexcept nogil:
    """Start of piece c: an even split, moved down to a cache-line boundary of the
    parameter array it falls in. Depends only on (b, c, nchunks), so neighbours agree."""
    cdef Py_ssize_t total = b.offsets[b.n], pos, t, local, itemsize, mis
    if c <= 0:
        return 0
    if c >= nchunks:
        return total
    pos = <Py_ssize_t> ((<double> total) * c / nchunks)
    t = _find(b, pos)
    local = pos - b.offsets[t]
    itemsize = 8 if b.is_double[t] else 4
    mis = <Py_ssize_t> ((<uintptr_t> b.ptr[ROLE_PARAM][t] + local * itemsize) % ALIGN_BYTES)
    if mis % itemsize == 0:
        local -= min(local, mis // itemsize)
    return b.offsets[t] + local


cdef void _run_piece(const Batch *b, segment_fn seg, Py_ssize_t c,
                     Py_ssize_t nchunks) noexcept nogil:
    cdef Py_ssize_t lo = _boundary(b, c, nchunks), hi = _boundary(b, c + 1, nchunks)
    cdef Py_ssize_t t, end
    if lo >= hi:
        return
    t = _find(b, lo)
    while lo < hi:
        end = min(hi, b.offsets[t + 1])
        if end > lo:
            seg(b, t, lo - b.offsets[t], end - b.offsets[t])
        lo = end
        t += 1


# ---------------------------------------------------------------------------------
# Element rules. Each loop reads like fastoptim/reference.py with types.
# ---------------------------------------------------------------------------------

cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _lerp(floating start, floating end, floating w) noexcept nogil:
    # torch.lerp: start + w*(end-start) for w < 0.5, else end - (end-start)*(1-w)
    # (<floating> 1): a bare 1 would become the C double 1.0 and promote the product
    cdef floating one = 1
    if w < 0.5:
        return start + w * (end - start)
    return end - (end - start) * (one - w)


# Flags that decide which arrays a loop touches (momentum, centered, amsgrad) are
# literal constants at every call site, so the compiler emits one branch-free,
# vectorized copy of the loop per combination. The other flags only choose between
# values and become vector blends.

cdef inline void _sgd_loop(floating *p, const floating *g, floating *buf, Py_ssize_t n,
                           floating lr, floating wd, floating mom, floating damp1,
                           bint has_wd, bint has_mom, bint first, bint nesterov,
                           bint maximize) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, bi
    cdef floating neg_lr = -lr
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        if has_wd:
            gi = gi + wd * p[i]
        if has_mom:
            bi = buf[i] * mom + damp1 * gi
            bi = gi if first else bi
            buf[i] = bi
            gi = gi + mom * bi if nesterov else bi
        p[i] = p[i] + neg_lr * gi


cdef void _sgd_segment(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                       Py_ssize_t hi) noexcept nogil:
    cdef bint first = b.ts0[t] != 0.0
    cdef bint has_wd = b.weight_decay != 0.0
    if b.is_double[t]:
        if b.momentum != 0.0:
            _sgd_loop(<double *> b.ptr[0][t] + lo, <const double *> b.ptr[1][t] + lo,
                      <double *> b.ptr[2][t] + lo, hi - lo, b.lr, b.weight_decay,
                      b.momentum, 1.0 - b.dampening, has_wd, True, first, b.nesterov,
                      b.maximize)
        else:
            _sgd_loop(<double *> b.ptr[0][t] + lo, <const double *> b.ptr[1][t] + lo,
                      NULL, hi - lo, b.lr, b.weight_decay, 0.0, 1.0, has_wd, False,
                      False, False, b.maximize)
    else:
        if b.momentum != 0.0:
            _sgd_loop(<float *> b.ptr[0][t] + lo, <const float *> b.ptr[1][t] + lo,
                      <float *> b.ptr[2][t] + lo, hi - lo, <float> b.lr,
                      <float> b.weight_decay, <float> b.momentum,
                      <float> (1.0 - b.dampening), has_wd, True, first, b.nesterov,
                      b.maximize)
        else:
            _sgd_loop(<float *> b.ptr[0][t] + lo, <const float *> b.ptr[1][t] + lo,
                      NULL, hi - lo, <float> b.lr, <float> b.weight_decay, 0.0, 1.0,
                      has_wd, False, False, False, b.maximize)


cdef void _sgd_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    # The momentum buffer is set to the gradient on a parameter's first step.
    b.ts0[t] = 1.0 if (b.steps != NULL and b.steps[b.index[t]] == 1) else 0.0


cdef inline void _adagrad_loop(floating *p, const floating *g, floating *acc, Py_ssize_t n,
                               floating clr, floating wd, floating eps, bint has_wd,
                               bint maximize) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, s
    cdef floating neg_clr = -clr
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        if has_wd:
            gi = gi + wd * p[i]
        s = acc[i] + gi * gi
        acc[i] = s
        p[i] = p[i] + (neg_clr * gi) / (_sqrt(s) + eps)


cdef void _adagrad_segment(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                           Py_ssize_t hi) noexcept nogil:
    if b.is_double[t]:
        _adagrad_loop(<double *> b.ptr[0][t] + lo, <const double *> b.ptr[1][t] + lo,
                      <double *> b.ptr[2][t] + lo, hi - lo, b.ts0[t], b.weight_decay,
                      b.eps, b.weight_decay != 0.0, b.maximize)
    else:
        _adagrad_loop(<float *> b.ptr[0][t] + lo, <const float *> b.ptr[1][t] + lo,
                      <float *> b.ptr[2][t] + lo, hi - lo, <float> b.ts0[t],
                      <float> b.weight_decay, <float> b.eps, b.weight_decay != 0.0,
                      b.maximize)


cdef void _adagrad_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    cdef double step = <double> b.steps[b.index[t]]
    b.ts0[t] = b.lr / (1.0 + (step - 1.0) * b.lr_decay)


cdef inline void _rmsprop_loop(floating *p, const floating *g, floating *sq, floating *ga,
                               floating *buf, Py_ssize_t n, floating lr, floating alpha,
                               floating one_minus_alpha, floating eps, floating wd,
                               floating mom, bint has_wd, bint centered, bint has_mom,
                               bint maximize) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, s, a, avg, bi
    cdef floating neg_lr = -lr
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        if has_wd:
            gi = gi + wd * p[i]
        s = sq[i] * alpha + (one_minus_alpha * gi) * gi
        sq[i] = s
        if centered:
            a = _lerp(ga[i], gi, one_minus_alpha)
            ga[i] = a
            avg = _sqrt(s + (-a) * a) + eps
        else:
            avg = _sqrt(s) + eps
        if has_mom:
            bi = buf[i] * mom + gi / avg
            buf[i] = bi
            p[i] = p[i] + neg_lr * bi
        else:
            p[i] = p[i] + (neg_lr * gi) / avg


cdef inline void _rmsprop_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                                Py_ssize_t hi, floating *p, const floating *g,
                                floating *sq, floating *ga, floating *buf) noexcept nogil:
    cdef floating lr = <floating> b.lr, alpha = <floating> b.alpha
    cdef floating one_minus_alpha = <floating> (1.0 - b.alpha)
    cdef floating eps = <floating> b.eps, wd = <floating> b.weight_decay
    cdef floating mom = <floating> b.momentum
    cdef bint has_wd = b.weight_decay != 0.0
    cdef Py_ssize_t n = hi - lo
    p += lo
    g += lo
    sq += lo
    if b.centered:
        ga += lo
        if b.momentum > 0.0:
            buf += lo
            _rmsprop_loop(p, g, sq, ga, buf, n, lr, alpha, one_minus_alpha, eps, wd, mom,
                          has_wd, True, True, b.maximize)
        else:
            _rmsprop_loop(p, g, sq, ga, buf, n, lr, alpha, one_minus_alpha, eps, wd, mom,
                          has_wd, True, False, b.maximize)
    else:
        if b.momentum > 0.0:
            buf += lo
            _rmsprop_loop(p, g, sq, ga, buf, n, lr, alpha, one_minus_alpha, eps, wd, mom,
                          has_wd, False, True, b.maximize)
        else:
            _rmsprop_loop(p, g, sq, ga, buf, n, lr, alpha, one_minus_alpha, eps, wd, mom,
                          has_wd, False, False, b.maximize)


cdef void _rmsprop_segment(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                           Py_ssize_t hi) noexcept nogil:
    if b.is_double[t]:
        _rmsprop_typed(b, t, lo, hi, <double *> b.ptr[0][t], <const double *> b.ptr[1][t],
                       <double *> b.ptr[2][t], <double *> b.ptr[3][t],
                       <double *> b.ptr[4][t])
    else:
        _rmsprop_typed(b, t, lo, hi, <float *> b.ptr[0][t], <const float *> b.ptr[1][t],
                       <float *> b.ptr[2][t], <float *> b.ptr[3][t],
                       <float *> b.ptr[4][t])


cdef inline void _adam_loop(floating *p, const floating *g, floating *m, floating *v,
                            floating *vmax, Py_ssize_t n, floating step_size,
                            floating inv_bc2_sqrt, floating one_minus_b1, floating beta2,
                            floating one_minus_b2, floating eps, floating wd,
                            floating decay, bint l2, bint amsgrad,
                            bint maximize) noexcept nogil:
    # decay is 1 - lr*weight_decay for AdamW and exactly 1 otherwise (x*1 == x).
    cdef Py_ssize_t i
    cdef floating gi, pi, mi, vi, vm, x, denom
    cdef floating neg_step = -step_size
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        pi = p[i]
        if l2:
            gi = gi + wd * pi
        pi = pi * decay
        mi = _lerp(m[i], gi, one_minus_b1)
        m[i] = mi
        vi = v[i] * beta2 + (one_minus_b2 * gi) * gi
        v[i] = vi
        if amsgrad:
            vm = vmax[i]
            # torch.maximum: NaN in either operand propagates (two selects, no
            # short-circuit `or`, which would put branches in the vector loop)
            x = vm if vi <= vm else vi
            vm = vm if vm != vm else x
            vmax[i] = vm
            vi = vm
        denom = _sqrt(vi) * inv_bc2_sqrt + eps
        p[i] = pi + (neg_step * mi) / denom


cdef inline void _adam_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                             floating *p, const floating *g, floating *m, floating *v,
                             floating *vmax) noexcept nogil:
    cdef bint has_wd = b.weight_decay != 0.0
    cdef bint l2 = has_wd and not b.decoupled
    cdef floating decay = <floating> (1.0 - b.lr * b.weight_decay) if (has_wd and b.decoupled) else 1
    cdef floating step_size = <floating> b.ts0[t], inv_bc2_sqrt = <floating> b.ts1[t]
    cdef floating omb1 = <floating> (1.0 - b.beta1), b2 = <floating> b.beta2
    cdef floating omb2 = <floating> (1.0 - b.beta2)
    cdef floating eps = <floating> b.eps, wd = <floating> b.weight_decay
    cdef Py_ssize_t n = hi - lo
    p += lo
    g += lo
    m += lo
    v += lo
    if b.amsgrad:
        vmax += lo
        _adam_loop(p, g, m, v, vmax, n, step_size, inv_bc2_sqrt, omb1, b2, omb2, eps, wd,
                   decay, l2, True, b.maximize)
    else:
        _adam_loop(p, g, m, v, vmax, n, step_size, inv_bc2_sqrt, omb1, b2, omb2, eps, wd,
                   decay, l2, False, b.maximize)


cdef inline uint16_t _to_bf16(float x, bint stochastic, uint32_t h, uint32_t key) noexcept nogil:
    if stochastic:
        return fo_f32_to_bf16_sr(x, fo_hash32(h ^ key))
    return fo_f32_to_bf16_rne(x)


cdef inline void _adam_bf16_loop(float *p, const float *g, uint16_t *m, uint16_t *v,
                                 uint16_t *vmax, Py_ssize_t n, Py_ssize_t base,
                                 float step_size, float inv_bc2_sqrt, float one_minus_b1,
                                 float beta2, float one_minus_b2, float eps, float wd,
                                 float decay, bint l2, bint amsgrad, bint maximize,
                                 bint stochastic, uint32_t km, uint32_t kv,
                                 uint32_t kx) noexcept nogil:
    # As _adam_loop, with m, v (and vmax) stored as bfloat16: read and widened to
    # float32, updated in float32, rounded once when stored. The parameter update uses
    # the float32 values of this step. Element i's random bits hash (base + i) with a
    # per-array, per-step key.
    cdef Py_ssize_t i
    cdef float gi, pi, mi, vi, vm, x, denom
    cdef float neg_step = -step_size
    cdef float sign = -1 if maximize else 1      # maximize: exact, branch-free
    cdef uint32_t h
    for i in range(n):
        gi = g[i] * sign
        pi = p[i]
        if l2:
            gi = gi + wd * pi
        pi = pi * decay
        h = (<uint32_t> (base + i)) * (<uint32_t> 2654435769u)
        mi = _lerp(fo_bf16_to_f32(m[i]), gi, one_minus_b1)
        m[i] = _to_bf16(mi, stochastic, h, km)
        vi = fo_bf16_to_f32(v[i]) * beta2 + (one_minus_b2 * gi) * gi
        v[i] = _to_bf16(vi, stochastic, h, kv)
        if amsgrad:
            vm = fo_bf16_to_f32(vmax[i])
            x = vm if vi <= vm else vi
            vm = vm if vm != vm else x
            vmax[i] = _to_bf16(vm, stochastic, h, kx)
            vi = vm
        denom = _sqrt(vi) * inv_bc2_sqrt + eps
        p[i] = pi + (neg_step * mi) / denom


cdef void _adam_bf16_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                           Py_ssize_t hi) noexcept nogil:
    cdef bint has_wd = b.weight_decay != 0.0
    cdef bint l2 = has_wd and not b.decoupled
    cdef float decay = <float> (1.0 - b.lr * b.weight_decay) if (has_wd and b.decoupled) else 1
    cdef float step_size = <float> b.ts0[t], inv_bc2_sqrt = <float> b.ts1[t]
    cdef float omb1 = <float> (1.0 - b.beta1), b2 = <float> b.beta2
    cdef float omb2 = <float> (1.0 - b.beta2)
    cdef float eps = <float> b.eps, wd = <float> b.weight_decay
    cdef uint32_t key = b.tkey[t]
    cdef uint32_t km = fo_hash32(key ^ 1u), kv = fo_hash32(key ^ 2u), kx = fo_hash32(key ^ 3u)
    cdef float *p = <float *> b.ptr[0][t] + lo
    cdef const float *g = <const float *> b.ptr[1][t] + lo
    cdef uint16_t *m = <uint16_t *> b.ptr[2][t] + lo
    cdef uint16_t *v = <uint16_t *> b.ptr[3][t] + lo
    cdef uint16_t *vmax = (<uint16_t *> b.ptr[4][t] + lo) if b.amsgrad else NULL
    cdef Py_ssize_t n = hi - lo
    if b.stochastic:
        if b.amsgrad:
            _adam_bf16_loop(p, g, m, v, vmax, n, lo, step_size, inv_bc2_sqrt, omb1, b2, omb2,
                            eps, wd, decay, l2, True, b.maximize, True, km, kv, kx)
        else:
            _adam_bf16_loop(p, g, m, v, vmax, n, lo, step_size, inv_bc2_sqrt, omb1, b2, omb2,
                            eps, wd, decay, l2, False, b.maximize, True, km, kv, kx)
    else:
        if b.amsgrad:
            _adam_bf16_loop(p, g, m, v, vmax, n, lo, step_size, inv_bc2_sqrt, omb1, b2, omb2,
                            eps, wd, decay, l2, True, b.maximize, False, km, kv, kx)
        else:
            _adam_bf16_loop(p, g, m, v, vmax, n, lo, step_size, inv_bc2_sqrt, omb1, b2, omb2,
                            eps, wd, decay, l2, False, b.maximize, False, km, kv, kx)


cdef void _adam_segment(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                        Py_ssize_t hi) noexcept nogil:
    if b.bf16:
        _adam_bf16_typed(b, t, lo, hi)
    elif b.is_double[t]:
        _adam_typed(b, t, lo, hi, <double *> b.ptr[0][t], <const double *> b.ptr[1][t],
                    <double *> b.ptr[2][t], <double *> b.ptr[3][t], <double *> b.ptr[4][t])
    else:
        _adam_typed(b, t, lo, hi, <float *> b.ptr[0][t], <const float *> b.ptr[1][t],
                    <float *> b.ptr[2][t], <float *> b.ptr[3][t], <float *> b.ptr[4][t])


cdef void _adam_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    cdef double step = <double> b.steps[b.index[t]]
    cdef double bc1 = 1.0 - pow(b.beta1, step)
    cdef double bc2 = 1.0 - pow(b.beta2, step)
    b.ts0[t] = b.lr / bc1            # step size
    b.ts1[t] = 1.0 / pow(bc2, 0.5)   # 1/sqrt of the second bias correction: one divide
                                     # per element fewer than torch's sqrt(v)/sqrt(bc2)
    # stochastic rounding key: a pure function of seed, step and the array's position
    b.tkey[t] = fo_hash32(fo_hash32(fo_hash32(b.seed) ^ <uint32_t> b.steps[b.index[t]])
                          ^ <uint32_t> b.index[t])


# ---------------------------------------------------------------------------------
# Entry points: every hyperparameter and array is checked here, in compiled code, so
# that a 16-element step costs about a microsecond. fastoptim.functional forwards to
# these; the messages follow torch.optim's wording where torch has one.
# ---------------------------------------------------------------------------------

cdef double _real(str name, object value, double low, bint low_open, double high,
                  bint high_open) except? -1.0:
    """value as a double after checking it is a finite real number within bounds."""
    cdef double v
    if type(value) is float:
        v = <double> value
    elif isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    else:
        try:
            if isinstance(value, numbers.Real):
                v = float(value)
            elif (cnp.PyArray_Check(value) and (<object> value).size == 1
                  and (<object> value).dtype.kind in "fiu"):
                v = float((<object> value).item())
            else:
                raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        except OverflowError:      # e.g. 10**400: a real number, but not a finite double
            raise ValueError(f"{name} must be finite, got {value}") from None
    if not isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    if (v <= low) if low_open else (v < low):
        raise ValueError(f"Invalid {name}: {value} (must be {'>' if low_open else '>='} {low})")
    if (v >= high) if high_open else (v > high):
        raise ValueError(f"Invalid {name}: {value} (must be {'<' if high_open else '<='} {high})")
    return v


cdef inline double _nonneg(str name, object value) except? -1.0:
    return _real(name, value, 0.0, False, INFINITY, False)


cdef bint _flag(str name, object value) except -1:
    if value is True or value is False or isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


cdef list _arrays(str name, object x):
    """The caller's arrays as a list: one ndarray becomes a one-element list."""
    if type(x) is list:
        return <list> x
    if cnp.PyArray_Check(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    raise TypeError(f"{name} must be an ndarray or a list/tuple of ndarrays, "
                    f"got {type(x).__name__}")


cdef list _optional_arrays(str name, object x):
    return None if x is None else _arrays(name, x)


def real_arg(str name, value, double low=-INFINITY, bint low_open=False,
             double high=INFINITY, bint high_open=False):
    """The hyperparameter check of the kernels, for rules written in Python (Newton)."""
    return _real(name, value, low, low_open, high, high_open)


def flag_arg(str name, value):
    return _flag(name, value)


def array_list(str name, x):
    return _arrays(name, x)


def prepare_sgd(params, grads, momentum_buffers, steps, lr, momentum, dampening,
                nesterov, weight_decay, maximize):
    cdef Step s = Step()
    s.b.lr = _nonneg("learning rate", lr)
    s.b.momentum = _nonneg("momentum value", momentum)
    s.b.dampening = _real("dampening", dampening, -INFINITY, False, INFINITY, False)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.nesterov = _flag("nesterov", nesterov)
    s.b.maximize = _flag("maximize", maximize)
    if s.b.nesterov and (s.b.momentum <= 0.0 or s.b.dampening != 0.0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if s.b.momentum != 0.0:
        if momentum_buffers is None or steps is None:
            raise ValueError("momentum_buffers and steps are required when momentum != 0")
        s._gather(("params", "grads", "momentum_buffers"),
                  (_arrays("params", params), _arrays("grads", grads),
                   _arrays("momentum_buffers", momentum_buffers)), (True, False, True), steps)
    else:
        s._gather(("params", "grads"), (_arrays("params", params), _arrays("grads", grads)),
                  (True, False), steps)
    s.segment = _sgd_segment
    s.kind = KIND_SGD
    s.scalars = _sgd_scalars
    return s


def prepare_adagrad(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps,
                    maximize):
    cdef Step s = Step()
    s.b.lr = _nonneg("learning rate", lr)
    s.b.lr_decay = _nonneg("lr_decay value", lr_decay)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.eps = _nonneg("epsilon value", eps)
    s.b.maximize = _flag("maximize", maximize)
    if steps is None:
        raise ValueError("steps is required")
    s._gather(("params", "grads", "state_sums"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("state_sums", state_sums)), (True, False, True), steps)
    s.segment = _adagrad_segment
    s.kind = KIND_ADAGRAD
    s.scalars = _adagrad_scalars
    return s


def prepare_rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr,
                    alpha, eps, weight_decay, momentum, centered, maximize):
    cdef Step s = Step()
    s.b.lr = _nonneg("learning rate", lr)
    s.b.alpha = _nonneg("alpha value", alpha)
    s.b.eps = _nonneg("epsilon value", eps)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.momentum = _nonneg("momentum value", momentum)
    s.b.centered = _flag("centered", centered)
    s.b.maximize = _flag("maximize", maximize)
    if s.b.centered and grad_avgs is None:
        raise ValueError("grad_avgs is required when centered=True")
    if s.b.momentum > 0.0 and momentum_buffers is None:
        raise ValueError("momentum_buffers is required when momentum > 0")
    s._gather(("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("square_avgs", square_avgs),
               _arrays("grad_avgs", grad_avgs) if s.b.centered else None,
               _arrays("momentum_buffers", momentum_buffers) if s.b.momentum > 0.0 else None),
              (True, False, True, True, True), steps)
    s.segment = _rmsprop_segment
    s.kind = KIND_RMSPROP
    s.scalars = NULL
    return s


def prepare_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, betas,
                 eps, weight_decay, amsgrad, maximize, decoupled, state_dtype=None,
                 rounding="nearest", seed=0):
    cdef Step s = Step()
    if state_dtype is None or state_dtype == "float":
        s.b.bf16 = False
    elif state_dtype == "bfloat16":
        s.b.bf16 = True
    else:
        raise ValueError(f"state_dtype must be None (the parameters' dtype) or "
                         f"'bfloat16', got {state_dtype!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    s.b.stochastic = rounding == "stochastic"
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    s.b.seed = <uint32_t> (int(seed) & 0xFFFFFFFF)
    s.b.lr = _nonneg("learning rate", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    s.b.beta1 = _real("beta parameter at index 0", betas[0], 0.0, False, 1.0, True)
    s.b.beta2 = _real("beta parameter at index 1", betas[1], 0.0, False, 1.0, True)
    s.b.eps = _nonneg("epsilon value", eps)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.amsgrad = _flag("amsgrad", amsgrad)
    s.b.maximize = _flag("maximize", maximize)
    s.b.decoupled = _flag("decoupled_weight_decay", decoupled)
    if steps is None:
        raise ValueError("steps is required")
    if s.b.amsgrad and max_exp_avg_sqs is None:
        raise ValueError("max_exp_avg_sqs is required when amsgrad=True")
    s._gather(("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("exp_avgs", exp_avgs), _arrays("exp_avg_sqs", exp_avg_sqs),
               _arrays("max_exp_avg_sqs", max_exp_avg_sqs) if s.b.amsgrad else None),
              (True, False, True, True, True), steps)
    s.segment = _adam_segment
    s.kind = KIND_ADAM_BF16 if s.b.bf16 else KIND_ADAM
    s.scalars = _adam_scalars
    return s


# ---------------------------------------------------------------------------------
# The memory-traffic ceiling: the same arrays, partition and threads as a rule, the
# same bytes read and written per element, no arithmetic (values rotate between the
# written arrays; the gradient is read through a compare that never fires for
# finite data). The benchmark reports every rule as a fraction of this loop's speed.
# ---------------------------------------------------------------------------------

cdef inline void _traffic_loop(floating *p, const floating *g, floating *a, floating *b,
                               floating *c, Py_ssize_t n, int nstate) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating x, gi
    for i in range(n):
        x = p[i]
        gi = g[i]
        x = x if gi == gi else gi
        if nstate == 0:
            p[i] = x
        elif nstate == 1:
            p[i] = a[i]
            a[i] = x
        elif nstate == 2:
            p[i] = a[i]
            a[i] = b[i]
            b[i] = x
        else:
            p[i] = a[i]
            a[i] = b[i]
            b[i] = c[i]
            c[i] = x


cdef inline void _traffic_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                                floating *p, const floating *g, floating *s0, floating *s1,
                                floating *s2) noexcept nogil:
    cdef int nstate = b.nroles - 2
    cdef Py_ssize_t n = hi - lo
    if nstate == 0:
        _traffic_loop(p + lo, g + lo, s0, s1, s2, n, 0)
    elif nstate == 1:
        _traffic_loop(p + lo, g + lo, s0 + lo, s1, s2, n, 1)
    elif nstate == 2:
        _traffic_loop(p + lo, g + lo, s0 + lo, s1 + lo, s2, n, 2)
    else:
        _traffic_loop(p + lo, g + lo, s0 + lo, s1 + lo, s2 + lo, n, 3)


cdef void _traffic_segment(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                           Py_ssize_t hi) noexcept nogil:
    if b.is_double[t]:
        _traffic_typed(b, t, lo, hi, <double *> b.ptr[0][t], <const double *> b.ptr[1][t],
                       <double *> b.ptr[2][t] if b.nroles > 2 else NULL,
                       <double *> b.ptr[3][t] if b.nroles > 3 else NULL,
                       <double *> b.ptr[4][t] if b.nroles > 4 else NULL)
    else:
        _traffic_typed(b, t, lo, hi, <float *> b.ptr[0][t], <const float *> b.ptr[1][t],
                       <float *> b.ptr[2][t] if b.nroles > 2 else NULL,
                       <float *> b.ptr[3][t] if b.nroles > 3 else NULL,
                       <float *> b.ptr[4][t] if b.nroles > 4 else NULL)


def prepare_traffic(list params, list grads, list states):
    """A Step that moves exactly the bytes of a rule with ``len(states)`` (0-3) state
    arrays per parameter: reads params, grads and states, writes params and states."""
    cdef Step s = Step()
    cdef Py_ssize_t k
    if len(states) > 3:
        raise ValueError("at most 3 state lists")
    names = ("params", "grads") + tuple(f"states[{k}]" for k in range(len(states)))
    s._gather(names, (params, grads) + tuple(list(x) for x in states),
              (True, False) + (True,) * len(states), None)
    s.segment = _traffic_segment
    s.kind = KIND_TRAFFIC
    s.scalars = NULL
    return s


include "_kernels_hessian.pxi"


# ---------------------------------------------------------------------------------
# Non-finite gradients (the optimizers' nonfinite="skip"/"raise"): one read of each
# gradient, testing exponent bits with integer operations (an OR-reduction vectorizes;
# a floating-point reduction would not without reassociation).
# ---------------------------------------------------------------------------------

cdef bint _nonfinite_f32(const uint32_t *u, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint32_t acc = 0
    for i in range(n):
        acc |= (u[i] & 0x7F800000u) == 0x7F800000u
    return acc != 0


cdef bint _nonfinite_f64(const uint64_t *u, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint64_t acc = 0
    for i in range(n):
        acc |= (u[i] & 0x7FF0000000000000u) == 0x7FF0000000000000u
    return acc != 0


cdef bint _nonfinite(const char *data, Py_ssize_t n, bint is_double,
                     int n_threads) noexcept nogil:
    cdef Py_ssize_t c, lo, hi, itemsize = 8 if is_double else 4
    cdef int nchunks = n_threads if (n_threads > 1 and n >= (1 << 20)) else 1
    cdef int found = 0
    if nchunks == 1:
        if is_double:
            return _nonfinite_f64(<const uint64_t *> data, n)
        return _nonfinite_f32(<const uint32_t *> data, n)
    for c in prange(nchunks, num_threads=nchunks, schedule="static", chunksize=1):
        lo = n * c // nchunks
        hi = n * (c + 1) // nchunks
        if is_double:
            found += _nonfinite_f64(<const uint64_t *> (data + lo * itemsize), hi - lo)
        else:
            found += _nonfinite_f32(<const uint32_t *> (data + lo * itemsize), hi - lo)
    return found != 0


def first_nonfinite(list arrays, int n_threads=1):
    """Index of the first array holding a NaN or an infinity, or -1. None entries are
    skipped; arrays are float32/float64 (checked by prepare_* beforehand)."""
    cdef Py_ssize_t i
    cdef cnp.ndarray a
    cdef bint bad
    for i in range(len(arrays)):
        obj = arrays[i]
        if obj is None:
            continue
        a = <cnp.ndarray> obj
        if not (cnp.PyArray_IS_C_CONTIGUOUS(a) or cnp.PyArray_IS_F_CONTIGUOUS(a)) or \
                not cnp.PyArray_ISALIGNED(a):
            bad = not bool(np.isfinite(a).all())
        else:
            with nogil:
                bad = _nonfinite(<const char *> cnp.PyArray_DATA(a), cnp.PyArray_SIZE(a),
                                 cnp.PyArray_TYPE(a) == cnp.NPY_DOUBLE, n_threads)
        if bad:
            return i
    return -1
