# Part of the kernel module (included by fastoptim/_kernels.pxi): Adafactor.
#
# Not an element-wise rule: its factored second moment needs the row and column sums of
# g^2 over the whole gradient before any element is updated, its step size the RMS of
# the parameter, and its clipping the RMS of the whole update. So a parameter takes
# three parallel passes over its memory (a vector parameter two):
#
#   matrix (viewed as B matrices m x n, C order; its factors R (B, m) and C (B, n)):
#     1. read p and g: row sums of g^2 (-> R), of p^2 (-> RMS(p)), and column sums of
#        g^2 and of g^2 / R per block of AF_BLOCK rows (threads split blocks; the block
#        sums are added block after block in a small parallel pass over columns -> C)
#     2. the RMS of the update U: from the factors and the column sums of g^2 / R where
#        no element of U is clamped; else a pass that reads g and sums U^2
#     3. read g and p, write p: p (1 - lr wd) - alpha/denom * U
#   vector or 0-d (viewed as rows of AF_CHUNK elements; its full second moment V):
#     1. read p, g and V, write V: V's lerp toward g^2, the row sums of p^2 and of U^2
#     2. read g, V and p, write p
#
# Every sum follows the order fastoptim/reference.py defines (16 interleaved lane sums
# per row, rows one after the other, column blocks one after the other), which does not
# depend on the thread count or the instruction set: the kernel equals the reference
# bit for bit. The row loops are C (src_c/fo_adafactor.h, for restrict); this file
# runs them over rows, blocks and chunks. Threads split rows (or blocks, or column tiles) statically; below
# AF_SERIAL elements a parameter runs on the calling thread.

cdef enum:
    AF_LANES = 16
    AF_CHUNK = 4096
    AF_BLOCK = 32
    AF_COLTILE = 256
    AF_SERIAL = 1 << 15


cdef struct AfParam:
    void *p
    void *g
    void *row            # factored: R, B*m values
    void *col            # factored: C, B*n values
    void *var            # vector: V, N values
    void *scratch
    Py_ssize_t index     # position in the caller's lists (its step counter)
    Py_ssize_t N, B, m, n, nb   # nb: blocks of AF_BLOCK rows per matrix
    bint factored, is_double


cdef struct AfOpts:
    double lr, beta2_decay, eps1, eps2, d, weight_decay
    bint maximize


cdef extern from "fo_adafactor.h" nogil:
    # the row loops (C, for restrict); _f float, _d double
    void fo_af_row_sums_f(const float *p, const float *g, float *col, int64_t n,
                          float *sg, float *sp)
    void fo_af_row_sums_d(const double *p, const double *g, double *col, int64_t n,
                          double *sg, double *sp)
    void fo_af_row_tsum_f(const float *g, float inv, float *t, int64_t n)
    void fo_af_row_tsum_d(const double *g, double inv, double *t, int64_t n)
    float fo_af_row_usum_f(const float *g, float a, float ra, const float *c,
                           const float *cb, float e2, float ie, float sign, int64_t n)
    double fo_af_row_usum_d(const double *g, double a, double ra, const double *c,
                            const double *cb, double e2, double ie, double sign, int64_t n)
    void fo_af_row_step_f(float *p, const float *g, float a, float ra, const float *c,
                          const float *cb, float e2, float ie, float sign, float decay,
                          int has_wd, float step, int64_t n)
    void fo_af_row_step_d(double *p, const double *g, double a, double ra, const double *c,
                          const double *cb, double e2, double ie, double sign, double decay,
                          int has_wd, double step, int64_t n)
    void fo_af_chunk_f(const float *p, const float *g, float *v, int64_t n, float w,
                       float e2, float sign, float *sp, float *su)
    void fo_af_chunk_d(const double *p, const double *g, double *v, int64_t n, double w,
                       double e2, double sign, double *sp, double *su)
    void fo_af_chunk_step_f(float *p, const float *g, const float *v, int64_t n, float e2,
                            float sign, float decay, int has_wd, float step)
    void fo_af_chunk_step_d(double *p, const double *g, const double *v, int64_t n,
                            double e2, double sign, double decay, int has_wd, double step)


cdef inline floating _af_total(const floating *x, Py_ssize_t n) noexcept nogil:
    """x[0] + x[1] + ... in order (reference._adafactor_total)."""
    cdef floating s = 0
    cdef Py_ssize_t i
    if n == 0:
        return s
    s = x[0]
    for i in range(1, n):
        s = s + x[i]
    return s


# --- matrices --------------------------------------------------------------------------

cdef void _af_block(const floating *p, const floating *g, floating *row, floating *rows,
                    floating *prow, floating *cp, floating *tp, Py_ssize_t k, Py_ssize_t nb,
                    Py_ssize_t m, Py_ssize_t n, floating w) noexcept nogil:
    """Pass 1 on block k (of all B*nb): its rows' sums of g^2 and p^2, R's lerp toward
    their means, and its column sums of g^2 and of g^2 / R, row after row, into cp + k*n
    and tp + k*n; one read of each row from memory."""
    cdef Py_ssize_t b = k // nb, r0 = (k % nb) * AF_BLOCK, r1 = min(m, r0 + AF_BLOCK)
    cdef Py_ssize_t r, j, i
    cdef floating *c = cp + k * n
    cdef floating *t = tp + k * n
    cdef floating nf = <floating> n, one = 1
    for j in range(n):
        c[j] = 0
        t[j] = 0
    for r in range(r0, r1):
        i = b * m + r
        if floating is float:
            fo_af_row_sums_f(p + i * n, g + i * n, c, n, &rows[i], &prow[i])
        else:
            fo_af_row_sums_d(p + i * n, g + i * n, c, n, &rows[i], &prow[i])
        row[i] = _lerp(row[i], rows[i] / nf, w)
        if floating is float:
            fo_af_row_tsum_f(g + i * n, one / row[i], t, n)
        else:
            fo_af_row_tsum_d(g + i * n, one / row[i], t, n)


cdef void _af_cols(floating *col, floating *cb, const floating *cp, floating *tp,
                   Py_ssize_t tile, Py_ssize_t nb, Py_ssize_t n, floating mf,
                   floating w) noexcept nogil:
    """C of one tile of AF_COLTILE columns: its block sums added block after block,
    C's lerp toward their mean, and the column factor 1/sqrt(C); the block sums of
    g^2 / R added alike, into the first block's place in tp."""
    cdef Py_ssize_t tpb = (n + AF_COLTILE - 1) // AF_COLTILE
    cdef Py_ssize_t b = tile // tpb, j0 = (tile % tpb) * AF_COLTILE
    cdef Py_ssize_t j1 = min(n, j0 + AF_COLTILE), j, k
    cdef const floating *base = cp + b * nb * n
    cdef floating *tbase = tp + b * nb * n
    cdef floating acc[AF_COLTILE]
    cdef floating s, one = 1
    # block after block, each over the tile's columns (contiguous: vector loads)
    for j in range(j0, j1):
        acc[j - j0] = base[j]
    for k in range(1, nb):
        for j in range(j0, j1):
            acc[j - j0] = acc[j - j0] + base[k * n + j]
    for j in range(j0, j1):
        s = _lerp(col[b * n + j], acc[j - j0] / mf, w)
        col[b * n + j] = s
        cb[b * n + j] = one / _sqrt(s)
    for k in range(1, nb):
        for j in range(j0, j1):
            tbase[j] = tbase[j] + tbase[k * n + j]


cdef inline floating _af_row_update(const floating *g, floating a, floating ra,
                                    const floating *c, const floating *cb, floating e2,
                                    floating ie, floating sign, Py_ssize_t n) noexcept nogil:
    """Pass 2 on one row: the sum of U^2 (a = R/rm of the row, ra = 1/sqrt(a); U is
    g / sqrt(eps1^2) where V = a C is clamped, else g * (ra * 1/sqrt(C)))."""
    if floating is float:
        return fo_af_row_usum_f(g, a, ra, c, cb, e2, ie, sign, n)
    else:
        return fo_af_row_usum_d(g, a, ra, c, cb, e2, ie, sign, n)


cdef inline void _af_row_step(floating *p, const floating *g, floating a, floating ra,
                              const floating *c, const floating *cb, floating e2,
                              floating ie, floating sign, floating decay, bint has_wd,
                              floating step, Py_ssize_t n) noexcept nogil:
    """Pass 3 on one row: p (1 - lr wd) + step * U."""
    if floating is float:
        fo_af_row_step_f(p, g, a, ra, c, cb, e2, ie, sign, decay, has_wd, step, n)
    else:
        fo_af_row_step_d(p, g, a, ra, c, cb, e2, ie, sign, decay, has_wd, step, n)


cdef inline bint _af_positive(floating x) noexcept nogil:
    """x finite and > 0."""
    return x > 0 and x < INFINITY


cdef void _af_matrix(const AfParam *a, floating *p, const floating *g, floating *row,
                     floating *col, floating *scr, double t, const AfOpts *o,
                     int nt) noexcept nogil:
    cdef Py_ssize_t B = a.B, m = a.m, n = a.n, nb = a.nb, nrows = a.B * a.m, k, b, i, j
    cdef Py_ssize_t ntiles = a.B * ((a.n + AF_COLTILE - 1) // AF_COLTILE)
    cdef floating *rows = scr            # row sums of g^2, then R / rm
    cdef floating *prow = scr + nrows    # row sums of p^2, then 1/sqrt(R / rm)
    cdef floating *urow = scr + 2 * nrows
    cdef floating *rm = scr + 3 * nrows
    cdef floating *cb = scr + 3 * nrows + B
    cdef floating *cp = scr + 3 * nrows + B + B * n
    cdef floating *tp = scr + 3 * nrows + B + B * n + B * nb * n
    cdef floating w = <floating> pow(t, o.beta2_decay)
    cdef floating mf = <floating> m, one = 1
    cdef floating e1 = <floating> o.eps1, e2 = <floating> (o.eps1 * o.eps1)
    cdef floating ie = one / _sqrt(e2)
    cdef floating sign = -1 if o.maximize else 1
    cdef floating decay = <floating> (1.0 - o.lr * o.weight_decay)
    cdef floating x, usum, per, amin = 0, cmin = 0
    cdef bint has_wd = o.weight_decay != 0.0, factored_sum
    cdef double rho, rms, alpha, urms, denom, root = pow(<double> a.N, 0.5)
    cdef floating step
    # 1. row sums of g^2 and p^2 (R's lerp), block column sums of g^2 and g^2 / R
    if nt > 1:
        for k in prange(B * nb, num_threads=nt, schedule="static"):
            _af_block(p, g, row, rows, prow, cp, tp, k, nb, m, n, w)
    else:
        for k in range(B * nb):
            _af_block(p, g, row, rows, prow, cp, tp, k, nb, m, n, w)
    rho = 1.0 / pow(t, 0.5)
    rho = rho if rho < o.lr else o.lr
    rms = <double> _sqrt(_af_total(prow, nrows)) / root
    alpha = (rms if rms > o.eps2 else o.eps2) * rho
    # the factors: R's row means, C; per row a = R / rm and 1/sqrt(a), per column 1/sqrt(C)
    for b in range(B):
        x = _af_total(row + b * m, m) / mf
        rm[b] = e1 if x < e1 else x
    factored_sum = True
    for i in range(nrows):
        rows[i] = row[i] / rm[i // m]
        prow[i] = one / _sqrt(rows[i])
        if i == 0 or rows[i] < amin:
            amin = rows[i]
        factored_sum = factored_sum and _af_positive(rows[i])
    if nt > 1:
        for k in prange(ntiles, num_threads=nt, schedule="static"):
            _af_cols(col, cb, cp, tp, k, nb, n, mf, w)
    else:
        for k in range(ntiles):
            _af_cols(col, cb, cp, tp, k, nb, n, mf, w)
    for j in range(B * n):
        if j == 0 or col[j] < cmin:
            cmin = col[j]
        factored_sum = factored_sum and _af_positive(col[j])
    # 2. the RMS of the update: from the factors where no element of V is clamped
    # (reference._adafactor_factored_usum), else summed over a pass that reads g
    if factored_sum and nrows > 0 and amin * cmin >= e2:
        usum = 0
        for b in range(B):
            per = 0
            for j in range(n):
                x = tp[b * nb * n + j] / col[b * n + j]
                per = x if j == 0 else per + x
            per = rm[b] * per
            usum = per if b == 0 else usum + per
    else:
        if nt > 1:
            for i in prange(nrows, num_threads=nt, schedule="static"):
                urow[i] = _af_row_update(g + i * n, rows[i], prow[i], col + (i // m) * n,
                                         cb + (i // m) * n, e2, ie, sign, n)
        else:
            for i in range(nrows):
                urow[i] = _af_row_update(g + i * n, rows[i], prow[i], col + (i // m) * n,
                                         cb + (i // m) * n, e2, ie, sign, n)
        usum = _af_total(urow, nrows)
    urms = <double> _sqrt(usum) / (root * o.d)
    denom = urms if urms > 1.0 else 1.0
    step = <floating> (-alpha / denom)
    # 3. the update
    if nt > 1:
        for i in prange(nrows, num_threads=nt, schedule="static"):
            _af_row_step(p + i * n, g + i * n, rows[i], prow[i], col + (i // m) * n,
                         cb + (i // m) * n, e2, ie, sign, decay, has_wd, step, n)
    else:
        for i in range(nrows):
            _af_row_step(p + i * n, g + i * n, rows[i], prow[i], col + (i // m) * n,
                         cb + (i // m) * n, e2, ie, sign, decay, has_wd, step, n)


# --- vectors ---------------------------------------------------------------------------

cdef void _af_chunk(const floating *p, const floating *g, floating *v, floating *prow,
                    floating *urow, Py_ssize_t c, Py_ssize_t N, floating w, floating e2,
                    floating sign) noexcept nogil:
    """Pass 1 on one chunk: V's lerp toward g^2, the sums of p^2 and of U^2."""
    cdef Py_ssize_t lo = c * AF_CHUNK, n = min(N - lo, <Py_ssize_t> AF_CHUNK)
    if floating is float:
        fo_af_chunk_f(p + lo, g + lo, v + lo, n, w, e2, sign, &prow[c], &urow[c])
    else:
        fo_af_chunk_d(p + lo, g + lo, v + lo, n, w, e2, sign, &prow[c], &urow[c])


cdef void _af_chunk_step(floating *p, const floating *g, const floating *v, Py_ssize_t c,
                         Py_ssize_t N, floating e2, floating sign, floating decay,
                         bint has_wd, floating step) noexcept nogil:
    cdef Py_ssize_t lo = c * AF_CHUNK, n = min(N - lo, <Py_ssize_t> AF_CHUNK)
    if floating is float:
        fo_af_chunk_step_f(p + lo, g + lo, v + lo, n, e2, sign, decay, has_wd, step)
    else:
        fo_af_chunk_step_d(p + lo, g + lo, v + lo, n, e2, sign, decay, has_wd, step)


cdef void _af_vector(const AfParam *a, floating *p, const floating *g, floating *v,
                     floating *scr, double t, const AfOpts *o, int nt) noexcept nogil:
    cdef Py_ssize_t N = a.N, nrows = (a.N + AF_CHUNK - 1) // AF_CHUNK, c
    cdef floating *prow = scr
    cdef floating *urow = scr + nrows
    cdef floating w = <floating> pow(t, o.beta2_decay)
    cdef floating e2 = <floating> (o.eps1 * o.eps1)
    cdef floating sign = -1 if o.maximize else 1
    cdef floating decay = <floating> (1.0 - o.lr * o.weight_decay)
    cdef bint has_wd = o.weight_decay != 0.0
    cdef double rho, rms, alpha, urms, denom, root = pow(<double> a.N, 0.5)
    cdef floating step
    if nt > 1:
        for c in prange(nrows, num_threads=nt, schedule="static"):
            _af_chunk(p, g, v, prow, urow, c, N, w, e2, sign)
    else:
        for c in range(nrows):
            _af_chunk(p, g, v, prow, urow, c, N, w, e2, sign)
    rho = 1.0 / pow(t, 0.5)
    rho = rho if rho < o.lr else o.lr
    rms = <double> _sqrt(_af_total(prow, nrows)) / root
    alpha = (rms if rms > o.eps2 else o.eps2) * rho
    urms = <double> _sqrt(_af_total(urow, nrows)) / (root * o.d)
    denom = urms if urms > 1.0 else 1.0
    step = <floating> (-alpha / denom)
    if nt > 1:
        for c in prange(nrows, num_threads=nt, schedule="static"):
            _af_chunk_step(p, g, v, c, N, e2, sign, decay, has_wd, step)
    else:
        for c in range(nrows):
            _af_chunk_step(p, g, v, c, N, e2, sign, decay, has_wd, step)


# --- the prepared step -------------------------------------------------------------------

cdef class AdafactorStep:
    """A checked, ready-to-run Adafactor update of a list of arrays (the interface of
    Step: ``run(n_threads)`` cannot fail and runs once, or, made reusable, once after
    each ``set_grads()``)."""
    cdef AfParam *a
    cdef Py_ssize_t n
    cdef AfOpts o
    cdef int64_t *steps
    cdef list keep               # the arrays the step points at (grads: in gkeep)
    cdef list gkeep
    cdef cnp.ndarray steps_arr
    cdef bint done
    cdef Py_ssize_t total
    cdef cnp.ndarray scratch      # float64 words, shared by the step's parameters
    cdef bint copied             # a gradient was copied to C order
    cdef bint eps1_auto          # eps=(None, ...): eps1 is the first array's machine eps
    cdef double auto_eps1
    cdef bint reusable, grads_bound
    cdef Interval *wiv           # reusable: the memory it writes, sorted (see Step)
    cdef Py_ssize_t nwiv

    def __cinit__(self):
        self.a = NULL
        self.n = 0
        self.keep = []
        self.gkeep = []
        self.done = False
        self.total = 0
        self.wiv = NULL

    def __dealloc__(self):
        PyMem_Free(self.a)
        PyMem_Free(self.wiv)
        if self.scratch is not None and _af_pool is not None:
            _af_scratch_give(self.scratch)

    @property
    def size(self):
        """Number of elements this step updates (summed over arrays)."""
        return self.total

    @property
    def count(self):
        """Number of arrays this step updates."""
        return self.n

    def run(self, int n_threads=1):
        """Apply the update in place. Runs at most once (unless made reusable)."""
        if self.done and not self.reusable:
            raise RuntimeError("this step has already run")
        if self.reusable and not self.grads_bound:
            raise RuntimeError("a reused step needs set_grads() before each run")
        self.grads_bound = not self.reusable
        self.done = True
        with nogil:
            _af_run(self.a, self.n, self.steps, &self.o, n_threads)

    # --- reuse (fastoptim.torch keeps a group's step): as Step's ------------------------

    def make_reusable(self):
        """As :meth:`Step.make_reusable`: ``run()`` any number of times, each after
        ``set_grads()``; the gradients given to ``prepare_adafactor`` are let go. Refused
        (ValueError) when one of them was not C-contiguous (the step reads a copy)."""
        cdef Py_ssize_t t, k = 0, isz
        cdef const AfParam *a
        if self.reusable:
            return
        if self.copied:
            raise ValueError("this step reads a C-ordered copy of a gradient: it cannot "
                             "be reused")
        self.wiv = <Interval *> PyMem_Malloc((3 * self.n + 1) * sizeof(Interval))
        if self.wiv == NULL:
            raise MemoryError()
        for t in range(self.n):
            a = &self.a[t]
            if a.N == 0:
                continue
            isz = 8 if a.is_double else 4
            _set_interval(&self.wiv[k], a.p, a.N * isz, 1, 0, a.index)
            k += 1
            if a.factored:
                _set_interval(&self.wiv[k], a.row, a.B * a.m * isz, 1, 1, a.index)
                _set_interval(&self.wiv[k + 1], a.col, a.B * a.n * isz, 1, 2, a.index)
                k += 2
            else:
                _set_interval(&self.wiv[k], a.var, a.N * isz, 1, 3, a.index)
                k += 1
        if cnp.PyArray_NBYTES(self.steps_arr) > 0:
            _set_interval(&self.wiv[k], cnp.PyArray_DATA(self.steps_arr),
                          cnp.PyArray_NBYTES(self.steps_arr), 1, -1, 0)
            k += 1
        qsort(self.wiv, k, sizeof(Interval), _cmp_interval)
        self.nwiv = k
        self.reusable = True
        self.gkeep = None
        self.grads_bound = False

    def set_grads(self, cnp.ndarray addresses not None):
        """Point each updated array's gradient at a new address (a contiguous int64
        array as :func:`addresses` returns, one per updated array): memory laid out
        exactly as the gradient given to ``prepare_adafactor`` (dtype, shape,
        C-contiguous), kept alive by the caller until the next ``run()``. Checked:
        alignment, and no overlap with any array the step writes; a refused call
        raises ValueError naming ``grads[i]`` and changes nothing."""
        cdef Py_ssize_t t, hit, isz
        cdef uintptr_t addr, end
        cdef const int64_t *arr
        cdef Interval g
        if not self.reusable:
            raise RuntimeError("set_grads() needs make_reusable() first")
        if (cnp.PyArray_TYPE(addresses) != cnp.NPY_INT64 or cnp.PyArray_NDIM(addresses) != 1
                or not cnp.PyArray_IS_C_CONTIGUOUS(addresses)):
            raise TypeError("addresses must be a contiguous 1-d int64 array")
        if cnp.PyArray_SIZE(addresses) != self.n:
            raise ValueError(f"addresses has {cnp.PyArray_SIZE(addresses)} entries, "
                             f"expected {self.n}")
        arr = <const int64_t *> cnp.PyArray_DATA(addresses)
        for t in range(self.n):
            if self.a[t].N == 0:
                continue
            addr = <uintptr_t> arr[t]
            isz = 8 if self.a[t].is_double else 4
            if addr == 0 or addr % isz != 0:
                raise ValueError(f"grads[{self.a[t].index}] is not aligned to its dtype")
            end = addr + <uintptr_t> (self.a[t].N * isz)
            hit = _written_hit(self.wiv, self.nwiv, addr, end)
            if hit >= 0:
                _set_interval(&g, <void *> addr, self.a[t].N * isz, 0, 4, self.a[t].index)
                _overlap_error(_AF_NAMES, g, self.wiv[hit])
        for t in range(self.n):
            self.a[t].g = <void *> <uintptr_t> arr[t]
        self.grads_bound = True

    def take_hyperparameters(self, AdafactorStep other not None):
        """Copy the options of ``other`` -- a step prepared for no arrays, which
        checked them -- into this reusable step (a scheduler changed ``lr``, ...);
        eps=(None, ...) stays this step's machine epsilon. True (always)."""
        self.o = other.o
        self.eps1_auto = other.eps1_auto
        if other.eps1_auto:
            self.o.eps1 = self.auto_eps1
        return True


#: the roles of AdafactorStep's arrays, in error messages (see _interval_name)
_AF_NAMES = ("params", "row_vars", "col_vars", "variances", "grads")


cdef void _af_run(const AfParam *params, Py_ssize_t n, int64_t *steps, const AfOpts *o,
                  int n_threads) noexcept nogil:
    cdef Py_ssize_t t
    cdef const AfParam *a
    cdef double step
    cdef int nt
    for t in range(n):
        a = &params[t]
        steps[a.index] += 1
        step = <double> steps[a.index]
        if a.N == 0:
            continue
        nt = n_threads if a.N >= AF_SERIAL and fo_openmp_enabled() else 1
        if a.factored and a.is_double:
            _af_matrix(a, <double *> a.p, <const double *> a.g, <double *> a.row,
                       <double *> a.col, <double *> a.scratch, step, o, nt)
        elif a.factored:
            _af_matrix(a, <float *> a.p, <const float *> a.g, <float *> a.row,
                       <float *> a.col, <float *> a.scratch, step, o, nt)
        elif a.is_double:
            _af_vector(a, <double *> a.p, <const double *> a.g, <double *> a.var,
                       <double *> a.scratch, step, o, nt)
        else:
            _af_vector(a, <float *> a.p, <const float *> a.g, <float *> a.var,
                       <float *> a.scratch, step, o, nt)


#: scratch buffers of finished steps, for the next ones (a step takes one while it
#: lives; taking and giving back happen under the GIL)
cdef list _af_pool = []


cdef cnp.ndarray _af_scratch_take(Py_ssize_t words):
    """A float64 buffer of at least ``words`` words (one more: never empty)."""
    cdef Py_ssize_t k
    for k in range(len(_af_pool)):
        if (<cnp.ndarray> _af_pool[k]).shape[0] > words:
            return _af_pool.pop(k)
    return np.empty(words + 1, dtype=np.float64)


cdef _af_scratch_give(cnp.ndarray buf):
    """Keep a finished step's buffer (the four largest at most)."""
    _af_pool.append(buf)
    if len(_af_pool) > 4:
        _af_pool.sort(key=len)
        del _af_pool[0]


cdef cnp.ndarray _af_state(object obj, str name, Py_ssize_t i, cnp.ndarray p, tuple shape):
    """A factor or second moment of params[i]: its dtype, ``shape``, C-contiguous."""
    cdef cnp.ndarray a = _check_array(obj, name, i, True, None, None)
    if cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(p):
        raise TypeError(f"{name}[{i}] has dtype {a.dtype} but params[{i}] has dtype "
                        f"{p.dtype}; they must match")
    if (<object> a).shape != shape:
        raise ValueError(f"{name}[{i}] has shape {(<object> a).shape}; params[{i}] of shape "
                         f"{(<object> p).shape} keeps it of shape {shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name}[{i}] must be C-contiguous")
    return a


def prepare_adafactor(params, grads, row_vars, col_vars, variances, steps, lr,
                      beta2_decay, eps, d, weight_decay, maximize):
    """Check everything and return an AdafactorStep (fastoptim.functional.adafactor_)."""
    cdef AdafactorStep s = AdafactorStep()
    cdef list ps, gs, rs, cs, vs
    cdef Py_ssize_t n, i, k, B, m, nc, words, scratch_len = 0
    cdef cnp.ndarray p, g, st, scratch
    cdef AfParam *a
    s.o.lr = _nonneg("learning rate", lr)
    s.o.beta2_decay = _real("beta2_decay", beta2_decay, -INFINITY, False, 0.0, False)
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise TypeError(f"eps must be a pair (eps1 or None, eps2), got {eps!r}")
    eps1 = None if eps[0] is None else _nonneg("epsilon1", eps[0])
    s.o.eps2 = _nonneg("epsilon2", eps[1])
    s.o.d = _real("clipping threshold d", d, 1.0, False, INFINITY, False)
    s.o.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.o.maximize = _flag("maximize", maximize)
    ps, gs = _arrays("params", params), _arrays("grads", grads)
    n = len(ps)
    rs = _optional_arrays("row_vars", row_vars) or [None] * n
    cs = _optional_arrays("col_vars", col_vars) or [None] * n
    vs = _optional_arrays("variances", variances) or [None] * n
    for name, lst in (("grads", gs), ("row_vars", rs), ("col_vars", cs),
                      ("variances", vs)):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries, expected {n} (one per "
                             f"parameter)")
    if steps is None:
        raise TypeError("steps must be a numpy.ndarray of int64 (Adafactor counts steps)")
    st = _steps_array(steps, n)
    s.a = <AfParam *> PyMem_Malloc(max(n, 1) * sizeof(AfParam))
    if s.a == NULL:
        raise MemoryError()
    written = [[], [], [], []]
    read = [[]]
    where = [[], [], [], [], []]         # the parameter index of each array listed
    for i in range(n):
        if gs[i] is None:
            continue
        p = _check_array(ps[i], "params", i, True, None, None)
        g = _check_array(gs[i], "grads", i, False, p, "params")
        a = &s.a[s.n]
        memset(a, 0, sizeof(AfParam))
        a.index = i
        a.N = cnp.PyArray_SIZE(p)
        a.is_double = cnp.PyArray_TYPE(p) == cnp.NPY_DOUBLE
        a.factored = p.ndim >= 2
        shape = (<object> p).shape
        if a.factored:
            if not cnp.PyArray_IS_C_CONTIGUOUS(p):
                raise ValueError(f"params[{i}] must be C-contiguous: Adafactor's factors "
                                 f"follow its last two axes")
            if vs[i] is not None:
                raise ValueError(f"variances[{i}] must be None: params[{i}] has "
                                 f"{p.ndim} dimensions and keeps row_vars[{i}] and "
                                 f"col_vars[{i}] instead")
            # (wraparound is off in this module: no negative indices)
            nd = len(shape)
            row = _af_state(rs[i], "row_vars", i, p, shape[:nd - 1] + (1,))
            col = _af_state(cs[i], "col_vars", i, p, shape[:nd - 2] + (1,) + shape[nd - 1:])
            a.m, a.n = shape[nd - 2], shape[nd - 1]
            a.B = a.N // (a.m * a.n) if a.m * a.n else 0
            a.nb = (a.m + AF_BLOCK - 1) // AF_BLOCK
            a.row, a.col = cnp.PyArray_DATA(row), cnp.PyArray_DATA(col)
            written[1].append(row)
            written[2].append(col)
            where[1].append(i)
            where[2].append(i)
            nc = 3 * a.B * a.m + a.B + a.B * a.n + 2 * a.B * a.nb * a.n
        else:
            if rs[i] is not None or cs[i] is not None:
                raise ValueError(f"row_vars[{i}] and col_vars[{i}] must be None: "
                                 f"params[{i}] has {p.ndim} dimensions and keeps "
                                 f"variances[{i}] instead")
            var = _af_state(vs[i], "variances", i, p, shape)
            a.var = cnp.PyArray_DATA(var)
            written[3].append(var)
            where[3].append(i)
            nc = 2 * ((a.N + AF_CHUNK - 1) // AF_CHUNK)
        if not cnp.PyArray_IS_C_CONTIGUOUS(g):
            g = np.ascontiguousarray(g)
            s.copied = True
        s.keep.append(p)
        s.gkeep.append(g)
        a.p, a.g = cnp.PyArray_DATA(p), cnp.PyArray_DATA(g)
        a.scratch = <void *> <uintptr_t> (8 * scratch_len)      # (an offset, for now)
        words = nc if a.is_double else (nc + 1) // 2
        scratch_len += (words + 7) // 8 * 8         # (64-byte aligned parts)
        written[0].append(p)
        read[0].append(g)
        where[0].append(i)
        where[4].append(i)
        if s.n == 0:
            s.auto_eps1 = float(np.finfo(p.dtype).eps)
        s.n += 1
        s.total += a.N
    hit = first_overlap(written, read)
    if hit is not None:
        names = ("params", "row_vars", "col_vars", "variances", "grads")
        la, ia, _, lb, ib, _ = hit
        raise ValueError(f"{names[la]}[{where[la][ia]}] and {names[lb]}[{where[lb][ib]}] "
                         f"share memory; the arrays a step updates must not overlap any "
                         f"other array")
    # one scratch buffer for the step's row and column sums, taken from a pool: a new
    # one every step (megabytes for a large matrix) cost the kernel's page clearing
    s.scratch = _af_scratch_take(scratch_len)
    for k in range(s.n):
        s.a[k].scratch = <void *> (<char *> cnp.PyArray_DATA(s.scratch)
                                   + <uintptr_t> s.a[k].scratch)
    s.eps1_auto = eps1 is None
    s.o.eps1 = s.auto_eps1 if eps1 is None else eps1
    s.steps = <int64_t *> cnp.PyArray_DATA(st)
    s.steps_arr = st
    return s
