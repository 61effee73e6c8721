# Part of the kernel module (included by fastoptim/_kernels.pxi): the prepared step
# (Step: gather and check the arrays, run once or, made reusable, again and again),
# the step counters at tensor addresses for the torch drop-in, and the run: one
# parallel region over the concatenated element range, split on cache lines.

#: role names for messages of a reused step (the prepare_* functions name their lists)
_ROLE_NAMES = ("params", "grads", "state", "state", "state")
# an Interval's role for scalar state k (0 or 1): SCALAR_ROLE - k (absmaxes: -2 - j)
cdef enum:
    SCALAR_ROLE = -100


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


cdef bint _first_state_is_uint8(tuple lists, int nstate_end, Py_ssize_t i):
    """8-bit state: whether parameter i's state is 8-bit (its first state array holds
    uint8 codes; _check_array then holds the others to it). State roles end before
    ``nstate_end``."""
    cdef int r
    for r in range(2, nstate_end):
        if lists[r] is not None:
            obj = lists[r][i] if i < len(lists[r]) else None
            return cnp.PyArray_Check(obj) and cnp.PyArray_TYPE(<cnp.ndarray> obj) == cnp.NPY_UINT8
    return False


cdef cnp.ndarray _check_absmax(object obj, int j, Py_ssize_t i, Py_ssize_t size):
    """absmaxes[j][i]: the float32 block scales of 8-bit state, one per 256 elements."""
    cdef cnp.ndarray a
    cdef Py_ssize_t want = (size + Q8_BLOCK - 1) // Q8_BLOCK
    if not cnp.PyArray_Check(obj):
        raise TypeError(f"absmaxes[{j}][{i}] must be a numpy.ndarray, got "
                        f"{type(obj).__name__}")
    a = <cnp.ndarray> obj
    if cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT or not cnp.PyArray_ISNOTSWAPPED(a):
        raise TypeError(f"absmaxes[{j}][{i}] must have dtype float32, got {a.dtype}")
    if a.ndim != 1 or a.shape[0] != want:
        raise ValueError(f"absmaxes[{j}][{i}] must have shape ({want},) (one scale per "
                         f"block of {Q8_BLOCK}), got {(<object>a).shape}")
    if not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"absmaxes[{j}][{i}] is read-only; it is updated in place")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISALIGNED(a):
        raise ValueError(f"absmaxes[{j}][{i}] must be contiguous and aligned")
    return a


cdef str _interval_name(tuple names, Interval a):
    if a.role == -1:
        return "steps"
    if a.role <= SCALAR_ROLE:
        return f"scalar_state[{SCALAR_ROLE - a.role}][{a.index}]"
    if a.role <= -2:
        return f"absmaxes[{-2 - a.role}][{a.index}]"
    return f"{names[a.role]}[{a.index}]"


cdef _overlap_error(tuple names, Interval a, Interval b):
    x = _interval_name(names, a)
    y = _interval_name(names, b)
    if a.role == b.role and a.index == b.index:
        raise ValueError(f"{x} appears twice")
    raise ValueError(f"{x} overlaps {y} in memory; arrays that are updated in place "
                     f"must not share memory with any other argument")


cdef cnp.ndarray _steps_array(object steps, Py_ssize_t n):
    """``steps`` after checking it is the step counters of n parameters: a writeable,
    contiguous int64 array of shape (n,), each count >= 0 and < 2**63 - 1 (it is
    incremented in place: no signed overflow)."""
    cdef cnp.ndarray a
    cdef Py_ssize_t i
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
        if not 0 <= (<int64_t *> cnp.PyArray_DATA(a))[i] < INT64_MAX:
            raise ValueError(f"steps[{i}] is {(<object>a)[i]}; steps must be >= 0 "
                             f"and < 2**63 - 1")
    return a


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
    cdef bint grads_bound          # reusable: set_grads() was called since the last run
    cdef Interval *wiv             # reusable: written arrays' byte intervals, by start
    cdef char role_written[MAX_ROLES]   # per role: the kernel writes its arrays
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
        PyMem_Free(self.b.ts2)
        PyMem_Free(self.b.ts3)
        for r in range(2):
            PyMem_Free(self.b.pscal[r])
            PyMem_Free(self.b.pscal_double[r])
        PyMem_Free(self.b.tkey)
        PyMem_Free(self.b.q8)
        for r in range(MAX_ROLES - 2):
            PyMem_Free(self.b.absmax[r])
        PyMem_Free(self.wiv)

    cdef _take_scalar_state(self, int k, str name, object arrays, Py_ssize_t n):
        """A rule's per-parameter scalar state (after _gather): one writeable 0-d
        float32 or float64 array per parameter, ``arrays[i]``; kept per updated array
        (b.pscal[k][t]), k = 0 or 1. None is accepted for no parameters."""
        cdef Py_ssize_t t, i
        cdef cnp.ndarray a
        if arrays is None:
            if n:
                raise ValueError(f"{name} is required (one 0-d array per parameter)")
            return
        arrays = _arrays(name, arrays)
        if len(arrays) != n:
            raise ValueError(f"{name} has {len(arrays)} entries, expected {n} "
                             f"(one per parameter)")
        self.b.pscal[k] = <void **> PyMem_Malloc(max(self.b.n, 1) * sizeof(void *))
        self.b.pscal_double[k] = <char *> PyMem_Malloc(max(self.b.n, 1) * sizeof(char))
        if self.b.pscal[k] == NULL or self.b.pscal_double[k] == NULL:
            raise MemoryError()
        for t in range(self.b.n):
            i = self.b.index[t]
            obj = arrays[i]
            if not cnp.PyArray_Check(obj):
                raise TypeError(f"{name}[{i}] must be a numpy.ndarray, got "
                                f"{type(obj).__name__}")
            a = <cnp.ndarray> obj
            if cnp.PyArray_TYPE(a) not in (cnp.NPY_FLOAT, cnp.NPY_DOUBLE) \
                    or not cnp.PyArray_ISNOTSWAPPED(a):
                raise TypeError(f"{name}[{i}] must have dtype float32 or float64, got "
                                f"{a.dtype}")
            if cnp.PyArray_SIZE(a) != 1 or not cnp.PyArray_ISWRITEABLE(a) \
                    or not cnp.PyArray_ISALIGNED(a):
                raise ValueError(f"{name}[{i}] must be a writeable array of one value, "
                                 f"got shape {(<object> a).shape}")
            self.b.pscal[k][t] = cnp.PyArray_DATA(a)
            self.b.pscal_double[k][t] = cnp.PyArray_TYPE(a) == cnp.NPY_DOUBLE
            self.keep.append(a)

    @property
    def size(self):
        """Number of elements this step updates (summed over arrays)."""
        return self.total

    @property
    def count(self):
        """Number of arrays this step updates."""
        return self.b.n

    cdef _gather(self, tuple names, tuple lists, tuple written, object steps,
                 object absmaxes=None):
        """Check every array, copy grads whose layout differs from their parameter's,
        check that no updated array overlaps another array, and record pointers.
        ``written[r]``: whether the kernel writes the arrays of role r (read-only
        inputs, such as gradients and AdaHessian's Hessian diagonals, may overlap one
        another). With 8-bit state (``b.q8mode``): a parameter's state arrays are all
        uint8 codes, or all in its dtype (a small parameter's); ``absmaxes[r - 2][i]``
        holds the block scales of state role r of parameter i where it is 8-bit. The
        last ``b.ninputs`` roles are read-only inputs in the parameters' dtype and
        layout, as the gradients (a list of None: no input this step)."""
        cdef list params = lists[0]
        cdef list grads = lists[1]
        cdef Py_ssize_t n = len(params), i, t, k, r, nint = 0
        cdef int nroles = len(lists)
        cdef int nstate_end = nroles - self.b.ninputs     # roles [2, nstate_end): state
        cdef cnp.ndarray p, a
        cdef Interval *iv = NULL
        cdef Py_ssize_t who = 0
        cdef Py_ssize_t nbytes
        cdef object obj, lst
        cdef bint q8 = False
        cdef cnp.ndarray h

        for r in range(1, nroles):
            lst = lists[r]
            if lst is not None and len(lst) != n:
                raise ValueError(f"{names[r]} has {len(lst)} entries, expected {n} "
                                 f"(one per parameter)")
        if steps is not None:
            self.steps_arr = _steps_array(steps, n)

        self.b.nroles = nroles
        for r in range(nroles):
            self.role_written[r] = bool(written[r])
        for r in range(nroles):
            self.b.ptr[r] = <void **> PyMem_Malloc(max(n, 1) * sizeof(void *))
        self.b.is_double = <char *> PyMem_Malloc(max(n, 1) * sizeof(char))
        self.b.offsets = <Py_ssize_t *> PyMem_Malloc((n + 1) * sizeof(Py_ssize_t))
        self.b.index = <Py_ssize_t *> PyMem_Malloc(max(n, 1) * sizeof(Py_ssize_t))
        self.b.ts0 = <double *> PyMem_Malloc(max(n, 1) * sizeof(double))
        self.b.ts1 = <double *> PyMem_Malloc(max(n, 1) * sizeof(double))
        self.b.ts2 = <double *> PyMem_Malloc(max(n, 1) * sizeof(double))
        self.b.ts3 = <double *> PyMem_Malloc(max(n, 1) * sizeof(double))
        self.b.tkey = <uint32_t *> PyMem_Malloc(max(n, 1) * sizeof(uint32_t))
        if (self.b.is_double == NULL or self.b.offsets == NULL or self.b.index == NULL
                or self.b.ts0 == NULL or self.b.ts1 == NULL or self.b.ts2 == NULL
                or self.b.ts3 == NULL or self.b.tkey == NULL):
            raise MemoryError()
        if self.b.q8mode:
            if absmaxes is None or len(absmaxes) != nstate_end - 2:
                raise ValueError("8-bit state needs one list of block scales per state "
                                 "list (absmaxes)")
            for r in range(2, nstate_end):
                if lists[r] is not None and len(absmaxes[r - 2]) != n:
                    raise ValueError(f"absmaxes[{r - 2}] has {len(absmaxes[r - 2])} entries, "
                                     f"expected {n} (one per parameter)")
            self.b.q8 = <char *> PyMem_Malloc(max(n, 1) * sizeof(char))
            if self.b.q8 == NULL:
                raise MemoryError()
            for r in range(nstate_end - 2):
                self.b.absmax[r] = <float **> PyMem_Malloc(max(n, 1) * sizeof(float *))
                if self.b.absmax[r] == NULL:
                    raise MemoryError()
        for r in range(nroles):
            if self.b.ptr[r] == NULL:
                raise MemoryError()

        iv = <Interval *> PyMem_Malloc((n * (2 * nroles) + 1) * sizeof(Interval))  # + steps
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
                q8 = False
                if self.b.q8mode:
                    q8 = _first_state_is_uint8(lists, nstate_end, i)
                    if q8 and cnp.PyArray_TYPE(p) != cnp.NPY_FLOAT:
                        raise TypeError(f"{names[0]}[{i}] has dtype {p.dtype}; 8-bit state "
                                        f"is for float32 parameters")
                    self.b.q8[t] = q8
                nbytes = cnp.PyArray_NBYTES(p)
                for r in range(nroles):
                    lst = lists[r]
                    if r == ROLE_PARAM:
                        a = p
                    elif lst is None:
                        self.b.ptr[r][t] = NULL
                        if self.b.q8mode and r < nstate_end:
                            self.b.absmax[r - 2][t] = NULL
                        continue
                    elif r == ROLE_GRAD or r >= nstate_end:
                        if r != ROLE_GRAD:
                            obj = lst[i]
                            if obj is None:
                                raise ValueError(f"{names[r]}[{i}] is None but grads[{i}] "
                                                 f"is not; give one for every updated "
                                                 f"parameter, or none (None)")
                        a = _check_array(obj, names[r], i, False, p, names[0])
                        obj = grads[i]
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
                                         self.b.bf16, q8)
                        obj = grads[i]
                        if q8:
                            h = _check_absmax(absmaxes[r - 2][i], r - 2, i,
                                              cnp.PyArray_SIZE(p))
                            self.b.absmax[r - 2][t] = <float *> cnp.PyArray_DATA(h)
                            if cnp.PyArray_NBYTES(h) > 0:
                                _set_interval(&iv[nint], cnp.PyArray_DATA(h),
                                              cnp.PyArray_NBYTES(h), 1, -2 - (r - 2), i)
                                nint += 1
                        elif self.b.q8mode:
                            self.b.absmax[r - 2][t] = NULL
                    self.b.ptr[r][t] = cnp.PyArray_DATA(a)
                    if nbytes > 0:
                        _set_interval(&iv[nint], cnp.PyArray_DATA(a), cnp.PyArray_NBYTES(a),
                                      self.role_written[r], r, i)
                        nint += 1
                self.b.offsets[t + 1] = self.b.offsets[t] + cnp.PyArray_SIZE(p)
                t += 1
            self.b.n = t
            self.total = self.b.offsets[t]
            if self.steps_arr is not None and cnp.PyArray_NBYTES(self.steps_arr) > 0:
                # the step counters are written too: they may not overlap any array
                _set_interval(&iv[nint], cnp.PyArray_DATA(self.steps_arr),
                              cnp.PyArray_NBYTES(self.steps_arr), 1, -1, 0)
                nint += 1

            # No updated array may overlap any other array of the call.
            if _first_conflict(iv, nint, &k, &who):
                _overlap_error(names, iv[k], iv[who])
        finally:
            PyMem_Free(iv)
        self.keep.append(lists)
        if self.steps_arr is not None:
            self.b.steps = <int64_t *> cnp.PyArray_DATA(self.steps_arr)

    # --- reuse: the torch drop-in keeps a prepared step for as long as its parameters,
    # state and options stay the same, and per step only points it at the new gradients

    cdef Py_ssize_t _itemsize(self, Py_ssize_t t, int role) noexcept nogil:
        if role >= 2 and self.b.bf16:
            return 2
        if role >= 2 and self.b.q8mode and self.b.q8[t]:
            return 1
        return 8 if self.b.is_double[t] else 4

    def make_reusable(self):
        """Let ``run()`` be called any number of times, each after ``set_grads()`` has
        pointed the gradients at their memory for that run (the gradients given to
        ``prepare_*`` are let go). The arrays, hyperparameters and step counters array
        stay those of ``prepare_*`` (the caller keeps them alive and unchanged in
        layout: the step holds only their addresses)."""
        cdef Py_ssize_t t, n = 0, nbytes, a, b
        cdef int r, k
        if self.reusable:
            return
        if self.kind == KIND_ADAHESSIAN:
            raise ValueError("this step reads other inputs than its gradients (the "
                             "Hessian diagonals): it cannot be reused")
        for t in range(self.b.n):          # (a step of such a rule without them can be)
            for r in range(self.b.nroles - self.b.ninputs, self.b.nroles):
                if self.b.ptr[r][t] != NULL:
                    raise ValueError("this step reads other inputs than its gradients: "
                                     "it cannot be reused")
        for t in range(self.b.n):
            if self.b.offsets[t + 1] == self.b.offsets[t]:
                continue
            for r in range(self.b.nroles):
                if not self.role_written[r] or self.b.ptr[r][t] == NULL:
                    continue
                n += 2          # (and its block scales, for 8-bit state)
            n += 2              # the scalar state (at most two per array)
        self.wiv = <Interval *> PyMem_Malloc((n + 1) * sizeof(Interval))
        if self.wiv == NULL:
            raise MemoryError()
        n = 0
        for t in range(self.b.n):
            if self.b.offsets[t + 1] == self.b.offsets[t]:
                continue
            for r in range(self.b.nroles):
                if not self.role_written[r] or self.b.ptr[r][t] == NULL:
                    continue
                nbytes = (self.b.offsets[t + 1] - self.b.offsets[t]) * self._itemsize(t, r)
                _set_interval(&self.wiv[n], self.b.ptr[r][t], nbytes, 1, r, self.b.index[t])
                n += 1
                if r >= 2 and self.b.q8mode and self.b.q8[t] and self.b.absmax[r - 2][t] != NULL:
                    _set_interval(&self.wiv[n], self.b.absmax[r - 2][t],
                                  (self.b.offsets[t + 1] - self.b.offsets[t] + Q8_BLOCK - 1)
                                  // Q8_BLOCK * sizeof(float), 1, -2 - (r - 2),
                                  self.b.index[t])
                    n += 1
            for k in range(2):
                if self.b.pscal[k] == NULL:
                    continue
                _set_interval(&self.wiv[n], self.b.pscal[k][t],
                              8 if self.b.pscal_double[k][t] else 4, 1, SCALAR_ROLE - k,
                              self.b.index[t])
                n += 1
        if self.steps_arr is not None and cnp.PyArray_NBYTES(self.steps_arr) > 0:
            _set_interval(&self.wiv[n], cnp.PyArray_DATA(self.steps_arr),
                          cnp.PyArray_NBYTES(self.steps_arr), 1, -1, 0)
            n += 1
        # written arrays never overlap one another (checked by _gather): sorted by start,
        # they are sorted by end too
        qsort(self.wiv, n, sizeof(Interval), _cmp_interval)
        self.nwiv = n
        self.reusable = True
        # The gradients given to prepare_* (and copies of them) are no longer kept
        # alive: set_grads() binds new ones before each run.
        self.keep = [tuple(None if r == ROLE_GRAD else lst for r, lst in enumerate(x))
                     for x in self.keep if isinstance(x, tuple)]
        self.grads_bound = False

    def set_grads(self, addresses):
        """Point the gradient of each updated array (in this step's order: the arrays
        whose gradient was not None) at a new address, given as an int (a list of ints,
        or a contiguous int64 array as :func:`addresses` returns): memory laid out
        exactly as the gradient given to ``prepare_*`` (dtype, shape, dense in the
        parameter's memory order), which the caller guarantees and keeps alive until
        the next ``run()``. Checked here: alignment, and no overlap with any array the
        step writes. A refused call raises ValueError naming ``grads[i]`` and changes
        nothing."""
        cdef Py_ssize_t n = self.b.n, t, hit, itemsize, nbytes
        cdef uintptr_t addr, end
        cdef void **tmp
        cdef Interval g
        cdef const int64_t *arr = NULL
        if not self.reusable:
            raise RuntimeError("set_grads() needs make_reusable() first")
        if isinstance(addresses, np.ndarray):
            if (cnp.PyArray_TYPE(addresses) != cnp.NPY_INT64
                    or cnp.PyArray_NDIM(addresses) != 1
                    or not cnp.PyArray_IS_C_CONTIGUOUS(addresses)):
                raise TypeError("addresses must be a list of ints or a contiguous 1-d "
                                "int64 array")
            arr = <const int64_t *> cnp.PyArray_DATA(addresses)
        elif not isinstance(addresses, list):
            raise TypeError(f"addresses must be a list of ints or a contiguous 1-d int64 "
                            f"array, got {type(addresses).__name__}")
        if len(addresses) != n:
            raise ValueError(f"addresses has {len(addresses)} entries, expected {n}")
        tmp = <void **> PyMem_Malloc(max(n, 1) * sizeof(void *))
        if tmp == NULL:
            raise MemoryError()
        try:
            for t in range(n):
                if arr != NULL:
                    addr = <uintptr_t> arr[t]
                else:
                    try:
                        addr = <uintptr_t> (<unsigned long long> addresses[t])
                    except (TypeError, OverflowError):
                        raise ValueError(f"grads[{self.b.index[t]}]: the address must be "
                                         f"an int in [0, 2**64), got {addresses[t]!r}") from None
                itemsize = self._itemsize(t, ROLE_GRAD)
                nbytes = (self.b.offsets[t + 1] - self.b.offsets[t]) * itemsize
                tmp[t] = <void *> addr
                if nbytes == 0:
                    continue
                if addr == 0 or addr % itemsize != 0:
                    raise ValueError(f"grads[{self.b.index[t]}] is not aligned to its dtype")
                end = addr + <uintptr_t> nbytes
                hit = _written_hit(self.wiv, self.nwiv, addr, end)
                if hit >= 0:
                    _set_interval(&g, <void *> addr, nbytes, 0, ROLE_GRAD, self.b.index[t])
                    _overlap_error(_ROLE_NAMES, g, self.wiv[hit])
            for t in range(n):
                self.b.ptr[ROLE_GRAD][t] = tmp[t]
            self.grads_bound = True
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
                or other.b.q8mode != self.b.q8mode or other.b.ninputs != self.b.ninputs
                or other.b.amsgrad != self.b.amsgrad or other.b.centered != self.b.centered):
            return False
        # every hyperparameter field of Batch (the rest are arrays, or compared above)
        self.b.lr, self.b.momentum, self.b.dampening = other.b.lr, other.b.momentum, other.b.dampening
        self.b.weight_decay, self.b.eps, self.b.alpha = other.b.weight_decay, other.b.eps, other.b.alpha
        self.b.lr_decay, self.b.beta1, self.b.beta2 = other.b.lr_decay, other.b.beta1, other.b.beta2
        self.b.beta3, self.b.t_alpha_beta3 = other.b.beta3, other.b.t_alpha_beta3
        self.b.hessian_power, self.b.seed = other.b.hessian_power, other.b.seed
        self.b.maximize, self.b.nesterov = other.b.maximize, other.b.nesterov
        self.b.decoupled, self.b.fixed_decay = other.b.decoupled, other.b.fixed_decay
        return True

    def run(self, int n_threads=1):
        """Apply the update in place. Runs at most once (unless made reusable)."""
        cdef int k = self.kind, d
        cdef Py_ssize_t threshold = _serial_threshold
        if self.done and not self.reusable:
            raise RuntimeError("this step has already run")
        if self.reusable and not self.grads_bound:
            raise RuntimeError("a reused step needs set_grads() before each run")
        self.grads_bound = not self.reusable
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
            if b.stochastic:
                # stochastic rounding key: a pure function of seed, step and the array's
                # position in the caller's list
                b.tkey[t] = fo_hash32(fo_hash32(fo_hash32(b.seed)
                                                ^ <uint32_t> b.steps[b.index[t]])
                                      ^ <uint32_t> b.index[t])
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
    parameter array it falls in (to a block of 256 elements where its state is 8-bit).
    Depends only on (b, c, nchunks), so neighbours agree."""
    cdef Py_ssize_t total = b.offsets[b.n], pos, t, local, itemsize, mis
    if c <= 0:
        return 0
    if c >= nchunks:
        return total
    pos = <Py_ssize_t> ((<double> total) * c / nchunks)
    t = _find(b, pos)
    local = pos - b.offsets[t]
    if b.q8mode and b.q8[t]:
        # 8-bit state: pieces start on quantization blocks (the granule of the format)
        return b.offsets[t] + local - local % Q8_BLOCK
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
