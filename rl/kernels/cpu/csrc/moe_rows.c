/* The MLPs' element-wise steps without autograd (see rl/kernels/cpu/elementwise.py, `swiglu`,
   and rl/kernels/cpu/moe.py, `moe_experts`): the torch forms' arithmetic, one fp32 operation at
   a time, in one pass.

   swiglu_rows, per row p of gate and up [P, I] (bf16, row strides ldg, ldu), g = gate[p, i],
   u = up[p, i], e = exp(-g) (fp32 [P, I], ATen's exp, as `elementwise.sigmoid`):
       out[p, i] = bf16((g * (1 / (1 + e))) * u)                  (silu(g) * u, `swiglu`)
   combine_rows, per token t, its k (token, slot) rows y[where[t * k + s]] (bf16 [., H]) with
   weights w[t, s] (fp32 [N, k]), where[order[p]] = p (order: the rows' sorted position -> pair):
       c = w[t, 0] * y_0;  c = c + w[t, s] * y_s  for s = 1 .. k-1;  out[t] = bf16(c)
   Built with -ffp-contract=off: every product rounded to fp32 before its sum. */
#include "vec.h"

void swiglu_rows(int64_t P, int64_t I, const uint16_t *gate, int64_t ldg, const uint16_t *up, int64_t ldu,
                 const float *e, uint16_t *out)
{
    for (int64_t p = 0; p < P; p++) {
        const uint16_t *g = gate + p * ldg, *u = up + p * ldu;
        const float *ep = e + p * I;
        uint16_t *o = out + p * I;
        for (int64_t i = 0; i < I; i++) {
            float gf = bf16_to_f32(g[i]);
            o[i] = f32_to_bf16((gf * (1.0f / (1.0f + ep[i]))) * bf16_to_f32(u[i]));
        }
    }
}

void combine_rows(int64_t N, int64_t k, int64_t H, const uint16_t *y, const int64_t *order, const float *w,
                  int64_t *where, uint16_t *out)
{
    for (int64_t p = 0; p < N * k; p++) where[order[p]] = p;
    float c[H];
    for (int64_t t = 0; t < N; t++) {
        for (int64_t s = 0; s < k; s++) {
            const uint16_t *row = y + where[t * k + s] * H;
            float ws = w[t * k + s];
            if (s == 0)
                for (int64_t h = 0; h < H; h++) c[h] = ws * bf16_to_f32(row[h]);
            else
                for (int64_t h = 0; h < H; h++) c[h] = c[h] + ws * bf16_to_f32(row[h]);
        }
        for (int64_t h = 0; h < H; h++) out[t * H + h] = f32_to_bf16(c[h]);
    }
}
