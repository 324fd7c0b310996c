/* Row products with a defined arithmetic order (see rl/kernels/cpu/rows.py).

   out[g, i, j] = sum over k = 0 .. K-1 of a[g, i, k] * b[g, k, j]: each product rounded to
   fp32, added to a running fp32 sum that starts at +0, in increasing k. Compiled with
   -ffp-contract=off (no fused multiply-add) and without -ffast-math (no reassociation), so an
   element's bits depend only on its own row of a and column of b: not on M, N, G, the strides,
   the blocking below or the vector width the compiler lowers the vector types to.

   a, b: element strides per matrix (g), row and column; b_offsets (optional, G entries):
   matrix g of b starts b_offsets[g] elements after b (a gather from a pool without a copy;
   else g * sbg). b_rows (optional, G entries): rows k >= b_rows[g] of matrix g of b read as
   +0.0 whatever memory holds there (the products still run: a[i, k] * +0.0 is added, exactly as
   for a b with those rows zeroed). out: contiguous [G, M, N]. b_bf16: b holds bfloat16
   (widened exactly). */
#include "vec.h"

#define PACK_MAX 16384   /* floats of the per-matrix buffer for a transposed b (64 KB of stack) */

/* b[k, j0 .. j0 + nb) as a vector, lanes past nb zero; `mode` is a constant at every call */
static inline __attribute__((always_inline)) vf load_b(const void *b, int64_t at, int64_t sbn, int64_t nb, int mode) {
    vf v = {0};
    if (mode == BF16_DENSE || mode == BF16_STRIDED) {
        const uint16_t *p = (const uint16_t *)b + at;
        vu16 h = {0};
        if (mode == BF16_DENSE && nb == W) h = *(const vu16_u *)p;
        else for (int64_t j = 0; j < nb; j++) h[j] = p[j * sbn];
        v = (vf)(__builtin_convertvector(h, vu32) << 16);
    } else {
        const float *p = (const float *)b + at;
        if (mode == F32_DENSE && nb == W) v = *(const vf_u *)p;
        else for (int64_t j = 0; j < nb; j++) v[j] = p[j * sbn];
    }
    return v;
}

static inline __attribute__((always_inline)) void store(float *o, vf v, int64_t nb) {
    if (nb == W) *(vf_u *)o = v;
    else for (int64_t j = 0; j < nb; j++) o[j] = v[j];
}

/* R rows x V column vectors of one matrix: R * V independent sums in registers */
#define BLOCK(R, V)                                                                              \
    static inline __attribute__((always_inline)) void block_##R##x##V(                          \
        const float *a0, int64_t sam, int64_t sak, const void *b, int64_t at0, int64_t sbk,      \
        int64_t sbn, int64_t K, int64_t kvalid, int64_t nb_last, float *o, int64_t N, int mode) { \
        vf c[R][V];                                                                              \
        for (int i = 0; i < R; i++)                                                              \
            for (int v = 0; v < V; v++) c[i][v] = (vf){0};                                       \
        for (int64_t k = 0; k < K; k++) {                                                        \
            vf bv[V];                                                                            \
            for (int v = 0; v < V; v++)                                                          \
                bv[v] = k < kvalid ? load_b(b, at0 + k * sbk + v * W * sbn, sbn, v == V - 1 ? nb_last : W, mode) \
                                   : (vf){0};                                                    \
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

/* matrix g of a b stored transposed (b[k, j] at j * sbn + k: rows of B = b^T contiguous)
   into dense fp32 dst [K, ldd] (columns past N and rows k >= kvalid zero): the same values */
static void pack_transposed(const void *b, int64_t off, int64_t sbn, int64_t K, int64_t N, int64_t kvalid,
                            int bf16, float *dst, int64_t ldd) {
    vf r[W];
    for (int64_t j0 = 0; j0 < N; j0 += W) {
        int64_t nj = N - j0 < W ? N - j0 : W;
        for (int64_t k0 = 0; k0 < K; k0 += W) {
            int64_t nk = K - k0 < W ? K - k0 : W;
            if (kvalid - k0 < nk) nk = kvalid - k0 > 0 ? kvalid - k0 : 0;
            for (int64_t jj = 0; jj < W; jj++) {
                r[jj] = (vf){0};
                if (jj < nj && nk > 0) {
                    int64_t at = off + (j0 + jj) * sbn + k0;
                    if (bf16) {
                        const uint16_t *p = (const uint16_t *)b + at;
                        vu16 h = {0};
                        if (nk == W) h = *(const vu16_u *)p;
                        else for (int64_t kk = 0; kk < nk; kk++) h[kk] = p[kk];
                        r[jj] = (vf)(__builtin_convertvector(h, vu32) << 16);
                    } else {
                        const float *p = (const float *)b + at;
                        if (nk == W) r[jj] = *(const vf_u *)p;
                        else for (int64_t kk = 0; kk < nk; kk++) r[jj][kk] = p[kk];
                    }
                }
            }
            transpose16(r);
            int64_t rows = K - k0 < W ? K - k0 : W;
            for (int64_t kk = 0; kk < rows; kk++) *(vf_u *)(dst + (k0 + kk) * ldd + j0) = r[kk];
        }
    }
}

static inline __attribute__((always_inline)) void product(
    int64_t G, int64_t M, int64_t K, int64_t N, const float *a, int64_t sag, int64_t sam, int64_t sak,
    const void *b, int64_t sbg, int64_t sbk, int64_t sbn, const int64_t *b_offsets,
    const int64_t *b_rows, float *out, int mode) {
    for (int64_t g = 0; g < G; g++) {
        const float *ag = a + g * sag;
        int64_t boff = b_offsets ? b_offsets[g] : g * sbg;
        int64_t kv = b_rows ? b_rows[g] : K;
        float *og = out + g * M * N;
        int64_t i0 = 0;
        for (; i0 + 8 <= M; i0 += 8)                 /* 8 rows x 1 vector */
            for (int64_t j0 = 0; j0 < N; j0 += W)
                block_8x1(ag + i0 * sam, sam, sak, b, boff + j0 * sbn, sbk, sbn, K, kv,
                          N - j0 < W ? N - j0 : W, og + i0 * N + j0, N, mode);
        for (; i0 + 2 <= M; i0 += 2) {              /* 2 rows x 4 vectors, then 1 vector */
            int64_t j0 = 0;
            for (; j0 + 3 * W < N; j0 += 4 * W)
                block_2x4(ag + i0 * sam, sam, sak, b, boff + j0 * sbn, sbk, sbn, K, kv,
                          N - j0 - 3 * W < W ? N - j0 - 3 * W : W, og + i0 * N + j0, N, mode);
            for (; j0 < N; j0 += W) {
                block_1x1(ag + i0 * sam, sam, sak, b, boff + j0 * sbn, sbk, sbn, K, kv,
                          N - j0 < W ? N - j0 : W, og + i0 * N + j0, N, mode);
                block_1x1(ag + (i0 + 1) * sam, sam, sak, b, boff + j0 * sbn, sbk, sbn, K, kv,
                          N - j0 < W ? N - j0 : W, og + (i0 + 1) * N + j0, N, mode);
            }
        }
        for (; i0 < M; i0++) {                       /* a last row: 4 vectors, then 1 */
            int64_t j0 = 0;
            for (; j0 + 3 * W < N; j0 += 4 * W)
                block_1x4(ag + i0 * sam, sam, sak, b, boff + j0 * sbn, sbk, sbn, K, kv,
                          N - j0 - 3 * W < W ? N - j0 - 3 * W : W, og + i0 * N + j0, N, mode);
            for (; j0 < N; j0 += W)
                block_1x1(ag + i0 * sam, sam, sak, b, boff + j0 * sbn, sbk, sbn, K, kv,
                          N - j0 < W ? N - j0 : W, og + i0 * N + j0, N, mode);
        }
    }
}

void bmm_rows(int64_t G, int64_t M, int64_t K, int64_t N,
              const float *a, int64_t sag, int64_t sam, int64_t sak,
              const void *b, int64_t sbg, int64_t sbk, int64_t sbn, const int64_t *b_offsets, const int64_t *b_rows,
              int b_bf16, float *out)
{
    int64_t ldd = (N + W - 1) / W * W;
    if (sbk == 1 && sbn != 1 && K * ldd <= PACK_MAX) {
        /* b stored transposed (a key block: positions x head dims): per matrix, transposed in
           registers into a dense buffer, then the dense product (same values, same sums) */
        float buf[PACK_MAX];
        for (int64_t g = 0; g < G; g++) {
            int64_t off = b_offsets ? b_offsets[g] : g * sbg;
            pack_transposed(b, off, sbn, K, N, b_rows ? b_rows[g] : K, b_bf16, buf, ldd);
            product(1, M, K, N, a + g * sag, sag, sam, sak, buf, 0, ldd, 1, NULL, NULL,
                    out + g * M * N, F32_DENSE);
        }
        return;
    }
    int mode = b_bf16 ? (sbn == 1 ? BF16_DENSE : BF16_STRIDED) : (sbn == 1 ? F32_DENSE : F32_STRIDED);
    switch (mode) {
    case F32_DENSE: product(G, M, K, N, a, sag, sam, sak, b, sbg, sbk, sbn, b_offsets, b_rows, out, F32_DENSE); break;
    case F32_STRIDED: product(G, M, K, N, a, sag, sam, sak, b, sbg, sbk, sbn, b_offsets, b_rows, out, F32_STRIDED); break;
    case BF16_DENSE: product(G, M, K, N, a, sag, sam, sak, b, sbg, sbk, sbn, b_offsets, b_rows, out, BF16_DENSE); break;
    default: product(G, M, K, N, a, sag, sam, sak, b, sbg, sbk, sbn, b_offsets, b_rows, out, BF16_STRIDED); break;
    }
}
