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

/* Σ_{k∈group} q·x for one group of one row, q the nibbles 0..15. The float path: nibbles → int32 → float, x
split per 32 columns into its 16 even and 16 odd columns (the order of low and high nibbles). */
static inline __m512 q4_group_f32(const uint8_t *row, const float *xm, int64_t k, int64_t end) {
    const __m512i low4 = _mm512_set1_epi32(0x0F);
    __m512 ag = _mm512_setzero_ps(), bg = ag, cg = ag, dg = ag;
    for (; k + 64 <= end; k += 64) { /* two 16-byte runs: four independent sums */
        _mm_prefetch((const char *)(row + k / 2 + PREFETCH_BYTES), _MM_HINT_T0);
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k / 2)));
        __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k / 2 + 16)));
        ag = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low4)), _mm512_loadu_ps(xm + k), ag);
        bg = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_loadu_ps(xm + k + 16), bg);
        cg = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(u, low4)), _mm512_loadu_ps(xm + k + 32), cg);
        dg = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(u, 4)), _mm512_loadu_ps(xm + k + 48), dg);
    }
    for (; k < end; k += 32) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k / 2)));
        ag = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low4)), _mm512_loadu_ps(xm + k), ag);
        bg = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_loadu_ps(xm + k + 16), bg);
    }
    return _mm512_add_ps(_mm512_add_ps(ag, bg), _mm512_add_ps(cg, dg));
}

static void split_f32(const float *x, float *out, int64_t K) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t k = 0; k < K; k += 32) {
        __m512 a = _mm512_loadu_ps(x + k), b = _mm512_loadu_ps(x + k + 16);
        _mm512_storeu_ps(out + k, _mm512_permutex2var_ps(a, even, b));
        _mm512_storeu_ps(out + k + 16, _mm512_permutex2var_ps(a, odd, b));
    }
}

#ifdef __AVX512BF16__
/* The bf16 path (bf16 activations, group a multiple of 64): the nibbles become bf16 without a conversion.
(0x4300 | q) is the bf16 of 128 + q exactly, so one OR makes 32 weights and one vdpbf16ps multiplies them (32
products an instruction, against 16 through int32 → float); the caller subtracts 128·Σx per group. Nibble q of
byte j is input column 2j (low) or 2j + 1 (high) of its 64-column run, so x is split per 64 columns. The
products are exact and summed in float32, as on the float path. Returns Σ (128 + q)·x. */
static inline __m512 q4_group_bf16(const uint8_t *row, const uint16_t *xm, int64_t k, int64_t end) {
    const __m512i low4 = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
    __m512 ag = _mm512_setzero_ps(), bg = ag, cg = ag, dg = ag;
    for (; k + 128 <= end; k += 128) { /* a cache line of weights, four independent sums */
        _mm_prefetch((const char *)(row + k / 2 + PREFETCH_BYTES), _MM_HINT_T0);
        __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + k / 2)));
        __m512i u = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + k / 2 + 32)));
        ag = _mm512_dpbf16_ps(ag, (__m512bh)_mm512_ternarylogic_epi32(v, low4, magic, 0xEA), /* (v&0xF)|0x4300 */
                              (__m512bh)_mm512_loadu_si512(xm + k));
        bg = _mm512_dpbf16_ps(bg, (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), magic),
                              (__m512bh)_mm512_loadu_si512(xm + k + 32));
        cg = _mm512_dpbf16_ps(cg, (__m512bh)_mm512_ternarylogic_epi32(u, low4, magic, 0xEA),
                              (__m512bh)_mm512_loadu_si512(xm + k + 64));
        dg = _mm512_dpbf16_ps(dg, (__m512bh)_mm512_or_si512(_mm512_srli_epi16(u, 4), magic),
                              (__m512bh)_mm512_loadu_si512(xm + k + 96));
    }
    for (; k < end; k += 64) {
        _mm_prefetch((const char *)(row + k / 2 + PREFETCH_BYTES), _MM_HINT_T0);
        __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + k / 2)));
        ag = _mm512_dpbf16_ps(ag, (__m512bh)_mm512_ternarylogic_epi32(v, low4, magic, 0xEA),
                              (__m512bh)_mm512_loadu_si512(xm + k));
        bg = _mm512_dpbf16_ps(bg, (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), magic),
                              (__m512bh)_mm512_loadu_si512(xm + k + 32));
    }
    return _mm512_add_ps(_mm512_add_ps(ag, bg), _mm512_add_ps(cg, dg));
}

static void split_bf16(const uint16_t *x, uint16_t *out, int64_t K) {
    uint16_t index[32];
    for (int j = 0; j < 32; j++) index[j] = (uint16_t)(2 * j);
    const __m512i even = _mm512_loadu_si512(index), odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    for (int64_t k = 0; k < K; k += 64) {
        __m512i a = _mm512_loadu_si512(x + k), b = _mm512_loadu_si512(x + k + 32);
        _mm512_storeu_si512(out + k, _mm512_permutex2var_epi16(a, even, b));
        _mm512_storeu_si512(out + k + 32, _mm512_permutex2var_epi16(a, odd, b));
    }
}
#endif

int lmforge_q4_matmul(const void *x, int x_bf16, const uint8_t *w, const float *scale, const float *zs,
                      const float *bias, void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int64_t group,
                      int threads) {
    if (K % 32 || group % 32 || K % group) return -1;
    int bf16 = 0; /* whether the bf16 path runs; its sums carry 128·Σx more per group */
#ifdef __AVX512BF16__
    bf16 = x_bf16 && group % 64 == 0;
#endif
    int64_t groups = K / group;
    float *xf = to_float(x, x_bf16, M * K);
    void *xs = aligned_alloc(64, (size_t)((M * K * 4 + 63) / 64 * 64)); /* x split into even and odd columns */
    float *sums = (float *)malloc((size_t)(M * groups) * sizeof(float)); /* Σ x per group, for the zero term */
    if (!xf || !xs || !sums) {
        free(xf);
        free(xs);
        free(sums);
        return -2;
    }
    for (int64_t m = 0; m < M; m++) {
#ifdef __AVX512BF16__
        if (bf16) split_bf16((const uint16_t *)x + m * K, (uint16_t *)xs + m * K, K);
#endif
        if (!bf16) split_f32(xf + m * K, (float *)xs + m * K, K);
        for (int64_t g = 0; g < groups; g++) {
            float total = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) total += xf[m * K + k];
            sums[m * groups + g] = total;
        }
    }
    const float offset = bf16 ? 128.0f : 0.0f;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * (K / 2);
        for (int64_t m = 0; m < M; m++) {
            __m512 acc = _mm512_setzero_ps();
            float zero_term = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                __m512 dot;
#ifdef __AVX512BF16__
                if (bf16)
                    dot = q4_group_bf16(row, (const uint16_t *)xs + m * K, g * group, (g + 1) * group);
                else
#endif
                    dot = q4_group_f32(row, (const float *)xs + m * K, g * group, (g + 1) * group);
                float s = scale[n * groups + g];
                acc = _mm512_fmadd_ps(dot, _mm512_set1_ps(s), acc);
                zero_term += (zs[n * groups + g] - offset * s) * sums[m * groups + g];
            }
            store(y, y_bf16, m * N + n, _mm512_reduce_add_ps(acc) + zero_term + (bias ? bias[n] : 0.0f));
        }
    }
    free(sums);
    free(xs);
    free(xf);
    return 0;
}

#else /* no AVX-512 at build time: the Python side keeps PyTorch's kernels */
int lmforge_qmatvec_version(void) { return 0; }
#endif
