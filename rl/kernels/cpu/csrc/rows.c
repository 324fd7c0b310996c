/* Row products with a defined arithmetic order (see rl/kernels/cpu/rows.py).

   out[g, i, j] = sum over k = 0 .. K-1 of a[g, i, k] * b[g, k, j]: each product rounded to
   fp32, added to a running fp32 sum that starts at +0, in increasing k. Compiled with
   -ffp-contract=off (no fused multiply-add) and without -ffast-math (no reassociation), so an
   element's bits depend only on its own row of a and column of b: not on M, N, G, the strides,
   the blocking below or the vector width the compiler lowers the vector types to.

   a, b: fp32, element strides per matrix (g), row and column (0 for an expanded dimension).
   out: contiguous [G, M, N]. */
#include "vec.h"

#define PACK_MAX 16384   /* floats of the per-matrix buffer for a transposed b (64 KB of stack) */

enum { DENSE, STRIDED };     /* b's columns adjacent (sbn == 1) or not */

/* b[k, j0 .. j0 + nb) as a vector, lanes past nb zero; `mode` is a constant at every call */
static inline __attribute__((always_inline)) vf load_b(const float *p, int64_t sbn, int64_t nb, int mode) {
    vf v = {0};
    if (mode == DENSE && nb == W) v = *(const vf_u *)p;
    else for (int64_t j = 0; j < nb; j++) v[j] = p[j * sbn];
    return v;
}

static inline __attribute__((always_inline)) void store(float *o, vf v, int64_t nb) {
    if (nb == W) *(vf_u *)o = v;
    else for (int64_t j = 0; j < nb; j++) o[j] = v[j];
}

/* R rows x V column vectors of one matrix: R * V independent sums in registers */
#define BLOCK(R, V)                                                                              \
    static inline __attribute__((always_inline)) void block_##R##x##V(                          \
        const float *a0, int64_t sam, int64_t sak, const float *b0, int64_t sbk,                 \
        int64_t sbn, int64_t K, int64_t nb_last, float *o, int64_t N, int mode) {                \
        vf c[R][V];                                                                              \
        for (int i = 0; i < R; i++)                                                              \
            for (int v = 0; v < V; v++) c[i][v] = (vf){0};                                       \
        for (int64_t k = 0; k < K; k++) {                                                        \
            vf bv[V];                                                                            \
            for (int v = 0; v < V; v++)                                                          \
                bv[v] = load_b(b0 + k * sbk + v * W * sbn, sbn, v == V - 1 ? nb_last : W, mode); \
            const float *ak = a0 + k * sak;                                                      \
            for (int i = 0; i < R; i++) {                                                        \
                float x = ak[i * sam];                                                           \
                for (int v = 0; v < V; v++) c[i][v] = c[i][v] + x * bv[v];                       \
            }                                                                                    \
        }                                                                                        \
        for (int i = 0; i < R; i++)                                                              \
            for (int v = 0; v < V; v++) store(o + i * N + v * W, c[i][v], v == V - 1 ? nb_last : W); \
    }
BLOCK(8, 1)
BLOCK(2, 4)
BLOCK(1, 4)
BLOCK(1, 1)

/* one matrix of a b stored transposed (b[k, j] at j * sbn + k: rows of b^T contiguous) into
   dense dst [K, ldd] (columns past N zero): the same values */
static void pack_transposed(const float *b, int64_t sbn, int64_t K, int64_t N, float *dst, int64_t ldd) {
    vf r[W];
    for (int64_t j0 = 0; j0 < N; j0 += W) {
        int64_t nj = N - j0 < W ? N - j0 : W;
        for (int64_t k0 = 0; k0 < K; k0 += W) {
            int64_t nk = K - k0 < W ? K - k0 : W;
            for (int64_t jj = 0; jj < W; jj++) {
                r[jj] = (vf){0};
                if (jj < nj) r[jj] = load_b(b + (j0 + jj) * sbn + k0, 1, nk, DENSE);
            }
            transpose16(r);
            for (int64_t kk = 0; kk < nk; kk++) *(vf_u *)(dst + (k0 + kk) * ldd + j0) = r[kk];
        }
    }
}

static inline __attribute__((always_inline)) void product(
    int64_t G, int64_t M, int64_t K, int64_t N, const float *a, int64_t sag, int64_t sam, int64_t sak,
    const float *b, int64_t sbg, int64_t sbk, int64_t sbn, float *out, int mode) {
    for (int64_t g = 0; g < G; g++) {
        const float *ag = a + g * sag, *bg = b + g * sbg;
        float *og = out + g * M * N;
        int64_t i0 = 0;
        for (; i0 + 8 <= M; i0 += 8)                 /* 8 rows x 1 vector */
            for (int64_t j0 = 0; j0 < N; j0 += W)
                block_8x1(ag + i0 * sam, sam, sak, bg + j0 * sbn, sbk, sbn, K,
                          N - j0 < W ? N - j0 : W, og + i0 * N + j0, N, mode);
        for (; i0 + 2 <= M; i0 += 2) {              /* 2 rows x 4 vectors, then 1 vector */
            int64_t j0 = 0;
            for (; j0 + 3 * W < N; j0 += 4 * W)
                block_2x4(ag + i0 * sam, sam, sak, bg + j0 * sbn, sbk, sbn, K,
                          N - j0 - 3 * W < W ? N - j0 - 3 * W : W, og + i0 * N + j0, N, mode);
            for (; j0 < N; j0 += W) {
                block_1x1(ag + i0 * sam, sam, sak, bg + j0 * sbn, sbk, sbn, K,
                          N - j0 < W ? N - j0 : W, og + i0 * N + j0, N, mode);
                block_1x1(ag + (i0 + 1) * sam, sam, sak, bg + j0 * sbn, sbk, sbn, K,
                          N - j0 < W ? N - j0 : W, og + (i0 + 1) * N + j0, N, mode);
            }
        }
        for (; i0 < M; i0++) {                       /* a last row: 4 vectors, then 1 */
            int64_t j0 = 0;
            for (; j0 + 3 * W < N; j0 += 4 * W)
                block_1x4(ag + i0 * sam, sam, sak, bg + j0 * sbn, sbk, sbn, K,
                          N - j0 - 3 * W < W ? N - j0 - 3 * W : W, og + i0 * N + j0, N, mode);
            for (; j0 < N; j0 += W)
                block_1x1(ag + i0 * sam, sam, sak, bg + j0 * sbn, sbk, sbn, K,
                          N - j0 < W ? N - j0 : W, og + i0 * N + j0, N, mode);
        }
    }
}

void bmm_rows(int64_t G, int64_t M, int64_t K, int64_t N,
              const float *a, int64_t sag, int64_t sam, int64_t sak,
              const float *b, int64_t sbg, int64_t sbk, int64_t sbn, float *out)
{
    int64_t ldd = (N + W - 1) / W * W;
    if (sbk == 1 && sbn != 1 && K * ldd <= PACK_MAX) {
        /* b stored transposed (a key block: positions x head dims): per matrix, transposed in
           registers into a dense buffer, then the dense product (same values, same sums) */
        float buf[PACK_MAX];
        for (int64_t g = 0; g < G; g++) {
            pack_transposed(b + g * sbg, sbn, K, N, buf, ldd);
            product(1, M, K, N, a + g * sag, sag, sam, sak, buf, 0, ldd, 1, out + g * M * N, DENSE);
        }
    } else if (sbn == 1) {
        product(G, M, K, N, a, sag, sam, sak, b, sbg, sbk, sbn, out, DENSE);
    } else {
        product(G, M, K, N, a, sag, sam, sak, b, sbg, sbk, sbn, out, STRIDED);
    }
}
