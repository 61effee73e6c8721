/* The benchmark's same-traffic ceiling for compressed state: float32 parameters and
 * gradients, 2-byte (bfloat16 bits) or 1-byte (8-bit codes) state. Each loop reads and
 * writes exactly what a rule with that state moves, with no arithmetic: the parameter
 * is rewritten (through a compare on the gradient that never fires for finite data),
 * the state's values rotate between its arrays (one array: its bits are flipped).
 * In C for `restrict`: Python extensions are built with -fno-strict-aliasing, and a
 * uint8_t store may alias anything, so the same loop in Cython does not vectorize. */
#ifndef FO_TRAFFIC_H
#define FO_TRAFFIC_H

#include <stdint.h>

/* (one pass in pieces of 2048 elements: each piece's parameters, then its state) */
#define FO_TRAFFIC_NARROW(NAME, T)                                                    \
static void NAME(float *restrict p, const float *restrict g, T *restrict a,            \
                 T *restrict b, T *restrict c, int64_t n, int nstate) {                \
    int64_t lo, i, hi;                                                                 \
    for (lo = 0; lo < n; lo = hi) {                                                    \
        hi = n - lo < 2048 ? n : lo + 2048;                                            \
        for (i = lo; i < hi; i++) {                                                    \
            float x = p[i], gi = g[i];                                                 \
            p[i] = gi == gi ? x : gi;                                                  \
        }                                                                              \
        if (nstate == 1) {                                                             \
            for (i = lo; i < hi; i++)                                                  \
                a[i] = (T)~a[i];                                                       \
        } else if (nstate == 2) {                                                      \
            for (i = lo; i < hi; i++) {                                                \
                T y = a[i];                                                            \
                a[i] = b[i];                                                           \
                b[i] = y;                                                              \
            }                                                                          \
        } else if (nstate == 3) {                                                      \
            for (i = lo; i < hi; i++) {                                                \
                T y = a[i];                                                            \
                a[i] = b[i];                                                           \
                b[i] = c[i];                                                           \
                c[i] = y;                                                              \
            }                                                                          \
        }                                                                              \
    }                                                                                  \
}

FO_TRAFFIC_NARROW(fo_traffic_u8, uint8_t)
FO_TRAFFIC_NARROW(fo_traffic_u16, uint16_t)

#endif
