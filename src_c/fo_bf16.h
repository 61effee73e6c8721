/* bfloat16 storage for optimizer state: the upper 16 bits of an IEEE float32.
 *
 * Kept in C: bit casts between float and uint32 (memcpy, which compilers turn into a
 * register move and vectorize) are what Cython cannot spell without aliasing games.
 * Both roundings keep NaN a NaN (quieted) and Inf an Inf.
 */
#ifndef FO_BF16_H
#define FO_BF16_H

#include <stdint.h>
#include <string.h>

static inline float fo_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t fo_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Round to nearest, ties to even. */
static inline uint16_t fo_f32_to_bf16_rne(float f) {
    uint32_t u = fo_f32_bits(f);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x0040u;
    return (uint16_t)(f != f ? nan : rounded);
}

/* Stochastic rounding: round up with probability (dropped bits)/2^16, from 16 random
 * bits. Unbiased: E[result] = f, so tiny updates are not lost on average. */
static inline uint16_t fo_f32_to_bf16_sr(float f, uint32_t random_bits) {
    uint32_t u = fo_f32_bits(f);
    uint32_t rounded = (u + (random_bits & 0xFFFFu)) >> 16;
    uint32_t nan = (u >> 16) | 0x0040u;
    return (uint16_t)(f != f ? nan : rounded);
}

/* A 32-bit integer hash with good avalanche (C. Wellons' "lowbias32"). Random bits
 * for element i come from fo_hash32(i * 0x9E3779B9 ^ key): a pure function of the
 * element, the step and the seed, so results do not depend on the thread count. */
static inline uint32_t fo_hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

#endif
