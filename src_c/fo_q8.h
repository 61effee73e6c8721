/* The 8-bit blockwise state codec: decode, block absmax and encode, SIMD on each ISA
 * path (AVX-512 and AVX2 with intrinsics, chosen by the flags this module is compiled
 * with; plain C otherwise).
 *
 * A map is 256 ascending float32 values (bitsandbytes' dynamic maps: fastoptim/formats.py
 * is the specification). A value v's code is the index of the nearest map value, exact
 * distances, ties to the smaller: the number of thresholds thr[j] (j < 255) below v,
 * where thr[j] is the largest float32 not above the exact midpoint of map[j] and
 * map[j + 1] (for a float32 v, v > midpoint exactly when v > thr[j]).
 *
 * Counting 255 thresholds is a binary search; a table makes it one load and integer
 * arithmetic. The float32 values of [-1, 1] are cut into cells by sign, exponent and the
 * top FO_Q8_CELL_BITS bits of the mantissa (plus, per sign, one cell for |v| < 2^-24 and
 * one for |v| = 1), each narrow enough to hold at most one threshold (fo_q8_init checks
 * it). All values of a regular cell share their upper 16 bits, so a threshold in the
 * cell is told from v by the lower 16 alone. A cell's entry holds the number of
 * thresholds below its values (upper 16 bits) and the lower 16 bits of the threshold in
 * it (0xFFFF if none; for negative cells both sides are flipped, x -> 0xFFFF - x, so
 * that "v above the threshold" is always "v's lower bits above the entry's"):
 *     code = (entry >> 16) + ((entry & 0xFFFF) < (lower 16 bits of v, flipped if v < 0))
 * one gather per vector and a few integer operations. fo_q8_selfcheck compares the
 * result with the threshold count for every float32 in [-1, 1].
 *
 * Decoding looks map[code] up: a gather per vector, or, where the CPU has AVX512-VBMI
 * (fo_q8_vbmi), byte permutes: the map's 256 values as four byte planes of four
 * registers each, two two-register permutes and a blend per plane give one byte of 64
 * values, and two rounds of unpacks put the bytes together. No loads but the codes.
 */
#ifndef FO_Q8_H
#define FO_Q8_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define FO_Q8_CELL_BITS 7                          /* cells per binade: 128 */
#define FO_Q8_MIN_EXP (127 - 24)                   /* |v| < 2^-24: the first cell */
#define FO_Q8_HALF (((127 - FO_Q8_MIN_EXP) << FO_Q8_CELL_BITS) + 2)   /* cells a sign */

typedef struct {
    float map[256];         /* ascending */
    uint8_t plane[4][256];  /* byte k (little-endian) of each map value's bits */
    float thr[256];         /* thr[j], j < 255: see above; thr[255] = +inf */
    uint32_t cell[2 * FO_Q8_HALF];      /* [0, HALF): v >= 0; then v < 0 */
    uint8_t zero;           /* the code of 0 */
} fo_q8_map;

static fo_q8_map fo_q8_maps[2];     /* [0] unsigned, [1] signed */

static inline float fo_q8_bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The cell of v in [-1, 1], from its bits: the magnitude's cell index in [0, HALF),
 * plus HALF if the sign is set. */
static inline int32_t fo_q8_cell_of(uint32_t u) {
    int32_t m = (int32_t)((u & 0x7FFFFFFFu) >> (23 - FO_Q8_CELL_BITS))
                - ((FO_Q8_MIN_EXP << FO_Q8_CELL_BITS) - 1);
    m = m < 0 ? 0 : (m > FO_Q8_HALF - 1 ? FO_Q8_HALF - 1 : m);
    return m + (int32_t)(u >> 31) * FO_Q8_HALF;
}

/* Fill maps[w] from 256 ascending values (either map: the cells cover both signs, and
 * the unsigned map's codes of negative values come out 0). Returns 0, or -1 for values
 * not ascending or a cell holding two thresholds. */
static int fo_q8_init(int w, const float *values) {
    fo_q8_map *q = &fo_q8_maps[w];
    int j, i;
    memset(q, 0, sizeof *q);
    for (j = 0; j < 256; j++) {
        uint32_t bits;
        q->map[j] = values[j];
        memcpy(&bits, &values[j], sizeof bits);
        for (i = 0; i < 4; i++)
            q->plane[i][j] = (uint8_t)(bits >> (8 * i));
        if (values[j] == 0.0f)
            q->zero = (uint8_t)j;
        if (j > 0 && !(values[j] > values[j - 1]))
            return -1;
    }
    for (j = 0; j < 255; j++) {
        double mid = ((double)values[j] + (double)values[j + 1]) / 2.0;
        float t = (float)mid;
        if ((double)t > mid)
            t = nextafterf(t, -INFINITY);
        q->thr[j] = t;
    }
    q->thr[255] = INFINITY;
    for (i = 0; i < 2 * FO_Q8_HALF; i++) {
        /* the cell's magnitudes [lo, hi] by bits, then its values [vlo, vhi] */
        int32_t m = i % FO_Q8_HALF, neg = i >= FO_Q8_HALF, below = 0, inside = 0, k = 0;
        uint32_t lo, hi, t16;
        float vlo, vhi;
        if (m == 0) {
            lo = 0;
            hi = ((uint32_t)FO_Q8_MIN_EXP << 23) - 1u;
        } else if (m == FO_Q8_HALF - 1) {
            lo = hi = 0x3F800000u;
        } else {
            lo = (uint32_t)(m - 1 + (FO_Q8_MIN_EXP << FO_Q8_CELL_BITS)) << (23 - FO_Q8_CELL_BITS);
            hi = lo + (1u << (23 - FO_Q8_CELL_BITS)) - 1u;
        }
        vlo = neg ? -fo_q8_bits_to_f32(hi) : fo_q8_bits_to_f32(lo);
        vhi = neg ? -fo_q8_bits_to_f32(lo) : fo_q8_bits_to_f32(hi);
        for (j = 0; j < 255; j++) {
            below += q->thr[j] < vlo;
            if (vlo <= q->thr[j] && q->thr[j] <= vhi) {
                inside++;
                k = j;
            }
        }
        if (inside > 1 || (inside && (m == 0 || m == FO_Q8_HALF - 1)))
            return -1;
        if (inside) {
            uint32_t tb;
            memcpy(&tb, &q->thr[k], sizeof tb);
            t16 = tb & 0xFFFFu;
        } else {
            t16 = neg ? 0u : 0xFFFFu;
        }
        q->cell[i] = ((uint32_t)below << 16) | (neg ? 0xFFFFu - t16 : t16);
    }
    return 0;
}

/* --- one value (the tails of blocks, and the plain-C path) ------------------------- */

static inline uint8_t fo_q8_encode1(const fo_q8_map *q, float v) {
    uint32_t u, entry;
    memcpy(&u, &v, sizeof u);
    entry = q->cell[fo_q8_cell_of(u)];
    return (uint8_t)((entry >> 16) + ((entry & 0xFFFFu) < ((u ^ (0u - (u >> 31))) & 0xFFFFu)));
}

/* --- SIMD -------------------------------------------------------------------------- */

#if defined(__AVX512F__)
static inline __m512i fo_q8_codes16(const fo_q8_map *q, __m512 v) {
    const __m512i low = _mm512_set1_epi32(0xFFFF);
    __m512i u = _mm512_castps_si512(v), sign = _mm512_srai_epi32(u, 31);
    __m512i m = _mm512_sub_epi32(
        _mm512_srli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                          23 - FO_Q8_CELL_BITS),
        _mm512_set1_epi32((FO_Q8_MIN_EXP << FO_Q8_CELL_BITS) - 1));
    __m512i entry, vl, tl;
    m = _mm512_min_epi32(_mm512_max_epi32(m, _mm512_setzero_si512()),
                         _mm512_set1_epi32(FO_Q8_HALF - 1));
    m = _mm512_add_epi32(m, _mm512_and_si512(sign, _mm512_set1_epi32(FO_Q8_HALF)));
    entry = _mm512_i32gather_epi32(m, q->cell, 4);
    vl = _mm512_and_si512(_mm512_xor_si512(u, sign), low);
    tl = _mm512_and_si512(entry, low);
    return _mm512_add_epi32(_mm512_srli_epi32(entry, 16),
                            _mm512_srli_epi32(_mm512_sub_epi32(tl, vl), 31));
}
#elif defined(__AVX2__)
static inline __m256i fo_q8_codes8(const fo_q8_map *q, __m256 v) {
    const __m256i low = _mm256_set1_epi32(0xFFFF);
    __m256i u = _mm256_castps_si256(v), sign = _mm256_srai_epi32(u, 31);
    __m256i m = _mm256_sub_epi32(
        _mm256_srli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                          23 - FO_Q8_CELL_BITS),
        _mm256_set1_epi32((FO_Q8_MIN_EXP << FO_Q8_CELL_BITS) - 1));
    __m256i entry, vl, tl;
    m = _mm256_min_epi32(_mm256_max_epi32(m, _mm256_setzero_si256()),
                         _mm256_set1_epi32(FO_Q8_HALF - 1));
    m = _mm256_add_epi32(m, _mm256_and_si256(sign, _mm256_set1_epi32(FO_Q8_HALF)));
    entry = _mm256_i32gather_epi32((const int *)q->cell, m, 4);
    vl = _mm256_and_si256(_mm256_xor_si256(u, sign), low);
    tl = _mm256_and_si256(entry, low);
    return _mm256_add_epi32(_mm256_srli_epi32(entry, 16),
                            _mm256_srli_epi32(_mm256_sub_epi32(tl, vl), 31));
}
#endif

/* --- blocks -------------------------------------------------------------------------- */

/* Ask for [p, p + nbytes) in cache ahead of use (the next blocks of a step). */
static inline void fo_q8_prefetch(const void *p, int64_t nbytes) {
    const char *c = (const char *)p;
    int64_t i;
    for (i = 0; i < nbytes; i += 64)
        __builtin_prefetch(c + i, 1, 3);
}

/* fo_q8_vbmi: decode by byte permutes (fo_q8_decode_vbmi). Set by fo_q8_set_vbmi, only
 * in an AVX-512 build on a CPU with AVX512-VBMI. */
static int fo_q8_vbmi = 0;

static int fo_q8_set_vbmi(int on) {
#if defined(__AVX512F__) && defined(__GNUC__)
    __builtin_cpu_init();
    fo_q8_vbmi = on && __builtin_cpu_supports("avx512vbmi");
#else
    (void)on;
    fo_q8_vbmi = 0;
#endif
    return fo_q8_vbmi;
}

#if defined(__AVX512F__) && defined(__GNUC__)
/* out[i] = map[codes[i]] * scale for the first n - n % 64 values, by byte permutes;
 * returns how many. (Its own function, built for VBMI: called only where the CPU has
 * it, and never inlined into code that runs elsewhere.) */
__attribute__((target("avx512vbmi"), noinline))
static int64_t fo_q8_decode_vbmi(const fo_q8_map *q, const uint8_t *codes, float scale,
                                 float *out, int64_t n) {
    __m512i t[4][4], order, c, lo, hi, b[4], w0, w1, w2, w3;
    __m512 s = _mm512_set1_ps(scale);
    uint8_t ord[64];
    __mmask64 top;
    int64_t i = 0;
    int k, h, r, l;
    for (k = 0; k < 4; k++)
        for (h = 0; h < 4; h++)
            t[k][h] = _mm512_loadu_si512((const void *)(q->plane[k] + 64 * h));
    /* The unpacks leave value 16 r + 4 l + j (lane l, dword j of register r) where the
     * bytes of code 16 l + 4 r + j were: put each code there first. */
    for (l = 0; l < 4; l++)
        for (r = 0; r < 4; r++)
            for (k = 0; k < 4; k++)
                ord[16 * l + 4 * r + k] = (uint8_t)(16 * r + 4 * l + k);
    order = _mm512_loadu_si512((const void *)ord);
    for (; i + 64 <= n; i += 64) {
        c = _mm512_permutexvar_epi8(order, _mm512_loadu_si512((const void *)(codes + i)));
        top = _mm512_movepi8_mask(c);                    /* codes 128..255 */
        for (k = 0; k < 4; k++) {
            lo = _mm512_permutex2var_epi8(t[k][0], c, t[k][1]);
            hi = _mm512_permutex2var_epi8(t[k][2], c, t[k][3]);
            b[k] = _mm512_mask_mov_epi8(lo, top, hi);
        }
        w0 = _mm512_unpacklo_epi8(b[0], b[1]);
        w1 = _mm512_unpackhi_epi8(b[0], b[1]);
        w2 = _mm512_unpacklo_epi8(b[2], b[3]);
        w3 = _mm512_unpackhi_epi8(b[2], b[3]);
        _mm512_storeu_ps(out + i, _mm512_mul_ps(
            _mm512_castsi512_ps(_mm512_unpacklo_epi16(w0, w2)), s));
        _mm512_storeu_ps(out + i + 16, _mm512_mul_ps(
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(w0, w2)), s));
        _mm512_storeu_ps(out + i + 32, _mm512_mul_ps(
            _mm512_castsi512_ps(_mm512_unpacklo_epi16(w1, w3)), s));
        _mm512_storeu_ps(out + i + 48, _mm512_mul_ps(
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(w1, w3)), s));
    }
    return i;
}
#endif

/* out[i] = map[codes[i]] * scale */
static inline void fo_q8_decode(const fo_q8_map *q, const uint8_t *codes, float scale,
                                float *out, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 s = _mm512_set1_ps(scale);
#if defined(__GNUC__)
    if (fo_q8_vbmi)
        i = fo_q8_decode_vbmi(q, codes, scale, out, n);
#endif
    for (; i + 16 <= n; i += 16) {
        __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + i)));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_i32gather_ps(c, q->map, 4), s));
    }
#elif defined(__AVX2__)
    __m256 s = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) {
        __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + i)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_i32gather_ps(q->map, c, 4), s));
    }
#endif
    for (; i < n; i++)
        out[i] = q->map[codes[i]] * scale;
}

/* The largest |x[i]|; NaN if any is NaN. */
static inline float fo_q8_absmax(const float *x, int64_t n) {
    int64_t i = 0;
    float m = 0.0f;
    int nan = 0;
#if defined(__AVX512F__)
    __m512 vm = _mm512_setzero_ps();
    __mmask16 vn = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        vm = _mm512_max_ps(vm, _mm512_abs_ps(v));
        vn |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    m = _mm512_reduce_max_ps(vm);
    nan = vn != 0;
#elif defined(__AVX2__)
    __m256 vm = _mm256_setzero_ps(), vn = _mm256_setzero_ps();
    __m128 h;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        vm = _mm256_max_ps(vm, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v));
        vn = _mm256_or_ps(vn, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    h = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    m = _mm_cvtss_f32(h);
    nan = _mm256_movemask_ps(vn) != 0;
#endif
    for (; i < n; i++) {
        float a = fabsf(x[i]);
        nan |= a != a;
        m = a > m ? a : m;
    }
    return nan ? NAN : m;
}

/* codes[i] = the code of x[i] / scale (scale > 0 and finite: the block's absmax) */
static inline void fo_q8_encode(const fo_q8_map *q, const float *x, float scale,
                                uint8_t *codes, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 s = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16) {
        __m512i c = fo_q8_codes16(q, _mm512_div_ps(_mm512_loadu_ps(x + i), s));
        _mm_storeu_si128((__m128i *)(codes + i), _mm512_cvtepi32_epi8(c));
    }
#elif defined(__AVX2__)
    __m256 s = _mm256_set1_ps(scale);
    const __m256i low_bytes = _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (; i + 8 <= n; i += 8) {
        __m256i c = fo_q8_codes8(q, _mm256_div_ps(_mm256_loadu_ps(x + i), s));
        c = _mm256_shuffle_epi8(c, low_bytes);           /* 4 bytes at each lane's start */
        c = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
        _mm_storel_epi64((__m128i *)(codes + i), _mm256_castsi256_si128(c));
    }
#endif
    for (; i < n; i++)
        codes[i] = fo_q8_encode1(q, x[i] / scale);
}

/* --- the test of the encoder: every float32 in [-1, 1] ------------------------------- */

/* The number of thresholds below v, by binary search (the definition of the code). */
static inline int32_t fo_q8_count(const fo_q8_map *q, float v) {
    int32_t lo = 0, hi = 255;               /* the count is in [lo, hi] */
    while (lo < hi) {
        int32_t mid = (lo + hi) / 2;
        if (v > q->thr[mid])
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Encode every float32 of [-1, 1] (scale 1) and compare with the threshold count.
 * Returns the number that differ; *bad the bits of the first one found. */
static int64_t fo_q8_selfcheck(int w, uint32_t *bad) {
    const fo_q8_map *q = &fo_q8_maps[w];
    const int64_t top = 0x3F800000;         /* the bits of 1.0f */
    const int64_t chunk = 1 << 16;
    int64_t wrong = 0, c;
    *bad = 0;
    /* pieces of [-1, 0] and [0, 1] by bits: index i < top + 1 is the value of bits i,
     * and i > top its negative (bits (i - top) | sign) */
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 16) reduction(+ : wrong)
#endif
    for (c = 0; c < (2 * top + 2 + chunk - 1) / chunk; c++) {
        float x[256];
        uint8_t codes[256];
        int64_t i0 = c * chunk, i1 = i0 + chunk < 2 * top + 2 ? i0 + chunk : 2 * top + 2;
        int64_t i, k, n;
        int32_t cnt = 0;
        for (i = i0; i < i1; i += 256) {
            n = i1 - i < 256 ? i1 - i : 256;
            for (k = 0; k < n; k++) {
                int64_t b = i + k;
                x[k] = fo_q8_bits_to_f32(b <= top ? (uint32_t)b
                                         : (uint32_t)(b - top - 1) | 0x80000000u);
            }
            fo_q8_encode(q, x, 1.0f, codes, n);
            for (k = 0; k < n; k++) {
                /* the count, moved from the last value's (values run monotone) */
                if (k == 0)
                    cnt = fo_q8_count(q, x[0]);
                while (x[k] > q->thr[cnt])
                    cnt++;
                while (cnt > 0 && !(x[k] > q->thr[cnt - 1]))
                    cnt--;
                if ((int32_t)codes[k] != cnt) {
                    uint32_t u;
                    memcpy(&u, &x[k], sizeof u);
#ifdef _OPENMP
#pragma omp critical(fo_q8_selfcheck_bad)
#endif
                    if (*bad == 0)
                        *bad = u;
                    wrong++;
                }
            }
        }
    }
    return wrong;
}

#endif
