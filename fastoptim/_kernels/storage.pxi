# Part of the kernel module (included by fastoptim/_kernels.pxi): how state is stored.
#
# A rule's loop is written once, with its state arrays typed ``stored *``: it reads an
# element with _load and writes it with _store, and does its arithmetic in the
# parameters' dtype (``floating``) in registers. Cython instantiates the loop per
# (floating, stored) pair, and each instance inlines its format's load and store, so
# the loops stay branch-free and vectorize:
# * float, double: the parameters' dtype, loaded and stored as is;
# * bf16_nearest, bf16_stochastic: bfloat16 bits (the upper half of a float32; float32
#   parameters only), widened to float32 when loaded, rounded once when stored, to
#   nearest even or stochastically. Element i's random bits hash its index in the array
#   with a per-array, per-step, per-state key (a Codec): results do not depend on the
#   thread count or the partition.
# A rule's segment function picks the instance from the Batch (_state_format).

cdef struct bf16_nearest:
    uint16_t bits

cdef struct bf16_stochastic:
    uint16_t bits

ctypedef fused stored:
    float
    double
    bf16_nearest
    bf16_stochastic

cdef enum:
    MAX_STATE = MAX_ROLES - 2
    FORMAT_FLOAT = 0              # the parameters' dtype (float32 or float64)
    FORMAT_DOUBLE = 1
    FORMAT_BF16_NEAREST = 2
    FORMAT_BF16_STOCHASTIC = 3


cdef struct Codec:
    # What a store needs besides the value: the loop's first element's index in its
    # array, and a stochastic-rounding key per state array (in kernel order).
    uint32_t base
    uint32_t key[MAX_STATE]


cdef inline int _state_format(const Batch *b, Py_ssize_t t) noexcept nogil:
    if b.bf16:
        return FORMAT_BF16_STOCHASTIC if b.stochastic else FORMAT_BF16_NEAREST
    return FORMAT_DOUBLE if b.is_double[t] else FORMAT_FLOAT


cdef inline Codec _codec(const Batch *b, Py_ssize_t t, Py_ssize_t lo) noexcept nogil:
    cdef Codec c
    cdef int j
    c.base = <uint32_t> lo
    for j in range(MAX_STATE):
        c.key[j] = fo_hash32(b.tkey[t] ^ <uint32_t> (j + 1)) if b.stochastic else 0
    return c


cdef inline void _load(const stored *s, Py_ssize_t i, floating *x) noexcept nogil:
    if stored is bf16_nearest or stored is bf16_stochastic:
        x[0] = fo_bf16_to_f32(s[i].bits)
    else:
        x[0] = s[i]


cdef inline void _store(stored *s, Py_ssize_t i, floating x, Codec c,
                        int j) noexcept nogil:
    cdef uint32_t h
    if stored is bf16_nearest:
        s[i].bits = fo_f32_to_bf16_rne(<float> x)
    elif stored is bf16_stochastic:
        h = (c.base + <uint32_t> i) * (<uint32_t> 2654435769u)
        s[i].bits = fo_f32_to_bf16_sr(<float> x, fo_hash32(h ^ c.key[j]))
    else:
        s[i] = x


cdef _take_storage(Step s, object state_dtype, object rounding, object seed):
    """A prepare_*'s state format arguments: ``state_dtype`` None (the parameters'
    dtype) or "bfloat16" (uint16 arrays of bfloat16 bits; float32 parameters only),
    ``rounding`` "nearest" or "stochastic", ``seed`` of the stochastic rounding."""
    if state_dtype is None or state_dtype == "float":
        s.b.bf16 = False
    elif state_dtype == "bfloat16":
        s.b.bf16 = True
    else:
        raise ValueError(f"state_dtype must be None (the parameters' dtype) or "
                         f"'bfloat16', got {state_dtype!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    s.b.stochastic = rounding == "stochastic"
    if type(seed) is not int and (isinstance(seed, bool)        # (int: the fast path)
                                  or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    if seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    s.b.seed = <uint32_t> (int(seed) & 0xFFFFFFFF)
