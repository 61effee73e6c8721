# Part of the kernel module (included by fastoptim/_kernels.pxi): SophiaH.
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), and prepare_sophiah: every check,
# then a Step. The Hessian-diagonal estimates are a read-only input role after the
# state (Batch.ninputs), in the parameters' dtype, on the steps that update the
# Hessian moment (a None list on the others).

cdef inline void _sophiah_loop(floating *p, const floating *g, stored *m, stored *hm,
                               const floating *h, Py_ssize_t n, floating neg_lr,
                               floating one_minus_b1, floating one_minus_b2, floating rho,
                               floating eps, floating wd, floating decay, bint coupled,
                               bint decoupled, bint has_h, bint maximize,
                               Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, pi, mi, hi_, d, u
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    cdef floating neg_rho = -rho
    for i in range(n):
        gi = g[i] * sign
        pi = p[i]
        if decoupled:
            pi = pi * decay
        if coupled:
            gi = gi + wd * pi
        _load(m, i, &mi)
        mi = _lerp(mi, gi, one_minus_b1)
        _store(m, i, mi, c, 0)
        _load(hm, i, &hi_)
        if has_h:
            hi_ = _lerp(hi_, h[i], one_minus_b2)
            _store(hm, i, hi_, c, 1)
        d = eps if hi_ < eps else hi_          # torch.clamp(min=eps): NaN stays NaN
        u = mi / d
        u = neg_rho if u < neg_rho else u      # torch.clamp(-p, p)
        u = rho if u > rho else u
        p[i] = pi + neg_lr * u


cdef inline void _sophiah_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                                floating *p, const floating *g, stored *m, stored *hm,
                                stored *hraw) noexcept nogil:
    # (the third slot is the input role: the parameters' dtype whatever the state's)
    cdef const floating *h = <const floating *> (<void *> hraw)
    cdef bint has_wd = b.weight_decay != 0.0
    cdef floating decay = <floating> _oracle_decay(b)
    cdef Codec c = _codec(b, t, lo)
    # (the rho of the update's clip in b.momentum)
    if h != NULL:
        _sophiah_loop(p + lo, g + lo, m + lo, hm + lo, h + lo, hi - lo, <floating> (-b.lr),
                      <floating> (1.0 - b.beta1), <floating> (1.0 - b.beta2),
                      <floating> b.momentum, <floating> b.eps, <floating> b.weight_decay,
                      decay, has_wd and not b.decoupled, has_wd and b.decoupled, True,
                      b.maximize, c)
    else:
        _sophiah_loop(p + lo, g + lo, m + lo, hm + lo, h, hi - lo, <floating> (-b.lr),
                      <floating> (1.0 - b.beta1), <floating> (1.0 - b.beta2),
                      <floating> b.momentum, <floating> b.eps, <floating> b.weight_decay,
                      decay, has_wd and not b.decoupled, has_wd and b.decoupled, False,
                      b.maximize, c)


def prepare_sophiah(params, grads, hessians, momentums, hessian_moments, steps, lr, betas,
                    weight_decay, weight_decouple, fixed_decay, p, eps, maximize,
                    state_dtype=None, rounding="nearest", seed=0, absmaxes=None):
    cdef Step s = Step()
    _take_storage(s, state_dtype, rounding, seed)
    _take_q8(s, (True, True))   # the signed map for both (Hessian estimates may be < 0)
    s.b.lr = _nonneg("learning rate", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    s.b.beta1 = _real("beta parameter at index 0", betas[0], 0.0, False, 1.0, True)
    s.b.beta2 = _real("beta parameter at index 1", betas[1], 0.0, False, 1.0, True)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.decoupled = _flag("weight_decouple", weight_decouple)
    s.b.fixed_decay = _flag("fixed_decay", fixed_decay)
    s.b.momentum = _nonneg("p (update clip) value", p)
    s.b.eps = _nonneg("epsilon value", eps)
    s.b.maximize = _flag("maximize", maximize)
    if steps is None:
        raise ValueError("steps is required")
    s.b.ninputs = 1
    s._gather(("params", "grads", "momentums", "hessian_moments", "hessians"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("momentums", momentums), _arrays("hessian_moments", hessian_moments),
               None if hessians is None else _arrays("hessians", hessians)),
              (True, False, True, True, False), steps, _absmaxes(s, absmaxes, 2))
    s.segment = _sophiah_segment
    s.kind = KIND_SOPHIAH
    s.scalars = NULL
    return s
