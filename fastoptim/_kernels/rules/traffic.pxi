# Part of the kernel module (included by fastoptim/_kernels.pxi): the benchmark's
# same-traffic ceiling.

# ---------------------------------------------------------------------------------
# The memory-traffic ceiling: the same arrays, partition and threads as a rule, the
# same bytes read and written per element, no arithmetic (values rotate between the
# written arrays; the gradient is read through a compare that never fires for
# finite data). The benchmark reports every rule as a fraction of this loop's speed.
# ---------------------------------------------------------------------------------

cdef inline void _traffic_loop(floating *p, const floating *g, floating *a, floating *b,
                               floating *c, Py_ssize_t n, int nstate) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating x, gi
    for i in range(n):
        x = p[i]
        gi = g[i]
        x = x if gi == gi else gi
        if nstate == 0:
            p[i] = x
        elif nstate == 1:
            p[i] = a[i]
            a[i] = x
        elif nstate == 2:
            p[i] = a[i]
            a[i] = b[i]
            b[i] = x
        else:
            p[i] = a[i]
            a[i] = b[i]
            b[i] = c[i]
            c[i] = x


cdef inline void _traffic_typed(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                                floating *p, const floating *g, floating *s0, floating *s1,
                                floating *s2) noexcept nogil:
    cdef int nstate = b.nroles - 2
    cdef Py_ssize_t n = hi - lo
    if nstate == 0:
        _traffic_loop(p + lo, g + lo, s0, s1, s2, n, 0)
    elif nstate == 1:
        _traffic_loop(p + lo, g + lo, s0 + lo, s1, s2, n, 1)
    elif nstate == 2:
        _traffic_loop(p + lo, g + lo, s0 + lo, s1 + lo, s2, n, 2)
    else:
        _traffic_loop(p + lo, g + lo, s0 + lo, s1 + lo, s2 + lo, n, 3)


cdef extern from "fo_traffic.h" nogil:
    # compressed state (bfloat16 bits, 8-bit codes): the same bytes, in C (restrict)
    void fo_traffic_u8(float *p, const float *g, uint8_t *a, uint8_t *b, uint8_t *c,
                       int64_t n, int nstate)
    void fo_traffic_u16(float *p, const float *g, uint16_t *a, uint16_t *b, uint16_t *c,
                        int64_t n, int nstate)


cdef void _traffic_segment(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                           Py_ssize_t hi) noexcept nogil:
    cdef int f = _state_format(b, t)
    cdef int ns = b.nroles - 2
    if f == FORMAT_Q8:
        fo_traffic_u8(<float *> b.ptr[0][t] + lo, <const float *> b.ptr[1][t] + lo,
                        <uint8_t *> b.ptr[2][t] + lo if ns > 0 else NULL,
                        <uint8_t *> b.ptr[3][t] + lo if ns > 1 else NULL,
                        <uint8_t *> b.ptr[4][t] + lo if ns > 2 else NULL, hi - lo, ns)
    elif f == FORMAT_BF16_NEAREST or f == FORMAT_BF16_STOCHASTIC:
        fo_traffic_u16(<float *> b.ptr[0][t] + lo, <const float *> b.ptr[1][t] + lo,
                        <uint16_t *> b.ptr[2][t] + lo if ns > 0 else NULL,
                        <uint16_t *> b.ptr[3][t] + lo if ns > 1 else NULL,
                        <uint16_t *> b.ptr[4][t] + lo if ns > 2 else NULL, hi - lo, ns)
    elif b.is_double[t]:
        _traffic_typed(b, t, lo, hi, <double *> b.ptr[0][t], <const double *> b.ptr[1][t],
                       <double *> b.ptr[2][t] if b.nroles > 2 else NULL,
                       <double *> b.ptr[3][t] if b.nroles > 3 else NULL,
                       <double *> b.ptr[4][t] if b.nroles > 4 else NULL)
    else:
        _traffic_typed(b, t, lo, hi, <float *> b.ptr[0][t], <const float *> b.ptr[1][t],
                       <float *> b.ptr[2][t] if b.nroles > 2 else NULL,
                       <float *> b.ptr[3][t] if b.nroles > 3 else NULL,
                       <float *> b.ptr[4][t] if b.nroles > 4 else NULL)


def prepare_traffic(list params, list grads, list states, absmaxes=None):
    """A Step that moves exactly the bytes of a rule with ``len(states)`` (0-3) state
    arrays per parameter: reads params, grads and states, writes params and states.
    State arrays may be compressed, as the rules keep it: uint16 (bfloat16 bits) or
    uint8 (8-bit codes, with ``absmaxes``, one list of block scales per state list,
    which this loop does not touch) beside float32 parameters."""
    cdef Step s = Step()
    cdef Py_ssize_t k
    if len(states) > 3:
        raise ValueError("at most 3 state lists")
    kinds = {np.asarray(a).dtype for lst in states for a in lst if a is not None}
    if kinds == {np.dtype(np.uint16)}:
        s.b.bf16 = True
    elif kinds == {np.dtype(np.uint8)}:
        s.b.q8mode = True
        if absmaxes is None or len(absmaxes) != len(states):
            raise ValueError("8-bit state needs absmaxes: one list per state list")
    names = ("params", "grads") + tuple(f"states[{k}]" for k in range(len(states)))
    s._gather(names, (params, grads) + tuple(list(x) for x in states),
              (True, False) + (True,) * len(states), None,
              tuple(absmaxes) if s.b.q8mode else None)
    s.segment = _traffic_segment
    s.kind = KIND_TRAFFIC
    s.scalars = NULL
    return s
