# Part of the kernel module (included by fastoptim/_kernels.pxi): Adamax.
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), the per-array scalars, and
# prepare_adamax: every check, then a Step.

cdef inline void _adamax_loop(floating *p, const floating *g, stored *m, stored *u,
                              Py_ssize_t n, floating neg_clr, floating one_minus_b1,
                              floating beta2, floating eps, floating wd, bint has_wd,
                              bint maximize, Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, mi, ui, a, x
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        if has_wd:
            gi = gi + wd * p[i]
        _load(m, i, &mi)
        mi = _lerp(mi, gi, one_minus_b1)
        _store(m, i, mi, c, 0)
        _load(u, i, &ui)
        ui = ui * beta2
        a = (gi if gi >= 0 else -gi) + eps
        # torch.maximum: NaN in either operand propagates (two selects)
        x = a if ui <= a else ui
        ui = ui if ui != ui else x
        _store(u, i, ui, c, 1)
        p[i] = p[i] + (neg_clr * mi) / ui


cdef inline void _adamax_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                               floating *p, const floating *g, stored *m, stored *u,
                               stored *unused) noexcept nogil:
    _adamax_loop(p + lo, g + lo, m + lo, u + lo, hi - lo, <floating> b.ts0[t],
                 <floating> (1.0 - b.beta1), <floating> b.beta2, <floating> b.eps,
                 <floating> b.weight_decay, b.weight_decay != 0.0, b.maximize,
                 _codec(b, t, lo))


cdef void _adamax_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    # -lr / (1 - beta1^t), in double, as torch computes it in Python
    cdef double step = <double> b.steps[b.index[t]]
    b.ts0[t] = -(b.lr / (1.0 - pow(b.beta1, step)))


def prepare_adamax(params, grads, exp_avgs, exp_infs, steps, lr, betas, eps, weight_decay,
                   maximize, state_dtype=None, rounding="nearest", seed=0, absmaxes=None):
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
    s.b.maximize = _flag("maximize", maximize)
    if steps is None:
        raise ValueError("steps is required")
    s._gather(("params", "grads", "exp_avgs", "exp_infs"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("exp_avgs", exp_avgs), _arrays("exp_infs", exp_infs)),
              (True, False, True, True), steps, _absmaxes(s, absmaxes, 2))
    s.segment = _adamax_segment
    s.kind = KIND_ADAMAX
    s.scalars = _adamax_scalars
    return s
