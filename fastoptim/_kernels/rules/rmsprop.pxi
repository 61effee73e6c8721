# Part of the kernel module (included by fastoptim/_kernels.pxi): RMSprop (centered, momentum).
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), the per-array scalars, and
# prepare_rmsprop: every check, then a Step.

cdef inline void _rmsprop_loop(floating *p, const floating *g, stored *sq, stored *ga,
                               stored *buf, Py_ssize_t n, floating lr, floating alpha,
                               floating one_minus_alpha, floating eps, floating wd,
                               floating mom, bint has_wd, bint centered, bint has_mom,
                               bint maximize, Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, s, a, avg, bi
    cdef floating neg_lr = -lr
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        if has_wd:
            gi = gi + wd * p[i]
        _load(sq, i, &s)
        s = s * alpha + (one_minus_alpha * gi) * gi
        _store(sq, i, s, c, 0)
        if centered:
            _load(ga, i, &a)
            a = _lerp(a, gi, one_minus_alpha)
            _store(ga, i, a, c, 1)
            avg = _sqrt(s + (-a) * a) + eps
        else:
            avg = _sqrt(s) + eps
        if has_mom:
            _load(buf, i, &bi)
            bi = bi * mom + gi / avg
            _store(buf, i, bi, c, 2)
            p[i] = p[i] + neg_lr * bi
        else:
            p[i] = p[i] + (neg_lr * gi) / avg


cdef inline void _rmsprop_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                                Py_ssize_t hi, floating *p, const floating *g,
                                stored *sq, stored *ga, stored *buf) noexcept nogil:
    # (centered and momentum are literals at each call: four loops)
    cdef floating lr = <floating> b.lr, alpha = <floating> b.alpha
    cdef floating one_minus_alpha = <floating> (1.0 - b.alpha)
    cdef floating eps = <floating> b.eps, wd = <floating> b.weight_decay
    cdef floating mom = <floating> b.momentum
    cdef bint has_wd = b.weight_decay != 0.0
    cdef Codec c = _codec(b, t, lo)
    cdef Py_ssize_t n = hi - lo
    p += lo
    g += lo
    sq += lo
    if b.centered:
        ga += lo
        if b.momentum > 0.0:
            buf += lo
            _rmsprop_loop(p, g, sq, ga, buf, n, lr, alpha, one_minus_alpha, eps, wd, mom,
                          has_wd, True, True, b.maximize, c)
        else:
            _rmsprop_loop(p, g, sq, ga, buf, n, lr, alpha, one_minus_alpha, eps, wd, mom,
                          has_wd, True, False, b.maximize, c)
    else:
        if b.momentum > 0.0:
            buf += lo
            _rmsprop_loop(p, g, sq, ga, buf, n, lr, alpha, one_minus_alpha, eps, wd, mom,
                          has_wd, False, True, b.maximize, c)
        else:
            _rmsprop_loop(p, g, sq, ga, buf, n, lr, alpha, one_minus_alpha, eps, wd, mom,
                          has_wd, False, False, b.maximize, c)


def prepare_rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr,
                    alpha, eps, weight_decay, momentum, centered, maximize, state_dtype=None,
                    rounding="nearest", seed=0, absmaxes=None):
    cdef Step s = Step()
    _take_storage(s, state_dtype, rounding, seed)
    _take_q8(s, (False, True, True))   # the signed map for signed state, in kernel order
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
              (True, False, True, True, True), steps, _absmaxes(s, absmaxes, 3))
    s.segment = _rmsprop_segment
    s.kind = KIND_RMSPROP
    s.scalars = NULL
    return s
