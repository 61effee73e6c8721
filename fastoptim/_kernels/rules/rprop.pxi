# Part of the kernel module (included by fastoptim/_kernels.pxi): Rprop.
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), and prepare_rprop: every check, then
# a Step. Sign-based: torch.sign is (x > 0) - (x < 0), so a NaN has sign 0.

cdef inline void _rprop_loop(floating *p, const floating *g, stored *prev, stored *ss,
                             Py_ssize_t n, floating etaminus, floating etaplus,
                             floating lo, floating hi, bint maximize,
                             Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, pv, s, x, f, sg
    cdef floating one = 1, zero = 0
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    for i in range(n):
        gi = g[i] * sign
        _load(prev, i, &pv)
        _load(ss, i, &s)
        x = gi * pv
        f = etaplus if x > 0 else (etaminus if x < 0 else one)
        s = s * f
        s = lo if s < lo else s             # torch.clamp (NaN stays NaN)
        s = hi if s > hi else s
        _store(ss, i, s, c, 1)
        gi = zero if f == etaminus else gi
        sg = one if gi > 0 else (-one if gi < 0 else zero)
        p[i] = p[i] + (-sg) * s
        _store(prev, i, gi, c, 0)


cdef inline void _rprop_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                              floating *p, const floating *g, stored *prev, stored *ss,
                              stored *unused) noexcept nogil:
    # (the etas in beta1/beta2, the step size bounds in momentum/dampening)
    _rprop_loop(p + lo, g + lo, prev + lo, ss + lo, hi - lo, <floating> b.beta1,
                <floating> b.beta2, <floating> b.momentum, <floating> b.dampening,
                b.maximize, _codec(b, t, lo))


def prepare_rprop(params, grads, prevs, step_size_arrays, steps, lr, etas, step_sizes,
                  maximize, state_dtype=None, rounding="nearest", seed=0, absmaxes=None):
    cdef Step s = Step()
    _take_storage(s, state_dtype, rounding, seed)
    _take_q8(s, (True, False))   # prev signed, the step sizes positive
    s.b.lr = _nonneg("learning rate", lr)
    if not isinstance(etas, (tuple, list)) or len(etas) != 2:
        raise TypeError(f"etas must be a pair (etaminus, etaplus), got {etas!r}")
    if not isinstance(step_sizes, (tuple, list)) or len(step_sizes) != 2:
        raise TypeError(f"step_sizes must be a pair (min, max), got {step_sizes!r}")
    s.b.beta1 = _real("etas[0]", etas[0], 0.0, True, 1.0, True)
    s.b.beta2 = _real("etas[1]", etas[1], 1.0, True, INFINITY, True)
    s.b.momentum = _real("step_sizes[0]", step_sizes[0], -INFINITY, True, INFINITY, True)
    s.b.dampening = _real("step_sizes[1]", step_sizes[1], -INFINITY, True, INFINITY, True)
    s.b.maximize = _flag("maximize", maximize)
    if steps is None:
        raise ValueError("steps is required")
    s._gather(("params", "grads", "prevs", "step_size_arrays"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("prevs", prevs), _arrays("step_size_arrays", step_size_arrays)),
              (True, False, True, True), steps, _absmaxes(s, absmaxes, 2))
    s.segment = _rprop_segment
    s.kind = KIND_RPROP
    s.scalars = NULL
    return s
