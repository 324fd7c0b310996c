/* Gumbel-max draws for rollout/sampling.py (`sample`): per row, the token t maximising
   lp[t] + g(bits_t), g(bits) = -log(-log((bits + 0.5) / 2^32)) in float64 with the C library's
   log, bits_t = mix32(row_hash ^ token_hash[t]) (the counter-based hash of rollout/sampling.py;
   row_hash from the row's seed and position), ties to the lower t, the first NaN if any.

   Exact without a log per token: g rises with bits, so with g_lo[b] / g_hi[b] the noise at the
   lowest / highest bits of bucket b = bits >> 20 (`gumbel_tables`), T = max_t g_lo[b_t] + lp[t]
   is at most the winning score, and only tokens with g_hi[b_t] + lp[t] >= T (a few per row)
   get their exact score. MARGIN covers any last-ulp unevenness of log. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BUCKET_SHIFT 20
#define BUCKETS (1 << (32 - BUCKET_SHIFT))
#define MARGIN 1e-9

static double noise(uint32_t bits) {
    double u = ((double)bits + 0.5) * (1.0 / 4294967296.0);
    return -log(-log(u));
}

void gumbel_tables(double *g_lo, double *g_hi) {
    for (uint32_t b = 0; b < BUCKETS; b++) {
        g_lo[b] = noise(b << BUCKET_SHIFT);
        g_hi[b] = noise((b << BUCKET_SHIFT) | ((1u << BUCKET_SHIFT) - 1));
    }
}

static inline uint32_t mix32(uint32_t x) {
    for (int i = 0; i < 2; i++) {
        x ^= x >> 16;
        x *= 0x45D9F3Bu;
    }
    return x ^ (x >> 16);
}

static uint32_t row_hash(int64_t seed, int64_t position) {
    uint32_t lo = (uint32_t)seed, hi = (uint32_t)((uint64_t)seed >> 32);
    return mix32(mix32(lo ^ mix32(hi)) ^ (uint32_t)position);
}

void gumbel_argmax(int64_t rows, int64_t vocab, const float *lp, int64_t ld, const int64_t *seeds,
                   const int64_t *positions, const uint32_t *token_hash, const double *g_lo,
                   const double *g_hi, int64_t *out) {
    uint32_t *bits = malloc((size_t)vocab * sizeof *bits);
    for (int64_t r = 0; r < rows; r++) {
        const float *row = lp + r * ld;
        uint32_t h = row_hash(seeds[r], positions[r]);
        double threshold = -INFINITY;
        int nan = 0;
        for (int64_t t = 0; t < vocab; t++) {
            uint32_t x = mix32(h ^ token_hash[t]);
            if (bits) bits[t] = x;
            double low = g_lo[x >> BUCKET_SHIFT] + (double)row[t] - MARGIN;
            threshold = low > threshold ? low : threshold;
            nan |= row[t] != row[t];
        }
        int64_t best_at = 0;
        if (nan) {
            while (row[best_at] == row[best_at]) best_at++;
        } else {
            double best = -INFINITY;
            for (int64_t t = 0; t < vocab; t++) {
                uint32_t x = bits ? bits[t] : mix32(h ^ token_hash[t]);
                if (g_hi[x >> BUCKET_SHIFT] + (double)row[t] + MARGIN < threshold) continue;
                double score = noise(x) + (double)row[t];
                if (score > best) { best = score; best_at = t; }
            }
        }
        out[r] = best_at;
    }
    free(bits);
}
