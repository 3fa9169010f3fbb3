/* Paged decode attention for fp32 CPU tensors: one query per sequence against its pages, read
   in place (no gather of the context), one (sequence, KV head) per work item, in fp32 like the
   torch reference: scores of the scaled query, softmax, then the probabilities times the
   values. The caches are read through their strides (MLA's values are a slice of its keys). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "vexp.h"

#if defined(__AVX512F__)
#define AVW 16
#else
#define AVW 8
#endif

typedef float av __attribute__((vector_size(AVW * sizeof(float))));
typedef float avu __attribute__((vector_size(AVW * sizeof(float)), aligned(4), may_alias));

static inline float av_sum(av v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.0f;
    for (int l = 0; l < AVW; l++) s += v[l];
    return s;
#endif
}

static inline av av_splat(float s) {
    av v;
    for (int l = 0; l < AVW; l++) v[l] = s;
    return v;
}

static float dot(const float *a, const float *b, int64_t n) {
    av acc = {0};
    int64_t d = 0;
    for (; d + AVW <= n; d += AVW) acc += *(const avu *)(a + d) * *(const avu *)(b + d);
    float s = av_sum(acc);
    for (; d < n; d++) s += a[d] * b[d];
    return s;
}

/* o[0:n] += p * v[0:n] */
static void axpy(float p, const float *v, float *o, int64_t n) {
    av pv = av_splat(p);
    int64_t d = 0;
    for (; d + AVW <= n; d += AVW) *(avu *)(o + d) += pv * *(const avu *)(v + d);
    for (; d < n; d++) o[d] += p * v[d];
}

typedef struct {
    int64_t block, token, head; /* strides (elements) of a cache's first three dims */
} strides_t;

/* One sequence's G query heads of KV head h: scores [G, len] in s, out rows [G, Dv]. */
static void decode_item(const float *q, const float *kc, strides_t ks, const float *vc,
                        strides_t vs, const int32_t *table, int64_t len, int64_t h, int64_t G,
                        int64_t D, int64_t Dv, int64_t bs, float scale, float *s, float *qs,
                        float *out) {
    for (int64_t i = 0; i < G * D; i++) qs[i] = q[i] * scale;
    for (int64_t j = 0; j < len; j++) {
        const float *k = kc + table[j / bs] * ks.block + (j % bs) * ks.token + h * ks.head;
        for (int64_t g = 0; g < G; g++) s[g * len + j] = dot(qs + g * D, k, D);
    }
    for (int64_t g = 0; g < G; g++) {
        float *sg = s + g * len, m = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < len; j++) m = sg[j] > m ? sg[j] : m;
        for (int64_t j = 0; j < len; j++) sg[j] -= m;
        exp_array(sg, len, 1.0f);
        for (int64_t j = 0; j < len; j++) sum += sg[j];
        for (int64_t j = 0; j < len; j++) sg[j] /= sum;
    }
    memset(out, 0, G * Dv * sizeof(float));
    for (int64_t j = 0; j < len; j++) {
        const float *v = vc + table[j / bs] * vs.block + (j % bs) * vs.token + h * vs.head;
        for (int64_t g = 0; g < G; g++) axpy(s[g * len + j], v, out + g * Dv, Dv);
    }
}

/* out [n, Hq, Dv] for q [n, Hq, D] (contiguous); tables [n, max_blocks] and lens [n] int32.
   Returns 0, or -1 when memory ran out. */
int afd_paged_decode_f32(const float *q, const float *kc, const int64_t *kstr, const float *vc,
                         const int64_t *vstr, const int32_t *tables, int64_t max_blocks,
                         const int32_t *lens, float *out, int64_t n, int64_t Hq, int64_t Hkv,
                         int64_t D, int64_t Dv, int64_t bs, float scale, int nthreads) {
    strides_t ks = {kstr[0], kstr[1], kstr[2]}, vs = {vstr[0], vstr[1], vstr[2]};
    int64_t G = Hq / Hkv, longest = 0;
    for (int64_t b = 0; b < n; b++) longest = lens[b] > longest ? lens[b] : longest;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *s = malloc((G * longest + G * D + 1) * sizeof(float));
        if (!s) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < n * Hkv; it++) {
            if (!s) continue;
            int64_t b = it / Hkv, h = it % Hkv;
            decode_item(q + (b * Hq + h * G) * D, kc, ks, vc, vs, tables + b * max_blocks,
                        lens[b], h, G, D, Dv, bs, scale, s, s + G * longest,
                        out + (b * Hq + h * G) * Dv);
        }
        free(s);
    }
    return failed ? -1 : 0;
}
