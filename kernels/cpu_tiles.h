/* Register-tiled kernels of emo's CPU matmuls: several weight rows (and tokens) per pass, so each
 * weight block is unpacked once per tile and no per-row horizontal sums are needed.
 * Every kernel here computes the same bits as the row-wise kernel it replaces (cpu_dot.h): the
 * integer sum of a (row, block) is exact however it is formed, and the fp32 operations after it
 * keep their order per (row, token).
 * Shape legend: nb blocks of 32 values per row, rows 8 at a time (lanes = rows), nt <= MAXT tokens.
 * Included by cpu_dot.h, whose block types and helpers (bq4, bq8, h2f, udot4, MAXT) it uses.
 */
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define TILE_VNNI 1
#else
#define TILE_VNNI 0
#endif
#define ALWAYS_INLINE inline __attribute__((always_inline))

static inline __m256i bcast4(const int8_t *p) { /* 4 activation bytes in every dword lane */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

#if TILE_VNNI
/* acc + vpdpbusd(a, 4 bytes at p in every lane), the bytes an embedded {1to8} broadcast operand:
 * gcc emits a separate vpbroadcastd for the intrinsic form, which measured 7-14% slower */
typedef int32_t __attribute__((may_alias, aligned(1))) i32_any; /* 4 bytes anywhere, any type */
static ALWAYS_INLINE __m256i dpbusd_bcast(__m256i acc, __m256i a, const int8_t *p) {
    __asm__("vpdpbusd %2%{1to8%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*(const i32_any *)p));
    return acc;
}
#endif

/* ---- Q4_0 "R": 8 rows per pass, lanes = rows ------------------------------------------------------
 * The 16 quant bytes of a block of 8 rows are transposed in registers so that dword lane r holds
 * 4 bytes of row r; a broadcast activation dword then multiplies all 8 rows at once and the int32
 * lanes are directly the per-row sums (the row-wise kernel needed a horizontal-add tree per block).
 * The -8 offset of every nibble is -8 * sum(x) per block, shared by all rows (q4r8_prep). */

/* per block of an activation row: -8 * sum of its 32 int8 values, and its scale as fp32 */
static void q4r8_prep(const bq8 *x, int64_t nb, int32_t *xs8, float *dx, int stride) {
    const __m256i ones = _mm256_set1_epi8(1);
    for (int64_t b = 0; b < nb; b++) {
        const __m256i s = udot4(ones, _mm256_loadu_si256((const __m256i *)x[b].qs));
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        h = _mm_add_epi32(h, _mm_unpackhi_epi64(h, h));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 1));
        xs8[b * stride] = -8 * _mm_cvtsi128_si32(h);
        dx[b * stride] = h2f(x[b].d);
    }
}

/* q[j] lane r = quant bytes 4j..4j+3 of row r (p: the quant bytes of row 0, rs: row stride).
 * Rows r and r+4 share a register, so one 4x4 dword transpose per 128-bit half does it. */
static ALWAYS_INLINE void q4r8_load(const uint8_t *p, size_t rs, __m256i q[4]) {
#define ROWPAIR(r) _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(p + (r) * rs))), \
                                           _mm_loadu_si128((const __m128i *)(p + ((r) + 4) * rs)), 1)
    const __m256i y0 = ROWPAIR(0), y1 = ROWPAIR(1), y2 = ROWPAIR(2), y3 = ROWPAIR(3);
#undef ROWPAIR
    const __m256i a = _mm256_unpacklo_epi32(y0, y1), b = _mm256_unpackhi_epi32(y0, y1);
    const __m256i c = _mm256_unpacklo_epi32(y2, y3), d = _mm256_unpackhi_epi32(y2, y3);
    q[0] = _mm256_unpacklo_epi64(a, c);
    q[1] = _mm256_unpackhi_epi64(a, c);
    q[2] = _mm256_unpacklo_epi64(b, d);
    q[3] = _mm256_unpackhi_epi64(b, d);
}

/* Nibbles of the transposed bytes: lo[j] = values 4j..4j+3, hi[j] = values 16+4j..16+4j+3.
 * With VNNI and one token, hi stays unshifted (16 * nibble: its sums are multiples of 16, shifted
 * back exactly once per block instead of four shifts); maddubs would saturate on that, and with
 * several tokens the one shift per token costs more than the four per block. */
static ALWAYS_INLINE void q4r8_nibbles(const __m256i q[4], __m256i lo[4], __m256i hi[4], const int NT) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; j++) {
        lo[j] = _mm256_and_si256(q[j], low);
        if (TILE_VNNI && NT == 1)
            hi[j] = _mm256_andnot_si256(low, q[j]);
        else
            hi[j] = _mm256_and_si256(_mm256_srli_epi16(q[j], 4), low);
    }
}

/* lane r = exact int32 sum over the block of (nibble - 8) * x for row r; xs8 = -8 * sum(x) */
static ALWAYS_INLINE __m256i q4r8_isum(const __m256i lo[4], const __m256i hi[4], const int8_t *xq, int32_t xs8,
                                       const int NT) {
#if TILE_VNNI
    __m256i s0 = _mm256_set1_epi32(xs8), s1 = _mm256_setzero_si256(); /* two chains: half the latency */
    for (int j = 0; j < 4; j++) {
        s0 = dpbusd_bcast(s0, lo[j], xq + 4 * j);
        s1 = dpbusd_bcast(s1, hi[j], xq + 16 + 4 * j);
    }
    return _mm256_add_epi32(s0, NT == 1 ? _mm256_srai_epi32(s1, 4) : s1);
#else
    (void)NT;
    /* int16 pair sums before widening: 16 products of |15 * 127| per lane stay below 32767 */
    __m256i s = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo[j], bcast4(xq + 4 * j)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[j], bcast4(xq + 16 + 4 * j)));
    }
    return _mm256_add_epi32(_mm256_madd_epi16(s, _mm256_set1_epi16(1)), _mm256_set1_epi32(xs8));
#endif
}

/* the 8 rows' fp16 scales of a block as fp32 (p: block of row 0); measured as fast as a vector
 * transpose of the scale words, and faster than a gather */
static ALWAYS_INLINE __m256 q4r8_scales(const uint8_t *p, size_t rs) {
    uint16_t h[8];
    for (int r = 0; r < 8; r++) memcpy(&h[r], p + r * rs, 2);
    return _mm256_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3], (short)h[4],
                                          (short)h[5], (short)h[6], (short)h[7]));
}

/* 8 rows (row stride nb blocks) against NT activation rows -> out[t*8 + r]; per row and token
 * acc = fma(float(isum), d_w * d_x, acc) block after block, like the one-row dot_q4_seq.
 * xs8/dx: q4r8_prep of the tokens, [block][MAXT]. pf: where the next pass reads (prefetched
 * linearly: eight row streams otherwise defeat the hardware prefetcher, measured 2.3x slower). */
static ALWAYS_INLINE void q4r8_tile(const bq4 *w, int64_t nb, const bq8 *const *x, const int32_t *xs8,
                                    const float *dx, const int NT, float *out, const uint8_t *pf) {
    const size_t rs = (size_t)nb * sizeof(bq4);
    const uint8_t *base = (const uint8_t *)w;
    __m256 acc[MAXT];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = base + (size_t)b * sizeof(bq4);
        const char *f = (const char *)pf + (size_t)b * 8 * sizeof(bq4); /* 144 bytes per block */
        _mm_prefetch(f, _MM_HINT_T0);
        _mm_prefetch(f + 64, _MM_HINT_T0);
        _mm_prefetch(f + 128, _MM_HINT_T0);
        __m256i q[4], lo[4], hi[4];
        q4r8_load(p + 2, rs, q);
        q4r8_nibbles(q, lo, hi, NT);
        const __m256 vdw = q4r8_scales(p, rs);
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) {
            const __m256i isum = q4r8_isum(lo, hi, x[t][b].qs, xs8[b * MAXT + t], NT);
            const __m256 d = _mm256_mul_ps(vdw, _mm256_set1_ps(dx[b * MAXT + t]));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) _mm256_storeu_ps(out + 8 * t, acc[t]);
}

/* one copy of q4r8_tile per token count, so its loops unroll and the accumulators stay in registers */
#define Q4R8_NT(n) \
    static void q4r8_tile_##n(const bq4 *w, int64_t nb, const bq8 *const *x, const int32_t *xs8, const float *dx, \
                              float *out, const uint8_t *pf) { q4r8_tile(w, nb, x, xs8, dx, n, out, pf); }
Q4R8_NT(1) Q4R8_NT(2) Q4R8_NT(3) Q4R8_NT(4) Q4R8_NT(5) Q4R8_NT(6) Q4R8_NT(7) Q4R8_NT(8)
#undef Q4R8_NT
typedef void (*q4r8_fn)(const bq4 *, int64_t, const bq8 *const *, const int32_t *, const float *, float *,
                        const uint8_t *);
static const q4r8_fn q4r8_tiles[MAXT + 1] = {NULL, q4r8_tile_1, q4r8_tile_2, q4r8_tile_3, q4r8_tile_4,
                                             q4r8_tile_5, q4r8_tile_6, q4r8_tile_7, q4r8_tile_8};
_Static_assert(MAXT == 8, "q4r8_tiles has one kernel per token count up to MAXT");

/* ys[t][n] for rows n in [n0, n1) (whole groups of 8; the caller does the rest) and nt tokens */
static void q4r8_rows(const bq4 *w, int64_t nb, int64_t n0, int64_t n1, const bq8 *const *x, int nt,
                      float *const *ys) {
    enum { STACK_BLOCKS = 256 }; /* k <= 8192 needs no heap */
    int32_t xs8_s[STACK_BLOCKS * MAXT];
    float dx_s[STACK_BLOCKS * MAXT];
    int32_t *xs8 = nb <= STACK_BLOCKS ? xs8_s : malloc(sizeof(int32_t) * MAXT * (size_t)nb);
    float *dx = nb <= STACK_BLOCKS ? dx_s : malloc(sizeof(float) * MAXT * (size_t)nb);
    for (int t = 0; t < nt; t++) q4r8_prep(x[t], nb, xs8 + t, dx + t, MAXT);
    const q4r8_fn tile = q4r8_tiles[nt];
    /* the first group has no pass before it to prefetch it: ask for all of it into L2 now (items
     * are claimed by whichever thread is free, so the previous item's pass may have run elsewhere;
     * measured 5-10% on a DRAM-bound decode) */
    if (n0 + 8 <= n1)
        for (size_t o = 0; o < (size_t)nb * 8 * sizeof(bq4); o += 64)
            _mm_prefetch((const char *)(w + n0 * nb) + o, _MM_HINT_T1);
    float r[8 * MAXT];
    for (int64_t n = n0; n + 8 <= n1; n += 8) {
        const bq4 *g = w + n * nb;
        /* the next group of this range, else this one again (its lines are already in cache) */
        const uint8_t *pf = (const uint8_t *)(n + 16 <= n1 ? g + 8 * nb : g);
        tile(g, nb, x, xs8, dx, r, pf);
        for (int t = 0; t < nt; t++) memcpy(ys[t] + n, r + 8 * t, 8 * sizeof(float));
    }
    if (xs8 != xs8_s) free(xs8);
    if (dx != dx_s) free(dx);
}

/* ---- Q8_0 against several tokens ------------------------------------------------------------------
 * One weight row per pass against nt tokens (as dot_q8), with the per-token work of every block
 * done once per call instead of once per row: the fp32 scale, and for VNNI the activation moved to
 * unsigned (x + 128, a byte XOR), so that vpdpbusd multiplies it with the signed weights directly:
 * lane sum of (x + 128) * w, started from -128 * (lane sum of w), is the exact lane sum of x * w.
 * The AVX2 build keeps maddubs on |w| and sign(x, w), whose pair sums cannot saturate. Both give
 * the row-wise kernel's exact lane integers, so its fp32 order per lane is unchanged. */

/* xu [block][MAXT][32] bytes, dx [block][MAXT]: token t of nt */
static void q8t_prep(const bq8 *x, int64_t nb, int t, uint8_t *xu, float *dx) {
    for (int64_t b = 0; b < nb; b++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)x[b].qs);
#if TILE_VNNI
        v = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
#endif
        _mm256_storeu_si256((__m256i *)(xu + ((size_t)b * MAXT + t) * 32), v);
        dx[b * MAXT + t] = h2f(x[b].d);
    }
}

static ALWAYS_INLINE void q8t_row(const bq8 *w, int64_t nb, const uint8_t *xu, const float *dx, const int NT,
                                  float *out) {
    __m256 acc[MAXT];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        if ((b & 1) == 0) _mm_prefetch((const char *)&w[b + Q8_PF_ROWS * nb], _MM_HINT_T0);
        const __m256i qw = _mm256_loadu_si256((const __m256i *)w[b].qs);
        const __m256 vdw = _mm256_set1_ps(h2f(w[b].d));
#if TILE_VNNI
        const __m256i w128 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)0x80), qw);
        const __m256i init = _mm256_sub_epi32(_mm256_setzero_si256(), w128); /* -128 * lane sum of w */
#else
        const __m256i aw = _mm256_sign_epi8(qw, qw);
#endif
        /* d_w * d_x of all tokens in one multiply, lane t broadcast per token: a shuffle instead of
         * a multiply per token frees the FMA pipes (measured 10%) */
        const __m256 dall = _mm256_mul_ps(vdw, _mm256_loadu_ps(dx + b * MAXT));
        for (int t = 0; t < NT; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xu + ((size_t)b * MAXT + t) * 32));
#if TILE_VNNI
            const __m256i s = _mm256_dpbusd_epi32(init, xv, qw);
#else
            const __m256i s = udot4(aw, _mm256_sign_epi8(xv, qw));
#endif
            const __m256 d = _mm256_permutevar8x32_ps(dall, _mm256_set1_epi32(t));
            acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t] = hsum8(acc[t]);
}

#define Q8T_NT(n) \
    static void q8t_row_##n(const bq8 *w, int64_t nb, const uint8_t *xu, const float *dx, float *out) { \
        q8t_row(w, nb, xu, dx, n, out); }
Q8T_NT(1) Q8T_NT(2) Q8T_NT(3) Q8T_NT(4) Q8T_NT(5) Q8T_NT(6) Q8T_NT(7) Q8T_NT(8)
#undef Q8T_NT
typedef void (*q8t_fn)(const bq8 *, int64_t, const uint8_t *, const float *, float *);
static const q8t_fn q8t_rows_fn[MAXT + 1] = {NULL, q8t_row_1, q8t_row_2, q8t_row_3, q8t_row_4,
                                             q8t_row_5, q8t_row_6, q8t_row_7, q8t_row_8};

/* ys[t][n] for rows n in [n0, n1) of a Q8_0 matrix and nt tokens */
static void q8t_rows(const bq8 *w, int64_t nb, int64_t n0, int64_t n1, const bq8 *const *x, int nt,
                     float *const *ys) {
    enum { STACK_BLOCKS = 128 }; /* k <= 4096 (32 KiB of activations) needs no heap */
    uint8_t xu_s[STACK_BLOCKS * MAXT * 32];
    float dx_s[STACK_BLOCKS * MAXT];
    uint8_t *xu = nb <= STACK_BLOCKS ? xu_s : malloc((size_t)MAXT * 32 * (size_t)nb);
    float *dx = nb <= STACK_BLOCKS ? dx_s : malloc(sizeof(float) * MAXT * (size_t)nb);
    for (int t = 0; t < nt; t++) q8t_prep(x[t], nb, t, xu, dx);
    for (int64_t b = 0; b < nb; b++) /* lanes of absent tokens: multiplied, never used */
        for (int t = nt; t < MAXT; t++) dx[b * MAXT + t] = 0.f;
    const q8t_fn row = q8t_rows_fn[nt];
    float r[MAXT];
    for (int64_t n = n0; n < n1; n++) {
        row(w + n * nb, nb, xu, dx, r);
        for (int t = 0; t < nt; t++) ys[t][n] = r[t];
    }
    if (xu != xu_s) free(xu);
    if (dx != dx_s) free(dx);
}

/* ---- Q6_K against several tokens (VNNI build) -----------------------------------------------------
 * One weight row per pass against nt tokens (as dot_q6k), the super-block unpacked once per pass:
 * the 6-bit values, and the 16-value scales widened by a byte shuffle (instead of building each
 * vector from scalars). Per token, lane l = sum over the 8 chunks of scale * (its 4-value dot)
 * minus the -32 offset 32 * scale * bsum, the same exact integers as dot_q6k. The multiplies are
 * the bound (maddubs, madd, cvt, fma each issue at 2 per cycle): vpdpbusd gives each chunk's
 * 4-value dots (|.| <= 4 * 63 * 127 fits int16), two chunks share a dword as int16 halves, and one
 * vpdpwssd applies both scales and adds, 12 multiplies per token instead of 16; the sum starts
 * from the offset. Measured 1.13x with 8 tokens, 1.16x with one (L2; 1.13-1.24x from DRAM); the
 * AVX2 build (no vpdpwssd, 16 registers) was not faster than dot_q6k and keeps it. */
#if TILE_VNNI
static ALWAYS_INLINE void q6k_unpack(const bq6k *w, __m256i q[8], __m256i scl[4], __m256i *off16) {
    const __m256i low = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; h++) { /* two halves of 128 values: 64 ql bytes, 32 qh bytes */
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h));
        const __m256i l1 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h + 32));
        const __m256i hi = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * h));
        const __m256i lo4[4] = {_mm256_and_si256(l0, low), _mm256_and_si256(l1, low),
                                _mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                                _mm256_and_si256(_mm256_srli_epi16(l1, 4), low)};
        for (int c = 0; c < 4; c++)
            q[4 * h + c] = _mm256_or_si256(
                lo4[c], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 2 * c), three), 4));
    }
    /* The scales as int16 words: each byte goes to the high half of a word (shuffle index 0x80 zeroes
     * the low one) and an arithmetic shift extends its sign. Chunk i uses scale 2i in the low 128
     * bits, 2i+1 in the high ones; chunks 2p, 2p+1 share each dword (vpdpwssd), so scl[p] holds
     * scales 4p, 4p+2 in each low dword and 4p+1, 4p+3 in each high one. */
    const __m128i s8 = _mm_loadu_si128((const __m128i *)w->scales);
    const __m256i sb = _mm256_broadcastsi128_si256(s8);
    for (int i = 0; i < 4; i++) {
        const char a = (char)(4 * i), b = (char)(4 * i + 2), c = (char)(4 * i + 1), d = (char)(4 * i + 3);
        const __m256i ctl = _mm256_setr_epi8(-128, a, -128, b, -128, a, -128, b, -128, a, -128, b, -128, a, -128, b,
                                             -128, c, -128, d, -128, c, -128, d, -128, c, -128, d, -128, c, -128, d);
        scl[i] = _mm256_srai_epi16(_mm256_shuffle_epi8(sb, ctl), 8);
    }
    *off16 = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(s8), _mm256_set1_epi16(-32)); /* |scale * 32| <= 4096 */
}

/* xd [block][MAXT]: the Q8_K scales of the tokens, lanes past nt zero; TILED: llama.cpp's tiled
 * order (cpu_kquants.h) instead of its vec_dot's */
static ALWAYS_INLINE void q6kt_row(const bq6k *w, int64_t nb, const bq8k *const *x, const float *xd, const int NT,
                                   const int TILED, float *out) {
    __m256 acc[MAXT], tacc = _mm256_setzero_ps(); /* tacc: lane t = token t's tiled-order sum */
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i q[8], scl[4], off16, sv[MAXT];
        q6k_unpack(&w[b], q, scl, &off16);
        const __m256 dall = _mm256_mul_ps(_mm256_set1_ps(h2f(w[b].d)), _mm256_loadu_ps(xd + b * MAXT));
#pragma GCC unroll 8 /* measured 6%: the accumulators stay in registers */
        for (int t = 0; t < NT; t++) {
            const bq8k *y = &x[t][b];
            /* lane i (< 4) of each half: groups 2i, 2i+1 of 8, times -32 * scale */
            __m256i s = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)y->bsums), off16);
            for (int p = 0; p < 4; p++) { /* lane l of chunks 2p, 2p+1 as the two int16 halves of a dword */
                const __m256i d0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q[2 * p],
                                                       _mm256_loadu_si256((const __m256i *)(y->qs + 64 * p)));
                const __m256i d1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q[2 * p + 1],
                                                       _mm256_loadu_si256((const __m256i *)(y->qs + 64 * p + 32)));
                s = _mm256_dpwssd_epi32(s, _mm256_blend_epi16(d0, _mm256_slli_epi32(d1, 16), 0xAA), scl[p]);
            }
            if (TILED) {
                sv[t] = s;
                continue;
            }
            const __m256 d = _mm256_permutevar8x32_ps(dall, _mm256_set1_epi32(t));
            acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[t]);
        }
        if (TILED) { /* the tokens' exact sums side by side, lane t = token t (lanes past NT: xd is 0) */
            for (int t = NT; t < MAXT; t++) sv[t] = _mm256_setzero_si256();
            const __m256 res = _mm256_mul_ps(_mm256_cvtepi32_ps(transpose_sum8(sv)), _mm256_set1_ps(h2f(w[b].d)));
            tacc = _mm256_fmadd_ps(res, _mm256_loadu_ps(xd + b * MAXT), tacc);
        }
    }
    if (TILED) {
        float lanes[MAXT];
        _mm256_storeu_ps(lanes, tacc);
        for (int t = 0; t < NT; t++) out[t] = lanes[t];
        return;
    }
    for (int t = 0; t < NT; t++) out[t] = hsum8(acc[t]);
}

#define Q6KT_NT(n) \
    static void q6kt_row_##n(const bq6k *w, int64_t nb, const bq8k *const *x, const float *xd, float *out) { \
        q6kt_row(w, nb, x, xd, n, 0, out); } \
    static void q6kt_tiled_##n(const bq6k *w, int64_t nb, const bq8k *const *x, const float *xd, float *out) { \
        q6kt_row(w, nb, x, xd, n, 1, out); }
Q6KT_NT(1) Q6KT_NT(2) Q6KT_NT(3) Q6KT_NT(4) Q6KT_NT(5) Q6KT_NT(6) Q6KT_NT(7) Q6KT_NT(8)
#undef Q6KT_NT
typedef void (*q6kt_fn)(const bq6k *, int64_t, const bq8k *const *, const float *, float *);
static const q6kt_fn q6kt_rows_fn[2][MAXT + 1] = {
    {NULL, q6kt_row_1, q6kt_row_2, q6kt_row_3, q6kt_row_4, q6kt_row_5, q6kt_row_6, q6kt_row_7, q6kt_row_8},
    {NULL, q6kt_tiled_1, q6kt_tiled_2, q6kt_tiled_3, q6kt_tiled_4, q6kt_tiled_5, q6kt_tiled_6, q6kt_tiled_7,
     q6kt_tiled_8}};

/* ys[t][n] for rows n in [n0, n1) of a Q6_K matrix and nt tokens */
static void q6kt_rows(const bq6k *w, int64_t nb, int64_t n0, int64_t n1, const bq8k *const *x, int nt,
                      float *const *ys, int tiled) {
    enum { STACK_BLOCKS = 64 }; /* k <= 16384 needs no heap */
    float xd_s[STACK_BLOCKS * MAXT];
    float *xd = nb <= STACK_BLOCKS ? xd_s : malloc(sizeof(float) * MAXT * (size_t)nb);
    for (int64_t b = 0; b < nb; b++)
        for (int t = 0; t < MAXT; t++) xd[b * MAXT + t] = t < nt ? x[t][b].d : 0.f;
    const q6kt_fn row = q6kt_rows_fn[tiled][nt];
    float r[MAXT];
    for (int64_t n = n0; n < n1; n++) {
        row(w + n * nb, nb, x, xd, r);
        for (int t = 0; t < nt; t++) ys[t][n] = r[t];
    }
    if (xd != xd_s) free(xd);
}
#endif /* TILE_VNNI */
