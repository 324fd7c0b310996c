/* Lightning attention over a batch's new tokens, one token after another, in one call (see
   rl/kernels/cpu/lightning.py, `_token_steps`, and rows.c for the arithmetic rules this follows).
   It serves every forward that carries a state (a rollout's prefill, chunked prefill and decode
   steps); a decode step is the case of one token per sequence.

   Per (sequence b, head h), with slot = slots[b], and per new token t of b in order, at window
   offset j = (ctx[b] + t - qsl[b]) % C:
     fresh sequence (ctx 0), before its first token: S and the pending rows of the slot are zeroed;
     pending[j] = (k, v) widened to fp32;
     qs[x]     = q[x] * scale                                   (fp32 multiply)
     scores[s] = sum_x qs[x] * pending_k[s, x]   s = 0 .. C-1   (in increasing x)
     scores[s] = scores[s] * intra[h, j, s]
     intra[e]  = sum_s scores[s] * pending_v[s, e]              (in increasing s)
     qd[x]     = qs[x] * q_decay[h, j]
     inter[e]  = sum_x qd[x] * S[x, e]                          (in increasing x)
     out[e]    = bf16(inter[e] + intra[e])                      (round to nearest even)
     window complete (j == C-1): S[x, e] = window_decay[h] * S[x, e]
                                 + sum_s (pending_k[s, x] * k_decay[h, s]) * pending_v[s, e]
                                 (in increasing s), then the pending rows are zeroed.
   Every product is rounded to fp32 and added to a sum that starts at +0 (no FMA: built with
   -ffp-contract=off), which is `bmm_rows`' definition: the general path (the trainer's), which
   runs these same products through `bmm_rows` over whole query tiles, gets the same bits.
   Pending rows past j are zero (zeroed with the slot and after each window), and intra[h, j, s]
   is 0 there, so their terms of intra[e] are +-0, which leave a sum that started at +0 as it
   was: a token's step computes scores and intra over rows 0 .. j only, with the same bits.
   q, k, v and out are bfloat16, or float32 when fp32_io is set (then out[e] = inter + intra);
   token t's rows are at t * s?0 + h * s?1 (out: contiguous [N, H, D]).
   Slots must be distinct within a call. Innermost strides are 1; others are in elements. */
#include "vec.h"

/* out[e] = sum over r = 0 .. count-1 of coef[r] * rows[r * stride + e], each sum from +0 in
   increasing r, products rounded: NV vectors of columns held in registers at a time */
#define WEIGHTED_ROWS(NV)                                                                         \
    static inline __attribute__((always_inline)) void weighted_rows_##NV(                          \
        const float *coef, const float *rows, int64_t stride, int64_t count, float *out) {          \
        vf sum[NV];                                                                               \
        for (int v = 0; v < NV; v++) sum[v] = (vf){0};                                            \
        for (int64_t r = 0; r < count; r++) {                                                     \
            const float *row = rows + r * stride;                                                 \
            float a = coef[r];                                                                    \
            for (int v = 0; v < NV; v++) sum[v] = sum[v] + a * *(const vf_u *)(row + v * W);      \
        }                                                                                         \
        for (int v = 0; v < NV; v++) *(vf_u *)(out + v * W) = sum[v];                             \
    }
WEIGHTED_ROWS(8)
WEIGHTED_ROWS(4)
WEIGHTED_ROWS(2)
WEIGHTED_ROWS(1)

static void weighted_rows(const float *coef, const float *rows, int64_t stride, int64_t count, int64_t D,
                          float *out) {
    int64_t e0 = 0;
    for (; e0 + 8 * W <= D; e0 += 8 * W) weighted_rows_8(coef, rows + e0, stride, count, out + e0);
    for (; e0 + 4 * W <= D; e0 += 4 * W) weighted_rows_4(coef, rows + e0, stride, count, out + e0);
    for (; e0 + 2 * W <= D; e0 += 2 * W) weighted_rows_2(coef, rows + e0, stride, count, out + e0);
    for (; e0 + W <= D; e0 += W) weighted_rows_1(coef, rows + e0, stride, count, out + e0);
    for (int64_t e = e0; e < D; e++) {
        float sum = 0.0f;
        for (int64_t r = 0; r < count; r++) sum = sum + coef[r] * rows[r * stride + e];
        out[e] = sum;
    }
}

void lightning_steps(int64_t n, const int64_t *qsl, int64_t H, int64_t D, int64_t C,
                      const void *q, int64_t sq0, int64_t sq1,
                      const void *k, int64_t sk0, int64_t sk1,
                      const void *v, int64_t sv0, int64_t sv1,
                      float *s_pool, int64_t ss0, int64_t ss1, int64_t ss2,
                      float *pend, int64_t sp0, int64_t sp1, int64_t sp2,
                      const int64_t *slots, const int64_t *ctx,
                      const float *q_decay, const float *k_decay, const float *intra_mask,
                      const float *window_decay, float scale, int fp32_io, void *out)
{
    float qs[D], qd[D], scores[C], acc[D], acc2[D];
    for (int64_t b = 0; b < n; b++) {
        for (int64_t h = 0; h < H; h++) {
            float *S = s_pool + slots[b] * ss0 + h * ss1;
            float *P = pend + slots[b] * sp0 + h * sp1;
            if (ctx[b] == 0 && qsl[b + 1] > qsl[b]) {
                for (int64_t x = 0; x < D; x++) memset(S + x * ss2, 0, (size_t)D * sizeof(float));
                for (int64_t s = 0; s < C; s++) memset(P + s * sp2, 0, (size_t)(2 * D) * sizeof(float));
            }
            for (int64_t t = qsl[b]; t < qsl[b + 1]; t++) {
                int64_t j = (ctx[b] + t - qsl[b]) % C;
                int64_t qo = t * sq0 + h * sq1, ko = t * sk0 + h * sk1, vo = t * sv0 + h * sv1;
                float *row = P + j * sp2;
                for (int64_t x = 0; x < D; x++) {
                    row[x] = load_f32(k, ko + x, fp32_io);
                    row[D + x] = load_f32(v, vo + x, fp32_io);
                }
                float qdec = q_decay[h * C + j];
                for (int64_t x = 0; x < D; x++) {
                    qs[x] = load_f32(q, qo + x, fp32_io) * scale;
                    qd[x] = qs[x] * qdec;
                }
                int64_t live = j + 1;            /* pending rows past j are zero: see above */
                if (D % W == 0) {                /* 16 rows at a time, read as 16 x 16 blocks turned in registers */
                    for (int64_t s0 = 0; s0 < live; s0 += W) {
                        vf sum = (vf){0}, r[W];
                        for (int64_t x0 = 0; x0 < D; x0 += W) {
                            for (int64_t i = 0; i < W; i++)
                                r[i] = s0 + i < C ? *(const vf_u *)(P + (s0 + i) * sp2 + x0) : (vf){0};
                            transpose16(r);          /* r[i]: column x0 + i of rows s0 .. s0 + 15 */
                            for (int64_t i = 0; i < W; i++) sum = sum + qs[x0 + i] * r[i];
                        }
                        for (int64_t i = 0; i < W && s0 + i < live; i++) scores[s0 + i] = sum[i];
                    }
                } else {
                    for (int64_t s = 0; s < live; s++) scores[s] = 0.0f;
                    for (int64_t x = 0; x < D; x++) {
                        float a = qs[x];
                        for (int64_t s = 0; s < live; s++) scores[s] = scores[s] + a * P[s * sp2 + x];
                    }
                }
                const float *mask = intra_mask + (h * C + j) * C;
                for (int64_t s = 0; s < live; s++) scores[s] = scores[s] * mask[s];
                weighted_rows(scores, P + D, sp2, live, D, acc);     /* intra[e] */
                weighted_rows(qd, S, ss2, D, D, acc2);               /* inter[e] */
                int64_t oo = (t * H + h) * D;
                for (int64_t e = 0; e < D; e++) store_f32(out, oo + e, acc2[e] + acc[e], fp32_io);
                if (j == C - 1) {
                    float wd = window_decay[h];
                    const float *kd = k_decay + h * C;
                    for (int64_t x = 0; x < D; x++) {
                        for (int64_t e = 0; e < D; e++) acc[e] = 0.0f;
                        for (int64_t s = 0; s < C; s++) {
                            float a = P[s * sp2 + x] * kd[s];
                            const float *vs = P + s * sp2 + D;
                            for (int64_t e = 0; e < D; e++) acc[e] = acc[e] + a * vs[e];
                        }
                        float *sx = S + x * ss2;
                        for (int64_t e = 0; e < D; e++) sx[e] = wd * sx[e] + acc[e];
                    }
                    for (int64_t s = 0; s < C; s++) memset(P + s * sp2, 0, (size_t)(2 * D) * sizeof(float));
                }
            }
        }
    }
}
