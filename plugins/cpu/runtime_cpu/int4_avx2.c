/* x @ W.T for 4-bit weights in ATen's CPU int4 layout, float32 activations, on AVX2.
 *
 * The layout is torch._convert_weight_to_int4pack_for_cpu's on an AVX2 or AVX-512 build: output
 * columns in blocks of `block` (32 or 64); for each input column k a block holds block / 2 bytes,
 * byte j the nibble of column j (low half) and of column j + block / 2 (high half).
 * scales_and_zeros is [k / group, n, 2] bfloat16: W[c, k] = (q - 8) * scale + zero.
 *
 * Each row's activations are rounded to int16 per group (x = step * i, step = the group's largest
 * magnitude / 32767: 2**-16 of it, against 2**-9 for the bfloat16 rounding torch's kernel does).
 * Then every sum over a group is an exact integer: vpmaddwd multiplies the nibbles of two input
 * columns by their two activations and adds them, the group's sums stay in int32 (at most
 * 256 * 15 * 32767 < 2**31), and out += step * (scale * (sum q i - 8 sum i) + zero * sum i).
 * A unit of work is 32 output columns of a block (16 bytes of each input column). Rows are tiled,
 * never mixed: a row's arithmetic is the same whatever the row count (batch-invariant).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline __m256 bf16_low(__m256i pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }

static inline __m256 bf16_high(__m256i pairs) {
    return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xFFFF0000u)));
}

/* `rows` (1 or 2) rows against one unit, columns c0..c0+15 and c0+half..c0+half+15. xi: the rows'
 * int16 activations; step, isum: [rows, groups] each group's step and sum of xi. */
static inline __attribute__((always_inline)) void unit(
        const int rows, const int16_t *xi, const float *step, const int32_t *isum, const uint8_t *bytes,
        long k_stride, const uint16_t *scales_and_zeros, long n, long c0, long half, long k, long group, float *out) {
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const long groups = k / group;
    long col[4] = {c0, c0 + 8, c0 + half, c0 + half + 8};
    for (long g = 0; g < groups; g++) {
        __m256i acc[2][4];
        for (int r = 0; r < rows; r++)
            for (int i = 0; i < 4; i++) acc[r][i] = _mm256_setzero_si256();
        for (long kk = g * group; kk < (g + 1) * group; kk += 2) {
            __m128i a = _mm_loadu_si128((const __m128i *)(bytes + kk * k_stride));
            __m128i b = _mm_loadu_si128((const __m128i *)(bytes + (kk + 1) * k_stride));
            __m128i a_lo = _mm_and_si128(a, low_mask), b_lo = _mm_and_si128(b, low_mask);
            __m128i a_hi = _mm_and_si128(_mm_srli_epi16(a, 4), low_mask);
            __m128i b_hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_mask);
            /* int16 pairs (column c at kk, at kk + 1), 8 columns a vector. */
            __m256i w[4] = {_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a_lo, b_lo)),
                            _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a_lo, b_lo)),
                            _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a_hi, b_hi)),
                            _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a_hi, b_hi))};
            for (int r = 0; r < rows; r++) {
                int32_t pair;
                __builtin_memcpy(&pair, xi + r * k + kk, sizeof(pair));
                __m256i xk = _mm256_set1_epi32(pair);
                for (int i = 0; i < 4; i++) acc[r][i] = _mm256_add_epi32(acc[r][i], _mm256_madd_epi16(w[i], xk));
            }
        }
        const uint16_t *group_sz = scales_and_zeros + g * n * 2;
        for (int i = 0; i < 4; i++) {
            /* 8 columns' (scale, zero) pairs: one 32-bit lane each, scale in the low half. */
            __m256i pairs = _mm256_loadu_si256((const __m256i *)(group_sz + 2 * col[i]));
            __m256 scale = bf16_low(pairs), zero = bf16_high(pairs);
            for (int r = 0; r < rows; r++) {
                int32_t sum_i = isum[r * groups + g];
                __m256 centered = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][i], _mm256_set1_epi32(8 * sum_i)));
                __m256 part = _mm256_fmadd_ps(zero, _mm256_set1_ps((float)sum_i), _mm256_mul_ps(scale, centered));
                float *o = out + r * n + col[i];
                _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(step[r * groups + g]), part, _mm256_loadu_ps(o)));
            }
        }
    }
}

/* x [rows, k] float32, packed (the layout above, n % block == 0, block 32 or 64; k and group even),
 * scales_and_zeros [k / group, n, 2] bfloat16 bits, out [rows, n] float32. Returns 0, or -1 if out
 * of memory. Threads (OpenMP: torch's own runtime, loaded before this library) split the units. */
int int4_matmul(const float *x, const uint8_t *packed, const uint16_t *scales_and_zeros, float *out, long rows,
                long n, long k, long group, long block) {
    const long half = block / 2, units_per_block = block / 32, groups = k / group;
    int16_t *xi = malloc(sizeof(int16_t) * rows * k);
    float *step = malloc(sizeof(float) * rows * groups);
    int32_t *isum = malloc(sizeof(int32_t) * rows * groups);
    if (xi == NULL || step == NULL || isum == NULL) {
        free(xi), free(step), free(isum);
        return -1;
    }
    for (long i = 0; i < rows * groups; i++) {
        const float *xg = x + i * group;
        /* Not finite (an inf or NaN in the group): the group's products are NaN, as a float
         * matmul's would be, and its integers zeros rather than undefined conversions. */
        float largest = 0.0f;
        int finite = 1;
        for (long j = 0; j < group; j++) {
            float magnitude = fabsf(xg[j]);
            finite &= magnitude <= 3.402823466e38f;
            largest = fmaxf(largest, magnitude);
        }
        step[i] = finite ? largest / 32767.0f : NAN;
        float inverse = finite && largest > 0.0f ? 32767.0f / largest : 0.0f;
        int32_t sum = 0;
        for (long j = 0; j < group; j++) sum += xi[i * group + j] = finite ? (int16_t)lrintf(xg[j] * inverse) : 0;
        isum[i] = sum;
    }
#pragma omp parallel for schedule(static)
    for (long u = 0; u < n / 32; u++) {
        long b = u / units_per_block, j0 = (u % units_per_block) * 16;
        const uint8_t *bytes = packed + b * k * half + j0;
        long c0 = b * block + j0, r = 0;
        for (long row = 0; row < rows; row++)
            for (long c = 0; c < 16; c++) out[row * n + c0 + c] = out[row * n + c0 + half + c] = 0.0f;
        for (; r + 2 <= rows; r += 2)
            unit(2, xi + r * k, step + r * groups, isum + r * groups, bytes, half, scales_and_zeros, n, c0, half, k,
                 group, out + r * n);
        if (r < rows)
            unit(1, xi + r * k, step + r * groups, isum + r * groups, bytes, half, scales_and_zeros, n, c0, half, k,
                 group, out + r * n);
    }
    free(xi), free(step), free(isum);
    return 0;
}
