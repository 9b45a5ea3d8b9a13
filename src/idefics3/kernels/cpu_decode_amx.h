// Batched bf16 decode matrix products on AMX tiles, over the model's own row-major weights (no packed copy).
//
// Why: at batch > 1 the AVX512-BF16 dot products of cpu_decode.cpp cost about 2 ms per extra row of a
// SmolVLM-256M step (4.3 GFLOP at 16 rows, near the vdpbf16ps rate of two cores), while the weights take
// ~10 ms to stream: compute, not memory, sets the pace from 4 rows on. One TDPBF16PS multiplies a 16 x 32
// bf16 tile by a 32 x 16 one (16 K multiply-adds), so on AMX the same products cost a fraction of the weight
// stream, and a batch of 16 reads the weights at nearly the speed of one row.
//
// Layout: y^T = W x^T. The weight is the A operand as it sits in memory: 16 output rows x 32 k values (64
// bytes of each row, rows K * 2 bytes apart), so nothing is repacked and batches cost no memory beyond the
// model's (the AVX-512 path without AMX needs packed copies as large as the weights). The activations, a few
// KB, are the B operand, rearranged once per product into AMX's pair layout: for each chunk of 32 k values,
// 16 rows of k pairs x up to 16 batch rows x 2 (`to_pairs`). C is 16 output rows x the batch rows in fp32.
// Tiles: 0, 1 = C of two 16-row blocks; 2, 3 and 5, 6 = their A for even and odd chunks; 4 and 7 = B (the
// batch size sets the B and C widths: `configure`, per step).
//
// Numerics: products of bf16 values are exact in fp32 and sums are fp32, as on the AVX-512 path; only the
// order of the sums differs. K must be a multiple of 32 (the caller checks); output rows past the last whole
// block of 16 go through the caller's row-major AVX-512 dot products.
//
// Linux gives a process the AMX state only on request (arch_prctl ARCH_REQ_XCOMP_PERM): `amx_init` asks once.

#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define IDEFICS3_HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

namespace amx {

constexpr int KC = 32;   // k values per tile row (64 bytes of bf16)
constexpr int MAXB = 16; // batch rows per B tile (64 bytes of k pairs)

struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// GCC 12 does not see that ldtilecfg reads the whole 64 bytes and may drop the stores of colsb and rows before
// it (observed once `configure` was no longer inlined); the empty asm with a memory clobber keeps them.
inline void load(const TileConfig& cfg) {
  asm volatile("" : : "m"(cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// Ask Linux for the AMX tile state (once per process; harmless if torch/oneDNN already did). 0: ready.
inline int init() {
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : 2;
}

// Configure this thread's tiles for products over `rb` batch rows (1..16).
inline void configure(int rb) {
  TileConfig cfg;
  for (int t = 0; t < 2; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = uint16_t(rb * 4); }  // C: 16 x rb fp32
  for (int t : {2, 3, 5, 6}) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }                 // A: 16 x 32 bf16
  for (int t : {4, 7}) { cfg.rows[t] = 16; cfg.colsb[t] = uint16_t(rb * 4); }       // B: 16 pairs x rb x 2
  load(cfg);
}

// Configure this thread's tiles for attention scores of G query heads (scores_amx in cpu_decode_attention.h):
// C 0, 1: 16 positions x G fp32; A 2, 3: 16 positions x 32 dims of bf16 keys; B 4..7: 16 dim pairs x G x 2.
inline void configure_scores(int G) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = uint16_t(t == 2 || t == 3 ? 64 : G * 4); }
  load(cfg);
}

// Configure this thread's tiles for P.V of G query heads of size 64 (values_amx in cpu_decode_attention.h):
// C 0-3 and A 4: G rows x 64 bytes; B 5-7: 16 position pairs x 64 bytes.
inline void configure_values(int G) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = uint8_t(t < 5 ? G : 16); cfg.colsb[t] = 64; }
  load(cfg);
}

inline void release() { _tile_release(); }

// x [R, K] bf16 -> pairs [ceil(R/16)][K/32][16 pairs][rb][2], rb = min(R, 16) (rows past R zero): the B tiles.
// Split between the threads by chunk of 32 k values (an orphaned `omp for`, ending in a barrier): a chunk's 16
// pairs x 16 rows fill whole cache lines, so no two threads write the same line.
inline void to_pairs(const uint16_t* x, int64_t R, int64_t K, uint16_t* pairs) {
  const int64_t rb = std::min<int64_t>(R, MAXB), blocks = (R + MAXB - 1) / MAXB, chunks = K / KC;
#pragma omp for schedule(static)
  for (int64_t bc = 0; bc < blocks * chunks; ++bc) {
    const int64_t b = bc / chunks, c = bc % chunks;
    uint32_t* dst = reinterpret_cast<uint32_t*>(pairs) + bc * 16 * rb;  // [16 pairs][rb]
    for (int64_t j = 0; j < rb; ++j) {
      const int64_t r = b * MAXB + j;
      const uint32_t* src = reinterpret_cast<const uint32_t*>(x + r * K) + c * 16;  // 16 k pairs of row r
      for (int64_t p = 0; p < 16; ++p) dst[p * rb + j] = r < R ? src[p] : 0u;
    }
  }
}

// C tiles for 16 output rows starting at W0 (and, if W1, 16 more at W1) against one block of batch rows:
// c0/c1 [16][rb] fp32. W0/W1 point at row-major rows K apart (K a multiple of 32).
// Tile registers are not renamed: a load into a tile waits for the multiply still reading it. So chunks go in
// pairs on two sets of A and B tiles (2, 3, 4 for even chunks; 5, 6, 7 for odd ones), and the loads of one
// chunk overlap the multiplies of the other (measured alone, a 576-wide matrix resident in L2: 55 GB/s with one
// set, the load-multiply chain then sets the pace).
inline void block(const uint16_t* W0, const uint16_t* W1, int64_t K, const uint16_t* pairs, int rb, float* c0,
                  float* c1, int64_t next_rows = 16) {
  const int64_t chunks = K / KC, bstride = 16 * rb * 2;
  // the rows the caller takes next (next_rows further on: 32 where W1 = W0 + 16 rows), for prefetching
  const char* ahead0 = reinterpret_cast<const char*>(W0 + next_rows * K);
  const char* ahead1 = W1 ? reinterpret_cast<const char*>(W1 + next_rows * K) : nullptr;
  _tile_zero(0);
  _tile_zero(1);
  int64_t c = 0;
  for (; c + 2 <= chunks; c += 2) {
    for (int i = 0; i < 32; ++i) {  // 2 KB of each next block per pair of chunks, front to back
      _mm_prefetch(ahead0 + c * 1024 + i * 64, _MM_HINT_T0);
      if (ahead1) _mm_prefetch(ahead1 + c * 1024 + i * 64, _MM_HINT_T0);
    }
    _tile_loadd(4, pairs + c * bstride, rb * 4);
    _tile_loadd(2, W0 + c * KC, K * 2);
    _tile_loadd(7, pairs + (c + 1) * bstride, rb * 4);
    _tile_loadd(5, W0 + (c + 1) * KC, K * 2);
    _tile_dpbf16ps(0, 2, 4);
    if (W1) {
      _tile_loadd(3, W1 + c * KC, K * 2);
      _tile_loadd(6, W1 + (c + 1) * KC, K * 2);
      _tile_dpbf16ps(1, 3, 4);
    }
    _tile_dpbf16ps(0, 5, 7);
    if (W1) _tile_dpbf16ps(1, 6, 7);
  }
  if (c < chunks) {
    _tile_loadd(4, pairs + c * bstride, rb * 4);
    _tile_loadd(2, W0 + c * KC, K * 2);
    _tile_dpbf16ps(0, 2, 4);
    if (W1) {
      _tile_loadd(3, W1 + c * KC, K * 2);
      _tile_dpbf16ps(1, 3, 4);
    }
  }
  _tile_stored(0, c0, rb * 4);
  if (W1) _tile_stored(1, c1, rb * 4);
}

}  // namespace amx

#endif  // __AMX_TILE__ && __AMX_BF16__
