/* The small operations of a CPU forward step, one call each instead of five to fifteen torch operators.
 *
 * Why: a decode step on this kind of CPU spends as long in norms, RoPE, SwiGLU's activation and attention over a
 * handful of cached keys as in the matrix products (models/csrc/packed_matmul.c): each torch operator costs
 * 5-20 us of dispatch and allocation whatever its size, and a layer needs dozens of them. Everything here is
 * fp32, row-wise (a row's result never depends on the other rows of the batch) and follows the reference's order
 * of operations (models/layers.py); only the order of additions inside a reduction may differ from torch's.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define UNROLL8 _Pragma("GCC unroll 8")

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* e^x for 8 lanes: x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^7 (relative error ~1e-8,
 * below fp32's rounding), times 2^n built in the exponent bits. Inputs are clamped to where 2^n is a normal. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts (Cody-Waite) */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float exp1(float x) { /* the same e^x for one value (tails), so a row never mixes two exps */
    float lanes[8];
    _mm256_storeu_ps(lanes, exp256(_mm256_set1_ps(x)));
    return lanes[0];
}

/* 1 / sqrt(mean(x^2) + eps), the factor of Llama's RMS norm (and of its weightless q/k norm). */
static inline float rms_factor(const float *x, int64_t n, float eps) {
    return 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
}

/* y = (x * r) * w per row, r = rms_factor(x); w may be NULL (weightless). With d given, x = h + d is formed
 * first and written to h_out (the residual stream), so "add then normalise" is one pass. */
void rms_norm(const float *h, int64_t ldh, const float *d, int64_t ldd, float *h_out, int64_t M, int64_t D,
              const float *w, float eps, float *y, int64_t ldy, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && M * D >= 65536)
    for (int64_t m = 0; m < M; m++) {
        const float *x = h + m * ldh;
        if (d) {
            float *o = h_out + m * D;
            for (int64_t i = 0; i < D; i++) o[i] = x[i] + d[m * ldd + i];
            x = o;
        }
        const float r = rms_factor(x, D, eps);
        float *out = y + m * ldy;
        if (w)
            for (int64_t i = 0; i < D; i++) out[i] = (x[i] * r) * w[i];
        else
            for (int64_t i = 0; i < D; i++) out[i] = x[i] * r;
    }
}

/* In place on the q and k heads of one token row (q: H heads, then k: Hkv heads, each Dh, contiguous as the fused
 * q|k|v projection leaves them): RoPE on adjacent pairs (Llama 4's complex form) when cos/sin are given, then the
 * weightless q/k norm when qk_norm, then q times q_scale[t] (NoPE temperature tuning) when q_scale is given. */
void rope_qk(float *qkv, int64_t ld, int64_t T, int64_t H, int64_t Hkv, int64_t Dh, const float *cos_TF,
             const float *sin_TF, int qk_norm, float eps, const float *q_scale, int nthreads) {
    const int64_t F = Dh / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && T * (H + Hkv) * Dh >= 65536)
    for (int64_t t = 0; t < T; t++) {
        float *row = qkv + t * ld;
        for (int64_t h = 0; h < H + Hkv; h++) {
            float *x = row + h * Dh;
            if (cos_TF) {
                const float *c = cos_TF + t * F, *s = sin_TF + t * F;
                for (int64_t f = 0; f < F; f++) {
                    const float a = x[2 * f], b = x[2 * f + 1];
                    x[2 * f] = a * c[f] - b * s[f];
                    x[2 * f + 1] = a * s[f] + b * c[f];
                }
            }
            if (qk_norm) {
                const float r = rms_factor(x, Dh, eps);
                for (int64_t i = 0; i < Dh; i++) x[i] *= r;
            }
            if (q_scale && h < H)
                for (int64_t i = 0; i < Dh; i++) x[i] *= q_scale[t];
        }
    }
}

/* y[m, :F] = silu(g) * u with g = x[m, :F], u = x[m, F:2F] (gate and up fused along the last dim). */
void silu_mul(const float *x, int64_t M, int64_t F, float *y, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && M * F >= 65536)
    for (int64_t m = 0; m < M; m++) {
        const float *g = x + m * 2 * F, *u = g + F;
        float *o = y + m * F;
        int64_t i = 0;
        for (; i + 8 <= F; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i), one = _mm256_set1_ps(1.0f);
            const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
        }
        for (; i < F; i++) o[i] = g[i] / (1.0f + exp1(-g[i])) * u[i];
    }
}

/* r[k] = the sum of the 8 lanes of a[k], for 8 vectors at once. */
static inline __m256 hsum8(const __m256 a[8]) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Keys from which paged_decode_attention sums the values keys-outer, for one sequence and for several. Against
 * heads-outer in one process (identical outputs), keys-outer measured 0.9-1.1x at 160 keys; one sequence
 * 0.95-1.03x at 1024 keys, 0.89-1.04x at 2048, 1.08-1.44x at 4096; 8 or 32 sequences of 1024 keys 1.12-1.28x (two
 * threads then stream values side by side, and reading each row once is what counts). */
#define PV_KEYS_OUTER_ONE 4096
#define PV_KEYS_OUTER_MANY 1024

/* Attention of one new token per sequence over its visible keys in a paged cache.
 *
 * Sequence s sees keys at logical offsets first[s] .. first[s] + len[s] - 1 of its block table blocks[s, :]
 * (offset o lives in slot blocks[s, o / bs] * bs + o % bs of the cache [slots][Hkv][Dh]); its own new key/value
 * (k_new/v_new row s, when given) are written to the last of those slots first. Query head h uses kv head
 * h / (H / Hkv). Softmax in two passes over the scores (max, then exp and sum), as SDPA's math does.
 *
 * One task per sequence, so each cached key/value row (all kv heads, contiguous) is read once, in block order:
 * the row is what memory delivers, and 8 query heads are scored against it with independent FMA chains.
 * Needs Dh % 8 == 0. ``scratch`` holds nthreads x per_thread floats, per_thread >= Hp * max(len) + Hp + Hp * Dh. */
void paged_decode_attention(const float *q, int64_t ldq, const float *k_new, const float *v_new, int64_t ldkv,
                            float *k_cache, float *v_cache, const int64_t *blocks, int64_t max_blocks,
                            const int64_t *first, const int64_t *len, int64_t S, int64_t H, int64_t Hkv, int64_t Dh,
                            int64_t bs, float scale, float *out, float *scratch, int64_t per_thread, int nthreads) {
    const int64_t G = H / Hkv, row = Hkv * Dh, Hp = (H + 7) / 8 * 8; /* scores [L][Hp], heads padded to 8 */
    if (k_new)
        for (int64_t s = 0; s < S; s++) {
            const int64_t o = first[s] + len[s] - 1, slot = blocks[s * max_blocks + o / bs] * bs + o % bs;
            for (int64_t i = 0; i < row; i++)
                k_cache[slot * row + i] = k_new[s * ldkv + i], v_cache[slot * row + i] = v_new[s * ldkv + i];
        }
    int64_t longest = 1, keys = 0;
    for (int64_t s = 0; s < S; s++) longest = len[s] > longest ? len[s] : longest, keys += len[s];
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && S > 1 && keys * H * Dh >= 65536)
    {
        /* per thread: scores [longest][Hp], 1/sum [Hp], padded q [Hp][Dh]; 32-byte aligned (the caller's buffer
         * is, and per_thread is a multiple of 8 floats) */
        float *p = scratch + omp_get_thread_num() * per_thread;
        float *inv = p + Hp * longest, *qpad = inv + Hp;
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < S; s++) {
            const int64_t L = len[s], *tab = blocks + s * max_blocks;
            const float *qs = q + s * ldq;
            /* scores p[j][h] = q_h . k_j * scale; q padded to whole groups of 8 heads (zeros score 0, unused) */
            for (int64_t i = 0; i < Hp * Dh; i++) qpad[i] = i < H * Dh ? qs[i] : 0.0f;
            for (int64_t j = 0; j < L; j++) {
                const int64_t o = first[s] + j;
                const float *k = k_cache + (tab[o / bs] * bs + o % bs) * row;
                for (int64_t hb = 0; hb < Hp; hb += 8) {
                    const float *kh[8];
                    UNROLL8 for (int h = 0; h < 8; h++) kh[h] = k + (hb + h < H ? (hb + h) / G : 0) * Dh;
                    __m256 acc[8];
                    UNROLL8 for (int h = 0; h < 8; h++) acc[h] = _mm256_setzero_ps();
                    for (int64_t i = 0; i < Dh; i += 8)
                        UNROLL8 for (int h = 0; h < 8; h++)
                            acc[h] = _mm256_fmadd_ps(_mm256_load_ps(qpad + (hb + h) * Dh + i),
                                                     _mm256_loadu_ps(kh[h] + i), acc[h]);
                    _mm256_storeu_ps(p + j * Hp + hb, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
                }
            }
            /* softmax over j for 8 heads at a time (lanes = heads) */
            for (int64_t hb = 0; hb < Hp; hb += 8) {
                __m256 mx = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
                for (int64_t j = 0; j < L; j++) mx = _mm256_max_ps(mx, _mm256_loadu_ps(p + j * Hp + hb));
                for (int64_t j = 0; j < L; j++) {
                    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j * Hp + hb), mx));
                    _mm256_storeu_ps(p + j * Hp + hb, e);
                    sum = _mm256_add_ps(sum, e);
                }
                _mm256_storeu_ps(inv + hb, _mm256_div_ps(_mm256_set1_ps(1.0f), sum));
            }
            /* out_h = sum_j p[j][h] v_j, each output one FMA chain over j in order either way. Many keys: keys
             * outer, every head accumulated in place in out, so each value row is read once (its rows no longer
             * stay in cache from one head to the next); few keys: heads outer, in registers. */
            if (L >= (S > 1 ? PV_KEYS_OUTER_MANY : PV_KEYS_OUTER_ONE)) {
                float *os = out + s * H * Dh;
                for (int64_t i = 0; i < H * Dh; i++) os[i] = 0.0f;
                for (int64_t j = 0; j < L; j++) {
                    const int64_t o = first[s] + j;
                    const float *vr = v_cache + (tab[o / bs] * bs + o % bs) * row;
                    for (int64_t h = 0; h < H; h++) {
                        const __m256 pj = _mm256_set1_ps(p[j * Hp + h] * inv[h]);
                        const float *vh = vr + h / G * Dh;
                        float *oh = os + h * Dh;
                        for (int64_t d = 0; d < Dh; d += 8)
                            _mm256_storeu_ps(oh + d, _mm256_fmadd_ps(pj, _mm256_loadu_ps(vh + d), _mm256_loadu_ps(oh + d)));
                    }
                }
                continue;
            }
            /* 64 dims (8 accumulators) at a time, then what is left 8 at a time */
            for (int64_t h = 0; h < H; h++) {
                int64_t d0 = 0;
                for (; d0 + 64 <= Dh; d0 += 64) {
                    __m256 acc[8];
                    UNROLL8 for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_ps();
                    for (int64_t j = 0; j < L; j++) {
                        const int64_t o = first[s] + j;
                        const float *vr = v_cache + (tab[o / bs] * bs + o % bs) * row + h / G * Dh + d0;
                        const __m256 pj = _mm256_set1_ps(p[j * Hp + h] * inv[h]);
                        UNROLL8 for (int v = 0; v < 8; v++) acc[v] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * v), acc[v]);
                    }
                    UNROLL8 for (int v = 0; v < 8; v++) _mm256_storeu_ps(out + (s * H + h) * Dh + d0 + 8 * v, acc[v]);
                }
                for (; d0 < Dh; d0 += 8) {
                    __m256 acc = _mm256_setzero_ps();
                    for (int64_t j = 0; j < L; j++) {
                        const int64_t o = first[s] + j;
                        const float *vr = v_cache + (tab[o / bs] * bs + o % bs) * row + h / G * Dh + d0;
                        acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j * Hp + h] * inv[h]), _mm256_loadu_ps(vr), acc);
                    }
                    _mm256_storeu_ps(out + (s * H + h) * Dh + d0, acc);
                }
            }
        }
    }
}

/* MoE routing for T tokens and E experts, top-K: the expert ids of each token, best first (the lowest id wins a
 * tie), and their sigmoid scores. */
void topk_sigmoid(const float *logits, int64_t T, int64_t E, int64_t K, float *scores, int64_t *ids) {
    for (int64_t t = 0; t < T; t++) {
        const float *l = logits + t * E;
        for (int64_t k = 0; k < K; k++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t j = 0; j < k; j++) taken |= ids[t * K + j] == e;
                if (!taken && (best < 0 || l[e] > l[best])) best = e;
            }
            ids[t * K + k] = best;
            scores[t * K + k] = 1.0f / (1.0f + expf(-l[best]));
        }
    }
}

/* Slots t*K+k laid out expert-major (a stable counting sort: token order within an expert): slot[S], counts[E]. */
void route_sort(const int64_t *ids, int64_t S, int64_t E, int64_t *slot, int64_t *counts) {
    int64_t *next = calloc(E + 1, sizeof(int64_t));
    for (int64_t e = 0; e < E; e++) counts[e] = 0;
    for (int64_t i = 0; i < S; i++) counts[ids[i]]++;
    for (int64_t e = 0; e < E; e++) next[e + 1] = next[e] + counts[e];
    for (int64_t i = 0; i < S; i++) slot[next[ids[i]]++] = i;
    free(next);
}

/* rows[i] = x[slot[i] / K] * scores[slot[i]]: each expert-major row scaled by its routing score. */
void gather_scaled(const float *x, int64_t ldx, const float *scores, const int64_t *slot, int64_t S, int64_t K,
                   int64_t D, float *rows) {
    for (int64_t i = 0; i < S; i++) {
        const float *xr = x + slot[i] / K * ldx, sc = scores[slot[i]];
        for (int64_t d = 0; d < D; d++) rows[i * D + d] = xr[d] * sc;
    }
}

/* y[t] = sum over k (in order) of the expert-major row that holds slot t*K+k. */
void scatter_sum(const float *rows, const int64_t *slot, int64_t T, int64_t K, int64_t D, float *y) {
    int64_t *where = malloc(sizeof(int64_t) * (T * K > 0 ? T * K : 1));
    for (int64_t i = 0; i < T * K; i++) where[slot[i]] = i;
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++) {
            const float *r = rows + where[t * K + k] * D;
            float *yt = y + t * D;
            if (k == 0)
                for (int64_t d = 0; d < D; d++) yt[d] = r[d];
            else
                for (int64_t d = 0; d < D; d++) yt[d] += r[d];
        }
    free(where);
}

void packed_linear(const float *x, int64_t M, int64_t K, const void *w, int w_bf16, int64_t N, float *y,
                   int nthreads);

static void add_bias(float *y, int64_t M, int64_t N, const float *bias) {
    if (bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] += bias[n];
}

/* A whole attention sub-layer for T rows that the attention kernel takes (decodes, short prompts), one call
 * instead of ten: x = norm_in(h); q|k|v = x W_qkv (+ bias); RoPE / q/k norm / temperature in place; attention over
 * the paged cache (writing the new K/V); o = att W_o (+ bias); h_out = h + o; x_out = norm_post(h_out).
 * work: T * (2 D + (2 H + 2 Hkv) Dh) floats. Each step is the function of the same name above, so the numbers are
 * those of the one-call-per-step path. */
void attention_block(const float *h, int64_t T, int64_t D, const float *w_in, float eps, const void *qkv_w,
                     int qkv_bf16, const float *qkv_bias, int64_t H, int64_t Hkv, int64_t Dh, const float *cos_TF,
                     const float *sin_TF, int qk_norm, const float *q_scale, float *k_cache, float *v_cache,
                     const int64_t *blocks, int64_t max_blocks, const int64_t *first, const int64_t *len, int64_t bs,
                     float attn_scale, float *att_scratch, int64_t per_thread, const void *o_w, int o_bf16,
                     const float *o_bias, const float *w_post, float *work, float *h_out, float *x_out,
                     int nthreads) {
    const int64_t N = (H + 2 * Hkv) * Dh;
    float *x1 = work, *qkv = x1 + T * D, *att = qkv + T * N, *o = att + T * H * Dh;
    rms_norm(h, D, NULL, 0, NULL, T, D, w_in, eps, x1, D, nthreads);
    packed_linear(x1, T, D, qkv_w, qkv_bf16, N, qkv, nthreads);
    add_bias(qkv, T, N, qkv_bias);
    rope_qk(qkv, N, T, H, Hkv, Dh, cos_TF, sin_TF, qk_norm, eps, q_scale, nthreads);
    paged_decode_attention(qkv, N, qkv + H * Dh, qkv + (H + Hkv) * Dh, N, k_cache, v_cache, blocks, max_blocks, first,
                           len, T, H, Hkv, Dh, bs, attn_scale, att, att_scratch, per_thread, nthreads);
    packed_linear(att, T, H * Dh, o_w, o_bf16, D, o, nthreads);
    add_bias(o, T, D, o_bias);
    rms_norm(h, D, o, D, h_out, T, D, w_post, eps, x_out, D, nthreads);
}

void grouped_packed_linear(const float *x, int64_t K, const int64_t *offs, int64_t E, const void *w, int w_bf16,
                           int64_t N, float *y, int nthreads);

/* A SwiGLU FFN (dense layer, shared expert) in one call: y = down(silu(x W_gate) * (x W_up)) with gate|up packed as
 * one [2F, D] weight; out = residual + y when residual is given (out may be residual itself: the residual stream
 * updated in place), else out = y. work: T * (3 F + D) floats. */
void swiglu_block(const float *x, int64_t T, int64_t D, const void *gate_up_w, int gate_up_bf16, int64_t F,
                  const void *down_w, int down_bf16, const float *residual, float *out, float *work, int nthreads) {
    float *gate_up = work, *act = gate_up + T * 2 * F, *y = act + T * F;
    packed_linear(x, T, D, gate_up_w, gate_up_bf16, 2 * F, gate_up, nthreads);
    silu_mul(gate_up, T, F, act, nthreads);
    packed_linear(act, T, F, down_w, down_bf16, D, residual ? y : out, nthreads);
    if (residual)
        for (int64_t i = 0; i < T * D; i++) out[i] = residual[i] + y[i];
}

/* MoE gate: router logits = x W_router (no bias), then the top-K sigmoid scores and ids (topk_sigmoid).
 * logits: T * E floats of scratch. */
void moe_gate(const float *x, int64_t T, int64_t D, const void *router_w, int router_bf16, int64_t E, int64_t K,
              float *logits, float *scores, int64_t *ids, int nthreads) {
    packed_linear(x, T, D, router_w, router_bf16, E, logits, nthreads);
    topk_sigmoid(logits, T, E, K, scores, ids);
}

/* The routed experts of one MoE layer for T tokens, all experts held here, in one call: slots sorted expert-major
 * (route_sort: slot[T*K], counts[E]), rows gathered and scaled by their scores, each expert's SwiGLU on its rows
 * (gate|up packed [E][2F/16][D][16], down [E][D/16][F][16]), and every token's K outputs summed in k order into
 * out [T, D]. work: T * K * (2 D + 3 F) floats. */
void experts_ffn(const float *x, int64_t ldx, const float *scores, const int64_t *ids, int64_t T, int64_t K,
                 int64_t E, int64_t D, int64_t F, const void *gate_up_w, int gate_up_bf16, const void *down_w,
                 int down_bf16, int64_t *slot, int64_t *counts, float *work, float *out, int nthreads) {
    const int64_t S = T * K;
    int64_t offs[E + 1];
    route_sort(ids, S, E, slot, counts);
    offs[0] = 0;
    for (int64_t e = 0; e < E; e++) offs[e + 1] = offs[e] + counts[e];
    float *rows = work, *gate_up = rows + S * D, *act = gate_up + S * 2 * F, *y = act + S * F;
    gather_scaled(x, ldx, scores, slot, S, K, D, rows);
    grouped_packed_linear(rows, D, offs, E, gate_up_w, gate_up_bf16, 2 * F, gate_up, nthreads);
    silu_mul(gate_up, S, F, act, nthreads);
    grouped_packed_linear(act, F, offs, E, down_w, down_bf16, D, y, nthreads);
    scatter_sum(y, slot, T, K, D, out);
}

/* out = h + (a + b), or h + a without b: an MoE layer's residual add of shared and routed outputs, in the order
 * the layer-by-layer path adds them. out may be h. */
void residual_add(const float *h, const float *a, const float *b, float *out, int64_t n) {
    if (b)
        for (int64_t i = 0; i < n; i++) out[i] = h[i] + (a[i] + b[i]);
    else
        for (int64_t i = 0; i < n; i++) out[i] = h[i] + a[i];
}

/* One layer's plan: what layer_stack reads, as int64 fields (addresses and flags), written once per model by
 * models/kernel_step.py (its PLAN lists the same fields in the same order). */
enum {
    P_W_IN, P_W_POST, P_QKV, P_QKV_BF16, P_QKV_BIAS, P_O, P_O_BF16, P_O_BIAS, P_ROPE, P_QK_NORM, P_TEMPERATURE,
    P_GATE_UP, P_GATE_UP_BF16, P_DOWN, P_DOWN_BF16, P_FFN, /* dense FFN, or the MoE layer's shared expert */
    P_ROUTER, P_ROUTER_BF16, P_EXPERTS_GATE_UP, P_EXPERTS_DOWN, P_EXPERTS_BF16, P_EXPERT_FFN, /* router 0: dense */
    PLAN_FIELDS
};
#define PTR(type, v) ((type)(intptr_t)(v))

/* Layers [0, L) of a step whose rows the attention kernel takes, in one call: per layer attention_block, then
 * swiglu_block with the residual add (dense), or moe_gate, experts_ffn, the shared expert's swiglu_block and
 * residual_add (MoE). h [T, D] is updated in place; tables: per layer (blocks, blocks per row, first, len) of the
 * paged cache. A MoE layer whose experts are not held here (no experts in its plan) stops the stack after its gate
 * (x, scores and ids are ready for the seam): the return value is that layer, or L when every layer ran; the
 * caller finishes the layer as the same calls would (models/kernel_step.py) and goes on from the next one. */
int64_t layer_stack(const int64_t *plan, const int64_t *tables, int64_t L, float *h, float *x, int64_t T, int64_t D,
                 int64_t H, int64_t Hkv, int64_t Dh, int64_t E, int64_t K, float eps, const float *cos_TF,
                 const float *sin_TF, const float *q_scale, float *k_cache, float *v_cache, int64_t bs,
                 float attn_scale, float *att_scratch, int64_t per_thread, float *work, float *shared, float *routed,
                 float *scores, int64_t *ids, int64_t *slot, int64_t *counts, int nthreads) {
    for (int64_t l = 0; l < L; l++) {
        const int64_t *p = plan + l * PLAN_FIELDS, *t = tables + l * 4;
        attention_block(h, T, D, PTR(const float *, p[P_W_IN]), eps, PTR(const void *, p[P_QKV]), (int)p[P_QKV_BF16],
                        PTR(const float *, p[P_QKV_BIAS]), H, Hkv, Dh, p[P_ROPE] ? cos_TF : NULL,
                        p[P_ROPE] ? sin_TF : NULL, (int)p[P_QK_NORM], p[P_TEMPERATURE] ? q_scale : NULL, k_cache,
                        v_cache, PTR(const int64_t *, t[0]), t[1], PTR(const int64_t *, t[2]),
                        PTR(const int64_t *, t[3]), bs, attn_scale, att_scratch, per_thread, PTR(const void *, p[P_O]),
                        (int)p[P_O_BF16], PTR(const float *, p[P_O_BIAS]), PTR(const float *, p[P_W_POST]), work, h, x,
                        nthreads);
        const void *gate_up = PTR(const void *, p[P_GATE_UP]), *down = PTR(const void *, p[P_DOWN]);
        if (!p[P_ROUTER]) {
            swiglu_block(x, T, D, gate_up, (int)p[P_GATE_UP_BF16], p[P_FFN], down, (int)p[P_DOWN_BF16], h, h, work,
                         nthreads);
            continue;
        }
        moe_gate(x, T, D, PTR(const void *, p[P_ROUTER]), (int)p[P_ROUTER_BF16], E, K, work, scores, ids, nthreads);
        if (!p[P_EXPERTS_GATE_UP])
            return l;
        experts_ffn(x, D, scores, ids, T, K, E, D, p[P_EXPERT_FFN], PTR(const void *, p[P_EXPERTS_GATE_UP]),
                    (int)p[P_EXPERTS_BF16], PTR(const void *, p[P_EXPERTS_DOWN]), (int)p[P_EXPERTS_BF16], slot, counts,
                    work, routed, nthreads);
        swiglu_block(x, T, D, gate_up, (int)p[P_GATE_UP_BF16], p[P_FFN], down, (int)p[P_DOWN_BF16], NULL, shared,
                     work, nthreads);
        residual_add(h, shared, routed, h, T * D);
    }
    return L;
}
