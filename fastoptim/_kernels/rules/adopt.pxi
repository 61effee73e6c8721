# Part of the kernel module (included by fastoptim/_kernels.pxi): ADOPT.
# The element loop (as fastoptim/reference.py, with types; its state in any format,
# storage.pxi), the typed function that runs it on one array's piece (segments.pxi.tp
# generates the segment that picks its instance), the per-array scalars, and
# prepare_adopt: every check, then a Step. The clip of each array's step is the
# caller's function of the step (clip_lambda), evaluated when the step is prepared.

cdef inline void _adopt_loop(floating *p, const floating *g, stored *m, stored *v,
                             Py_ssize_t n, floating neg_lr, floating one_minus_b1,
                             floating beta2, floating one_minus_b2, floating eps,
                             floating clip, floating wd, floating decay, bint coupled,
                             bint decoupled, bint first, bint maximize,
                             Codec c) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, pi, mi, vi, d, x
    cdef floating sign = -1 if maximize else 1   # maximize: exact, branch-free
    cdef floating neg_clip = -clip
    for i in range(n):
        gi = g[i] * sign
        pi = p[i]
        if decoupled:
            pi = pi * decay
        if coupled:
            gi = gi + wd * pi
        _load(v, i, &vi)
        if first:
            # the first step seeds the second moment; p moves only by its decay
            vi = vi + gi * gi
            _store(v, i, vi, c, 1)
            p[i] = pi
            continue
        d = _sqrt(vi)
        d = eps if d < eps else d            # torch.clamp(min=eps): NaN stays NaN
        x = gi / d
        x = neg_clip if x < neg_clip else x  # torch.clamp(-clip, clip)
        x = clip if x > clip else x
        _load(m, i, &mi)
        mi = _lerp(mi, x, one_minus_b1)
        _store(m, i, mi, c, 0)
        p[i] = pi + neg_lr * mi
        vi = vi * beta2 + (one_minus_b2 * gi) * gi
        _store(v, i, vi, c, 1)


cdef inline void _adopt_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                              floating *p, const floating *g, stored *m, stored *v,
                              stored *unused) noexcept nogil:
    # (first and the flags are literal at each call: one loop per case)
    cdef bint has_wd = b.weight_decay != 0.0
    cdef floating decay = <floating> _oracle_decay(b)
    cdef Codec c = _codec(b, t, lo)
    cdef floating neg_lr = <floating> (-b.lr), omb1 = <floating> (1.0 - b.beta1)
    cdef floating beta2 = <floating> b.beta2, omb2 = <floating> (1.0 - b.beta2)
    cdef floating eps = <floating> b.eps, clip = <floating> b.ts1[t]
    cdef floating wd = <floating> b.weight_decay
    if b.ts0[t] != 0.0:
        _adopt_loop(p + lo, g + lo, m + lo, v + lo, hi - lo, neg_lr, omb1, beta2, omb2, eps,
                    clip, wd, decay, has_wd and not b.decoupled, has_wd and b.decoupled,
                    True, b.maximize, c)
    else:
        _adopt_loop(p + lo, g + lo, m + lo, v + lo, hi - lo, neg_lr, omb1, beta2, omb2, eps,
                    clip, wd, decay, has_wd and not b.decoupled, has_wd and b.decoupled,
                    False, b.maximize, c)


cdef void _adopt_scalars(Batch *b, Py_ssize_t t) noexcept nogil:
    # the first step only seeds the second moment (ts1: the clip, set when prepared)
    b.ts0[t] = 1.0 if b.steps[b.index[t]] == 1 else 0.0


cdef int _adopt_clips(Step s, object clip_lambda) except -1:
    """Each array's clip, from the step it is about to take (one call of clip_lambda per
    distinct step; None: no clip), all worked out before any is set: a clip_lambda that
    raises or gives a bad clip changes nothing."""
    cdef Py_ssize_t t
    cdef dict clips = {}
    cdef list out = []
    for t in range(s.b.n):
        if clip_lambda is None:
            out.append(INFINITY)
            continue
        key = s.b.steps[s.b.index[t]] + 1
        if key not in clips:
            clips[key] = _real(f"clip_lambda({key})", clip_lambda(key), 0.0, False,
                               INFINITY, False)
        out.append(clips[key])
    for t in range(s.b.n):
        s.b.ts1[t] = out[t]
    return 0


def adopt_set_clips(Step s not None, clip_lambda):
    """A reusable ADOPT step's clips worked out again from its step counts as they are
    now (after the caller set them, before run()): what prepare_adopt does once."""
    if s.kind != KIND_ADOPT:
        raise TypeError("adopt_set_clips takes a step of prepare_adopt")
    if clip_lambda is not None and not callable(clip_lambda):
        raise TypeError(f"clip_lambda must be a function of the step, or None; got "
                        f"{type(clip_lambda).__name__}")
    _adopt_clips(s, clip_lambda)


def prepare_adopt(params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, clip_lambda,
                  weight_decay, weight_decouple, fixed_decay, eps, maximize,
                  state_dtype=None, rounding="nearest", seed=0, absmaxes=None):
    cdef Step s = Step()
    _take_storage(s, state_dtype, rounding, seed)
    _take_q8(s, (True, False))   # the signed map for signed state, in kernel order
    s.b.lr = _nonneg("learning rate", lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    s.b.beta1 = _real("beta parameter at index 0", betas[0], 0.0, False, 1.0, True)
    s.b.beta2 = _real("beta parameter at index 1", betas[1], 0.0, False, 1.0, True)
    if clip_lambda is not None and not callable(clip_lambda):
        raise TypeError(f"clip_lambda must be a function of the step, or None; got "
                        f"{type(clip_lambda).__name__}")
    s.b.weight_decay = _nonneg("weight_decay value", weight_decay)
    s.b.decoupled = _flag("weight_decouple", weight_decouple)
    s.b.fixed_decay = _flag("fixed_decay", fixed_decay)
    s.b.eps = _nonneg("epsilon value", eps)
    s.b.maximize = _flag("maximize", maximize)
    if steps is None:
        raise ValueError("steps is required")
    s._gather(("params", "grads", "exp_avgs", "exp_avg_sqs"),
              (_arrays("params", params), _arrays("grads", grads),
               _arrays("exp_avgs", exp_avgs), _arrays("exp_avg_sqs", exp_avg_sqs)),
              (True, False, True, True), steps, _absmaxes(s, absmaxes, 2))
    _adopt_clips(s, clip_lambda)
    s.segment = _adopt_segment
    s.kind = KIND_ADOPT
    s.scalars = _adopt_scalars
    return s
