/* y = x W^T (+ bias) for bfloat16 x [M, K] and W [N, K] with few rows, on AMX tiles
 * (trprompt, written for trprompt/engines/cpu_speed.py).
 *
 * Why: at decoding's row counts (1-64 tokens) a linear layer is bound by reading its weight from
 * memory, and oneDNN's packed bfloat16 kernel read SmolLM2's weights at about a third of the
 * memory bandwidth on the development VM. Here the weight is laid out once (trp_amx_pack) as the
 * tiles the AMX dot-product instruction takes, each 16 output columns x 32 inputs (1 KiB, pairs of
 * inputs interleaved), stored so that one thread streams its columns' tiles from one contiguous
 * range; the rows of x are loaded as tiles straight from x. Up to four row blocks (64 rows) are
 * accumulated at once in four float32 tiles, so each weight tile is read once per 64 rows.
 * Rounding: float32 accumulation, then the bias (float32 sum) and one rounding to bfloat16 (round
 * to nearest even), like F.linear.
 *
 * The caller must have asked the kernel for AMX permission once (trp_amx_enable) and needs K a
 * multiple of 32 and N a multiple of 16.
 *
 * Build: cc -O3 -mamx-tile -mamx-bf16 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -fopenmp -shared -fPIC
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE_ELEMS 512 /* bf16 elements in one weight tile: 16 pairs of inputs x 16 columns x 2 */

int trp_amx_linear_abi(void) { return 1; }

/* Asks Linux for the AMX tile state (once per process); 0 on success. */
int trp_amx_enable(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1; }

/* Weight tile (nb, kb) of w [n, k] starts at out + (nb * (k / 32) + kb) * TILE_ELEMS and holds
 * w[nb*16 + c][kb*32 + 2*r + p] at [r][c][p] (r < 16, c < 16, p < 2). */
void trp_amx_pack(const uint16_t* w, int64_t n, int64_t k, uint16_t* out) {
  const int64_t kblocks = k / 32;
#pragma omp parallel for schedule(static)
  for (int64_t nb = 0; nb < n / 16; ++nb) {
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      uint16_t* tile = out + (nb * kblocks + kb) * TILE_ELEMS;
      for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
          for (int p = 0; p < 2; ++p) tile[(r * 16 + c) * 2 + p] = w[(nb * 16 + c) * k + kb * 32 + 2 * r + p];
    }
  }
}

typedef struct {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

/* Tiles 0-3 accumulate row blocks 0-3 (16 rows each, the last one `tail` rows) of one column
 * block; tile 4 holds a full row block of x, tile 5 the last (partial) one, tile 6 the weight. */
static void configure(int blocks, int tail) {
  tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < blocks; ++t) {
    cfg.rows[t] = (uint8_t)(t == blocks - 1 ? tail : 16);
    cfg.colsb[t] = 64;
  }
  cfg.rows[4] = 16;
  cfg.colsb[4] = 64;
  cfg.rows[5] = (uint8_t)tail;
  cfg.colsb[5] = 64;
  cfg.rows[6] = 16;
  cfg.colsb[6] = 64;
  _tile_loadconfig(&cfg);
}

/* Rounds rows of float32 sums (+ bias) to bfloat16 into y. */
static void write_rows(const float* acc, int rows, const float* bias, uint16_t* y, int64_t ldy) {
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int r = 0; r < rows; ++r) {
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(acc + r * 16), b);
    _mm256_storeu_si256((__m256i*)(y + r * ldy), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

/* Prefetch the weight tile PREFETCH_TILES ahead of the one being multiplied (the next column
 * block's tiles follow this one's in memory): without it the hardware prefetcher left a pass over
 * SmolLM2's weights at 29 rows at 24 ms; with 8 tiles (8 KiB) ahead, 16 ms, the memory bandwidth. */
#define PREFETCH_TILES 8
#define PREFETCH_W(kb)                                                                  \
  do {                                                                                  \
    const char* ahead = (const char*)(w + ((kb) + PREFETCH_TILES) * TILE_ELEMS);        \
    for (int line = 0; line < 16; ++line) _mm_prefetch(ahead + line * 64, _MM_HINT_T0); \
  } while (0)

#define STEP(block, atile)                                            \
  do {                                                                \
    _tile_loadd(atile, x + (block) * 16 * k + kb * 32, ldx);          \
    _tile_dpbf16ps(block, atile, 6);                                  \
  } while (0)

/* Column blocks [nb0, nb1) for `blocks` row blocks of x (up to 64 rows; the last block `tail` rows),
 * each weight tile read once for all of them. */
static void columns(const uint16_t* x, int blocks, int tail, int64_t k, const uint16_t* wp, int64_t nb0, int64_t nb1,
                    const float* bias, uint16_t* y, int64_t n) {
  const int64_t kblocks = k / 32;
  const int64_t ldx = k * 2;
  float acc[256] __attribute__((aligned(64)));
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint16_t* w = wp + nb * kblocks * TILE_ELEMS;
    _tile_zero(0);
    if (blocks > 1) _tile_zero(1);
    if (blocks > 2) _tile_zero(2);
    if (blocks > 3) _tile_zero(3);
    switch (blocks) {
      case 1:
        for (int64_t kb = 0; kb < kblocks; ++kb) {
          PREFETCH_W(kb);
          _tile_loadd(6, w + kb * TILE_ELEMS, 64);
          STEP(0, 5);
        }
        break;
      case 2:
        for (int64_t kb = 0; kb < kblocks; ++kb) {
          PREFETCH_W(kb);
          _tile_loadd(6, w + kb * TILE_ELEMS, 64);
          STEP(0, 4);
          STEP(1, 5);
        }
        break;
      case 3:
        for (int64_t kb = 0; kb < kblocks; ++kb) {
          PREFETCH_W(kb);
          _tile_loadd(6, w + kb * TILE_ELEMS, 64);
          STEP(0, 4);
          STEP(1, 4);
          STEP(2, 5);
        }
        break;
      default:
        for (int64_t kb = 0; kb < kblocks; ++kb) {
          PREFETCH_W(kb);
          _tile_loadd(6, w + kb * TILE_ELEMS, 64);
          STEP(0, 4);
          STEP(1, 4);
          STEP(2, 4);
          STEP(3, 5);
        }
    }
    const float* b = bias ? bias + nb * 16 : 0;
    for (int t = 0; t < blocks; ++t) {
      switch (t) {
        case 0: _tile_stored(0, acc, 64); break;
        case 1: _tile_stored(1, acc, 64); break;
        case 2: _tile_stored(2, acc, 64); break;
        default: _tile_stored(3, acc, 64);
      }
      write_rows(acc, t == blocks - 1 ? tail : 16, b, y + t * 16 * n + nb * 16, n);
    }
  }
}

/* This thread's share [lo, hi) of `total` items split into contiguous ranges over the OpenMP team. */
static inline void thread_range(int64_t total, int64_t* lo, int64_t* hi) {
  int me = 0, team = 1;
#ifdef _OPENMP
  me = omp_get_thread_num();
  team = omp_get_num_threads();
#endif
  *lo = total * me / team;
  *hi = total * (me + 1) / team;
}

/* Several linear layers on the same input in one pass: y_i [m, n_i] = x [m, k] W_i^T + b_i (biases
 * float32, each may be NULL), the column blocks of all of them split over `threads` OpenMP threads,
 * each taking a contiguous range. */
static void amx_multi(const uint16_t* x, int64_t m, int64_t k, int count, const uint16_t* const* wps,
                      const int64_t* ns, const float* const* biases, uint16_t* const* ys, int threads) {
  int64_t total = 0;
  for (int i = 0; i < count; ++i) total += ns[i] / 16;
  if (threads < 1) threads = 1;
  if (threads > total) threads = (int)total;
#pragma omp parallel num_threads(threads)
  {
    int64_t g0, g1;
    thread_range(total, &g0, &g1);
    if (g0 < g1) {
      for (int64_t m0 = 0; m0 < m; m0 += 64) {
        const int64_t rows = m - m0 < 64 ? m - m0 : 64;
        const int blocks = (int)((rows + 15) / 16);
        const int tail = (int)(rows - 16 * (blocks - 1));
        configure(blocks, tail);
        int64_t base = 0;
        for (int i = 0; i < count; ++i) {
          const int64_t nb = ns[i] / 16;
          const int64_t lo = g0 > base ? g0 - base : 0, hi = g1 - base < nb ? g1 - base : nb;
          if (lo < hi) columns(x + m0 * k, blocks, tail, k, wps[i], lo, hi, biases[i], ys[i] + m0 * ns[i], ns[i]);
          base += nb;
        }
      }
      _tile_release();
    }
  }
}

/* y [m, n] = x [m, k] (contiguous rows) times the packed weight, plus bias (float32, may be NULL),
 * on `threads` OpenMP threads, each taking a contiguous range of column blocks. */
void trp_amx_linear(const uint16_t* x, int64_t m, int64_t k, const uint16_t* wp, int64_t n, const float* bias,
                    uint16_t* y, int threads) {
  amx_multi(x, m, k, 1, &wp, &n, &bias, &y, threads);
}
