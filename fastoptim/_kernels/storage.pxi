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
#   with a per-array, per-step key for each pair of states (a Codec): the first state
#   of a pair takes the hash's low 16 bits, the second its high 16, so a loop hashes
#   once for both (the same expression, which the compiler computes once). Results do
#   not depend on the thread count or the partition.
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
    FORMAT_Q8 = 4                 # 8-bit blockwise codes (see _run_q8)
    Q8_BLOCK = 256                # elements per quantization block
    Q8_PREFETCH = 4               # blocks ahead that _run_q8 asks the memory for


cdef struct Codec:
    # What a store needs besides the value: the loop's first element's index in its
    # array, and a stochastic-rounding key per pair of state arrays (kernel order:
    # states 0 and 1 share key[0], state 2 has key[1]).
    uint32_t base
    uint32_t key[MAX_STATE]


cdef inline int _state_format(const Batch *b, Py_ssize_t t) noexcept nogil:
    if b.q8mode and b.q8[t]:
        return FORMAT_Q8
    if b.bf16:
        return FORMAT_BF16_STOCHASTIC if b.stochastic else FORMAT_BF16_NEAREST
    return FORMAT_DOUBLE if b.is_double[t] else FORMAT_FLOAT


cdef inline Codec _codec(const Batch *b, Py_ssize_t t, Py_ssize_t lo) noexcept nogil:
    cdef Codec c
    cdef int j
    c.base = <uint32_t> lo
    for j in range(MAX_STATE):             # key[j] serves states 2j and 2j + 1
        c.key[j] = (fo_hash32(b.tkey[t] ^ <uint32_t> (j + 1))
                    if b.stochastic and 2 * j < MAX_STATE else 0)
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
        s[i].bits = fo_f32_to_bf16_sr(<float> x,
                                      fo_hash32(h ^ c.key[j >> 1]) >> (16 * (j & 1)))
    else:
        s[i] = x


cdef _take_storage(Step s, object state_dtype, object rounding, object seed):
    """A prepare_*'s state format arguments: ``state_dtype`` None (the parameters'
    dtype), "bfloat16" (uint16 arrays of bfloat16 bits; float32 parameters only) or
    "8bit" (uint8 codes with float32 block scales, or the parameters' dtype for a
    parameter whose state arrays are given so),
    ``rounding`` "nearest" or "stochastic", ``seed`` of the stochastic rounding."""
    if state_dtype is None or state_dtype == "float":
        s.b.bf16 = False
    elif state_dtype == "bfloat16":
        s.b.bf16 = True
    elif state_dtype == "8bit":
        s.b.q8mode = True
    else:
        raise ValueError(f"state_dtype must be None (the parameters' dtype), 'bfloat16' "
                         f"or '8bit', got {state_dtype!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    s.b.stochastic = rounding == "stochastic"
    if type(seed) is not int and (isinstance(seed, bool)        # (int: the fast path)
                                  or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    if seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    s.b.seed = <uint32_t> (int(seed) & 0xFFFFFFFF)


# --- 8-bit blockwise state: a block codec around the rule's float32 loop --------------
#
# State of 256-element blocks, each a float32 scale (its largest magnitude) and a uint8
# code per element, the index of the nearest value of a 256-entry map (bitsandbytes'
# dynamic maps, fastoptim.formats: the spec these loops equal bit for bit). A block is
# decoded into L1 buffers, the rule's float32 loop runs on it, and each state's new
# block is measured and encoded again. Pieces of a parallel step start on blocks.

ctypedef void (*q8_rule_fn)(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                            float *p, const float *g, float *s0, float *s1,
                            float *s2) noexcept nogil

cdef extern from "fo_q8.h" nogil:
    # the codec, SIMD per ISA path: see src_c/fo_q8.h for how a code is found
    ctypedef struct fo_q8_map:
        float map[256]
        float thr[256]
        uint8_t zero
    fo_q8_map fo_q8_maps[2]              # [0] the unsigned map, [1] the signed one
    int fo_q8_init(int w, const float *values)
    void fo_q8_decode(const fo_q8_map *q, const uint8_t *codes, float scale, float *out,
                      int64_t n)
    float fo_q8_absmax(const float *x, int64_t n)
    void fo_q8_encode(const fo_q8_map *q, const float *x, float scale, uint8_t *codes,
                      int64_t n)
    int64_t fo_q8_selfcheck(int w, uint32_t *bad)
    int fo_q8_vbmi
    int fo_q8_set_vbmi(int on)
    void fo_q8_prefetch(const void *p, int64_t nbytes)


def _load_q8_maps(signed_map, unsigned_map):
    """Copy the two maps in (fastoptim.formats.dynamic_map, at import) and make their
    encoder tables."""
    cdef float values[256]
    cdef int k, w
    for w, m in ((1, signed_map), (0, unsigned_map)):
        if len(m) != 256:
            raise ValueError("a map has 256 values")
        for k in range(256):
            values[k] = <float> m[k]
        if fo_q8_init(w, values) != 0:
            raise ValueError("a map without the dynamic map's layout")


def _q8_thresholds(bint signed):
    """The encoder's 255 thresholds (float32): value v gets code j + 1 over thr[j]."""
    return np.array([fo_q8_maps[1 if signed else 0].thr[j] for j in range(255)],
                    np.float32)


def _q8_permute_decode(on=None):
    """Whether 8-bit codes are decoded by byte permutes (AVX512-VBMI) rather than
    gathers: True where this is an AVX-512 build and the CPU has VBMI. ``on=False``
    turns it off (same results), ``on=True`` back on where available; returns the
    setting now in force."""
    if on is not None:
        fo_q8_set_vbmi(1 if on else 0)
    return bool(fo_q8_vbmi)


fo_q8_set_vbmi(1)


def _q8_selfcheck(bint signed):
    """Encode every float32 in [-1, 1] with this module's encoder and compare each code
    with its definition (the number of midpoints below the value): (how many differ,
    the bits of one that does, or 0)."""
    cdef uint32_t bad = 0
    cdef int64_t wrong
    with nogil:
        wrong = fo_q8_selfcheck(1 if signed else 0, &bad)
    return int(wrong), int(bad)


cdef void _run_q8(const Batch *b, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t hi,
                  q8_rule_fn rule) noexcept nogil:
    """The rule on elements [lo, hi) of array t (lo on a block), its state 8-bit."""
    cdef float buf[MAX_STATE][Q8_BLOCK]
    cdef float *s[MAX_STATE]
    cdef uint8_t *codes[MAX_STATE]
    cdef float *scales[MAX_STATE]
    cdef float *p = <float *> b.ptr[ROLE_PARAM][t]
    cdef const float *g = <const float *> b.ptr[ROLE_GRAD][t]
    cdef int j, ns = b.nroles - 2 - b.ninputs, w
    cdef Py_ssize_t c = lo, n, k
    cdef float amax
    for j in range(MAX_STATE):
        codes[j] = <uint8_t *> b.ptr[2 + j][t] if j < ns else NULL
        scales[j] = b.absmax[j][t] if codes[j] != NULL else NULL
        s[j] = &buf[j][0] if codes[j] != NULL else NULL
    while c < hi:
        for j in range(ns, b.nroles - 2):   # read-only inputs: float32, this block's
            s[j] = <float *> b.ptr[2 + j][t] + c if b.ptr[2 + j][t] != NULL else NULL
        n = hi - c if hi - c < Q8_BLOCK else Q8_BLOCK
        k = c // Q8_BLOCK
        if c + Q8_PREFETCH * Q8_BLOCK + Q8_BLOCK <= hi:     # a block, some blocks ahead
            fo_q8_prefetch(p + c + Q8_PREFETCH * Q8_BLOCK, Q8_BLOCK * 4)
            fo_q8_prefetch(g + c + Q8_PREFETCH * Q8_BLOCK, Q8_BLOCK * 4)
            for j in range(ns):
                if codes[j] != NULL:
                    fo_q8_prefetch(codes[j] + c + Q8_PREFETCH * Q8_BLOCK, Q8_BLOCK)
        for j in range(ns):
            if codes[j] != NULL:
                w = b.q8_signed[j]
                fo_q8_decode(&fo_q8_maps[w], codes[j] + c, scales[j][k], buf[j], n)
        rule(b, t, 0, n, p + c, g + c, s[0], s[1], s[2])
        for j in range(ns):
            if codes[j] != NULL:
                w = b.q8_signed[j]
                amax = fo_q8_absmax(buf[j], n)   # NaN if any is NaN, as np.max
                scales[j][k] = amax
                if amax > 0 and amax < INFINITY:
                    fo_q8_encode(&fo_q8_maps[w], buf[j], amax, codes[j] + c, n)
                else:                       # zeros, or NaN/Inf: decodes to 0 or NaN
                    memset(codes[j] + c, fo_q8_maps[w].zero, n)
        c += n


cdef _take_q8(Step s, tuple has_sign):
    """8-bit state: which of the rule's state roles (in kernel order) are signed."""
    cdef int j
    for j in range(len(has_sign)):
        s.b.q8_signed[j] = 1 if has_sign[j] else 0


cdef object _absmaxes(Step s, object absmaxes, int k):
    """A prepare_*'s ``absmaxes`` (8-bit state): a sequence of ``k`` lists of block
    scales, one per state argument in order (None for one its options leave out), or
    None without 8-bit state."""
    if not s.b.q8mode:
        if absmaxes is not None:
            raise ValueError("absmaxes is for state_dtype='8bit'")
        return None
    if absmaxes is None:
        raise ValueError("state_dtype='8bit' needs absmaxes: one list of float32 block "
                         "scales per state argument")
    if not isinstance(absmaxes, (tuple, list)) or len(absmaxes) != k:
        raise TypeError(f"absmaxes must be a sequence of {k} lists (one per state "
                        f"argument), got {type(absmaxes).__name__}"
                        + (f" of {len(absmaxes)}" if isinstance(absmaxes, (tuple, list))
                           else ""))
    return tuple([] if x is None else _arrays(f"absmaxes[{j}]", x)
                 for j, x in enumerate(absmaxes))


from fastoptim.formats import dynamic_map as _dynamic_map     # (numpy only: no cycle)
_load_q8_maps(_dynamic_map(True), _dynamic_map(False))
del _dynamic_map
