# Part of the kernel module (included by fastoptim/_kernels.pxi): build facts, the
# threading knobs and the serial-size calibration, and the prepared step's types
# (Batch, the segment and scalars function types).

# ---------------------------------------------------------------------------------
# Build facts and threading knobs
# ---------------------------------------------------------------------------------

def openmp_enabled():
    """True when this module was compiled with OpenMP."""
    return bool(fo_openmp_enabled())


def omp_max_threads():
    """omp_get_max_threads() (honours OMP_NUM_THREADS), or 1 without OpenMP."""
    return fo_omp_max_threads()


def omp_num_procs():
    return fo_omp_num_procs()


def cpu_isa_level():
    """0 baseline, 3 x86-64-v3 (AVX2+FMA), 4 x86-64-v4 (AVX-512)."""
    return fo_cpu_isa_level()


def build_isa():
    return fo_build_isa().decode()


def build_cflags():
    return fo_build_cflags().decode()


# When is a step worth a thread team? A parallel region costs a fixed time (about a
# microsecond with warm threads); splitting n elements of per-element cost c over two
# threads saves n*c/2. So the break-even size is 2 * region / c, and c depends on the
# rule and dtype. Each (rule, dtype) calibrates itself at first use: its first
# CALIBRATION_RUNS steps of a mid size run serially and are timed (they are real
# updates, nothing extra is computed), the region cost is measured once, and from then
# on steps below the computed threshold stay serial. Until then, and whenever the user
# sets a threshold, _serial_threshold applies.

cdef enum:
    N_KINDS = 24                 # rule kinds (Step.kind), see the prepare_* functions
    KIND_SGD = 0
    KIND_ADAGRAD = 1
    KIND_RMSPROP = 2
    KIND_ADAM = 3
    KIND_ADAM_BF16 = 4
    KIND_TRAFFIC = 5
    KIND_ADAHESSIAN = 6
    KIND_ADAMAX = 7
    KIND_ADADELTA = 8
    KIND_RADAM = 9
    KIND_RPROP = 10
    KIND_NADAM = 11
    KIND_ASGD = 12
    KIND_LION = 13
    KIND_ADOPT = 14
    KIND_ADEMAMIX = 15
    KIND_SOPHIAH = 16
    KIND_SCHEDULEFREE = 17
    CALIBRATION_RUNS = 3
    CALIBRATION_MIN = 4096
    CALIBRATION_MAX = 1 << 18

cdef Py_ssize_t _serial_threshold = 1 << 15
cdef bint _user_threshold = False
cdef Py_ssize_t _thresholds[N_KINDS][2]
cdef double _calib_ns_per_elem[N_KINDS][2]
cdef int _calib_runs[N_KINDS][2]
cdef double _region_ns = -1.0
cdef int _region_sink[64]


def set_serial_threshold(n):
    """Steps with fewer elements than `n` (summed over arrays) run on one thread;
    None returns to the per-rule thresholds calibrated at first use."""
    global _serial_threshold, _user_threshold
    if n is None:
        _user_threshold = False
        _serial_threshold = 1 << 15
    else:
        _user_threshold = True
        _serial_threshold = max(<Py_ssize_t> n, 0)


def get_serial_threshold():
    """The fixed threshold in force before calibration (or set by the user)."""
    return _serial_threshold


def calibration():
    """{"rule/dtype": threshold} for the rules calibrated so far, and the region cost."""
    names = (("sgd", "adagrad", "rmsprop", "adam", "adam-bf16", "traffic", "adahessian",
              "adamax", "adadelta", "radam", "rprop", "nadam", "asgd", "lion", "adopt", "ademamix", "sophiah",
              "adamw-schedulefree")
             + tuple(f"kind{k}" for k in range(18, N_KINDS)))
    out = {}
    cdef int k, d
    for k in range(N_KINDS):
        for d in range(2):
            if _calib_runs[k][d] >= CALIBRATION_RUNS:
                out[names[k] + ("/float64" if d else "/float32")] = dict(
                    threshold=_thresholds[k][d], ns_per_element=_calib_ns_per_elem[k][d])
    return {"region_ns": _region_ns if _region_ns >= 0 else None, "rules": out}


cdef double _measure_region(int n_threads):
    """Median cost (ns) of an OpenMP region with warm threads."""
    from time import perf_counter_ns
    cdef int r, c
    cdef list times = []
    for r in range(40):
        t0 = perf_counter_ns()
        with nogil:
            for c in prange(n_threads, num_threads=n_threads, schedule="static", chunksize=1):
                _region_sink[c % 64] = r
        times.append(perf_counter_ns() - t0)
    times = sorted(times[10:])
    return <double> times[len(times) // 2]


# ---------------------------------------------------------------------------------
# The prepared step
# ---------------------------------------------------------------------------------

cdef struct Batch:
    Py_ssize_t n                 # arrays updated this step (grad not None)
    int nroles
    int ninputs                  # the last roles: read-only inputs in the parameters'
                                 # dtype, not state (SophiaH's Hessian diagonals)
    void **ptr[MAX_ROLES]        # ptr[role][t]: data of array t for that role (NULL if unused)
    char *is_double              # is_double[t]: dtype of array t
    Py_ssize_t *offsets          # offsets[t]: start of array t in the concatenated range; n+1
    Py_ssize_t *index            # index[t]: position of array t in the caller's lists
    int64_t *steps               # per-parameter step counters (caller's array) or NULL
    double *ts0                  # per-array scalars, filled by run() from the steps
    double *ts1
    double *ts2
    double *ts3
    # per-parameter scalar state (NAdam's mu_product, ASGD's eta and mu): for each of up
    # to two, one 0-d array per updated array, float32 or float64 (pscal_double),
    # updated by the rule's scalars function
    void **pscal[2]
    char *pscal_double[2]
    # hyperparameters (double; rounded to each array's dtype inside the loop)
    double lr, momentum, dampening, weight_decay, eps, alpha, lr_decay
    double beta1, beta2, beta3
    double t_alpha_beta3         # AdEMAMix's warmup (0: none)
    double hessian_power         # AdaHessian (_kernels_hessian.pxi)
    bint maximize, nesterov, centered, amsgrad, decoupled
    bint fixed_decay             # ADOPT: decoupled decay not scaled by lr
    # bfloat16 state (Adam/AdamW): state arrays hold uint16 bfloat16 bits
    bint bf16, stochastic
    uint32_t seed
    uint32_t *tkey               # per-array key for stochastic rounding (from the step)
    # 8-bit blockwise state (state_dtype="8bit"): per array, whether its state is 8-bit
    # (uint8 codes; else the parameters' dtype, for small arrays), and per state role
    # its block scales (float32, one per 256 elements) and which map it uses
    bint q8mode
    char *q8                     # q8[t]: array t's state is 8-bit
    float **absmax[MAX_ROLES - 2]    # absmax[j][t]: block scales of state j of array t
    char q8_signed[MAX_ROLES - 2]    # state j is quantized with the signed map


ctypedef void (*segment_fn)(const Batch *b, Py_ssize_t t, Py_ssize_t lo,
                            Py_ssize_t hi) noexcept nogil
ctypedef void (*scalars_fn)(Batch *b, Py_ssize_t t) noexcept nogil
