/* Grouped-query attention of one decoding step over a bfloat16 KV cache, for x86-64 CPUs with
 * AVX512-BF16 (trprompt, written for trprompt/engines/native_attention.py).
 *
 * One query token per row: q is [B, H, G, D] (H key/value heads, G query heads per key/value head),
 * k and v are [B, H, T, D] views of the cache (any strides, the last dimension contiguous), mask is
 * [B, T] bytes (non-zero: the row attends to that position), out is [B, H, G, D], contiguous.
 *
 * Why: at decoding shapes (a few queries against a few hundred cached positions per head) PyTorch's
 * CPU flash-attention kernel spends its time on per-head GEMM calls and reads the cache at a third of
 * the memory bandwidth. Here each (row, key/value head) pair reads its keys once for all G queries
 * (bfloat16 dot products, float32 sums), takes a float32 softmax, then reads its values once, with
 * software prefetching ahead of both passes. Rounding: float32 accumulation throughout, one rounding
 * to bfloat16 at the end (round to nearest even).
 *
 * Build: cc -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mfma -fopenmp -shared -fPIC
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define INLINE static inline __attribute__((always_inline))
#define MAX_GROUP 8
#define MAX_DIM 256

int trp_decode_attention_abi(void) { return 1; }

INLINE __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

/* exp(x) for x <= 0: range reduction by ln 2 and a degree-6 polynomial (relative error ~1e-7) */
INLINE __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

/* Sums adjacent lanes: lanes 0-7 of the result hold x's pair sums, lanes 8-15 y's. */
INLINE __m512 fold_pairs(__m512 x, __m512 y) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_ps(_mm512_permutex2var_ps(x, even, y), _mm512_permutex2var_ps(x, odd, y));
}

/* Lane j of the result is the sum of a[j]'s lanes (a is overwritten). */
INLINE __m512 lane_sums16(__m512* a) {
  for (int i = 0; i < 8; ++i) a[i] = fold_pairs(a[2 * i], a[2 * i + 1]);
  for (int i = 0; i < 4; ++i) a[i] = fold_pairs(a[2 * i], a[2 * i + 1]);
  for (int i = 0; i < 2; ++i) a[i] = fold_pairs(a[2 * i], a[2 * i + 1]);
  return fold_pairs(a[0], a[1]);
}

/* Raw scores of keys t0 .. t0+n-1 (n <= 16) for every query of the group: scores[g * stride + t]. */
INLINE void score_block(const __m512bh* qv, const uint16_t* kb, int64_t key_stride, int t0, int n, int chunks,
                        int group, float* scores, int stride) {
  for (int j = 0; j < 16; ++j) { /* the block after next (prefetches never fault) */
    const char* p = (const char*)(kb + (int64_t)(t0 + 32 + j) * key_stride);
    for (int c = 0; c < chunks; ++c) _mm_prefetch(p + c * 64, _MM_HINT_T0);
  }
  for (int g = 0; g < group; ++g) {
    __m512 a[16];
    for (int j = 0; j < 16; ++j) {
      a[j] = _mm512_setzero_ps();
      if (j < n) {
        const uint16_t* kt = kb + (int64_t)(t0 + j) * key_stride;
        for (int c = 0; c < chunks; ++c)
          a[j] = _mm512_dpbf16_ps(a[j], qv[g * chunks + c], (__m512bh)_mm512_loadu_si512((const void*)(kt + c * 32)));
      }
    }
    _mm512_store_ps(scores + g * stride + t0, lane_sums16(a));
  }
}

/* Scales, masks and softmaxes one query's scores in place; returns 1 / (sum of weights), 0 if none attend. */
INLINE float softmax_row(float* s, const uint8_t* m, int T, int Tp, float scale) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  const __m512 sv = _mm512_set1_ps(scale);
  for (int t = 0; t < Tp; t += 16) {
    const __mmask16 inside = (t + 16 <= T) ? (__mmask16)0xffff : (__mmask16)((1u << (T - t)) - 1u);
    const __m128i mb = _mm_maskz_loadu_epi8(inside, m + t);
    const __mmask16 keep = _mm_test_epi8_mask(mb, mb);
    const __m512 x = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), keep, _mm512_load_ps(s + t), sv);
    _mm512_store_ps(s + t, x);
    mx = _mm512_max_ps(mx, x);
  }
  float top = _mm512_reduce_max_ps(mx);
  if (top == -INFINITY) {
    for (int t = 0; t < Tp; t += 16) _mm512_store_ps(s + t, _mm512_setzero_ps());
    return 0.0f;
  }
  const __m512 tv = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (int t = 0; t < Tp; t += 16) {
    const __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(s + t), tv));
    _mm512_store_ps(s + t, p);
    sum = _mm512_add_ps(sum, p);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

/* out[g, 16c .. 16c+15] = sum_t w[g, t] v[t, 16c ..] * inv[g] for one 16-wide column chunk c. */
INLINE void weigh_values(const float* w, int stride, const uint16_t* vb, int64_t value_stride, const uint8_t* m, int T,
                         int c, int group, const float* inv, uint16_t* ob, int D, int prefetch, int first) {
  __m512 acc[MAX_GROUP];
  for (int g = 0; g < group; ++g) acc[g] = _mm512_setzero_ps();
  for (int t = first; t < T; ++t) {
    if (prefetch) {
      const char* p = (const char*)(vb + (int64_t)(t + 24) * value_stride);
      for (int cc = 0; cc < D / 32; ++cc) _mm_prefetch(p + cc * 64, _MM_HINT_T0);
    }
    if (!m[t]) continue;
    const __m512 vf = load_bf16x16(vb + (int64_t)t * value_stride + c * 16);
    for (int g = 0; g < group; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(w[g * stride + t]), vf, acc[g]);
  }
  for (int g = 0; g < group; ++g)
    _mm256_storeu_si256((__m256i*)(ob + g * D + c * 16),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g], _mm512_set1_ps(inv[g]))));
}

/* out[g, :] = sum_t w[g, t] v[t, :] * inv[g] for every column of a 64-wide head, each value row read once. */
INLINE void weigh_values64(const float* w, int stride, const uint16_t* vb, int64_t value_stride, const uint8_t* m,
                           int T, int group, const float* inv, uint16_t* ob, int first) {
  __m512 acc[MAX_GROUP][4];
  for (int g = 0; g < group; ++g)
    for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int t = first; t < T; ++t) {
    const char* p = (const char*)(vb + (int64_t)(t + 24) * value_stride);
    _mm_prefetch(p, _MM_HINT_T0);
    _mm_prefetch(p + 64, _MM_HINT_T0);
    if (!m[t]) continue;
    const uint16_t* vt = vb + (int64_t)t * value_stride;
    const __m512 v0 = load_bf16x16(vt), v1 = load_bf16x16(vt + 16), v2 = load_bf16x16(vt + 32),
                 v3 = load_bf16x16(vt + 48);
    for (int g = 0; g < group; ++g) {
      const __m512 wg = _mm512_set1_ps(w[g * stride + t]);
      acc[g][0] = _mm512_fmadd_ps(wg, v0, acc[g][0]);
      acc[g][1] = _mm512_fmadd_ps(wg, v1, acc[g][1]);
      acc[g][2] = _mm512_fmadd_ps(wg, v2, acc[g][2]);
      acc[g][3] = _mm512_fmadd_ps(wg, v3, acc[g][3]);
    }
  }
  for (int g = 0; g < group; ++g)
    for (int c = 0; c < 4; ++c)
      _mm256_storeu_si256((__m256i*)(ob + g * 64 + c * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv[g]))));
}

#define VALUES_FOR_GROUP(GG)                                                                   \
  case GG:                                                                                     \
    if (D == 64 && GG <= 4) weigh_values64(w, Tp, vb, vs[2], m, T, GG, inv, ob, first);        \
    else for (int c = 0; c < D / 16; ++c) weigh_values(w, Tp, vb, vs[2], m, T, c, GG, inv, ob, D, c == 0, first); \
    break;

/* As trp_decode_attention_bf16, with query row b reading cache row rows[b] of k and v (rows NULL: b). */
static int decode_attention_rows(const uint16_t* q, const int64_t* qs, const uint16_t* k, const int64_t* ks,
                                 const uint16_t* v, const int64_t* vs, const int64_t* rows, const uint8_t* mask,
                                 int64_t mask_stride, uint16_t* out, int B, int H, int G, int T, int D, float scale,
                                 int threads) {
  if (D % 32 != 0 || D > MAX_DIM || G < 1 || G > MAX_GROUP || T < 1 || B < 1 || H < 1) return -1;
  const int chunks = D / 32;
  const int Tp = (T + 15) & ~15;
  int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    float* w = (float*)aligned_alloc(64, sizeof(float) * (size_t)G * Tp);
    if (w == NULL) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int bh = 0; bh < B * H; ++bh) {
      if (w == NULL) continue;
      const int b = bh / H, h = bh % H;
      const uint16_t* qb = q + b * qs[0] + h * qs[1];
      const int64_t cb = rows ? rows[b] : b;
      const uint16_t* kb = k + cb * ks[0] + h * ks[1];
      const uint16_t* vb = v + cb * vs[0] + h * vs[1];
      const uint8_t* m = mask + b * mask_stride;
      __m512bh qv[MAX_GROUP * (MAX_DIM / 32)];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < chunks; ++c) qv[g * chunks + c] = (__m512bh)_mm512_loadu_si512((const void*)(qb + g * qs[2] + c * 32));
      /* Left padding (masked positions before the row's first one) is skipped, from the 16-aligned
       * block it starts in: no keys read, no scores taken, no weights computed for it. */
      int first = 0;
      while (first < T && !m[first]) ++first;
      const int lo = first & ~15;
      for (int t0 = lo; t0 < T; t0 += 16) score_block(qv, kb, ks[2], t0, T - t0 < 16 ? T - t0 : 16, chunks, G, w, Tp);
      float inv[MAX_GROUP];
      for (int g = 0; g < G; ++g)
        inv[g] = lo < T ? softmax_row(w + g * Tp + lo, m + lo, T - lo, Tp - lo, scale) : 0.0f;
      uint16_t* ob = out + (size_t)bh * G * D;
      switch (G) {
        VALUES_FOR_GROUP(1) VALUES_FOR_GROUP(2) VALUES_FOR_GROUP(3) VALUES_FOR_GROUP(4)
        VALUES_FOR_GROUP(5) VALUES_FOR_GROUP(6) VALUES_FOR_GROUP(7) VALUES_FOR_GROUP(8)
      }
    }
    free(w);
  }
  return failed ? -2 : 0;
}

/* Returns 0, or -1 when the shapes are outside what this kernel handles (the caller falls back). */
int trp_decode_attention_bf16(const uint16_t* q, const int64_t* qs, const uint16_t* k, const int64_t* ks,
                              const uint16_t* v, const int64_t* vs, const uint8_t* mask, int64_t mask_stride,
                              uint16_t* out, int B, int H, int G, int T, int D, float scale, int threads) {
  return decode_attention_rows(q, qs, k, ks, v, vs, 0, mask, mask_stride, out, B, H, G, T, D, scale, threads);
}
