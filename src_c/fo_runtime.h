/* Runtime facts the Cython kernels need from C: CPU features and OpenMP.
 *
 * Kept in C because Cython cannot express either portably: __builtin_cpu_supports is a
 * GCC/Clang builtin, and <omp.h> must not be included when the compiler has no OpenMP
 * (the build then still succeeds and every kernel runs on one thread).
 */
#ifndef FO_RUNTIME_H
#define FO_RUNTIME_H

/* Ask for the cache lines of [p, p + bytes) for writing, ahead of a loop that writes
 * them without reading them (a store-only stream the prefetchers serve poorly) */
static inline void fo_prefetch_write(const void *p, long long bytes) {
    const char *c = (const char *)p;
    long long k;
    for (k = 0; k < bytes; k += 64)
        __builtin_prefetch(c + k, 1, 3);
}

#if defined(_OPENMP)
#include <omp.h>
#endif

/* 1 when this module was compiled with OpenMP. */
static int fo_openmp_enabled(void) {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}

/* What omp_get_max_threads() says (OMP_NUM_THREADS, cgroup), or 1 without OpenMP. */
static int fo_omp_max_threads(void) {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* Number of processors OpenMP sees, or 1 without OpenMP. */
static int fo_omp_num_procs(void) {
#if defined(_OPENMP)
    return omp_get_num_procs();
#else
    return 1;
#endif
}

/* Instruction-set level the CPU and OS support:
 * 0 = baseline, 3 = x86-64-v3 (AVX2, FMA, BMI2), 4 = x86-64-v4 (AVX-512 F/BW/CD/DQ/VL).
 * __builtin_cpu_supports also checks that the OS saves the wide registers (XCR0). */
static int fo_cpu_isa_level(void) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("avx") && __builtin_cpu_supports("popcnt");
    int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
    return v4 ? 4 : (v3 ? 3 : 0);
#else
    return 0;
#endif
}

#ifndef FASTOPTIM_ISA
#define FASTOPTIM_ISA "unknown"
#endif
#ifndef FASTOPTIM_CFLAGS
#define FASTOPTIM_CFLAGS ""
#endif

static const char *fo_build_isa(void) { return FASTOPTIM_ISA; }
static const char *fo_build_cflags(void) { return FASTOPTIM_CFLAGS; }

#endif
