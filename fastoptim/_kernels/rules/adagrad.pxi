# Part of the kernel module (included by fastoptim/_kernels.pxi): Adagrad.
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), the per-array scalars, and
# prepare_adagrad: every check, then a Step.

cdef inline void _adagrad_loop(floating *p, const floating *g, stored *acc, Py_ssize_t n,
                               floating clr, floating wd, floating eps, bint has_wd,
                               bint maximize, Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, s
    cdef floating neg_clr = -clr
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        if has_wd:
            gi = gi + wd * p[i]
        _load(acc, i, &s)
        s = s + gi * gi
        _store(acc, i, s, c, 0)
        p[i] = p[i] + (neg_clr * gi) / (_sqrt(s) + eps)


cdef inline void _adagrad_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                                floating *p, const floating *g, stored *acc,
                                stored *unused1, stored *unused2) noexcept nogil:
    _adagrad_loop(p + lo, g + lo, acc + lo, hi - lo, <floating> b.ts0[t],
                  <floating> b.weight_decay, <floating> b.eps, b.weight_decay != 0.0,
                  b.maximize, _codec(b, t, lo))


cdef void _adagrad_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    cdef double step = <double> b.steps[b.index[t]]
    b.ts0[t] = b.lr / (1.0 + (step - 1.0) * b.lr_decay)


def prepare_adagrad(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps,
                    maximize, state_dtype=None, rounding="nearest", seed=0,
                    absmaxes=None):
    cdef Step s = Step()
    _take_storage(s, state_dtype, rounding, seed)
    _take_q8(s, (False,))   # the signed map for signed state, in kernel order
    s.b.lr = _nonneg("learning rate", lr)
    s.b.lr_decay = _nonneg("lr_decay value", lr_decay)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.eps = _nonneg("epsilon value", eps)
    s.b.maximize = _flag("maximize", maximize)
    if steps is None:
        raise ValueError("steps is required")
    s._gather(("params", "grads", "state_sums"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("state_sums", state_sums)), (True, False, True), steps,
              _absmaxes(s, absmaxes, 1))
    s.segment = _adagrad_segment
    s.kind = KIND_ADAGRAD
    s.scalars = _adagrad_scalars
    return s
