/* y = x·Wᵀ for int8 and int4 weights at a few rows of x (decoding), streamed once from memory.

Why this exists: PyTorch's CPU weight-only kernels (aten._weight_int8pack_mm, _weight_int4pack_mm_for_cpu)
run at about half the read bandwidth on this class of CPU, so int8 decoded only 1.2-1.3x faster than bf16.
Decoding reads every weight once per token; this loop does as little per weight as AVX-512 allows:
  int8: sign-extend 16 bytes to 16 int32, convert to float, one fused multiply-add (3 instructions / 16 weights)
  int4: one byte holds two weights (even input column in the low nibble); mask and shift give both halves,
        each converted and multiplied against x split into its even and odd columns once per call.
The activations stay in float (weight-only: the result is the dequantized matmul up to summation order), as
in lmforge/model/quant.py, whose layouts these are:
  int8: w[n,k] = q[n,k]·scale[n]
  int4: w[n,k] = (q[n,k] − 8)·scale[n,g] + zero[n,g], g = k / group; the caller passes zs = zero − 8·scale,
        so Σ_k w·x = Σ_g scale·(Σ_{k∈g} q·x) + zs·(Σ_{k∈g} x).
Threads: OpenMP over output rows. Loaded into a process that already holds PyTorch's libgomp.so.1, this
library binds to that same runtime (same soname), so both share one thread pool.
x and y are float32 or bfloat16 (flags); scale, zs and bias are float32; bias may be NULL. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

int lmforge_qmatvec_version(void) { return 1; }

static float *to_float(const void *x, int bf16, int64_t n) {
    float *out = (float *)aligned_alloc(64, (size_t)((n * 4 + 63) / 64 * 64));
    if (!out) return NULL;
    if (!bf16) {
        memcpy(out, x, (size_t)n * 4);
        return out;
    }
    const uint16_t *h = (const uint16_t *)x;
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)h[i] << 16;
        memcpy(out + i, &bits, 4);
    }
    return out;
}

static void store(void *y, int bf16, int64_t i, float v) {
    if (!bf16) {
        ((float *)y)[i] = v;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &v, 4);
    bits += 0x7FFF + ((bits >> 16) & 1); /* round to nearest even, as torch's float → bfloat16 cast */
    ((uint16_t *)y)[i] = (uint16_t)(bits >> 16);
}

static inline __m512 int8x16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* Software prefetch this far ahead of the row being read: the hardware prefetcher alone kept a core at 9 GB/s
from DRAM on this loop, with it 11-12 GB/s (a plain sum reads 15). Measured best of 1-16 KiB on Sapphire Rapids. */
#define PREFETCH_BYTES 4096

/* One row, four accumulators: the row streams as one run of cache lines, each consumed in one iteration. */
static float q8_dot(const float *x, const int8_t *row, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)(row + k + PREFETCH_BYTES), _MM_HINT_T0);
        a0 = _mm512_fmadd_ps(int8x16(row + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(int8x16(row + k + 16), _mm512_loadu_ps(x + k + 16), a1);
        a2 = _mm512_fmadd_ps(int8x16(row + k + 32), _mm512_loadu_ps(x + k + 32), a2);
        a3 = _mm512_fmadd_ps(int8x16(row + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    for (; k < K; k += 16) a0 = _mm512_fmadd_ps(int8x16(row + k), _mm512_loadu_ps(x + k), a0);
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

int lmforge_q8_matmul(const void *x, int x_bf16, const int8_t *w, const float *scale, const float *bias,
                      void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int threads) {
    if (K % 16) return -1;
    float *xf = to_float(x, x_bf16, M * K);
    if (!xf) return -2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) /* rows after the first read the weight row from L1 */
            store(y, y_bf16, m * N + n, q8_dot(xf + m * K, w + n * K, K) * scale[n] + (bias ? bias[n] : 0.0f));
    free(xf);
    return 0;
}

/* x split per 32 columns into their 16 even and 16 odd columns: the order of low and high nibbles. */
static void deinterleave(const float *x, float *out, int64_t K) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t k = 0; k < K; k += 32) {
        __m512 a = _mm512_loadu_ps(x + k), b = _mm512_loadu_ps(x + k + 16);
        _mm512_storeu_ps(out + k, _mm512_permutex2var_ps(a, even, b));
        _mm512_storeu_ps(out + k + 16, _mm512_permutex2var_ps(a, odd, b));
    }
}

int lmforge_q4_matmul(const void *x, int x_bf16, const uint8_t *w, const float *scale, const float *zs,
                      const float *bias, void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int64_t group,
                      int threads) {
    if (K % 32 || group % 32 || K % group) return -1;
    float *xf = to_float(x, x_bf16, M * K);
    int64_t groups = K / group;
    float *xs = (float *)aligned_alloc(64, (size_t)((M * (K + groups) * 4 + 63) / 64 * 64));
    if (!xf || !xs) {
        free(xf);
        free(xs);
        return -2;
    }
    float *sums = xs + M * K; /* Σ x per group, for the zero term */
    for (int64_t m = 0; m < M; m++) {
        deinterleave(xf + m * K, xs + m * K, K);
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) s += xf[m * K + k];
            sums[m * groups + g] = s;
        }
    }
    const __m512i low4 = _mm512_set1_epi32(0x0F);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * (K / 2);
        for (int64_t m = 0; m < M; m++) {
            const float *xm = xs + m * K;
            __m512 acc = _mm512_setzero_ps();
            float zero_term = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                __m512 ag = _mm512_setzero_ps(), bg = ag;
                for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
                    _mm_prefetch((const char *)(row + k / 2 + PREFETCH_BYTES), _MM_HINT_T0);
                    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k / 2)));
                    ag = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low4)), _mm512_loadu_ps(xm + k), ag);
                    bg = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_loadu_ps(xm + k + 16), bg);
                }
                acc = _mm512_fmadd_ps(_mm512_add_ps(ag, bg), _mm512_set1_ps(scale[n * groups + g]), acc);
                zero_term += zs[n * groups + g] * sums[m * groups + g];
            }
            store(y, y_bf16, m * N + n, _mm512_reduce_add_ps(acc) + zero_term + (bias ? bias[n] : 0.0f));
        }
    }
    free(xs);
    free(xf);
    return 0;
}

#else /* no AVX-512 at build time: the Python side keeps PyTorch's kernels */
int lmforge_qmatvec_version(void) { return 0; }
#endif
