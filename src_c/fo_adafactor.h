/* Adafactor's row loops (fastoptim/_kernels/rules/adafactor.pxi runs them in its
 * parallel passes), for float (_f) and double (_d). In C for `restrict`: extensions are
 * built with -fno-strict-aliasing, and with the column sums, the factors and the
 * parameter behind plain pointers the same loops in Cython were vectorized with
 * shuffles or not at all.
 *
 * Every sum follows fastoptim/reference.py's order: 16 interleaved lane sums (lane l
 * takes elements l, l + 16, ...), added lane by lane, then the elements past the last
 * full 16 one by one. Built with -ffp-contract=off: no fused multiply-adds, so every
 * instruction set rounds alike. */
#ifndef FO_ADAFACTOR_H
#define FO_ADAFACTOR_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define FO_AF_LANES 16

#define FO_AF_DEFINE(SUF, T, V, VI, SQRT)                                                       \
/* torch.lerp: start + w*(end-start) for w < 0.5, else end - (end-start)*(1-w) */        \
static inline T fo_af_lerp_##SUF(T start, T end, T w) {                                  \
    return w < (T)0.5 ? start + w * (end - start) : end - (end - start) * ((T)1 - w);   \
}                                                                                        \
                                                                                         \
/* A matrix's U: g * (1/sqrt(eps1^2)) where V = a*c is clamped, else g * scale */        \
static inline T fo_af_u_##SUF(T g, T v, T e2, T ie, T scale) {                           \
    return v < e2 ? g * ie : g * scale;                                                  \
}                                                                                        \
                                                                                         \
/* Pass 1 of a matrix, one row: *sg = sum of g^2, *sp = sum of p^2; col[j] += g[j]^2.  \
 * The 16 lanes are K GCC vectors of N lanes each, N the widest register of the build   \
 * (one zmm, two ymm or four xmm for float): lane-wise IEEE arithmetic, the same on     \
 * each instruction set. (One 64-byte vector on AVX2 went through the stack.) */        \
static void fo_af_row_sums_##SUF(const T *restrict p, const T *restrict g,               \
                                 T *restrict col, int64_t n, T *sg, T *sp) {             \
    enum { N = sizeof(V) / sizeof(T), K = FO_AF_LANES / N };                             \
    V ag[K], ap[K], x, y, c;                                                             \
    T s, t;                                                                              \
    int64_t j, n16 = n - n % FO_AF_LANES;                                                \
    int k, l;                                                                            \
    for (k = 0; k < K; k++) {                                                            \
        ag[k] = (V){0};                                                                  \
        ap[k] = (V){0};                                                                  \
    }                                                                                    \
    for (j = 0; j < n16; j += FO_AF_LANES) {                                             \
        for (k = 0; k < K; k++) {                                                        \
            memcpy(&x, g + j + k * N, sizeof x);                                         \
            memcpy(&y, p + j + k * N, sizeof y);                                         \
            memcpy(&c, col + j + k * N, sizeof c);                                       \
            x = x * x;                                                                   \
            ag[k] = ag[k] + x;                                                           \
            ap[k] = ap[k] + y * y;                                                       \
            c = c + x;                                                                   \
            memcpy(col + j + k * N, &c, sizeof c);                                       \
        }                                                                                \
    }                                                                                    \
    s = ag[0][0];                                                                        \
    t = ap[0][0];                                                                        \
    for (l = 1; l < FO_AF_LANES; l++) {                                                  \
        s = s + ag[l / N][l % N];                                                        \
        t = t + ap[l / N][l % N];                                                        \
    }                                                                                    \
    for (j = n16; j < n; j++) {                                                          \
        T z = g[j] * g[j];                                                               \
        s = s + z;                                                                       \
        col[j] = col[j] + z;                                                             \
        t = t + p[j] * p[j];                                                             \
    }                                                                                    \
    *sg = s;                                                                             \
    *sp = t;                                                                             \
}                                                                                        \
                                                                                         \
/* Pass 1 of a matrix, one row again (from L1): t[j] += g[j]^2 * inv, inv = 1/R of the  \
 * row (the column sums of g^2 / R, for the sum of U^2 from the factors) */              \
static void fo_af_row_tsum_##SUF(const T *restrict g, T inv, T *restrict t, int64_t n) { \
    int64_t j;                                                                           \
    for (j = 0; j < n; j++)                                                              \
        t[j] = t[j] + (g[j] * g[j]) * inv;                                               \
}                                                                                        \
                                                                                         \
/* Pass 2 of a matrix, one row: the sum of U^2 (a = R/rm of the row, ra = 1/sqrt(a),    \
 * cb[j] = 1/sqrt(c[j])) */                                                              \
static T fo_af_row_usum_##SUF(const T *restrict g, T a, T ra, const T *restrict c,       \
                              const T *restrict cb, T e2, T ie, T sign, int64_t n) {     \
    enum { N = sizeof(V) / sizeof(T), K = FO_AF_LANES / N };                             \
    V acc[K], gv, cv, bv, u, clamped, scaled;                                            \
    VI m;                                                                                \
    T s, su;                                                                             \
    int64_t j, n16 = n - n % FO_AF_LANES;                                                \
    int k, l;                                                                            \
    for (k = 0; k < K; k++)                                                              \
        acc[k] = (V){0};                                                                 \
    for (j = 0; j < n16; j += FO_AF_LANES) {                                             \
        for (k = 0; k < K; k++) {                                                        \
            memcpy(&gv, g + j + k * N, sizeof gv);                                       \
            memcpy(&cv, c + j + k * N, sizeof cv);                                       \
            memcpy(&bv, cb + j + k * N, sizeof bv);                                      \
            gv = gv * sign;                                                              \
            m = (a * cv) < e2;                 /* all ones where V is clamped */         \
            clamped = gv * ie;                                                           \
            scaled = gv * (ra * bv);                                                     \
            u = (V)(((VI)clamped & m) | ((VI)scaled & ~m));                              \
            acc[k] = acc[k] + u * u;                                                     \
        }                                                                                \
    }                                                                                    \
    s = acc[0][0];                                                                       \
    for (l = 1; l < FO_AF_LANES; l++)                                                    \
        s = s + acc[l / N][l % N];                                                       \
    for (j = n16; j < n; j++) {                                                          \
        su = fo_af_u_##SUF(g[j] * sign, a * c[j], e2, ie, ra * cb[j]);                   \
        s = s + su * su;                                                                 \
    }                                                                                    \
    return s;                                                                            \
}                                                                                        \
                                                                                         \
/* Pass 3 of a matrix, one row: p (1 - lr wd) + step * U */                              \
static void fo_af_row_step_##SUF(T *restrict p, const T *restrict g, T a, T ra,          \
                                 const T *restrict c, const T *restrict cb, T e2, T ie,  \
                                 T sign, T decay, int has_wd, T step, int64_t n) {       \
    int64_t j;                                                                           \
    if (has_wd) {                                                                        \
        for (j = 0; j < n; j++)                                                          \
            p[j] = p[j] * decay                                                          \
                   + step * fo_af_u_##SUF(g[j] * sign, a * c[j], e2, ie, ra * cb[j]);    \
    } else {                                                                             \
        for (j = 0; j < n; j++)                                                          \
            p[j] = p[j] + step * fo_af_u_##SUF(g[j] * sign, a * c[j], e2, ie, ra * cb[j]); \
    }                                                                                    \
}                                                                                        \
                                                                                         \
/* Pass 1 of a vector, one chunk: V's lerp toward g^2 (stored), *sp = sum of p^2,       \
 * *su = sum of U^2, U = g / sqrt(max(V, eps1^2)) */                                     \
static void fo_af_chunk_##SUF(const T *restrict p, const T *restrict g, T *restrict v,   \
                              int64_t n, T w, T e2, T sign, T *sp, T *su) {              \
    T ap[FO_AF_LANES], au[FO_AF_LANES], s, t, gj, vj, u;                                 \
    int64_t j, n16 = n - n % FO_AF_LANES;                                                \
    int l;                                                                               \
    for (l = 0; l < FO_AF_LANES; l++) {                                                  \
        ap[l] = 0;                                                                       \
        au[l] = 0;                                                                       \
    }                                                                                    \
    for (j = 0; j < n16; j += FO_AF_LANES) {                                             \
        for (l = 0; l < FO_AF_LANES; l++) {                                              \
            gj = g[j + l] * sign;                                                        \
            vj = fo_af_lerp_##SUF(v[j + l], gj * gj, w);                                 \
            v[j + l] = vj;                                                               \
            u = gj * ((T)1 / SQRT(vj < e2 ? e2 : vj));                                   \
            ap[l] = ap[l] + p[j + l] * p[j + l];                                         \
            au[l] = au[l] + u * u;                                                       \
        }                                                                                \
    }                                                                                    \
    s = ap[0];                                                                           \
    t = au[0];                                                                           \
    for (l = 1; l < FO_AF_LANES; l++) {                                                  \
        s = s + ap[l];                                                                   \
        t = t + au[l];                                                                   \
    }                                                                                    \
    for (j = n16; j < n; j++) {                                                          \
        gj = g[j] * sign;                                                                \
        vj = fo_af_lerp_##SUF(v[j], gj * gj, w);                                         \
        v[j] = vj;                                                                       \
        u = gj * ((T)1 / SQRT(vj < e2 ? e2 : vj));                                       \
        s = s + p[j] * p[j];                                                             \
        t = t + u * u;                                                                   \
    }                                                                                    \
    *sp = s;                                                                             \
    *su = t;                                                                             \
}                                                                                        \
                                                                                         \
/* Pass 2 of a vector, one chunk: p (1 - lr wd) + step * U */                             \
static void fo_af_chunk_step_##SUF(T *restrict p, const T *restrict g,                   \
                                   const T *restrict v, int64_t n, T e2, T sign,         \
                                   T decay, int has_wd, T step) {                        \
    int64_t j;                                                                           \
    if (has_wd) {                                                                        \
        for (j = 0; j < n; j++)                                                          \
            p[j] = p[j] * decay                                                          \
                   + step * (g[j] * sign * ((T)1 / SQRT(v[j] < e2 ? e2 : v[j])));        \
    } else {                                                                             \
        for (j = 0; j < n; j++)                                                          \
            p[j] = p[j] + step * (g[j] * sign * ((T)1 / SQRT(v[j] < e2 ? e2 : v[j])));   \
    }                                                                                    \
}

/* One register of the build's widest vectors; VI: the integer vector of the same lanes
 * (masks). The 16 lanes of a sum are 16 / (its lanes) of these. */
#if defined(__AVX512F__)
#define FO_AF_VBYTES 64
#elif defined(__AVX__)
#define FO_AF_VBYTES 32
#else
#define FO_AF_VBYTES 16
#endif
typedef float fo_af_vf __attribute__((vector_size(FO_AF_VBYTES)));
typedef int32_t fo_af_vfi __attribute__((vector_size(FO_AF_VBYTES)));
typedef double fo_af_vd __attribute__((vector_size(FO_AF_VBYTES)));
typedef int64_t fo_af_vdi __attribute__((vector_size(FO_AF_VBYTES)));

FO_AF_DEFINE(f, float, fo_af_vf, fo_af_vfi, sqrtf)
FO_AF_DEFINE(d, double, fo_af_vd, fo_af_vdi, sqrt)

#endif
