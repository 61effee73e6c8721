# Part of the kernel module (included by fastoptim/_kernels.pxi): the checks every
# entry point makes before anything is written -- memory overlap between arrays,
# array checks, hyperparameter checks -- and the non-finite gradient scan.

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


cdef void _set_interval(Interval *iv, const void *start, Py_ssize_t nbytes, int written,
                       int role, Py_ssize_t index) noexcept nogil:
    iv.start = <uintptr_t> start
    iv.end = iv.start + <uintptr_t> nbytes
    iv.written = written
    iv.role = role
    iv.index = index


cdef Py_ssize_t _written_hit(const Interval *wiv, Py_ssize_t n, uintptr_t start,
                             uintptr_t end) noexcept nogil:
    """Of n written intervals sorted by start (none overlapping another, so sorted by end
    too), the one [start, end) overlaps: its index, or -1. (A reused step's check of a
    new gradient: Step.set_grads, AdafactorStep.set_grads.)"""
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:          # the last interval that starts before this one ends
        mid = (lo + hi) // 2
        if wiv[mid].start < end:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1 if lo > 0 and wiv[lo - 1].end > start else -1


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
                              cnp.ndarray like, str like_name, bint bf16=False,
                              bint q8=False):
    """Return obj as an ndarray after checking it; raise TypeError/ValueError naming it.
    With bf16, obj must be a uint16 array of bfloat16 bits shaped like `like`; with q8,
    a uint8 array of 8-bit codes shaped like `like`."""
    cdef cnp.ndarray a
    cdef int typenum
    if not cnp.PyArray_Check(obj):
        raise TypeError(f"{name}[{i}] must be a numpy.ndarray, got {type(obj).__name__}")
    a = <cnp.ndarray> obj
    typenum = cnp.PyArray_TYPE(a)
    if q8:
        if typenum != cnp.NPY_UINT8:
            raise TypeError(f"{name}[{i}] must have dtype uint8 (8-bit codes) like the "
                            f"parameter's other state, got {a.dtype}")
        bf16 = True                      # (no dtype match with `like` below)
    elif bf16:
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
