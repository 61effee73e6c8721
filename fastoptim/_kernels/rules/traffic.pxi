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


cdef void _traffic_segment(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                           Py_ssize_t hi) noexcept nogil:
    if b.is_double[t]:
        _traffic_typed(b, t, lo, hi, <double *> b.ptr[0][t], <const double *> b.ptr[1][t],
                       <double *> b.ptr[2][t] if b.nroles > 2 else NULL,
                       <double *> b.ptr[3][t] if b.nroles > 3 else NULL,
                       <double *> b.ptr[4][t] if b.nroles > 4 else NULL)
    else:
        _traffic_typed(b, t, lo, hi, <float *> b.ptr[0][t], <const float *> b.ptr[1][t],
                       <float *> b.ptr[2][t] if b.nroles > 2 else NULL,
                       <float *> b.ptr[3][t] if b.nroles > 3 else NULL,
                       <float *> b.ptr[4][t] if b.nroles > 4 else NULL)


def prepare_traffic(list params, list grads, list states):
    """A Step that moves exactly the bytes of a rule with ``len(states)`` (0-3) state
    arrays per parameter: reads params, grads and states, writes params and states."""
    cdef Step s = Step()
    cdef Py_ssize_t k
    if len(states) > 3:
        raise ValueError("at most 3 state lists")
    names = ("params", "grads") + tuple(f"states[{k}]" for k in range(len(states)))
    s._gather(names, (params, grads) + tuple(list(x) for x in states),
              (True, False) + (True,) * len(states), None)
    s.segment = _traffic_segment
    s.kind = KIND_TRAFFIC
    s.scalars = NULL
    return s
