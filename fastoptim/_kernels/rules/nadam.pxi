# Part of the kernel module (included by fastoptim/_kernels.pxi): NAdam.
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), the per-array scalars (which also
# advance the parameter's mu_product, a scalar kept in float32 as torch keeps it), and
# prepare_nadam: every check, then a Step.

cdef inline void _nadam_loop(floating *p, const floating *g, stored *m, stored *v,
                             Py_ssize_t n, floating bc2, floating c_grad, floating c_avg,
                             floating one_minus_b1, floating beta2, floating one_minus_b2,
                             floating eps, floating wd, floating decay, bint l2,
                             bint maximize, Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, pi, mi, vi, denom
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
        denom = _sqrt(vi / bc2) + eps
        pi = pi + (c_grad * gi) / denom
        p[i] = pi + (c_avg * mi) / denom


cdef inline void _nadam_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                              floating *p, const floating *g, stored *m, stored *v,
                              stored *unused) noexcept nogil:
    cdef bint has_wd = b.weight_decay != 0.0
    cdef bint l2 = has_wd and not b.decoupled
    cdef floating decay = <floating> (1.0 - b.lr * b.weight_decay) if (has_wd and b.decoupled) else 1
    _nadam_loop(p + lo, g + lo, m + lo, v + lo, hi - lo, <floating> b.ts0[t],
                <floating> b.ts1[t], <floating> b.ts2[t], <floating> (1.0 - b.beta1),
                <floating> b.beta2, <floating> (1.0 - b.beta2), <floating> b.eps,
                <floating> b.weight_decay, decay, l2, b.maximize, _codec(b, t, lo))


cdef void _nadam_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    # as torch: mu and mu_next in double; mu_product *= mu in the dtype of the
    # mu_product tensor (float32: both factors rounded to float32 first); then
    # ts0 = 1 - beta2^t, ts1 = -lr (1 - mu) / (1 - mu_product), ts2 = -lr mu_next /
    # (1 - mu_product mu_next), in double
    cdef double step = <double> b.steps[b.index[t]]
    cdef double md = b.lr_decay                   # (momentum_decay, in lr_decay)
    cdef double mu = b.beta1 * (1.0 - 0.5 * pow(0.96, step * md))
    cdef double mu_next = b.beta1 * (1.0 - 0.5 * pow(0.96, (step + 1.0) * md))
    cdef double prod
    cdef float prod32
    if b.pscal_double[0][t]:
        prod = (<double *> b.pscal[0][t])[0] * mu
        (<double *> b.pscal[0][t])[0] = prod
    else:
        prod32 = (<float *> b.pscal[0][t])[0] * <float> mu
        (<float *> b.pscal[0][t])[0] = prod32
        prod = <double> prod32
    b.ts0[t] = 1.0 - pow(b.beta2, step)
    b.ts1[t] = -b.lr * (1.0 - mu) / (1.0 - prod)
    b.ts2[t] = -b.lr * mu_next / (1.0 - prod * mu_next)


def prepare_nadam(params, grads, exp_avgs, exp_avg_sqs, mu_products, steps, lr, betas, eps,
                  weight_decay, momentum_decay, decoupled, maximize, state_dtype=None,
                  rounding="nearest", seed=0, absmaxes=None):
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
    s.b.lr_decay = _nonneg("momentum_decay value", momentum_decay)
    s.b.decoupled = _flag("decoupled_weight_decay", decoupled)
    s.b.maximize = _flag("maximize", maximize)
    if steps is None:
        raise ValueError("steps is required")
    params = _arrays("params", params)
    s._gather(("params", "grads", "exp_avgs", "exp_avg_sqs"),
              (params, _arrays("grads", grads), _arrays("exp_avgs", exp_avgs),
               _arrays("exp_avg_sqs", exp_avg_sqs)),
              (True, False, True, True), steps, _absmaxes(s, absmaxes, 2))
    s._take_scalar_state(0, "mu_products", mu_products, len(params))
    s.segment = _nadam_segment
    s.kind = KIND_NADAM
    s.scalars = _nadam_scalars
    return s
