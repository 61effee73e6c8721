# Part of the kernel module (included by fastoptim/_kernels.pxi): AdEMAMix.
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), the per-array scalars (the bias
# corrections and the alpha and beta3 schedules, from the step) and prepare_ademamix:
# every check, then a Step.

cdef inline void _ademamix_loop(floating *p, const floating *g, stored *m, stored *v,
                                stored *s, Py_ssize_t n, floating neg_lr,
                                floating one_minus_b1, floating beta2,
                                floating one_minus_b2, floating one_minus_b3, floating bc1,
                                floating bc2_sqrt, floating alpha, floating eps,
                                floating wd, floating decay, bint coupled, bint decoupled,
                                bint maximize, Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, pi, mi, vi, si, d, u
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
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
        _load(v, i, &vi)
        vi = vi * beta2 + (one_minus_b2 * gi) * gi
        _store(v, i, vi, c, 1)
        _load(s, i, &si)
        si = _lerp(si, gi, one_minus_b3)
        _store(s, i, si, c, 2)
        d = _sqrt(vi) / bc2_sqrt + eps
        u = mi / bc1 + alpha * si
        p[i] = pi + (neg_lr * u) / d


cdef inline void _ademamix_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                                 floating *p, const floating *g, stored *m, stored *v,
                                 stored *s) noexcept nogil:
    # ts0 = 1 - beta1^t, ts1 = (1 - beta2^t)^0.5, ts2 = alpha_t, ts3 = 1 - beta3_t
    cdef bint has_wd = b.weight_decay != 0.0
    _ademamix_loop(p + lo, g + lo, m + lo, v + lo, s + lo, hi - lo, <floating> (-b.lr),
                   <floating> (1.0 - b.beta1), <floating> b.beta2,
                   <floating> (1.0 - b.beta2), <floating> b.ts3[t], <floating> b.ts0[t],
                   <floating> b.ts1[t], <floating> b.ts2[t], <floating> b.eps,
                   <floating> b.weight_decay,
                   <floating> _oracle_decay(b),
                   has_wd and not b.decoupled, has_wd and b.decoupled, b.maximize,
                   _codec(b, t, lo))


cdef void _ademamix_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    # in double, as the oracle computes them in Python (math.pow, log, exp: the same
    # C library)
    cdef double step = <double> b.steps[b.index[t]]
    cdef double T = b.t_alpha_beta3, lb1, lb3, beta3_t, alpha_t
    b.ts0[t] = 1.0 - pow(b.beta1, step)
    b.ts1[t] = sqrt(1.0 - pow(b.beta2, step))
    if T == 0.0:                          # (no warmup)
        alpha_t, beta3_t = b.alpha, b.beta3
    else:
        alpha_t = step * b.alpha / T
        alpha_t = b.alpha if b.alpha < alpha_t else alpha_t      # Python's min(x, alpha)
        lb1, lb3 = log(b.beta1), log(b.beta3)
        beta3_t = exp(lb1 * lb3 / ((1.0 - step / T) * lb3 + (step / T) * lb1))
        beta3_t = b.beta3 if b.beta3 < beta3_t else beta3_t
    b.ts2[t] = alpha_t
    b.ts3[t] = 1.0 - beta3_t


def prepare_ademamix(params, grads, exp_avgs, exp_avg_sqs, exp_avg_slows, steps, lr, betas,
                     weight_decay, weight_decouple, fixed_decay, alpha, t_alpha_beta3, eps,
                     maximize, state_dtype=None, rounding="nearest", seed=0, absmaxes=None):
    cdef Step s = Step()
    _take_storage(s, state_dtype, rounding, seed)
    _take_q8(s, (True, False, True))   # the signed map for signed state, in kernel order
    s.b.lr = _nonneg("learning rate", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 3:
        raise TypeError(f"betas must be a triple (beta1, beta2, beta3), got {betas!r}")
    s.b.beta1 = _real("beta parameter at index 0", betas[0], 0.0, False, 1.0, True)
    s.b.beta2 = _real("beta parameter at index 1", betas[1], 0.0, False, 1.0, True)
    s.b.beta3 = _real("beta parameter at index 2", betas[2], 0.0, False, 1.0, False)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.decoupled = _flag("weight_decouple", weight_decouple)
    s.b.fixed_decay = _flag("fixed_decay", fixed_decay)
    s.b.alpha = _nonneg("alpha value", alpha)
    if t_alpha_beta3 is None:
        s.b.t_alpha_beta3 = 0.0
    else:
        s.b.t_alpha_beta3 = _real("t_alpha_beta3", t_alpha_beta3, 0.0, True, INFINITY, False)
        if s.b.beta1 == 0.0 or s.b.beta3 == 0.0:
            raise ValueError("t_alpha_beta3 schedules beta3 through log(beta1) and "
                             "log(beta3): both betas must be > 0")
    s.b.eps = _nonneg("epsilon value", eps)
    s.b.maximize = _flag("maximize", maximize)
    if steps is None:
        raise ValueError("steps is required")
    s._gather(("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_avg_slows"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("exp_avgs", exp_avgs), _arrays("exp_avg_sqs", exp_avg_sqs),
               _arrays("exp_avg_slows", exp_avg_slows)),
              (True, False, True, True, True), steps, _absmaxes(s, absmaxes, 3))
    s.segment = _ademamix_segment
    s.kind = KIND_ADEMAMIX
    s.scalars = _ademamix_scalars
    return s
