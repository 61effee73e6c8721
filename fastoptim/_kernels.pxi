# Compiled in-place update kernels for every rule in fastoptim.reference.
#
# Design, point by point (read with ../DESIGN notes and fastoptim/reference.py):
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
from libc.math cimport sqrt, sqrtf, pow, isfinite
from libc.stdint cimport int64_t, uintptr_t
from libc.stdlib cimport qsort
from libc.string cimport memset
from cython.parallel cimport prange
cimport numpy as cnp

import numpy as np

cnp.import_array()

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


cdef Py_ssize_t _serial_threshold = 1 << 15


def set_serial_threshold(Py_ssize_t n):
    """Steps with fewer elements than `n` (summed over arrays) run on one thread."""
    global _serial_threshold
    _serial_threshold = max(n, 0)


def get_serial_threshold():
    return _serial_threshold


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
    bint maximize, nesterov, centered, amsgrad, decoupled


ctypedef void (*segment_fn)(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                            Py_ssize_t hi) noexcept nogil
ctypedef void (*scalars_fn)(Batch *b, Py_ssize_t t) noexcept nogil


cdef struct Interval:
    uintptr_t start
    uintptr_t end
    int written
    int role
    Py_ssize_t index


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
                              cnp.ndarray like, str like_name):
    """Return obj as an ndarray after checking it; raise TypeError/ValueError naming it."""
    cdef cnp.ndarray a
    cdef int typenum
    if not cnp.PyArray_Check(obj):
        raise TypeError(f"{name}[{i}] must be a numpy.ndarray, got {type(obj).__name__}")
    a = <cnp.ndarray> obj
    typenum = cnp.PyArray_TYPE(a)
    if typenum != cnp.NPY_FLOAT and typenum != cnp.NPY_DOUBLE:
        raise TypeError(f"{name}[{i}] must have dtype float32 or float64, got {a.dtype}")
    if not cnp.PyArray_ISNOTSWAPPED(a):
        raise TypeError(f"{name}[{i}] must be in native byte order, got dtype {a.dtype.str}")
    if like is not None:
        if typenum != cnp.PyArray_TYPE(like):
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


cdef class Step:
    """A checked, ready-to-run update of a list of arrays. ``run()`` cannot fail."""
    cdef Batch b
    cdef list keep                 # arrays (and grad copies) kept alive until run()
    cdef cnp.ndarray steps_arr
    cdef segment_fn segment
    cdef scalars_fn scalars
    cdef Py_ssize_t total
    cdef bint done

    def __cinit__(self):
        memset(&self.b, 0, sizeof(Batch))
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
        cdef uintptr_t max_end_all = 0, max_end_w = 0
        cdef Py_ssize_t who_all = -1, who_w = -1
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
                if (<int64_t *> cnp.PyArray_DATA(a))[i] < 0:
                    raise ValueError(f"steps[{i}] is {(<object>a)[i]}; steps must be >= 0")
            self.steps_arr = a

        self.b.nroles = nroles
        for r in range(nroles):
            self.b.ptr[r] = <void **> PyMem_Malloc(max(n, 1) * sizeof(void *))
        self.b.is_double = <char *> PyMem_Malloc(max(n, 1) * sizeof(char))
        self.b.offsets = <Py_ssize_t *> PyMem_Malloc((n + 1) * sizeof(Py_ssize_t))
        self.b.index = <Py_ssize_t *> PyMem_Malloc(max(n, 1) * sizeof(Py_ssize_t))
        self.b.ts0 = <double *> PyMem_Malloc(max(n, 1) * sizeof(double))
        self.b.ts1 = <double *> PyMem_Malloc(max(n, 1) * sizeof(double))
        if (self.b.is_double == NULL or self.b.offsets == NULL or self.b.index == NULL
                or self.b.ts0 == NULL or self.b.ts1 == NULL):
            raise MemoryError()
        for r in range(nroles):
            if self.b.ptr[r] == NULL:
                raise MemoryError()

        iv = <Interval *> PyMem_Malloc(max(n * nroles, 1) * sizeof(Interval))
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
                        a = _check_array(obj, names[r], i, True, p, names[0])
                        obj = grads[i]
                    self.b.ptr[r][t] = cnp.PyArray_DATA(a)
                    if nbytes > 0:
                        iv[nint].start = <uintptr_t> cnp.PyArray_DATA(a)
                        iv[nint].end = iv[nint].start + <uintptr_t> nbytes
                        iv[nint].written = r != ROLE_GRAD
                        iv[nint].role = r
                        iv[nint].index = i
                        nint += 1
                self.b.offsets[t + 1] = self.b.offsets[t] + cnp.PyArray_SIZE(p)
                t += 1
            self.b.n = t
            self.total = self.b.offsets[t]

            # No updated array may overlap any other array of the call.
            qsort(iv, nint, sizeof(Interval), _cmp_interval)
            for k in range(nint):
                if iv[k].written and who_all >= 0 and iv[k].start < max_end_all:
                    self._overlap_error(names, iv[k], iv[who_all])
                if not iv[k].written and who_w >= 0 and iv[k].start < max_end_w:
                    self._overlap_error(names, iv[k], iv[who_w])
                if iv[k].end > max_end_all or who_all < 0:
                    max_end_all = iv[k].end
                    who_all = k
                if iv[k].written and (iv[k].end > max_end_w or who_w < 0):
                    max_end_w = iv[k].end
                    who_w = k
        finally:
            PyMem_Free(iv)
        self.keep.append(lists)
        if self.steps_arr is not None:
            self.b.steps = <int64_t *> cnp.PyArray_DATA(self.steps_arr)

    cdef _overlap_error(self, tuple names, Interval a, Interval b):
        x = f"{names[a.role]}[{a.index}]"
        y = f"{names[b.role]}[{b.index}]"
        if a.role == b.role and a.index == b.index:
            raise ValueError(f"{x} appears twice")
        raise ValueError(f"{x} overlaps {y} in memory; arrays that are updated in place "
                         f"must not share memory with any other argument")

    def run(self, int n_threads=1):
        """Apply the update in place. Runs at most once."""
        if self.done:
            raise RuntimeError("this step has already run")
        self.done = True
        with nogil:
            _run_batch(&self.b, self.segment, self.scalars, n_threads)


cdef void _run_batch(Batch *b, segment_fn seg, scalars_fn scal, int n_threads) noexcept nogil:
    cdef Py_ssize_t t, c, nchunks, total = b.offsets[b.n]
    for t in range(b.n):
        if b.steps != NULL:
            b.steps[b.index[t]] += 1
        if scal != NULL:
            scal(b, t)
    if total == 0:
        return
    if n_threads <= 1 or total < _serial_threshold or not fo_openmp_enabled():
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
    if w < 0.5:
        return start + w * (end - start)
    return end - (end - start) * (1 - w)


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
    for i in range(n):
        gi = -g[i] if maximize else g[i]
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
    for i in range(n):
        gi = -g[i] if maximize else g[i]
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
    for i in range(n):
        gi = -g[i] if maximize else g[i]
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
                            floating bc2_sqrt, floating one_minus_b1, floating beta2,
                            floating one_minus_b2, floating eps, floating wd,
                            floating decay, bint l2, bint amsgrad,
                            bint maximize) noexcept nogil:
    # decay is 1 - lr*weight_decay for AdamW and exactly 1 otherwise (x*1 == x).
    cdef Py_ssize_t i
    cdef floating gi, pi, mi, vi, vm, denom
    cdef floating neg_step = -step_size
    for i in range(n):
        gi = -g[i] if maximize else g[i]
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
            # torch.maximum: NaN in either operand propagates
            vm = vm if (vm > vi or vm != vm) else vi
            vmax[i] = vm
            vi = vm
        denom = _sqrt(vi) / bc2_sqrt + eps
        p[i] = pi + (neg_step * mi) / denom


cdef inline void _adam_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                             floating *p, const floating *g, floating *m, floating *v,
                             floating *vmax) noexcept nogil:
    cdef bint has_wd = b.weight_decay != 0.0
    cdef bint l2 = has_wd and not b.decoupled
    cdef floating decay = <floating> (1.0 - b.lr * b.weight_decay) if (has_wd and b.decoupled) else 1
    cdef floating step_size = <floating> b.ts0[t], bc2_sqrt = <floating> b.ts1[t]
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
        _adam_loop(p, g, m, v, vmax, n, step_size, bc2_sqrt, omb1, b2, omb2, eps, wd,
                   decay, l2, True, b.maximize)
    else:
        _adam_loop(p, g, m, v, vmax, n, step_size, bc2_sqrt, omb1, b2, omb2, eps, wd,
                   decay, l2, False, b.maximize)


cdef void _adam_segment(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                        Py_ssize_t hi) noexcept nogil:
    if b.is_double[t]:
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
    b.ts1[t] = pow(bc2, 0.5)         # sqrt of the second bias correction


# ---------------------------------------------------------------------------------
# Entry points (hyperparameters are validated by fastoptim.functional)
# ---------------------------------------------------------------------------------

def prepare_sgd(list params, list grads, momentum_buffers, steps, *, double lr,
                double momentum, double dampening, bint nesterov, double weight_decay,
                bint maximize):
    cdef Step s = Step()
    if momentum != 0.0:
        if momentum_buffers is None or steps is None:
            raise ValueError("momentum_buffers and steps are required when momentum != 0")
        s._gather(("params", "grads", "momentum_buffers"),
                  (params, grads, list(momentum_buffers)), (True, False, True), steps)
    else:
        s._gather(("params", "grads"), (params, grads), (True, False),
                  steps)
    s.b.lr = lr
    s.b.momentum = momentum
    s.b.dampening = dampening
    s.b.nesterov = nesterov
    s.b.weight_decay = weight_decay
    s.b.maximize = maximize
    s.segment = _sgd_segment
    s.scalars = _sgd_scalars
    return s


def prepare_adagrad(list params, list grads, list state_sums, steps, *, double lr,
                    double lr_decay, double weight_decay, double eps, bint maximize):
    cdef Step s = Step()
    if steps is None:
        raise ValueError("steps is required")
    s._gather(("params", "grads", "state_sums"), (params, grads, state_sums),
              (True, False, True), steps)
    s.b.lr = lr
    s.b.lr_decay = lr_decay
    s.b.weight_decay = weight_decay
    s.b.eps = eps
    s.b.maximize = maximize
    s.segment = _adagrad_segment
    s.scalars = _adagrad_scalars
    return s


def prepare_rmsprop(list params, list grads, list square_avgs, grad_avgs,
                    momentum_buffers, steps, *, double lr, double alpha, double eps,
                    double weight_decay, double momentum, bint centered, bint maximize):
    cdef Step s = Step()
    if centered and grad_avgs is None:
        raise ValueError("grad_avgs is required when centered=True")
    if momentum > 0.0 and momentum_buffers is None:
        raise ValueError("momentum_buffers is required when momentum > 0")
    s._gather(("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers"),
              (params, grads, square_avgs,
               list(grad_avgs) if centered else None,
               list(momentum_buffers) if momentum > 0.0 else None),
              (True, False, True, True, True), steps)
    s.b.lr = lr
    s.b.alpha = alpha
    s.b.eps = eps
    s.b.weight_decay = weight_decay
    s.b.momentum = momentum
    s.b.centered = centered
    s.b.maximize = maximize
    s.segment = _rmsprop_segment
    s.scalars = NULL
    return s


def prepare_adam(list params, list grads, list exp_avgs, list exp_avg_sqs,
                 max_exp_avg_sqs, steps, *, double lr, double beta1, double beta2,
                 double eps, double weight_decay, bint amsgrad, bint maximize,
                 bint decoupled):
    cdef Step s = Step()
    if steps is None:
        raise ValueError("steps is required")
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("max_exp_avg_sqs is required when amsgrad=True")
    s._gather(("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
              (params, grads, exp_avgs, exp_avg_sqs,
               list(max_exp_avg_sqs) if amsgrad else None),
              (True, False, True, True, True), steps)
    s.b.lr = lr
    s.b.beta1 = beta1
    s.b.beta2 = beta2
    s.b.eps = eps
    s.b.weight_decay = weight_decay
    s.b.amsgrad = amsgrad
    s.b.maximize = maximize
    s.b.decoupled = decoupled
    s.segment = _adam_segment
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
    s.scalars = NULL
    return s


include "_kernels_hessian.pxi"
