/* A small thread pool for emo's CPU kernels: run(fn, ctx, n) calls fn(ctx, i) for i < n on the
 * calling thread and the helpers, and returns when all n items are done.
 *
 * Why not OpenMP: an OpenMP region ends in a barrier that waits for EVERY thread, so on a shared
 * or busy machine one descheduled helper stalls each region for a scheduler quantum (measured:
 * 4 ms for a 0.1 ms matmul), and decode runs ~100 regions per token. Here items are claimed from
 * an atomic counter; a helper that has not woken up simply claims nothing, and the caller does
 * the work itself. Helpers spin briefly between jobs (decode issues them back to back), then sleep
 * on a condition variable.
 */
#pragma once
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#define POOL_MAX 64
#define POOL_SPIN (1 << 15) /* pause iterations before a helper sleeps (~1 ms) */

typedef void (*job_fn)(void *ctx, int64_t item);

struct job {
    job_fn fn;
    void *ctx;
    int64_t n;
    atomic_int_fast64_t next; /* next unclaimed item */
    atomic_int_fast64_t done; /* items finished */
};

static struct {
    int nth; /* threads including the caller */
    pthread_t th[POOL_MAX];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_mutex_t run_mu;     /* one job at a time, if several Python threads call the kernels */
    atomic_uint gen;            /* bumped for every job */
    struct job *_Atomic job;    /* the current job, NULL between jobs */
    atomic_int busy;            /* helpers that may hold a pointer to the current job */
    atomic_int sleeping;
    atomic_int stop;
} pool = {.nth = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER,
        .run_mu = PTHREAD_MUTEX_INITIALIZER};

static void pool_work(struct job *j) {
    int64_t i;
    while ((i = atomic_fetch_add(&j->next, 1)) < j->n) {
        j->fn(j->ctx, i);
        atomic_fetch_add(&j->done, 1);
    }
}

static void *pool_helper(void *arg) {
    (void)arg;
    unsigned seen = atomic_load(&pool.gen);
    for (;;) {
        int spins = 0;
        while (atomic_load(&pool.gen) == seen) {
            if (atomic_load(&pool.stop)) return NULL;
            if (++spins < POOL_SPIN) {
                _mm_pause();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleeping, 1);
            while (atomic_load(&pool.gen) == seen && !atomic_load(&pool.stop)) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.mu);
            spins = 0;
        }
        seen = atomic_load(&pool.gen);
        atomic_fetch_add(&pool.busy, 1);
        struct job *j = atomic_load(&pool.job);
        if (j) pool_work(j);
        atomic_fetch_sub(&pool.busy, 1);
    }
}

static void pool_stop(void) {
    if (pool.nth <= 1) return;
    atomic_store(&pool.stop, 1);
    pthread_mutex_lock(&pool.mu);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    for (int i = 1; i < pool.nth; i++) pthread_join(pool.th[i], NULL);
    atomic_store(&pool.stop, 0);
    pool.nth = 1;
}

static void pool_start(int n) {
    if (n == pool.nth) return;
    pool_stop();
    n = n < 1 ? 1 : (n > POOL_MAX ? POOL_MAX : n);
    for (int i = 1; i < n; i++) pthread_create(&pool.th[i], NULL, pool_helper, NULL);
    pool.nth = n;
}

/* make j the current job and wake the helpers (caller holds run_mu) */
static void pool_post(struct job *j) {
    atomic_store(&pool.job, j);
    atomic_fetch_add(&pool.gen, 1);
    if (atomic_load(&pool.sleeping)) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
}

/* ---- one job in the background ---------------------------------------------------------------
 * run_async posts a job to the helpers and returns at once, so the caller can go back to Python
 * (a decode step routes there) while the memory bus keeps streaming weights. Its items must not
 * call run(). Any later run() first finishes it (async_wait), the caller working through what is
 * left, so a job posted and never waited for is still completed before anything else runs. */
static struct job async_job;
static atomic_int async_live;

static void async_wait(void) {
    if (!atomic_load(&async_live)) return;
    pthread_mutex_lock(&pool.run_mu);
    pool_work(&async_job);
    while (atomic_load(&async_job.done) < async_job.n) _mm_pause();
    atomic_store(&pool.job, NULL);
    while (atomic_load(&pool.busy)) _mm_pause();
    atomic_store(&async_live, 0);
    pthread_mutex_unlock(&pool.run_mu);
}

/* how many items of the background job are finished: its phases wait on this */
static int64_t async_done(void) { return atomic_load(&async_job.done); }

static void run_async(job_fn fn, void *ctx, int64_t n) {
    async_wait();
    if (n <= 0) return;
    if (pool.nth <= 1) { /* no helper to hand it to */
        for (int64_t i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&pool.run_mu);
    async_job.fn = fn, async_job.ctx = ctx, async_job.n = n;
    atomic_store(&async_job.next, 0);
    atomic_store(&async_job.done, 0);
    atomic_store(&async_live, 1);
    pool_post(&async_job);
    pthread_mutex_unlock(&pool.run_mu);
}

static void run(job_fn fn, void *ctx, int64_t n) {
    async_wait();
    if (n <= 0) return;
    if (pool.nth <= 1 || n == 1) {
        for (int64_t i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&pool.run_mu);
    struct job j = {.fn = fn, .ctx = ctx, .n = n};
    atomic_init(&j.next, 0);
    atomic_init(&j.done, 0);
    pool_post(&j);
    pool_work(&j);
    while (atomic_load(&j.done) < n) _mm_pause(); /* items a helper claimed and is finishing */
    atomic_store(&pool.job, NULL);
    while (atomic_load(&pool.busy)) _mm_pause(); /* no helper may still see &j when we return */
    pthread_mutex_unlock(&pool.run_mu);
}
