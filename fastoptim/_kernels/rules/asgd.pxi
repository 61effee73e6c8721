# Part of the kernel module (included by fastoptim/_kernels.pxi): ASGD (averaged SGD).
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), the per-array scalars (from the
# parameter's eta and mu, which they then advance, float32 as torch keeps them), and
# prepare_asgd: every check, then a Step.

cdef inline void _asgd_loop(floating *p, const floating *g, stored *ax, Py_ssize_t n,
                            floating decay, floating neg_eta, floating mu, floating wd,
                            bint has_wd, bint average, bint maximize,
                            Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, pi, a
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        pi = p[i]
        if has_wd:
            gi = gi + wd * pi
        pi = pi * decay
        pi = pi + neg_eta * gi
        p[i] = pi
        if average:
            _load(ax, i, &a)
            a = a + (pi - a) * mu
        else:
            a = pi
        _store(ax, i, a, c, 0)


cdef inline void _asgd_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                             floating *p, const floating *g, stored *ax, stored *unused1,
                             stored *unused2) noexcept nogil:
    # ts0 = 1 - lambd eta, ts1 = -eta, ts2 = mu (this step's: before the scalars advanced)
    cdef Py_ssize_t k
    if b.ts2[t] != 1.0:
        _asgd_loop(p + lo, g + lo, ax + lo, hi - lo, <floating> b.ts0[t],
                   <floating> b.ts1[t], <floating> b.ts2[t], <floating> b.weight_decay,
                   b.weight_decay != 0.0, True, b.maximize, _codec(b, t, lo))
    elif stored is floating:
        # the copy path (mu = 1: the average is the parameter, written, not read): in
        # pieces, each piece's average lines asked for one piece ahead (a store-only
        # stream ran at 0.7 of the same-traffic loop)
        while lo < hi:
            k = min(hi, lo + 2048)
            if k < hi:
                fo_prefetch_write(ax + k, min(hi - k, 2048) * sizeof(floating))
            _asgd_loop(p + lo, g + lo, ax + lo, k - lo, <floating> b.ts0[t],
                       <floating> b.ts1[t], <floating> 1, <floating> b.weight_decay,
                       b.weight_decay != 0.0, False, b.maximize, _codec(b, t, lo))
            lo = k
    else:
        _asgd_loop(p + lo, g + lo, ax + lo, hi - lo, <floating> b.ts0[t],
                   <floating> b.ts1[t], <floating> 1, <floating> b.weight_decay,
                   b.weight_decay != 0.0, False, b.maximize, _codec(b, t, lo))


cdef inline double _asgd_read(const Batch *b, int k, Py_ssize_t t) noexcept nogil:
    if b.pscal_double[k][t]:
        return (<double *> b.pscal[k][t])[0]
    return <double> (<float *> b.pscal[k][t])[0]


cdef inline void _asgd_write(const Batch *b, int k, Py_ssize_t t, double x) noexcept nogil:
    # torch: torch.as_tensor(x) (float32) copied into the state tensor
    if b.pscal_double[k][t]:
        (<double *> b.pscal[k][t])[0] = <double> (<float> x)
    else:
        (<float *> b.pscal[k][t])[0] = <float> x


cdef void _asgd_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    # this step's coefficients from eta and mu as they are, then eta and mu for the next
    # step (lambd, alpha and t0 are kept in lr_decay, alpha and dampening)
    cdef double step = <double> b.steps[b.index[t]]
    cdef double eta = _asgd_read(b, 0, t), mu = _asgd_read(b, 1, t)
    b.ts0[t] = 1.0 - b.lr_decay * eta
    b.ts1[t] = -eta
    b.ts2[t] = mu
    _asgd_write(b, 0, t, b.lr / pow(1.0 + b.lr_decay * b.lr * step, b.alpha))
    _asgd_write(b, 1, t, 1.0 / (step - b.dampening if step - b.dampening > 1.0 else 1.0))


def prepare_asgd(params, grads, axs, etas, mus, steps, lr, lambd, alpha, t0, weight_decay,
                 maximize, state_dtype=None, rounding="nearest", seed=0, absmaxes=None):
    cdef Step s = Step()
    _take_storage(s, state_dtype, rounding, seed)
    _take_q8(s, (True,))   # the average is signed
    s.b.lr = _nonneg("learning rate", lr)
    s.b.lr_decay = _real("lambd", lambd, -INFINITY, True, INFINITY, True)
    s.b.alpha = _real("alpha", alpha, -INFINITY, True, INFINITY, True)
    s.b.dampening = _real("t0", t0, -INFINITY, True, INFINITY, True)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.maximize = _flag("maximize", maximize)
    if steps is None:
        raise ValueError("steps is required")
    params = _arrays("params", params)
    s._gather(("params", "grads", "axs"),
              (params, _arrays("grads", grads), _arrays("axs", axs)),
              (True, False, True), steps, _absmaxes(s, absmaxes, 1))
    s._take_scalar_state(0, "etas", etas, len(params))
    s._take_scalar_state(1, "mus", mus, len(params))
    s.segment = _asgd_segment
    s.kind = KIND_ASGD
    s.scalars = _asgd_scalars
    return s
