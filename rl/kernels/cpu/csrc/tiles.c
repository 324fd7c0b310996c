/* bf16 products on AMX tiles with a defined arithmetic order (see rl/kernels/cpu/tiles.py).

   out[i, j] = x[i, :] . w[j, :] for bf16 x [M, K] and w [N, K], accumulated in fp32: the
   fp32 accumulator of element (i, j) starts at +0 and takes one TDPBF16PS per 32-wide block of
   k, in increasing k (K is zero-padded to a multiple of 32; a zero product leaves the sum as it
   was). One TDPBF16PS computes each element of its 16 x 16 output tile from that element's own
   row of x and column of w, so an element's bits depend on them and on K alone: not on M, N,
   the row or column tile it falls in, or the loop order below. Output: the fp32 sum, or it
   rounded to bf16 (nearest-even, VCVTNEPS2BF16).

   w is packed once (`tiles_pack`) into VNNI tiles: columns in panels of 16, four panels to a
   group of 64 columns; for each pair of k, a group holds its panels' 16 columns x 2 values.
   Needs AMX-BF16 (the caller checks) and the process's AMX permission (rl/kernels/cpu/amx.py);
   compiled with target attributes so the library builds on any x86-64. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PANEL 16                  /* columns per tile */
#define GROUP 4                   /* tiles (panels) per column group: 4 accumulator tiles */
#define KBLOCK 32                 /* k per TDPBF16PS */
#define ROWS 16                   /* rows per x tile */
/* software prefetch of the packed weight PF_DIST bytes ahead of the tile loads (the stream runs
   on into the next column group): ~12.2 against ~11.3 GB/s without, streaming a small MoE's
   experts at decode (4 rows each; 8 KB read alike with 4 and 16 KB, the T1/T2 hints slower) */
#define PF_DIST 8192
#define PF_LINE 64
#define PF_HINT _MM_HINT_T0
#define W_CHUNK_BYTES (512 << 10) /* packed weight bytes a chunk of column groups may hold */

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))

static int64_t padded_k(int64_t k) { return (k + KBLOCK - 1) / KBLOCK * KBLOCK; }

/* uint16 elements of the packed form of an [n, k] weight */
int64_t tiles_packed_size(int64_t n, int64_t k) {
    return (n + GROUP * PANEL - 1) / (GROUP * PANEL) * GROUP * PANEL * padded_k(k);
}

void tiles_pack(int64_t n, int64_t k, const uint16_t *w, int64_t ldw, uint16_t *packed) {
    int64_t pairs = padded_k(k) / 2;
    for (int64_t g0 = 0; g0 < n; g0 += GROUP * PANEL) {
        int64_t panels = (n - g0 + PANEL - 1) / PANEL;
        if (panels > GROUP) panels = GROUP;
        uint16_t *dst = packed + g0 * 2 * pairs;
        for (int64_t kp = 0; kp < pairs; kp++)
            for (int64_t p = 0; p < panels; p++)
                for (int64_t c = 0; c < PANEL; c++) {
                    int64_t row = g0 + p * PANEL + c;
                    uint16_t *d = dst + (kp * panels + p) * 2 * PANEL + 2 * c;
                    for (int j = 0; j < 2; j++) {
                        int64_t col = 2 * kp + j;
                        d[j] = row < n && col < k ? w[row * ldw + col] : 0;
                    }
                }
    }
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

AMX_TARGET static void configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {           /* 0-3: fp32 accumulators, 4-5: x, 6-7: w (`block`: 4 x, 5 w) */
        cfg.colsb[t] = 64;
        cfg.rows[t] = ROWS;
    }
    _tile_loadconfig(&cfg);
}

#define W_TILE(acc, p)                                                                       \
    if ((p) < panels) {                                                                      \
        _tile_loadd(5, group + (kb / 2 * panels + (p)) * 2 * PANEL, panels * 2 * PANEL * 2); \
        _tile_dpbf16ps(acc, 4, 5);                                                           \
    }

/* one block of 16 rows (x rows `lda` apart, K padded) times one column group */
AMX_TARGET static void block(const uint16_t *x, int64_t lda, int64_t kpad, const uint16_t *group,
                             int64_t panels, float sums[ROWS][GROUP * PANEL]) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const char *pf = (const char *)group + PF_DIST;
    int64_t step = panels * 2 * PANEL * 2 * (KBLOCK / 2);
    for (int64_t kb = 0; kb < kpad; kb += KBLOCK, pf += step) {
        for (int64_t l = 0; l < step; l += PF_LINE) _mm_prefetch(pf + l, PF_HINT);
        _tile_loadd(4, x + kb, lda * 2);
        W_TILE(0, 0)
        W_TILE(1, 1)
        W_TILE(2, 2)
        W_TILE(3, 3)
    }
    _tile_stored(0, &sums[0][0], GROUP * PANEL * 4);
    _tile_stored(1, &sums[0][PANEL], GROUP * PANEL * 4);
    _tile_stored(2, &sums[0][2 * PANEL], GROUP * PANEL * 4);
    _tile_stored(3, &sums[0][3 * PANEL], GROUP * PANEL * 4);
}

/* two blocks of 16 rows (x rows `lda` apart: rows 0-15, 16-31) times panels p0, p0 + 1 of one
   column group, into columns p0 * 16 .. of sums0 (rows 0-15) and sums1 (rows 16-31): each
   weight tile loaded once for both row blocks (half the weight reads of `block` per product) */
AMX_TARGET static void block_pair(const uint16_t *x, int64_t lda, int64_t kpad, const uint16_t *group,
                                  int64_t panels, int64_t p0, float sums0[ROWS][GROUP * PANEL],
                                  float sums1[ROWS][GROUP * PANEL]) {
    int two = p0 + 1 < panels;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < kpad; kb += KBLOCK) {
        _tile_loadd(4, x + kb, lda * 2);
        _tile_loadd(5, x + ROWS * lda + kb, lda * 2);
        _tile_loadd(6, group + (kb / 2 * panels + p0) * 2 * PANEL, panels * 2 * PANEL * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (two) {
            _tile_loadd(7, group + (kb / 2 * panels + p0 + 1) * 2 * PANEL, panels * 2 * PANEL * 2);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, &sums0[0][p0 * PANEL], GROUP * PANEL * 4);
    _tile_stored(2, &sums1[0][p0 * PANEL], GROUP * PANEL * 4);
    if (two) {
        _tile_stored(1, &sums0[0][(p0 + 1) * PANEL], GROUP * PANEL * 4);
        _tile_stored(3, &sums1[0][(p0 + 1) * PANEL], GROUP * PANEL * 4);
    }
}

AMX_TARGET static void write_rows(float sums[ROWS][GROUP * PANEL], int64_t rows, int64_t col0, int64_t n,
                                  void *out, int64_t ldo, int out_fp32) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < GROUP * PANEL && col0 + c < n; c += PANEL) {
            int64_t left = n - col0 - c;
            __mmask16 mask = left >= PANEL ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 v = _mm512_loadu_ps(&sums[r][c]);
            if (out_fp32)
                _mm512_mask_storeu_ps((float *)out + r * ldo + col0 + c, mask, v);
            else
                _mm256_mask_storeu_epi16((uint16_t *)out + r * ldo + col0 + c, mask,
                                         (__m256i)_mm512_cvtneps_pbh(v));
        }
}

/* out [m, n] (row stride ldo; fp32 or bf16) = x [m, k] . packed w, row r of x at x + r * ldx
   (bf16), or at x + row_index[r] * ldx when row_index is given (a gather).
   Returns 0, or -1 when scratch memory could not be had. */
AMX_TARGET static int product_rows(int64_t m, int64_t n, int64_t k, const uint16_t *x, int64_t ldx,
                                   const int64_t *row_index, const uint16_t *packed, void *out, int64_t ldo,
                                   int out_fp32) {
    int64_t kpad = padded_k(k), pairs = kpad / 2;
    int64_t mpad = (m + ROWS - 1) / ROWS * ROWS;
    uint16_t *copy = NULL;
    const uint16_t *a = x;
    int64_t lda = ldx;
    if (row_index || mpad != m || kpad != k) {      /* zero-padded copy: whole x tiles */
        copy = aligned_alloc(64, (size_t)(mpad * kpad * 2 + 63) / 64 * 64);
        if (!copy) return -1;
        memset(copy, 0, (size_t)mpad * kpad * 2);
        for (int64_t r = 0; r < m; r++)
            memcpy(copy + r * kpad, x + (row_index ? row_index[r] : r) * ldx, (size_t)k * 2);
        a = copy;
        lda = kpad;
    }
    float sums[ROWS][GROUP * PANEL] __attribute__((aligned(64)));
    size_t esize = out_fp32 ? 4 : 2;
    /* column groups in chunks whose weights stay in L2 while every row block passes them:
       each weight byte comes from memory once, x once per chunk */
    int64_t chunk = W_CHUNK_BYTES / (GROUP * PANEL * kpad * 2);
    if (chunk < 1) chunk = 1;
    chunk *= GROUP * PANEL;
    configure();
    float sums1[ROWS][GROUP * PANEL] __attribute__((aligned(64)));
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        int64_t r0 = 0;
        for (; r0 + 2 * ROWS <= mpad; r0 += 2 * ROWS)       /* pairs of row blocks */
            for (int64_t g0 = c0; g0 < n && g0 < c0 + chunk; g0 += GROUP * PANEL) {
                int64_t panels = (n - g0 + PANEL - 1) / PANEL;
                if (panels > GROUP) panels = GROUP;
                for (int64_t p0 = 0; p0 < panels; p0 += 2)
                    block_pair(a + r0 * lda, lda, kpad, packed + g0 * 2 * pairs, panels, p0, sums, sums1);
                write_rows(sums, ROWS, g0, n, (char *)out + r0 * ldo * esize, ldo, out_fp32);
                write_rows(sums1, m - r0 - ROWS < ROWS ? m - r0 - ROWS : ROWS, g0, n,
                           (char *)out + (r0 + ROWS) * ldo * esize, ldo, out_fp32);
            }
        for (; r0 < m; r0 += ROWS)                          /* a last single row block */
            for (int64_t g0 = c0; g0 < n && g0 < c0 + chunk; g0 += GROUP * PANEL) {
                int64_t panels = (n - g0 + PANEL - 1) / PANEL;
                if (panels > GROUP) panels = GROUP;
                block(a + r0 * lda, lda, kpad, packed + g0 * 2 * pairs, panels, sums);
                write_rows(sums, m - r0 < ROWS ? m - r0 : ROWS, g0, n, (char *)out + r0 * ldo * esize, ldo, out_fp32);
            }
    }
    _tile_release();
    free(copy);
    return 0;
}

AMX_TARGET int tiles_product(int64_t m, int64_t n, int64_t k, const uint16_t *x, int64_t ldx,
                             const uint16_t *packed, void *out, int64_t ldo, int out_fp32) {
    return product_rows(m, n, k, x, ldx, NULL, packed, out, ldo, out_fp32);
}

/* The products of consecutive row groups with consecutive parts of one packed weight (rows[g]
   rows times part g, each part n rows of the packed weight, n a multiple of 64 so that a part's
   packed form is contiguous, n * padded K elements long): one call for all of a MoE layer's
   experts, each element the same chain as in `tiles_product`. Output row r is the product of
   x's row r, or of x's row x_rows[r] when x_rows is given (the rows gathered on the way). */
AMX_TARGET int tiles_product_groups(int64_t groups, const int64_t *rows, int64_t n, int64_t k,
                                    const uint16_t *x, int64_t ldx, const int64_t *x_rows,
                                    const uint16_t *packed, void *out, int64_t ldo, int out_fp32) {
    int64_t part_stride = n * padded_k(k);
    size_t esize = out_fp32 ? 4 : 2;
    int64_t r0 = 0;
    for (int64_t g = 0; g < groups; g++) {
        if (rows[g] > 0 && product_rows(rows[g], n, k, x_rows ? x : x + r0 * ldx, ldx, x_rows ? x_rows + r0 : NULL,
                                        packed + g * part_stride, (char *)out + r0 * ldo * esize, ldo,
                                        out_fp32) != 0)
            return -1;
        r0 += rows[g];
    }
    return 0;
}
