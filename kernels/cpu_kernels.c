/* emo's CPU kernels: matmuls and the routed SwiGLU mixture computed straight from GGUF block bytes.
 *
 * Weights are never expanded: a weight row is read in its own type (F32, F16, BF16, Q8_0, Q4_0,
 * Q5_0, Q4_K, Q5_K, Q6_K) and dotted with the activation converted ONCE per call to the matching
 * "activation type": F32 -> F32, F16 -> F16 and BF16 -> BF16 (rounded to nearest even),
 * Q8_0/Q4_0/Q5_0 -> Q8_0 blocks, the K-quants -> Q8_K super-blocks (cpu_kquants.h).
 * That is also how llama.cpp's CPU backend multiplies (its `vec_dot_type`), and doing the same
 * rounding is what makes emo's greedy decode agree with llama.cpp's on quantized files.
 * A Q8_0 activation block is 32 values x[i] ~ d*q[i]: amax = max|x|, d = amax/127 stored as fp16,
 * q = round_half_even(x * (127/amax)); a block dot is an exact int32 sum scaled by d_w*d_x in fp32.
 *
 * Shape legend: T tokens, K in-features (multiple of 32 for block types), N out-features,
 * E experts, S slots per token, F expert width, D hidden, P = T*S routed (token, slot) pairs.
 * Threads: cpu_pool.h. Work is split into items of whole row ranges of one matrix, so every
 * thread streams through contiguous weight bytes (several interleaved streams per core measured
 * ~2x slower from DRAM on the project's 2-core machines).
 */
#include "cpu_dot.h"
#include "cpu_pool.h"

/* Rows of one matrix per work item, for a job of `rows` rows in all over `T` tokens. One token
 * reads each weight once from DRAM: long runs let a thread stream its rows ahead of use (slim
 * q4_0 decode on 2 threads: 32 tok/s with 64-row items, 36 with 256-row ones, alternated runs),
 * while every thread keeps at least 4 items, so none waits long at a job's end. Several tokens
 * are bound by arithmetic: short items balance better there. Multiples of 8 (Q4_0/Q4_K "R"). */
static int64_t rows_per_item(int64_t rows, int64_t T) {
    int64_t r = T > 1 ? 64 : 256;
    while (r > 64 && rows / r < 4 * (int64_t)pool.nth) r /= 2;
    return r;
}

/* ---- public: threads and dense matmuls -------------------------------------------------------- */

int emo_threads(void) { return pool.nth; }

void emo_set_threads(int n) {
    async_wait();
    pthread_mutex_lock(&pool.run_mu);
    pool_start(n);
    pthread_mutex_unlock(&pool.run_mu);
}

/* Activation rows converted once per activation type; xs[a][t] points at row t in type a. */
struct acts {
    void *buf[TY_COUNT];
    const void **xs[TY_COUNT];
};

static void acts_free(struct acts *A) {
    for (int a = 0; a < TY_COUNT; a++) {
        free(A->buf[a]);
        free(A->xs[a]);
    }
}

struct convert_ctx {
    struct acts *A;
    const float *x;
    int64_t k;
    int as[TY_COUNT], na; /* the activation types to build */
};

static void convert_item(void *p, int64_t t) {
    const struct convert_ctx *c = p;
    for (int j = 0; j < c->na; j++) {
        const int a = c->as[j];
        if (a == TY_F32) {
            c->A->xs[a][t] = c->x + t * c->k;
        } else {
            uint8_t *dst = (uint8_t *)c->A->buf[a] + emo_row_bytes(a, c->k) * (size_t)t;
            convert_row(c->x + t * c->k, dst, a, c->k);
            c->A->xs[a][t] = dst;
        }
    }
}

/* the R rows of x [R, k], converted for every type in `types`, rows split over the threads (the
 * K-quants' Q8_K rounding is scalar: a 128-token prefill converts ~1M values per matrix) */
static void acts_build(struct acts *A, const float *x, int64_t k, int64_t R, const int *types, int ntypes) {
    memset(A, 0, sizeof *A);
    struct convert_ctx c = {.A = A, .x = x, .k = k};
    for (int j = 0; j < ntypes; j++) {
        const int a = act_type(types[j]);
        if (A->xs[a]) continue;
        A->xs[a] = malloc(sizeof(void *) * (size_t)(R ? R : 1));
        if (a != TY_F32) A->buf[a] = malloc(emo_row_bytes(a, k) * (size_t)(R ? R : 1));
        c.as[c.na++] = a;
    }
    run(convert_item, &c, R);
}

struct mm_ctx {
    const void *const *w;
    const int *wtype;
    const int64_t *n;
    int64_t k, T, starts[17], rpi; /* rpi: rows per item */
    struct acts A;
    float **ys; /* [m][T] output rows */
};

static void mm_item(void *p, int64_t c) {
    struct mm_ctx *m = p;
    int j = 0;
    while (c >= m->starts[j + 1]) j++;
    const int64_t n0 = (c - m->starts[j]) * m->rpi, n1 = n0 + m->rpi < m->n[j] ? n0 + m->rpi : m->n[j];
    gemv(m->wtype[j] | TY_2D, (const uint8_t *)m->w[j], m->k, n0, n1, m->A.xs[act_type(m->wtype[j])],
         m->ys + j * m->T, m->T, m->n[j], m->T, 0);
}

/* m weight matrices w[j] [n[j], k] (all sharing the input) times x [T, k] -> y[j] [T, n[j]].
 * The activation is converted once per activation type; the rows of all matrices form one job
 * (q/k/v share one pass). */
void emo_matmul(int m, const void *const *w, const int *wtype, const int64_t *n, int64_t k, const float *x,
                int64_t T, float *const *y) {
    if (m > 16 || T <= 0) return; /* the Python side never passes more */
    struct mm_ctx c = {.w = w, .wtype = wtype, .n = n, .k = k, .T = T};
    acts_build(&c.A, x, k, T, wtype, m);
    c.ys = malloc(sizeof(float *) * (size_t)(T * m));
    for (int j = 0; j < m; j++)
        for (int64_t t = 0; t < T; t++) c.ys[j * T + t] = y[j] + t * n[j];
    int64_t total = 0;
    for (int j = 0; j < m; j++) total += n[j];
    c.rpi = rows_per_item(total, T);
    total = 0;
    for (int j = 0; j < m; j++) {
        c.starts[j] = total;
        total += (n[j] + c.rpi - 1) / c.rpi;
    }
    c.starts[m] = total;
    run(mm_item, &c, total);
    free(c.ys);
    acts_free(&c.A);
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

/* out [T, D] = ggml's RMSNorm of x times w: fp32 squares summed in double, scale 1.0f/sqrtf(mean + eps) */
void emo_rms_norm(const float *x, const float *w, int64_t T, int64_t D, float eps, float *out) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * D;
        double sum = 0.0;
        for (int64_t i = 0; i < D; i++) sum += (double)(xt[i] * xt[i]);
        const float mean = (float)(sum / (double)D);
        const float scale = 1.0f / sqrtf(mean + eps);
        for (int64_t i = 0; i < D; i++) out[t * D + i] = xt[i] * scale * w[i];
    }
}

/* The lane count of llama.cpp's build for this instruction set (its F32 vec_dot: cpu_dot.h,
 * dot_f32_one; its softmax vectors), and its lane sum. */
#if defined(__AVX512F__)
#define ALANES 16
static float lanes_sum(const float *u) { /* _mm512_reduce_add_ps: halves 16 -> 8 -> 4 -> 2 -> 1 */
    float t[8];
    for (int l = 0; l < 8; l++) t[l] = u[l] + u[l + 8];
    for (int l = 0; l < 4; l++) t[l] = t[l] + t[l + 4];
    return (t[0] + t[2]) + (t[1] + t[3]);
}
#else
#define ALANES 8
static float lanes_sum(const float *u) { /* 128-bit halves, then two horizontal adds */
    const float t0 = u[0] + u[4], t1 = u[1] + u[5], t2 = u[2] + u[6], t3 = u[3] + u[7];
    return (t0 + t1) + (t2 + t3);
}
#endif
#define ASTEP (4 * ALANES)

/* e^x as llama.cpp's vectorized expf gives it, value by value (its softmax and SiLU use that
 * function on every full vector; a correctly rounded expf differs by an ulp now and then, which a
 * later Q8_0/Q8_K rounding can turn into a different token). The algorithm: n = x log2(e) rounded
 * by the 1.5*2^23 shift, b = x - n ln2 with ln2 split in two, e^b by a degree-5 polynomial, times
 * 2^n. How 2^n is applied differs between llama.cpp's AVX-512 and AVX2 builds, and so does the
 * polynomial's last term, so each build of this file follows the build of llama.cpp for the same
 * instruction set. */
static inline float pow2i(int e) { /* 2^e for -126 <= e <= 127, from its exponent bits */
    const uint32_t b = (uint32_t)(e + 127) << 23;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline float exp_as_ggml(float x) {
    const float shift = 0x1.8p23f, z = fmaf(x, 0x1.715476p+0f, shift), n = z - shift;
    const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x)), u = b * b;
    const float p45 = fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), p23 = fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f);
#if defined(__AVX512F__)
    if (fabsf(n) > 192.f) return n <= 0.f ? 0.f : INFINITY;
    const float j = fmaf(fmaf(p45, u, p23), u, fmaf(0x1.ffffecp-1f, b, 1.0f));
    /* vscalefps: j * 2^n rounded once. One multiply by an exact power of two where 2^n is normal;
     * otherwise an exact first step by 2^(n -+ 100), then one rounding multiply by 2^(+-100). */
    const int e = (int)n;
    if (e >= -126 && e <= 127) return j * pow2i(e);
    return e < 0 ? (j * pow2i(e + 100)) * 0x1p-100f : (j * pow2i(e - 100)) * 0x1p100f;
#else
    const float j = fmaf(fmaf(p45, u, p23), u, 0x1.ffffecp-1f * b);
    uint32_t zb, e, g;
    memcpy(&zb, &z, 4);
    e = zb << 23; /* 2^n's exponent field, straight from the shifted sum's low bits */
    if (!(fabsf(n) > 126.f)) {
        const uint32_t kb = e + 0x3f800000u;
        float k;
        memcpy(&k, &kb, 4);
        return fmaf(j, k, k);
    }
    /* out of the normal range: 2^n as a product of two powers that are each representable */
    g = n <= 0.f ? 0x82000000u : 0u;
    const uint32_t s1b = g + 0x7f000000u, s2b = e - g;
    float s1, s2;
    memcpy(&s1, &s1b, 4);
    memcpy(&s2, &s2b, 4);
    if (fabsf(n) > 192.f) return s1 * s1;
    return fmaf(s2, j, s2) * s1;
#endif
}

/* the lane sum of llama.cpp's softmax vectors and of its tiled sgemm: its AVX-512 build reduces
 * with _mm512_reduce_add_ps, its AVX2 build adds the 128-bit halves, then (0+2, 1+3), then the two */
static inline float softmax_lanes_sum(const float *u) {
#if defined(__AVX512F__)
    return lanes_sum(u);
#else
    const float t0 = u[0] + u[4], t1 = u[1] + u[5], t2 = u[2] + u[6], t3 = u[3] + u[7];
    return (t0 + t2) + (t1 + t3);
#endif
}

/* lanes_sum (sgemm: softmax_lanes_sum) of FP_LANES sets of ALANES values at once: u[l] holds lane l
 * of each set (ALANES == FP_LANES: both follow llama.cpp's vector width); the same adds per set */
static inline fvec lanes_sum_sets(fvec *u, int sgemm) {
#if defined(__AVX512F__)
    (void)sgemm;
    for (int l = 0; l < 8; l++) u[l] = fv_add(u[l], u[l + 8]);
    for (int l = 0; l < 4; l++) u[l] = fv_add(u[l], u[l + 4]);
    return fv_add(fv_add(u[0], u[2]), fv_add(u[1], u[3]));
#else
    const fvec t0 = fv_add(u[0], u[4]), t1 = fv_add(u[1], u[5]), t2 = fv_add(u[2], u[6]), t3 = fv_add(u[3], u[7]);
    return sgemm ? fv_add(fv_add(t0, t2), fv_add(t1, t3)) : fv_add(fv_add(t0, t1), fv_add(t2, t3));
#endif
}

/* y[j] = e^(x[j] - max) for j < n and their sum in double, in llama.cpp's order: whole vectors of
 * ALANES values through exp_as_ggml, each summed across its lanes first; positions past the last
 * whole vector with a correctly rounded expf, one by one. `pad` > n counts the masked positions
 * llama.cpp's padded cache adds (exactly zero each), which only fill the last vector. */
static double softmax_exps(const float *x, int64_t n, int64_t pad, float mx, float *y) {
    double sum = 0.0;
    int64_t j = 0;
    for (; j + ALANES <= pad && j < n; j += ALANES) { /* vectors past n add exact zeros */
        float u[ALANES];
        for (int l = 0; l < ALANES; l++) u[l] = j + l < n ? exp_as_ggml(x[j + l] - mx) : 0.f;
        for (int l = 0; l < ALANES && j + l < n; l++) y[j + l] = u[l];
        sum += (double)softmax_lanes_sum(u);
    }
    for (; j < n; j++) {
        y[j] = expf(x[j] - mx);
        sum += (double)y[j];
    }
    return sum;
}

/* Rows of a softmax [T, n] as llama.cpp computes ffn_moe_probs (no mask, scale 1), in place */
void emo_softmax_rows(float *x, int64_t T, int64_t n) {
    for (int64_t t = 0; t < T; t++) {
        float *r = x + t * n, mx = -INFINITY;
        for (int64_t j = 0; j < n; j++) mx = r[j] > mx ? r[j] : mx;
        const float inv = (float)(1.0 / softmax_exps(r, n, n, mx, r));
        for (int64_t j = 0; j < n; j++) r[j] *= inv;
    }
}

#include "cpu_moe.h" /* the routed SwiGLU mixture, and the shared expert in the background */

/* c[m] lane l = r[l] lane m */
static inline void transpose8x8(const __m256 *r, __m256 *c) {
    __m256 a[8], b[8];
    for (int i = 0; i < 4; i++) {
        a[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++)
        for (int h = 0; h < 2; h++) {
            b[4 * i + 2 * h] = _mm256_shuffle_ps(a[4 * i + h], a[4 * i + 2 + h], _MM_SHUFFLE(1, 0, 1, 0));
            b[4 * i + 2 * h + 1] = _mm256_shuffle_ps(a[4 * i + h], a[4 * i + 2 + h], _MM_SHUFFLE(3, 2, 3, 2));
        }
    for (int m = 0; m < 4; m++) {
        c[m] = _mm256_permute2f128_ps(b[m], b[4 + m], 0x20);
        c[m + 4] = _mm256_permute2f128_ps(b[m], b[4 + m], 0x31);
    }
}

/* pr[j] = vec_dot(K row j, q, hd) * scale for j < n, the same operations per position, K rows in
 * fp32 or (f16) fp16 with q already rounded to fp16 (qh; q holds the same values as fp32), as
 * llama.cpp's vec_dot_f32 / vec_dot_f16. Past the last full step each is a chain of dependent adds
 * of rounded products (all of a head of 32 on an AVX-512 build, where a step is 64 values), in
 * fp32 for F32 and in double for F16 (whose products of two fp16 values are exact): eight
 * positions run their chains side by side, one per lane, their products transposed so that lanes
 * are positions. hd % 8 == 0. */
static void attn_scores(const float *q, const uint16_t *qh, const void *K, int f16, int64_t n, int64_t hd,
                        float scale, float *pr) {
    const int64_t np = hd & ~(int64_t)(ASTEP - 1);
    const float *Kf = K;
    const uint16_t *Kh = K;
    const __m256 sc = _mm256_set1_ps(scale);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        float head[8];
        for (int l = 0; l < 8; l++)
            head[l] = !np ? 0.f : f16 ? dot_f16_one(Kh + (j + l) * hd, qh, np) : dot_f32_one(Kf + (j + l) * hd, q, np);
        __m256 acc = _mm256_loadu_ps(head);
        __m256d lo = _mm256_cvtps_pd(_mm_loadu_ps(head)), hi = _mm256_cvtps_pd(_mm_loadu_ps(head + 4));
        for (int64_t i = np; i < hd; i += 8) {
            __m256 r[8], c[8];
            const __m256 qi = _mm256_loadu_ps(q + i);
            for (int l = 0; l < 8; l++) {
                const size_t at = (size_t)((j + l) * hd + i);
                r[l] = _mm256_mul_ps(f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(Kh + at)))
                                         : _mm256_loadu_ps(Kf + at), qi);
            }
            transpose8x8(r, c);
            for (int m = 0; m < 8; m++) {
                if (!f16) {
                    acc = _mm256_add_ps(acc, c[m]);
                    continue;
                }
                lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(c[m])));
                hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(c[m], 1)));
            }
        }
        if (f16) acc = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(lo)), _mm256_cvtpd_ps(hi), 1);
        _mm256_storeu_ps(pr + j, _mm256_mul_ps(acc, sc));
    }
    for (; j < n; j++) pr[j] = (f16 ? dot_f16_one(Kh + j * hd, qh, hd) : dot_f32_one(Kf + j * hd, q, hd)) * scale;
}

/* One query head over n cached positions: out [hd] = softmax(K q * scale) V, in llama.cpp's
 * order: scores, the softmax with the exp sum in double (softmax_exps), then out[d] = the dot over
 * positions of v[:, d] and p. llama.cpp's cache is padded with zero weights to a multiple of 256
 * positions, so every position goes through its accumulators. Its dots differ between a one-token
 * step and a batch of several queries (`sgemm`), and between cache types:
 *   F32 cache  scores: vec_dot_f32 (the query is not contiguous, so never its sgemm); p.V: vec_dot
 *              (position j -> accumulator (j/ALANES)%4, lane j%ALANES), or with several queries
 *              its tiled sgemm (one accumulator, position j -> lane j%ALANES, then its lane sum)
 *   F16 cache  the query is rounded to fp16 and so is p (both become the cache type before the
 *              dots); scores and p.V: vec_dot_f16, or with several queries its F16 sgemm
 * K, V: [n, hd] rows of fp32 or fp16 (`f16`). */
static void attend(const float *q, const void *K, const void *V, int64_t n, int64_t hd, float scale, int sgemm,
                   int f16, float *out) {
    float *pr = malloc(sizeof(float) * (size_t)n), *part = calloc((size_t)(ASTEP * hd), sizeof(float));
    float mx = -INFINITY;
    if (f16) { /* the query in the cache type: qh, and the same values as fp32 in qf */
        float *qf = malloc((sizeof(float) + sizeof(uint16_t)) * (size_t)hd);
        uint16_t *qh = (uint16_t *)(qf + hd);
        for (int64_t i = 0; i < hd; i++) qh[i] = f2h(q[i]), qf[i] = h2f(qh[i]);
        if (sgemm && hd % FP_LANES == 0)
            for (int64_t j = 0; j < n; j++) pr[j] = dot_f16_acc1((const uint16_t *)K + j * hd, qh, hd) * scale;
        else
            attn_scores(qf, qh, K, 1, n, hd, scale, pr);
        free(qf);
    } else {
        attn_scores(q, NULL, K, 0, n, hd, scale, pr);
    }
    for (int64_t j = 0; j < n; j++) mx = pr[j] > mx ? pr[j] : mx;
    const float inv = (float)(1.0 / softmax_exps(pr, n, (n + 255) / 256 * 256, mx, pr));
    const int64_t accs = sgemm ? ALANES : ASTEP;
    for (int64_t j = 0; j < n; j++) {
        pr[j] *= inv;
        if (f16) pr[j] = h2f(f2h(pr[j]));
        float *acc = part + (j % accs) * hd;
        int64_t d = 0;
        if (hd % FP_LANES == 0) {
            const fvec pj = fv_set1(pr[j]);
            for (; d < hd; d += FP_LANES) {
                const fvec v = f16 ? fv_load_h((const uint16_t *)V + j * hd + d) : fv_load((const float *)V + j * hd + d);
                fv_store(acc + d, fv_fma(pj, v, fv_load(acc + d)));
            }
        }
        const __m256 pj = _mm256_set1_ps(pr[j]);
        for (; d < hd; d += 8) {
            const __m256 v = f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)V + j * hd + d)))
                                 : _mm256_loadu_ps((const float *)V + j * hd + d);
            _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pj, v, _mm256_loadu_ps(acc + d)));
        }
    }
    int64_t d0 = 0;
    for (; d0 + FP_LANES <= hd; d0 += FP_LANES) { /* the accumulators' sums, FP_LANES values of d at once */
        fvec u[ALANES];
        for (int l = 0; l < ALANES; l++) {
            const float *c = part + l * hd + d0;
            u[l] = sgemm ? fv_load(c)
                         : fv_add(fv_add(fv_load(c), fv_load(c + 2 * ALANES * hd)),
                                  fv_add(fv_load(c + ALANES * hd), fv_load(c + 3 * ALANES * hd)));
        }
        fv_store(out + d0, lanes_sum_sets(u, sgemm));
    }
    for (int64_t d = d0; d < hd; d++) {
        float u[ALANES];
        if (sgemm) {
            for (int l = 0; l < ALANES; l++) u[l] = part[l * hd + d];
            out[d] = softmax_lanes_sum(u);
            continue;
        }
        for (int l = 0; l < ALANES; l++) {
            const float s0 = part[l * hd + d] + part[(2 * ALANES + l) * hd + d];
            const float s1 = part[(ALANES + l) * hd + d] + part[(3 * ALANES + l) * hd + d];
            u[l] = s0 + s1;
        }
        out[d] = lanes_sum(u);
    }
    free(pr);
    free(part);
}

struct attn_ctx {
    const float *q;           /* [T, H, hd] */
    const uint8_t *kc, *vc;   /* caches [Hkv, cap, hd] of `esize`-byte values */
    int64_t T, H, Hkv, hd, cap, start, esize;
    float scale;
    float *out;               /* [T, H, hd] */
};

/* item = (query t, head h): query t sits at position start + t and sees positions 0..start+t */
static void attn_item(void *p, int64_t i) {
    const struct attn_ctx *a = p;
    const int64_t t = i / a->H, h = i % a->H, kvh = h / (a->H / a->Hkv), hd = a->hd;
    const size_t head = (size_t)(kvh * a->cap * hd * a->esize);
    attend(a->q + (t * a->H + h) * hd, a->kc + head, a->vc + head, a->start + t + 1, hd, a->scale, a->T >= 2,
           a->esize == 2, a->out + (t * a->H + h) * hd);
}

/* Causal attention of T queries q [T, H, hd] at positions start..start+T-1 over caches
 * [Hkv, cap, hd] of type kv_type (F32 or F16) that already hold positions 0..start+T-1 ->
 * out [T, H, hd]. Returns -1 for another cache type. */
int emo_attention(const float *q, int64_t T, int64_t H, int64_t Hkv, int64_t hd, const void *kc, const void *vc,
                  int64_t cap, int64_t start, int kv_type, float *out) {
    if (kv_type != TY_F32 && kv_type != TY_F16) return -1;
    struct attn_ctx a = {.q = q, .kc = kc, .vc = vc, .T = T, .H = H, .Hkv = Hkv, .hd = hd, .cap = cap,
                         .start = start, .esize = kv_type == TY_F16 ? 2 : 4, .scale = 1.0f / sqrtf((float)hd),
                         .out = out};
    run(attn_item, &a, T * H);
    return 0;
}

/* One decode step of a layer's attention block for a single sequence, in place on h [D]:
 *   xn = rms(h) * attn_norm; q, k, v = xn @ Wq/Wk/Wv; NORM RoPE at `pos`; k, v appended to the
 *   caches [Hkv, cap, hd] (kv_type F32 or F16) at `pos`; attention over positions 0..pos; h += o @ Wo;
 * then x_ffn = rms(h) * ffn_norm, and (when router is not NULL) the router logits [n_router] =
 * router [n_router, D] (F32) @ x_ffn, as emo_matmul computes them for one token: a decode step is
 * one call before routing. w[4]/types[4]: q, k, v, o weights. `shared` (optional): the layer's
 * shared expert, started on x_ffn in the background for emo_moe(..., pre_shared = 1) to take. */
void emo_attn_decode(float *h, int64_t D, const float *attn_norm, const float *ffn_norm, float eps,
                     const void *const *w, const int *types, int64_t H, int64_t Hkv, int64_t hd,
                     void *kc, void *vc, int64_t cap, int64_t pos, int kv_type, float rope_base, float *x_ffn,
                     const float *router, int64_t n_router, float *logits, const struct emo_expert *shared) {
    float *xn = malloc(sizeof(float) * (size_t)D), *qkv = malloc(sizeof(float) * (size_t)((H + 2 * Hkv) * hd));
    float *o = malloc(sizeof(float) * (size_t)(H * hd)), *ao = malloc(sizeof(float) * (size_t)D);
    emo_rms_norm(h, attn_norm, 1, D, eps, xn);
    const int64_t n3[3] = {H * hd, Hkv * hd, Hkv * hd};
    float *y3[3] = {qkv, qkv + H * hd, qkv + (H + Hkv) * hd};
    emo_matmul(3, w, types, n3, D, xn, 1, y3);
    emo_rope_norm(y3[0], 1, H, hd, &pos, rope_base);
    emo_rope_norm(y3[1], 1, Hkv, hd, &pos, rope_base);
    for (int64_t g = 0; g < Hkv; g++) {
        const int64_t at = (g * cap + pos) * hd;
        if (kv_type == TY_F16) /* llama.cpp's cache copy rounds to nearest even */
            for (int64_t i = 0; i < hd; i++) {
                ((uint16_t *)kc)[at + i] = f2h(y3[1][g * hd + i]);
                ((uint16_t *)vc)[at + i] = f2h(y3[2][g * hd + i]);
            }
        else {
            memcpy((float *)kc + at, y3[1] + g * hd, sizeof(float) * (size_t)hd);
            memcpy((float *)vc + at, y3[2] + g * hd, sizeof(float) * (size_t)hd);
        }
    }
    emo_attention(y3[0], 1, H, Hkv, hd, kc, vc, cap, pos, kv_type, o);
    const int64_t nD = D;
    float *yo[1] = {ao};
    emo_matmul(1, w + 3, types + 3, &nD, H * hd, o, 1, yo);
    for (int64_t i = 0; i < D; i++) h[i] = ao[i] + h[i];
    emo_rms_norm(h, ffn_norm, 1, D, eps, x_ffn);
    if (router) {
        const void *rw[1] = {router};
        const int rt[1] = {TY_F32};
        float *ry[1] = {logits};
        emo_matmul(1, rw, rt, &n_router, D, x_ffn, 1, ry);
    }
    if (shared) shared_expert_start(shared, x_ffn, D); /* last: any kernel run would wait for it */
    free(xn); free(qkv); free(o); free(ao);
}

/* Dequantize selected rows (embedding lookup): out [nrows, k]. */
int emo_get_rows(const void *w, int wtype, int64_t n, int64_t k, const int64_t *rows, int64_t nrows, float *out) {
    for (int64_t r = 0; r < nrows; r++)
        if (rows[r] < 0 || rows[r] >= n) return -1;
    wtype = BASE(wtype) & 0xFF;
    const size_t wb = emo_row_bytes(wtype, k);
    for (int64_t r = 0; r < nrows; r++) {
        const uint8_t *src = (const uint8_t *)w + wb * (size_t)rows[r];
        float *o = out + r * k;
        switch (wtype) {
        case TY_F32: memcpy(o, src, 4 * (size_t)k); break;
        case TY_F16: for (int64_t i = 0; i < k; i++) o[i] = h2f(((const uint16_t *)src)[i]); break;
        case TY_BF16: for (int64_t i = 0; i < k; i++) o[i] = bf2f(((const uint16_t *)src)[i]); break;
        case TY_Q8_0:
            for (int64_t i = 0; i < k; i++) o[i] = h2f(((const bq8 *)src)[i / 32].d) * ((const bq8 *)src)[i / 32].qs[i % 32];
            break;
        case TY_Q4_0:
            for (int64_t i = 0; i < k; i++) {
                const bq4 *b = (const bq4 *)src + i / 32;
                const int j = (int)(i % 32);
                o[i] = h2f(b->d) * ((j < 16 ? (b->qs[j % 16] & 0x0F) : (b->qs[j % 16] >> 4)) - 8);
            }
            break;
        case TY_Q5_0: dequant_q5_0((const bq5 *)src, o, k / 32); break;
        case TY_Q4_K: dequant_q4k((const bq4k *)src, o, k / QK); break;
        case TY_Q5_K: dequant_q5k((const bq5k *)src, o, k / QK); break;
        case TY_Q6_K: dequant_q6k((const bq6k *)src, o, k / QK); break;
        default: return -2;
        }
    }
    return 0;
}

/* x [T, k] -> T rows in `atype`'s activation format (what the matmuls dot weights of that type
 * with): exposed so tests can compare the roundings with llama.cpp's own quantize functions. */
void emo_convert_rows(const float *x, int64_t T, int64_t k, int wtype, void *out) {
    const int a = act_type(wtype);
    const size_t st = emo_row_bytes(a, k);
    for (int64_t t = 0; t < T; t++) convert_row(x + t * k, (uint8_t *)out + st * (size_t)t, a, k);
}
