/* Fused MoE for fp32 CPU tensors (afd.kernels.native builds it with gcc and loads it with
   ctypes).

   The expert weights are packed once (afd_moe_pack) into panels of PW output columns, each
   panel [reduction][PW], so that the GEMMs run as outer products: a weight vector is loaded
   once per reduction step and multiplied by MR broadcast activations, MR x NV vector
   accumulators in registers, no horizontal sums. Decode then reads each active expert's weights
   once at memory speed, where a BLAS runs small-M GEMMs at a fraction of it. Work is split into
   (expert, row chunk, column panel) items so that one expert or many keep every thread busy;
   each (token, slot) term lands in its own row and a token's terms are added in ascending
   expert order at the end, as the torch reference adds them. fp32 accumulation, no
   -ffast-math. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "vexp.h"

#if defined(__AVX512F__)
#define VW 16 /* floats per vector */
#define NV 4  /* vectors per panel */
#else
#define VW 8
#define NV 2
#endif
#define PW (VW * NV) /* output columns per packed panel */
#define MR 6         /* activation rows per register tile */
#define RB 48        /* rows per work item (they stay in cache while a panel streams past) */

typedef float vf __attribute__((vector_size(VW * sizeof(float))));
/* The same vector at any float's address (unaligned loads and stores through it). */
typedef float vfu __attribute__((vector_size(VW * sizeof(float)), aligned(4), may_alias));

static inline vf splat(float s) {
#if defined(__AVX512F__)
    return (vf)_mm512_set1_ps(s);
#elif defined(__AVX__)
    return (vf)_mm256_set1_ps(s);
#else
    vf v;
    for (int l = 0; l < VW; l++) v[l] = s;
    return v;
#endif
}

static inline int64_t panels(int64_t n) { return (n + PW - 1) / PW; }

int afd_moe_panel(void) { return PW; }

/* w [B, N, Kd] (row-major, N output columns of Kd) -> [B][panels(N)][Kd][PW], columns past N
   zero. */
void afd_moe_pack(const float *w, float *packed, int64_t B, int64_t N, int64_t Kd) {
    int64_t np = panels(N);
#pragma omp parallel for schedule(static)
    for (int64_t bp = 0; bp < B * np; bp++) {
        int64_t b = bp / np, p = bp % np;
        float *dst = packed + bp * Kd * PW;
        for (int64_t k = 0; k < Kd; k++)
            for (int64_t j = 0; j < PW; j++) {
                int64_t col = p * PW + j;
                dst[k * PW + j] = col < N ? w[(b * N + col) * Kd + k] : 0.0f;
            }
    }
}

/* c[r][0:PW] = sum_k a[r * lda + k] * panel[k][0:PW] for r < nr (c is [MR][PW]). */
static inline __attribute__((always_inline)) void tile(int nr, const float *a, int64_t lda,
                                                       const float *panel, int64_t kd, float *c) {
    vf acc[MR][NV];
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = (vf){0};
    for (int64_t k = 0; k < kd; k++) {
        vf b[NV];
        for (int v = 0; v < NV; v++) b[v] = *(const vfu *)(panel + k * PW + v * VW);
        for (int r = 0; r < nr; r++) {
            vf ar = splat(a[r * lda + k]);
            for (int v = 0; v < NV; v++) acc[r][v] += ar * b[v];
        }
    }
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < NV; v++) *(vfu *)(c + r * PW + v * VW) = acc[r][v];
}

static void tile_any(int nr, const float *a, int64_t lda, const float *panel, int64_t kd,
                     float *c) {
    switch (nr) {
    case 6: tile(6, a, lda, panel, kd, c); break;
    case 5: tile(5, a, lda, panel, kd, c); break;
    case 4: tile(4, a, lda, panel, kd, c); break;
    case 3: tile(3, a, lda, panel, kd, c); break;
    case 2: tile(2, a, lda, panel, kd, c); break;
    default: tile(1, a, lda, panel, kd, c); break;
    }
}

/* c[r * ldc + j] = (a [m, kd] @ panel)[r][j] for j < nc (nc <= PW). */
static void gemm_panel(int64_t m, const float *a, int64_t lda, const float *panel, int64_t kd,
                       int64_t nc, float *c, int64_t ldc) {
    float t[MR * PW];
    for (int64_t r = 0; r < m; r += MR) {
        int nr = m - r < MR ? (int)(m - r) : MR;
        tile_any(nr, a + r * lda, lda, panel, kd, t);
        for (int i = 0; i < nr; i++) memcpy(c + (r + i) * ldc, t + i * PW, nc * sizeof(float));
    }
}

/* A token's terms added in ascending expert order (its slots sorted by expert, stable), each
   weighted and rounded before the add as the reference's h * w then index_add_ do: no
   contraction into an FMA here. */
__attribute__((optimize("fp-contract=off"))) static void combine(
    int64_t t, int64_t H, int64_t K, int64_t E, const int64_t *ids, const float *tw,
    const int64_t *pos, const float *terms, float *out) {
    int64_t slots[64];
    int ns = 0;
    for (int64_t k = 0; k < K && k < 64; k++) {
        int64_t e = ids[t * K + k];
        if (e < 0 || e >= E) continue;
        int i = ns++;
        while (i > 0 && ids[t * K + slots[i - 1]] > e) {
            slots[i] = slots[i - 1];
            i--;
        }
        slots[i] = k;
    }
    float *o = out + t * H;
    memset(o, 0, H * sizeof(float));
    for (int s = 0; s < ns; s++) {
        const float *h = terms + pos[t * K + slots[s]] * H;
        float wt = tw[t * K + slots[s]];
        for (int64_t c = 0; c < H; c++) {
            float p = h[c] * wt;
            o[c] = o[c] + p;
        }
    }
}

typedef struct {
    int64_t e, r0, r1, p;
} item_t;

/* Items over each active expert's sorted rows [start, start + count) x np column panels. */
static int64_t make_items(const int64_t *counts, const int64_t *starts, int64_t E, int64_t np,
                          item_t *items) {
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++)
        for (int64_t r = 0; r < counts[e]; r += RB)
            for (int64_t p = 0; p < np; p++) {
                int64_t end = r + RB < counts[e] ? r + RB : counts[e];
                items[n++] = (item_t){e, starts[e] + r, starts[e] + end, p};
            }
    return n;
}

/* gate and up panels of one item's rows, then SiLU(gate) * up into act's columns. */
static void gate_up_item(const item_t *it, const float *xs, const float *w13p, int64_t H,
                         int64_t I, float *act) {
    float g[RB * PW], u[RB * PW];
    int64_t m = it->r1 - it->r0, np = panels(I), nc = I - it->p * PW < PW ? I - it->p * PW : PW;
    const float *a = xs + it->r0 * H;
    const float *gate = w13p + ((2 * it->e) * np + it->p) * H * PW;
    const float *up = w13p + ((2 * it->e + 1) * np + it->p) * H * PW;
    gemm_panel(m, a, H, gate, H, nc, g, PW);
    gemm_panel(m, a, H, up, H, nc, u, PW);
    for (int64_t r = 0; r < m; r++) {
        float *dst = act + (it->r0 + r) * I + it->p * PW, *gr = g + r * PW, *ur = u + r * PW;
        memcpy(dst, gr, nc * sizeof(float));
        exp_array(dst, nc, -1.0f); /* SiLU(g) = g / (1 + exp(-g)) */
        for (int64_t i = 0; i < nc; i++) dst[i] = gr[i] / (1.0f + dst[i]) * ur[i];
    }
}

static void down_item(const item_t *it, const float *act, const float *w2p, int64_t H, int64_t I,
                      float *terms) {
    int64_t np = panels(H), nc = H - it->p * PW < PW ? H - it->p * PW : PW;
    const float *panel = w2p + (it->e * np + it->p) * I * PW;
    gemm_panel(it->r1 - it->r0, act + it->r0 * I, I, panel, I, nc,
               terms + it->r0 * H + it->p * PW, H);
}

/* Sorts the (token, slot) pairs by expert (stable): counts, starts, pos[(t, k)] = sorted row or
   -1 (skipped id), tok[row] = token. Returns the number of routed pairs. */
static int64_t route(const int64_t *ids, int64_t TK, int64_t K, int64_t E, int64_t *counts,
                     int64_t *starts, int64_t *pos, int64_t *tok) {
    int64_t P = 0;
    for (int64_t p = 0; p < TK; p++)
        if (ids[p] >= 0 && ids[p] < E) counts[ids[p]]++;
    for (int64_t e = 0; e < E; e++) {
        starts[e] = P;
        P += counts[e];
    }
    for (int64_t e = 0; e < E; e++) counts[e] = 0; /* refilled below as the fill level */
    for (int64_t p = 0; p < TK; p++) {
        int64_t e = ids[p];
        if (e < 0 || e >= E) {
            pos[p] = -1;
            continue;
        }
        int64_t row = starts[e] + counts[e]++;
        pos[p] = row;
        tok[row] = p / K;
    }
    return P;
}

/* out [T, H] = the routed experts of x [T, H]; w13p and w2p from afd_moe_pack of w13 viewed as
   [2E, I, H] and w2 [E, H, I]. Returns 0, or -1 when memory ran out (out is then unset). */
int afd_fused_moe_f32(const float *x, const float *w13p, const float *w2p, const float *tw,
                      const int64_t *ids, float *out, int64_t T, int64_t H, int64_t I,
                      int64_t E, int64_t K, int nthreads) {
    int64_t TK = T * K;
    int64_t *idx = calloc(2 * (E + 1) + 2 * (TK + 1), sizeof(int64_t));
    if (!idx) return -1;
    int64_t *counts = idx, *starts = idx + E + 1, *pos = starts + E + 1, *tok = pos + TK + 1;
    int64_t P = route(ids, TK, K, E, counts, starts, pos, tok);
    int64_t n1 = 0, n2 = 0;
    for (int64_t e = 0; e < E; e++) {
        n1 += (counts[e] + RB - 1) / RB * panels(I);
        n2 += (counts[e] + RB - 1) / RB * panels(H);
    }
    float *xs = malloc((P * (2 * H + I) + 1) * sizeof(float));
    item_t *items = malloc((n1 + n2 + 1) * sizeof(item_t));
    if (!xs || !items) {
        free(xs);
        free(items);
        free(idx);
        return -1;
    }
    float *act = xs + P * H, *terms = act + P * I;
    make_items(counts, starts, E, panels(I), items);
    make_items(counts, starts, E, panels(H), items + n1);
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < P; r++) memcpy(xs + r * H, x + tok[r] * H, H * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n1; i++) gate_up_item(&items[i], xs, w13p, H, I, act);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = n1; i < n1 + n2; i++) down_item(&items[i], act, w2p, H, I, terms);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) combine(t, H, K, E, ids, tw, pos, terms, out);
    }
    free(xs);
    free(items);
    free(idx);
    return 0;
}
