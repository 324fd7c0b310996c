/* Inference forms of RMSNorm and RoPE (see rl/kernels/cpu/norm.py and rope.py): the torch
   forms' element-wise arithmetic, one fp32 operation at a time, in one pass per row.

   rms_norm_rows, per row i of x [rows, D] (row stride sx):
     ss   = sum_k x[k] * x[k]           (products rounded to fp32, summed from +0 in increasing k:
                                         rows.bmm_rows' order, which the torch form uses; 16 rows
                                         at a time, one per vector lane)
     r    = 1 / sqrt(ss / D + eps)      (each step one correctly rounded fp32 operation)
     y[k] = (x[k] * r) * w[i % wrows][k], rounded to the output dtype (bf16: nearest even);
     with gate_exp (fp32 [rows, D], exp(-gate) from ATen's exp, as the torch form's sigmoid):
     y[k] = ((x[k] * r) * w[i % wrows][k]) * (1 / (1 + gate_exp[i, k])), then rounded.
   rope_rows, per token t and head h of x [N, H, D] (strides sx0, sx1), half = rotary_dim / 2:
     y[j]        = x[j] * cos[t, j] - x[j + half] * sin[t, j]        j < half
     y[j + half] = x[j + half] * cos[t, j] + x[j] * sin[t, j]
     y[j]        = x[j]                                              j >= rotary_dim
   x and y are bfloat16, or float32 with the flag; w, cos, sin float32; y contiguous. */
#include <math.h>
#include "vec.h"

/* ss[i] = sum_k x[i, k] * x[i, k] for rows i < nrows (<= 16) of x: each row's products summed
   from +0 in increasing k, 16 rows at once (lane i holds row i's running sum) */
static void sums_of_squares(const void *x, int64_t sx, int64_t nrows, int64_t D, int fp32_io, float *ss) {
    vf acc = (vf){0};
    int64_t k0 = 0;
    for (; k0 + W <= D; k0 += W) {
        vf r[W];
        for (int64_t i = 0; i < W; i++) r[i] = i < nrows ? load16_f32(x, i * sx + k0, fp32_io) : (vf){0};
        transpose16(r);                       /* r[kk]: element k0 + kk of the 16 rows */
        for (int64_t kk = 0; kk < W; kk++) acc = acc + r[kk] * r[kk];
    }
    for (int64_t i = 0; i < nrows; i++) {
        float s = acc[i];
        for (int64_t k = k0; k < D; k++) {
            float v = load_f32(x, i * sx + k, fp32_io);
            s = s + v * v;
        }
        ss[i] = s;
    }
}

void rms_norm_rows(int64_t rows, int64_t D, const void *x, int64_t sx, const float *w, int64_t wrows,
                   const float *gate_exp, float eps, int fp32_io, void *y)
{
    float ss[W];
    for (int64_t i0 = 0; i0 < rows; i0 += W) {
        int64_t nrows = rows - i0 < W ? rows - i0 : W;
        sums_of_squares((const char *)x + i0 * sx * (fp32_io ? 4 : 2), sx, nrows, D, fp32_io, ss);
        for (int64_t i = i0; i < i0 + nrows; i++) {
            float r = 1.0f / sqrtf(ss[i - i0] / (float)D + eps);
            const float *wr = w + (i % wrows) * D;
            if (gate_exp) {
                const float *e = gate_exp + i * D;
                for (int64_t k = 0; k < D; k++)
                    store_f32(y, i * D + k, ((load_f32(x, i * sx + k, fp32_io) * r) * wr[k]) * (1.0f / (1.0f + e[k])),
                              fp32_io);
            } else {
                for (int64_t k = 0; k < D; k++) store_f32(y, i * D + k, (load_f32(x, i * sx + k, fp32_io) * r) * wr[k], fp32_io);
            }
        }
    }
}

void rope_rows(int64_t N, int64_t H, int64_t D, int64_t rotary_dim, const void *x, int64_t sx0, int64_t sx1,
               const float *cos_t, const float *sin_t, int fp32_io, void *y)
{
    int64_t half = rotary_dim / 2;
    for (int64_t t = 0; t < N; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < H; h++) {
            int64_t xi = t * sx0 + h * sx1, yi = (t * H + h) * D;
            for (int64_t j = 0; j < half; j++) {
                float x1 = load_f32(x, xi + j, fp32_io), x2 = load_f32(x, xi + j + half, fp32_io);
                store_f32(y, yi + j, x1 * c[j] - x2 * s[j], fp32_io);
                store_f32(y, yi + j + half, x2 * c[j] + x1 * s[j], fp32_io);
            }
            for (int64_t j = rotary_dim; j < D; j++) store_f32(y, yi + j, load_f32(x, xi + j, fp32_io), fp32_io);
        }
    }
}
