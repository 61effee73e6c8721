# Part of the kernel module (included by fastoptim/_kernels.pxi): Schedule-Free AdamW.
# The element loop (as fastoptim/reference.py, with types), the typed function that runs
# it on one array's piece (segments.pxi.tp generates the segment that picks its
# instance), the per-array scalars and prepare_adamw_schedulefree: every check, then a
# Step. The classes give it the step's scheduled lr and the weight of its average (ckp1,
# from their groups' running sums, as the oracle keeps them).

cdef inline void _adamw_schedulefree_loop(floating *y, const floating *g, stored *z,
                                          stored *v, Py_ssize_t n, floating beta2,
                                          floating one_minus_b2, floating bc2,
                                          floating eps, floating wd, floating ckp1,
                                          floating y_step, floating lr, bint has_wd,
                                          bint maximize, Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, vi, zi, yi, d
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        _load(v, i, &vi)
        vi = vi * beta2 + (one_minus_b2 * gi) * gi
        _store(v, i, vi, c, 1)
        d = _sqrt(vi / bc2) + eps
        gi = gi / d
        yi = y[i]
        if has_wd:                           # (the decay is taken at y)
            gi = gi + wd * yi
        _load(z, i, &zi)
        yi = _lerp(yi, zi, ckp1)
        y[i] = yi + y_step * gi
        zi = zi - lr * gi
        _store(z, i, zi, c, 0)


cdef inline void _adamw_schedulefree_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                                           Py_ssize_t hi, floating *y, const floating *g,
                                           stored *z, stored *v,
                                           stored *unused) noexcept nogil:
    # ts0 = 1 - beta2^k (k: this step's count, from 1); ckp1 in b.alpha; y's step
    # lr * (beta1 (1 - ckp1) - 1), in double as the oracle computes it
    _adamw_schedulefree_loop(
        y + lo, g + lo, z + lo, v + lo, hi - lo, <floating> b.beta2,
        <floating> (1.0 - b.beta2), <floating> b.ts0[t], <floating> b.eps,
        <floating> b.weight_decay, <floating> b.alpha,
        <floating> (b.lr * (b.beta1 * (1.0 - b.alpha) - 1.0)), <floating> b.lr,
        b.weight_decay != 0.0, b.maximize, _codec(b, t, lo))


cdef void _adamw_schedulefree_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    b.ts0[t] = 1.0 - pow(b.beta2, <double> b.steps[b.index[t]])


def prepare_adamw_schedulefree(params, grads, zs, exp_avg_sqs, steps, lr, betas, eps,
                               weight_decay, ckp1, maximize):
    # (state in the parameters' dtype only: z is an iterate, not a statistic)
    cdef Step s = Step()
    s.b.lr = _nonneg("learning rate", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    s.b.beta1 = _real("beta parameter at index 0", betas[0], 0.0, False, 1.0, True)
    s.b.beta2 = _real("beta parameter at index 1", betas[1], 0.0, False, 1.0, True)
    s.b.eps = _nonneg("epsilon value", eps)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.alpha = _real("ckp1", ckp1, 0.0, False, 1.0, False)
    s.b.maximize = _flag("maximize", maximize)
    if steps is None:
        raise ValueError("steps is required")
    s._gather(("params", "grads", "zs", "exp_avg_sqs"),
              (_arrays("params", params), _arrays("grads", grads), _arrays("zs", zs),
               _arrays("exp_avg_sqs", exp_avg_sqs)),
              (True, False, True, True), steps)
    s.segment = _adamw_schedulefree_segment
    s.kind = KIND_SCHEDULEFREE
    s.scalars = _adamw_schedulefree_scalars
    return s
