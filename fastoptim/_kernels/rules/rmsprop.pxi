# Part of the kernel module (included by fastoptim/_kernels.pxi): RMSprop (centered, momentum).
# The element loop (as fastoptim/reference.py, with types), the segment that
# runs it on one array's piece, the per-array scalars, and prepare_rmsprop:
# every check, then a Step.

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
