// One fused decode step of the Llama text decoder on x86 CPUs with AVX-512 (bf16 via AVX512-BF16).
//
// Why: at batch 1 a decode step reads every weight once (~269 MB for SmolVLM-256M), so its speed is the
// memory bandwidth; aten's bf16 GEMV reaches a fraction of it and eager dispatch of ~25 small ops per
// layer adds more. Here the whole step (embedding, 30 layers, final norm, lm_head) runs inside one
// OpenMP parallel region: every matrix is streamed once and each weight load serves all R rows of the
// batch, which is what makes batch 8 nearly as cheap as batch 1. At batch 1 the matrices are the model's
// own row-major tensors (shared with the plain path); bf16 batches read packed copies (packed_tile).
// Quantised matrices (int8, int4: cpu_decode_quant.h) are streamed as stored, at batch 1 and in batches, and
// dequantised in registers; a model with any of them never takes packed copies or AMX tiles.
//
// Numerics follow the plain PyTorch path: fp32 accumulation everywhere, RMSNorm and softmax in fp32,
// and in bf16 the values are rounded to bf16 at the same points where the plain path stores a bf16
// tensor (norm output, projections, RoPE, residual stream, SiLU*up, logits).
//
// The file includes no torch header (it compiles in about a second) and exposes a C ABI used through
// ctypes by cpu_decode.py, which checks shapes, dtypes and the CPU before anything here runs.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_decode_amx.h"  // batched products on AMX tiles, where the compiler has AMX (IDEFICS3_HAVE_AMX)

#include "cpu_decode_model.h"  // Layer, Model, bf16 scalars, create / set_packed / destroy, input checks

namespace {

// 16 fp32 lanes rounded to bf16 (nearest even, NaN to 0x7fc0 as float_to_bf16), as the high halves of fp32 lanes.
inline __m512i round_bf16_bits(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  u = _mm512_and_si512(u, _mm512_set1_epi32(int(0xffff0000u)));
  return _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
}

// Element traits: storage type T, lanes per 512-bit weight load, a multiply-accumulate of one load.
struct F32 {
  using T = float;
  using V = __m512;
  static constexpr int L = 16;
  static V load(const T* p) { return _mm512_loadu_ps(p); }
  static V load_tail(const T* p, int n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1u), p); }
  static __m512 mac(__m512 acc, V w, V x) { return _mm512_fmadd_ps(w, x, acc); }
  static float to_f(T v) { return v; }
  static T from_f(float v) { return v; }
  static float round(float v) { return v; }
  // 16 elements (masked) widened to fp32, for attention and RoPE
  static __m512 load16(const T* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  // 16 fp32 values rounded to what T holds, and stored as T (masked)
  static __m512 round16(__m512 v) { return v; }
  static void store16(T* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
};

struct BF16 {
  using T = uint16_t;
  using V = __m512i;
  static constexpr int L = 32;
  static V load(const T* p) { return _mm512_loadu_si512(p); }
  static V load_tail(const T* p, int n) { return _mm512_maskz_loadu_epi16(__mmask32((1ull << n) - 1u), p); }
  static __m512 mac(__m512 acc, V w, V x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
  static float to_f(T v) { return bf16_to_float(v); }
  static T from_f(float v) { return float_to_bf16(v); }
  static float round(float v) { return bf16_to_float(float_to_bf16(v)); }
  static __m512 load16(const T* p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static __m512 round16(__m512 v) { return _mm512_castsi512_ps(round_bf16_bits(v)); }
  static void store16(T* p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bf16_bits(v), 16)));
  }
};

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

constexpr int NR = 4;  // weight rows per tile: the unit of work split between threads
#ifndef IDEFICS3_PREFETCH_BYTES
#define IDEFICS3_PREFETCH_BYTES 4096
#endif
// How far ahead of its loads a weight stream asks for its lines (0: the hardware prefetcher alone).
constexpr int PREFETCH_BYTES = IDEFICS3_PREFETCH_BYTES;
constexpr int RB = 8;  // batch rows served by one pass over a weight row

// out[r] = dot(w, x[r, :]) for r < rb. The row is streamed once, front to back (measured: one sequential
// stream per thread beats interleaving several rows, even with software prefetch), and each of its
// loads feeds all rb batch rows. na accumulators per batch row break the dependency chain when rb is small.
template <class A, int rb, int na>
inline void dot_row(const typename A::T* w, int64_t K, const typename A::T* x, int64_t xs, float* out) {
  __m512 acc[rb][na];
  for (int r = 0; r < rb; ++r)
    for (int a = 0; a < na; ++a) acc[r][a] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + na * A::L <= K; k += na * A::L) {
    for (int a = 0; a < na; ++a) {
      if (PREFETCH_BYTES > 0)
        _mm_prefetch(reinterpret_cast<const char*>(w + k + a * A::L) + PREFETCH_BYTES, _MM_HINT_T0);
      const typename A::V wv = A::load(w + k + a * A::L);
      for (int r = 0; r < rb; ++r) acc[r][a] = A::mac(acc[r][a], wv, A::load(x + r * xs + k + a * A::L));
    }
  }
  for (; k < K; k += A::L) {
    const int n = int(std::min<int64_t>(A::L, K - k));
    const typename A::V wv = A::load_tail(w + k, n);
    for (int r = 0; r < rb; ++r) acc[r][0] = A::mac(acc[r][0], wv, A::load_tail(x + r * xs + k, n));
  }
  for (int r = 0; r < rb; ++r) {
    __m512 sum = acc[r][0];
    for (int a = 1; a < na; ++a) sum = _mm512_add_ps(sum, acc[r][a]);
    out[r] = _mm512_reduce_add_ps(sum);
  }
}

// Row n of W [N, K] against all R rows of x [R, K]: emit(r, n, value).
template <class A, class Emit>
inline void row_times_batch(const typename A::T* W, int64_t K, int64_t n, const typename A::T* x, int64_t R,
                            const Emit& emit) {
  const typename A::T* w = W + n * K;
  float out[RB];
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int rb = int(std::min<int64_t>(RB, R - r0));
    const typename A::T* xr = x + r0 * K;
    switch (rb) {
      case 8: dot_row<A, 8, 1>(w, K, xr, K, out); break;
      case 7: dot_row<A, 7, 1>(w, K, xr, K, out); break;
      case 6: dot_row<A, 6, 1>(w, K, xr, K, out); break;
      case 5: dot_row<A, 5, 1>(w, K, xr, K, out); break;
      case 4: dot_row<A, 4, 1>(w, K, xr, K, out); break;
      case 3: dot_row<A, 3, 1>(w, K, xr, K, out); break;
      case 2: dot_row<A, 2, 2>(w, K, xr, K, out); break;
      default: dot_row<A, 1, 3>(w, K, xr, K, out); break;
    }
    for (int r = 0; r < rb; ++r) emit(r0 + r, n, out[r]);
  }
}

// Tile t (rows t*NR .. min(N, t*NR+NR)) of y = x W^T.
template <class A, class Emit>
inline void gemv_tile(const typename A::T* W, int64_t N, int64_t K, int64_t t, const typename A::T* x, int64_t R,
                      const Emit& emit) {
  for (int64_t n = t * NR; n < std::min(N, t * NR + NR); ++n) row_times_batch<A>(W, K, n, x, R, emit);
}

inline int64_t tiles(int64_t n) { return (n + NR - 1) / NR; }

#include "cpu_decode_quant.h"  // QuantInput, QuantScratch, quant_rows: int8 / int4 weights

// Tile t of y = x W^T for a dense or quantised W (`in`: x as the quantised products read it, prepared this step
// where W is quantised).
template <class A, class Emit>
inline void weight_tile(const Weight& W, int64_t N, int64_t K, int64_t t, const typename A::T* x,
                        const QuantInput& in, int64_t R, const Emit& emit) {
  if (W.dense()) {
    gemv_tile<A>(static_cast<const typename A::T*>(W.data), N, K, t, x, R, emit);
    return;
  }
  quant_rows(W, t * NR, std::min(N, t * NR + NR), in, R, emit);
}

// ---- batched bf16 decode on packed weights ------------------------------------------------------------------
// At batch > 1 the row-major dot products above load a whole x vector per weight vector (8 loads per 8
// vdpbf16ps at batch 8), and the load ports, not memory, set the pace. A weight packed as
// [N/32][K/2][32][2] (a tile of 32 output columns x one k pair per two 512-bit loads, zero-padded to whole
// tiles) turns this around: each weight load serves 16 columns, each x pair is one 32-bit broadcast, and the
// sums land in the output lanes with no horizontal reduction (measured alone at 1 thread on the [1536 -> 576]
// down projection, batch 8: 2.5 against 0.9 G vdpbf16ps/s). A tile is one sequential stream: with its two
// 16-column halves in separate streams (K/2 x 64 bytes apart) the batch-8 step's multiplies took 1.2x as long.
constexpr int PT = 32;

template <int rb, int nb>
inline void packed_dot(const uint16_t* w, int64_t K2, const uint16_t* x, int64_t xs, float* out /* [rb][PT] */) {
  __m512 acc[rb][nb];
  for (int r = 0; r < rb; ++r)
    for (int b = 0; b < nb; ++b) acc[r][b] = _mm512_setzero_ps();
  const int32_t* xp = reinterpret_cast<const int32_t*>(x);  // k pairs; xs (elements) is even
  for (int64_t p = 0; p < K2; ++p) {
    __m512i wv[nb];
    for (int b = 0; b < nb; ++b) wv[b] = _mm512_loadu_si512(w + (p * nb + b) * 32);
    for (int r = 0; r < rb; ++r) {
      const __m512i xb = _mm512_set1_epi32(xp[r * (xs / 2) + p]);
      for (int b = 0; b < nb; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)wv[b], (__m512bh)xb);
    }
  }
  for (int r = 0; r < rb; ++r)
    for (int b = 0; b < nb; ++b) _mm512_storeu_ps(out + r * PT + 16 * b, acc[r][b]);
}

// Tile t (columns t*PT .. +PT, as far as N) of y = x W^T for the R rows of x [R, K] (K even), with W packed
// (N rounded up to PT): emit.row(r, first column, values, count) once per row.
template <class Emit>
inline void packed_tile(const uint16_t* Wp, int64_t N, int64_t K, int64_t t, const uint16_t* x, int64_t R,
                        const Emit& emit) {
  const int64_t K2 = K / 2, n0 = t * PT;
  const uint16_t* w = Wp + t * K2 * 2 * PT;
  float out[RB * PT];
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int rb = int(std::min<int64_t>(RB, R - r0));
    const uint16_t* xr = x + r0 * K;
#define IDEFICS3_PACKED(RBV)                                              \
  case RBV:                                                               \
    packed_dot<RBV, 2>(w, K2, xr, K, out);                                \
    break;
    switch (rb) {
      IDEFICS3_PACKED(8) IDEFICS3_PACKED(7) IDEFICS3_PACKED(6) IDEFICS3_PACKED(5)
      IDEFICS3_PACKED(4) IDEFICS3_PACKED(3) IDEFICS3_PACKED(2) IDEFICS3_PACKED(1)
    }
#undef IDEFICS3_PACKED
    const int count = int(std::min<int64_t>(PT, N - n0));
    for (int r = 0; r < rb; ++r) emit.row(r0 + r, n0, out + r * PT, count);
  }
}

inline int64_t packed_tiles(int64_t n) { return (n + PT - 1) / PT; }


// Where a matrix product's outputs go (cpu_decode_model.h's ScalarSink: per element, for the row-major path),
// and per row of up to 32 columns for the packed, AMX and quantised paths (vectorised rounding and stores).
template <class A>
struct Sink : ScalarSink<A> {
  void row(int64_t r, int64_t n0, const float* v, int count) const {
    for (int c = 0; c < count; c += 16) lanes16(r, n0 + c, _mm512_maskz_loadu_ps(lanes(count - c), v + c), lanes(count - c));
  }
  // The lanes k of x as the outputs (r, n0 ..) (from a register: no round trip through memory).
  void lanes16(int64_t r, int64_t n0, __m512 x, __mmask16 k) const {
    const auto [dst, stride, how] = static_cast<const ScalarSink<A>&>(*this);
    if (how == Store::Cast)
      A::store16(static_cast<typename A::T*>(dst) + r * stride + n0, x, k);
    else
      _mm512_mask_storeu_ps(static_cast<float*>(dst) + r * stride + n0, k, how == Store::Round ? A::round16(x) : x);
  }
};

// RMSNorm of one row in fp32: out = w * round(h * rsqrt(mean(h^2) + eps)), 16 lanes at a time.
template <class A>
inline void rms_norm(const float* h, const typename A::T* w, int64_t D, float eps, typename A::T* out) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(lanes(D - i), h + i);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 rs = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / float(D) + eps));
  for (int64_t i = 0; i < D; i += 16) {
    const __mmask16 k = lanes(D - i);
    const __m512 v = A::round16(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, h + i), rs));
    A::store16(out + i, _mm512_mul_ps(A::load16(w + i, k), v), k);
  }
}

// The residual add of a sublayer's output (y, or none before the first layer) into the stream h, rounded as
// the plain path stores it, then the next RMSNorm of that row into out.
template <class A>
inline void add_then_norm(float* h, const float* y, const typename A::T* w, int64_t D, float eps,
                          typename A::T* out) {
  if (y != nullptr)
    for (int64_t i = 0; i < D; i += 16) {
      const __mmask16 k = lanes(D - i);
      const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(k, h + i), A::round16(_mm512_maskz_loadu_ps(k, y + i)));
      _mm512_mask_storeu_ps(h + i, k, A::round16(sum));
    }
  rms_norm<A>(h, w, D, eps, out);
}

// Half-split RoPE of one head in place (x holds values already rounded to T), as the plain path does it:
// x = round(round(x * cos) + round(rotate_half(x) * sin)), 16 lanes of each half at a time.
template <class A>
inline void rope(float* x, const typename A::T* cos, const typename A::T* sin, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 k = lanes(half - i);
    const __m512 lo = _mm512_maskz_loadu_ps(k, x + i), hi = _mm512_maskz_loadu_ps(k, x + half + i);
    const __m512 new_lo = A::round16(_mm512_add_ps(A::round16(_mm512_mul_ps(lo, A::load16(cos + i, k))),
                                                   A::round16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi),
                                                                            A::load16(sin + i, k)))));
    const __m512 new_hi = A::round16(_mm512_add_ps(A::round16(_mm512_mul_ps(hi, A::load16(cos + half + i, k))),
                                                   A::round16(_mm512_mul_ps(lo, A::load16(sin + half + i, k)))));
    _mm512_mask_storeu_ps(x + i, k, new_lo);
    _mm512_mask_storeu_ps(x + half + i, k, new_hi);
  }
}

// exp(x) for 16 lanes: range reduction to r in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial
// (relative error ~2e-7, about libm's exp in fp32); inputs below -87 give ~1e-38 instead of 0.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}


#include "cpu_decode_attention.h"  // attend, attend_group, KeyRange: the attention of a decode step

// act[n] = round(round(silu(gate[n])) * up[n]) for n < count (gate and up already rounded to T).
template <class A>
void silu_times(const float* gate, const float* up, int64_t count, typename A::T* act) {
  for (int64_t n = 0; n < count; n += 16) {
    const __mmask16 k = lanes(count - n);
    const __m512 g = _mm512_maskz_loadu_ps(k, gate + n);
    const __m512 sg = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    A::store16(act + n, _mm512_mul_ps(A::round16(sg), _mm512_maskz_loadu_ps(k, up + n)), k);
  }
}

// The packed gate|up tile of 16 columns from n0: its first 16 outputs are gate's, the next 16 up's (count valid).
template <class A>
struct GateUp {
  Sink<A> gate, up;
  int64_t n0;
  int count;
  void row(int64_t r, int64_t, const float* v, int) const {
    gate.row(r, n0, v, count);
    up.row(r, n0, v + 16, count);
  }
};

#ifdef IDEFICS3_HAVE_AMX
// A C tile [16 output columns][rb batch rows] handed to emit.row one batch row at a time (its first `count`
// columns, read with a strided gather): vectorised rounding and stores instead of one call per element.
template <class Emit>
inline void emit_columns(const float* c, int64_t rb, int64_t valid, int64_t r0, int64_t n0, const Emit& emit,
                         int count = 16) {
  const __m512i stride = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(int(rb)));
  float row[16];
  for (int64_t j = 0; j < valid; ++j) {
    _mm512_storeu_ps(row, _mm512_i32gather_ps(stride, c + j, 4));
    emit.row(r0 + j, n0, row, count);
  }
}

// y = x W^T on AMX tiles (cpu_decode_amx.h) for bf16 batches, inside the caller's parallel region: `pairs` holds
// x in AMX's pair layout (amx::to_pairs). 32 output rows per work item; the rows past the last whole block of 16
// go through the row-major dot products.
template <class Emit>
inline void linear_amx(const uint16_t* W, int64_t N, int64_t K, const uint16_t* x, const uint16_t* pairs, int64_t R,
                       const Emit& emit) {
  const int64_t rb = std::min<int64_t>(R, amx::MAXB), blocks = (R + amx::MAXB - 1) / amx::MAXB;
#pragma omp for schedule(static)
  for (int64_t u = 0; u < (N + 31) / 32; ++u) {
    const int64_t n0 = 32 * u, count = std::min<int64_t>(32, N - n0), whole = count / 16;
    float c[2][16 * amx::MAXB];
    for (int64_t b = 0; whole > 0 && b < blocks; ++b) {
      amx::block(W + n0 * K, whole == 2 ? W + (n0 + 16) * K : nullptr, K, pairs + b * (K / amx::KC) * 16 * rb * 2,
                 int(rb), c[0], c[1], 32);
      for (int64_t half = 0; half < whole; ++half)
        emit_columns(c[half], rb, std::min<int64_t>(rb, R - b * amx::MAXB), b * amx::MAXB, n0 + 16 * half, emit);
    }
    for (int64_t n = n0 + 16 * whole; n < n0 + count; ++n) row_times_batch<BF16>(W, K, n, x, R, emit);
  }
}
#endif

#ifdef IDEFICS3_HAVE_AMX
// gate and up of 16 columns from n0 (their weight rows at Wg, Wu) for all R rows, on AMX (x already in `pairs`).
template <class A>
inline void gate_up_amx(const uint16_t* Wg, const uint16_t* Wu, int64_t K, const uint16_t* pairs, int64_t R,
                        int64_t n0, const Sink<A>& gate, const Sink<A>& up) {
  const int64_t rb = std::min<int64_t>(R, amx::MAXB);
  float c[2][16 * amx::MAXB];
  for (int64_t b = 0; b * amx::MAXB < R; ++b) {
    amx::block(Wg, Wu, K, pairs + b * (K / amx::KC) * 16 * rb * 2, int(rb), c[0], c[1]);
    const int64_t valid = std::min<int64_t>(rb, R - b * amx::MAXB);
    emit_columns(c[0], rb, valid, b * amx::MAXB, n0, gate);
    emit_columns(c[1], rb, valid, b * amx::MAXB, n0, up);
  }
}
#endif

#include "cpu_decode_quant_amx.h"  // quant_matmul_amx: prefill products on quantised weights, on AMX tiles

// y = x W^T inside the caller's parallel region (an orphaned `omp for`): for bf16 batches on AMX tiles when
// given `pairs` (scratch for x in AMX's layout, made here unless `pairs_ready`), else on the packed copy Wp when
// `packed`, else row-major (dense or quantised W; `in` as for weight_tile). AMX and packed: dense models only.
template <class A, class Emit>
inline void linear(bool packed, const Weight& W, const uint16_t* Wp, int64_t N, int64_t K, const typename A::T* x,
                   const QuantInput& in, int64_t R, const Emit& emit, uint16_t* pairs = nullptr,
                   bool pairs_ready = false) {
  if constexpr (std::is_same<A, BF16>::value) {
#ifdef IDEFICS3_HAVE_AMX
    if (pairs != nullptr) {
      if (!pairs_ready) amx::to_pairs(x, R, K, pairs);
      linear_amx(static_cast<const uint16_t*>(W.data), N, K, x, pairs, R, emit);
      return;
    }
#endif
    if (packed) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < packed_tiles(N); ++t) packed_tile(Wp, N, K, t, x, R, emit);
      return;
    }
  }
#pragma omp for schedule(static)
  for (int64_t t = 0; t < tiles(N); ++t) weight_tile<A>(W, N, K, t, x, in, R, emit);
}

template <class A>
void step(const Model& m, int64_t R, const int64_t* ids, const int64_t* pos, const int64_t* slots,
          const int64_t* shared, const void* cos_p, const void* sin_p, void* logits_p, int n_threads) {
  using T = typename A::T;
  const int64_t D = m.D, I = m.I, H = m.H, Hkv = m.Hkv, hd = m.hd, V = m.V, S = m.max_seq;
  const int64_t NQ = H * hd, NK = Hkv * hd, NQKV = NQ + 2 * NK, group = H / Hkv;
  const float scale = 1.f / std::sqrt(float(hd));
  const T* cos = static_cast<const T*>(cos_p);  // [R, hd]
  const T* sin = static_cast<const T*>(sin_p);
  T* logits = static_cast<T*>(logits_p);  // [R, V]
  int64_t max_len = 0;
  for (int64_t r = 0; r < R; ++r) max_len = std::max(max_len, pos[r] + 1);

  std::vector<float> h(R * D), y(R * D), qkv(R * NQKV), gate(R * I), up(R * I), scores(R * H * max_len);
  std::vector<T> x(R * std::max(D, H * hd)), att(R * NQ), act(R * I);
  const int64_t tq = tiles(NQ), tk = tiles(NK), t_attn = tq + 2 * tk;
  // the inputs of quantised matrices in the forms their products read, made once per input and step
  QuantScratch quant(R, std::max({D, NQ, I}), m.quantised, m.int8_inputs);
  // grouped attention: a supported group and head size, and R * Hkv work items that split evenly or
  // are plenty for the threads (at batch 1 on several threads, head by head balances better)
  // packed copies serve batches of bf16 rows (at batch 1 the row-major stream is the faster one)
#ifdef IDEFICS3_HAVE_AMX
  const bool amx = std::is_same<A, BF16>::value && !m.quantised && m.amx_min_rows > 0 && R >= m.amx_min_rows &&
                   D % 32 == 0 && NQ % 32 == 0 && I % 32 == 0;
  std::vector<uint16_t> pairs(amx ? (R + 15) / 16 * std::min<int64_t>(R, 16) * std::max({D, NQ, I}) : 0);
  uint16_t* pairs_p = amx ? pairs.data() : nullptr;  // x in AMX's layout: the B tiles
#else
  const bool amx = false;
  uint16_t* pairs_p = nullptr;
#endif
  const bool packed = !amx && !m.quantised && std::is_same<A, BF16>::value && R >= 2 && m.plm_head != nullptr;
  const bool grouped = group >= 2 && group <= 4 && hd <= 128 && H == group * Hkv &&
                       ((R * Hkv) % n_threads == 0 || R * Hkv >= 4 * int64_t(n_threads));

  std::vector<float> inv(R * H);  // 1 / softmax sums of each (row, head), between the two AMX attention passes
#pragma omp parallel num_threads(n_threads)
  {
#ifdef IDEFICS3_HAVE_AMX
    if (amx) amx::configure(int(std::min<int64_t>(R, amx::MAXB)));
#endif
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) embed_row<A>(m, ids[r], &h[r * D]);
    for (int64_t l = 0; l < m.n_layers; ++l) {
      const Layer& L = m.layers[l];
      const bool quant_qkv = !(L.wq.dense() && L.wk.dense() && L.wv.dense()), quant_gu = !(L.wg.dense() && L.wu.dense());
      const QuantInput in_x = quant.view(D), in_att = quant.view(NQ), in_act = quant.view(I);
      T* kc = static_cast<T*>(L.kc);
      T* vc = static_cast<T*>(L.vc);
      // the keys and values pair idx = (kv head, row) reads: its own slot's, and below `shared` those of the
      // slot it names
      const auto key_range = [&](int64_t idx) {
        const int64_t kvh = idx / R, r = idx % R;
        const int64_t slot = slots ? slots[r] : r, src = shared ? shared[2 * r] : slot;
        const int64_t own = (slot * Hkv + kvh) * S * hd, other = (src * Hkv + kvh) * S * hd;
        return KeyRange<T>{kc + other, vc + other, kc + own, vc + own, shared ? shared[2 * r + 1] : 0, pos[r] + 1};
      };
      // the previous layer's MLP residual, then this layer's input norm
#pragma omp for schedule(static)
      for (int64_t r = 0; r < R; ++r) {
        add_then_norm<A>(&h[r * D], l > 0 ? &y[r * D] : nullptr, static_cast<const T*>(L.ln1), D, m.eps, &x[r * D]);
        if (quant_qkv) quant.prepare_row<A>(x.data(), D, r);
      }
      // q, k, v: one loop over the tiles of the three matrices (or of their packed stack)
      if (amx) {
        linear<A>(false, L.wq, nullptr, NQ, D, x.data(), in_x, R, Sink<A>{qkv.data(), NQKV, Store::Round}, pairs_p);
        // k and v read the pairs q just made of the same x
        linear<A>(false, L.wk, nullptr, NK, D, x.data(), in_x, R, Sink<A>{qkv.data() + NQ, NQKV, Store::Round},
                  pairs_p, true);
        linear<A>(false, L.wv, nullptr, NK, D, x.data(), in_x, R,
                  Sink<A>{qkv.data() + NQ + NK, NQKV, Store::Round}, pairs_p, true);
      } else if (packed) {
        linear<A>(true, Weight{}, L.pqkv, NQKV, D, x.data(), in_x, R, Sink<A>{qkv.data(), NQKV, Store::Round});
      } else {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < t_attn; ++t) {
          const Weight& W = t < tq ? L.wq : t < tq + tk ? L.wk : L.wv;
          const int64_t base = t < tq ? 0 : t < tq + tk ? NQ : NQ + NK;
          const int64_t tt = t < tq ? t : t < tq + tk ? t - tq : t - tq - tk;
          const Sink<A> emit{qkv.data() + base, NQKV, Store::Round};
          weight_tile<A>(W, base == 0 ? NQ : NK, D, tt, x.data(), in_x, R, emit);
        }
      }
      // RoPE on q and k heads; k and v go into the cache at (slot, head, position)
#pragma omp for schedule(static)
      for (int64_t idx = 0; idx < R * (H + 2 * Hkv); ++idx) {
        const int64_t r = idx / (H + 2 * Hkv), j = idx % (H + 2 * Hkv);
        float* v = &qkv[r * NQKV + j * hd];
        if (j < H + Hkv) rope<A>(v, cos + r * hd, sin + r * hd, hd);
        if (j >= H) {
          const int64_t slot = slots ? slots[r] : r;
          const int64_t kvh = j < H + Hkv ? j - H : j - H - Hkv;
          T* dst = (j < H + Hkv ? kc : vc) + ((slot * Hkv + kvh) * S + pos[r]) * hd;
          for (int64_t d = 0; d < hd; d += 16) A::store16(dst + d, _mm512_maskz_loadu_ps(lanes(hd - d), v + d), lanes(hd - d));
        }
      }
      // attention of each query head over its slot's positions 0..pos (two-pass softmax in fp32); with
      // enough (row, kv head) pairs to keep the threads busy, the query heads of a kv head go together,
      // kv head by kv head, so that rows sharing a prompt's keys (`shared`) read them from cache
      if (grouped) {
        // on AMX: the scores on tiles; for head size 64 also P.V, in a second pass over the same (row, kv head)
        // pairs (their exp(scores) kept in `scores`, 1/sums in `inv`), since its tiles take another shape
        const bool pv_tiles = amx && hd == 64;
#ifdef IDEFICS3_HAVE_AMX
        if (amx) amx::configure_scores(int(group));  // scores on tiles (head sizes 64, 128), then products again
#endif
#pragma omp for schedule(static)
        for (int64_t idx = 0; idx < R * Hkv; ++idx) {
          const int64_t kvh = idx / R, r = idx % R;
          const KeyRange<T> keys = key_range(idx);
          float o[4 * 128];
          const bool later = pv_tiles && keys.n >= 32;
          attend_group_any<A>(group, hd, &qkv[r * NQKV + kvh * group * hd], keys, scale,
                              &scores[idx * group * max_len], o, amx, later ? &inv[idx * group] : nullptr);
          if (!later)
            for (int64_t d = 0; d < group * hd; d += 16)
              A::store16(&att[r * NQ + kvh * group * hd + d], _mm512_maskz_loadu_ps(lanes(group * hd - d), o + d),
                         lanes(group * hd - d));
        }
#ifdef IDEFICS3_HAVE_AMX
        if constexpr (std::is_same<A, BF16>::value)
          if (pv_tiles) {
            amx::configure_values(int(group));
#pragma omp for schedule(static)
            for (int64_t idx = 0; idx < R * Hkv; ++idx) {
              const int64_t kvh = idx / R, r = idx % R;
              const KeyRange<T> keys = key_range(idx);
              if (keys.n < 32) continue;  // done in the first pass
              float o[4 * 64];
              switch (group) {
                case 2: values_amx<2>(&scores[idx * group * max_len], keys, &inv[idx * group], o); break;
                case 3: values_amx<3>(&scores[idx * group * max_len], keys, &inv[idx * group], o); break;
                default: values_amx<4>(&scores[idx * group * max_len], keys, &inv[idx * group], o); break;
              }
              for (int64_t d = 0; d < group * hd; d += 16)
                A::store16(&att[r * NQ + kvh * group * hd + d], _mm512_loadu_ps(o + d), 0xffff);
            }
          }
        if (amx) amx::configure(int(std::min<int64_t>(R, amx::MAXB)));
#endif
      } else {
#pragma omp for schedule(static)
        for (int64_t idx = 0; idx < R * H; ++idx) {
          const int64_t r = idx / H, head = idx % H, kvh = head / group, n = pos[r] + 1;
          const int64_t slot = slots ? slots[r] : r;
          const float* q = &qkv[r * NQKV + head * hd];
          const T* K = kc + (slot * Hkv + kvh) * S * hd;
          const T* Vc = vc + (slot * Hkv + kvh) * S * hd;
          float o[512];
          attend_any<A>(hd, q, K, Vc, n, scale, &scores[idx * max_len], o);
          for (int64_t d = 0; d < hd; d += 16)
            A::store16(&att[r * NQ + head * hd + d], _mm512_maskz_loadu_ps(lanes(hd - d), o + d), lanes(hd - d));
        }
      }
      if (!L.wo.dense()) {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) quant.prepare_row<A>(att.data(), NQ, r);
      }
      linear<A>(packed, L.wo, L.po, D, NQ, att.data(), in_att, R, Sink<A>{y.data(), D, Store::Keep}, pairs_p);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < R; ++r) {
        add_then_norm<A>(&h[r * D], &y[r * D], static_cast<const T*>(L.ln2), D, m.eps, &x[r * D]);
        if (quant_gu) quant.prepare_row<A>(x.data(), D, r);
      }
      // gate and up for 16 columns (4 row-major tiles, one packed tile of the interleaved gate|up, or one AMX
      // block of each), then SiLU(gate) * up for those columns
#ifdef IDEFICS3_HAVE_AMX
      if constexpr (std::is_same<A, BF16>::value)
        if (amx) amx::to_pairs(x.data(), R, D, pairs_p);
#endif
#pragma omp for schedule(static)
      for (int64_t t = 0; t < (I + 15) / 16; ++t) {
        const int64_t n0 = 16 * t, count = std::min<int64_t>(16, I - n0);
        if constexpr (std::is_same<A, BF16>::value) {
#ifdef IDEFICS3_HAVE_AMX
          if (amx) gate_up_amx<A>(static_cast<const T*>(L.wg.data) + n0 * D, static_cast<const T*>(L.wu.data) + n0 * D, D,
                                  pairs_p, R, n0, Sink<A>{gate.data(), I, Store::Round},
                                  Sink<A>{up.data(), I, Store::Round});
#endif
          if (packed) {
            const GateUp<A> emit_gu{{gate.data(), I, Store::Round}, {up.data(), I, Store::Round}, n0, int(count)};
            packed_tile(L.pgu, 2 * ((I + 15) / 16) * 16, D, t, x.data(), R, emit_gu);
          }
        }
        if (!packed && !amx) {
          const Sink<A> emit_g{gate.data(), I, Store::Round}, emit_u{up.data(), I, Store::Round};
          for (int64_t tt = 4 * t; tt < std::min(tiles(I), 4 * t + 4); ++tt) {
            weight_tile<A>(L.wg, I, D, tt, x.data(), in_x, R, emit_g);
            weight_tile<A>(L.wu, I, D, tt, x.data(), in_x, R, emit_u);
          }
        }
        for (int64_t r = 0; r < R; ++r) silu_times<A>(&gate[r * I + n0], &up[r * I + n0], count, &act[r * I + n0]);
      }
      if (!L.wd.dense()) {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) quant.prepare_row<A>(act.data(), I, r);
      }
      linear<A>(packed, L.wd, L.pd, D, I, act.data(), in_act, R, Sink<A>{y.data(), D, Store::Keep}, pairs_p);
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      add_then_norm<A>(&h[r * D], &y[r * D], static_cast<const T*>(m.norm), D, m.eps, &x[r * D]);
      if (!m.lm_head.dense()) quant.prepare_row<A>(x.data(), D, r);
    }
    linear<A>(packed, m.lm_head, m.plm_head, V, D, x.data(), quant.view(D), R,
              Sink<A>{logits, V, Store::Cast}, pairs_p);
#ifdef IDEFICS3_HAVE_AMX
    if (amx) amx::release();
#endif
  }
}

}  // namespace

extern "C" {

// 0 where this build has AMX code and Linux gave the process the tile state, 1 without AMX code, 2 refused.
int idefics3_amx_init() {
#ifdef IDEFICS3_HAVE_AMX
  static const int state = amx::init();
  return state;
#else
  return 1;
#endif
}

// bf16 steps of at least min_rows rows take AMX tiles (0: never); call only after idefics3_amx_init() == 0.
void idefics3_decoder_set_amx(void* handle, int64_t min_rows) { static_cast<Model*>(handle)->amx_min_rows = min_rows; }

// Quantised products take x rounded to int8 per run of 32 (cpu_decode_quant_vnni.h; needs AVX512-VNNI) or not.
void idefics3_decoder_set_int8_inputs(void* handle, int on) { static_cast<Model*>(handle)->int8_inputs = on != 0; }

// out [N, K] = a quantised W (one Weight table) dequantised in fp32 (out_dtype 0) or bf16 (1), a run of 32 per
// pair of vectors (dequantize_runs): what a prefill multiplies quantised layers with (kernels/quant_prefill.py).
void idefics3_dequantize(const int64_t* weight, int64_t N, int64_t K, void* out, int out_dtype, int n_threads) {
  const Weight w = weight_from(weight);
  if (out_dtype == 0) {
    dequantize_matrix(w, N, K, out, out_dtype, n_threads, dequantize_row16);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t n = 0; n < N; ++n) dequantize_row_bf16(w, n, K, static_cast<uint16_t*>(out) + n * K);
}

// y [R, N] (bf16) = x [R, K] (bf16) W^T for one quantised W (a Weight table) on AMX tiles, the weights
// dequantised to bf16 a block of rows at a time in cache (cpu_decode_quant_amx.h): 0, or 1 where this build has no
// AMX code, Linux refused the tile state, or K is not a multiple of 32.
int idefics3_quant_matmul_amx(const int64_t* weight, int64_t N, int64_t K, const void* x, int64_t R, void* y,
                              int n_threads) {
#ifdef IDEFICS3_HAVE_AMX
  if (K % 32 != 0 || R < 1 || idefics3_amx_init() != 0) return 1;
  quant_matmul_amx(weight_from(weight), N, K, static_cast<const uint16_t*>(x), R, static_cast<uint16_t*>(y),
                   n_threads);
  return 0;
#else
  (void)weight, (void)N, (void)K, (void)x, (void)R, (void)y, (void)n_threads;
  return 1;
#endif
}

// y [R, N] (fp32) = x [R, K] (fp32) W^T for one quantised W (a Weight table of kWeightFields, N rows): the
// quantised products alone, for tests and benchmarks, with int8 inputs or not.
void idefics3_quant_linear(const int64_t* weight, int64_t N, int64_t K, const float* x, int64_t R, float* y,
                           int int8_inputs, int n_threads) {
  const Weight W = weight_from(weight);
  QuantScratch quant(R, K, true, int8_inputs != 0);
  for (int64_t r = 0; r < R; ++r) quant.prepare_row<F32>(x, K, r);
  const QuantInput in = quant.view(K);
  const Sink<F32> emit{{y, N, Store::Keep}};
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t t = 0; t < tiles(N); ++t) quant_rows(W, t * NR, std::min(N, t * NR + NR), in, R, emit);
}

// One decode step of R rows; returns 0, or 1 (token id), 2 (position), 3 (slot), 4 (shared) for an
// out-of-range input. shared: null, or R pairs (slot, length): positions 0..length-1 of row r's keys and
// values may be read from that slot, which holds the same ones (rows decoding from one prompt); the row's own
// slot must hold them too, since the head-by-head path reads only that.
int idefics3_decoder_step(void* handle, int64_t R, const int64_t* ids, const int64_t* pos, const int64_t* slots,
                          const int64_t* shared, const void* cos, const void* sin, void* logits, int n_threads) {
  const Model& m = *static_cast<Model*>(handle);
  if (const int rc = check_step_inputs(m, R, ids, pos, slots, shared)) return rc;
  if (m.dtype == 1)
    step<BF16>(m, R, ids, pos, slots, shared, cos, sin, logits, n_threads);
  else
    step<F32>(m, R, ids, pos, slots, shared, cos, sin, logits, n_threads);
  return 0;
}

}  // extern "C"
