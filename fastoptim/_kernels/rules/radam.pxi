# Part of the kernel module (included by fastoptim/_kernels.pxi): RAdam.
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), the per-array scalars (the bias
# corrections and the rectification, which switches on once rho_t > 5), and
# prepare_radam: every check, then a Step.

cdef inline void _radam_loop(floating *p, const floating *g, stored *m, stored *v,
                             Py_ssize_t n, floating bc1, floating sqrt_bc2, floating rect,
                             floating lr, floating one_minus_b1, floating beta2,
                             floating one_minus_b2, floating eps, floating wd,
                             floating decay, bint l2, bint rectified, bint maximize,
                             Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, pi, mi, vi, bcm, upd
    cdef floating one = 1
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        pi = p[i]
        if l2:
            gi = gi + wd * pi
        pi = pi * decay
        _load(m, i, &mi)
        mi = _lerp(mi, gi, one_minus_b1)
        _store(m, i, mi, c, 0)
        _load(v, i, &vi)
        vi = vi * beta2 + (one_minus_b2 * gi) * gi
        _store(v, i, vi, c, 1)
        bcm = mi / bc1
        if rectified:
            # torch: bcm * lr * (sqrt_bc2 / (sqrt(v) + eps)) * rect, where a number
            # divided by a tensor is its reciprocal times the number
            upd = ((bcm * lr) * ((one / (_sqrt(vi) + eps)) * sqrt_bc2)) * rect
        else:
            upd = bcm * lr
        p[i] = pi - upd


cdef inline void _radam_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                              floating *p, const floating *g, stored *m, stored *v,
                              stored *unused) noexcept nogil:
    cdef bint has_wd = b.weight_decay != 0.0
    cdef bint l2 = has_wd and not b.decoupled
    cdef floating decay = <floating> (1.0 - b.lr * b.weight_decay) if (has_wd and b.decoupled) else 1
    cdef Codec c = _codec(b, t, lo)
    if b.ts2[t] > 0:
        _radam_loop(p + lo, g + lo, m + lo, v + lo, hi - lo, <floating> b.ts0[t],
                    <floating> b.ts1[t], <floating> b.ts2[t], <floating> b.lr,
                    <floating> (1.0 - b.beta1), <floating> b.beta2,
                    <floating> (1.0 - b.beta2), <floating> b.eps,
                    <floating> b.weight_decay, decay, l2, True, b.maximize, c)
    else:
        _radam_loop(p + lo, g + lo, m + lo, v + lo, hi - lo, <floating> b.ts0[t],
                    <floating> b.ts1[t], <floating> 0, <floating> b.lr,
                    <floating> (1.0 - b.beta1), <floating> b.beta2,
                    <floating> (1.0 - b.beta2), <floating> b.eps,
                    <floating> b.weight_decay, decay, l2, False, b.maximize, c)


cdef void _radam_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    # in double, as torch computes them in Python: ts0 = 1 - beta1^t, ts1 =
    # (1 - beta2^t)^0.5, ts2 = the rectification (0: not rectified at this step)
    cdef double step = <double> b.steps[b.index[t]]
    cdef double bc2 = 1.0 - pow(b.beta2, step)
    cdef double rho_inf = 2.0 / (1.0 - b.beta2) - 1.0
    cdef double rho_t = rho_inf - 2.0 * step * pow(b.beta2, step) / bc2
    b.ts0[t] = 1.0 - pow(b.beta1, step)
    b.ts1[t] = pow(bc2, 0.5)
    if rho_t > 5.0:
        b.ts2[t] = pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                       / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.5)
    else:
        b.ts2[t] = 0.0


def prepare_radam(params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, eps, weight_decay,
                  decoupled, maximize, state_dtype=None, rounding="nearest", seed=0,
                  absmaxes=None):
    cdef Step s = Step()
    _take_storage(s, state_dtype, rounding, seed)
    _take_q8(s, (True, False))   # the signed map for signed state, in kernel order
    s.b.lr = _nonneg("learning rate", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    s.b.beta1 = _real("beta parameter at index 0", betas[0], 0.0, False, 1.0, True)
    s.b.beta2 = _real("beta parameter at index 1", betas[1], 0.0, False, 1.0, True)
    s.b.eps = _nonneg("epsilon value", eps)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.decoupled = _flag("decoupled_weight_decay", decoupled)
    s.b.maximize = _flag("maximize", maximize)
    if steps is None:
        raise ValueError("steps is required")
    s._gather(("params", "grads", "exp_avgs", "exp_avg_sqs"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("exp_avgs", exp_avgs), _arrays("exp_avg_sqs", exp_avg_sqs)),
              (True, False, True, True), steps, _absmaxes(s, absmaxes, 2))
    s.segment = _radam_segment
    s.kind = KIND_RADAM
    s.scalars = _radam_scalars
    return s
