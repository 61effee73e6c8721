# Part of the kernel module (included by fastoptim/_kernels.pxi): Adadelta.
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), and prepare_adadelta: every check,
# then a Step. (No per-array scalars: the step count does not enter the update.)

cdef inline void _adadelta_loop(floating *p, const floating *g, stored *sq, stored *acc,
                                Py_ssize_t n, floating rho, floating one_minus_rho,
                                floating eps, floating neg_lr, floating wd, bint has_wd,
                                bint maximize, Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, s, a, d
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        if has_wd:
            gi = gi + wd * p[i]
        _load(sq, i, &s)
        s = s * rho + (one_minus_rho * gi) * gi
        _store(sq, i, s, c, 0)
        _load(acc, i, &a)
        d = (_sqrt(a + eps) / _sqrt(s + eps)) * gi
        a = a * rho + (one_minus_rho * d) * d
        _store(acc, i, a, c, 1)
        p[i] = p[i] + neg_lr * d


cdef inline void _adadelta_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                                 Py_ssize_t hi, floating *p, const floating *g,
                                 stored *sq, stored *acc, stored *unused) noexcept nogil:
    _adadelta_loop(p + lo, g + lo, sq + lo, acc + lo, hi - lo, <floating> b.alpha,
                   <floating> (1.0 - b.alpha), <floating> b.eps, <floating> (-b.lr),
                   <floating> b.weight_decay, b.weight_decay != 0.0, b.maximize,
                   _codec(b, t, lo))


def prepare_adadelta(params, grads, square_avgs, acc_deltas, steps, lr, rho, eps,
                     weight_decay, maximize, state_dtype=None, rounding="nearest", seed=0,
                     absmaxes=None):
    cdef Step s = Step()
    _take_storage(s, state_dtype, rounding, seed)
    _take_q8(s, (False, False))   # both never negative: the unsigned map
    s.b.lr = _nonneg("learning rate", lr)
    s.b.alpha = _real("rho value", rho, 0.0, False, 1.0, False)    # (rho, in alpha)
    s.b.eps = _nonneg("epsilon value", eps)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.maximize = _flag("maximize", maximize)
    if steps is None:
        raise ValueError("steps is required")
    s._gather(("params", "grads", "square_avgs", "acc_deltas"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("square_avgs", square_avgs), _arrays("acc_deltas", acc_deltas)),
              (True, False, True, True), steps, _absmaxes(s, absmaxes, 2))
    s.segment = _adadelta_segment
    s.kind = KIND_ADADELTA
    s.scalars = NULL
    return s
