/* One decoding step of a Llama-style bfloat16 model, every layer in one call, for x86-64 CPUs with
 * AMX and AVX512-BF16 (trprompt, written for trprompt/engines/native_step.py).
 *
 * Why: a decoding step of SmolLM2-135M over ~29 rows does ~20 ms of matmuls (the AMX kernel) and
 * ~25 ms of attention (the native attention kernel), but through PyTorch it also runs ~50 small
 * operators per layer (norms, rotary embedding, casts, the cache write, SiLU, residual adds), each
 * costing far more to dispatch than to compute: another ~30-40 ms per step. Here the whole step runs
 * in C: the embedding lookup, per layer the input RMSNorm, the q/k/v projections (one pass of the
 * AMX kernel over the three weights), the rotary embedding, the write of the new keys and values
 * into the cache, attention (decode_attention.c), the output projection and residual add, the
 * second RMSNorm, the gate/up projections (one pass), SiLU x up, the down projection and residual
 * add; then the final norm and the LM head.
 *
 * Rounding follows transformers' bfloat16 Llama step by step: RMSNorm in float32, rounded to
 * bfloat16, then times the bfloat16 weight (rounded); every elementwise product and sum rounded to
 * bfloat16 as PyTorch's bfloat16 operators do (computed in float32, round to nearest even); matmuls
 * as the AMX kernel (float32 sums, one rounding). Results agree with the PyTorch path up to the order
 * of float32 sums in the norms and the last bit of exp in SiLU.
 *
 * Build: cc -O3 -mamx-tile -mamx-bf16 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mfma -fopenmp
 *        -shared -fPIC -Wl,-Bsymbolic
 */
#include "amx_linear.c"
#include "decode_attention.c"

#include <stdlib.h>
#include <string.h>

int trp_decode_step_abi(void) { return 1; }

enum { W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN, N_WEIGHTS };

/* The model: sizes, and per layer its two norm weights (plain bfloat16), its seven AMX-packed weights
 * and their float32 biases (NULL: none). */
typedef struct {
  int64_t layers, hidden, heads, kv_heads, head_dim, inter, vocab;
  float scale, final_eps;
  const uint16_t* embed;      /* [vocab, hidden], plain rows */
  const uint16_t* final_norm; /* [hidden] */
  const uint16_t* lm_head;    /* packed [vocab, hidden] */
  const float* lm_bias;
  const uint16_t* const* norms;   /* [layers * 2]: input, post-attention */
  const float* eps;               /* [layers * 2] */
  const uint16_t* const* weights; /* [layers * N_WEIGHTS], packed */
  const float* const* biases;     /* [layers * N_WEIGHTS] */
} trp_model;

INLINE float bf2f(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

INLINE uint16_t f2bf(float f) { /* round to nearest even, NaN kept quiet: PyTorch's rounding */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

INLINE void store_bf16x16(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }

/* v rounded to bfloat16 and back to float32 (round to nearest even). */
INLINE __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* The float32 sum of x[0..n) in the order PyTorch's CPU sum kernel adds a contiguous row (8-lane
 * vectors, 4 accumulators, a cascade of levels every 16 steps, then the scalar tail and the lanes in
 * order), so that the norm rounds exactly as transformers' RMSNorm does. */
static float torch_row_sum(const float* x, int64_t n) {
  enum { LANES = 8, ILP = 4, LEVELS = 4 };
  const int64_t nvec = n / LANES, size = nvec / ILP;
  int64_t ceil_log2 = 1;
  if (size > 2) {
    ceil_log2 = 0;
    for (uint64_t v = (uint64_t)size - 1; v; v >>= 1) ++ceil_log2;
  }
  const int64_t power = ceil_log2 / LEVELS > 4 ? ceil_log2 / LEVELS : 4, step = (int64_t)1 << power,
                mask = step - 1;
  __m256 acc[LEVELS][ILP];
  for (int j = 0; j < LEVELS; ++j)
    for (int k = 0; k < ILP; ++k) acc[j][k] = _mm256_setzero_ps();
  int64_t i = 0;
  while (i + step <= size) {
    for (int64_t j = 0; j < step; ++j, ++i)
      for (int k = 0; k < ILP; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], _mm256_loadu_ps(x + (i * ILP + k) * LANES));
    for (int j = 1; j < LEVELS; ++j) {
      for (int k = 0; k < ILP; ++k) {
        acc[j][k] = _mm256_add_ps(acc[j][k], acc[j - 1][k]);
        acc[j - 1][k] = _mm256_setzero_ps();
      }
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < ILP; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], _mm256_loadu_ps(x + (i * ILP + k) * LANES));
  for (int j = 1; j < LEVELS; ++j)
    for (int k = 0; k < ILP; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], acc[j][k]);
  for (int64_t v = size * ILP; v < nvec; ++v) acc[0][0] = _mm256_add_ps(acc[0][0], _mm256_loadu_ps(x + v * LANES));
  for (int k = 1; k < ILP; ++k) acc[0][0] = _mm256_add_ps(acc[0][0], acc[0][k]);
  float lanes[LANES];
  _mm256_storeu_ps(lanes, acc[0][0]);
  float total = 0.0f;
  for (int64_t t = nvec * LANES; t < n; ++t) total += x[t];
  for (int l = 0; l < LANES; ++l) total += lanes[l];
  return total;
}

/* y = w * bf16(x * rsqrt(mean(x^2) + eps)), each product rounded, like LlamaRMSNorm in bfloat16;
 * sq is scratch for n floats. */
static void rms_norm(const uint16_t* x, const uint16_t* w, float eps, int64_t rows, int64_t n, float* sq,
                     uint16_t* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* xr = x + r * n;
    uint16_t* yr = y + r * n;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 v = load_bf16x16(xr + i);
      _mm512_storeu_ps(sq + i, _mm512_mul_ps(v, v));
    }
    for (; i < n; ++i) sq[i] = bf2f(xr[i]) * bf2f(xr[i]);
    const float mean = torch_row_sum(sq, n) / (float)n;
    const float inv = 1.0f / sqrtf(mean + eps);
    const __m512 iv = _mm512_set1_ps(inv);
    for (i = 0; i + 16 <= n; i += 16)
      store_bf16x16(yr + i, _mm512_mul_ps(load_bf16x16(w + i), round_bf16(_mm512_mul_ps(load_bf16x16(xr + i), iv))));
    for (; i < n; ++i) yr[i] = f2bf(bf2f(w[i]) * bf2f(f2bf(bf2f(xr[i]) * inv)));
  }
}

/* exp(x) as SLEEF's expf_u10 computes it (PyTorch's vectorized float exp), 16 lanes. */
INLINE __m512 sleef_exp(__m512 d) {
  const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(d, _mm512_set1_ps(1.442695040888963407359924681001892137f)));
  const __m512 qf = _mm512_cvtepi32_ps(q);
  __m512 s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-0.693145751953125f), d);
  s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-1.428606765330187045e-06f), s);
  __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
  u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
  u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
  u = _mm512_scalef_ps(u, qf);
  u = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.0f), _CMP_NLT_US), u);
  return _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(_mm512_set1_ps(100.0f), d, _CMP_LT_OQ), _mm512_set1_ps(INFINITY));
}

/* x = bf16(x + d) elementwise. */
static void add_into(uint16_t* x, const uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store_bf16x16(x + i, _mm512_add_ps(load_bf16x16(x + i), load_bf16x16(d + i)));
  for (; i < n; ++i) x[i] = f2bf(bf2f(x[i]) + bf2f(d[i]));
}

/* One head's rotary embedding: out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)). */
static void rotate(const uint16_t* x, const uint16_t* cs, const uint16_t* sn, int64_t d, uint16_t* out) {
  const int64_t half = d / 2;
  if (half % 16 == 0) { /* whole vectors on each side of the half */
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 other = load_bf16x16(x + (i < half ? i + half : i - half));
      const __m512 rot = i < half ? _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(other),
                                                                        _mm512_set1_epi32((int)0x80000000u)))
                                  : other; /* -x flips the sign bit, -0 included, as PyTorch's neg */
      store_bf16x16(out + i, _mm512_add_ps(round_bf16(_mm512_mul_ps(load_bf16x16(x + i), load_bf16x16(cs + i))),
                                           round_bf16(_mm512_mul_ps(rot, load_bf16x16(sn + i)))));
    }
    return;
  }
  for (int64_t i = 0; i < d; ++i) {
    const float rot = i < half ? -bf2f(x[i + half]) : bf2f(x[i - half]);
    out[i] = f2bf(bf2f(f2bf(bf2f(x[i]) * bf2f(cs[i]))) + bf2f(f2bf(rot * bf2f(sn[i]))));
  }
}

/* g = bf16(bf16(silu(g)) * u), silu(x) = x / (1 + exp(-x)) in float32 as PyTorch's bfloat16 operator
 * computes it (16 lanes at a time; n a multiple of 16). */
static void silu_mul(uint16_t* g, const uint16_t* u, int64_t n) {
  for (int64_t i = 0; i + 16 <= n; i += 16) {
    const __m512 x = load_bf16x16(g + i);
    const __m512 e = sleef_exp(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m256i sb = (__m256i)_mm512_cvtneps_pbh(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
    const __m512 sf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(sb), 16));
    _mm256_storeu_si256((__m256i*)(g + i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sf, load_bf16x16(u + i))));
  }
}

/* tokens [B]; cos, sin [B, head_dim] (bfloat16, the rows' positions); per layer the key and value
 * caches [cache rows, kv_heads, capacity, head_dim] (strides ks / vs, the last dimension contiguous),
 * row b of the step using cache row rows[b] (rows NULL: b); the step writes position `pos` and attends
 * over positions 0..pos where mask [B, pos+1] is non-zero; logits [B, vocab] bfloat16. Returns 0; -1
 * for shapes it does not handle; -2 when out of memory. */
int trp_decode_step(const trp_model* M, const int64_t* tokens, int64_t B, const uint16_t* cos, const uint16_t* sin,
                    uint16_t* const* kc, const int64_t* ks, uint16_t* const* vc, const int64_t* vs,
                    const int64_t* rows, int64_t pos, const uint8_t* mask, int64_t mask_stride, uint16_t* logits,
                    int threads) {
  const int64_t E = M->hidden, H = M->heads, HK = M->kv_heads, D = M->head_dim, I = M->inter;
  if (B < 1 || HK < 1 || H % HK || H / HK > MAX_GROUP || D % 32 || D > MAX_DIM || E % 32 || I % 32
      || (H * D) % 32 || (HK * D) % 16 || M->vocab % 16 || pos < 0)
    return -1;
  const int64_t G = H / HK, QD = H * D, KD = HK * D;
  uint16_t* buf = (uint16_t*)malloc(sizeof(uint16_t) * (size_t)B * (3 * E + 2 * QD + 2 * KD + 2 * I));
  float* sq = (float*)malloc(sizeof(float) * (size_t)E);
  if (buf == NULL || sq == NULL) {
    free(buf);
    free(sq);
    return -2;
  }
  uint16_t *h = buf, *xn = h + B * E, *q = xn + B * E, *k = q + B * QD, *v = k + B * KD, *att = v + B * KD,
           *o = att + B * QD, *g = o + B * E, *u = g + B * I;
  for (int64_t b = 0; b < B; ++b) memcpy(h + b * E, M->embed + tokens[b] * E, sizeof(uint16_t) * (size_t)E);
  const int64_t qkv_n[3] = {QD, KD, KD}, gu_n[2] = {I, I}, e_n[1] = {E};
  uint16_t* qkv_y[3] = {q, k, v};
  uint16_t* gu_y[2] = {g, u};
  uint16_t* o_y[1] = {o};
  int status = 0;
  for (int64_t l = 0; l < M->layers && status == 0; ++l) {
    const uint16_t* const* w = M->weights + l * N_WEIGHTS;
    const float* const* bias = M->biases + l * N_WEIGHTS;
    rms_norm(h, M->norms[2 * l], M->eps[2 * l], B, E, sq, xn);
    amx_multi(xn, B, E, 3, w + W_Q, qkv_n, bias + W_Q, qkv_y, threads);
    uint16_t rotated[MAX_DIM];
    for (int64_t b = 0; b < B; ++b) {
      const uint16_t *cs = cos + b * D, *sn = sin + b * D;
      for (int64_t hq = 0; hq < H; ++hq) {
        rotate(q + b * QD + hq * D, cs, sn, D, rotated);
        memcpy(q + b * QD + hq * D, rotated, sizeof(uint16_t) * (size_t)D);
      }
      const int64_t cb = rows ? rows[b] : b;
      for (int64_t hk = 0; hk < HK; ++hk) {
        rotate(k + b * KD + hk * D, cs, sn, D, kc[l] + cb * ks[0] + hk * ks[1] + pos * ks[2]);
        memcpy(vc[l] + cb * vs[0] + hk * vs[1] + pos * vs[2], v + b * KD + hk * D, sizeof(uint16_t) * (size_t)D);
      }
    }
    const int64_t qs[3] = {QD, G * D, D};
    status = decode_attention_rows(q, qs, kc[l], ks, vc[l], vs, rows, mask, mask_stride, att, (int)B, (int)HK, (int)G,
                                   (int)(pos + 1), (int)D, M->scale, threads);
    if (status != 0) break;
    amx_multi(att, B, QD, 1, w + W_O, e_n, bias + W_O, o_y, threads);
    add_into(h, o, B * E);
    rms_norm(h, M->norms[2 * l + 1], M->eps[2 * l + 1], B, E, sq, xn);
    amx_multi(xn, B, E, 2, w + W_GATE, gu_n, bias + W_GATE, gu_y, threads);
    silu_mul(g, u, B * I);
    amx_multi(g, B, I, 1, w + W_DOWN, e_n, bias + W_DOWN, o_y, threads);
    add_into(h, o, B * E);
  }
  if (status == 0) {
    rms_norm(h, M->final_norm, M->final_eps, B, E, sq, xn);
    const int64_t v_n[1] = {M->vocab};
    uint16_t* l_y[1] = {logits};
    const float* lb[1] = {M->lm_bias};
    const uint16_t* lw[1] = {M->lm_head};
    amx_multi(xn, B, E, 1, lw, v_n, lb, l_y, threads);
  }
  free(buf);
  free(sq);
  return status;
}

/* The same elementwise pieces for PyTorch's own forward (prefill, and steps with a LoRA adapter
 * active), each one call over many rows instead of several PyTorch operators. */

/* y [rows, n] = RMSNorm of x [rows, n] (rows x_stride apart) with weight w, as rms_norm above. */
int trp_rms_norm_rows(const uint16_t* x, int64_t x_stride, const uint16_t* w, float eps, int64_t rows, int64_t n,
                      uint16_t* y, int threads) {
  int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    float* sq = (float*)malloc(sizeof(float) * (size_t)n);
    if (sq == NULL) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      if (sq != NULL) rms_norm(x + r * x_stride, w, eps, 1, n, sq, y + r * n);
    free(sq);
  }
  return failed ? -2 : 0;
}

/* In place: the rotary embedding of every head of x [rows, heads * d], row r with cos/sin [r, d]. */
void trp_rotary_rows(uint16_t* x, int64_t rows, int64_t heads, int64_t d, const uint16_t* cos, const uint16_t* sin,
                     int threads) {
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t rotated[MAX_DIM];
    for (int64_t hd = 0; hd < heads; ++hd) {
      uint16_t* xh = x + (r * heads + hd) * d;
      rotate(xh, cos + r * d, sin + r * d, d, rotated);
      memcpy(xh, rotated, sizeof(uint16_t) * (size_t)d);
    }
  }
}

/* In place: g = bf16(bf16(silu(g)) * u) over n elements (n a multiple of 16). */
void trp_silu_mul_rows(uint16_t* g, const uint16_t* u, int64_t n, int threads) {
  const int64_t blocks = n / 16;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    int64_t b0, b1;
    thread_range(blocks, &b0, &b1);
    if (b0 < b1) silu_mul(g + b0 * 16, u + b0 * 16, (b1 - b0) * 16);
  }
}

/* out[r] = the index of the largest of logits [rows, n] row r (bfloat16), the first one among equals;
 * a NaN counts as larger than any number (the first NaN wins), as in PyTorch's argmax. */
void trp_argmax_rows_bf16(const uint16_t* logits, int64_t rows, int64_t n, int64_t* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* x = logits + r * n;
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i at = _mm512_set1_epi32(-1);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 nan = 0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 v = load_bf16x16(x + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 more = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
      best = _mm512_mask_mov_ps(best, more, v);
      at = _mm512_mask_mov_epi32(at, more, _mm512_add_epi32(lanes, _mm512_set1_epi32((int)i)));
    }
    float top = -INFINITY;
    int64_t where = -1;
    float bv[16] __attribute__((aligned(64)));
    int32_t ba[16] __attribute__((aligned(64)));
    _mm512_store_ps(bv, best);
    _mm512_store_epi32(ba, at);
    for (int l = 0; l < 16; ++l)
      if (ba[l] >= 0 && (bv[l] > top || (bv[l] == top && ba[l] < where) || where < 0)) {
        top = bv[l];
        where = ba[l];
      }
    if (where < 0 && i > 0) { /* the vectors held nothing above -inf: the first of them */
      where = 0;
      top = bf2f(x[0]);
    }
    for (; i < n; ++i) {
      const float v = bf2f(x[i]);
      if (v != v) nan = 1;
      if (v > top || where < 0) {
        top = v;
        where = i;
      }
    }
    if (nan) /* rare: find the first NaN */
      for (int64_t j = 0; j < n; ++j)
        if (bf2f(x[j]) != bf2f(x[j])) {
          where = j;
          break;
        }
    out[r] = where < 0 ? 0 : where; /* every value -inf: the first */
  }
}

/* ---------------------------------------------------------------- prefill attention on AMX tiles
 *
 * Grouped-query attention of many query tokens per row with an explicit mask (a prefill), for
 * head_dim a multiple of 32 up to MAX_DIM. Per (row, key/value head) the keys and values are laid
 * out once as AMX tiles; per block of 16 queries of one head the scores against every key come from
 * the tile dot product (float32 sums of bfloat16 products), then a float32 softmax (masked
 * positions excluded; a query that sees nothing gets zeros), the weights rounded to bfloat16 and
 * multiplied by the values on tiles, float32 sums rounded once. Tiles: 0 accumulator, 1 A, 2 B. */

/* Keys [L, D] as B tiles of the score product: tile (kb, c) holds K[kb*16 + col][c*32 + 2r + p] at
 * [r][col][p]; keys past L are zero. */
static void pack_keys(const uint16_t* k, int64_t ks, int L, int D, uint16_t* out) {
  const int chunks = D / 32, kblocks = (L + 15) / 16;
  for (int kb = 0; kb < kblocks; ++kb)
    for (int c = 0; c < chunks; ++c) {
      uint32_t* tile = (uint32_t*)(out + ((int64_t)kb * chunks + c) * TILE_ELEMS); /* [r][col]: a pair each */
      for (int col = 0; col < 16; ++col) {
        const int key = kb * 16 + col;
        if (key < L) {
          uint32_t pairs[16];
          memcpy(pairs, k + (int64_t)key * ks + c * 32, sizeof pairs);
          for (int r = 0; r < 16; ++r) tile[r * 16 + col] = pairs[r];
        } else {
          for (int r = 0; r < 16; ++r) tile[r * 16 + col] = 0;
        }
      }
    }
}

/* Values [L, D] as B tiles of the weighted sum: tile (lb, db) holds V[lb*32 + 2r + p][db*16 + col] at
 * [r][col][p]; positions past L are zero. */
static void pack_values(const uint16_t* v, int64_t vs, int L, int D, uint16_t* out) {
  const int lblocks = (L + 31) / 32, dblocks = D / 16;
  for (int lb = 0; lb < lblocks; ++lb)
    for (int db = 0; db < dblocks; ++db) {
      uint16_t* tile = out + ((int64_t)lb * dblocks + db) * TILE_ELEMS;
      for (int r = 0; r < 16; ++r) {
        const int pos = lb * 32 + 2 * r;
        const __m512i even = pos < L ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(v + (int64_t)pos * vs + db * 16)))
                                     : _mm512_setzero_si512();
        const __m512i odd = pos + 1 < L ? _mm512_cvtepu16_epi32(
                                              _mm256_loadu_si256((const __m256i*)(v + (int64_t)(pos + 1) * vs + db * 16)))
                                        : _mm512_setzero_si512();
        _mm512_storeu_si512((void*)(tile + r * 32), _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
      }
    }
}

static void configure_attention(void) {
  tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 3; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

/* q [B, H, T, D] (strides qs), k / v [B, HK, L, D] (strides ks / vs), the last dimensions contiguous;
 * mask bytes (non-zero: attend) at mask[b * ms[0] + t * ms[1] + l]; out [B, T, H, D] contiguous.
 * Returns 0; -1 for shapes it does not take; -2 when out of memory. */
int trp_prefill_attention_bf16(const uint16_t* q, const int64_t* qs, const uint16_t* k, const int64_t* ks,
                               const uint16_t* v, const int64_t* vs, const uint8_t* mask, const int64_t* ms,
                               uint16_t* out, int B, int H, int HK, int T, int L, int D, float scale, int threads) {
  if (D % 32 || D > MAX_DIM || HK < 1 || H % HK || B < 1 || T < 1 || L < 1) return -1;
  const int G = H / HK, chunks = D / 32, kblocks = (L + 15) / 16, lblocks = (L + 31) / 32, dblocks = D / 16;
  const int Lp = kblocks * 16, Lw = lblocks * 32;
  int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    uint16_t* kp = (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (size_t)kblocks * chunks * TILE_ELEMS);
    uint16_t* vp = (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (size_t)lblocks * dblocks * TILE_ELEMS);
    float* s = (float*)aligned_alloc(64, sizeof(float) * 16 * (size_t)Lp);
    uint16_t* p = (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * 16 * (size_t)Lw);
    if (!kp || !vp || !s || !p) {
#pragma omp atomic write
      failed = 1;
    } else {
      configure_attention();
    }
    uint16_t qb[16 * MAX_DIM] __attribute__((aligned(64)));
    float acc[256] __attribute__((aligned(64)));
    float inv[16];
#pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < B * HK; ++bh) {
      if (!kp || !vp || !s || !p) continue;
      const int b = bh / HK, hk = bh % HK;
      pack_keys(k + b * ks[0] + hk * ks[1], ks[2], L, D, kp);
      pack_values(v + b * vs[0] + hk * vs[1], vs[2], L, D, vp);
      for (int g = 0; g < G; ++g) {
        const int hq = hk * G + g;
        for (int t0 = 0; t0 < T; t0 += 16) {
          const int n = T - t0 < 16 ? T - t0 : 16;
          for (int r = 0; r < 16; ++r) {
            if (r < n) memcpy(qb + r * D, q + b * qs[0] + hq * qs[1] + (int64_t)(t0 + r) * qs[2], sizeof(uint16_t) * D);
            else memset(qb + r * D, 0, sizeof(uint16_t) * D);
          }
          for (int kb = 0; kb < kblocks; ++kb) { /* scores of the block's queries against keys kb*16.. */
            _tile_zero(0);
            for (int c = 0; c < chunks; ++c) {
              _tile_loadd(1, qb + c * 32, D * 2);
              _tile_loadd(2, kp + ((int64_t)kb * chunks + c) * TILE_ELEMS, 64);
              _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, s + kb * 16, Lp * 4);
          }
          for (int r = 0; r < 16; ++r) { /* softmax of each query over the keys it sees */
            uint16_t* pr = p + (int64_t)r * Lw;
            float* sr = s + (int64_t)r * Lp;
            inv[r] = r < n ? softmax_row(sr, mask + b * ms[0] + (int64_t)(t0 + r) * ms[1], L, Lp, scale) : 0.0f;
            if (inv[r] == 0.0f) { /* padding, or a query that sees nothing: zeros */
              memset(pr, 0, sizeof(uint16_t) * Lw);
              continue;
            }
            int l = 0;
            for (; l < Lp; l += 16) store_bf16x16(pr + l, _mm512_load_ps(sr + l));
            for (; l < Lw; ++l) pr[l] = 0;
          }
          for (int db = 0; db < dblocks; ++db) { /* weighted sum of the values, 16 dimensions at a time */
            _tile_zero(0);
            for (int lb = 0; lb < lblocks; ++lb) {
              _tile_loadd(1, p + lb * 32, Lw * 2);
              _tile_loadd(2, vp + ((int64_t)lb * dblocks + db) * TILE_ELEMS, 64);
              _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, acc, 64);
            for (int r = 0; r < n; ++r)
              store_bf16x16(out + (((int64_t)b * T + t0 + r) * H + hq) * D + db * 16,
                            _mm512_mul_ps(_mm512_load_ps(acc + r * 16), _mm512_set1_ps(inv[r])));
          }
        }
      }
    }
    if (kp && vp && s && p) _tile_release();
    free(kp);
    free(vp);
    free(s);
    free(p);
  }
  return failed ? -2 : 0;
}
