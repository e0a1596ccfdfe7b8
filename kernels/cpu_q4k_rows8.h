/* Q4_K matrices that llama.cpp repacks: eight rows at a time, read in the GGUF layout.
 *
 * On an x86 CPU with AVX2, llama.cpp's CPU backend copies every Q4_K weight whose row count is a
 * multiple of 8 (2-D matrices of MUL_MAT and the 3-D expert stacks of MUL_MAT_ID alike) into
 * blocks that interleave 8 rows, and multiplies them 8 rows at a time. Its integer sums are exact,
 * as are emo's, so only the fp32 steps fix the bits. Per row, with I the sum over a super-block's
 * sub-blocks j of scale_j * <q_j, x_j> and M the sum of min_j * (bsums of x over sub-block j), both
 * exact int32:
 *   one token ("gemv" order)   acc  = fma(float(I), d_w * d_x, acc)     once per super-block
 *                              accm = fma(float(M), dmin_w * d_x, accm)
 *   4-token groups ("gemm")    the same two fmas once per PAIR of sub-blocks (I and M restricted
 *                              to sub-blocks 2p, 2p+1), four times per super-block
 *   result                     acc - accm
 * A 2-D matmul of T tokens takes the gemm order for its first T - T % 4 tokens and the gemv order
 * for the rest; expert stacks (MUL_MAT_ID) run every token in the gemv order. The activations are
 * Q8_K in both: the 4-token quantizer may pick the opposite sign for a block whose largest
 * magnitude appears with both signs, which negates q and d together and leaves every product
 * above unchanged, so one conversion serves both orders. An AVX-512 build of llama.cpp runs its
 * gemm 16 rows per 512-bit register and its gemv with the AVX2 code: the same per-row steps.
 * The rows stay where the memory map has them (no repacked copy): each super-block of 8 rows is
 * gathered from 8 row streams, its 8 packed scale sets decoded together with vector ops.
 * Shape legend: nb super-blocks per row (row stride), nt activation rows (<= MAXT), lanes = rows.
 * Included by cpu_dot.h after cpu_kquants.h (bq4k, bq8k, QK, MAXT, transpose_sum8).
 */
#pragma once
#include <immintrin.h>
#include <stdint.h>

#define TY_Q4_K_R (TY_Q4_K | 0x100) /* Q4_K summed like llama.cpp's 8-row repacked kernels */

/* acc + 8 int32 lanes of scale * <q, x> over 32 values (q unsigned nibbles, x int8; exact: every
 * int16 pair sum of maddubs stays below 2 * 15 * 127). A VNNI vpdpwssd in place of madd + add
 * measured no faster, so both builds run this. */
static inline __m256i q4k_scaled_acc(__m256i acc, __m256i q, const int8_t *x, __m256i sc) {
    const __m256i p16 = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, sc));
}

/* a shuffle_epi8 control turning bytes a and b of every dword into its two uint16 halves */
static inline __m256i words_of_bytes(int a, int b) {
    const __m128i base = _mm_setr_epi32(0, 0x00040004, 0x00080008, 0x000C000C); /* 4d in both halves */
    const __m128i ab = _mm_add_epi32(base, _mm_set1_epi32(a | (b << 16)));
    const __m128i ctl = _mm_or_si128(ab, _mm_set1_epi32((int)0x80008000u)); /* odd bytes: 0x80 selects a zero */
    return _mm256_broadcastsi128_si256(ctl);
}

/* one super-block's header (d, dmin, 12 scale bytes) of 8 rows, decoded for the 8-row kernels */
struct q4k_head {
    int32_t sc[8][8]; /* [sub-block][row]: the 6-bit scale in both int16 halves (a madd operand) */
    __m256i mn[4];    /* [sub-block pair p] lane r: row r's mins of sub-blocks 2p, 2p+1 as int16 */
    __m256 d, dmin;   /* lane r: row r's d, dmin */
};

static inline void q4k_head8(const bq4k *w, int64_t nb, struct q4k_head *h) {
    /* the 16 header bytes of rows r and r+4 in one register, then a 4x4 dword transpose per
     * 128-bit half: lane r of dword vector i = dword i of row r */
    __m256i y[4];
    for (int r = 0; r < 4; r++)
        y[r] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)&w[r * nb])),
                                       _mm_loadu_si128((const __m128i *)&w[(r + 4) * nb]), 1);
    const __m256i t0 = _mm256_unpacklo_epi32(y[0], y[1]), t1 = _mm256_unpackhi_epi32(y[0], y[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(y[2], y[3]), t3 = _mm256_unpackhi_epi32(y[2], y[3]);
    const __m256i dd = _mm256_unpacklo_epi64(t0, t2), s0 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i s1 = _mm256_unpacklo_epi64(t1, t3), s2 = _mm256_unpackhi_epi64(t1, t3);
    /* the 6-bit fields, 4 per dword (byte j = sub-block j, or j + 4) */
    const __m256i m6 = _mm256_set1_epi8(0x3F), m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
    const __m256i sc_lo = _mm256_and_si256(s0, m6), mn_lo = _mm256_and_si256(s1, m6);
    const __m256i sc_hi = _mm256_or_si256(_mm256_and_si256(s2, m4),
                                          _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(s0, 6), m2), 4));
    const __m256i mn_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(s2, 4), m4),
                                          _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(s1, 6), m2), 4));
    for (int j = 0; j < 4; j++) { /* byte j of each dword -> both int16 halves */
        const __m256i pick = words_of_bytes(j, j);
        _mm256_storeu_si256((__m256i *)h->sc[j], _mm256_shuffle_epi8(sc_lo, pick));
        _mm256_storeu_si256((__m256i *)h->sc[j + 4], _mm256_shuffle_epi8(sc_hi, pick));
    }
    const __m256i pair0 = words_of_bytes(0, 1), pair1 = words_of_bytes(2, 3);
    h->mn[0] = _mm256_shuffle_epi8(mn_lo, pair0);
    h->mn[1] = _mm256_shuffle_epi8(mn_lo, pair1);
    h->mn[2] = _mm256_shuffle_epi8(mn_hi, pair0);
    h->mn[3] = _mm256_shuffle_epi8(mn_hi, pair1);
    /* fp16 d (low half of dword 0) and dmin (high half) of the 8 rows */
    const __m128i pick = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15); /* d words, dmin words */
    const __m256i split = _mm256_shuffle_epi8(dd, _mm256_broadcastsi128_si256(pick));
    const __m256i ord = _mm256_permute4x64_epi64(split, _MM_SHUFFLE(3, 1, 2, 0));
    h->d = _mm256_cvtph_ps(_mm256_castsi256_si128(ord));
    h->dmin = _mm256_cvtph_ps(_mm256_extracti128_si256(ord, 1));
}

/* the 4 int16 pairs (sums of bsums over sub-blocks 2p, 2p+1) of one Q8_K super-block, each
 * broadcast: madd with q4k_head.mn[p] gives min_2p * s_2p + min_2p+1 * s_2p+1 per row */
static inline void q4k_bsum_pairs(const bq8k *y, __m256i *bp) {
    const __m128i s = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)y->bsums),
                                     _mm_loadu_si128((const __m128i *)(y->bsums + 8)));
    const __m256i s2 = _mm256_broadcastsi128_si256(s);
    bp[0] = _mm256_shuffle_epi32(s2, 0x00);
    bp[1] = _mm256_shuffle_epi32(s2, 0x55);
    bp[2] = _mm256_shuffle_epi32(s2, 0xAA);
    bp[3] = _mm256_shuffle_epi32(s2, 0xFF);
}

/* Eight strided row streams defeat the hardware prefetcher (2-3x slower than one row at a time
 * from DRAM, measured): while super-block b of a group is read, fetch the b-th slice of the group
 * PF_GROUPS ahead, so the next groups arrive as one linear stream. w: the group's first row. Into
 * L2, not L1: the L1 fills then stay free for the loads (one token from DRAM, AVX-512 build, 2
 * threads: 22-23 GB/s against 16-18 with the L1 hint, bench/kernels.py --rows 131072). */
#define PF_GROUPS 2
static inline void prefetch_group(const bq4k *w, int64_t nb, int64_t b) {
    const char *p = (const char *)(w + PF_GROUPS * 8 * nb) + b * 8 * sizeof(bq4k);
    for (int l = 0; l < 8 * (int)sizeof(bq4k); l += 64) _mm_prefetch(p + l, _MM_HINT_T1);
}

/* the decode case: 8 rows against one activation row in the gemv order, kept in registers;
 * pf: the rows PF_GROUPS groups ahead belong to the caller's range (prefetch them) */
static void dot_q4k_rows8_t1(const bq4k *w, int64_t nb, const bq8k *x, float *out, int pf) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    struct q4k_head h;
    for (int64_t b = 0; b < nb; b++) {
        if (pf) prefetch_group(w, nb, b);
        q4k_head8(w + b, nb, &h);
        __m256i s[8];
        for (int r = 0; r < 8; r++) {
            const uint8_t *qs = w[r * nb + b].qs;
            __m256i a = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) { /* 32 bytes: sub-block 2c in the low nibbles, 2c+1 high */
                const __m256i bits = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
                a = q4k_scaled_acc(a, _mm256_and_si256(bits, low), x[b].qs + 64 * c, _mm256_set1_epi32(h.sc[2 * c][r]));
                a = q4k_scaled_acc(a, _mm256_and_si256(_mm256_srli_epi16(bits, 4), low), x[b].qs + 64 * c + 32,
                                   _mm256_set1_epi32(h.sc[2 * c + 1][r]));
            }
            s[r] = a;
        }
        __m256i bp[4];
        q4k_bsum_pairs(&x[b], bp);
        __m256i m = _mm256_madd_epi16(h.mn[0], bp[0]);
        for (int p = 1; p < 4; p++) m = _mm256_add_epi32(m, _mm256_madd_epi16(h.mn[p], bp[p]));
        const __m256 dx = _mm256_set1_ps(x[b].d);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(transpose_sum8(s)), _mm256_mul_ps(h.d, dx), acc);
        accm = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(h.dmin, dx), accm);
    }
    _mm256_storeu_ps(out, _mm256_sub_ps(acc, accm));
}

/* 8 consecutive Q4_K rows (row stride nb super-blocks) against nt activation rows: out[t*8 + r];
 * `pairs`: the gemm order (one fma per pair of sub-blocks) instead of the gemv order; pf as above */
static void dot_q4k_rows8(const bq4k *w, int64_t nb, const bq8k *const *x, int nt, int pairs, float *out, int pf) {
    if (nt == 1 && !pairs) {
        dot_q4k_rows8_t1(w, nb, x[0], out, pf);
        return;
    }
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc[MAXT], accm[MAXT];
    for (int t = 0; t < nt; t++) acc[t] = accm[t] = _mm256_setzero_ps();
    struct q4k_head h;
    __m256i part[MAXT][4][8]; /* [token][sub-block pair][row] 8 int32 lanes still to be summed */
    for (int64_t b = 0; b < nb; b++) {
        if (pf) prefetch_group(w, nb, b);
        q4k_head8(w + b, nb, &h);
        for (int r = 0; r < 8; r++) {
            const uint8_t *qs = w[r * nb + b].qs;
            for (int c = 0; c < 4; c++) {
                const __m256i bits = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
                const __m256i q0 = _mm256_and_si256(bits, low), q1 = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low);
                const __m256i sc0 = _mm256_set1_epi32(h.sc[2 * c][r]), sc1 = _mm256_set1_epi32(h.sc[2 * c + 1][r]);
                for (int t = 0; t < nt; t++) {
                    const int8_t *xq = x[t][b].qs + 64 * c;
                    part[t][c][r] = q4k_scaled_acc(q4k_scaled_acc(_mm256_setzero_si256(), q0, xq, sc0), q1, xq + 32, sc1);
                }
            }
        }
        for (int t = 0; t < nt; t++) {
            __m256i bp[4];
            q4k_bsum_pairs(&x[t][b], bp);
            const __m256 dx = _mm256_set1_ps(x[t][b].d);
            const __m256 dd = _mm256_mul_ps(h.d, dx), dm = _mm256_mul_ps(h.dmin, dx);
            if (pairs) {
                for (int c = 0; c < 4; c++) {
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(transpose_sum8(part[t][c])), dd, acc[t]);
                    accm[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(h.mn[c], bp[c])), dm, accm[t]);
                }
            } else {
                __m256i s[8], m = _mm256_madd_epi16(h.mn[0], bp[0]);
                for (int r = 0; r < 8; r++)
                    s[r] = _mm256_add_epi32(_mm256_add_epi32(part[t][0][r], part[t][1][r]),
                                            _mm256_add_epi32(part[t][2][r], part[t][3][r]));
                for (int p = 1; p < 4; p++) m = _mm256_add_epi32(m, _mm256_madd_epi16(h.mn[p], bp[p]));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(transpose_sum8(s)), dd, acc[t]);
                accm[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), dm, accm[t]);
            }
        }
    }
    for (int t = 0; t < nt; t++) _mm256_storeu_ps(out + 8 * t, _mm256_sub_ps(acc[t], accm[t]));
}
