/* Row-wise float32 ops of a decoder layer on AVX2 + FMA: RMSNorm (with the residual add before it)
 * and NeoX rotary embedding. Each is a handful of torch ops whose dispatch costs more than their
 * arithmetic at a decode step's few rows; here each is one call. Every row is computed on its
 * own, in the same order whatever the row count (batch-invariant). Threads split rows only when
 * there are enough of them to pay for waking the pool.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define PARALLEL_ROWS 16

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, after x[r] += residual[r] (into
 * residual_out) when residual is not NULL. Row r of x starts at (r / inner_rows) * outer_stride
 * + (r % inner_rows) * dim: [tokens, dim] rows (inner_rows 1) or the heads of [tokens, heads, dim]
 * (inner_rows = heads); residual rows are residual_stride apart. */
void rms_norm(const float *x, long outer_stride, long inner_rows, const float *residual, long residual_stride,
              const float *weight, float *out, float *residual_out, long rows, long dim, float eps) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (long r = 0; r < rows; r++) {
        const float *row = x + (r / inner_rows) * outer_stride + (r % inner_rows) * dim;
        if (residual != NULL) {
            float *summed = residual_out + r * dim;
            for (long i = 0; i < dim; i++) summed[i] = row[i] + residual[r * residual_stride + i];
            row = summed;
        }
        /* Eight lanes of partial sums, as the compiler vectorizes them, then their total. */
        float lanes[8] = {0};
        long i = 0;
        for (; i + 8 <= dim; i += 8)
            for (int j = 0; j < 8; j++) lanes[j] += row[i + j] * row[i + j];
        float squares = 0.0f;
        for (; i < dim; i++) squares += row[i] * row[i];
        for (int j = 0; j < 8; j++) squares += lanes[j];
        const float inverse = 1.0f / sqrtf(squares / (float)dim + eps);
        for (long i = 0; i < dim; i++) out[r * dim + i] = row[i] * inverse * weight[i];
    }
}

/* NeoX rotation of every head of query [tokens, heads, head_dim] and key [tokens, kv_heads,
 * head_dim] (token strides given, heads contiguous within a token) into q_out / k_out
 * (contiguous): x[i] * cos[i] - x[i + half] * sin[i] and x[i + half] * cos[i] + x[i] * sin[i],
 * cos and sin from row positions[t] (positions_stride apart) of cos_sin [max_positions, head_dim]
 * (cos, then sin). */
void rotary_neox(const int64_t *positions, long positions_stride, const float *query, long q_stride, const float *key,
                 long k_stride, const float *cos_sin, float *q_out, float *k_out, long tokens, long heads, long kv_heads,
                 long head_dim) {
    const long half = head_dim / 2;
#pragma omp parallel for schedule(static) if (tokens >= PARALLEL_ROWS)
    for (long t = 0; t < tokens; t++) {
        const float *cos = cos_sin + positions[t * positions_stride] * head_dim, *sin = cos + half;
        for (long h = 0; h < heads + kv_heads; h++) {
            const float *x = h < heads ? query + t * q_stride + h * head_dim
                                       : key + t * k_stride + (h - heads) * head_dim;
            float *y = h < heads ? q_out + (t * heads + h) * head_dim : k_out + (t * kv_heads + h - heads) * head_dim;
            for (long i = 0; i < half; i++) {
                y[i] = x[i] * cos[i] - x[i + half] * sin[i];
                y[i + half] = x[i + half] * cos[i] + x[i] * sin[i];
            }
        }
    }
}
