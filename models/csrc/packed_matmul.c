/* Matrix products for CPU inference on packed weights: y[M,N] = x[M,K] . W[N,K]^T (nn.Linear's product), fp32
 * activations, fp32 or bf16 weights (bf16 widened to fp32 exactly, in registers), any M.
 *
 * Why: the BLAS in the torch wheel reaches a fraction of this CPU's bandwidth for the few rows of a decode
 * step, and about two thirds of its FMA peak for prefill. Weights are packed once at load as [N/16][K][16]
 * (models/cpu_kernels.py: pack), so a 6-row x 16-column micro-tile streams one contiguous block with 12
 * accumulators in registers: memory-bound at a few rows, FMA-bound beyond. Threads come from the OpenMP runtime
 * torch already loaded (same libgomp soname): one thread pool, not two.
 *
 * Grouped form: expert e's rows are x[offs[e]:offs[e+1]], its packed weights the e-th [N/16][K][16] block;
 * experts with no rows cost nothing. Work is split over (expert, 16-column block) pairs.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 16 /* output columns per packed block: two 8-float vectors */
#define MR 6  /* activation rows per micro-tile: 6 x 2 accumulators + 2 weights + 1 broadcast = 15 ymm */
/* Unrolled before register allocation: otherwise gcc keeps the accumulator arrays on the stack. */
#define UNROLL _Pragma("GCC unroll 8")
/* Software prefetch 2 KiB ahead of the loads on the first tile of a block (later tiles find it in L2), measured
 * interleaved in one process: when the block serves several tiles, the first one streams it and then waits on it
 * at the FMA rate of the others (fp32, 32 rows: 0.99-1.11x over four comparisons, most of them a gain). A lone
 * tile (a few rows: memory-bound) gains with bf16 weights (+17-19%, grouped experts at 8-64 rows) and loses with
 * fp32 ones (-8-13%): there the hardware prefetcher alone does better. A prefetch past the block's end reads into
 * the next block or nowhere: prefetches never fault. */
#define PF_AHEAD 2048
#define MC 96 /* activation rows per outer chunk: x chunk stays in L2 while a thread streams its weights */

static inline void load_w_f32(const void *p, int64_t i, __m256 *w0, __m256 *w1) {
    const float *f = (const float *)p + i;
    *w0 = _mm256_loadu_ps(f), *w1 = _mm256_loadu_ps(f + 8);
}
static inline void load_w_bf16(const void *p, int64_t i, __m256 *w0, __m256 *w1) {
    const __m128i *h = (const __m128i *)((const uint16_t *)p + i);
    *w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h)), 16));
    *w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h + 1)), 16));
}

/* y[0:R, 0:cols] = x[0:R, :] . block^T, block = [K][NR] packed weights, cols <= NR. Each output is one fp32
 * FMA chain over k in order, whatever R or M: a row's result does not depend on the batch it came in. */
#define DEFINE_MICRO(NAME, R, LOADW, ESZ, pf)                                                                       \
    static void NAME(const float *x, int64_t ldx, const void *blk, int64_t K, float *y, int64_t ldy,                \
                     int cols) {                                                                                    \
        __m256 a0[R], a1[R];                                                                                        \
        UNROLL for (int m = 0; m < R; m++) a0[m] = a1[m] = _mm256_setzero_ps();                                     \
        for (int64_t k = 0; k < K; k++) {                                                                           \
            __m256 w0, w1;                                                                                          \
            if (pf) _mm_prefetch((const char *)blk + k * NR * ESZ + PF_AHEAD, _MM_HINT_T0);                         \
            LOADW(blk, k * NR, &w0, &w1);                                                                           \
            UNROLL for (int m = 0; m < R; m++) {                                                                    \
                __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);                                                   \
                a0[m] = _mm256_fmadd_ps(xb, w0, a0[m]);                                                             \
                a1[m] = _mm256_fmadd_ps(xb, w1, a1[m]);                                                             \
            }                                                                                                       \
        }                                                                                                           \
        if (cols == NR) {                                                                                           \
            UNROLL for (int m = 0; m < R; m++)                                                                      \
                _mm256_storeu_ps(y + m * ldy, a0[m]), _mm256_storeu_ps(y + m * ldy + 8, a1[m]);                     \
        } else {                                                                                                    \
            float tmp[R][NR];                                                                                       \
            UNROLL for (int m = 0; m < R; m++) _mm256_storeu_ps(tmp[m], a0[m]), _mm256_storeu_ps(tmp[m] + 8, a1[m]); \
            UNROLL for (int m = 0; m < R; m++) memcpy(y + m * ldy, tmp[m], sizeof(float) * cols);                   \
        }                                                                                                           \
    }
/* Two instantiations per row count: without and with the prefetch (a compile-time constant, so the plain one is
 * the loop it always was). */
#define DEFINE_MICROS(T, LOADW, ESZ, PF)                                                                            \
    DEFINE_MICRO(micro1_##T, 1, LOADW, ESZ, PF) DEFINE_MICRO(micro2_##T, 2, LOADW, ESZ, PF)                         \
    DEFINE_MICRO(micro3_##T, 3, LOADW, ESZ, PF) DEFINE_MICRO(micro4_##T, 4, LOADW, ESZ, PF)                         \
    DEFINE_MICRO(micro5_##T, 5, LOADW, ESZ, PF) DEFINE_MICRO(micro6_##T, 6, LOADW, ESZ, PF)                         \
    static void (*const micro_##T[MR + 1])(const float *, int64_t, const void *, int64_t, float *, int64_t,         \
                                          int) = {0, micro1_##T, micro2_##T, micro3_##T, micro4_##T,                \
                                                  micro5_##T, micro6_##T};
DEFINE_MICROS(f32, load_w_f32, 4, 0)
DEFINE_MICROS(bf16, load_w_bf16, 2, 0)
DEFINE_MICROS(f32_pf, load_w_f32, 4, 1)
DEFINE_MICROS(bf16_pf, load_w_bf16, 2, 1)

/* x [S,K] (rows of expert e: offs[e]..offs[e+1]), w packed [E][ceil(N/NR)][K][NR] fp32 or bf16, y [S,N]. */
void grouped_packed_linear(const float *x, int64_t K, const int64_t *offs, int64_t E, const void *w, int w_bf16,
                           int64_t N, float *y, int nthreads) {
    const int64_t nblk = (N + NR - 1) / NR, esz = w_bf16 ? 2 : 4;
    int64_t active[E > 0 ? E : 1], n_active = 0, rows = 0, max_rows = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t n = offs[e + 1] - offs[e];
        if (n > 0) active[n_active++] = e, rows += n, max_rows = n > max_rows ? n : max_rows;
    }
    const int parallel = nthreads > 1 && rows * N * K >= 65536; /* below that a second thread costs more */
    for (int64_t c0 = 0; c0 < max_rows; c0 += MC) { /* outer row chunks: only prefill has more than one */
/* dynamic: experts' tasks differ in rows, and one thread may stream slower than the other; which thread computes
 * a block never changes its numbers (one FMA chain per output) */
#pragma omp parallel for schedule(dynamic, 2) num_threads(nthreads) if (parallel)
        for (int64_t t = 0; t < n_active * nblk; t++) {
            const int64_t e = active[t / nblk], b = t % nblk;
            const int64_t lo = offs[e] + c0, hi = offs[e + 1] < lo + MC ? offs[e + 1] : lo + MC;
            const char *blk = (const char *)w + ((e * nblk + b) * K * NR) * esz;
            const int cols = (int)(N - b * NR < NR ? N - b * NR : NR);
            /* ceil(rows / MR) tiles of near-equal height (32 rows: 6 6 5 5 5 5, not 6 6 6 6 6 2): a short tile
             * streams the block for as long as a full one but does a fraction of the arithmetic. */
            const int64_t tiles = (hi - lo + MR - 1) / MR, base = tiles ? (hi - lo) / tiles : 0;
            const int64_t extra = tiles ? (hi - lo) % tiles : 0;
            for (int64_t t = 0, m = lo; t < tiles; t++) {
                const int r = (int)(base + (t < extra));
                const int pf = t == 0 && (tiles > 1 || w_bf16);
                (w_bf16 ? (pf ? micro_bf16_pf : micro_bf16) : (pf ? micro_f32_pf : micro_f32))[r](
                    x + m * K, K, blk, K, y + m * N + b * NR, N, cols);
                m += r;
            }
        }
    }
}

void packed_linear(const float *x, int64_t M, int64_t K, const void *w, int w_bf16, int64_t N, float *y,
                   int nthreads) {
    const int64_t offs[2] = {0, M};
    grouped_packed_linear(x, K, offs, 1, w, w_bf16, N, y, nthreads);
}
