/* Vector types and helpers shared by the cpu backend's C kernels (GCC vector extensions: the
   compiler lowers them to whatever vector width -march=native gives; no arithmetic here). */
#ifndef LOCKSTEP_VEC_H
#define LOCKSTEP_VEC_H
#include <stdint.h>
#include <string.h>

#define W 16    /* columns per vector */

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef uint32_t vu32 __attribute__((vector_size(W * sizeof(uint32_t))));
typedef uint16_t vu16 __attribute__((vector_size(W * sizeof(uint16_t))));
/* the same vectors at element alignment: plain unaligned vector loads and stores */
typedef float vf_u __attribute__((vector_size(W * sizeof(float)), aligned(4)));
typedef uint16_t vu16_u __attribute__((vector_size(W * sizeof(uint16_t)), aligned(2)));

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* element `at` of a bfloat16 array, or of a float32 one when fp32 is set, as fp32 (exact) */
static inline float load_f32(const void *p, int64_t at, int fp32) {
    return fp32 ? ((const float *)p)[at] : bf16_to_f32(((const uint16_t *)p)[at]);
}

/* elements at .. at + 15 of a bfloat16 array, or of a float32 one when fp32 is set, as fp32 */
static inline vf load16_f32(const void *p, int64_t at, int fp32) {
    if (fp32) return *(const vf_u *)((const float *)p + at);
    vu16 h = *(const vu16_u *)((const uint16_t *)p + at);
    return (vf)(__builtin_convertvector(h, vu32) << 16);
}

static inline uint16_t f32_to_bf16(float f) {        /* torch's float -> bfloat16: nearest even */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + (((u >> 16) & 1) + 0x7FFF)) >> 16);
}

/* 16 x 16 transpose in registers (four butterfly stages swapping b x b blocks) */
static inline __attribute__((always_inline)) void transpose16(vf r[W]) {
#define STAGE(B, LO, HI)                                                                      \
    for (int i = 0; i < W; i++)                                                               \
        if (!(i & B)) {                                                                       \
            vf x = r[i], y = r[i + B];                                                        \
            r[i] = __builtin_shuffle(x, y, (vu32)LO);                                         \
            r[i + B] = __builtin_shuffle(x, y, (vu32)HI);                                     \
        }
    STAGE(8, ((vu32){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}),
             ((vu32){8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}))
    STAGE(4, ((vu32){0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}),
             ((vu32){4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}))
    STAGE(2, ((vu32){0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}),
             ((vu32){2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}))
    STAGE(1, ((vu32){0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}),
             ((vu32){1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}))
#undef STAGE
}

/* v into element `at` of a bfloat16 array (nearest even), or of a float32 one when fp32 is set */
static inline void store_f32(void *p, int64_t at, float v, int fp32) {
    if (fp32) ((float *)p)[at] = v;
    else ((uint16_t *)p)[at] = f32_to_bf16(v);
}

#endif
