# Part of the kernel module (included by fastoptim/_kernels.pxi): SGD (momentum, dampening, Nesterov).
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), the per-array scalars, and
# prepare_sgd: every check, then a Step.

cdef inline void _sgd_loop(floating *p, const floating *g, stored *buf, Py_ssize_t n,
                           floating lr, floating wd, floating mom, floating damp1,
                           bint has_wd, bint has_mom, bint first, bint nesterov,
                           bint maximize, Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, bi
    cdef floating neg_lr = -lr
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        if has_wd:
            gi = gi + wd * p[i]
        if has_mom:
            _load(buf, i, &bi)
            bi = bi * mom + damp1 * gi
            bi = gi if first else bi
            _store(buf, i, bi, c, 0)
            gi = gi + mom * bi if nesterov else bi
        p[i] = p[i] + neg_lr * gi


cdef inline void _sgd_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                            floating *p, const floating *g, stored *buf, stored *unused1,
                            stored *unused2) noexcept nogil:
    # (has_mom is a literal at each call: one loop with the buffer, one without)
    cdef bint first = b.ts0[t] != 0.0
    cdef bint has_wd = b.weight_decay != 0.0
    cdef floating lr = <floating> b.lr, wd = <floating> b.weight_decay
    cdef floating mom = <floating> b.momentum, damp1 = <floating> (1.0 - b.dampening)
    cdef Codec c = _codec(b, t, lo)
    if b.momentum != 0.0:
        _sgd_loop(p + lo, g + lo, buf + lo, hi - lo, lr, wd, mom, damp1, has_wd, True,
                  first, b.nesterov, b.maximize, c)
    else:
        _sgd_loop(p + lo, g + lo, buf, hi - lo, lr, wd, 0, 1, has_wd, False, False,
                  False, b.maximize, c)


cdef void _sgd_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    # The momentum buffer is set to the gradient on a parameter's first step.
    b.ts0[t] = 1.0 if (b.steps != NULL and b.steps[b.index[t]] == 1) else 0.0


def prepare_sgd(params, grads, momentum_buffers, steps, lr, momentum, dampening,
                nesterov, weight_decay, maximize, state_dtype=None, rounding="nearest",
                seed=0, absmaxes=None):
    cdef Step s = Step()
    _take_storage(s, state_dtype, rounding, seed)
    _take_q8(s, (True,))   # the signed map for signed state, in kernel order
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
                   _arrays("momentum_buffers", momentum_buffers)), (True, False, True), steps,
                  _absmaxes(s, absmaxes, 1))
    else:
        s._gather(("params", "grads"), (_arrays("params", params), _arrays("grads", grads)),
                  (True, False), steps,
                  (_absmaxes(s, absmaxes, 1) or ())[:0])
    s.segment = _sgd_segment
    s.kind = KIND_SGD
    s.scalars = _sgd_scalars
    return s
