/* Lamina's CPU kernels: block-quantised matrix products and a fused Llama decode step (quantised or float weights).
 *
 * Built on first use by lamina.llm.kernels.native (cc -O3 -march=native -fopenmp) and loaded with ctypes; no
 * Python or PyTorch headers, so it compiles in about a second. OpenMP is the same libgomp PyTorch loads
 * (one thread pool, sized by torch.set_num_threads).
 *
 * Weight blocks (32 inputs each, one row of blocks per output feature):
 *   Q4: { fp16 d; fp16 m; u8 qs[16] }  w[j] = d * q[j] + m, q[j] = qs[j] & 15 (j < 16), qs[j - 16] >> 4
 *   Q8: { fp16 d; i8 qs[32] }          w[j] = d * qs[j]
 * Activations are quantised per row in blocks of 32 to int8 with a float scale (and the scaled sum of
 * the block, for Q4's offset), so each block's dot product is an integer dot product: u8 x s8 pairs
 * summed into int32 (AVX-VNNI's vpdpbusd where the CPU has it, AVX2's vpmaddubsw + vpmaddwd otherwise).
 *
 * Every output row is computed by the same instructions whatever the batch size M, so a sequence's
 * result does not depend on what it is batched with.
 *
 * The entry points that allocate return LAM_OK or an error code (the Python side raises on anything
 * else), and free what they allocated on every path.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define QK 32
enum { FMT_Q4 = 4, FMT_Q8 = 8, FMT_BF16 = 16, FMT_F32 = 32 };

/* Return codes, mirrored in lamina.llm.kernels.native (LAM_OK ...). */
enum { LAM_OK = 0, LAM_ERR_RANGE = 1, LAM_ERR_NOMEM = 2, LAM_ERR_CONFIG = 3 };

static inline int block_bytes(int fmt) { return fmt == FMT_Q4 ? 20 : fmt == FMT_Q8 ? 34 : fmt == FMT_BF16 ? 2 * QK : 4 * QK; }
static inline size_t row_bytes_of(int fmt, int K) { return (size_t)(K / QK) * block_bytes(fmt); }

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

/* 8 floats from float32 or bfloat16 memory. */
static inline __m256 load8(const void *p, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)p);
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Sum of u[i] * s[i] over each group of 4 bytes: 8 int32 (u unsigned, s signed). */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline __m256i q4_unpack(const uint8_t *qs) {
    const __m128i b = _mm_loadu_si128((const __m128i *)qs);
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(b, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    return _mm256_set_m128i(hi, lo);
}

/* ---- activations ------------------------------------------------------------------------------------ */

/* One row x (K floats) -> int8 qa (K); block b's scale goes to da[b * ld] and its scaled sum to sa[b * ld]. */
static void quantize_row(const float *x, int K, int8_t *qa, float *da, float *sa, size_t ld) {
    for (int b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.0f;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            const int q = (int)nearbyintf(xb[j] * id);
            qa[b * QK + j] = (int8_t)q;
            sum += q;
        }
        da[b * ld] = d;
        sa[b * ld] = d * (float)sum;
    }
}

/* M quantised activation rows: q row-major (M x K); scales block-major (K/32 x ld), so the scales of 8
 * consecutive rows for one block are one vector load. */
typedef struct {
    int8_t *q;
    float *d, *s;
    int K;
    size_t ld;
    const float *f; /* the float rows themselves (row stride ldf), for float weights */
    size_t ldf;
} Act;

#define MT 8 /* activation rows per pass over a weight row */

static void act_free(Act *a) {
    free(a->q);
    free(a->d);
    free(a->s);
}

/* LAM_OK or LAM_ERR_NOMEM; either way act_free releases what was allocated. */
static int act_alloc(Act *a, int M, int K) {
    a->K = K;
    a->ld = (size_t)M + MT; /* room to load a whole tile of scales past the last row */
    a->q = aligned_alloc(64, ((size_t)M * K + 63) / 64 * 64 + 64);
    a->d = calloc((size_t)(K / QK) * a->ld + 1, sizeof(float)); /* (+1: never a request for 0 bytes) */
    a->s = calloc((size_t)(K / QK) * a->ld + 1, sizeof(float));
    a->f = NULL;
    a->ldf = (size_t)K;
    return a->q && a->d && a->s ? LAM_OK : LAM_ERR_NOMEM;
}

static inline void act_quantize(const Act *a, const float *x, int m, int ldx) {
    quantize_row(x + (size_t)m * ldx, a->K, a->q + (size_t)m * a->K, a->d + m, a->s + m, a->ld);
}

/* ---- one output feature for M activation rows --------------------------------------------------------- */

/* Rows m0..m0+MTC-1 (MTC a constant after inlining, so the accumulators stay in registers). */
static inline __attribute__((always_inline)) void dot_tile(int fmt, const uint8_t *row, const Act *a, int m0, const int MTC, float *out, int ldo) {
    const int nb = a->K / QK;
    static const int32_t lane[MT][8] = {{0, 0, 0, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1, 1, 1}, {2, 2, 2, 2, 2, 2, 2, 2}, {3, 3, 3, 3, 3, 3, 3, 3},
                                        {4, 4, 4, 4, 4, 4, 4, 4}, {5, 5, 5, 5, 5, 5, 5, 5}, {6, 6, 6, 6, 6, 6, 6, 6}, {7, 7, 7, 7, 7, 7, 7, 7}};
    __m256 acc[MT];
    __m256 accm = _mm256_setzero_ps(); /* Q4's offsets: lane t for row m0 + t */
    float accm1 = 0.0f;                /* (the same for a single row) */
    for (int t = 0; t < MTC; t++) acc[t] = _mm256_setzero_ps();
    const int8_t *xq = a->q + (size_t)m0 * a->K;
    if (fmt == FMT_F32 || fmt == FMT_BF16) { /* float weights, float activations: plain FMAs */
        const float *xf = a->f + (size_t)m0 * a->ldf;
        const int bf = fmt == FMT_BF16;
        if (MTC == 1) { /* one row: four independent chains hide the FMA latency */
            __m256 c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
            int k = 0;
            for (; k + 32 <= a->K; k += 32) {
                acc[0] = _mm256_fmadd_ps(load8(row + (size_t)k * (bf ? 2 : 4), bf), _mm256_loadu_ps(xf + k), acc[0]);
                c1 = _mm256_fmadd_ps(load8(row + (size_t)(k + 8) * (bf ? 2 : 4), bf), _mm256_loadu_ps(xf + k + 8), c1);
                c2 = _mm256_fmadd_ps(load8(row + (size_t)(k + 16) * (bf ? 2 : 4), bf), _mm256_loadu_ps(xf + k + 16), c2);
                c3 = _mm256_fmadd_ps(load8(row + (size_t)(k + 24) * (bf ? 2 : 4), bf), _mm256_loadu_ps(xf + k + 24), c3);
            }
            acc[0] = _mm256_add_ps(_mm256_add_ps(acc[0], c1), _mm256_add_ps(c2, c3));
        } else {
            for (int k = 0; k < a->K; k += 8) {
                const __m256 w = load8(row + (size_t)k * (bf ? 2 : 4), bf);
                for (int t = 0; t < MTC; t++) acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xf + (size_t)t * a->ldf + k), acc[t]);
            }
        }
    } else if (fmt == FMT_Q4) {
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = row + (size_t)b * 20;
            const float d = f16_to_f32(blk);
            const __m256 scales = MTC == 1 ? _mm256_set1_ps(d * a->d[b * a->ld + m0]) : _mm256_mul_ps(_mm256_set1_ps(d), _mm256_loadu_ps(a->d + b * a->ld + m0));
            if (MTC == 1)
                accm1 += f16_to_f32(blk + 2) * a->s[b * a->ld + m0];
            else
                accm = _mm256_fmadd_ps(_mm256_set1_ps(f16_to_f32(blk + 2)), _mm256_loadu_ps(a->s + b * a->ld + m0), accm);
            const __m256i w = q4_unpack(blk + 4);
            for (int t = 0; t < MTC; t++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)t * a->K + b * QK));
                const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(w, x));
                const __m256 sc = MTC == 1 ? scales : _mm256_permutevar8x32_ps(scales, _mm256_loadu_si256((const __m256i *)lane[t]));
                acc[t] = _mm256_fmadd_ps(p, sc, acc[t]);
            }
        }
    } else {
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = row + (size_t)b * 34;
            const float d = f16_to_f32(blk);
            const __m256 scales = MTC == 1 ? _mm256_set1_ps(d * a->d[b * a->ld + m0]) : _mm256_mul_ps(_mm256_set1_ps(d), _mm256_loadu_ps(a->d + b * a->ld + m0));
            const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2));
            const __m256i wabs = _mm256_sign_epi8(w, w);
            for (int t = 0; t < MTC; t++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)t * a->K + b * QK));
                const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(wabs, _mm256_sign_epi8(x, w)));
                const __m256 sc = MTC == 1 ? scales : _mm256_permutevar8x32_ps(scales, _mm256_loadu_si256((const __m256i *)lane[t]));
                acc[t] = _mm256_fmadd_ps(p, sc, acc[t]);
            }
        }
    }
    float offs[8];
    _mm256_storeu_ps(offs, accm);
    offs[0] += accm1;
    for (int t = 0; t < MTC; t++) out[(size_t)(m0 + t) * ldo] = hsum256(acc[t]) + offs[t];
}

/* out[m * ldo] = dot(weight row n, activation row m) for m0 <= m < m1. */
static void dot_rows(int fmt, const uint8_t *row, const Act *a, int m0, int m1, float *out, int ldo) {
    int m = m0;
    for (; m + MT <= m1; m += MT) dot_tile(fmt, row, a, m, MT, out, ldo);
    switch (m1 - m) {
    case 7: dot_tile(fmt, row, a, m, 7, out, ldo); break;
    case 6: dot_tile(fmt, row, a, m, 6, out, ldo); break;
    case 5: dot_tile(fmt, row, a, m, 5, out, ldo); break;
    case 4: dot_tile(fmt, row, a, m, 4, out, ldo); break;
    case 3: dot_tile(fmt, row, a, m, 3, out, ldo); break;
    case 2: dot_tile(fmt, row, a, m, 2, out, ldo); break;
    case 1: dot_tile(fmt, row, a, m, 1, out, ldo); break;
    default: break;
    }
}

static inline void dot_row(int fmt, const uint8_t *row, const Act *a, int M, float *out, int ldo) { dot_rows(fmt, row, a, 0, M, out, ldo); }

/* ---- y = x W^T for a block-quantised W (N x K); x (M x K) float32, y (M x N) float32 -------------------- */

int lam_matmul(int fmt, const uint8_t *w, int N, int K, const float *x, int M, float *y, int threads) {
    Act a;
    if (act_alloc(&a, M, K) != LAM_OK) {
        act_free(&a);
        return LAM_ERR_NOMEM;
    }
    const size_t row_bytes = row_bytes_of(fmt, K);
    a.f = x;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) act_quantize(&a, x, m, K);
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) dot_row(fmt, w + n * row_bytes, &a, M, y + n, N);
    }
    act_free(&a);
    return LAM_OK;
}

/* ---- W as floats (N x K), float32 or bfloat16: for long inputs, where a float GEMM beats integer dots ---- */

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

void lam_dequant(int fmt, const uint8_t *w, int N, int K, void *out, int bf16, int threads) {
    const int nb = K / QK;
    const size_t row_bytes = (size_t)nb * block_bytes(fmt);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++) {
        float tmp[QK];
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = w + n * row_bytes + (size_t)b * block_bytes(fmt);
            const float d = f16_to_f32(blk);
            if (fmt == FMT_Q4) {
                const float mn = f16_to_f32(blk + 2);
                for (int j = 0; j < 16; j++) {
                    tmp[j] = d * (float)(blk[4 + j] & 15) + mn;
                    tmp[j + 16] = d * (float)(blk[4 + j] >> 4) + mn;
                }
            } else {
                for (int j = 0; j < QK; j++) tmp[j] = d * (float)(int8_t)blk[2 + j];
            }
            const size_t at = (size_t)n * K + (size_t)b * QK;
            if (bf16)
                for (int j = 0; j < QK; j++) ((uint16_t *)out)[at + j] = f32_to_bf16(tmp[j]);
            else
                memcpy((float *)out + at, tmp, sizeof tmp);
        }
    }
}

/* ---- the fused decode step ------------------------------------------------------------------------------- */

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

static void rope(float *v, int hd, const float *inv_freq, float pos) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float ang = pos * inv_freq[i];
        const float c = cosf(ang), s = sinf(ang);
        const float x0 = v[i], x1 = v[i + half];
        v[i] = x0 * c - x1 * s;
        v[i + half] = x1 * c + x0 * s;
    }
}

/* The decode step's shapes and options, mirrored by DecodeConfig (a ctypes.Structure) in lamina.llm.kernels.native.
 * `size` and `version` are checked on every call (LAM_ERR_CONFIG), and Python compares both with
 * lam_decode_config_size/_version when it loads the library: the two cannot drift apart silently. Bump the
 * version when a field changes meaning. */
#define LAM_DECODE_CONFIG_VERSION 1
typedef struct {
    int64_t size;    /* sizeof(LamDecodeConfig) as the caller laid it out */
    int64_t version; /* LAM_DECODE_CONFIG_VERSION */
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, hidden, vocab;
    int64_t rows;            /* M, the token rows of this call */
    int64_t slots, capacity; /* the KV cache: `slots` rows of `capacity` positions */
    int64_t kv_bf16;         /* keys and values are stored as bfloat16 (else float32) */
    int64_t window;          /* sliding-window span; 0 for full attention */
    int64_t head_fmt;        /* the output head's weight format (FMT_*) */
    int64_t threads;         /* OpenMP threads */
    int64_t n_logits;        /* rows whose logits are wanted: logit_rows[0 .. n_logits-1] */
    float eps;               /* RMSNorm epsilon */
} LamDecodeConfig;

int64_t lam_decode_config_size(void) { return (int64_t)sizeof(LamDecodeConfig); }
int64_t lam_decode_config_version(void) { return LAM_DECODE_CONFIG_VERSION; }

/* Per layer, in this order: weight pointers q k v o gate up down, their formats (7), norm weights
 * (attention, mlp), biases q k v (0 when absent). */
enum { L_WQ, L_WK, L_WV, L_WO, L_WG, L_WU, L_WD, L_FQ, L_FK, L_FV, L_FO, L_FG, L_FU, L_FD, L_NA, L_NM, L_BQ, L_BK, L_BV, L_N };

/* Up to STACK_ROWS activation rows, one output feature's results fit a buffer on the stack; past that the
 * projections write into scratch rows that are free at that point, and the MLP goes in chunks of this many. */
#define STACK_ROWS (MT * 16)

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
    float *scores;     /* score_ld floats per thread: one head's attention weights */
    size_t score_ld;
    Act a_dim, a_att, a_ff; /* h, att and ff as int8 blocks (and as the float rows, for float weights) */
} Step;

/* One layer's row of the layer table, unpacked (each thread keeps its own copy). */
typedef struct {
    const uint8_t *w[7]; /* indexed by L_WQ .. L_WD */
    int fmt[7];
    size_t rb[7]; /* bytes per weight row */
    const float *bias[3], *norm_att, *norm_mlp;
    char *kl, *vl; /* this layer's keys and values in the cache */
} Layer;

static void *alloc(size_t bytes) { return malloc(bytes ? bytes : 1); /* (NULL means out of memory only) */ }

static void step_free(Step *s) {
    free(s->h), free(s->qkv), free(s->att), free(s->ff), free(s->scores);
    act_free(&s->a_dim), act_free(&s->a_att), act_free(&s->a_ff);
}

/* Checks the request against the cache and allocates the scratch: LAM_OK, or an error with nothing allocated. */
static int step_init(Step *s, const LamDecodeConfig *c, const float *inv_freq, float *x, const int64_t *row_slots,
                     const int64_t *positions, const int64_t *logit_rows) {
    memset(s, 0, sizeof *s);
    if (c->n_kv_heads < 1 || c->n_heads % c->n_kv_heads || c->head_dim % 8 || c->rows < 0 || c->n_logits < 0 || c->threads < 1)
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
    int64_t max_pos = 0;
    for (int i = 0; i < s->n_logits; i++)
        if (logit_rows[i] < 0 || logit_rows[i] >= M) return LAM_ERR_RANGE;
    for (int m = 0; m < M; m++) {
        if (positions[m] < 0 || positions[m] >= s->cap || row_slots[m] < 0 || row_slots[m] >= s->slots) return LAM_ERR_RANGE;
        if (positions[m] > max_pos) max_pos = positions[m];
    }
    s->h = alloc(sizeof(float) * (size_t)M * (s->dim > s->nq ? s->dim : s->nq));
    s->qkv = alloc(sizeof(float) * (size_t)M * s->nqkv);
    s->att = alloc(sizeof(float) * (size_t)M * s->nq);
    s->ff = alloc(sizeof(float) * (size_t)M * s->hidden);
    s->score_ld = ((size_t)max_pos + 1 + 15) / 16 * 16; /* whole cache lines: no two threads share one */
    s->scores = aligned_alloc(64, sizeof(float) * s->score_ld * (size_t)s->threads);
    const int acts = act_alloc(&s->a_dim, M, s->dim) | act_alloc(&s->a_att, M, s->nq) | act_alloc(&s->a_ff, M, s->hidden);
    if (!s->h || !s->qkv || !s->att || !s->ff || !s->scores || acts != LAM_OK) {
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
    for (int i = 0; i < 7; i++) L->rb[i] = row_bytes_of(L->fmt[i], i == L_WO ? s->nq : i == L_WD ? s->hidden : s->dim);
    for (int i = 0; i < 3; i++) L->bias[i] = (const float *)(intptr_t)row[L_BQ + i];
    L->norm_att = (const float *)(intptr_t)row[L_NA], L->norm_mlp = (const float *)(intptr_t)row[L_NM];
    const size_t layer_bytes = (size_t)s->slots * s->nkv * s->cap * s->hd * s->esz;
    L->kl = (char *)kcache + (size_t)l * layer_bytes;
    L->vl = (char *)vcache + (size_t)l * layer_bytes;
}

/* ---- the phases of one layer (each a few `omp for`s of the enclosing parallel region) ------------------- */

/* h = rmsnorm(x) row by row, quantised into a_dim for the projections that follow. */
static inline void norm_rows(const Step *s, const float *weight) {
    const int dim = s->dim;
#pragma omp for schedule(static)
    for (int m = 0; m < s->M; m++) {
        rmsnorm(s->x + (size_t)m * dim, weight, dim, s->eps, s->h + (size_t)m * dim);
        act_quantize(&s->a_dim, s->h, m, dim);
    }
}

/* qkv = rmsnorm(x) [Wq | Wk | Wv]^T (+ biases), one fused row per token row. */
static inline void norm_qkv(const Step *s, const Layer *L) {
    norm_rows(s, L->norm_att);
    const int nq = s->nq, nk = s->nk, nqkv = s->nqkv, M = s->M;
    float *qkv = s->qkv;
#pragma omp for schedule(static)
    for (int n = 0; n < nqkv; n++) {
        const int which = n < nq ? 0 : n < nq + nk ? 1 : 2;
        const int r = which == 0 ? n : which == 1 ? n - nq : n - nq - nk;
        dot_row(L->fmt[L_WQ + which], L->w[L_WQ + which] + r * L->rb[L_WQ + which], &s->a_dim, M, qkv + n, nqkv);
        if (L->bias[which])
            for (int m = 0; m < M; m++) qkv[(size_t)m * nqkv + n] += L->bias[which][r];
    }
}

/* RoPE on q and k at each row's position; k and v written to the row's slot in the cache. */
static inline void rope_kv_write(const Step *s, const Layer *L) {
    const int nkv = s->nkv, hd = s->hd, nq = s->nq, nk = s->nk, rep = s->rep;
    const int64_t cap = s->cap;
#pragma omp for schedule(static)
    for (int i = 0; i < s->M * nkv; i++) {
        const int m = i / nkv, g = i % nkv;
        float *row = s->qkv + (size_t)m * s->nqkv;
        const float pos = (float)s->positions[m];
        for (int j = 0; j < rep; j++) rope(row + (size_t)(g * rep + j) * hd, hd, s->inv_freq, pos);
        float *k = row + nq + g * hd, *v = row + nq + nk + g * hd;
        rope(k, hd, s->inv_freq, pos);
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
}

/* att = softmax(q k^T / sqrt(hd)) v per row and head, over the slot's positions up to the row's own (within
 * the sliding window, where there is one). */
static inline void attention(const Step *s, const Layer *L) {
    const int nh = s->nh, nkv = s->nkv, hd = s->hd, rep = s->rep, kv_bf16 = s->kv_bf16, window = s->window;
    const int64_t cap = s->cap;
    const size_t esz = s->esz;
    const float scale = s->scale;
    float *scores = s->scores + (size_t)omp_get_thread_num() * s->score_ld;
#pragma omp for schedule(static)
    for (int i = 0; i < s->M * nh; i++) {
        const int m = i / nh, hh = i % nh, g = hh / rep;
        const float *q = s->qkv + (size_t)m * s->nqkv + (size_t)hh * hd;
        const int64_t last = s->positions[m];
        const int64_t first = window > 0 && last - window + 1 > 0 ? last - window + 1 : 0;
        const char *kb = L->kl + ((size_t)s->row_slots[m] * nkv + g) * cap * hd * esz;
        const char *vb = L->vl + ((size_t)s->row_slots[m] * nkv + g) * cap * hd * esz;
        float mx = -INFINITY;
        for (int64_t j = first; j <= last; j++) {
            __m256 acc = _mm256_setzero_ps();
            const char *kr = kb + (size_t)j * hd * esz;
            for (int d = 0; d < hd; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(kr + d * esz, kv_bf16), acc);
            const float sc = hsum256(acc) * scale;
            scores[j - first] = sc;
            mx = sc > mx ? sc : mx;
        }
        float sum = 0.0f;
        for (int64_t j = first; j <= last; j++) {
            const float e = expf(scores[j - first] - mx);
            scores[j - first] = e;
            sum += e;
        }
        float *o = s->att + (size_t)m * s->nq + (size_t)hh * hd;
        for (int d = 0; d < hd; d += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t j = first; j <= last; j++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[j - first]), load8(vb + ((size_t)j * hd + d) * esz, kv_bf16), acc);
            _mm256_storeu_ps(o + d, _mm256_mul_ps(acc, _mm256_set1_ps(1.0f / sum)));
        }
    }
}

/* x += a W^T for W (dim x K): o_proj and down_proj, each with its residual add. */
static inline void add_projection(const Step *s, int fmt, const uint8_t *w, size_t rb, const Act *a) {
    const int dim = s->dim, M = s->M;
    float *x = s->x, *h = s->h;
#pragma omp for schedule(static)
    for (int n = 0; n < dim; n++) {
        float y[STACK_ROWS];
        float *yp = M <= STACK_ROWS ? y : h + n; /* (large M: h is free here, one column each) */
        const int ld = M <= STACK_ROWS ? 1 : dim;
        dot_row(fmt, w + n * rb, a, M, yp, ld);
        for (int m = 0; m < M; m++) x[(size_t)m * dim + n] += yp[(size_t)m * ld];
    }
}

/* x += att Wo^T. */
static inline void o_proj_residual(const Step *s, const Layer *L) {
#pragma omp for schedule(static)
    for (int m = 0; m < s->M; m++) act_quantize(&s->a_att, s->att, m, s->nq);
    add_projection(s, L->fmt[L_WO], L->w[L_WO], L->rb[L_WO], &s->a_att);
}

/* x += (silu(h Wg^T) * h Wu^T) Wd^T, h = rmsnorm(x). */
static inline void mlp(const Step *s, const Layer *L) {
    norm_rows(s, L->norm_mlp);
    const int hidden = s->hidden, M = s->M;
    const int fg = L->fmt[L_WG], fu = L->fmt[L_WU];
    const uint8_t *wg = L->w[L_WG], *wu = L->w[L_WU];
    const size_t rg = L->rb[L_WG], ru = L->rb[L_WU];
    float *ff = s->ff;
#pragma omp for schedule(static)
    for (int n = 0; n < hidden; n++) {
        float gbuf[STACK_ROWS], ubuf[STACK_ROWS];
        if (M <= STACK_ROWS) {
            dot_row(fg, wg + n * rg, &s->a_dim, M, gbuf, 1);
            dot_row(fu, wu + n * ru, &s->a_dim, M, ubuf, 1);
            for (int m = 0; m < M; m++) ff[(size_t)m * hidden + n] = gbuf[m] / (1.0f + expf(-gbuf[m])) * ubuf[m];
        } else {
            for (int m0 = 0; m0 < M; m0 += STACK_ROWS) {
                const int m1 = M - m0 < STACK_ROWS ? M : m0 + STACK_ROWS;
                dot_rows(fg, wg + n * rg, &s->a_dim, m0, m1, gbuf - m0, 1);
                dot_rows(fu, wu + n * ru, &s->a_dim, m0, m1, ubuf - m0, 1);
                for (int m = m0; m < m1; m++) ff[(size_t)m * hidden + n] = gbuf[m - m0] / (1.0f + expf(-gbuf[m - m0])) * ubuf[m - m0];
            }
        }
    }
#pragma omp for schedule(static)
    for (int m = 0; m < M; m++) act_quantize(&s->a_ff, ff, m, hidden);
    add_projection(s, L->fmt[L_WD], L->w[L_WD], L->rb[L_WD], &s->a_ff);
}

/* logits[i] = rmsnorm(x[logit_rows[i]]) Whead^T. */
static inline void output_head(const Step *s, const float *final_norm, const uint8_t *head, float *logits) {
    const int dim = s->dim, vocab = s->vocab, n_logits = s->n_logits, head_fmt = s->head_fmt;
#pragma omp for schedule(static)
    for (int i = 0; i < n_logits; i++) {
        rmsnorm(s->x + (size_t)s->logit_rows[i] * dim, final_norm, dim, s->eps, s->h + (size_t)i * dim);
        act_quantize(&s->a_dim, s->h, i, dim);
    }
    const size_t head_rb = row_bytes_of(head_fmt, dim);
#pragma omp for schedule(static)
    for (int n = 0; n < vocab; n++) dot_row(head_fmt, head + n * head_rb, &s->a_dim, n_logits, logits + n, vocab);
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
    Step s;
    const int status = step_init(&s, cfg, inv_freq, x, row_slots, positions, logit_rows);
    if (status != LAM_OK) return status;
#pragma omp parallel num_threads(s.threads)
    {
        for (int l = 0; l < s.n_layers; l++) {
            Layer L;
            layer_view(&L, &s, layers, l, kcache, vcache);
            norm_qkv(&s, &L);
            rope_kv_write(&s, &L);
            attention(&s, &L);
            o_proj_residual(&s, &L);
            mlp(&s, &L);
        }
        output_head(&s, final_norm, head, logits);
    }
    step_free(&s);
    return LAM_OK;
}
