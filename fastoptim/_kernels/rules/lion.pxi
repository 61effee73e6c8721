# Part of the kernel module (included by fastoptim/_kernels.pxi): Lion.
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), and prepare_lion: every check, then
# a Step. Sign-based: torch.sign is (x > 0) - (x < 0), so a NaN has sign 0.

cdef inline void _lion_loop(floating *p, const floating *g, stored *m, Py_ssize_t n,
                            floating neg_lr, floating decay, floating beta1,
                            floating one_minus_b1, floating beta2, floating one_minus_b2,
                            bint has_wd, bint maximize, Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, mi, pi, x, s
    cdef floating one = 1, zero = 0
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        pi = p[i]
        if has_wd:
            pi = pi * decay
        _load(m, i, &mi)
        x = mi * beta1 + one_minus_b1 * gi
        s = one if x > 0 else (-one if x < 0 else zero)
        p[i] = pi + neg_lr * s
        mi = mi * beta2 + one_minus_b2 * gi
        _store(m, i, mi, c, 0)


cdef inline void _lion_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                             floating *p, const floating *g, stored *m, stored *unused1,
                             stored *unused2) noexcept nogil:
    _lion_loop(p + lo, g + lo, m + lo, hi - lo, <floating> (-b.lr),
               <floating> (1.0 - b.lr * b.weight_decay), <floating> b.beta1,
               <floating> (1.0 - b.beta1), <floating> b.beta2, <floating> (1.0 - b.beta2),
               b.weight_decay != 0.0, b.maximize, _codec(b, t, lo))


def prepare_lion(params, grads, exp_avgs, steps, lr, betas, weight_decay, maximize,
                 state_dtype=None, rounding="nearest", seed=0, absmaxes=None):
    cdef Step s = Step()
    _take_storage(s, state_dtype, rounding, seed)
    _take_q8(s, (True,))   # the signed map for signed state
    s.b.lr = _nonneg("learning rate", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    s.b.beta1 = _real("beta parameter at index 0", betas[0], 0.0, False, 1.0, False)
    s.b.beta2 = _real("beta parameter at index 1", betas[1], 0.0, False, 1.0, False)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.maximize = _flag("maximize", maximize)
    s._gather(("params", "grads", "exp_avgs"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("exp_avgs", exp_avgs)), (True, False, True), steps,
              _absmaxes(s, absmaxes, 1))
    s.segment = _lion_segment
    s.kind = KIND_LION
    s.scalars = NULL
    return s
