/* Softmax-attention query rows over vLLM's paged KV cache (see rl/kernels/cpu/attention.py,
   `_paged_rows`, and rows.c for the arithmetic rules): the general path's arithmetic on each
   query token's rows and its own key blocks, read in place in the cache.

   Row b is one query token (a decode step's, or one of a prefill's: each row names its own
   key blocks, count[b] of them from pair first[b], its last visible position ctx[b] and its
   sequence length seq_lens[b]: a prefill row passes its position + 1, as its later keys have
   p = 0, whose products with the (finite) values there leave its sums as they are).
   attn_rows_scores, per row b, query head qh (KV head qh / group), key position p in the
   row's blocks (BK positions each, block i at element offset run_at[(first[b] + i) * hkv +
   kv head] of the cache, keys in [:, :D], values in [:, D:2D]):
       s = (sum_x q[x] * k_p[x]) * scale          (sum from +0 in increasing x, as bmm_rows)
   for p <= ctx[b] (visible), then m = the max of the visible s (0 when that is not finite),
   z = s - m for visible keys and -inf otherwise; z [n, hq, nbmax * BK].
   The caller takes p = exp(z) with torch (ATen's exp, as the general path does).
   attn_rows_combine, per (b, qh) and block i: sum_i = sum_p p (+0, increasing p: the
   bmm_rows sum with ones), pv_i[e] = sum_p p * v_p[e] (v past the sequence's end read as +0.0);
   denom = sum_0 + sum_1 + ..., out = pv_0 + pv_1 + ... in block order, with +0.0 added for
   each block up to nbmax the sequence lacks (the general path's zero blocks), denom 1 where not
   > 0, out / denom rounded to the output dtype. Cache and q/out: bfloat16, or float32 with the
   flags. Innermost strides are 1. */
#include "vec.h"

#define BK 64

/* 16 consecutive elements from at as fp32 (n < 16: the rest zero) */
static inline vf ld16(const void *p, int64_t at, int64_t n, int fp32) {
    vf v = {0};
    if (n == W) {
        if (fp32) return *(const vf_u *)((const float *)p + at);
        vu16 h = *(const vu16_u *)((const uint16_t *)p + at);
        return (vf)(__builtin_convertvector(h, vu32) << 16);
    }
    for (int64_t i = 0; i < n; i++) v[i] = load_f32(p, at + i, fp32);
    return v;
}

void attn_rows_scores(int64_t n, int64_t hkv, int64_t group, int64_t D, int64_t nbmax,
                        const void *q, int64_t sq0, int64_t sq1, int q_fp32,
                        const void *cache, int cache_fp32, const int64_t *run_at, const int64_t *first,
                        const int64_t *count, const int64_t *ctx, float scale, float *z)
{
    int64_t L = nbmax * BK;
    float qv[group][D];
    for (int64_t b = 0; b < n; b++) {
        int64_t nb = count[b];
        int64_t last = ctx[b];                        /* keys at positions <= last are visible */
        for (int64_t hk = 0; hk < hkv; hk++) {
            for (int64_t r = 0; r < group; r++)
                for (int64_t x = 0; x < D; x++) qv[r][x] = load_f32(q, b * sq0 + (hk * group + r) * sq1 + x, q_fp32);
            float mx[group];
            int bad[group];
            for (int64_t r = 0; r < group; r++) { mx[r] = -__builtin_inff(); bad[r] = 0; }
            for (int64_t i = 0; i < nbmax; i++) {
                float *zi[group];
                for (int64_t r = 0; r < group; r++) zi[r] = z + (b * hkv * group + hk * group + r) * L + i * BK;
                if (i >= nb) {
                    for (int64_t r = 0; r < group; r++)
                        for (int64_t j = 0; j < BK; j++) zi[r][j] = -__builtin_inff();
                    continue;
                }
                int64_t base = run_at[(first[b] + i) * hkv + hk];
                for (int64_t j0 = 0; j0 < BK; j0 += W) {
                    /* keys j0 .. j0+15 transposed 16 dims at a time: lane j of kt[x] = k_{j0+j}[x] */
                    vf acc[group];
                    for (int64_t r = 0; r < group; r++) acc[r] = (vf){0};
                    for (int64_t x0 = 0; x0 < D; x0 += W) {
                        int64_t nx = D - x0 < W ? D - x0 : W;
                        vf kt[W];
                        for (int64_t j = 0; j < W; j++) kt[j] = ld16(cache, base + (j0 + j) * 2 * D + x0, nx, cache_fp32);
                        transpose16(kt);
                        for (int64_t x = 0; x < nx; x++)
                            for (int64_t r = 0; r < group; r++) acc[r] = acc[r] + qv[r][x0 + x] * kt[x];
                    }
                    for (int64_t r = 0; r < group; r++)
                        for (int64_t j = 0; j < W; j++) {
                            int64_t pos = i * BK + j0 + j;
                            if (pos <= last) {
                                float s = acc[r][j] * scale;
                                zi[r][j0 + j] = s;
                                if (s != s) bad[r] = 1;
                                else if (s > mx[r]) mx[r] = s;
                            } else {
                                zi[r][j0 + j] = -__builtin_inff();
                            }
                        }
                }
            }
            for (int64_t r = 0; r < group; r++) {
                float m = (bad[r] || mx[r] == __builtin_inff() || mx[r] == -__builtin_inff()) ? 0.0f : mx[r];
                float *zr = z + (b * hkv * group + hk * group + r) * L;
                int64_t visible = last + 1 < nb * BK ? last + 1 : nb * BK;
                for (int64_t p = 0; p < visible; p++) zr[p] = zr[p] - m;
            }
        }
    }
}

void attn_rows_combine(int64_t n, int64_t hkv, int64_t group, int64_t D, int64_t nbmax,
                         const float *p, const void *cache, int cache_fp32, const int64_t *run_at,
                         const int64_t *first, const int64_t *count, const int64_t *seq_lens, int out_fp32,
                         void *out)
{
    int64_t L = nbmax * BK, hq = hkv * group, nv = (D + W - 1) / W;
    vf acc[nv], tot[nv];
    for (int64_t b = 0; b < n; b++) {
        int64_t nb = count[b];
        for (int64_t qh = 0; qh < hq; qh++) {
            int64_t hk = qh / group;
            const float *pr = p + (b * hq + qh) * L;
            float denom = 0.0f;
            for (int64_t i = 0; i < nb; i++) {
                int64_t base = run_at[(first[b] + i) * hkv + hk] + D;          /* values */
                int64_t valid = seq_lens[b] - i * BK;
                if (valid > BK) valid = BK;
                const float *pb = pr + i * BK;
                float bsum = 0.0f;
                for (int64_t j = 0; j < BK; j++) bsum = bsum + pb[j] * 1.0f;
                for (int64_t u = 0; u < nv; u++) acc[u] = (vf){0};
                for (int64_t j = 0; j < BK; j++) {
                    float a = pb[j];
                    if (j < valid) {
                        int64_t row = base + j * 2 * D;
                        for (int64_t u = 0; u < nv; u++)
                            acc[u] = acc[u] + a * ld16(cache, row + u * W, D - u * W < W ? D - u * W : W, cache_fp32);
                    } else {
                        for (int64_t u = 0; u < nv; u++) acc[u] = acc[u] + a * (vf){0};
                    }
                }
                if (i == 0) {
                    denom = bsum;
                    for (int64_t u = 0; u < nv; u++) tot[u] = acc[u];
                } else {
                    denom = denom + bsum;
                    for (int64_t u = 0; u < nv; u++) tot[u] = tot[u] + acc[u];
                }
            }
            for (int64_t i = nb; i < nbmax; i++) {                 /* blocks this sequence lacks */
                denom = denom + 0.0f;
                for (int64_t u = 0; u < nv; u++) tot[u] = tot[u] + (vf){0};
            }
            if (!(denom > 0.0f)) denom = 1.0f;
            int64_t o = (b * hq + qh) * D;
            for (int64_t e = 0; e < D; e++) {
                store_f32(out, o + e, tot[e / W][e % W] / denom, out_fp32);
            }
        }
    }
}
