/* Lamina's CPU kernels: block-quantised matrix products and a fused Llama decode step (quantised or float weights).
 *
 * Built on first use by lamina.llm.kernels.native (cc -O3 -march=native -pthread) and loaded with ctypes; no
 * Python or PyTorch headers, so it compiles in about a second. The kernels run on their own team of threads
 * (below), not on OpenMP's: see "the thread team".
 *
 * Weight blocks (32 inputs each) are llama.cpp's Q4_1 and Q8_0:
 *   Q4: { fp16 d; fp16 m; u8 qs[16] }  w[j] = d * q[j] + m, q[j] = qs[j] & 15 (j < 16), qs[j - 16] >> 4
 *   Q8: { fp16 d; i8 qs[32] }          w[j] = d * qs[j]
 * and are kept in tiles of NR = 16 output rows (lamina.llm.kernels.native.tile_blocks lays them out): for
 * each block column b, the 16 rows' d (16 fp16), for Q4 their m (16 fp16), then the quants in chunks of 64
 * bytes, chunk c holding 4 bytes of each row (row r at bytes 4r..4r+3). Q4 has 4 chunks, chunk c being bytes
 * qs[4c..4c+3] of every row (low nibbles: inputs 4c..4c+3, high nibbles: inputs 16+4c..16+4c+3); Q8 has 8,
 * chunk g being inputs 4g..4g+3. A tile's blocks follow each other, then the next tile's; the last tile is
 * padded with zero rows. So one vector load holds 4 inputs of 16 rows, and each 4 activation bytes, broadcast,
 * meet 16 rows in one integer dot instruction: no horizontal sums, 16 outputs per accumulator.
 *
 * Activations are quantised per row in blocks of 32 to int8 with a float scale (with the block's integer sum
 * and scaled sum, for Q4's offset and the Q8 trick below), so each block's dot product is an integer dot
 * product of u8 x s8 pairs summed into int32: AVX-512 VNNI's vpdpbusd on zmm where the CPU has it, AVX-VNNI's
 * on ymm, AVX2's vpmaddubsw + vpmaddwd otherwise (no pair can saturate: Q4 quants are at most 15, and Q8
 * goes through |w| and sign(x, w) there). VNNI runs Q8 as unsigned (w + 128) and takes 128 * sum(x) back off.
 *
 * Every path sums each block's integer products exactly and then does the same float operations in the same
 * order for each (row, output): so a sequence's result does not depend on what it is batched with, and the
 * AVX2, AVX-VNNI and AVX-512 builds give the same bits.
 *
 * The entry points that allocate return LAM_OK or an error code (the Python side raises on anything
 * else), and free what they allocated on every path.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>

#define QK 32
#define NR 16 /* output rows per weight tile */
#define KV_CHUNK 128 /* positions per attention work unit */
#define MAX_HEAD_DIM 512 /* the largest head the decode step takes */
enum { FMT_Q4 = 4, FMT_Q8 = 8, FMT_BF16 = 16, FMT_F32 = 32 };

/* Return codes, mirrored in lamina.llm.kernels.native (LAM_OK ...). */
enum { LAM_OK = 0, LAM_ERR_RANGE = 1, LAM_ERR_NOMEM = 2, LAM_ERR_CONFIG = 3 };

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LAM_AVX512 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LAM_VNNI 1
#define LAM_VNNI256(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define LAM_VNNI 1
#define LAM_VNNI256(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif

/* Which integer-dot path this build runs (lamina info shows it). */
const char *lam_isa(void) {
#if defined(LAM_AVX512) && defined(LAM_VNNI)
    return "avx512-vnni";
#elif defined(LAM_AVX512)
    return "avx512";
#elif defined(LAM_VNNI)
    return "avx2-vnni";
#else
    return "avx2";
#endif
}

static inline int block_bytes(int fmt) { return fmt == FMT_Q4 ? 20 : fmt == FMT_Q8 ? 34 : fmt == FMT_BF16 ? 2 * QK : 4 * QK; }
static inline size_t row_bytes_of(int fmt, int K) { return (size_t)(K / QK) * block_bytes(fmt); }
static inline int tiles_of(int N) { return (N + NR - 1) / NR; }
/* Tile t of a weight with K inputs: tiled blocks and row-major float rows have the same bytes per tile. */
static inline const uint8_t *tile_at(const uint8_t *w, int fmt, int K, int t) { return w + (size_t)t * NR * row_bytes_of(fmt, K); }

static inline float f16_to_f32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 8 sums of a[0..7]'s lanes, in order (sum p = a[p]'s 8 lanes added pairwise: the same as a lane order
 * independent of p, so one position's score never depends on its neighbours). */
static inline __m256 hsum8x8(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* e^x for 8 floats (x <= 88): Cephes' expf, a degree-5 polynomial on x - n ln2, within 2 ulp. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* 8 floats from float32 or bfloat16 memory. */
static inline __m256 load8(const void *p, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p);
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline int32_t load32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Weights are read once per step, in one stream per thread through consecutive tiles (or rows); the
 * hardware prefetchers alone keep too few lines in flight for such short streams (each phase of a step
 * reads 50-500 KB per thread, then meets at a barrier). So each block asks for the bytes PREFETCH_AHEAD
 * past it: on a 2-core Intel Xeon (AVX-512) that took a batch-1 int4 step from 5.0 ms to 3.1 ms; 1 KB
 * ahead gained half as much, 8 and 16 KB slightly less. Past the end of a weight it asks for bytes that
 * are never read, which costs a few lines and cannot fault (a prefetch never does). */
#define PREFETCH_AHEAD 4096
static inline void prefetch_ahead(const void *p, int bytes) {
    for (int l = 0; l < bytes; l += 64) _mm_prefetch((const char *)p + PREFETCH_AHEAD + l, _MM_HINT_T0);
}

/* ---- the thread team ------------------------------------------------------------------------------------
 *
 * A call runs one job on `nth` threads: the caller as thread 0 and nth - 1 workers of a team, which meet at
 * spinning barriers between the job's phases (a decode step has about 11 per layer). Why not OpenMP: libgomp
 * keeps one pool per thread that ever opened a parallel region, and once the pools together hold more
 * threads than there are cores (PyTorch's pool on the main thread and another on the engine's worker thread
 * are enough on 2 cores) it throttles every barrier's spinning to a few microseconds and then sleeps in the
 * kernel: a decode step's 330 barriers then each cost a futex wake. A team spins at its barriers whatever
 * else the process holds, and its idle workers spin only briefly (IDLE_SPIN_NS) before they sleep on a futex,
 * so PyTorch's own threads get the cores back between steps.
 *
 * Teams come from a free list: concurrent callers (two engines in one process) get a team each, and one
 * caller reuses the same team and threads call after call. Work is split by static shares, so which thread
 * computes what depends only on (n, nth), and no result depends on it: each output is computed whole by one
 * thread in a fixed order. */
#define MAX_THREADS 256
#define IDLE_SPIN_NS 30000    /* an idle worker spins this long for the next job before it sleeps (the gaps between
                                 * the PyTorch path's matmuls, not the Python between engine steps: the cores go back) */
#define BARRIER_SPIN_NS 50000 /* a thread at a barrier spins this long before it yields its core between checks */

struct Team;
/* What a thread of a job knows of itself: its number, the job's thread count, its team (NULL alone). */
typedef struct {
    struct Team *team;
    int tid, nth;
} Me;

typedef void (*JobFn)(void *ctx, const Me *me);

typedef struct Team {
    _Atomic uint32_t job; /* (sequence << 8) | nth of the latest job: the workers' futex word */
    _Atomic int sleepers; /* workers asleep (or about to be) on `job` */
    _Atomic int done;     /* workers that finished the current job */
    _Atomic int bar_count;
    _Atomic uint32_t bar_gen;
    JobFn fn;
    void *ctx;
    int n_workers;
    struct Team *next; /* in the free list */
} Team;

typedef struct {
    Team *team;
    int id;        /* 1 .. n_workers */
    uint32_t seen; /* the team's job word when the worker was made: it waits for the next one */
} Worker;

static pthread_mutex_t teams_lock = PTHREAD_MUTEX_INITIALIZER;
static Team *free_teams;

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A wait: spin (pause) until `budget_ns` have passed, then yield the core at every check (`yielding`). */
typedef struct {
    int spins, yielding;
    int64_t since;
} Spin;

static inline void spin(Spin *w, int64_t budget_ns) {
    _mm_pause();
    if (w->yielding) {
        sched_yield();
        return;
    }
    if ((++w->spins & 63) == 0) {
        const int64_t t = now_ns();
        if (w->since == 0) w->since = t;
        else if (t - w->since > budget_ns) w->yielding = 1;
    }
}

static void *worker_main(void *arg) {
    Worker w = *(Worker *)arg;
    free(arg);
    Team *t = w.team;
    uint32_t seen = w.seen;
    for (;;) {
        uint32_t job;
        Spin wait = {0};
        while ((job = atomic_load_explicit(&t->job, memory_order_acquire)) == seen) {
            spin(&wait, IDLE_SPIN_NS);
            if (wait.yielding) { /* idle for a while: sleep until the next job (Dekker with run_job's store and load) */
                atomic_fetch_add(&t->sleepers, 1);
                if (atomic_load(&t->job) == seen) syscall(SYS_futex, &t->job, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                atomic_fetch_sub(&t->sleepers, 1);
                wait = (Spin){0};
            }
        }
        seen = job;
        const int nth = (int)(job & 255);
        if (w.id < nth) {
            const Me me = {t, w.id, nth};
            t->fn(t->ctx, &me);
            atomic_fetch_add_explicit(&t->done, 1, memory_order_release);
        }
    }
    return NULL;
}

static void teams_after_fork(void) { /* a forked child has none of the workers: it starts new teams */
    free_teams = NULL;
    pthread_mutex_init(&teams_lock, NULL);
}

static void teams_init(void) { pthread_atfork(NULL, NULL, teams_after_fork); }

static Team *team_acquire(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, teams_init);
    pthread_mutex_lock(&teams_lock);
    Team *t = free_teams;
    if (t) free_teams = t->next;
    pthread_mutex_unlock(&teams_lock);
    if (!t) t = calloc(1, sizeof *t);
    return t;
}

static void team_release(Team *t) {
    pthread_mutex_lock(&teams_lock);
    t->next = free_teams;
    free_teams = t;
    pthread_mutex_unlock(&teams_lock);
}

/* The threads meet: none returns before all nth have arrived; writes before it are seen by all after it. */
static void barrier(const Me *me) {
    Team *t = me->team;
    const int nth = me->nth;
    if (nth == 1) return;
    const uint32_t gen = atomic_load_explicit(&t->bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&t->bar_count, 1, memory_order_acq_rel) == nth - 1) {
        atomic_store_explicit(&t->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&t->bar_gen, 1, memory_order_release);
        return;
    }
    Spin wait = {0};
    while (atomic_load_explicit(&t->bar_gen, memory_order_acquire) == gen) spin(&wait, BARRIER_SPIN_NS);
}

/* Run fn(ctx, me) on `threads` threads (me->tid 0 .. nth-1, the caller being 0); returns once all have
 * returned. Fewer threads run if workers cannot be started (no job's results depend on nth). */
static void run_job(JobFn fn, void *ctx, int threads) {
    int nth = threads < 1 ? 1 : threads > MAX_THREADS - 1 ? MAX_THREADS - 1 : threads;
    Team *t = nth > 1 ? team_acquire() : NULL;
    if (!t) {
        const Me me = {NULL, 0, 1};
        fn(ctx, &me);
        return;
    }
    while (t->n_workers < nth - 1) {
        Worker *w = malloc(sizeof *w);
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (w) *w = (Worker){t, t->n_workers + 1, atomic_load(&t->job)};
        const int failed = !w || pthread_create(&th, &attr, worker_main, w);
        pthread_attr_destroy(&attr);
        if (failed) {
            free(w);
            break;
        }
        t->n_workers++;
    }
    if (nth - 1 > t->n_workers) nth = t->n_workers + 1;
    t->fn = fn, t->ctx = ctx;
    atomic_store(&t->done, 0);
    const uint32_t seq = (atomic_load(&t->job) >> 8) + 1;
    atomic_store(&t->job, (seq << 8) | (uint32_t)nth);
    if (atomic_load(&t->sleepers) > 0) syscall(SYS_futex, &t->job, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
    const Me me = {t, 0, nth};
    fn(ctx, &me);
    Spin wait = {0};
    while (atomic_load_explicit(&t->done, memory_order_acquire) < nth - 1) spin(&wait, BARRIER_SPIN_NS);
    team_release(t);
}

/* This thread's share [share_lo, share_hi) of n items: contiguous, as OpenMP's schedule(static). */
static inline int share_lo(const Me *me, int n) {
    const int q = n / me->nth, r = n % me->nth;
    return me->tid * q + (me->tid < r ? me->tid : r);
}
static inline int share_hi(const Me *me, int n) { return share_lo(me, n) + n / me->nth + (me->tid < n % me->nth); }

/* A loop over this thread's share of 0 .. n-1; OpenMP's `omp for` is FOR_SHARE(me, i, n) { ... } barrier(me); */
#define FOR_SHARE(me, i, n) for (int i##_hi_ = share_hi(me, n), i = share_lo(me, n); i < i##_hi_; i++)

/* ---- activations ------------------------------------------------------------------------------------ */

/* One row x (K floats) -> int8 qa (K): block b's scale goes to da[b * ld], its integer sum to si[b * ld] and
 * the scaled sum to sa[b * ld]. Rounding is to nearest even (vcvtps2dq under the default MXCSR). */
static void quantize_row(const float *x, int K, int8_t *qa, float *da, float *sa, int32_t *si, size_t ld) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float d = _mm_cvtss_f32(m4) / 127.0f;
        const __m256 id = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
        const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
        const int32_t sum = _mm_cvtsi128_si32(s);
        /* packs work within 128-bit lanes: the dwords come out as q0 q1 q2 q3 (low halves), then the high ones */
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(qa + b * QK), _mm256_permutevar8x32_epi32(p, order));
        da[b * ld] = d;
        si[b * ld] = sum;
        sa[b * ld] = d * (float)sum;
    }
}

/* M quantised activation rows: q row-major (M x K); scales and sums block-major (K/32 x ld). */
typedef struct {
    int8_t *q;
    float *d, *s;
    int32_t *si;
    int K;
    size_t ld;
    const float *f; /* the float rows themselves (row stride ldf), for float weights */
    size_t ldf;
} Act;

static void act_free(Act *a) {
    free(a->q);
    free(a->d);
    free(a->s);
    free(a->si);
}

/* LAM_OK or LAM_ERR_NOMEM; either way act_free releases what was allocated. */
static int act_alloc(Act *a, int M, int K) {
    a->K = K;
    a->ld = (size_t)M;
    a->q = aligned_alloc(64, ((size_t)M * K + 63) / 64 * 64 + 64);
    a->d = calloc((size_t)(K / QK) * a->ld + 1, sizeof(float)); /* (+1: never a request for 0 bytes) */
    a->s = calloc((size_t)(K / QK) * a->ld + 1, sizeof(float));
    a->si = calloc((size_t)(K / QK) * a->ld + 1, sizeof(int32_t));
    a->f = NULL;
    a->ldf = (size_t)K;
    return a->q && a->d && a->s && a->si ? LAM_OK : LAM_ERR_NOMEM;
}

static inline void act_quantize(const Act *a, const float *x, int m, int ldx) {
    quantize_row(x + (size_t)m * ldx, a->K, a->q + (size_t)m * a->K, a->d + m, a->s + m, a->si + m, a->ld);
}

/* ---- float weights: one row at a time ----------------------------------------------------------------- */

#define MT 3 /* activation rows per pass over a float weight row (4 accumulators each: 12 registers) */

/* out[t * ldo] = dot(float weight row, activation row m0 + t) for t < MTC (a constant after inlining). Every
 * row sums in four chains (k mod 32 in [0,8), [8,16), ...) added as (c0 + c1) + (c2 + c3), then the tail:
 * the same operations whatever MTC is, so float weights are batch-invariant too. */
#ifdef LAM_AVX512
/* 16 floats from float32 or bfloat16 memory. */
static inline __m512 load16(const void *p, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)p);
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

static inline __attribute__((always_inline)) void float_tile(int bf, const uint8_t *row, const Act *a, int m0, const int MTC, float *out, int ldo) {
    const float *xf = a->f + (size_t)m0 * a->ldf;
    const size_t es = bf ? 2 : 4;
    __m256 sum[MT];
    int k = 0;
#ifdef LAM_AVX512 /* the same four chains, two to a register: chains 0|1 in c01's halves, 2|3 in c23's */
    __m512 c01[MT], c23[MT];
    for (int t = 0; t < MTC; t++) c01[t] = c23[t] = _mm512_setzero_ps();
    for (; k + 32 <= a->K; k += 32) {
        prefetch_ahead(row + (size_t)k * es, 32 * es);
        const __m512 w01 = load16(row + (size_t)k * es, bf), w23 = load16(row + (size_t)(k + 16) * es, bf);
        for (int t = 0; t < MTC; t++) {
            const float *x = xf + (size_t)t * a->ldf + k;
            c01[t] = _mm512_fmadd_ps(w01, _mm512_loadu_ps(x), c01[t]);
            c23[t] = _mm512_fmadd_ps(w23, _mm512_loadu_ps(x + 16), c23[t]);
        }
    }
    for (int t = 0; t < MTC; t++)
        sum[t] = _mm256_add_ps(_mm256_add_ps(_mm512_castps512_ps256(c01[t]), _mm512_extractf32x8_ps(c01[t], 1)),
                               _mm256_add_ps(_mm512_castps512_ps256(c23[t]), _mm512_extractf32x8_ps(c23[t], 1)));
#else
    __m256 c0[MT], c1[MT], c2[MT], c3[MT];
    for (int t = 0; t < MTC; t++) c0[t] = c1[t] = c2[t] = c3[t] = _mm256_setzero_ps();
    for (; k + 32 <= a->K; k += 32) {
        prefetch_ahead(row + (size_t)k * es, 32 * es);
        const __m256 w0 = load8(row + (size_t)k * es, bf), w1 = load8(row + (size_t)(k + 8) * es, bf);
        const __m256 w2 = load8(row + (size_t)(k + 16) * es, bf), w3 = load8(row + (size_t)(k + 24) * es, bf);
        for (int t = 0; t < MTC; t++) {
            const float *x = xf + (size_t)t * a->ldf + k;
            c0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), c0[t]);
            c1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), c1[t]);
            c2[t] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + 16), c2[t]);
            c3[t] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + 24), c3[t]);
        }
    }
    for (int t = 0; t < MTC; t++) sum[t] = _mm256_add_ps(_mm256_add_ps(c0[t], c1[t]), _mm256_add_ps(c2[t], c3[t]));
#endif
    for (int t = 0; t < MTC; t++) {
        __m256 acc = sum[t];
        for (int j = k; j < a->K; j += 8) acc = _mm256_fmadd_ps(load8(row + (size_t)j * es, bf), _mm256_loadu_ps(xf + (size_t)t * a->ldf + j), acc);
        out[(size_t)t * ldo] = hsum256(acc);
    }
}

/* out[(m - m0) * ldo] = dot(float weight row, activation row m) for m0 <= m < m1. */
static void float_rows(int fmt, const uint8_t *row, const Act *a, int m0, int m1, float *out, int ldo) {
    const int bf = fmt == FMT_BF16;
    int m = m0;
    for (; m + MT <= m1; m += MT) float_tile(bf, row, a, m, MT, out + (size_t)(m - m0) * ldo, ldo);
    float *o = out + (size_t)(m - m0) * ldo;
    if (m1 - m == 2) float_tile(bf, row, a, m, 2, o, ldo);
    else if (m1 - m == 1) float_tile(bf, row, a, m, 1, o, ldo);
}

/* ---- quantised weights: one tile of 16 rows at a time ---------------------------------------------------- */

#ifdef LAM_AVX512
#define RT 8 /* activation rows per pass over a tile (then 4, 2, 1 for the rest) */

static inline __m512i dot512(__m512i acc, __m512i u, __m512i s) {
#ifdef LAM_VNNI
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

/* y[t * NR + r] = tile row r . activation row m0 + t, t < R (a constant after inlining). */
static inline __attribute__((always_inline)) void q4_tile(const uint8_t *tile, const Act *a, int m0, const int R, float *y) {
    const int nb = a->K / QK;
    const __m512i mask = _mm512_set1_epi8(15);
    __m512 acc[RT];
    for (int t = 0; t < R; t++) acc[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *tb = tile + (size_t)b * NR * 20;
        prefetch_ahead(tb, NR * 20);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)tb));
        const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(tb + 32)));
        __m512i s[RT];
        for (int t = 0; t < R; t++) s[t] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const __m512i raw = _mm512_loadu_si512(tb + 64 + 64 * c);
            const __m512i lo = _mm512_and_si512(raw, mask), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
            for (int t = 0; t < R; t++) {
                const int8_t *xq = a->q + (size_t)(m0 + t) * a->K + b * QK;
                s[t] = dot512(s[t], lo, _mm512_set1_epi32(load32(xq + 4 * c)));
                s[t] = dot512(s[t], hi, _mm512_set1_epi32(load32(xq + 16 + 4 * c)));
            }
        }
        for (int t = 0; t < R; t++) {
            const size_t at = (size_t)b * a->ld + m0 + t;
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), _mm512_mul_ps(d, _mm512_set1_ps(a->d[at])), acc[t]);
            acc[t] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a->s[at]), acc[t]);
        }
    }
    for (int t = 0; t < R; t++) _mm512_storeu_ps(y + t * NR, acc[t]);
}

static inline __attribute__((always_inline)) void q8_tile(const uint8_t *tile, const Act *a, int m0, const int R, float *y) {
    const int nb = a->K / QK;
    __m512 acc[RT];
    for (int t = 0; t < R; t++) acc[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *tb = tile + (size_t)b * NR * 34;
        prefetch_ahead(tb, NR * 34);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)tb));
        __m512i s[RT];
        for (int t = 0; t < R; t++) s[t] = _mm512_setzero_si512();
        for (int g = 0; g < 8; g++) {
            const __m512i w = _mm512_loadu_si512(tb + 32 + 64 * g);
#ifdef LAM_VNNI
            const __m512i wu = _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80)); /* w + 128, as unsigned */
            for (int t = 0; t < R; t++) {
                const int8_t *xq = a->q + (size_t)(m0 + t) * a->K + b * QK;
                s[t] = dot512(s[t], wu, _mm512_set1_epi32(load32(xq + 4 * g)));
            }
#else
            const __m512i wa = _mm512_abs_epi8(w);
            const __mmask64 neg = _mm512_movepi8_mask(w);
            for (int t = 0; t < R; t++) {
                const int8_t *xq = a->q + (size_t)(m0 + t) * a->K + b * QK;
                const __m512i x = _mm512_set1_epi32(load32(xq + 4 * g));
                s[t] = dot512(s[t], wa, _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x));
            }
#endif
        }
        for (int t = 0; t < R; t++) {
            const size_t at = (size_t)b * a->ld + m0 + t;
#ifdef LAM_VNNI
            s[t] = _mm512_sub_epi32(s[t], _mm512_set1_epi32(a->si[at] * 128));
#endif
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), _mm512_mul_ps(d, _mm512_set1_ps(a->d[at])), acc[t]);
        }
    }
    for (int t = 0; t < R; t++) _mm512_storeu_ps(y + t * NR, acc[t]);
}

#else /* AVX2: each tile as two halves of 8 rows */
#define RT 2

static inline __m256i dot256(__m256i acc, __m256i u, __m256i s) {
#ifdef LAM_VNNI
    return LAM_VNNI256(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

static inline __attribute__((always_inline)) void q4_half(const uint8_t *tile, int h, const Act *a, int m0, const int R, float *y) {
    const int nb = a->K / QK;
    const __m256i mask = _mm256_set1_epi8(15);
    __m256 acc[RT];
    for (int t = 0; t < R; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *tb = tile + (size_t)b * NR * 20;
        if (h == 0) prefetch_ahead(tb, NR * 20); /* (the second half finds the tile in L1) */
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tb + 16 * h)));
        const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tb + 32 + 16 * h)));
        __m256i s[RT];
        for (int t = 0; t < R; t++) s[t] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(tb + 64 + 64 * c + 32 * h));
            const __m256i lo = _mm256_and_si256(raw, mask), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
            for (int t = 0; t < R; t++) {
                const int8_t *xq = a->q + (size_t)(m0 + t) * a->K + b * QK;
                s[t] = dot256(s[t], lo, _mm256_set1_epi32(load32(xq + 4 * c)));
                s[t] = dot256(s[t], hi, _mm256_set1_epi32(load32(xq + 16 + 4 * c)));
            }
        }
        for (int t = 0; t < R; t++) {
            const size_t at = (size_t)b * a->ld + m0 + t;
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), _mm256_mul_ps(d, _mm256_set1_ps(a->d[at])), acc[t]);
            acc[t] = _mm256_fmadd_ps(mn, _mm256_set1_ps(a->s[at]), acc[t]);
        }
    }
    for (int t = 0; t < R; t++) _mm256_storeu_ps(y + t * NR + 8 * h, acc[t]);
}

static inline __attribute__((always_inline)) void q8_half(const uint8_t *tile, int h, const Act *a, int m0, const int R, float *y) {
    const int nb = a->K / QK;
    __m256 acc[RT];
    for (int t = 0; t < R; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *tb = tile + (size_t)b * NR * 34;
        if (h == 0) prefetch_ahead(tb, NR * 34);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tb + 16 * h)));
        __m256i s[RT];
        for (int t = 0; t < R; t++) s[t] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(tb + 32 + 64 * g + 32 * h));
#ifdef LAM_VNNI
            const __m256i wu = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)); /* w + 128, as unsigned */
            for (int t = 0; t < R; t++) {
                const int8_t *xq = a->q + (size_t)(m0 + t) * a->K + b * QK;
                s[t] = dot256(s[t], wu, _mm256_set1_epi32(load32(xq + 4 * g)));
            }
#else
            const __m256i wa = _mm256_sign_epi8(w, w);
            for (int t = 0; t < R; t++) {
                const int8_t *xq = a->q + (size_t)(m0 + t) * a->K + b * QK;
                s[t] = dot256(s[t], wa, _mm256_sign_epi8(_mm256_set1_epi32(load32(xq + 4 * g)), w));
            }
#endif
        }
        for (int t = 0; t < R; t++) {
            const size_t at = (size_t)b * a->ld + m0 + t;
#ifdef LAM_VNNI
            s[t] = _mm256_sub_epi32(s[t], _mm256_set1_epi32(a->si[at] * 128));
#endif
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), _mm256_mul_ps(d, _mm256_set1_ps(a->d[at])), acc[t]);
        }
    }
    for (int t = 0; t < R; t++) _mm256_storeu_ps(y + t * NR + 8 * h, acc[t]);
}

static inline __attribute__((always_inline)) void q4_tile(const uint8_t *tile, const Act *a, int m0, const int R, float *y) {
    q4_half(tile, 0, a, m0, R, y);
    q4_half(tile, 1, a, m0, R, y);
}

static inline __attribute__((always_inline)) void q8_tile(const uint8_t *tile, const Act *a, int m0, const int R, float *y) {
    q8_half(tile, 0, a, m0, R, y);
    q8_half(tile, 1, a, m0, R, y);
}
#endif

/* y[(m - m0) * NR + r] = weight row (tile start + r) . activation row m, for m0 <= m < m1 and r < nr. `tile`
 * is tile_at(...): NR rows of tiled blocks (all NR computed; padding rows give 0) or nr float rows. */
static void tile_dot(int fmt, const uint8_t *tile, int nr, const Act *a, int m0, int m1, float *y) {
    if (fmt == FMT_F32 || fmt == FMT_BF16) {
        const size_t rb = row_bytes_of(fmt, a->K);
        for (int r = 0; r < nr; r++) float_rows(fmt, tile + r * rb, a, m0, m1, y + r, NR);
        return;
    }
    int m = m0;
    /* RT rows a pass, then the rest in halving groups (each row's arithmetic is the same in any group) */
#define LAM_ROWS(kernel)                                                                                  \
    for (; m + RT <= m1; m += RT) kernel(tile, a, m, RT, y + (size_t)(m - m0) * NR);                        \
    if (RT > 4 && m + 4 <= m1) kernel(tile, a, m, RT > 4 ? 4 : 1, y + (size_t)(m - m0) * NR), m += RT > 4 ? 4 : 1; \
    if (RT > 2 && m + 2 <= m1) kernel(tile, a, m, RT > 2 ? 2 : 1, y + (size_t)(m - m0) * NR), m += RT > 2 ? 2 : 1; \
    for (; m < m1; m++) kernel(tile, a, m, 1, y + (size_t)(m - m0) * NR);
    if (fmt == FMT_Q4) {
        LAM_ROWS(q4_tile)
    } else {
        LAM_ROWS(q8_tile)
    }
#undef LAM_ROWS
}

/* Up to STACK_ROWS activation rows, one tile's results fit a buffer on the stack; more go in chunks of this many. */
#define STACK_ROWS 64

/* ---- y = x W^T for a block-quantised W (N x K, tiled); x (M x K) float32, y (M x N) float32 --------------- */

/* Tile t of W (N x K, tiled) for activation rows 0..M-1: y[m * N + t * NR + r] for the tile's rows r. */
static inline void tile_into(int fmt, const uint8_t *w, int N, int K, int t, const Act *a, int M, float *y) {
    float buf[STACK_ROWS * NR];
    const int nr = N - t * NR < NR ? N - t * NR : NR;
    for (int m0 = 0; m0 < M; m0 += STACK_ROWS) {
        const int m1 = M - m0 < STACK_ROWS ? M : m0 + STACK_ROWS;
        tile_dot(fmt, tile_at(w, fmt, K, t), nr, a, m0, m1, buf);
        for (int m = m0; m < m1; m++) memcpy(y + (size_t)m * N + t * NR, buf + (size_t)(m - m0) * NR, sizeof(float) * nr);
    }
}

typedef struct {
    int fmt, N, K, M;
    const uint8_t *w;
    const float *x;
    float *y;
    Act *a;
} Matmul;

static void matmul_job(void *ctx, const Me *me) {
    const Matmul *j = ctx;
    const int fmt = j->fmt, N = j->N, K = j->K, M = j->M;
    FOR_SHARE(me, m, M) act_quantize(j->a, j->x, m, K);
    barrier(me);
    FOR_SHARE(me, t, tiles_of(N)) tile_into(fmt, j->w, N, K, t, j->a, M, j->y);
}

int lam_matmul(int fmt, const uint8_t *w, int N, int K, const float *x, int M, float *y, int threads) {
    Act a;
    if (act_alloc(&a, M, K) != LAM_OK) {
        act_free(&a);
        return LAM_ERR_NOMEM;
    }
    a.f = x;
    Matmul job = {fmt, N, K, M, w, x, y, &a};
    run_job(matmul_job, &job, threads);
    act_free(&a);
    return LAM_OK;
}

/* ---- W as floats (N x K), float32 or bfloat16: for long inputs, where a float GEMM beats integer dots ---- */

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

typedef struct {
    int fmt, N, K, bf16;
    const uint8_t *w;
    void *out;
} Dequant;

static void dequant_job(void *ctx, const Me *me) {
    const Dequant *dq = ctx;
    const int fmt = dq->fmt, N = dq->N, K = dq->K, bf16 = dq->bf16, nb = K / QK;
    const uint8_t *w = dq->w;
    void *out = dq->out;
    const size_t tbb = (size_t)NR * block_bytes(fmt);
    FOR_SHARE(me, t, tiles_of(N)) {
        float tmp[QK];
        const int nr = N - t * NR < NR ? N - t * NR : NR;
        for (int b = 0; b < nb; b++) {
            const uint8_t *tb = tile_at(w, fmt, K, t) + (size_t)b * tbb;
#ifdef LAM_AVX512
            if (fmt == FMT_Q4 || fmt == FMT_Q8) { /* a row's 32 weights as two registers of 16 (the scalar loop's values) */
                for (int r = 0; r < nr; r++) {
                    const __m512 d = _mm512_set1_ps(f16_to_f32(tb + 2 * r));
                    __m512 lo, hi;
                    if (fmt == FMT_Q4) {
                        const __m512 mn = _mm512_set1_ps(f16_to_f32(tb + 32 + 2 * r));
                        const __m128i q = _mm_setr_epi32(load32((const int8_t *)tb + 64 + 4 * r), load32((const int8_t *)tb + 128 + 4 * r),
                                                         load32((const int8_t *)tb + 192 + 4 * r), load32((const int8_t *)tb + 256 + 4 * r));
                        const __m512i qi = _mm512_cvtepu8_epi32(q), m15 = _mm512_set1_epi32(15);
                        lo = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(qi, m15)), mn);
                        hi = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_srli_epi32(qi, 4)), mn);
                    } else {
                        int32_t q[8];
                        for (int g = 0; g < 8; g++) q[g] = load32((const int8_t *)tb + 32 + 64 * g + 4 * r);
                        lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))));
                        hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 4)))));
                    }
                    const size_t at = (size_t)(t * NR + r) * K + (size_t)b * QK;
                    if (bf16) { /* round to nearest even as f32_to_bf16 (the weights are finite) */
                        const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
                        const __m512i ul = _mm512_castps_si512(lo), uh = _mm512_castps_si512(hi);
                        const __m512i rl = _mm512_srli_epi32(_mm512_add_epi32(ul, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(ul, 16), one))), 16);
                        const __m512i rh = _mm512_srli_epi32(_mm512_add_epi32(uh, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(uh, 16), one))), 16);
                        _mm256_storeu_si256((__m256i *)((uint16_t *)out + at), _mm512_cvtepi32_epi16(rl));
                        _mm256_storeu_si256((__m256i *)((uint16_t *)out + at + 16), _mm512_cvtepi32_epi16(rh));
                    } else {
                        _mm512_storeu_ps((float *)out + at, lo);
                        _mm512_storeu_ps((float *)out + at + 16, hi);
                    }
                }
                continue;
            }
#endif
            for (int r = 0; r < nr; r++) {
                const float d = f16_to_f32(tb + 2 * r);
                if (fmt == FMT_Q4) {
                    const float mn = f16_to_f32(tb + 32 + 2 * r);
                    for (int c = 0; c < 4; c++)
                        for (int i = 0; i < 4; i++) {
                            const uint8_t q = tb[64 + 64 * c + 4 * r + i];
                            tmp[4 * c + i] = d * (float)(q & 15) + mn;
                            tmp[16 + 4 * c + i] = d * (float)(q >> 4) + mn;
                        }
                } else {
                    for (int g = 0; g < 8; g++)
                        for (int i = 0; i < 4; i++) tmp[4 * g + i] = d * (float)(int8_t)tb[32 + 64 * g + 4 * r + i];
                }
                const size_t at = (size_t)(t * NR + r) * K + (size_t)b * QK;
                if (bf16)
                    for (int j = 0; j < QK; j++) ((uint16_t *)out)[at + j] = f32_to_bf16(tmp[j]);
                else
                    memcpy((float *)out + at, tmp, sizeof tmp);
            }
        }
    }
}

void lam_dequant(int fmt, const uint8_t *w, int N, int K, void *out, int bf16, int threads) {
    Dequant job = {fmt, N, K, bf16, w, out};
    run_job(dequant_job, &job, threads);
}

/* ---- attention over a prompt chunk ------------------------------------------------------------------------
 *
 * T new queries at positions start .. start + T - 1 over keys 0 .. start + T - 1, causal (and within a sliding
 * window of `window` positions when window > 0), the n_rep query heads of each group sharing one kv head:
 * what a prompt chunk's attention is in the PyTorch path, which runs it through SDPA's flash kernel (138
 * GFLOP/s on a 2-core Xeon for a 512-query chunk over 2,048 keys, its GEMMs being too small to reach the
 * float32 GEMM's 250). Flash attention with register blocks: a work unit is one kv head and PA_POS query
 * positions, its n_rep * PA_POS query rows (position-major, so a register block's rows share their keys) kept
 * with their running max, sum and output in the thread's scratch; the keys go by in blocks of PA_KEYS,
 * aligned to absolute positions, each block's keys transposed once (dims x keys) for the unit. A block of
 * PA_ROWS rows takes its scores as a 6 x 64 register tile (24 accumulators over head_dim FMAs), then the
 * online softmax, then P V as 6 rows x 64 dims (24 accumulators over the block's keys).
 *
 * A row's arithmetic depends only on its own query and keys: the key blocks start at absolute positions and
 * every row is summed alone in a fixed order, so a query's output is the same bits whichever chunk it came
 * in, whatever its neighbours and however the units fall to threads (taken in turn from a counter, longest
 * first). */
#ifdef LAM_AVX512
#define PA_KEYS 64
#define PA_ROWS 6
#define PA_POS 64

/* e^x for 16 floats, the same polynomial as exp256. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

typedef struct {
    const char *q;       /* q[(h * q_sh + t * q_st + d) * qsz], float32 or bfloat16 (q_bf16) */
    const char *k, *v;   /* k[(g * kv_sh + j * kv_ss) * esz + d * esz], float32 or bfloat16 */
    char *out;           /* (T, nh, hd), float32, or bfloat16 when the queries are */
    int64_t q_sh, q_st, kv_sh, kv_ss;
    int T, start, nh, nkv, hd, window, bf16, units, pos_blocks;
    float scale;
    float *scratch;
    size_t scratch_floats; /* per thread */
    float *kt;             /* the keys transposed: kv head g's block b at kt + (g * blocks + b) * hd * PA_KEYS, [d][key] */
    int blocks, unit_pos;  /* key blocks (of PA_KEYS); query positions per unit */
    int q_bf16, dot;       /* dot: bfloat16 queries and keys/values on AVX-512-BF16, through bfloat16 dot products */
    uint16_t *kp, *vp;     /* dot: each block's keys as [dim pair][key][2] and values as [key pair][dim][2] */
    _Atomic int next, next_block, blocks_done;
} PromptAttn;

/* The masks of the (up to) 64 dimensions from d0 of a head of hd, 16 a register (prompt and decode attention). */
static inline void dim_masks64(int hd, int d0, __mmask16 mk[4]) {
    const int dn = hd - d0 < 64 ? hd - d0 : 64;
    for (int i = 0; i < 4; i++) {
        const int left = dn - 16 * i;
        mk[i] = left >= 16 ? 0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
    }
}

/* Rows 0 .. R - 1's outputs, dimensions d0 .. d0 + 63, into registers, each scaled by its row's alpha (the
 * online softmax's rescale), and back. */
static inline __attribute__((always_inline)) void pa_out_load(__m512 acc[][4], const float *O, const float *alpha, int hd, int d0,
                                                              const __mmask16 *mk, const int R) {
    for (int r = 0; r < R; r++) {
        const __m512 al = _mm512_set1_ps(alpha[r]);
        for (int i = 0; i < 4; i++) acc[r][i] = _mm512_mul_ps(al, _mm512_maskz_loadu_ps(mk[i], O + (size_t)r * hd + d0 + 16 * i));
    }
}

static inline __attribute__((always_inline)) void pa_out_store(__m512 acc[][4], float *O, int hd, int d0, const __mmask16 *mk,
                                                               const int R) {
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) _mm512_mask_storeu_ps(O + (size_t)r * hd + d0 + 16 * i, mk[i], acc[r][i]);
}

/* One row's online softmax over a key block: its scores s (times `scale`) masked to the keys position p sees
 * (causal, and within the window), the running max *M and the 16-lane sum L updated, the block's numerators
 * into pc (zero where masked). Returns the factor the row's earlier output is to be scaled by. */
static inline __attribute__((always_inline)) float pa_softmax(const PromptAttn *a, __m512 *s, __m512 scale, int p, int kb, int n,
                                                              float *M, float *L, __m512 *pc) {
    enum { KV = PA_KEYS / 16 };
    const int hi = kb + n - 1 < p ? kb + n - 1 : p, lo = a->window > 0 ? p - a->window + 1 : INT32_MIN;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i vh = _mm512_set1_epi32(hi), vl = _mm512_set1_epi32(lo);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __mmask16 ok[KV];
    __m512 mx = ninf;
    for (int c = 0; c < KV; c++) {
        const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(kb + 16 * c), iota);
        ok[c] = _mm512_cmple_epi32_mask(idx, vh) & _mm512_cmpge_epi32_mask(idx, vl);
        s[c] = _mm512_mask_mul_ps(ninf, ok[c], s[c], scale);
        mx = _mm512_max_ps(mx, s[c]);
    }
    const float mb = _mm512_reduce_max_ps(mx);
    const float m_old = *M, m_new = m_old > mb ? m_old : mb;
    if (m_new == -INFINITY) { /* nothing of this block is visible to the row (a window) */
        for (int c = 0; c < KV; c++) pc[c] = _mm512_setzero_ps();
        return 1.0f;
    }
    const float alpha = m_old == m_new ? 1.0f : m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
    const __m512 mv = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(L), _mm512_set1_ps(alpha));
    for (int c = 0; c < KV; c++) {
        pc[c] = _mm512_maskz_mov_ps(ok[c], exp512(_mm512_sub_ps(s[c], mv)));
        sum = _mm512_add_ps(sum, pc[c]);
    }
    _mm512_storeu_ps(L, sum);
    *M = m_new;
    return alpha;
}

/* Rows r0 .. r0 + R - 1 of a unit (R a constant after inlining) against keys kb .. kb + n - 1. L holds each row's
 * running sum as 16 lanes (one key in 16 a lane), added across only at the end. */
static inline __attribute__((always_inline)) void pa_rows(const PromptAttn *a, const float *Q, float *O, float *M, float *L,
                                                          const int *pos, const float *kt, const char *vb, int kb, int n, const int R) {
    const int hd = a->hd, bf = a->bf16;
    const size_t esz = bf ? 2 : 4;
    enum { KV = PA_KEYS / 16 };
    __m512 s[PA_ROWS][KV];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < KV; c++) s[r][c] = _mm512_setzero_ps();
    for (int d = 0; d < hd; d++) {
        __m512 kd[KV];
        for (int c = 0; c < KV; c++) kd[c] = _mm512_loadu_ps(kt + d * PA_KEYS + 16 * c);
        for (int r = 0; r < R; r++) {
            const __m512 qd = _mm512_set1_ps(Q[(size_t)r * hd + d]);
            for (int c = 0; c < KV; c++) s[r][c] = _mm512_fmadd_ps(qd, kd[c], s[r][c]);
        }
    }
    float alpha[PA_ROWS], P[PA_ROWS][PA_KEYS];
    for (int r = 0; r < R; r++) { /* (the queries carry the scale already) */
        __m512 pc[KV];
        alpha[r] = pa_softmax(a, s[r], _mm512_set1_ps(1.0f), pos[r], kb, n, M + r, L + 16 * r, pc);
        for (int c = 0; c < KV; c++) _mm512_storeu_ps(P[r] + 16 * c, pc[c]);
    }
    for (int d0 = 0; d0 < hd; d0 += 64) {
        __mmask16 mk[4];
        dim_masks64(hd, d0, mk);
        __m512 acc[PA_ROWS][4];
        pa_out_load(acc, O, alpha, hd, d0, mk, R);
        for (int j = 0; j < n; j++) {
            const char *vr = vb + ((size_t)j * a->kv_ss + d0) * esz;
            __m512 v[4];
            for (int i = 0; i < 4; i++) {
                if (bf) v[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk[i], vr + 32 * i)), 16));
                else v[i] = _mm512_maskz_loadu_ps(mk[i], vr + 64 * i);
            }
            for (int r = 0; r < R; r++) {
                const __m512 pj = _mm512_set1_ps(P[r][j]);
                for (int i = 0; i < 4; i++) acc[r][i] = _mm512_fmadd_ps(pj, v[i], acc[r][i]);
            }
        }
        pa_out_store(acc, O, hd, d0, mk, R);
    }
}

/* Keys b * PA_KEYS .. of kv head g, transposed to [d][key] (zeros past the last key). */
static void pa_transpose(const PromptAttn *a, int g, int b) {
    const int hd = a->hd, S = a->start + a->T, kb = b * PA_KEYS, n = S - kb < PA_KEYS ? S - kb : PA_KEYS;
    const size_t esz = a->bf16 ? 2 : 4;
    float *kt = a->kt + ((size_t)g * a->blocks + b) * hd * PA_KEYS;
    if (n < PA_KEYS) memset(kt, 0, sizeof(float) * hd * PA_KEYS);
    for (int j = 0; j < n; j++) {
        const char *kr = a->k + ((size_t)g * a->kv_sh + (size_t)(kb + j) * a->kv_ss) * esz;
        if (a->bf16)
            for (int d = 0; d < hd; d++) kt[d * PA_KEYS + j] = bf16_to_f32(((const uint16_t *)kr)[d]);
        else
            for (int d = 0; d < hd; d++) kt[d * PA_KEYS + j] = ((const float *)kr)[d];
    }
}

#ifdef __AVX512BF16__
#define PA_DOT 1
/* The dot path: a row's scores and its P V as bfloat16 pairs summed into float32 (vdpbf16ps, 32 products an
 * instruction against 16 FMAs), as SDPA's flash kernel does for bfloat16 (its GEMMs take bfloat16 queries
 * and P): the queries are used as they come (the scale goes on the float scores), P is rounded to bfloat16
 * for P V, and the max, the exponentials and the sums stay float32. A block's keys are packed once as
 * [dim pair][key] (32 bits a pair, 16 keys a register) and its values as [key pair][dim], zeros past the
 * last key and dimension, so every register load is one aligned line. */
static inline int pa_pairs(int hd) { return (hd + 1) / 2; }

static void pa_pack(const PromptAttn *a, int g, int b) {
    const int hd = a->hd, hp = pa_pairs(hd), S = a->start + a->T, kb = b * PA_KEYS, n = S - kb < PA_KEYS ? S - kb : PA_KEYS;
    uint32_t *kp = (uint32_t *)(a->kp + ((size_t)g * a->blocks + b) * hp * 2 * PA_KEYS);
    uint16_t *vp = a->vp + ((size_t)g * a->blocks + b) * hd * PA_KEYS;
    if (n < PA_KEYS) {
        memset(kp, 0, sizeof(uint32_t) * hp * PA_KEYS);
        memset(vp, 0, sizeof(uint16_t) * hd * PA_KEYS);
    }
    const uint16_t *kg = (const uint16_t *)a->k + (size_t)g * a->kv_sh, *vg = (const uint16_t *)a->v + (size_t)g * a->kv_sh;
    for (int j = 0; j < n; j++) { /* keys: a 32-bit transpose, [key][pair] -> [pair][key] */
        const uint16_t *kr = kg + (size_t)(kb + j) * a->kv_ss;
        for (int p = 0; p < hd / 2; p++) memcpy(kp + (size_t)p * PA_KEYS + j, kr + 2 * p, 4);
        if (hd & 1) kp[(size_t)(hp - 1) * PA_KEYS + j] = kr[hd - 1];
    }
    const __m512i lo = _mm512_setr_epi32(0x00200000, 0x00210001, 0x00220002, 0x00230003, 0x00240004, 0x00250005, 0x00260006,
                                         0x00270007, 0x00280008, 0x00290009, 0x002a000a, 0x002b000b, 0x002c000c, 0x002d000d,
                                         0x002e000e, 0x002f000f);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int j = 0; j < n; j += 2) { /* values: rows j and j + 1 interleaved, 32 dimensions a step */
        const uint16_t *v0 = vg + (size_t)(kb + j) * a->kv_ss, *v1 = j + 1 < n ? v0 + a->kv_ss : NULL;
        uint16_t *dst = vp + (size_t)j * hd;
        for (int d = 0; d < hd; d += 32) {
            const int left = hd - d < 32 ? hd - d : 32;
            const __mmask32 m = left == 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
            const __m512i x0 = _mm512_maskz_loadu_epi16(m, v0 + d), x1 = v1 ? _mm512_maskz_loadu_epi16(m, v1 + d) : _mm512_setzero_si512();
            const __m512i a0 = _mm512_permutex2var_epi16(x0, lo, x1), a1 = _mm512_permutex2var_epi16(x0, hi, x1);
            _mm512_mask_storeu_epi16(dst + 2 * d, left >= 16 ? 0xFFFFFFFFu : (__mmask32)((1u << 2 * left) - 1), a0);
            if (left > 16) _mm512_mask_storeu_epi16(dst + 2 * d + 32, left == 32 ? 0xFFFFFFFFu : (__mmask32)((1u << 2 * (left - 16)) - 1), a1);
        }
    }
}

/* pa_rows on the dot path: Q holds each row's bfloat16 query (hp pairs), kp and vp the block as packed. */
static inline __attribute__((always_inline)) void pa_rows_dot(const PromptAttn *a, const uint16_t *Q, float *O, float *M, float *L,
                                                              const int *pos, const uint16_t *kp, const uint16_t *vp, int kb, int n,
                                                              const int R) {
    const int hd = a->hd, hp = pa_pairs(hd);
    enum { KV = PA_KEYS / 16 };
    __m512 s[PA_ROWS][KV];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < KV; c++) s[r][c] = _mm512_setzero_ps();
    for (int p = 0; p < hp; p++) {
        __m512bh kd[KV];
        for (int c = 0; c < KV; c++) kd[c] = (__m512bh)_mm512_load_si512(kp + ((size_t)p * PA_KEYS + 16 * c) * 2);
        for (int r = 0; r < R; r++) {
            uint32_t qq;
            memcpy(&qq, Q + (size_t)r * 2 * hp + 2 * p, 4);
            const __m512bh qd = (__m512bh)_mm512_set1_epi32((int)qq);
            for (int c = 0; c < KV; c++) s[r][c] = _mm512_dpbf16_ps(s[r][c], qd, kd[c]);
        }
    }
    const __m512 scale = _mm512_set1_ps(a->scale);
    float alpha[PA_ROWS];
    uint16_t P[PA_ROWS][PA_KEYS] __attribute__((aligned(64)));
    for (int r = 0; r < R; r++) {
        __m512 pc[KV];
        alpha[r] = pa_softmax(a, s[r], scale, pos[r], kb, n, M + r, L + 16 * r, pc);
        for (int c = 0; c < KV; c += 2) _mm512_store_si512(P[r] + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(pc[c + 1], pc[c]));
    }
    const int np = (n + 1) / 2;
    for (int d0 = 0; d0 < hd; d0 += 64) {
        __mmask16 mk[4];
        dim_masks64(hd, d0, mk);
        __m512 acc[PA_ROWS][4];
        pa_out_load(acc, O, alpha, hd, d0, mk, R);
        for (int jp = 0; jp < np; jp++) {
            const uint16_t *vr = vp + ((size_t)jp * hd + d0) * 2;
            __m512bh v[4];
            for (int i = 0; i < 4; i++) v[i] = (__m512bh)_mm512_maskz_loadu_epi32(mk[i], vr + 32 * i);
            for (int r = 0; r < R; r++) {
                uint32_t pp;
                memcpy(&pp, P[r] + 2 * jp, 4);
                const __m512bh pj = (__m512bh)_mm512_set1_epi32((int)pp);
                for (int i = 0; i < 4; i++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], pj, v[i]);
            }
        }
        pa_out_store(acc, O, hd, d0, mk, R);
    }
}
#endif

/* fn(..., R) with R (1 .. PA_ROWS) a constant, so that each row count gets its own unrolled copy. */
#define PA_BY_ROWS(R, fn, ...)                                                                             \
    switch (R) {                                                                                           \
    case 6: fn(__VA_ARGS__, 6); break;                                                                     \
    case 5: fn(__VA_ARGS__, 5); break;                                                                     \
    case 4: fn(__VA_ARGS__, 4); break;                                                                     \
    case 3: fn(__VA_ARGS__, 3); break;                                                                     \
    case 2: fn(__VA_ARGS__, 2); break;                                                                     \
    default: fn(__VA_ARGS__, 1); break;                                                                    \
    }

static inline float pa_q(const PromptAttn *a, const char *src, int d) {
    return a->q_bf16 ? bf16_to_f32(((const uint16_t *)src)[d]) : ((const float *)src)[d];
}

static void pa_unit(const PromptAttn *a, int u, float *scratch) {
    const int hd = a->hd, rep = a->nh / a->nkv, g = u % a->nkv, up = a->unit_pos;
    const int pb = a->pos_blocks - 1 - u / a->nkv; /* the last positions (the most keys) first */
    const int t0 = pb * up, t1 = t0 + up < a->T ? t0 + up : a->T, rows = (t1 - t0) * rep;
    float *Q = scratch, *O = Q + (size_t)up * rep * hd, *M = O + (size_t)up * rep * hd, *L = M + up * rep;
    int *pos = (int *)(L + 16 * up * rep);
    const size_t esz = a->bf16 ? 2 : 4, qsz = a->q_bf16 ? 2 : 4;
#ifdef PA_DOT
    const int hp = pa_pairs(hd);
    uint16_t *Qb = (uint16_t *)Q; /* the dot path: the queries as they are, hp pairs a row */
#endif
    for (int t = t0; t < t1; t++)
        for (int i = 0; i < rep; i++) {
            const int r = (t - t0) * rep + i;
            const char *src = a->q + ((g * rep + i) * a->q_sh + t * a->q_st) * qsz;
#ifdef PA_DOT
            if (a->dot) {
                memcpy(Qb + (size_t)r * 2 * hp, src, 2 * hd);
                if (hd & 1) Qb[(size_t)r * 2 * hp + hd] = 0;
            } else
#endif
                for (int d = 0; d < hd; d++) Q[(size_t)r * hd + d] = pa_q(a, src, d) * a->scale;
            memset(O + (size_t)r * hd, 0, sizeof(float) * hd);
            memset(L + 16 * r, 0, sizeof(float) * 16);
            M[r] = -INFINITY, pos[r] = a->start + t;
        }
    const int first = a->window > 0 && a->start + t0 - a->window + 1 > 0 ? a->start + t0 - a->window + 1 : 0;
    const int end = a->start + t1; /* keys 0 .. end - 1 */
    const char *vg = a->v + (size_t)g * a->kv_sh * esz;
    for (int kb = first / PA_KEYS * PA_KEYS; kb < end; kb += PA_KEYS) {
        const int n = end - kb < PA_KEYS ? end - kb : PA_KEYS;
        const size_t blk = (size_t)g * a->blocks + kb / PA_KEYS;
        const float *kt = a->dot ? NULL : a->kt + blk * hd * PA_KEYS;
        const char *vb = vg + (size_t)kb * a->kv_ss * esz;
        for (int r0 = 0; r0 < rows; r0 += PA_ROWS) {
            const int R = rows - r0 < PA_ROWS ? rows - r0 : PA_ROWS;
            if (kb > pos[r0 + R - 1]) continue; /* rows go by position: these (and all before) see none of the block */
            if (a->window > 0 && kb + n - 1 < pos[r0] - a->window + 1) break; /* all of it before these rows' windows */
            float *Or = O + (size_t)r0 * hd;
#ifdef PA_DOT
            if (a->dot) {
                const uint16_t *Qr = Qb + (size_t)r0 * 2 * hp, *kp = a->kp + blk * hp * 2 * PA_KEYS, *vp = a->vp + blk * hd * PA_KEYS;
                PA_BY_ROWS(R, pa_rows_dot, a, Qr, Or, M + r0, L + 16 * r0, pos + r0, kp, vp, kb, n);
                continue;
            }
#endif
            const float *Qr = Q + (size_t)r0 * hd;
            PA_BY_ROWS(R, pa_rows, a, Qr, Or, M + r0, L + 16 * r0, pos + r0, kt, vb, kb, n);
        }
    }
    for (int t = t0; t < t1; t++)
        for (int i = 0; i < rep; i++) {
            const int r = (t - t0) * rep + i;
            const float inv = 1.0f / _mm512_reduce_add_ps(_mm512_loadu_ps(L + 16 * r));
            const size_t at = ((size_t)t * a->nh + g * rep + i) * hd;
            if (a->q_bf16)
                for (int d = 0; d < hd; d++) ((uint16_t *)a->out)[at + d] = f32_to_bf16(O[(size_t)r * hd + d] * inv);
            else
                for (int d = 0; d < hd; d++) ((float *)a->out)[at + d] = O[(size_t)r * hd + d] * inv;
        }
}

/* The blocks are prepared and the units computed as threads take them from counters, not in static shares
 * with a barrier between: called between PyTorch's operations, a worker can find its core still held by
 * PyTorch's own spinning threads for a while, and the caller then does the work rather than wait for it. */
static void prompt_attention_job(void *ctx, const Me *me) {
    PromptAttn *a = ctx;
    const int total = a->nkv * a->blocks;
    for (int i; (i = atomic_fetch_add_explicit(&a->next_block, 1, memory_order_relaxed)) < total;) {
#ifdef PA_DOT
        if (a->dot) pa_pack(a, i / a->blocks, i % a->blocks);
        else
#endif
            pa_transpose(a, i / a->blocks, i % a->blocks);
        atomic_fetch_add_explicit(&a->blocks_done, 1, memory_order_release);
    }
    while (atomic_load_explicit(&a->blocks_done, memory_order_acquire) < total) _mm_pause(); /* the last ones being made */
    float *scratch = a->scratch + (size_t)me->tid * a->scratch_floats;
    for (int u; (u = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed)) < a->units;) pa_unit(a, u, scratch);
}
#endif

/* 0: no prompt attention kernel in this build (no AVX-512); 1: float32 FMAs; 2: also bfloat16 dot products
 * (AVX-512-BF16), taken for bfloat16 queries over a bfloat16 cache. */
int lam_has_prompt_attention(void) {
#if defined(LAM_AVX512) && defined(PA_DOT)
    return 2;
#elif defined(LAM_AVX512)
    return 1;
#else
    return 0;
#endif
}

/* out (T, nh, hd) = attention of q over k, v as described above; strides in elements; q and out float32 or
 * bfloat16 (q_bf16). LAM_ERR_CONFIG where this build has no such kernel (no AVX-512) or the shapes do not fit it. */
int lam_prompt_attention(const void *q, int64_t q_sh, int64_t q_st, int q_bf16, const void *k, const void *v, int64_t kv_sh,
                         int64_t kv_ss, int kv_bf16, void *out, int T, int start, int nh, int nkv, int hd, int window, float scale,
                         int threads) {
#ifdef LAM_AVX512
    if (T < 1 || start < 0 || nkv < 1 || nh % nkv || hd < 1 || hd > MAX_HEAD_DIM) return LAM_ERR_CONFIG;
    const int rep = nh / nkv, nth = threads < 1 ? 1 : threads > MAX_THREADS - 1 ? MAX_THREADS - 1 : threads;
    int up = PA_POS; /* fewer positions a unit where that leaves too few units to share */
    while (up > 8 && (T + up - 1) / up * nkv < 4 * nth) up /= 2;
    const size_t rows = (size_t)up * rep;
    const size_t per = (2 * rows * (hd + 1) + 18 * rows + 15) / 16 * 16; /* Q (a bfloat16 row padded to pairs), O, M, L (16 each), pos */
    const int blocks = (start + T + PA_KEYS - 1) / PA_KEYS;
#ifdef PA_DOT
    const int dot = q_bf16 && kv_bf16;
#else
    const int dot = 0;
#endif
    PromptAttn a = {q, k, v, out, q_sh, q_st, kv_sh, kv_ss, T, start, nh, nkv, hd, window, kv_bf16 != 0, 0, (T + up - 1) / up,
                    scale, NULL, per, NULL, blocks, up, q_bf16 != 0, dot, NULL, NULL, 0, 0, 0};
    a.units = a.pos_blocks * nkv;
    a.scratch = aligned_alloc(64, per * sizeof(float) * nth);
    const size_t cells = (size_t)nkv * blocks * PA_KEYS;
    if (dot) {
        a.kp = aligned_alloc(64, cells * (hd + 1) / 2 * 2 * sizeof(uint16_t));
        a.vp = aligned_alloc(64, cells * hd * sizeof(uint16_t) + 64);
    } else
        a.kt = aligned_alloc(64, cells * hd * sizeof(float));
    if (!a.scratch || (dot ? !a.kp || !a.vp : !a.kt)) {
        free(a.scratch), free(a.kt), free(a.kp), free(a.vp);
        return LAM_ERR_NOMEM;
    }
    run_job(prompt_attention_job, &a, nth);
    free(a.scratch), free(a.kt), free(a.kp), free(a.vp);
    return LAM_OK;
#else
    (void)q, (void)q_sh, (void)q_st, (void)q_bf16, (void)k, (void)v, (void)kv_sh, (void)kv_ss, (void)kv_bf16, (void)out, (void)T;
    (void)start, (void)nh, (void)nkv, (void)hd, (void)window, (void)scale, (void)threads;
    return LAM_ERR_CONFIG;
#endif
}

/* ---- the fused decode step ------------------------------------------------------------------------------- */

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* cs: the row's cos(pos * inv_freq[i]) for i < hd/2, then the sines (computed once per step, `step_init`). */
static void rope(float *v, int hd, const float *cs) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float c = cs[i], s = cs[half + i];
        const float x0 = v[i], x1 = v[i + half];
        v[i] = x0 * c - x1 * s;
        v[i + half] = x1 * c + x0 * s;
    }
}

/* The decode step's shapes and options, mirrored by DecodeConfig (a ctypes.Structure) in lamina.llm.kernels.native.
 * `size` and `version` are checked on every call (LAM_ERR_CONFIG), and Python compares both with
 * lam_decode_config_size/_version when it loads the library: the two cannot drift apart silently. Bump the
 * version when a field changes meaning. */
#define LAM_DECODE_CONFIG_VERSION 3 /* 2: quantised weights in tiles of NR rows; 3: LoRA adapters */
typedef struct {
    int64_t size;    /* sizeof(LamDecodeConfig) as the caller laid it out */
    int64_t version; /* LAM_DECODE_CONFIG_VERSION */
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, hidden, vocab;
    int64_t rows;            /* M, the token rows of this call */
    int64_t slots, capacity; /* the KV cache: `slots` rows of `capacity` positions */
    int64_t kv_bf16;         /* keys and values are stored as bfloat16 (else float32) */
    int64_t window;          /* sliding-window span; 0 for full attention */
    int64_t head_fmt;        /* the output head's weight format (FMT_*) */
    int64_t threads;         /* threads (the caller and its team's workers) */
    int64_t n_logits;        /* rows whose logits are wanted: logit_rows[0 .. n_logits-1] */
    int64_t n_adapters;      /* LoRA adapters in `lora` (0: none) */
    int64_t max_rank;        /* the largest rank among them */
    int64_t lora;            /* address of the LoRA table (n_layers x 7 x n_adapters entries of A', B, rank), or 0 */
    int64_t row_adapter;     /* address of rows int64s: each row's adapter (-1: the base model), or 0 */
    float eps;               /* RMSNorm epsilon */
} LamDecodeConfig;

int64_t lam_decode_config_size(void) { return (int64_t)sizeof(LamDecodeConfig); }
int64_t lam_decode_config_version(void) { return LAM_DECODE_CONFIG_VERSION; }

/* Per layer, in this order: weight pointers q k v o gate up down, their formats (7), norm weights
 * (attention, mlp), biases q k v (0 when absent). */
enum { L_WQ, L_WK, L_WV, L_WO, L_WG, L_WU, L_WD, L_FQ, L_FK, L_FV, L_FO, L_FG, L_FU, L_FD, L_NA, L_NM, L_BQ, L_BK, L_BV, L_N };

/* LoRA (S-LoRA / Punica style: every row under its own adapter, or none, in one step): entry (l, i, j) of the
 * table, for layer l, projection i (L_WQ .. L_WD) and adapter j, is three int64s: the address of A' (rank x K
 * float32, the adapter's scale folded in; 0 where that projection has no adapter j), of B^T (rank x N float32)
 * and the rank. A row under adapter j adds B (A' x) to each projection's output: u = A' x once the row's input
 * activations are made (split across the threads by rank), B u in the tile loop beside the base weights. */
#define LORA_ENTRY 3

/* What every phase of one step reads: shapes, the cache layout, the token rows and the scratch buffers
 * (row-major, one row per token row). Shared by the threads; only the buffers' contents change. */
typedef struct {
    int n_layers, dim, nh, nkv, hd, hidden, vocab, M, n_logits, head_fmt, kv_bf16, window, threads;
    int nq, nk, nqkv, rep; /* widths of q and of k (= of v), of a fused q|k|v row; query heads per kv head */
    int64_t slots, cap;
    size_t esz;        /* bytes per cached key/value element */
    float eps, scale;  /* RMSNorm epsilon; 1/sqrt(head_dim) */
    const int64_t *row_slots, *positions, *logit_rows;
    const float *inv_freq;
    float *x;          /* (M, dim) the residual stream, updated in place */
    float *h;          /* (M, max(dim, nq)) normed rows; scratch once they are quantised */
    float *qkv;        /* (M, nqkv) */
    float *att;        /* (M, nq) attention outputs, heads side by side */
    float *ff;         /* (M, hidden) silu(gate) * up */
    float *scores;     /* score_ld floats per thread: one KV chunk's attention weights for a group of heads */
    size_t score_ld;
    /* attention's work units: (row, kv head, KV chunk); unit_row0[m] is row m's first, row_chunks[m] its count per
     * kv head; each unit leaves rep partial results of part_ld floats (max, sum, hd unnormalised outputs) */
    int n_units;
    int *unit_row0, *row_chunks;
    float *partials;
    size_t part_ld;
    float *rope_cs; /* (M, hd): each row's RoPE cosines, then sines */
    Act a_dim, a_att, a_ff; /* h, att and ff as int8 blocks (and as the float rows, for float weights) */
    int n_adapters, max_rank;
    const int64_t *lora, *row_adapter; /* the LoRA table and each row's adapter (see LORA_ENTRY) */
    float *lora_u;                     /* (M, 7, max_rank): A' x of each row and projection */
} Step;

/* One layer's row of the layer table, unpacked (each thread keeps its own copy). */
typedef struct {
    const uint8_t *w[7]; /* indexed by L_WQ .. L_WD */
    int fmt[7];
    int n[7], k[7]; /* output rows and inputs of each weight */
    const float *bias[3], *norm_att, *norm_mlp;
    char *kl, *vl;       /* this layer's keys and values in the cache */
    const int64_t *lora; /* this layer's 7 x n_adapters LoRA entries (NULL without adapters) */
} Layer;

static void *alloc(size_t bytes) { return malloc(bytes ? bytes : 1); /* (NULL means out of memory only) */ }

static void step_free(Step *s) {
    free(s->h), free(s->qkv), free(s->att), free(s->ff), free(s->scores);
    free(s->unit_row0), free(s->row_chunks), free(s->partials), free(s->rope_cs), free(s->lora_u);
    act_free(&s->a_dim), act_free(&s->a_att), act_free(&s->a_ff);
}

/* Checks the request against the cache and allocates the scratch: LAM_OK, or an error with nothing allocated. */
static int step_init(Step *s, const LamDecodeConfig *c, const float *inv_freq, float *x, const int64_t *row_slots,
                     const int64_t *positions, const int64_t *logit_rows) {
    memset(s, 0, sizeof *s);
    if (c->n_kv_heads < 1 || c->n_heads % c->n_kv_heads || c->head_dim % 8 || c->head_dim > MAX_HEAD_DIM || c->rows < 0 || c->n_logits < 0 || c->threads < 1)
        return LAM_ERR_CONFIG;
    s->n_layers = (int)c->n_layers, s->dim = (int)c->dim, s->nh = (int)c->n_heads, s->nkv = (int)c->n_kv_heads;
    s->hd = (int)c->head_dim, s->hidden = (int)c->hidden, s->vocab = (int)c->vocab, s->M = (int)c->rows;
    s->n_logits = (int)c->n_logits, s->head_fmt = (int)c->head_fmt, s->kv_bf16 = (int)c->kv_bf16;
    s->window = (int)c->window, s->threads = (int)c->threads;
    s->slots = c->slots, s->cap = c->capacity;
    s->nq = s->nh * s->hd, s->nk = s->nkv * s->hd, s->nqkv = s->nq + 2 * s->nk, s->rep = s->nh / s->nkv;
    s->esz = s->kv_bf16 ? 2 : 4, s->eps = c->eps, s->scale = 1.0f / sqrtf((float)s->hd);
    s->row_slots = row_slots, s->positions = positions, s->logit_rows = logit_rows, s->inv_freq = inv_freq, s->x = x;
    const int M = s->M;
    if (c->n_adapters < 0 || (c->n_adapters > 0 && (c->max_rank < 1 || !c->lora || !c->row_adapter))) return LAM_ERR_CONFIG;
    s->n_adapters = (int)c->n_adapters, s->max_rank = (int)c->max_rank;
    s->lora = (const int64_t *)(intptr_t)c->lora, s->row_adapter = (const int64_t *)(intptr_t)c->row_adapter;
    for (int m = 0; s->n_adapters && m < M; m++)
        if (s->row_adapter[m] < -1 || s->row_adapter[m] >= s->n_adapters) return LAM_ERR_RANGE;
    for (int i = 0; i < s->n_logits; i++)
        if (logit_rows[i] < 0 || logit_rows[i] >= M) return LAM_ERR_RANGE;
    for (int m = 0; m < M; m++) {
        if (positions[m] < 0 || positions[m] >= s->cap || row_slots[m] < 0 || row_slots[m] >= s->slots) return LAM_ERR_RANGE;
    }
    s->h = alloc(sizeof(float) * (size_t)M * (s->dim > s->nq ? s->dim : s->nq));
    s->qkv = alloc(sizeof(float) * (size_t)M * s->nqkv);
    s->att = alloc(sizeof(float) * (size_t)M * s->nq);
    s->ff = alloc(sizeof(float) * (size_t)M * s->hidden);
    /* per thread: the scores of a chunk for a group of heads, then the chunk's keys as float32 */
    s->score_ld = ((size_t)s->rep * KV_CHUNK + (size_t)KV_CHUNK * s->hd + 15) / 16 * 16; /* whole cache lines apart */
    s->scores = aligned_alloc(64, sizeof(float) * s->score_ld * (size_t)s->threads);
    s->unit_row0 = alloc(sizeof(int) * (size_t)(M + 1));
    s->row_chunks = alloc(sizeof(int) * (size_t)(M + 1));
    if (s->unit_row0 && s->row_chunks) {
        int units = 0;
        for (int m = 0; m < M; m++) {
            const int64_t last = positions[m], first = s->window > 0 && last - s->window + 1 > 0 ? last - s->window + 1 : 0;
            s->row_chunks[m] = (int)(last / KV_CHUNK - first / KV_CHUNK + 1);
            s->unit_row0[m] = units;
            units += s->nkv * s->row_chunks[m];
        }
        s->n_units = units;
    }
    s->rope_cs = alloc(sizeof(float) * (size_t)M * s->hd);
    if (s->rope_cs)
        for (int m = 0; m < M; m++)
            for (int i = 0; i < s->hd / 2; i++) {
                const float ang = (float)positions[m] * inv_freq[i];
                s->rope_cs[(size_t)m * s->hd + i] = cosf(ang);
                s->rope_cs[(size_t)m * s->hd + s->hd / 2 + i] = sinf(ang);
            }
    s->part_ld = (size_t)s->hd + 2;
    s->partials = alloc(sizeof(float) * (size_t)s->n_units * s->rep * s->part_ld);
    const int acts = act_alloc(&s->a_dim, M, s->dim) | act_alloc(&s->a_att, M, s->nq) | act_alloc(&s->a_ff, M, s->hidden);
    if (s->n_adapters && !(s->lora_u = alloc(sizeof(float) * (size_t)M * 7 * s->max_rank))) {
        step_free(s);
        return LAM_ERR_NOMEM;
    }
    if (!s->h || !s->qkv || !s->att || !s->ff || !s->scores || !s->unit_row0 || !s->row_chunks || !s->partials || !s->rope_cs || acts != LAM_OK) {
        step_free(s);
        return LAM_ERR_NOMEM;
    }
    s->a_dim.f = s->h, s->a_att.f = s->att, s->a_ff.f = s->ff; /* float weights read the float rows themselves */
    return LAM_OK;
}

static inline void layer_view(Layer *L, const Step *s, const int64_t *table, int l, void *kcache, void *vcache) {
    const int64_t *row = table + (size_t)l * L_N;
    for (int i = 0; i < 7; i++) {
        L->w[i] = (const uint8_t *)(intptr_t)row[L_WQ + i];
        L->fmt[i] = (int)row[L_FQ + i];
    }
    for (int i = 0; i < 7; i++) {
        L->k[i] = i == L_WO ? s->nq : i == L_WD ? s->hidden : s->dim;
        L->n[i] = i == L_WQ ? s->nq : i == L_WK || i == L_WV ? s->nk : i == L_WO || i == L_WD ? s->dim : s->hidden;
    }
    for (int i = 0; i < 3; i++) L->bias[i] = (const float *)(intptr_t)row[L_BQ + i];
    L->norm_att = (const float *)(intptr_t)row[L_NA], L->norm_mlp = (const float *)(intptr_t)row[L_NM];
    const size_t layer_bytes = (size_t)s->slots * s->nkv * s->cap * s->hd * s->esz;
    L->kl = (char *)kcache + (size_t)l * layer_bytes;
    L->vl = (char *)vcache + (size_t)l * layer_bytes;
    L->lora = s->n_adapters ? s->lora + (size_t)l * 7 * s->n_adapters * LORA_ENTRY : NULL;
}

/* ---- LoRA ------------------------------------------------------------------------------------------ */

static inline float dot_f32(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    float sum = hsum256(acc);
    for (; k < n; k++) sum += a[k] * b[k];
    return sum;
}

/* Row m's adapter entry for projection i, or NULL (no adapter on the row, or none on that projection). */
static inline const int64_t *lora_entry(const Step *s, const Layer *L, int i, int m) {
    if (!L->lora) return NULL;
    const int64_t j = s->row_adapter[m];
    if (j < 0) return NULL;
    const int64_t *e = L->lora + ((size_t)i * s->n_adapters + j) * LORA_ENTRY;
    return e[0] ? e : NULL;
}

/* u = A' x (ldx floats a row) for every row under an adapter and each projection i0 .. i1-1 that reads x: one
 * unit per (row, projection, rank index), shared by the threads; then a barrier (nothing without adapters). */
static inline void lora_down(const Me *me, const Step *s, const Layer *L, int i0, int i1, const float *x, int ldx) {
    if (!L->lora) return;
    const int per_row = (i1 - i0) * s->max_rank;
    FOR_SHARE(me, unit, s->M * per_row) {
        const int m = unit / per_row, i = i0 + unit % per_row / s->max_rank, q = unit % s->max_rank;
        const int64_t *e = lora_entry(s, L, i, m);
        if (!e || q >= (int)e[2]) continue;
        const float *A = (const float *)(intptr_t)e[0];
        s->lora_u[((size_t)m * 7 + i) * s->max_rank + q] = dot_f32(A + (size_t)q * L->k[i], x + (size_t)m * ldx, L->k[i]);
    }
    barrier(me);
}

/* buf[(m - m0) * NR + o] += sum_q u[q] B^T[q, t * NR + o] for tile t (nr rows) of projection i, rows m0 .. m1-1. */
static inline void lora_up(const Step *s, const Layer *L, int i, int t, int nr, int m0, int m1, float *buf) {
    for (int m = m0; L->lora && m < m1; m++) {
        const int64_t *e = lora_entry(s, L, i, m);
        if (!e) continue;
        const int r = (int)e[2], N = L->n[i];
        const float *bt = (const float *)(intptr_t)e[1] + (size_t)t * NR;
        const float *u = s->lora_u + ((size_t)m * 7 + i) * s->max_rank;
        float *y = buf + (size_t)(m - m0) * NR;
        if (nr == NR) {
            __m256 a0 = _mm256_loadu_ps(y), a1 = _mm256_loadu_ps(y + 8);
            for (int q = 0; q < r; q++) {
                const __m256 uq = _mm256_set1_ps(u[q]);
                a0 = _mm256_fmadd_ps(uq, _mm256_loadu_ps(bt + (size_t)q * N), a0);
                a1 = _mm256_fmadd_ps(uq, _mm256_loadu_ps(bt + (size_t)q * N + 8), a1);
            }
            _mm256_storeu_ps(y, a0), _mm256_storeu_ps(y + 8, a1);
        } else {
            for (int o = 0; o < nr; o++)
                for (int q = 0; q < r; q++) y[o] += u[q] * bt[(size_t)q * N + o];
        }
    }
}

/* ---- the phases of one layer (each a few shares of the step's job, with a barrier after each) ------------ */

/* h = rmsnorm(x) row by row, quantised into a_dim for the projections i0 .. i1-1 that follow (and their LoRA). */
static inline void norm_rows(const Me *me, const Step *s, const Layer *L, const float *weight, int i0, int i1) {
    const int dim = s->dim;
    FOR_SHARE(me, m, s->M) {
        rmsnorm(s->x + (size_t)m * dim, weight, dim, s->eps, s->h + (size_t)m * dim);
        act_quantize(&s->a_dim, s->h, m, dim);
    }
    barrier(me);
    lora_down(me, s, L, i0, i1, s->h, dim);
}

/* Tile t of weight i (and the rows' LoRA) for activation rows m0..m1-1 into buf (NR per row); returns the
 * tile's real rows. */
static inline int layer_tile(const Step *s, const Layer *L, int i, int t, const Act *a, int m0, int m1, float *buf) {
    const int nr = L->n[i] - t * NR < NR ? L->n[i] - t * NR : NR;
    tile_dot(L->fmt[i], tile_at(L->w[i], L->fmt[i], L->k[i], t), nr, a, m0, m1, buf);
    lora_up(s, L, i, t, nr, m0, m1, buf);
    return nr;
}

/* qkv = rmsnorm(x) [Wq | Wk | Wv]^T (+ biases), one fused row per token row. */
static inline void norm_qkv(const Me *me, const Step *s, const Layer *L) {
    norm_rows(me, s, L, L->norm_att, L_WQ, L_WV + 1);
    const int nqkv = s->nqkv, M = s->M, tq = tiles_of(s->nq), tk = tiles_of(s->nk);
    float *qkv = s->qkv;
    FOR_SHARE(me, u, tq + 2 * tk) {
        const int which = u < tq ? 0 : u < tq + tk ? 1 : 2;
        const int t = which == 0 ? u : which == 1 ? u - tq : u - tq - tk;
        const int col = (which == 0 ? 0 : which == 1 ? s->nq : s->nq + s->nk) + t * NR;
        const float *bias = L->bias[which] ? L->bias[which] + t * NR : NULL;
        float buf[STACK_ROWS * NR];
        for (int m0 = 0; m0 < M; m0 += STACK_ROWS) {
            const int m1 = M - m0 < STACK_ROWS ? M : m0 + STACK_ROWS;
            const int nr = layer_tile(s, L, L_WQ + which, t, &s->a_dim, m0, m1, buf);
            for (int m = m0; m < m1; m++)
                for (int r = 0; r < nr; r++) qkv[(size_t)m * nqkv + col + r] = buf[(m - m0) * NR + r] + (bias ? bias[r] : 0.0f);
        }
    }
    barrier(me);
}

/* RoPE on q and k at each row's position; k and v written to the row's slot in the cache. */
static inline void rope_kv_write(const Me *me, const Step *s, const Layer *L) {
    const int nkv = s->nkv, hd = s->hd, nq = s->nq, nk = s->nk, rep = s->rep;
    const int64_t cap = s->cap;
    FOR_SHARE(me, i, s->M * nkv) {
        const int m = i / nkv, g = i % nkv;
        float *row = s->qkv + (size_t)m * s->nqkv;
        const float *cs = s->rope_cs + (size_t)m * hd;
        for (int j = 0; j < rep; j++) rope(row + (size_t)(g * rep + j) * hd, hd, cs);
        float *k = row + nq + g * hd, *v = row + nq + nk + g * hd;
        rope(k, hd, cs);
        const size_t off = (((size_t)s->row_slots[m] * nkv + g) * cap + s->positions[m]) * hd;
        if (s->kv_bf16) {
            uint16_t *kd = (uint16_t *)L->kl + off, *vd = (uint16_t *)L->vl + off;
            for (int d = 0; d < hd; d++) {
                kd[d] = f32_to_bf16(k[d]);
                vd[d] = f32_to_bf16(v[d]);
            }
        } else {
            memcpy((float *)L->kl + off, k, sizeof(float) * hd);
            memcpy((float *)L->vl + off, v, sizeof(float) * hd);
        }
    }
    barrier(me);
}

/* Attention is flash-decoding: each row's keys and values are split into chunks of KV_CHUNK positions (at
 * fixed positions, multiples of KV_CHUNK: the split depends on neither the batch nor the thread count), each
 * (row, kv head, chunk) is a work unit that attends all the kv head's query heads at once (reading each key
 * and value once for the group, as GQA allows), and the chunks' partial softmaxes are merged in order. */
#ifdef LAM_AVX512
/* part[h].out[d0 .. d0 + 64) = sum over the chunk's n positions j of p[h][j] v[j][d] for heads h0 .. h0 + HN - 1
 * (HN a constant after inlining): each value row is loaded (and widened from bfloat16) once for the heads, and
 * each output is the same sequence of FMAs over j as the AVX2 loop's, so the two give the same bits. */
static inline __attribute__((always_inline)) void pv_block(const Step *s, const char *vb, int n, const float *sc, float *part,
                                                            int h0, int d0, const int HN, size_t ahead) {
    const int hd = s->hd, bf = s->kv_bf16;
    const size_t esz = s->esz;
    __mmask16 mk[4];
    dim_masks64(hd, d0, mk);
    __m512 acc[3][4];
    for (int h = 0; h < HN; h++)
        for (int i = 0; i < 4; i++) acc[h][i] = _mm512_setzero_ps();
    const size_t row = (size_t)hd * esz;
    for (int j = 0; j < n; j++) {
        const char *vr = vb + ((size_t)j * hd + d0) * esz;
        if (ahead) /* (the first pass over the rows fetches the next chunk's) */
            for (size_t l = 0; l < row; l += 64) _mm_prefetch(vb + (size_t)j * row + l + ahead, _MM_HINT_T0);
        __m512 v[4];
        for (int i = 0; i < 4; i++) {
            if (bf) v[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk[i], vr + 32 * i)), 16));
            else v[i] = _mm512_maskz_loadu_ps(mk[i], vr + 64 * i);
        }
        for (int h = 0; h < HN; h++) {
            const __m512 pj = _mm512_set1_ps(sc[(h0 + h) * KV_CHUNK + j]);
            for (int i = 0; i < 4; i++) acc[h][i] = _mm512_fmadd_ps(pj, v[i], acc[h][i]);
        }
    }
    for (int h = 0; h < HN; h++) {
        float *out = part + (size_t)(h0 + h) * s->part_ld + 2 + d0;
        for (int i = 0; i < 4; i++) _mm512_mask_storeu_ps(out + 16 * i, mk[i], acc[h][i]);
    }
}
#endif

static inline void attend_chunk(const Step *s, const Layer *L, int m, int g, int64_t j0, int64_t j1, float *sc, float *part) {
    const int hd = s->hd, rep = s->rep, kv_bf16 = s->kv_bf16, n = (int)(j1 - j0);
    const size_t esz = s->esz;
    const float *q = s->qkv + (size_t)m * s->nqkv + (size_t)g * rep * hd; /* the group's rep query heads, side by side */
    const size_t head = ((size_t)s->row_slots[m] * s->nkv + g) * s->cap * hd * esz;
    const char *kb = L->kl + head + (size_t)j0 * hd * esz, *vb = L->vl + head + (size_t)j0 * hd * esz;
    /* The chunk after this one (the same slot and kv head: the thread's next unit, as a rule) is fetched while
     * this one is computed: each line touched here asks for the line KV_CHUNK positions on (a prefetch past
     * the slot's end reads nothing that matters and cannot fault). Without it attention read the cache at
     * 7 GB/s on a 2-core Intel Xeon, a third of what the weights stream at. */
    const size_t ahead = (size_t)KV_CHUNK * hd * esz;
    const float *kf = (const float *)kb; /* the chunk's keys as float32: converted once into the thread's buffer */
    if (kv_bf16) {
        float *buf = sc + (size_t)rep * KV_CHUNK;
        int i = 0;
#ifdef LAM_AVX512
        for (; i + 32 <= n * hd; i += 32) {
            _mm_prefetch(kb + (size_t)i * 2 + ahead, _MM_HINT_T0);
            _mm512_storeu_ps(buf + i, load16(kb + (size_t)i * 2, 1));
            _mm512_storeu_ps(buf + i + 16, load16(kb + (size_t)i * 2 + 32, 1));
        }
#endif
        for (; i < n * hd; i += 8) {
            if (i % 32 == 0) _mm_prefetch(kb + (size_t)i * 2 + ahead, _MM_HINT_T0);
            _mm256_storeu_ps(buf + i, load8(kb + (size_t)i * 2, 1));
        }
        kf = buf;
    } else {
        for (size_t i = 0; i < (size_t)n * hd * 4; i += 64) _mm_prefetch(kb + i + ahead, _MM_HINT_T0);
    }
    for (int h = 0; h < rep; h++) { /* scores q . k / sqrt(hd), 8 positions at a time (8 independent sums) */
        const float *qh = q + h * hd;
        float *r = sc + h * KV_CHUNK;
        const __m256 scale = _mm256_set1_ps(s->scale);
        int j = 0;
        for (; j + 8 <= n; j += 8) {
            const float *k0 = kf + (size_t)j * hd;
            __m256 a[8];
#ifdef LAM_AVX512 /* 16 dimensions a step (the last 8 through a mask), each position's two halves added first */
            __m512 z[8];
            for (int p = 0; p < 8; p++) z[p] = _mm512_setzero_ps();
            for (int d = 0; d < hd; d += 16) {
                const __mmask16 mk = hd - d >= 16 ? 0xFFFF : 0x00FF;
                const __m512 qd = _mm512_maskz_loadu_ps(mk, qh + d);
                for (int p = 0; p < 8; p++) z[p] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, k0 + (size_t)p * hd + d), qd, z[p]);
            }
            for (int p = 0; p < 8; p++) a[p] = _mm256_add_ps(_mm512_castps512_ps256(z[p]), _mm512_extractf32x8_ps(z[p], 1));
#else
            for (int p = 0; p < 8; p++) a[p] = _mm256_setzero_ps();
            for (int d = 0; d < hd; d += 8) {
                const __m256 qd = _mm256_loadu_ps(qh + d);
                for (int p = 0; p < 8; p++) a[p] = _mm256_fmadd_ps(_mm256_loadu_ps(k0 + (size_t)p * hd + d), qd, a[p]);
            }
#endif
            _mm256_storeu_ps(r + j, _mm256_mul_ps(hsum8x8(a), scale));
        }
        for (; j < n; j++) {
            __m256 acc = _mm256_setzero_ps();
            for (int d = 0; d < hd; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(kf + (size_t)j * hd + d), _mm256_loadu_ps(qh + d), acc);
            r[j] = hsum256(acc) * s->scale;
        }
    }
    for (int h = 0; h < rep; h++) { /* softmax numerators, their max and sum */
        float *r = sc + h * KV_CHUNK;
        __m256 m8 = _mm256_set1_ps(-INFINITY);
        int j = 0;
        for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(r + j));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        for (; j < n; j++) mx = r[j] > mx ? r[j] : mx;
        const __m256 vmx = _mm256_set1_ps(mx);
        __m256 sum = _mm256_setzero_ps();
        for (j = 0; j + 8 <= n; j += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(r + j), vmx));
            _mm256_storeu_ps(r + j, e);
            sum = _mm256_add_ps(sum, e);
        }
        if (j < n) { /* the tail through the same vector exp, the lanes past n zeroed */
            float tail[8] = {0};
            memcpy(tail, r + j, sizeof(float) * (n - j));
            const __m256 keep = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)(n - j)), _CMP_LT_OQ);
            const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_loadu_ps(tail), vmx)), keep);
            _mm256_storeu_ps(tail, e);
            memcpy(r + j, tail, sizeof(float) * (n - j));
            sum = _mm256_add_ps(sum, e);
        }
        part[h * s->part_ld] = mx;
        part[h * s->part_ld + 1] = hsum256(sum);
    }
#ifdef LAM_AVX512
    /* outputs: sum of p v, up to 3 heads at once over each value row, read (and widened) once for them */
    for (int h0 = 0; h0 < rep; h0 += 3) {
        const int hn = rep - h0 < 3 ? rep - h0 : 3;
        for (int d0 = 0; d0 < hd; d0 += 64) {
            const size_t pf = h0 == 0 && d0 == 0 ? ahead : 0;
            if (hn == 3) pv_block(s, vb, n, sc, part, h0, d0, 3, pf);
            else if (hn == 2) pv_block(s, vb, n, sc, part, h0, d0, 2, pf);
            else pv_block(s, vb, n, sc, part, h0, d0, 1, pf);
        }
    }
#else
    const char *vf = vb; /* the chunk's values as float32, like the keys (their buffer is free again) */
    size_t vsz = esz;
    if (kv_bf16 && rep > 1) {
        float *buf = sc + (size_t)rep * KV_CHUNK;
        for (int i = 0; i < n * hd; i += 8) {
            if (i % 32 == 0) _mm_prefetch(vb + (size_t)i * 2 + ahead, _MM_HINT_T0);
            _mm256_storeu_ps(buf + i, load8(vb + (size_t)i * 2, 1));
        }
        vf = (const char *)buf, vsz = 4;
    } else {
        for (size_t i = 0; i < (size_t)n * hd * esz; i += 64) _mm_prefetch(vb + i + ahead, _MM_HINT_T0);
    }
    const int vbf = vsz == 2;
    for (int h = 0; h < rep; h++) { /* outputs: sum of p v, 64 dimensions at a time in registers */
        const float *pr = sc + h * KV_CHUNK;
        float *out = part + h * s->part_ld + 2;
        for (int d0 = 0; d0 < hd; d0 += 64) {
            if (hd - d0 >= 64) {
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
                for (int j = 0; j < n; j++) {
                    const __m256 pj = _mm256_set1_ps(pr[j]);
                    const char *vr = vf + ((size_t)j * hd + d0) * vsz;
                    a0 = _mm256_fmadd_ps(pj, load8(vr, vbf), a0);
                    a1 = _mm256_fmadd_ps(pj, load8(vr + 8 * vsz, vbf), a1);
                    a2 = _mm256_fmadd_ps(pj, load8(vr + 16 * vsz, vbf), a2);
                    a3 = _mm256_fmadd_ps(pj, load8(vr + 24 * vsz, vbf), a3);
                    a4 = _mm256_fmadd_ps(pj, load8(vr + 32 * vsz, vbf), a4);
                    a5 = _mm256_fmadd_ps(pj, load8(vr + 40 * vsz, vbf), a5);
                    a6 = _mm256_fmadd_ps(pj, load8(vr + 48 * vsz, vbf), a6);
                    a7 = _mm256_fmadd_ps(pj, load8(vr + 56 * vsz, vbf), a7);
                }
                _mm256_storeu_ps(out + d0, a0), _mm256_storeu_ps(out + d0 + 8, a1), _mm256_storeu_ps(out + d0 + 16, a2);
                _mm256_storeu_ps(out + d0 + 24, a3), _mm256_storeu_ps(out + d0 + 32, a4), _mm256_storeu_ps(out + d0 + 40, a5);
                _mm256_storeu_ps(out + d0 + 48, a6), _mm256_storeu_ps(out + d0 + 56, a7);
            } else {
                for (int d = d0; d < hd; d += 8) {
                    __m256 a = _mm256_setzero_ps();
                    for (int j = 0; j < n; j++) a = _mm256_fmadd_ps(_mm256_set1_ps(pr[j]), load8(vf + ((size_t)j * hd + d) * vsz, vbf), a);
                    _mm256_storeu_ps(out + d, a);
                }
            }
        }
    }
#endif
}

/* att = softmax(q k^T / sqrt(hd)) v per row and head, over the slot's positions up to the row's own (within
 * the sliding window, where there is one). */
static inline void attention(const Me *me, const Step *s, const Layer *L) {
    const int nh = s->nh, hd = s->hd, rep = s->rep, window = s->window;
    float *sc = s->scores + (size_t)me->tid * s->score_ld;
    int m = 0;
    FOR_SHARE(me, u, s->n_units) {
        while (m + 1 < s->M && s->unit_row0[m + 1] <= u) m++; /* (each thread's units ascend) */
        while (s->unit_row0[m] > u) m--;
        const int k = u - s->unit_row0[m], g = k / s->row_chunks[m], c = k % s->row_chunks[m];
        const int64_t last = s->positions[m], first = window > 0 && last - window + 1 > 0 ? last - window + 1 : 0;
        const int64_t c0 = (first / KV_CHUNK + c) * KV_CHUNK;
        const int64_t j0 = c0 > first ? c0 : first, j1 = c0 + KV_CHUNK < last + 1 ? c0 + KV_CHUNK : last + 1;
        attend_chunk(s, L, m, g, j0, j1, sc, s->partials + (size_t)u * rep * s->part_ld);
    }
    barrier(me);
    FOR_SHARE(me, i, s->M * nh) { /* merge the chunks, in order */
        const int row = i / nh, hh = i % nh, g = hh / rep, h = hh % rep, chunks = s->row_chunks[row];
        const float *p0 = s->partials + ((size_t)(s->unit_row0[row] + g * chunks) * rep + h) * s->part_ld;
        const size_t stride = (size_t)rep * s->part_ld;
        float mx = -INFINITY;
        for (int c = 0; c < chunks; c++) mx = p0[c * stride] > mx ? p0[c * stride] : mx;
        float total = 0.0f;
        float *o = s->att + (size_t)row * s->nq + (size_t)hh * hd;
        for (int d = 0; d < hd; d++) o[d] = 0.0f;
        for (int c = 0; c < chunks; c++) {
            const float *p = p0 + c * stride, w = expf(p[0] - mx);
            total += w * p[1];
            for (int d = 0; d < hd; d += 8)
                _mm256_storeu_ps(o + d, _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(p + 2 + d), _mm256_loadu_ps(o + d)));
        }
        const __m256 inv = _mm256_set1_ps(1.0f / total);
        for (int d = 0; d < hd; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), inv));
    }
    barrier(me);
}

/* x += a W^T for W (dim x K), weight i of the layer: o_proj and down_proj, each with its residual add. */
static inline void add_projection(const Me *me, const Step *s, const Layer *L, int i, const Act *a) {
    const int dim = s->dim, M = s->M;
    float *x = s->x;
    FOR_SHARE(me, t, tiles_of(dim)) {
        float buf[STACK_ROWS * NR];
        for (int m0 = 0; m0 < M; m0 += STACK_ROWS) {
            const int m1 = M - m0 < STACK_ROWS ? M : m0 + STACK_ROWS;
            const int nr = layer_tile(s, L, i, t, a, m0, m1, buf);
            for (int m = m0; m < m1; m++)
                for (int r = 0; r < nr; r++) x[(size_t)m * dim + t * NR + r] += buf[(m - m0) * NR + r];
        }
    }
    barrier(me);
}

/* x += att Wo^T. */
static inline void o_proj_residual(const Me *me, const Step *s, const Layer *L) {
    FOR_SHARE(me, m, s->M) act_quantize(&s->a_att, s->att, m, s->nq);
    barrier(me);
    lora_down(me, s, L, L_WO, L_WO + 1, s->att, s->nq);
    add_projection(me, s, L, L_WO, &s->a_att);
}

/* x += (silu(h Wg^T) * h Wu^T) Wd^T, h = rmsnorm(x). */
static inline void mlp(const Me *me, const Step *s, const Layer *L) {
    norm_rows(me, s, L, L->norm_mlp, L_WG, L_WU + 1);
    const int hidden = s->hidden, M = s->M;
    float *ff = s->ff;
    FOR_SHARE(me, t, tiles_of(hidden)) {
        float gbuf[STACK_ROWS * NR], ubuf[STACK_ROWS * NR];
        for (int m0 = 0; m0 < M; m0 += STACK_ROWS) {
            const int m1 = M - m0 < STACK_ROWS ? M : m0 + STACK_ROWS;
            const int nr = layer_tile(s, L, L_WG, t, &s->a_dim, m0, m1, gbuf);
            layer_tile(s, L, L_WU, t, &s->a_dim, m0, m1, ubuf);
            for (int i = 0; i < (m1 - m0) * NR; i += 8) { /* silu(g) * u, in place in gbuf */
                const __m256 g = _mm256_loadu_ps(gbuf + i), e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
                _mm256_storeu_ps(gbuf + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), _mm256_loadu_ps(ubuf + i)));
            }
            for (int m = m0; m < m1; m++) memcpy(ff + (size_t)m * hidden + t * NR, gbuf + (size_t)(m - m0) * NR, sizeof(float) * nr);
        }
    }
    barrier(me);
    FOR_SHARE(me, m, M) act_quantize(&s->a_ff, ff, m, hidden);
    barrier(me);
    lora_down(me, s, L, L_WD, L_WD + 1, ff, hidden);
    add_projection(me, s, L, L_WD, &s->a_ff);
}

/* logits[i] = rmsnorm(x[logit_rows[i]]) Whead^T. */
static inline void output_head(const Me *me, const Step *s, const float *final_norm, const uint8_t *head, float *logits) {
    const int dim = s->dim, vocab = s->vocab, n_logits = s->n_logits, head_fmt = s->head_fmt;
    FOR_SHARE(me, i, n_logits) {
        rmsnorm(s->x + (size_t)s->logit_rows[i] * dim, final_norm, dim, s->eps, s->h + (size_t)i * dim);
        act_quantize(&s->a_dim, s->h, i, dim);
    }
    barrier(me);
    FOR_SHARE(me, t, tiles_of(vocab)) tile_into(head_fmt, head, vocab, dim, t, &s->a_dim, n_logits, logits);
}

typedef struct {
    Step s;
    const int64_t *layers;
    const float *final_norm;
    const uint8_t *head;
    void *kcache, *vcache;
    float *logits;
} Decode;

static void decode_job(void *ctx, const Me *me) {
    const Decode *j = ctx;
    const Step *s = &j->s;
    for (int l = 0; l < s->n_layers; l++) {
        Layer L;
        layer_view(&L, s, j->layers, l, j->kcache, j->vcache);
        norm_qkv(me, s, &L);
        rope_kv_write(me, s, &L);
        attention(me, s, &L);
        o_proj_residual(me, s, &L);
        mlp(me, s, &L);
    }
    output_head(me, s, j->final_norm, j->head, j->logits);
}

/* One step over M token rows, row m being token x[m] of the sequence in cache row (slot) row_slots[m] at
 * position positions[m]. Rows of one slot may be several consecutive positions (a prompt chunk): every
 * row's key and value are written before any row attends, and each attends to its slot's positions up
 * to its own. Logits (n_logits x vocab) are computed for rows logit_rows[0..n_logits-1] only.
 * Returns LAM_OK; LAM_ERR_RANGE, having done nothing, when a slot or position lies outside the cache;
 * LAM_ERR_CONFIG for a config of another layout or impossible shapes; LAM_ERR_NOMEM. */
int lam_llama_decode(const LamDecodeConfig *cfg, const int64_t *layers, const float *final_norm, const uint8_t *head,
                     const float *inv_freq, float *x, const int64_t *row_slots, const int64_t *positions, const int64_t *logit_rows,
                     void *kcache, void *vcache, float *logits) {
    if (cfg->size != (int64_t)sizeof *cfg || cfg->version != LAM_DECODE_CONFIG_VERSION) return LAM_ERR_CONFIG;
    Decode job = {.layers = layers, .final_norm = final_norm, .head = head, .kcache = kcache, .vcache = vcache, .logits = logits};
    const int status = step_init(&job.s, cfg, inv_freq, x, row_slots, positions, logit_rows);
    if (status != LAM_OK) return status;
    run_job(decode_job, &job, job.s.threads);
    step_free(&job.s);
    return LAM_OK;
}
