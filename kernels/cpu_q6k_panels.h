/* Q6_K weights against panels of 16 tokens (AVX-512 VNNI build), in llama.cpp's tiled order.
 *
 * Why: a prefill's Q6_K matmuls of many tokens (attention, the shared expert, busy experts) were
 * bound by per-token multiplies: q6kt_rows (cpu_tiles.h) unpacks a weight super-block once per 8
 * tokens and spends 12 multiplies per token on it (0.79x llama.cpp's op at 128 tokens). Here a
 * band of 8 weight rows is unpacked once per work item to signed 6-bit codes, and each vpdpbusd
 * multiplies 4 codes of one row (an embedded broadcast) with the same 4 values of 16 tokens
 * (lanes = tokens), as llama.cpp's own tiled microkernel does with the roles of the operands
 * swapped: the activations are the unsigned operand, biased by +128, and that bias comes back out
 * as 128 * the row's code sum per sub-block (`corr`). The sum of a (row, token, super-block) is the
 * same exact integer as in cpu_kquants.h, so the result has the same bits: res = float(s) * d_w,
 * acc = fma(res, d_x, acc).
 *
 * Shape legend: nb super-blocks of 256 values per row, 16 sub-blocks of 16 values each; G groups of
 * 16 tokens; a band of BAND weight rows.
 * Included by cpu_dot.h after cpu_kquants.h and cpu_tiles.h (bq6k, bq8k, h2f, q6k_unpack, MAXT).
 */
#pragma once
#if TILE_VNNI

#define PANEL 16 /* tokens per panel: one zmm of int32 lanes */
#define BAND 8   /* weight rows per pass: 8 accumulators + 8 sums stay in registers */

/* acc + vpdpbusd(a, the 4 signed bytes at p in every lane), the bytes an embedded {1to16} operand */
static ALWAYS_INLINE __m512i dpbusd_bcast16(__m512i acc, __m512i a, const int8_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*(const i32_any *)p));
    return acc;
}

/* The activations of G groups of 16 tokens (x[t] for t < nx; lanes past nx are zero):
 * q [G][nb][64][16][4] (value + 128 as uint8), d [G][nb][16]. */
static void q6k_panels_build(const bq8k *const *x, int64_t nx, int64_t G, int64_t nb, uint8_t *q, float *d) {
    memset(q, 0, (size_t)(G * nb) * 4096);
    memset(d, 0, sizeof(float) * (size_t)(G * nb * PANEL));
    for (int64_t t = 0; t < nx; t++) {
        const int64_t g = t / PANEL, j = t % PANEL;
        for (int64_t b = 0; b < nb; b++) {
            uint32_t *dst = (uint32_t *)(q + (g * nb + b) * 4096) + j;
            const uint8_t *src = (const uint8_t *)x[t][b].qs;
            for (int kg = 0; kg < 64; kg++) {
                uint32_t v;
                memcpy(&v, src + 4 * kg, 4);
                dst[kg * PANEL] = v ^ 0x80808080u; /* int8 v + 128, as uint8 */
            }
            d[(g * nb + b) * PANEL + j] = x[t][b].d;
        }
    }
}

/* Rows [0, nr) (nr <= BAND; the rest zero) of w: codes [BAND][nb][256] (value - 32, int8),
 * scl [BAND][nb][16] (int32 scales), corr [BAND][nb] = sum_s scale_s * 128 * sum(codes of s), dw. */
static void q6k_band_unpack(const bq6k *w, int64_t nb, int nr, int8_t *codes, int32_t *scl, int32_t *corr,
                            float *dw) {
    for (int r = 0; r < BAND; r++)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t rb = r * nb + b;
            if (r >= nr) {
                memset(codes + rb * 256, 0, 256);
                memset(scl + rb * 16, 0, 16 * sizeof(int32_t));
                corr[rb] = 0, dw[rb] = 0.f;
                continue;
            }
            const bq6k *wb = &w[r * nb + b];
            __m256i q[8], unused_scl[4], unused_off;
            q6k_unpack(wb, q, unused_scl, &unused_off);
            int32_t c = 0;
            for (int i = 0; i < 8; i++) { /* 32 values = sub-blocks 2i, 2i+1 */
                const __m256i s = _mm256_sub_epi8(q[i], _mm256_set1_epi8(32));
                _mm256_storeu_si256((__m256i *)(codes + rb * 256 + 32 * i), s);
                const __m256i sad = _mm256_sad_epu8(q[i], _mm256_setzero_si256()); /* 4 sums of 8 codes */
                const int32_t lo = (int32_t)(_mm256_extract_epi64(sad, 0) + _mm256_extract_epi64(sad, 1)) - 16 * 32;
                const int32_t hi = (int32_t)(_mm256_extract_epi64(sad, 2) + _mm256_extract_epi64(sad, 3)) - 16 * 32;
                c += wb->scales[2 * i] * 128 * lo + wb->scales[2 * i + 1] * 128 * hi;
            }
            for (int s = 0; s < 16; s++) scl[rb * 16 + s] = wb->scales[s];
            corr[rb] = c, dw[rb] = h2f(wb->d);
        }
}

/* out [BAND][16]: a band of rows against one panel, every super-block */
static void q6k_band_panel(const int8_t *codes, const int32_t *scl, const int32_t *corr, const float *dw, int64_t nb,
                           const uint8_t *pq, const float *pd, float *out) {
    __m512 acc[BAND];
    for (int r = 0; r < BAND; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *pb = pq + b * 4096;
        __m512i s1[BAND];
        for (int r = 0; r < BAND; r++) s1[r] = _mm512_set1_epi32(-corr[r * nb + b]);
        for (int s = 0; s < 16; s++) {
            __m512i a[BAND];
            for (int r = 0; r < BAND; r++) a[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int g = 0; g < 4; g++) {
                const __m512i xv = _mm512_load_si512((const void *)(pb + (4 * s + g) * 64));
#pragma GCC unroll 8
                for (int r = 0; r < BAND; r++) a[r] = dpbusd_bcast16(a[r], xv, codes + (r * nb + b) * 256 + 16 * s + 4 * g);
            }
            for (int r = 0; r < BAND; r++)
                s1[r] = _mm512_add_epi32(s1[r], _mm512_mullo_epi32(a[r], _mm512_set1_epi32(scl[(r * nb + b) * 16 + s])));
        }
        const __m512 xd = _mm512_loadu_ps(pd + b * PANEL);
        for (int r = 0; r < BAND; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s1[r]), _mm512_set1_ps(dw[r * nb + b])), xd, acc[r]);
    }
    for (int r = 0; r < BAND; r++) _mm512_storeu_ps(out + r * PANEL, acc[r]);
}

/* ys[t][n] for rows n in [n0, n1) and tokens t < nx (nx >= PANEL), in llama.cpp's tiled order */
static void q6k_panel_rows(const bq6k *w, int64_t nb, int64_t n0, int64_t n1, const bq8k *const *x, int64_t nx,
                           float *const *ys) {
    const int64_t G = (nx + PANEL - 1) / PANEL;
    static __thread uint8_t *buf;
    static __thread size_t cap;
    const size_t need = (size_t)(G * nb) * (4096 + PANEL * sizeof(float)) + (size_t)(BAND * nb) * (256 + 72);
    if (need > cap) {
        free(buf);
        cap = need + need / 4;
        buf = aligned_alloc(64, (cap + 63) / 64 * 64);
    }
    uint8_t *pq = buf;                               /* [G][nb][4096] */
    float *pd = (float *)(pq + (size_t)(G * nb) * 4096); /* [G][nb][16] */
    int8_t *codes = (int8_t *)(pd + G * nb * PANEL); /* [BAND][nb][256] */
    int32_t *scl = (int32_t *)(codes + BAND * nb * 256), *corr = scl + BAND * nb * 16;
    float *dw = (float *)(corr + BAND * nb);
    q6k_panels_build(x, nx, G, nb, pq, pd);
    float out[BAND * PANEL];
    for (int64_t n = n0; n < n1; n += BAND) {
        const int nr = n1 - n < BAND ? (int)(n1 - n) : BAND;
        q6k_band_unpack(w + n * nb, nb, nr, codes, scl, corr, dw);
        for (int64_t g = 0; g < G; g++) {
            q6k_band_panel(codes, scl, corr, dw, nb, pq + g * nb * 4096, pd + g * nb * PANEL, out);
            const int64_t nt = nx - g * PANEL < PANEL ? nx - g * PANEL : PANEL;
            for (int r = 0; r < nr; r++)
                for (int64_t j = 0; j < nt; j++) ys[g * PANEL + j][n + r] = out[r * PANEL + j];
        }
    }
}
#endif /* TILE_VNNI */
