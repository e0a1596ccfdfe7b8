/* Block formats, activation conversion and dot products of emo's CPU kernels (cpu_kernels.c).
 * Each dot product follows the summation order of llama.cpp's CPU kernel for that weight type
 * (see "dot products" below), so the two agree to the bit where their inputs do.
 * Shape legend: k in-features, n out-features (rows), nt activation rows handled together.
 */
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { TY_F32 = 0, TY_F16 = 1, TY_Q4_0 = 2, TY_Q5_0 = 6, TY_Q8_0 = 8, TY_Q4_K = 12, TY_Q5_K = 13, TY_Q6_K = 14,
       TY_Q8_K = 15, TY_BF16 = 30, TY_COUNT = 31 }; /* GGML type ids */
#define TY_Q4_0_R (TY_Q4_0 | 0x100) /* Q4_0 summed like llama.cpp's 8-row repacked kernels */
#define TY_2D 0x200 /* flag: llama.cpp runs this matrix as a plain 2-D mul_mat (see dot products) */
#define BASE(t) ((t) & ~TY_2D)

typedef struct { uint16_t d; int8_t qs[32]; } bq8;  /* 34 bytes: value i = d * qs[i] */
typedef struct { uint16_t d; uint8_t qs[16]; } bq4; /* 18 bytes: value i = d * (nibble_i - 8), low nibbles = 0..15 */

static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
static inline uint16_t f2h(float f) { return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 int32 lanes, lane l = sum of a[i] * b[i] over bytes 4l..4l+3 (a unsigned, b signed). With
 * AVX-512 VNNI (chosen at run time: cpu.py builds that variant only for a CPU that has it) this is
 * one vpdpbusd; otherwise maddubs then madd. Both give the same integers: no int16 pair sum here
 * can saturate (every a is <= 127 and no pair of products reaches 32767), so the variants agree
 * to the bit, and with llama.cpp, which makes the same choice. */
static inline __m256i udot4(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

/* 8 int32 partial sums of 32 int8 products, as floats (|a| <= 127: the sign trick is exact) */
static inline __m256 i8dot(__m256i a, __m256i b) {
    return _mm256_cvtepi32_ps(udot4(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a)));
}

static inline __m256i nibbles(const uint8_t *qs) { /* 16 bytes -> 32 uint8 in [0, 15], element order */
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}

static inline __m256i unpack_q4(const uint8_t *qs) { /* 16 bytes -> 32 int8 in [-8, 7] */
    return _mm256_sub_epi8(nibbles(qs), _mm256_set1_epi8(8));
}

size_t emo_row_bytes(int type, int64_t k) {
    switch (BASE(type)) {
    case TY_F32: return 4 * (size_t)k;
    case TY_F16: return 2 * (size_t)k;
    case TY_Q8_0: return (size_t)(k / 32) * sizeof(bq8);
    case TY_Q4_0:
    case TY_Q4_0_R: return (size_t)(k / 32) * sizeof(bq4);
    case TY_BF16: return 2 * (size_t)k;
    /* block sizes of cpu_kquants.h (checked there with static asserts) */
    case TY_Q5_0: return (size_t)(k / 32) * 22;
    case TY_Q4_K:
    case TY_Q4_K | 0x100: return (size_t)(k / 256) * 144; /* TY_Q4_K_R (cpu_q4k_rows8.h) */
    case TY_Q5_K: return (size_t)(k / 256) * 176;
    case TY_Q6_K: return (size_t)(k / 256) * 210;
    case TY_Q8_K: return (size_t)(k / 256) * 292;
    default: return 0;
    }
}

/* the type the activation is converted to for a weight type (llama.cpp's vec_dot_type) */
static int act_type(int wtype) {
    const int b = wtype & 0xFF;
    switch (b) {
    case TY_Q8_0: case TY_Q4_0: case TY_Q5_0: return TY_Q8_0;
    case TY_Q4_K: case TY_Q5_K: case TY_Q6_K: return TY_Q8_K;
    default: return b;
    }
}

/* ---- activation conversion ------------------------------------------------------------------- */
static void quantize_row_q8(const float *x, bq8 *y, int64_t k) {
    for (int64_t b = 0; b < k / 32; b++, x += 32) {
        __m256 v[4], mx = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(x + 8 * j);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        y[b].d = f2h(amax / 127.f);
        const __m256 id = _mm256_set1_ps(amax != 0.f ? 127.f / amax : 0.f);
        __m256i q[4];
        for (int j = 0; j < 4; j++)
            q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        /* pack 4x8 int32 -> 32 int8 in element order (packs interleave 128-bit lanes: fix with a permute) */
        __m256i p16a = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
        __m256i p8 = _mm256_packs_epi16(p16a, p16b);
        p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)y[b].qs, p8);
    }
}

static void quantize_row_q8k(const float *x, void *y, int64_t k);
static inline uint16_t f2bf(float f);

static void convert_row(const float *x, void *out, int atype, int64_t k) {
    if (atype == TY_Q8_K) {
        quantize_row_q8k(x, out, k);
    } else if (atype == TY_BF16) {
        for (int64_t i = 0; i < k; i++) ((uint16_t *)out)[i] = f2bf(x[i]);
    } else if (atype == TY_Q8_0) {
        quantize_row_q8(x, (bq8 *)out, k);
    } else if (atype == TY_F16) {
        uint16_t *h = (uint16_t *)out;
        int64_t i = 0;
        for (; i + 8 <= k; i += 8)
            _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < k; i++) h[i] = f2h(x[i]);
    } else {
        memcpy(out, x, 4 * (size_t)k);
    }
}

/* ---- dot products ------------------------------------------------------------------------------
 * Each follows the summation order of the llama.cpp CPU kernel for that type, so results agree to
 * the bit where the inputs do (an fp32 ulp can otherwise flip the next activation quantization):
 *   Q8_0, Q4_0   per block an exact int32 sum in 8 lanes, times d_w*d_x, into one 8-lane fp32
 *                accumulator (FMA), horizontal sum at the end
 *   Q4_0 "R"     matrices whose row count is a multiple of 8, which llama.cpp repacks 8 rows at a
 *                time: per row, acc = fma(float(block int sum), d_w*d_x, acc) block after block
 *   Q4_K "R"     Q4_K matrices of 8-row multiples, repacked likewise: cpu_q4k_rows8.h (its gemv
 *                and gemm orders differ, so a 2-D matmul's token count matters there)
 *   F32, F16     four 8-lane FMA accumulators over 32-value steps, reduced (0+2, 1+3), (0+1), then
 *                128-bit halves and two horizontal adds; the tail (k % 32) added one by one; but a
 *                plain 2-D matmul of >= 2 tokens with rows % 4 == 0 and k % 8 == 0 goes through
 *                llama.cpp's tiled sgemm: one 8-lane accumulator, then the 8-lane horizontal sum
 * One weight row is dotted with up to MAXT activation rows, so it is read once per token group. */
#define MAXT 8 /* measured: 8 tokens per weight pass is 10-16% faster than 4 on K-quants, neutral elsewhere */
#define Q8_PF_ROWS 4 /* software prefetch distance of the Q8_0 row stream (measured 2.8 -> 2.3 ns/block) */

static void dot_q8(const bq8 *w, const bq8 *const *x, int nt, int64_t nb, float *out) {
    __m256 acc[MAXT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        if ((b & 1) == 0) _mm_prefetch((const char *)&w[b + Q8_PF_ROWS * nb], _MM_HINT_T0);
        const __m256i qw = _mm256_loadu_si256((const __m256i *)w[b].qs);
        const float dw = h2f(w[b].d);
        for (int t = 0; t < nt; t++) {
            const __m256 d = _mm256_set1_ps(dw * h2f(x[t][b].d));
            acc[t] = _mm256_fmadd_ps(d, i8dot(qw, _mm256_loadu_si256((const __m256i *)x[t][b].qs)), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = hsum8(acc[t]);
}

/* dot_q8 for one activation row, inlined into the decode loop (short rows pay per-call overhead) */
static inline float dot_q8_1(const bq8 *w, const bq8 *x, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        if ((b & 1) == 0) _mm_prefetch((const char *)&w[b + Q8_PF_ROWS * nb], _MM_HINT_T0);
        const __m256 d = _mm256_set1_ps(h2f(w[b].d) * h2f(x[b].d));
        acc = _mm256_fmadd_ps(d, i8dot(_mm256_loadu_si256((const __m256i *)w[b].qs),
                                       _mm256_loadu_si256((const __m256i *)x[b].qs)), acc);
    }
    return hsum8(acc);
}

/* dot_q8_1 for four consecutive rows (row stride nb blocks): four independent accumulator chains
 * instead of one (1.17-1.32x from cache), each row summed exactly as dot_q8_1 sums it. The next
 * four rows (when `pf`: inside the caller's range) are prefetched as one linear stream; four
 * row streams left to the hardware prefetcher ran 0.63x from DRAM. */
static inline void dot_q8_1x4(const bq8 *w, int64_t nb, const bq8 *x, float *out, int pf) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; b++) {
        if (pf) { /* 136 bytes of the next group per block step */
            const char *next = (const char *)(w + 4 * nb) + b * 4 * sizeof(bq8);
            _mm_prefetch(next, _MM_HINT_T0);
            _mm_prefetch(next + 64, _MM_HINT_T0);
            _mm_prefetch(next + 128, _MM_HINT_T0);
        }
        const __m256i qx = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const float dx = h2f(x[b].d);
        for (int r = 0; r < 4; r++) {
            const bq8 *wr = w + r * nb + b;
            const __m256 d = _mm256_set1_ps(h2f(wr->d) * dx);
            acc[r] = _mm256_fmadd_ps(d, i8dot(_mm256_loadu_si256((const __m256i *)wr->qs), qx), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = hsum8(acc[r]);
}

static void dot_q4(const bq4 *w, const bq8 *const *x, int nt, int64_t nb, float *out) {
    __m256 acc[MAXT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i qw = unpack_q4(w[b].qs);
        const float dw = h2f(w[b].d);
        for (int t = 0; t < nt; t++) {
            const __m256 d = _mm256_set1_ps(dw * h2f(x[t][b].d));
            acc[t] = _mm256_fmadd_ps(d, i8dot(qw, _mm256_loadu_si256((const __m256i *)x[t][b].qs)), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = hsum8(acc[t]);
}

static inline __m256i i8dot_i32(__m256i a, __m256i b) { /* 8 exact int32 partial sums */
    return udot4(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

static void dot_q4_seq(const bq4 *w, const bq8 *const *x, int nt, int64_t nb, float *out) {
    float acc[MAXT] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const __m256i qw = unpack_q4(w[b].qs);
        const float dw = h2f(w[b].d);
        for (int t = 0; t < nt; t++) {
            const __m256i s = i8dot_i32(qw, _mm256_loadu_si256((const __m256i *)x[t][b].qs));
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            h = _mm_hadd_epi32(h, h);
            h = _mm_hadd_epi32(h, h);
            acc[t] = fmaf((float)_mm_cvtsi128_si32(h), dw * h2f(x[t][b].d), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = acc[t];
}

/* F32/F16 dot products follow the vector width of llama.cpp's build for the same instruction set
 * (its AVX-512 build sums them in 16 lanes, its AVX2 build in 8): FP_LANES lanes per accumulator,
 * four accumulators over FP_STEP-value steps, reduced (0+2, 1+3), (0+1), then across lanes. */
#if defined(__AVX512F__)
#define FP_LANES 16
typedef __m512 fvec;
static inline fvec fv_zero(void) { return _mm512_setzero_ps(); }
static inline fvec fv_load(const float *p) { return _mm512_loadu_ps(p); }
static inline fvec fv_load_h(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline fvec fv_fma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
static inline fvec fv_add(fvec a, fvec b) { return _mm512_add_ps(a, b); }
static inline void fv_store(float *p, fvec v) { _mm512_storeu_ps(p, v); }
static inline fvec fv_set1(float v) { return _mm512_set1_ps(v); }
static inline float fv_sum(fvec v) { return _mm512_reduce_add_ps(v); }
static inline float fv_sum_sgemm(fvec v) { return _mm512_reduce_add_ps(v); }
#else
#define FP_LANES 8
typedef __m256 fvec;
static inline fvec fv_zero(void) { return _mm256_setzero_ps(); }
static inline fvec fv_load(const float *p) { return _mm256_loadu_ps(p); }
static inline fvec fv_load_h(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline fvec fv_fma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
static inline fvec fv_add(fvec a, fvec b) { return _mm256_add_ps(a, b); }
static inline void fv_store(float *p, fvec v) { _mm256_storeu_ps(p, v); }
static inline fvec fv_set1(float v) { return _mm256_set1_ps(v); }
static inline float fv_sum(fvec v) { /* 128-bit halves, then two horizontal adds */
    const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t1 = _mm_hadd_ps(t0, t0);
    return _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
}
static inline float fv_sum_sgemm(fvec v) { return hsum8(v); } /* the sgemm's own: halves, movehl, movehdup */
#endif
#define FP_STEP (4 * FP_LANES)

static inline float reduce4x8(__m256 *s) { /* the AVX2 build's reduction (BF16 keeps it on every build) */
    s[0] = _mm256_add_ps(s[0], s[2]);
    s[1] = _mm256_add_ps(s[1], s[3]);
    s[0] = _mm256_add_ps(s[0], s[1]);
    const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(s[0]), _mm256_extractf128_ps(s[0], 1));
    const __m128 t1 = _mm_hadd_ps(t0, t0);
    return _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
}

static inline float reduce4(fvec *s) { /* llama.cpp's F32 reduction of four accumulators */
    return fv_sum(fv_add(fv_add(s[0], s[2]), fv_add(s[1], s[3])));
}

static float dot_f32_one(const float *w, const float *x, int64_t k) {
    fvec s[4] = {fv_zero(), fv_zero(), fv_zero(), fv_zero()};
    const int64_t np = k & ~(int64_t)(FP_STEP - 1);
    for (int64_t i = 0; i < np; i += FP_STEP)
        for (int j = 0; j < 4; j++) s[j] = fv_fma(fv_load(w + i + FP_LANES * j), fv_load(x + i + FP_LANES * j), s[j]);
    float sum = reduce4(s);
    for (int64_t i = np; i < k; i++) sum += w[i] * x[i];
    return sum;
}

static float dot_f16_one(const uint16_t *w, const uint16_t *x, int64_t k) {
    fvec s[4] = {fv_zero(), fv_zero(), fv_zero(), fv_zero()};
    const int64_t np = k & ~(int64_t)(FP_STEP - 1);
    for (int64_t i = 0; i < np; i += FP_STEP)
        for (int j = 0; j < 4; j++)
            s[j] = fv_fma(fv_load_h(w + i + FP_LANES * j), fv_load_h(x + i + FP_LANES * j), s[j]);
    double sum = reduce4(s);  /* llama.cpp keeps this one in double for the tail */
    for (int64_t i = np; i < k; i++) sum += (double)(h2f(w[i]) * h2f(x[i]));
    return (float)sum;
}

/* llama.cpp's tiled sgemm (2-D matmuls of several tokens): one accumulator per (row, token) */
static float dot_f32_acc1(const float *w, const float *x, int64_t k) {
    fvec acc = fv_zero();
    for (int64_t i = 0; i < k; i += FP_LANES) acc = fv_fma(fv_load(w + i), fv_load(x + i), acc);
    return fv_sum_sgemm(acc);
}

static float dot_f16_acc1(const uint16_t *w, const uint16_t *x, int64_t k) {
    fvec acc = fv_zero();
    for (int64_t i = 0; i < k; i += FP_LANES) acc = fv_fma(fv_load_h(w + i), fv_load_h(x + i), acc);
    return fv_sum_sgemm(acc);
}

#include "cpu_kquants.h"
#include "cpu_tiles.h"     /* Q4_0 "R" 8 rows per pass, Q8_0 and Q6_K token tiles */
#include "cpu_q4k_rows8.h" /* Q4_K "R": llama.cpp's repacked gemv/gemm orders */
#include "cpu_q6k_panels.h" /* Q6_K against 16-token panels (AVX-512 VNNI) */
/* The summation order llama.cpp uses for a matrix of `rows` rows in an op of `ntok` tokens (an
 * expert: the tokens that chose it): its row-by-row vec_dot, its tiled sgemm for F32/F16 2-D
 * matmuls of several tokens (one accumulator), or its tiled K-quant kernel for 8 or more tokens
 * on matrices it did not repack (cpu_kquants.h). */
enum { ORDER_VEC_DOT, ORDER_SGEMM, ORDER_TILED };
static int llama_order(int wtype, int64_t rows, int64_t k, int64_t ntok) {
    const int base = BASE(wtype);
    if ((base == TY_Q4_K || base == TY_Q5_K || base == TY_Q6_K) && ntok >= 8) return ORDER_TILED;
    if ((base == TY_F32 || base == TY_F16) && (wtype & TY_2D) && ntok >= 2 && rows % 4 == 0 && k % FP_LANES == 0)
        return ORDER_SGEMM;
    return ORDER_VEC_DOT;
}

/* out[t] = <weight row, activation row t> for t < nt (nt <= MAXT), rows given in their own types,
 * summed in `order` (llama_order) */
static void dot_rows(int wtype, const void *w, const void *const *x, int nt, int64_t k, float *out, int order) {
    const int acc1 = order == ORDER_SGEMM, tiled = order == ORDER_TILED;
    switch (BASE(wtype)) {
    case TY_Q8_0: dot_q8((const bq8 *)w, (const bq8 *const *)x, nt, k / 32, out); break;
    case TY_Q4_0: dot_q4((const bq4 *)w, (const bq8 *const *)x, nt, k / 32, out); break;
    case TY_Q4_0_R: dot_q4_seq((const bq4 *)w, (const bq8 *const *)x, nt, k / 32, out); break;
    case TY_Q5_0: dot_q5_0((const bq5 *)w, (const bq8 *const *)x, nt, k / 32, out); break;
    case TY_Q4_K:
    case TY_Q4_K_R: dot_q4k((const bq4k *)w, (const bq8k *const *)x, nt, k / QK, out, tiled); break;
    case TY_Q5_K: dot_q5k((const bq5k *)w, (const bq8k *const *)x, nt, k / QK, out, tiled); break;
    case TY_Q6_K: dot_q6k((const bq6k *)w, (const bq8k *const *)x, nt, k / QK, out, tiled); break;
    case TY_BF16:
        for (int t = 0; t < nt; t++) out[t] = dot_bf16_one((const uint16_t *)w, (const uint16_t *)x[t], k);
        break;
    case TY_F16:
        for (int t = 0; t < nt; t++)
            out[t] = acc1 ? dot_f16_acc1((const uint16_t *)w, (const uint16_t *)x[t], k)
                          : dot_f16_one((const uint16_t *)w, (const uint16_t *)x[t], k);
        break;
    default:
        for (int t = 0; t < nt; t++)
            out[t] = acc1 ? dot_f32_acc1((const float *)w, (const float *)x[t], k)
                          : dot_f32_one((const float *)w, (const float *)x[t], k);
        break;
    }
}

/* Q4_K "R" rows [n0, n1) (multiples of 8) against activation rows xs[0..nx), which are rows i0.. of
 * an op of ntok tokens: a 2-D matmul sums its first ntok - ntok % 4 tokens in llama.cpp's gemm
 * order, everything else in its gemv order (cpu_q4k_rows8.h) */
static void gemv_q4k_r(int wtype, const uint8_t *w, int64_t k, int64_t n0, int64_t n1, const void *const *xs,
                       float *const *ys, int64_t nx, int64_t i0, int64_t ntok) {
    const size_t wb = emo_row_bytes(wtype, k);
    const int64_t ngemm = (wtype & TY_2D) ? ntok - ntok % 4 : 0;
    /* the kernel prefetches PF_GROUPS row groups ahead inside [n0, n1) (rows past it may be another
     * thread's): fetch the first ones here */
    const int64_t pf1 = n0 + 8 * PF_GROUPS < n1 ? n0 + 8 * PF_GROUPS : n1;
    for (size_t o = 0; o < wb * (size_t)(pf1 - n0); o += 64)
        _mm_prefetch((const char *)w + wb * (size_t)n0 + o, _MM_HINT_T0);
    for (int64_t t0 = 0; t0 < nx;) {
        int64_t nt = nx - t0 < MAXT ? nx - t0 : MAXT;
        const int pairs = i0 + t0 < ngemm;
        if (pairs && i0 + t0 + nt > ngemm) nt = ngemm - (i0 + t0); /* a group takes one order */
        float r[8 * MAXT];
        int64_t n = n0;
        for (; n + 8 <= n1; n += 8) {
            dot_q4k_rows8((const bq4k *)(w + wb * (size_t)n), k / QK, (const bq8k *const *)(xs + t0), (int)nt, pairs, r,
                          n + 8 * (PF_GROUPS + 1) <= n1);
            for (int t = 0; t < nt; t++) memcpy(ys[t0 + t] + n, r + 8 * t, 8 * sizeof(float));
        }
        for (; n < n1; n++) { /* never for a matrix QWeight marks "R"; kept so no row is skipped */
            dot_q4k((const bq4k *)(w + wb * (size_t)n), (const bq8k *const *)(xs + t0), (int)nt, k / QK, r, 0);
            for (int t = 0; t < nt; t++) ys[t0 + t][n] = r[t];
        }
        t0 += nt;
    }
}

/* ys[i][n] = <row n of w, xs[i]> for n in [n0, n1) and i < nx: one weight matrix against a list of
 * converted activation rows. Tokens go MAXT at a time so a weight row is read once per group.
 * rows/ntok: the matrix's row count and the tokens of the whole op (they pick llama.cpp's order);
 * i0: the op's index of xs[0]. */
static void gemv(int wtype, const uint8_t *w, int64_t k, int64_t n0, int64_t n1, const void *const *xs,
                 float *const *ys, int64_t nx, int64_t rows, int64_t ntok, int64_t i0) {
    if (BASE(wtype) == TY_Q4_K_R) {
        gemv_q4k_r(wtype, w, k, n0, n1, xs, ys, nx, i0, ntok);
        return;
    }
    const int order = llama_order(wtype, rows, k, ntok);
    const size_t wb = emo_row_bytes(wtype, k);
    if (nx == 1 && BASE(wtype) == TY_Q8_0) { /* decode */
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4)
            dot_q8_1x4((const bq8 *)(w + wb * (size_t)n), k / 32, xs[0], ys[0] + n, n + 8 <= n1);
        for (; n < n1; n++) ys[0][n] = dot_q8_1((const bq8 *)(w + wb * (size_t)n), xs[0], k / 32);
        return;
    }
    if (nx == 1 && BASE(wtype) == TY_Q6_K && order == ORDER_VEC_DOT) {
        for (int64_t n = n0; n < n1; n++) ys[0][n] = dot_q6k_1((const bq6k *)(w + wb * (size_t)n), xs[0], k / QK);
        return;
    }
    int64_t tp = 0; /* tokens done in panels; a remainder of up to MAXT is cheaper in q6kt_rows */
#if TILE_VNNI
    if (BASE(wtype) == TY_Q6_K && order == ORDER_TILED && nx >= PANEL) {
        tp = nx % PANEL > MAXT ? nx : nx - nx % PANEL;
        q6k_panel_rows((const bq6k *)w, k / QK, n0, n1, (const bq8k *const *)xs, tp, ys);
    }
#endif
    for (int64_t t0 = tp; t0 < nx; t0 += MAXT) {
        const int nt = (int)(nx - t0 < MAXT ? nx - t0 : MAXT);
        if (BASE(wtype) == TY_Q8_0) { /* several tokens: per-token work once per call (cpu_tiles.h) */
            q8t_rows((const bq8 *)w, k / 32, n0, n1, (const bq8 *const *)(xs + t0), nt, ys + t0);
            continue;
        }
#if TILE_VNNI
        if (BASE(wtype) == TY_Q6_K) { /* unpacked once per pass (AVX2: no gain, dot_q6k) */
            q6kt_rows((const bq6k *)w, k / QK, n0, n1, (const bq8k *const *)(xs + t0), nt, ys + t0,
                      order == ORDER_TILED);
            continue;
        }
#endif
        float r[8 * MAXT];
        int64_t n = n0;
        if (BASE(wtype) == TY_Q4_0_R) { /* eight rows at a time, lanes = rows */
            q4r8_rows((const bq4 *)w, k / 32, n0, n1, (const bq8 *const *)(xs + t0), nt, ys + t0);
            n = n0 + (n1 - n0) / 8 * 8;
        }
        for (; n < n1; n++) {
            dot_rows(wtype, w + wb * (size_t)n, xs + t0, nt, k, r, order);
            for (int t = 0; t < nt; t++) ys[t0 + t][n] = r[t];
        }
    }
}

