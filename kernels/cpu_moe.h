/* The routed SwiGLU mixture of emo's CPU kernels (emo_moe), and a decode step's shared expert run
 * in the background while Python routes (shared_expert_start, called by emo_attn_decode). Included by cpu_kernels.c, whose
 * matmul helpers (acts, gemv, rows_per_item, exp_as_ggml) it uses.
 * Shape legend: T tokens, D hidden, F expert width, E experts, S slots per token, P = T*S.
 */
#pragma once

/* ---- public: the routed SwiGLU mixture --------------------------------------------------------- */
/* llama.cpp's SiLU: exp_as_ggml on whole vectors, a correctly rounded expf past the last one */
static inline float silu_vec(float v) { return v / (1.0f + exp_as_ggml(-v)); }
static inline float silu_tail(float v) { return v / (1.0f + expf(-v)); }

struct moe_ctx {
    int64_t T, D, F, S, P;
    const void *const *gate, *const *up, *const *down;
    const int *gtype, *utype, *dtype;
    const int64_t *act, *start, *count; /* active experts; per expert: first sorted position, count */
    int64_t nact, igu, idn;             /* items per expert: gate+up, down */
    int64_t rgu, rdn;                   /* rows per item: gate+up, down */
    struct acts X;                      /* x rows, each token converted once */
    const void **xq[TY_COUNT];          /* [P] per activation type: x row of each sorted position */
    float *g, *u, *out;                 /* [P, F], [P, F], [P, D] */
    uint8_t *hc;                        /* h rows converted for the down weights, stride hstride */
    size_t hstride;
    float **g_rows, **u_rows, **out_rows; /* [P] each: row q of g, u, out */
    const void **h_rows;                  /* [P]: row q of hc */
    const float *weights;
    const int64_t *slot_pos;
    float *y, *norms;
    const float *residual; /* optional [T, D]: y = residual + mixture (llama.cpp adds it last) */
    const int64_t *experts;
    int64_t pre_e;         /* expert whose output for the one token is given (pre_out), or -1 */
    const float *pre_out;  /* [D] */
};

/* gate or up rows [n0, n1) of one expert, for all its tokens */
static void moe_gate_up(void *p, int64_t c) {
    struct moe_ctx *m = p;
    const int64_t e = m->act[c / m->igu], r = c % m->igu, half = m->igu / 2;
    const int is_up = r >= half;
    const int64_t n0 = (r % half) * m->rgu, n1 = n0 + m->rgu < m->F ? n0 + m->rgu : m->F;
    const int ty = is_up ? m->utype[e] : m->gtype[e];
    const int64_t q0 = m->start[e], cnt = m->count[e];
    gemv(ty, (const uint8_t *)(is_up ? m->up[e] : m->gate[e]), m->D, n0, n1, m->xq[act_type(ty)] + q0,
         (is_up ? m->u_rows : m->g_rows) + q0, cnt, m->F, cnt, 0);
}

/* g [F] = silu(g) * u, then converted for down weights of type dtype into hc */
static void swiglu_row(float *g, const float *u, int64_t F, int dtype, uint8_t *hc) {
    const int64_t whole = F - F % ALANES;
    for (int64_t f = 0; f < whole; f++) g[f] = silu_vec(g[f]) * u[f];
    for (int64_t f = whole; f < F; f++) g[f] = silu_tail(g[f]) * u[f];
    convert_row(g, hc, act_type(dtype), F);
}

/* h = silu(g) * u for one expert's positions, converted for its down weights */
static void moe_swiglu(void *p, int64_t i) {
    struct moe_ctx *m = p;
    const int64_t e = m->act[i];
    for (int64_t q = m->start[e]; q < m->start[e] + m->count[e]; q++)
        swiglu_row(m->g + q * m->F, m->u + q * m->F, m->F, m->dtype[e], m->hc + m->hstride * q);
}

static void moe_down(void *p, int64_t c) {
    struct moe_ctx *m = p;
    const int64_t e = m->act[c / m->idn], n0 = (c % m->idn) * m->rdn;
    const int64_t n1 = n0 + m->rdn < m->D ? n0 + m->rdn : m->D;
    const int64_t q0 = m->start[e], cnt = m->count[e];
    gemv(m->dtype[e], (const uint8_t *)m->down[e], m->F, n0, n1, m->h_rows + q0, m->out_rows + q0, cnt, m->D, cnt, 0);
}

/* y[t] = ((w0*o0 + w1*o1) + w2*o2) ... in slot order, like llama.cpp's graph */
static void moe_combine(void *p, int64_t t) {
    struct moe_ctx *m = p;
    float *yt = m->y + t * m->D, *sum = malloc(sizeof(float) * (size_t)m->D);
    for (int64_t d = 0; d < m->D; d++) sum[d] = 0.f;
    for (int64_t s = 0; s < m->S; s++) {
        const float wt = m->weights[t * m->S + s];
        const float *o = m->experts[t * m->S + s] == m->pre_e ? m->pre_out : m->out + m->slot_pos[t * m->S + s] * m->D;
        for (int64_t d = 0; d < m->D; d++) sum[d] += wt * o[d];
        if (m->norms) {
            double acc = 0;
            for (int64_t d = 0; d < m->D; d++) acc += (double)o[d] * o[d];
            m->norms[t * m->S + s] = (float)sqrt(acc);
        }
    }
    const float *res = m->residual ? m->residual + t * m->D : NULL;
    for (int64_t d = 0; d < m->D; d++) yt[d] = res ? res[d] + sum[d] : sum[d];
    free(sum);
}

/* ---- a decode step's shared expert, in the background ------------------------------------------
 * The shared expert needs no routing: emo_attn_decode starts it on the helper threads as soon as the
 * FFN input is known, and returns; Python routes meanwhile (its ~0.1 ms per layer left the memory
 * bus idle), and emo_moe finishes whatever is left and takes the result for the shared slot. The
 * rows are the same dot products in the same order, so the bits are those of computing it inline. */
struct emo_expert { /* one expert's weights, as the Python side passes it */
    const void *gate, *up, *down;
    int gtype, utype, dtype;
    int64_t F, E; /* its width, and the layer's expert count (the shared expert is expert E - 1) */
};

static struct shared_bg {
    struct emo_expert ex;
    const float *x; /* [D] the FFN input it is computed from */
    int64_t D, rgu, half, rdn;
    float *g, *u, *out;      /* [F], [F], [D] */
    uint8_t *xg, *xu, *hc;   /* x for the gate and up types, h for the down type */
    size_t cap_f, cap_d;
    atomic_int_fast64_t gu_done, sw_done;
    int valid; /* a result emo_moe may take, once */
} shared_bg;

static void shared_item(void *p, int64_t i) {
    struct shared_bg *s = p;
    const int64_t F = s->ex.F, D = s->D;
    if (i < 2 * s->half) { /* gate rows, then up rows */
        const int up = i >= s->half;
        const int64_t n0 = (i % s->half) * s->rgu, n1 = n0 + s->rgu < F ? n0 + s->rgu : F;
        const void *xs[1] = {up ? s->xu : s->xg};
        float *ys[1] = {up ? s->u : s->g};
        gemv(up ? s->ex.utype : s->ex.gtype, (const uint8_t *)(up ? s->ex.up : s->ex.gate), D, n0, n1, xs, ys, 1,
             F, 1, 0);
        atomic_fetch_add(&s->gu_done, 1);
    } else if (i == 2 * s->half) { /* items are claimed in order: every gate/up item is being done */
        while (atomic_load(&s->gu_done) < 2 * s->half) _mm_pause();
        swiglu_row(s->g, s->u, F, s->ex.dtype, s->hc);
        atomic_store(&s->sw_done, 1);
    } else {
        while (!atomic_load(&s->sw_done)) _mm_pause();
        const int64_t n0 = (i - 2 * s->half - 1) * s->rdn, n1 = n0 + s->rdn < D ? n0 + s->rdn : D;
        const void *xs[1] = {s->hc};
        float *ys[1] = {s->out};
        gemv(s->ex.dtype, (const uint8_t *)s->ex.down, F, n0, n1, xs, ys, 1, D, 1, 0);
    }
}

/* start expert ex on x [D] (one token) in the background */
static void shared_expert_start(const struct emo_expert *ex, const float *x, int64_t D) {
    async_wait();
    struct shared_bg *s = &shared_bg;
    const int64_t F = ex->F;
    if ((size_t)F > s->cap_f || (size_t)D > s->cap_d) {
        free(s->g), free(s->xg), free(s->xu), free(s->hc), free(s->out);
        s->cap_f = (size_t)F, s->cap_d = (size_t)D;
        s->g = malloc(sizeof(float) * 2 * (size_t)F), s->out = malloc(sizeof(float) * (size_t)D);
        s->xg = malloc(emo_row_bytes(TY_F32, D)), s->xu = malloc(emo_row_bytes(TY_F32, D));
        s->hc = malloc(emo_row_bytes(TY_F32, F));
    }
    s->u = s->g + F;
    s->ex = *ex, s->x = x, s->D = D, s->valid = 1;
    convert_row(x, s->xg, act_type(ex->gtype), D);
    convert_row(x, s->xu, act_type(ex->utype), D);
    s->rgu = rows_per_item(2 * F, 1), s->half = (F + s->rgu - 1) / s->rgu;
    s->rdn = rows_per_item(D, 1);
    atomic_store(&s->gu_done, 0);
    atomic_store(&s->sw_done, 0);
    run_async(shared_item, s, 2 * s->half + 1 + (D + s->rdn - 1) / s->rdn);
}

/* y [T, D] = sum_s weights[t, s] * down[e] (silu(gate[e] x_t) * up[e] x_t),  e = experts[t, s].
 * gate/up/down hold one pointer per expert (rows [F, D] / [D, F] in that expert's type), so the
 * routed experts can live in one stacked GGUF tensor and the shared expert in another.
 * Assignments are grouped by expert (counting sort): every weight row of an active expert is read
 * once per group of MAXT of its tokens. norms [T, S] (optional) receives ||unweighted expert
 * output|| per slot, for profiling; residual [T, D] (optional, may be y itself) is added last.
 * pre_shared: take expert E - 1's output from the background run emo_attn_decode started on this
 * same x (a decode step's shared expert); ignored unless that run is for this layer and input. */
int emo_moe(const float *x, int64_t T, int64_t D, int64_t F, const int64_t *experts, const float *weights,
            int64_t S, int64_t E, const void *const *gate, const void *const *up, const void *const *down,
            const int *gtype, const int *utype, const int *dtype, float *y, float *norms, const float *residual,
            int pre_shared) {
    const int64_t P = T * S;
    if (P <= 0) return 0;
    for (int64_t p = 0; p < P; p++)
        if (experts[p] < 0 || experts[p] >= E) return -1;
    async_wait(); /* the shared expert, when emo_attn_decode started it */
    struct shared_bg *bg = &shared_bg;
    const int64_t pre_e = pre_shared && bg->valid && T == 1 && bg->x == x && bg->ex.E == E && bg->ex.F == F
                          && bg->D == D && bg->ex.gate == gate[E - 1] ? E - 1 : -1;
    bg->valid = 0;
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
    int64_t nact = 0, *act = malloc(sizeof(int64_t) * (size_t)E);
    int types[TY_COUNT], ntypes = 0, seen[TY_COUNT] = {0}; /* distinct activation types the experts need */
    for (int64_t e = 0; e < E; e++)
        if (count[e] && e != pre_e) {
            act[nact++] = e;
            const int ts[2] = {act_type(gtype[e]), act_type(utype[e])};
            for (int i = 0; i < 2; i++)
                if (!seen[ts[i]]) {
                    seen[ts[i]] = 1;
                    types[ntypes++] = ts[i];
                }
        }
    struct moe_ctx m = {.T = T, .D = D, .F = F, .S = S, .P = P, .gate = gate, .up = up, .down = down,
                        .gtype = gtype, .utype = utype, .dtype = dtype, .act = act, .start = start,
                        .count = count, .nact = nact, .weights = weights, .slot_pos = slot_pos,
                        .y = y, .norms = norms, .residual = residual, .experts = experts, .pre_e = pre_e,
                        .pre_out = bg->out};
    m.rgu = rows_per_item(nact * 2 * F, T);
    m.rdn = rows_per_item(nact * D, T);
    m.igu = 2 * ((F + m.rgu - 1) / m.rgu);
    m.idn = (D + m.rdn - 1) / m.rdn;
    acts_build(&m.X, x, D, T, types, ntypes);
    for (int j = 0; j < ntypes; j++) {
        const int a = types[j];
        m.xq[a] = malloc(sizeof(void *) * (size_t)P);
        for (int64_t q = 0; q < P; q++) m.xq[a][q] = m.X.xs[a][pos_tok[q]];
    }
    /* g and u are dead once moe_swiglu has converted h: the expert outputs reuse their memory
     * (a 128-token prefill of the released shapes: 9 MiB less at the peak) */
    const int64_t scratch = 2 * F > D ? 2 * F : D;
    m.g = malloc(sizeof(float) * (size_t)(P * scratch));
    m.u = m.g + P * F;
    m.out = m.g;
    for (int64_t i = 0; i < nact; i++) { /* the widest row of h an active expert's down weights take */
        const size_t b = emo_row_bytes(act_type(dtype[act[i]]), F);
        m.hstride = b > m.hstride ? b : m.hstride;
    }
    m.hc = malloc(m.hstride * (size_t)P);
    m.g_rows = malloc(sizeof(float *) * 3 * (size_t)P);
    m.u_rows = m.g_rows + P, m.out_rows = m.g_rows + 2 * P;
    m.h_rows = malloc(sizeof(void *) * (size_t)P);
    for (int64_t q = 0; q < P; q++) {
        m.g_rows[q] = m.g + q * F, m.u_rows[q] = m.u + q * F, m.out_rows[q] = m.out + q * D;
        m.h_rows[q] = m.hc + m.hstride * (size_t)q;
    }
    run(moe_gate_up, &m, nact * m.igu);
    run(moe_swiglu, &m, nact);
    run(moe_down, &m, nact * m.idn);
    run(moe_combine, &m, T);
    acts_free(&m.X);
    for (int j = 0; j < ntypes; j++) free(m.xq[types[j]]);
    free(count); free(start); free(pos_tok); free(slot_pos); free(act);
    free(m.g); free(m.hc); free(m.g_rows); free(m.h_rows);
    return 0;
}

