/* Decode attention over the paged KV cache, float32, on AVX2 + FMA: one query token a sequence.
 *
 * kv_cache is [2, cache_blocks, block_size, kv_heads, head_dim] (K then V); a sequence's key t
 * lives in block block_table[seq][t / block_size] at offset t % block_size. Each (sequence,
 * query head) is one unit of work: its scores over the visible keys (scale, then the soft cap
 * where one is set), an exact softmax (the largest score subtracted, as torch's kernels do) and
 * the weighted sum of values. Keys are read where they lie: nothing is gathered or padded, and a
 * sequence's result never depends on the others in the call.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float dot(const float *a, const float *b, long n) {
    /* Two chains of fused multiply-adds: one would wait on its own latency at every step. */
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        even = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), even);
        odd = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), odd);
    }
    if (i < n) even = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), even);
    __m256 acc = _mm256_add_ps(even, odd);
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

/* Where token t of a sequence lies in one half (K or V) of the cache, and where the run of its
 * block's consecutive tokens ends: one division a block rather than two a token. */
static inline const float *token(const float *half, const int64_t *blocks, long t, long block_size, long token_stride) {
    return half + (blocks[t / block_size] * block_size + t % block_size) * token_stride;
}

static inline long run_end(long t, long length, long block_size) {
    long end = (t / block_size + 1) * block_size;
    return end < length ? end : length;
}

/* query: q[s * q_seq_stride + h * q_head_stride + d]; out [seqs, heads, head_dim] contiguous;
 * block_table [seqs, table_width] int64; seq_lens [seqs] int64; window <= 0: none;
 * soft_cap <= 0: none. head_dim % 8 == 0. When `slots` is not NULL, each sequence's new key and
 * value (rows key_stride and value_stride floats apart, heads contiguous within a row) are first
 * written to its slot of the cache. Returns 0, or -1 if out of memory. */
int paged_decode_attention(const float *query, long q_seq_stride, long q_head_stride, float *kv_cache,
                           const int64_t *block_table, long table_width, const int64_t *seq_lens, float *out,
                           long seqs, long heads, long kv_heads, long head_dim, long block_size, long cache_blocks,
                           float scale, long window, float soft_cap, const float *key, long key_stride,
                           const float *value, long value_stride, const int64_t *slots) {
    const long group = heads / kv_heads, token_stride = kv_heads * head_dim;
    float *values = kv_cache + cache_blocks * block_size * token_stride;
    for (long seq = 0; slots != NULL && seq < seqs; seq++)
        for (long i = 0; i < token_stride; i++) {
            kv_cache[slots[seq] * token_stride + i] = key[seq * key_stride + i];
            values[slots[seq] * token_stride + i] = value[seq * value_stride + i];
        }
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (long unit = 0; unit < seqs * heads; unit++) {
        const long seq = unit / heads, head = unit % heads, kv_head = head / group;
        const long length = seq_lens[seq], first = window > 0 && length > window ? length - window : 0;
        const float *q = query + seq * q_seq_stride + head * q_head_stride;
        const int64_t *blocks = block_table + seq * table_width;
        float *o = out + (seq * heads + head) * head_dim;
        float local[4096];
        float *scores = length - first <= 4096 ? local : malloc(sizeof(float) * (length - first));
        if (scores == NULL) {
            failed = 1;
            continue;
        }
        float largest = -INFINITY;
        for (long t = first; t < length;) {
            const float *k = token(kv_cache, blocks, t, block_size, token_stride) + kv_head * head_dim;
            for (long end = run_end(t, length, block_size); t < end; t++, k += token_stride) {
                float score = scale * dot(q, k, head_dim);
                if (soft_cap > 0.0f) score = soft_cap * tanhf(score / soft_cap);
                scores[t - first] = score;
                largest = score > largest ? score : largest;
            }
        }
        float total = 0.0f;
        for (long t = first; t < length; t++) total += scores[t - first] = expf(scores[t - first] - largest);
        /* The weighted values 64 dimensions at a time, summed in registers. */
        const __m256 inverse = _mm256_set1_ps(1.0f / total);
        for (long d0 = 0; d0 < head_dim; d0 += 64) {
            const long width = head_dim - d0 < 64 ? head_dim - d0 : 64;
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (long t = first; t < length;) {
                const float *v = token(values, blocks, t, block_size, token_stride) + kv_head * head_dim + d0;
                for (long end = run_end(t, length, block_size); t < end; t++, v += token_stride) {
                    __m256 p = _mm256_set1_ps(scores[t - first]);
                    for (int i = 0; i < 8; i++)
                        if (i * 8 < width) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + i * 8), acc[i]);
                }
            }
            for (int i = 0; i < 8; i++)
                if (i * 8 < width) _mm256_storeu_ps(o + d0 + i * 8, _mm256_mul_ps(acc[i], inverse));
        }
        if (scores != local) free(scores);
    }
    return failed ? -1 : 0;
}
