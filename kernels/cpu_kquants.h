/* K-quant (Q4_K, Q5_K, Q6_K), Q5_0 and BF16 weights for emo's CPU kernels, read in place.
 *
 * The K-quants pack 256 values in a super-block of 8 sub-blocks (16 for Q6_K), each with its own
 * small integer scale (and min); their activation type is Q8_K: 256 int8 values with an fp32
 * scale and the sums of each 16 values (`bsums`), which turn the mins into one small dot product.
 * Q5_0 multiplies Q8_0 activations; BF16 multiplies activations rounded to bf16. These are the
 * `vec_dot_type`s of llama.cpp's CPU backend, and the dot products keep the summation order of
 * its row-by-row AVX2 kernels (tests/test_kquants.py calls llama.cpp's own functions as the peer):
 *   Q4_K   per super-block, the scaled int8 products of all 8 sub-blocks summed exactly in 8 int32
 *          lanes, then acc8 = fma(d_x*d_w, lanes, acc8); the mins term -d_x*dmin*sum(m*bsum) in a
 *          4-lane accumulator; result hsum(acc8) + hsum(acc4)
 *   Q5_K   the same with the mins term accumulated as one fp32 scalar (fma)
 *   Q6_K   scaled maddubs(q, x) of the unsigned 6-bit q in 8 int32 lanes, minus the -32 offset
 *          as 32 * scale * bsum (lane i of each 128-value half: its 16-value groups 2i, 2i+1),
 *          then acc8 = fma(d_x*d_w, lanes, acc8)
 *   Q5_0   as Q4_0 with the fifth bit: per block an exact int32 sum in 8 lanes, fma into acc8
 *   BF16   products of two bf16 values are exact in fp32; summed as F32 (four 8-lane accumulators)
 * llama.cpp (0.3.36 on) sends a K-quant matmul of 8 or more tokens that it has not repacked (and
 * each expert that 8 or more tokens chose) through its tiled kernel instead, which sums each
 * super-block exactly in integers: res = float(sum_j sc_j * q_j.x_j) * d_w [- d_min *
 * float(sum_j m_j * bsum_j), one fma], then acc = fma(res, d_x, acc), super-block after
 * super-block (its AVX-512 build writes a multiply and an add, which the compiler fuses). The
 * `tiled` flag of the dot products below takes that order (same integers, other fp32 steps).
 * Shape legend: k in-features (a multiple of 256 for K-quants, 32 for Q5_0), nt activation rows.
 * Included by cpu_dot.h, whose helpers (h2f, hsum8, i8dot, reduce4x8, MAXT) it uses.
 */
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define QK 256 /* values per K-quant super-block */
typedef struct { float d; int8_t qs[QK]; int16_t bsums[QK / 16]; } bq8k;                  /* 292 bytes */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[QK / 2]; } bq4k;         /* 144 bytes */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[QK / 8]; uint8_t qs[QK / 2]; } bq5k; /* 176 */
typedef struct { uint8_t ql[QK / 2]; uint8_t qh[QK / 4]; int8_t scales[QK / 16]; uint16_t d; } bq6k; /* 210 */
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } bq5;                         /* 22 bytes */
_Static_assert(sizeof(bq8k) == 292 && sizeof(bq4k) == 144 && sizeof(bq5k) == 176 && sizeof(bq6k) == 210
               && sizeof(bq5) == 22, "GGUF block sizes (emo_row_bytes)");

/* ---- activation conversion --------------------------------------------------------------------- */
/* round-half-even of v for |v| < 2^22 (adding 1.5 * 2^23 leaves the integer in the low mantissa) */
static inline int round_even(float v) {
    float t = v + 12582912.f;
    int32_t i;
    memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}

/* Q8_K: per 256 values, `max` = the value of largest magnitude (first one on ties); scale
 * iscale = -127/max, q = min(127, round_even(iscale * x)), d = 1/iscale; bsums of each 16 q. */
static void quantize_row_q8k(const float *x, void *out, int64_t k) {
    bq8k *y = out;
    for (int64_t b = 0; b < k / QK; b++, x += QK) {
        float amax = 0.f, max = 0.f;
        for (int j = 0; j < QK; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        if (amax == 0.f) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK; j++) {
            const int v = round_even(iscale * x[j]);
            y[b].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < QK / 16; g++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += y[b].qs[16 * g + j];
            y[b].bsums[g] = (int16_t)s;
        }
        y[b].d = 1.f / iscale;
    }
}

static inline uint16_t f2bf(float f) { /* round to nearest even; NaN stays a (quiet) NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + (0x7fff + ((u >> 16) & 1))) >> 16);
}

static inline float bf2f(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline __m256 bf16x8(const uint16_t *p) { /* 8 bf16 -> 8 fp32 (exact) */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* ---- scales -------------------------------------------------------------------------------------- */
/* the 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block (12 packed bytes) */
static inline void kscales(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

/* sum over sub-blocks of min * (sum of its 32 activation values), as 4 int32 lanes: lane i holds
 * sub-blocks 2i and 2i+1 */
static inline __m128i kmins(const uint8_t *mn, const int16_t *bsums) {
    const __m128i m16 = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)mn));
    const __m128i s = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bsums), _mm_loadu_si128((const __m128i *)(bsums + 8)));
    return _mm_madd_epi16(m16, s);
}

static inline float hsum4(__m128 v) {
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}

static inline int hsum_i4(__m128i v) {
    v = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(v);
}

/* ---- dot products: one weight row against nt activation rows (nt <= MAXT) ------------------------ */
/* lane r = sum of the 8 lanes of p[r] (exact integer adds) */
static inline __m256i transpose_sum8(const __m256i *p) {
    const __m256i a0 = _mm256_hadd_epi32(p[0], p[1]), a1 = _mm256_hadd_epi32(p[2], p[3]);
    const __m256i a2 = _mm256_hadd_epi32(p[4], p[5]), a3 = _mm256_hadd_epi32(p[6], p[7]);
    const __m256i b0 = _mm256_hadd_epi32(a0, a1), b1 = _mm256_hadd_epi32(a2, a3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
}

static inline int hsum_i8(__m256i v) {
    return hsum_i4(_mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}

/* one super-block's exact result res into llama.cpp's tiled accumulator (see the header) */
static inline float tiled_add(float acc, float res, float dx) { return fmaf(res, dx, acc); }

/* 8 int32 lanes of sc * (u8 q . i8 x) over 32 values: maddubs pairs, then madd with the scale */
static inline __m256i scaled_dot(__m256i q, const int8_t *x, int16_t sc) {
    return _mm256_madd_epi16(_mm256_set1_epi16(sc), _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)x)));
}

static void dot_q4k(const bq4k *w, const bq8k *const *x, int nt, int64_t nb, float *out, int tiled) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc[MAXT];
    __m128 accm[MAXT];
    float tacc[MAXT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps(), accm[t] = _mm_setzero_ps(), tacc[t] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        uint8_t sc[8], mn[8];
        kscales(w[b].scales, sc, mn);
        __m256i q[8]; /* sub-block values, unsigned [0, 15] */
        for (int j = 0; j < 4; j++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i *)(w[b].qs + 32 * j));
            q[2 * j] = _mm256_and_si256(bits, low);
            q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low);
        }
        const float dw = h2f(w[b].d), mw = h2f(w[b].dmin);
        for (int t = 0; t < nt; t++) {
            const bq8k *y = &x[t][b];
            const __m128i m = kmins(mn, y->bsums);
            __m256i s = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++)
                s = _mm256_add_epi32(s, _mm256_add_epi32(scaled_dot(q[2 * j], y->qs + 64 * j, sc[2 * j]),
                                                         scaled_dot(q[2 * j + 1], y->qs + 64 * j + 32, sc[2 * j + 1])));
            if (tiled) {
                tacc[t] = tiled_add(tacc[t], fmaf(-mw, (float)hsum_i4(m), (float)hsum_i8(s) * dw), y->d);
                continue;
            }
            accm[t] = _mm_fmadd_ps(_mm_set1_ps(-y->d * mw), _mm_cvtepi32_ps(m), accm[t]);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(y->d * dw), _mm256_cvtepi32_ps(s), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = tiled ? tacc[t] : hsum8(acc[t]) + hsum4(accm[t]);
}

static void dot_q5k(const bq5k *w, const bq8k *const *x, int nt, int64_t nb, float *out, int tiled) {
    const __m256i low = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    __m256 acc[MAXT];
    float summ[MAXT] = {0}, tacc[MAXT] = {0};
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        uint8_t sc[8], mn[8];
        kscales(w[b].scales, sc, mn);
        const __m256i hb = _mm256_loadu_si256((const __m256i *)w[b].qh);
        __m256i q[8]; /* sub-block values, unsigned [0, 31]: bit 2j / 2j+1 of qh is the fifth bit */
        for (int j = 0; j < 4; j++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i *)(w[b].qs + 32 * j));
            const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * j), one);
            const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * j + 1), one);
            q[2 * j] = _mm256_or_si256(_mm256_and_si256(bits, low), _mm256_slli_epi16(h0, 4));
            q[2 * j + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 4), low), _mm256_slli_epi16(h1, 4));
        }
        const float dw = h2f(w[b].d), mw = h2f(w[b].dmin);
        for (int t = 0; t < nt; t++) {
            const bq8k *y = &x[t][b];
            const int m = hsum_i4(kmins(mn, y->bsums));
            __m256i s = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++)
                s = _mm256_add_epi32(s, _mm256_add_epi32(scaled_dot(q[2 * j], y->qs + 64 * j, sc[2 * j]),
                                                         scaled_dot(q[2 * j + 1], y->qs + 64 * j + 32, sc[2 * j + 1])));
            if (tiled) {
                tacc[t] = tiled_add(tacc[t], fmaf(-mw, (float)m, (float)hsum_i8(s) * dw), y->d);
                continue;
            }
            /* llama.cpp's compiler contracts this multiply-add into one fma */
            summ[t] = fmaf(-y->d * mw, (float)m, summ[t]);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(y->d * dw), _mm256_cvtepi32_ps(s), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = tiled ? tacc[t] : hsum8(acc[t]) + summ[t];
}

static void dot_q6k(const bq6k *w, const bq8k *const *x, int nt, int64_t nb, float *out, int tiled) {
    const __m256i low = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
    __m256 acc[MAXT];
    float tacc[MAXT] = {0};
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i q[8], scl[8]; /* 32-value chunks, unsigned [0, 63]; their two 16-value scales */
        for (int h = 0; h < 2; h++) { /* two halves of 128 values: 64 ql bytes, 32 qh bytes */
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(w[b].ql + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(w[b].ql + 64 * h + 32));
            const __m256i hi = _mm256_loadu_si256((const __m256i *)(w[b].qh + 32 * h));
            const __m256i lo4[4] = {_mm256_and_si256(l0, low), _mm256_and_si256(l1, low),
                                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), low)};
            for (int c = 0; c < 4; c++) {
                const __m256i h2 = _mm256_and_si256(_mm256_srli_epi16(hi, 2 * c), three);
                q[4 * h + c] = _mm256_or_si256(lo4[c], _mm256_slli_epi16(h2, 4));
                const int s0 = w[b].scales[8 * h + 2 * c], s1 = w[b].scales[8 * h + 2 * c + 1];
                scl[4 * h + c] = _mm256_setr_epi16(s0, s0, s0, s0, s0, s0, s0, s0, s1, s1, s1, s1, s1, s1, s1, s1);
            }
        }
        const float dw = h2f(w[b].d);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[b].scales));
        for (int t = 0; t < nt; t++) {
            const bq8k *y = &x[t][b];
            /* the -32 offset from bsums: lane i (< 4) of each half = groups 2i, 2i+1 (of 8) times 32 */
            const __m256i off = _mm256_slli_epi32(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)y->bsums), sc16), 5);
            __m256i s = _mm256_setzero_si256();
            for (int c = 0; c < 8; c += 2) {
                __m256i p[2];
                for (int i = 0; i < 2; i++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(y->qs + 32 * (c + i)));
                    p[i] = _mm256_madd_epi16(scl[c + i], _mm256_maddubs_epi16(q[c + i], xv));
                }
                s = _mm256_add_epi32(s, _mm256_add_epi32(p[0], p[1]));
            }
            s = _mm256_sub_epi32(s, off);
            if (tiled) {
                tacc[t] = tiled_add(tacc[t], (float)hsum_i8(s) * dw, y->d);
                continue;
            }
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(y->d * dw), _mm256_cvtepi32_ps(s), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = tiled ? tacc[t] : hsum8(acc[t]);
}

/* dot_q6k for one activation row (decode), accumulator in a register and each 32-value chunk
 * consumed as soon as it is unpacked. The two 16-value scales of a chunk come from one byte
 * shuffle of the half's eight scales (int16, in both 128-bit lanes) instead of a 16-element set.
 * Same integers, so the same bits as dot_q6k. */
static inline float dot_q6k_1(const bq6k *w, const bq8k *x, int64_t nb) {
    const __m256i low = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
    /* chunk c takes int16 scale 2c (low lane) and 2c + 1 (high lane) */
    const __m256i pick[4] = {
        _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3),
        _mm256_setr_epi8(4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7),
        _mm256_setr_epi8(8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 8, 9, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11,
                         10, 11, 10, 11),
        _mm256_setr_epi8(12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 14, 15, 14, 15, 14, 15, 14, 15,
                         14, 15, 14, 15, 14, 15, 14, 15)};
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const bq6k *wb = &w[b];
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb->scales));
        const __m256i off = _mm256_slli_epi32(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)x[b].bsums), sc16), 5);
        __m256i s = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(wb->ql + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(wb->ql + 64 * h + 32));
            const __m256i hi = _mm256_loadu_si256((const __m256i *)(wb->qh + 32 * h));
            const __m256i sch = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(wb->scales + 8 * h))));
            const __m256i lo4[4] = {_mm256_and_si256(l0, low), _mm256_and_si256(l1, low),
                                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), low)};
            for (int c = 0; c < 4; c++) {
                const __m256i h2 = _mm256_and_si256(_mm256_srli_epi16(hi, 2 * c), three);
                const __m256i q = _mm256_or_si256(lo4[c], _mm256_slli_epi16(h2, 4));
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x[b].qs + 128 * h + 32 * c));
                s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_shuffle_epi8(sch, pick[c]), _mm256_maddubs_epi16(q, xv)));
            }
        }
        s = _mm256_sub_epi32(s, off);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x[b].d * h2f(wb->d)), _mm256_cvtepi32_ps(s), acc);
    }
    return hsum8(acc);
}

/* 32 Q5_0 values as int8 in [-16, 15]: low nibbles are values 0..15, high ones 16..31; a clear
 * fifth bit means the value is nibble - 16 */
static inline __m256i unpack_q5(const bq5 *b) {
    const __m128i v = _mm_loadu_si128((const __m128i *)b->qs);
    const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
    uint32_t qh;
    memcpy(&qh, b->qh, 4);
    /* byte i gets bit i of qh: broadcast the byte holding it, test the bit */
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
                                              _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                                0x0101010101010101, 0x0000000000000000));
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ULL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    return _mm256_or_si256(nib, _mm256_andnot_si256(set, _mm256_set1_epi8((char)0xF0)));
}

static void dot_q5_0(const bq5 *w, const bq8 *const *x, int nt, int64_t nb, float *out) {
    __m256 acc[MAXT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i qw = unpack_q5(&w[b]);
        const float dw = h2f(w[b].d);
        for (int t = 0; t < nt; t++) {
            const __m256 d = _mm256_set1_ps(dw * h2f(x[t][b].d));
            acc[t] = _mm256_fmadd_ps(d, i8dot(qw, _mm256_loadu_si256((const __m256i *)x[t][b].qs)), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = hsum8(acc[t]);
}

static float dot_bf16_one(const uint16_t *w, const uint16_t *x, int64_t k) {
    __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const int64_t np = k & ~(int64_t)31;
    for (int64_t i = 0; i < np; i += 32)
        for (int j = 0; j < 4; j++) s[j] = _mm256_fmadd_ps(bf16x8(w + i + 8 * j), bf16x8(x + i + 8 * j), s[j]);
    float sum = reduce4x8(s);
    for (int64_t i = np; i < k; i++) sum += bf2f(w[i]) * bf2f(x[i]);
    return sum;
}

/* ---- dequantization (embedding rows) ---------------------------------------------------------- */
/* one Q4_K (qh NULL) or Q5_K super-block: value = d * scale * q - dmin * min per sub-block */
static void dequant_kblock(uint16_t dh, uint16_t dminh, const uint8_t *scales, const uint8_t *qs, const uint8_t *qh,
                           float *o) {
    uint8_t sc[8], mn[8];
    kscales(scales, sc, mn);
    const float d = h2f(dh), dm = h2f(dminh);
    for (int j = 0; j < 8; j++)
        for (int l = 0; l < 32; l++) {
            const uint8_t byte = qs[32 * (j / 2) + l];
            const int q = ((j & 1) ? byte >> 4 : byte & 0xF) | (qh ? ((qh[l] >> j) & 1) << 4 : 0);
            o[32 * j + l] = d * sc[j] * q - dm * mn[j];
        }
}

static void dequant_q4k(const bq4k *b, float *o, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) dequant_kblock(b[i].d, b[i].dmin, b[i].scales, b[i].qs, NULL, o + QK * i);
}

static void dequant_q5k(const bq5k *b, float *o, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) dequant_kblock(b[i].d, b[i].dmin, b[i].scales, b[i].qs, b[i].qh, o + QK * i);
}

static void dequant_q6k(const bq6k *b, float *o, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, o += QK) {
        const float d = h2f(b[i].d);
        for (int v = 0; v < QK; v++) {
            const int h = v / 128, c = (v % 128) / 32, l = v % 32; /* half, chunk, position */
            const uint8_t lb = b[i].ql[64 * h + 32 * (c & 1) + l];
            const int q = ((c < 2 ? lb & 0xF : lb >> 4) | (((b[i].qh[32 * h + l] >> (2 * c)) & 3) << 4)) - 32;
            o[v] = d * b[i].scales[8 * h + 2 * c + l / 16] * q;
        }
    }
}

static void dequant_q5_0(const bq5 *b, float *o, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, o += 32) {
        uint32_t qh;
        memcpy(&qh, b[i].qh, 4);
        for (int j = 0; j < 32; j++) {
            const uint8_t byte = b[i].qs[j % 16];
            o[j] = h2f(b[i].d) * (((j < 16 ? byte & 0xF : byte >> 4) | (int)(((qh >> j) & 1) << 4)) - 16);
        }
    }
}
