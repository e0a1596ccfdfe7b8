/* emo's CPU kernels: matmuls and the routed SwiGLU mixture computed straight from GGUF block bytes.
 *
 * Weights are never expanded: a weight row is read in its own type (F32, F16, Q8_0, Q4_0) and
 * dotted with the activation converted ONCE per call to the matching "activation type":
 *   F32 -> F32, F16 -> F16 (rounded to nearest even), Q8_0/Q4_0 -> Q8_0 blocks.
 * That is also how llama.cpp's CPU backend multiplies (its `vec_dot_type`), and doing the same
 * rounding is what makes emo's greedy decode agree with llama.cpp's on quantized files.
 * A Q8_0 activation block is 32 values x[i] ~ d*q[i]: amax = max|x|, d = amax/127 stored as fp16,
 * q = round_half_even(x * (127/amax)); a block dot is an exact int32 sum scaled by d_w*d_x in fp32.
 *
 * Shape legend: T tokens, K in-features (multiple of 32 for block types), N out-features,
 * E experts, S slots per token, F expert width, D hidden, P = T*S routed (token, slot) pairs.
 * Threads: OpenMP; inside torch's process this resolves to torch's own libgomp (same soname), so
 * torch and these kernels share one pool instead of fighting over the cores.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { TY_F32 = 0, TY_F16 = 1, TY_Q4_0 = 2, TY_Q8_0 = 8 }; /* GGML type ids */
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

/* 8 int32 partial sums of 32 int8 products, as floats; |a| <= 127 keeps maddubs from saturating. */
static inline __m256 i8dot(__m256i a, __m256i b) {
    __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

static inline __m256i unpack_q4(const uint8_t *qs) { /* 16 bytes -> 32 int8 in [-8, 7] */
    __m128i b = _mm_loadu_si128((const __m128i *)qs);
    __m128i m = _mm_set1_epi8(0x0F);
    __m256i v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
    return _mm256_sub_epi8(v, _mm256_set1_epi8(8));
}

size_t emo_row_bytes(int type, int64_t k) {
    switch (BASE(type)) {
    case TY_F32: return 4 * (size_t)k;
    case TY_F16: return 2 * (size_t)k;
    case TY_Q8_0: return (size_t)(k / 32) * sizeof(bq8);
    case TY_Q4_0:
    case TY_Q4_0_R: return (size_t)(k / 32) * sizeof(bq4);
    default: return 0;
    }
}

static int act_type(int wtype) {
    const int b = wtype & 0xFF;
    return (b == TY_Q8_0 || b == TY_Q4_0) ? TY_Q8_0 : b;
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

static void convert_row(const float *x, void *out, int atype, int64_t k) {
    if (atype == TY_Q8_0) {
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
 *   F32, F16     four 8-lane FMA accumulators over 32-value steps, reduced (0+2, 1+3), (0+1), then
 *                128-bit halves and two horizontal adds; the tail (k % 32) added one by one; but a
 *                plain 2-D matmul of >= 2 tokens with rows % 4 == 0 and k % 8 == 0 goes through
 *                llama.cpp's tiled sgemm: one 8-lane accumulator, then the 8-lane horizontal sum
 * One weight row is dotted with up to MAXT activation rows, so it is read once per token group. */
#define MAXT 4

static void dot_q8(const bq8 *w, const bq8 *const *x, int nt, int64_t nb, float *out) {
    __m256 acc[MAXT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i qw = _mm256_loadu_si256((const __m256i *)w[b].qs);
        const float dw = h2f(w[b].d);
        for (int t = 0; t < nt; t++) {
            const __m256 d = _mm256_set1_ps(dw * h2f(x[t][b].d));
            acc[t] = _mm256_fmadd_ps(d, i8dot(qw, _mm256_loadu_si256((const __m256i *)x[t][b].qs)), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = hsum8(acc[t]);
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
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

/* lane r = sum of the 8 lanes of p[r] (exact integer adds) */
static inline __m256i transpose_sum8(const __m256i *p) {
    const __m256i a0 = _mm256_hadd_epi32(p[0], p[1]), a1 = _mm256_hadd_epi32(p[2], p[3]);
    const __m256i a2 = _mm256_hadd_epi32(p[4], p[5]), a3 = _mm256_hadd_epi32(p[6], p[7]);
    const __m256i b0 = _mm256_hadd_epi32(a0, a1), b1 = _mm256_hadd_epi32(a2, a3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
}

/* 8 consecutive Q4_0 rows (row stride nb blocks) against nt activation rows: out[t*8 + r] */
static void dot_q4_rows8(const bq4 *w, int64_t nb, const bq8 *const *x, int nt, float *out) {
    __m256 acc[MAXT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i qw[8];
        float dw[8];
        for (int r = 0; r < 8; r++) {
            qw[r] = unpack_q4(w[r * nb + b].qs);
            dw[r] = h2f(w[r * nb + b].d);
        }
        const __m256 vdw = _mm256_loadu_ps(dw);
        for (int t = 0; t < nt; t++) {
            const __m256i qx = _mm256_loadu_si256((const __m256i *)x[t][b].qs);
            __m256i p[8];
            for (int r = 0; r < 8; r++) p[r] = i8dot_i32(qw[r], qx);
            const __m256 d = _mm256_mul_ps(vdw, _mm256_set1_ps(h2f(x[t][b].d)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(transpose_sum8(p)), d, acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) _mm256_storeu_ps(out + 8 * t, acc[t]);
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

static inline float reduce4x8(__m256 *s) { /* llama.cpp's F32x8 reduction of four accumulators */
    s[0] = _mm256_add_ps(s[0], s[2]);
    s[1] = _mm256_add_ps(s[1], s[3]);
    s[0] = _mm256_add_ps(s[0], s[1]);
    const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(s[0]), _mm256_extractf128_ps(s[0], 1));
    const __m128 t1 = _mm_hadd_ps(t0, t0);
    return _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
}

static float dot_f32_one(const float *w, const float *x, int64_t k) {
    __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const int64_t np = k & ~(int64_t)31;
    for (int64_t i = 0; i < np; i += 32)
        for (int j = 0; j < 4; j++)
            s[j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8 * j), _mm256_loadu_ps(x + i + 8 * j), s[j]);
    float sum = reduce4x8(s);
    for (int64_t i = np; i < k; i++) sum += w[i] * x[i];
    return sum;
}

static float dot_f16_one(const uint16_t *w, const uint16_t *x, int64_t k) {
    __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const int64_t np = k & ~(int64_t)31;
    for (int64_t i = 0; i < np; i += 32)
        for (int j = 0; j < 4; j++)
            s[j] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 8 * j))),
                                   _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i + 8 * j))), s[j]);
    double sum = reduce4x8(s);  /* llama.cpp keeps this one in double for the tail */
    for (int64_t i = np; i < k; i++) sum += (double)(h2f(w[i]) * h2f(x[i]));
    return (float)sum;
}

static float dot_f32_acc1(const float *w, const float *x, int64_t k) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc);
    return hsum8(acc);
}

static float dot_f16_acc1(const uint16_t *w, const uint16_t *x, int64_t k) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i))),
                              _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))), acc);
    return hsum8(acc);
}

/* Which F32/F16 order llama.cpp uses for a matrix of `rows` rows applied to `ntok` tokens. */
static int sgemm_order(int wtype, int64_t rows, int64_t k, int64_t ntok) {
    return (wtype & TY_2D) && ntok >= 2 && rows % 4 == 0 && k % 8 == 0;
}

/* out[t] = <weight row, activation row t> for t < nt (nt <= MAXT), rows given in their own types;
 * `acc1`: the single-accumulator F32/F16 order (sgemm_order) */
static void dot_rows(int wtype, const void *w, const void *const *x, int nt, int64_t k, float *out, int acc1) {
    switch (BASE(wtype)) {
    case TY_Q8_0: dot_q8((const bq8 *)w, (const bq8 *const *)x, nt, k / 32, out); break;
    case TY_Q4_0: dot_q4((const bq4 *)w, (const bq8 *const *)x, nt, k / 32, out); break;
    case TY_Q4_0_R: dot_q4_seq((const bq4 *)w, (const bq8 *const *)x, nt, k / 32, out); break;
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

/* ys[i][n] = <row n of w, xs[i]> for n in [n0, n1) and i < nx: one weight matrix against a list of
 * converted activation rows. Tokens go MAXT at a time so a weight row is read once per group.
 * rows/ntok: the matrix's row count and the tokens of the whole op (they pick llama.cpp's order). */
static void gemv(int wtype, const uint8_t *w, int64_t k, int64_t n0, int64_t n1, const void *const *xs,
                 float *const *ys, int64_t nx, int64_t rows, int64_t ntok) {
    const int acc1 = sgemm_order(wtype, rows, k, ntok);
    const size_t wb = emo_row_bytes(wtype, k);
    for (int64_t t0 = 0; t0 < nx; t0 += MAXT) {
        const int nt = (int)(nx - t0 < MAXT ? nx - t0 : MAXT);
        float r[8 * MAXT];
        int64_t n = n0;
        if (BASE(wtype) == TY_Q4_0_R) /* eight rows at a time, lanes = rows */
            for (; n + 8 <= n1; n += 8) {
                dot_q4_rows8((const bq4 *)(w + wb * (size_t)n), k / 32, (const bq8 *const *)(xs + t0), nt, r);
                for (int t = 0; t < nt; t++) memcpy(ys[t0 + t] + n, r + 8 * t, 8 * sizeof(float));
            }
        for (; n < n1; n++) {
            dot_rows(wtype, w + wb * (size_t)n, xs + t0, nt, k, r, acc1);
            for (int t = 0; t < nt; t++) ys[t0 + t][n] = r[t];
        }
    }
}

/* ---- public: dense matmuls --------------------------------------------------------------------- */
void emo_set_threads(int n) { omp_set_num_threads(n > 0 ? n : 1); }

/* m weight matrices w[j] [n[j], k] (all sharing the input) times x [T, k] -> y[j] [T, n[j]].
 * The activation is converted once per distinct activation type, then all rows of all matrices
 * are split into one work list (q/k/v share one parallel pass). */
void emo_matmul(int m, const void *const *w, const int *wtype, const int64_t *n, int64_t k, const float *x,
                int64_t T, float *const *y) {
    if (m > 16) return; /* the Python side never passes more */
    void *conv[16] = {0};
    size_t stride[16] = {0};
    for (int j = 0; j < m; j++) {
        const int a = act_type(wtype[j]);
        if (a != TY_F32 && !conv[a]) {
            stride[a] = emo_row_bytes(a, k);
            conv[a] = malloc(stride[a] * (size_t)T);
            for (int64_t t = 0; t < T; t++) convert_row(x + t * k, (uint8_t *)conv[a] + stride[a] * t, a, k);
        }
    }
    /* row pointers: activation t in each type, output row t of each matrix */
    const void **xs = malloc(sizeof(void *) * (size_t)T * 16);
    float **ys = malloc(sizeof(float *) * (size_t)T * (size_t)m);
    for (int a = 0; a < 16; a++)
        if (conv[a] || a == TY_F32)
            for (int64_t t = 0; t < T; t++)
                xs[a * T + t] = a == TY_F32 ? (const void *)(x + t * k) : (const uint8_t *)conv[a] + stride[a] * t;
    for (int j = 0; j < m; j++)
        for (int64_t t = 0; t < T; t++) ys[j * T + t] = y[j] + t * n[j];
    const int64_t chunk = 16;
    int64_t total = 0, starts[17];
    for (int j = 0; j < m; j++) { starts[j] = total; total += (n[j] + chunk - 1) / chunk; }
    starts[m] = total;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t c = 0; c < total; c++) {
        int j = 0;
        while (c >= starts[j + 1]) j++;
        const int64_t n0 = (c - starts[j]) * chunk, n1 = n0 + chunk < n[j] ? n0 + chunk : n[j];
        gemv(wtype[j] | TY_2D, (const uint8_t *)w[j], k, n0, n1, xs + act_type(wtype[j]) * T, ys + j * T, T, n[j], T);
    }
    free(xs);
    free(ys);
    for (int a = 0; a < 16; a++) free(conv[a]);
}

/* NORM-mode RoPE in place on x [T, H, hd] (pairs 2i, 2i+1) for token positions pos[T], with
 * llama.cpp's arithmetic: angle_i = pos * base^(-2/hd) ^ i accumulated in fp32, libm cosf/sinf,
 * and each output a single fused multiply-add of one rounded product. */
void emo_rope_norm(float *x, int64_t T, int64_t H, int64_t hd, const int64_t *pos, float base) {
    const float scale = powf(base, -2.0f / (float)hd);
    float *cs = malloc(sizeof(float) * (size_t)hd);
    for (int64_t t = 0; t < T; t++) {
        float theta = (float)pos[t];
        for (int64_t i = 0; i < hd / 2; i++) {
            cs[2 * i] = cosf(theta);
            cs[2 * i + 1] = sinf(theta);
            theta *= scale;
        }
        for (int64_t h = 0; h < H; h++) {
            float *v = x + (t * H + h) * hd;
            for (int64_t i = 0; i < hd; i += 2) {
                const float x0 = v[i], x1 = v[i + 1], c = cs[i], sn = cs[i + 1];
                v[i] = fmaf(x0, c, -(x1 * sn));
                v[i + 1] = fmaf(x0, sn, x1 * c);
            }
        }
    }
    free(cs);
}

/* Dequantize selected rows (embedding lookup): out [nrows, k]. */
void emo_get_rows(const void *w, int wtype, int64_t k, const int64_t *rows, int64_t nrows, float *out) {
    wtype = BASE(wtype);
    const size_t wb = emo_row_bytes(wtype, k);
    for (int64_t r = 0; r < nrows; r++) {
        const uint8_t *src = (const uint8_t *)w + wb * (size_t)rows[r];
        float *o = out + r * k;
        if (wtype == TY_F32) {
            memcpy(o, src, 4 * (size_t)k);
        } else if (wtype == TY_F16) {
            for (int64_t i = 0; i < k; i++) o[i] = h2f(((const uint16_t *)src)[i]);
        } else if (wtype == TY_Q8_0) {
            const bq8 *b = (const bq8 *)src;
            for (int64_t i = 0; i < k; i++) o[i] = h2f(b[i / 32].d) * b[i / 32].qs[i % 32];
        } else {
            const bq4 *b = (const bq4 *)src;
            for (int64_t i = 0; i < k; i++) {
                const int j = (int)(i % 32);
                const uint8_t byte = b[i / 32].qs[j % 16];
                o[i] = h2f(b[i / 32].d) * ((j < 16 ? (byte & 0x0F) : (byte >> 4)) - 8);
            }
        }
    }
}

/* ---- public: the routed SwiGLU mixture --------------------------------------------------------- */
static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* y [T, D] = sum_s weights[t, s] * down[e] (silu(gate[e] x_t) * up[e] x_t),  e = experts[t, s].
 * gate/up/down hold one pointer per expert (rows [F, D] / [D, F] in that expert's type), so the
 * routed experts can live in one stacked GGUF tensor and the shared expert in another.
 * Assignments are grouped by expert (counting sort): every weight row of an active expert is read
 * once per group of MAXT of its tokens. Slots are summed in slot order, like llama.cpp's graph.
 * norms [T, S] (optional) receives ||unweighted expert output|| per slot, for profiling. */
void emo_moe(const float *x, int64_t T, int64_t D, int64_t F, const int64_t *experts, const float *weights,
             int64_t S, int64_t E, const void *const *gate, const void *const *up, const void *const *down,
             const int *gtype, const int *utype, const int *dtype, float *y, float *norms) {
    const int64_t P = T * S;
    int64_t *count = calloc((size_t)E + 1, sizeof(int64_t)), *start = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *pos_tok = malloc(sizeof(int64_t) * (size_t)P), *slot_pos = malloc(sizeof(int64_t) * (size_t)P);
    for (int64_t p = 0; p < P; p++) count[experts[p]]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] = start[e] + count[e];
    memset(count, 0, sizeof(int64_t) * (size_t)E);
    for (int64_t p = 0; p < P; p++) { /* sorted position of assignment p = (t, s) */
        const int64_t e = experts[p], q = start[e] + count[e]++;
        pos_tok[q] = p / S;
        slot_pos[p] = q;
    }

    /* activation of x in each type the gate/up weights need, and row pointers by sorted position */
    void *conv[16] = {0};
    size_t cstride[16] = {0};
    const void **xq = calloc((size_t)P * 16, sizeof(void *));
    for (int64_t e = 0; e < E; e++) {
        if (!count[e]) continue;
        const int ats[2] = {act_type(gtype[e]), act_type(utype[e])};
        for (int i = 0; i < 2; i++) {
            const int a = ats[i];
            if (a == TY_F32 || conv[a]) continue;
            cstride[a] = emo_row_bytes(a, D);
            conv[a] = malloc(cstride[a] * (size_t)T);
        }
    }
    for (int a = 0; a < 16; a++)
        if (conv[a]) {
#pragma omp parallel for
            for (int64_t t = 0; t < T; t++) convert_row(x + t * D, (uint8_t *)conv[a] + cstride[a] * t, a, D);
        }
    for (int a = 0; a < 16; a++)
        if (conv[a] || a == TY_F32)
            for (int64_t q = 0; q < P; q++)
                xq[a * P + q] = a == TY_F32 ? (const void *)(x + pos_tok[q] * D)
                                            : (const uint8_t *)conv[a] + cstride[a] * pos_tok[q];

    /* work lists: (expert, row chunk) for gate/up over F, and for down over D */
    const int64_t chunk = 16, cf = (F + chunk - 1) / chunk, cd = (D + chunk - 1) / chunk;
    int64_t nact = 0, *act = malloc(sizeof(int64_t) * (size_t)E);
    for (int64_t e = 0; e < E; e++) if (count[e]) act[nact++] = e;
    float *g = malloc(sizeof(float) * (size_t)(P * F)), *u = malloc(sizeof(float) * (size_t)(P * F));
    float *out = malloc(sizeof(float) * (size_t)(P * D));
    const size_t hstride = emo_row_bytes(TY_F32, F); /* widest activation row of h */
    uint8_t *hc = malloc(hstride * (size_t)P);
    float **gp = malloc(sizeof(float *) * (size_t)P), **up_ = malloc(sizeof(float *) * (size_t)P);
    float **op = malloc(sizeof(float *) * (size_t)P);
    const void **hp = malloc(sizeof(void *) * (size_t)P);
    for (int64_t q = 0; q < P; q++) {
        gp[q] = g + q * F;
        up_[q] = u + q * F;
        op[q] = out + q * D;
        hp[q] = hc + hstride * q;
    }

#pragma omp parallel
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nact * cf; c++) {
            const int64_t e = act[c / cf], n0 = (c % cf) * chunk, n1 = n0 + chunk < F ? n0 + chunk : F;
            const int64_t q0 = start[e];
            gemv(gtype[e], (const uint8_t *)gate[e], D, n0, n1, xq + act_type(gtype[e]) * P + q0, gp + q0, count[e], F, T);
            gemv(utype[e], (const uint8_t *)up[e], D, n0, n1, xq + act_type(utype[e]) * P + q0, up_ + q0, count[e], F, T);
        }
        /* h = silu(g) * u, converted to the down weights' activation type, one row per position */
#pragma omp for
        for (int64_t q = 0; q < P; q++) {
            float *gq = g + q * F;
            const float *uq = u + q * F;
            for (int64_t f = 0; f < F; f++) gq[f] = silu(gq[f]) * uq[f];
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < nact; i++) {
            const int64_t e = act[i];
            for (int64_t q = start[e]; q < start[e] + count[e]; q++)
                convert_row(g + q * F, hc + hstride * q, act_type(dtype[e]), F);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nact * cd; c++) {
            const int64_t e = act[c / cd], n0 = (c % cd) * chunk, n1 = n0 + chunk < D ? n0 + chunk : D;
            gemv(dtype[e], (const uint8_t *)down[e], F, n0, n1, hp + start[e], op + start[e], count[e], D, T);
        }
        /* combine in slot order: y[t] = ((w0*o0 + w1*o1) + w2*o2) ... */
#pragma omp for
        for (int64_t t = 0; t < T; t++) {
            float *yt = y + t * D;
            for (int64_t d = 0; d < D; d++) yt[d] = 0.f;
            for (int64_t s = 0; s < S; s++) {
                const float wt = weights[t * S + s];
                const float *o = out + slot_pos[t * S + s] * D;
                for (int64_t d = 0; d < D; d++) yt[d] += wt * o[d];
                if (norms) {
                    double acc = 0;
                    for (int64_t d = 0; d < D; d++) acc += (double)o[d] * o[d];
                    norms[t * S + s] = (float)sqrt(acc);
                }
            }
        }
    }
    free(count); free(start); free(pos_tok); free(slot_pos); free(act); free(xq);
    free(g); free(u); free(out); free(hc); free(gp); free(up_); free(op); free(hp);
    for (int a = 0; a < 16; a++) free(conv[a]);
}
