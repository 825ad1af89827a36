/* Small-M matrix products for CPU decode: y[M,N] = x[M,K] . W[N,K]^T (nn.Linear layout), fp32 activations,
 * fp32 or bf16 weights (bf16 widened to fp32 exactly, in registers).
 *
 * Why: in decode every weight is read once per step for a handful of rows, so the step is bound by memory
 * bandwidth. The BLAS that torch ships reaches well under half of it for M <= 32 on AMD CPUs; this kernel
 * streams each weight row once and keeps M x 4 partial sums in registers. Threads come from the OpenMP
 * runtime torch already loaded (same libgomp soname), so there is one thread pool, not two.
 *
 * Grouped form: expert e's rows are x[offs[e]:offs[e+1]], its weights W[e] ([N,K]); experts with no rows
 * cost nothing. Work is split over (expert, 4-row tile of W) pairs so a thread streams contiguous rows.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#ifndef NB
#define NB 4 /* weight rows per tile: 4 x 2 accumulators + 4 weights + 1 activation fit in 16 ymm registers */
#endif
#ifndef MB
#define MB 2 /* activation rows per tile */
#endif

static inline __m256 load_f32(const void *p, int64_t i) { return _mm256_loadu_ps((const float *)p + i); }
static inline __m256 load_bf16(const void *p, int64_t i) {
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline float scalar_f32(const void *p, int64_t i) { return ((const float *)p)[i]; }
static inline float scalar_bf16(const void *p, int64_t i) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)((const uint16_t *)p)[i] << 16};
    return v.f;
}
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One tile: MB rows of x against NB rows of w (rows past nb repeat the last valid one and are not stored). */
#define DEFINE_TILE(NAME, ROWS, LOADW, SCALARW)                                                                 \
    static inline void NAME(const float *x, int64_t K, const void *w, int64_t wrow0, int nb, float *y,       \
                            int64_t ldy) {                                                                   \
        __m256 acc[ROWS][NB];                                                                                \
        int64_t base[NB];                                                                                    \
        for (int j = 0; j < NB; j++) base[j] = (wrow0 + (j < nb ? j : nb - 1)) * K;                          \
        for (int m = 0; m < ROWS; m++)                                                                         \
            for (int j = 0; j < NB; j++) acc[m][j] = _mm256_setzero_ps();                                    \
        int64_t k = 0;                                                                                       \
        for (; k + 8 <= K; k += 8) {                                                                         \
            __m256 wv[NB];                                                                                   \
            for (int j = 0; j < NB; j++) wv[j] = LOADW(w, base[j] + k);                                      \
            for (int m = 0; m < ROWS; m++) {                                                                   \
                __m256 xv = _mm256_loadu_ps(x + m * K + k);                                                  \
                for (int j = 0; j < NB; j++) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);              \
            }                                                                                                \
        }                                                                                                    \
        for (int m = 0; m < ROWS; m++)                                                                         \
            for (int j = 0; j < nb; j++) {                                                                   \
                float s = hsum(acc[m][j]);                                                                   \
                for (int64_t kk = k; kk < K; kk++) s += x[m * K + kk] * SCALARW(w, base[j] + kk);            \
                y[m * ldy + j] = s;                                                                          \
            }                                                                                                \
    }

DEFINE_TILE(tile2_f32, MB, load_f32, scalar_f32)
DEFINE_TILE(tile1_f32, 1, load_f32, scalar_f32)
DEFINE_TILE(tile2_bf16, MB, load_bf16, scalar_bf16)
DEFINE_TILE(tile1_bf16, 1, load_bf16, scalar_bf16)

/* x [S,K] contiguous, offs [E+1] row offsets, w [E,N,K] contiguous (fp32 or bf16), y [S,N] contiguous. */
void grouped_linear(const float *x, int64_t K, const int64_t *offs, int64_t E, const void *w, int w_bf16,
                    int64_t N, float *y, int nthreads) {
    const int64_t tiles_per_expert = (N + NB - 1) / NB;
    int64_t active[E > 0 ? E : 1], n_active = 0, rows = 0;
    for (int64_t e = 0; e < E; e++)
        if (offs[e + 1] > offs[e]) { active[n_active++] = e; rows += offs[e + 1] - offs[e]; }
    const int64_t total = n_active * tiles_per_expert;
    /* Below ~64k multiply-adds a second thread costs more than it saves. */
    const int parallel = nthreads > 1 && rows * N * K >= 65536;
#pragma omp parallel num_threads(nthreads) if (parallel)
    {
        float *wide = NULL; /* a bf16 tile used for more than 2 rows is widened once, not once per row pair */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < total; t++) {
            const int64_t e = active[t / tiles_per_expert], n0 = (t % tiles_per_expert) * NB;
            const int nb = (int)(N - n0 < NB ? N - n0 : NB);
            const void *wt = w;
            int64_t wrow0 = e * N + n0;
            int bf16 = w_bf16;
            if (bf16 && offs[e + 1] - offs[e] > MB) {
                if (!wide) wide = (float *)malloc(sizeof(float) * NB * K);
                for (int j = 0; j < nb; j++)
                    for (int64_t k = 0; k < K; k++) wide[j * K + k] = scalar_bf16(w, (wrow0 + j) * K + k);
                wt = wide, wrow0 = 0, bf16 = 0;
            }
            int64_t m = offs[e];
            for (; m + MB <= offs[e + 1]; m += MB) {
                if (bf16) tile2_bf16(x + m * K, K, wt, wrow0, nb, y + m * N + n0, N);
                else tile2_f32(x + m * K, K, wt, wrow0, nb, y + m * N + n0, N);
            }
            for (; m < offs[e + 1]; m++) {
                if (bf16) tile1_bf16(x + m * K, K, wt, wrow0, nb, y + m * N + n0, N);
                else tile1_f32(x + m * K, K, wt, wrow0, nb, y + m * N + n0, N);
            }
        }
        free(wide);
    }
}

/* Dense form: one "expert" holding all M rows. */
void linear(const float *x, int64_t M, int64_t K, const void *w, int w_bf16, int64_t N, float *y, int nthreads) {
    const int64_t offs[2] = {0, M};
    grouped_linear(x, K, offs, 1, w, w_bf16, N, y, nthreads);
}
