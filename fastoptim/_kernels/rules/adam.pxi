# Part of the kernel module (included by fastoptim/_kernels.pxi): Adam and AdamW (AMSGrad).
# The element math (as fastoptim/reference.py, with types), the loop that runs it on
# state in any format (storage.pxi), the typed function that runs the loop on one
# array's piece (segments.pxi.tp generates the segment that picks its instance), the
# per-array scalars, and prepare_adam: every check, then a Step.

cdef inline void _adam_element(floating g, floating *p, floating *m, floating *v,
                               floating *vmax, floating neg_step, floating inv_bc2_sqrt,
                               floating one_minus_b1, floating beta2,
                               floating one_minus_b2, floating eps, floating wd,
                               floating decay, floating sign, bint l2,
                               bint amsgrad) noexcept nogil:
    # Adam's update of one element, as fastoptim/reference.py, on values in registers:
    # g the gradient as stored; p, m, v (and vmax with amsgrad) in: the current
    # values, out: the new ones (vmax is not touched without amsgrad). decay is
    # 1 - lr*weight_decay for AdamW and exactly 1 otherwise (x*1 == x); sign is -1
    # with maximize, else 1 (exact, branch-free).
    cdef floating gi = g * sign, pi = p[0], mi, vi, vm, x, denom
    if l2:
        gi = gi + wd * pi
    pi = pi * decay
    mi = _lerp(m[0], gi, one_minus_b1)
    m[0] = mi
    vi = v[0] * beta2 + (one_minus_b2 * gi) * gi
    v[0] = vi
    if amsgrad:
        vm = vmax[0]
        # torch.maximum: NaN in either operand propagates (two selects, no
        # short-circuit `or`, which would put branches in the vector loop)
        x = vm if vi <= vm else vi
        vm = vm if vm != vm else x
        vmax[0] = vm
        vi = vm
    denom = _sqrt(vi) * inv_bc2_sqrt + eps
    p[0] = pi + (neg_step * mi) / denom


cdef inline void _adam_loop(floating *p, const floating *g, stored *m, stored *v,
                            stored *vmax, Py_ssize_t n, floating step_size,
                            floating inv_bc2_sqrt, floating one_minus_b1, floating beta2,
                            floating one_minus_b2, floating eps, floating wd,
                            floating decay, bint l2, bint amsgrad, bint maximize,
                            Codec c) noexcept nogil:
    # _adam_element over arrays, the state in any format (storage.pxi); amsgrad is a
    # literal at each call: one loop each.
    cdef Py_ssize_t i
    cdef floating pi, mi, vi, vm = 0
    cdef floating neg_step = -step_size
    cdef floating sign = -1 if maximize else 1
    for i in range(n):
        pi = p[i]
        _load(m, i, &mi)
        _load(v, i, &vi)
        if amsgrad:
            _load(vmax, i, &vm)
        _adam_element(g[i], &pi, &mi, &vi, &vm, neg_step, inv_bc2_sqrt, one_minus_b1,
                      beta2, one_minus_b2, eps, wd, decay, sign, l2, amsgrad)
        _store(m, i, mi, c, 0)
        _store(v, i, vi, c, 1)
        if amsgrad:
            _store(vmax, i, vm, c, 2)
        p[i] = pi


cdef inline void _adam_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                             floating *p, const floating *g, stored *m, stored *v,
                             stored *vmax) noexcept nogil:
    cdef bint has_wd = b.weight_decay != 0.0
    cdef bint l2 = has_wd and not b.decoupled
    cdef floating decay = <floating> (1.0 - b.lr * b.weight_decay) if (has_wd and b.decoupled) else 1
    cdef floating step_size = <floating> b.ts0[t], inv_bc2_sqrt = <floating> b.ts1[t]
    cdef floating omb1 = <floating> (1.0 - b.beta1), b2 = <floating> b.beta2
    cdef floating omb2 = <floating> (1.0 - b.beta2)
    cdef floating eps = <floating> b.eps, wd = <floating> b.weight_decay
    cdef Codec c = _codec(b, t, lo)
    cdef Py_ssize_t n = hi - lo
    p += lo
    g += lo
    m += lo
    v += lo
    if b.amsgrad:
        vmax += lo
        _adam_loop(p, g, m, v, vmax, n, step_size, inv_bc2_sqrt, omb1, b2, omb2, eps, wd,
                   decay, l2, True, b.maximize, c)
    else:
        _adam_loop(p, g, m, v, vmax, n, step_size, inv_bc2_sqrt, omb1, b2, omb2, eps, wd,
                   decay, l2, False, b.maximize, c)


cdef void _adam_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    cdef double step = <double> b.steps[b.index[t]]
    cdef double bc1 = 1.0 - pow(b.beta1, step)
    cdef double bc2 = 1.0 - pow(b.beta2, step)
    b.ts0[t] = b.lr / bc1            # step size
    b.ts1[t] = 1.0 / pow(bc2, 0.5)   # 1/sqrt of the second bias correction: one divide
                                     # per element fewer than torch's sqrt(v)/sqrt(bc2)


def prepare_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, betas,
                 eps, weight_decay, amsgrad, maximize, decoupled, state_dtype=None,
                 rounding="nearest", seed=0, absmaxes=None):
    cdef Step s = Step()
    _take_storage(s, state_dtype, rounding, seed)
    _take_q8(s, (True, False, False))   # the signed map for signed state, in kernel order
    s.b.lr = _nonneg("learning rate", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    s.b.beta1 = _real("beta parameter at index 0", betas[0], 0.0, False, 1.0, True)
    s.b.beta2 = _real("beta parameter at index 1", betas[1], 0.0, False, 1.0, True)
    s.b.eps = _nonneg("epsilon value", eps)
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.amsgrad = _flag("amsgrad", amsgrad)
    s.b.maximize = _flag("maximize", maximize)
    s.b.decoupled = _flag("decoupled_weight_decay", decoupled)
    if steps is None:
        raise ValueError("steps is required")
    if s.b.amsgrad and max_exp_avg_sqs is None:
        raise ValueError("max_exp_avg_sqs is required when amsgrad=True")
    s._gather(("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("exp_avgs", exp_avgs), _arrays("exp_avg_sqs", exp_avg_sqs),
               _arrays("max_exp_avg_sqs", max_exp_avg_sqs) if s.b.amsgrad else None),
              (True, False, True, True, True), steps, _absmaxes(s, absmaxes, 3))
    s.segment = _adam_segment
    s.kind = KIND_ADAM_BF16 if s.b.bf16 else KIND_ADAM
    s.scalars = _adam_scalars
    return s
