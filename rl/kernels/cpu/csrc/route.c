/* Group-limited top-k expert selection for inference (see rl/kernels/cpu/moe.py,
   `select_experts`): the torch form's choices and arithmetic, one token at a time.

   Per token: choice = score + bias (fp32; no bias: the score). With G > 1 groups of E / G
   experts: a group's score is the sum of its two largest choices (fp32), the top_g groups are
   kept (ties: lower group first) and the other groups' experts drop out. The top_k experts by
   choice (ties: lower expert first) are taken in ascending expert order; weight = score (not
   choice); with norm, total = w_0 + w_1 + ... in that order and w / (total + 1e-20); then
   times the scaling factor. Every comparison orders NaN above all numbers, as torch's sort
   does. ids int64 [N, k], weights fp32 [N, k]. */
#include <stdint.h>

static inline int above(float a, int64_t ia, float b, int64_t ib) {   /* a before b, descending */
    int na = a != a, nb = b != b;
    if (na || nb) return na && !nb ? 1 : (na && nb ? ia < ib : 0);
    return a > b || (a == b && ia < ib);
}

void select_experts_rows(int64_t N, int64_t E, const float *scores, const float *bias, int64_t top_k,
                         int64_t n_group, int64_t topk_group, int norm, float scaling,
                         int64_t *ids, float *weights)
{
    float choice[E], gscore[n_group > 1 ? n_group : 1];
    int64_t keep[E], pick[top_k > 0 ? top_k : 1];
    int64_t per = n_group > 1 ? E / n_group : E;
    for (int64_t t = 0; t < N; t++) {
        const float *s = scores + t * E;
        for (int64_t e = 0; e < E; e++) { choice[e] = bias ? s[e] + bias[e] : s[e]; keep[e] = 1; }
        if (n_group > 1) {
            for (int64_t g = 0; g < n_group; g++) {            /* two largest of the group */
                int64_t b0 = -1, b1 = -1;
                for (int64_t e = g * per; e < (g + 1) * per; e++) {
                    if (b0 < 0 || above(choice[e], e, choice[b0], b0)) { b1 = b0; b0 = e; }
                    else if (b1 < 0 || above(choice[e], e, choice[b1], b1)) b1 = e;
                }
                gscore[g] = choice[b0] + choice[b1];
            }
            int64_t chosen[n_group];
            for (int64_t g = 0; g < n_group; g++) chosen[g] = 0;
            for (int64_t r = 0; r < topk_group; r++) {
                int64_t best = -1;
                for (int64_t g = 0; g < n_group; g++)
                    if (!chosen[g] && (best < 0 || above(gscore[g], g, gscore[best], best))) best = g;
                chosen[best] = 1;
            }
            for (int64_t e = 0; e < E; e++) keep[e] = chosen[e / per];
        }
        for (int64_t r = 0; r < top_k; r++) {                  /* top_k by choice, kept experts */
            int64_t best = -1;                                 /* (dropped ones are -inf: last) */
            for (int64_t e = 0; e < E; e++) {
                int used = 0;
                for (int64_t q = 0; q < r; q++) used |= pick[q] == e;
                if (used) continue;
                float c = keep[e] ? choice[e] : -__builtin_inff();
                float cb = best < 0 ? 0 : (keep[best] ? choice[best] : -__builtin_inff());
                if (best < 0 || above(c, e, cb, best)) best = e;
            }
            pick[r] = best;
        }
        for (int64_t r = 1; r < top_k; r++)                    /* ascending expert order */
            for (int64_t q = r; q > 0 && pick[q - 1] > pick[q]; q--) {
                int64_t tmp = pick[q]; pick[q] = pick[q - 1]; pick[q - 1] = tmp;
            }
        float w[top_k > 0 ? top_k : 1];
        for (int64_t r = 0; r < top_k; r++) w[r] = s[pick[r]];
        if (norm) {
            float total = w[0];
            for (int64_t r = 1; r < top_k; r++) total = total + w[r];
            float denom = total + 1e-20f;
            for (int64_t r = 0; r < top_k; r++) w[r] = w[r] / denom;
        }
        for (int64_t r = 0; r < top_k; r++) {
            ids[t * top_k + r] = pick[r];
            weights[t * top_k + r] = w[r] * scaling;
        }
    }
}
