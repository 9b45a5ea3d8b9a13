// One fused decode step of the Llama text decoder on x86 CPUs that stop at AVX2 + FMA + F16C.
//
// Why: cpu_decode.cpp needs AVX-512 (and AVX512-BF16 for bf16 weights), which many laptops lack (Intel client
// CPUs since 12th gen, AMD before Zen 4); without it they would decode through eager PyTorch, which at batch 1
// reaches a fraction of the memory bandwidth. This file is the same step (embedding, all layers, final norm,
// lm_head in one OpenMP parallel region, every weight matrix streamed once and each weight load serving all
// batch rows) with 256-bit AVX2 + FMA only. It exports the same C ABI (cpu_decode.py loads it as the "avx2"
// variant); there are no packed copies here (set_packed keeps its pointers and nothing reads them).
//
// bf16 weights are widened to fp32 in registers (each 16-bit word becomes the high half of a 32-bit lane:
// exact) and multiplied with fp32 activations; products of bf16 values are exact in fp32, so only the order of
// the sums differs from the AVX-512 build. Numerics follow the plain PyTorch path: fp32 accumulation
// everywhere, RMSNorm and softmax in fp32, and in bf16 the values are rounded to bf16 at the same points where
// the plain path stores a bf16 tensor (norm output, projections, RoPE, residual stream, SiLU*up, logits). The
// activations that feed the matrix products are kept as fp32 holding those rounded values (so only weights
// need widening), in the lane order in which a bf16 weight vector widens (to_matrix_order). The weight stream
// is prefetched in software (PFD), which makes up for the narrower loads. Quantised matrices (int8, int4:
// cpu_decode_quant_avx2.h) are streamed as stored and dequantised in registers.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_decode_model.h"  // Layer, Model, bf16 scalars, create / set_packed / destroy, input checks

namespace {

// Element traits: storage type T; load8: 8 elements widened to fp32 in order; load16: 16 elements as two fp32
// vectors in "matrix order", the order in which the matrix products read their activation rows (see
// BF16::load16), which to_matrix_order gives a row of whole blocks of 16 (a tail of fewer stays in order).
struct F32 {
  using T = float;
  static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  static void load16(const T* p, __m256& lo, __m256& hi) { lo = _mm256_loadu_ps(p); hi = _mm256_loadu_ps(p + 8); }
  static void to_matrix_order(float*, int64_t) {}
  static float to_f(T v) { return v; }
  static T from_f(float v) { return v; }
  static float round(float v) { return v; }
};

struct BF16 {
  using T = uint16_t;
  static __m256 load8(const T* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  // 16 elements widened by interleaving their 16-bit words with zeros (one shuffle per 8 and no shift, where
  // load8 takes a shuffle and a shift): lo holds elements 0-3, 8-11, hi 4-7, 12-15
  static void load16(const T* p, __m256& lo, __m256& hi) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), z = _mm256_setzero_si256();
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, w));
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, w));
  }
  // load16's order for an activation row: in each whole block of 16, elements 4-7 and 8-11 change places
  static void to_matrix_order(float* x, int64_t n) {
    for (int64_t b = 0; b + 16 <= n; b += 16) {
      const __m128 a = _mm_loadu_ps(x + b + 4);
      _mm_storeu_ps(x + b + 4, _mm_loadu_ps(x + b + 8));
      _mm_storeu_ps(x + b + 8, a);
    }
  }
  static float to_f(T v) { return bf16_to_float(v); }
  static T from_f(float v) { return float_to_bf16(v); }
  static float round(float v) { return bf16_to_float(float_to_bf16(v)); }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// The sums of 8 vectors, in order, as one vector.
inline __m256 sums8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [a..d low halves | a..d high halves]
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

constexpr int NR = 4;  // weight rows per tile: the unit of work split between threads
constexpr int RB = 4;  // batch rows served by one pass over a weight row (8 accumulators + 2 weights in 16 ymm)
// Software prefetch distance in the weight stream, in bytes (a thread's tiles are contiguous, so this runs
// into its next rows; past the end of a matrix it is a harmless hint). Measured on one thread of a Sapphire
// Rapids core, SmolVLM-256M shapes, batch 1: 256-bit code holds half the cache lines in flight that 512-bit
// code does, and without it the step took 1.2x as long (bf16 and fp32); 2 to 8 KB did equally well.
constexpr int PFD = 2048;

// out[r] = dot(w, x[r, :]) for r < rb, x in fp32 and matrix order (see F32). The row is streamed once, front to
// back, and each of its loads feeds all rb batch rows; nv (even) accumulators per batch row hide the FMA
// latency when rb is small.
template <class A, int rb, int nv>
inline void dot_row(const typename A::T* w, int64_t K, const float* x, int64_t xs, float* out) {
  __m256 acc[rb][nv];
  for (int r = 0; r < rb; ++r)
    for (int a = 0; a < nv; ++a) acc[r][a] = _mm256_setzero_ps();
  int64_t k = 0;
  constexpr int lines = std::max<int>(1, 8 * nv * sizeof(typename A::T) / 64);
  for (; k + 8 * nv <= K; k += 8 * nv) {
    for (int i = 0; i < lines; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + k) + PFD + 64 * i, _MM_HINT_T0);
    for (int a = 0; a < nv; a += 2) {
      __m256 lo, hi;
      A::load16(w + k + 8 * a, lo, hi);
      for (int r = 0; r < rb; ++r) {
        acc[r][a] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + r * xs + k + 8 * a), acc[r][a]);
        acc[r][a + 1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + r * xs + k + 8 * a + 8), acc[r][a + 1]);
      }
    }
  }
  for (; k + 16 <= K; k += 16) {
    __m256 lo, hi;
    A::load16(w + k, lo, hi);
    for (int r = 0; r < rb; ++r) {
      acc[r][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + r * xs + k), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + r * xs + k + 8), acc[r][1]);
    }
  }
  for (; k + 8 <= K; k += 8) {  // the tail after the whole blocks of 16, in natural order
    const __m256 wv = A::load8(w + k);
    for (int r = 0; r < rb; ++r) acc[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * xs + k), acc[r][0]);
  }
  for (int r = 0; r < rb; ++r) {
    __m256 sum = acc[r][0];
    for (int a = 1; a < nv; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
    out[r] = hsum(sum);
  }
  for (; k < K; ++k)
    for (int r = 0; r < rb; ++r) out[r] += A::to_f(w[k]) * x[r * xs + k];
}

// Tile t (rows t*NR .. min(N, t*NR+NR)) of y = x W^T for the R rows of x [R, K]: emit(r, n, value).
template <class A, class Emit>
inline void gemv_tile(const typename A::T* W, int64_t N, int64_t K, int64_t t, const float* x, int64_t R,
                      const Emit& emit) {
  float out[RB];
  for (int64_t n = t * NR; n < std::min(N, t * NR + NR); ++n) {
    const typename A::T* w = W + n * K;
    for (int64_t r0 = 0; r0 < R; r0 += RB) {
      const int rb = int(std::min<int64_t>(RB, R - r0));
      const float* xr = x + r0 * K;
      switch (rb) {
        case 4: dot_row<A, 4, 2>(w, K, xr, K, out); break;
        case 3: dot_row<A, 3, 2>(w, K, xr, K, out); break;
        case 2: dot_row<A, 2, 4>(w, K, xr, K, out); break;
        default: dot_row<A, 1, 4>(w, K, xr, K, out); break;
      }
      for (int r = 0; r < rb; ++r) emit(r0 + r, n, out[r]);
    }
  }
}

inline int64_t tiles(int64_t n) { return (n + NR - 1) / NR; }

#include "cpu_decode_quant_avx2.h"  // QuantInput, QuantScratch, quant_rows: int8 / int4 weights

template <class A>
using Sink = ScalarSink<A>;  // cpu_decode_model.h: outputs stored per element

// Tile t of y = x W^T for a dense or quantised W (`in`: x as the quantised products read it, prepared this step
// where W is quantised).
template <class A, class Emit>
inline void weight_tile(const Weight& W, int64_t N, int64_t K, int64_t t, const float* x, const QuantInput& in,
                        int64_t R, const Emit& emit) {
  if (W.dense()) {
    gemv_tile<A>(static_cast<const typename A::T*>(W.data), N, K, t, x, R, emit);
    return;
  }
  quant_rows(W, t * NR, std::min(N, t * NR + NR), in, R, emit);
}

// y = x W^T inside the caller's parallel region (an orphaned `omp for`).
template <class A, class Emit>
inline void linear(const Weight& W, int64_t N, int64_t K, const float* x, const QuantInput& in, int64_t R,
                   const Emit& emit) {
#pragma omp for schedule(static)
  for (int64_t t = 0; t < tiles(N); ++t) weight_tile<A>(W, N, K, t, x, in, R, emit);
}

// RMSNorm of one row in fp32: out = round(w * round(h * rsqrt(mean(h^2) + eps))), kept as fp32 in matrix order.
template <class A>
inline void rms_norm(const float* h, const typename A::T* w, int64_t D, float eps, float* out) {
  float ss = 0.f;
  for (int64_t i = 0; i < D; ++i) ss += h[i] * h[i];
  const float rs = 1.f / std::sqrt(ss / float(D) + eps);
  for (int64_t i = 0; i < D; ++i) out[i] = A::round(A::to_f(w[i]) * A::round(h[i] * rs));
  A::to_matrix_order(out, D);
}

// The residual add of a sublayer's output (y, or none before the first layer) into the stream h, rounded as
// the plain path stores it, then the next RMSNorm of that row into out.
template <class A>
inline void add_then_norm(float* h, const float* y, const typename A::T* w, int64_t D, float eps, float* out) {
  if (y != nullptr)
    for (int64_t i = 0; i < D; ++i) h[i] = A::round(h[i] + A::round(y[i]));
  rms_norm<A>(h, w, D, eps, out);
}

// Half-split RoPE of one head in place (x holds values already rounded to T), as the plain path does it.
template <class A>
inline void rope(float* x, const typename A::T* cos, const typename A::T* sin, int64_t hd) {
  const int64_t half = hd / 2;
  float tmp[512];
  for (int64_t i = 0; i < hd; ++i) {
    const float rot = i < half ? -x[i + half] : x[i - half];
    tmp[i] = A::round(A::round(x[i] * A::to_f(cos[i])) + A::round(rot * A::to_f(sin[i])));
  }
  std::memcpy(x, tmp, hd * sizeof(float));
}

// exp(x) for 8 lanes: range reduction to r in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial (relative
// error ~2e-7, about libm's exp in fp32), times 2^n built in the exponent bits (n in [-126, 127] after the
// clamp, so always a normal number); inputs below -87 give ~1e-38 instead of 0. As exp16 in cpu_decode.cpp.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// f applied to v[0..n) in place, 8 lanes at a time (the tail through a zero-padded copy); returns the sum of
// the results.
template <class F>
inline float map8(float* v, int64_t n, const F& f) {
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = f(_mm256_loadu_ps(v + t));
    _mm256_storeu_ps(v + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  if (t < n) {
    alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, v + t, (n - t) * sizeof(float));
    _mm256_store_ps(tmp, f(_mm256_load_ps(tmp)));
    for (int64_t i = 0; i < n - t; ++i) sum += v[t + i] = tmp[i];
  }
  return sum;
}

// The keys and values of one (row, kv head) at positions 0..n-1, indexed by position: those below `shared`
// are read from K0/V0 (another slot holding the same prompt, see idefics3_decoder_step), the rest from K/V.
// Rows that decode from one prompt then read its keys once for all of them (kept in cache between rows).
template <class T>
struct KeyRange {
  const T *K0, *V0, *K, *V;
  int64_t shared, n;
  const T* v(int64_t t, int64_t hd) const { return (t < shared ? V0 : V) + t * hd; }
};

// s[t] = q . K[t] for t < n (q already scaled; hd = 8 * nv): 8 keys per reduction, q read from L1.
template <class A, int nv>
inline void scores(const float* q, const typename A::T* K, int64_t n, float* s) {
  constexpr int64_t hd = 8 * nv;
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int v = 0; v < nv; ++v) {
      const __m256 qv = _mm256_loadu_ps(q + 8 * v);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, A::load8(K + (t + j) * hd + 8 * v), acc[j]);
    }
    _mm256_storeu_ps(s + t, sums8(acc));
  }
  for (; t < n; ++t) {
    __m256 acc = _mm256_setzero_ps();
    for (int v = 0; v < nv; ++v) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * v), A::load8(K + t * hd + 8 * v), acc);
    s[t] = hsum(acc);
  }
}

// out[0 .. 8W) = inv * sum_t p[t] V[t][c0 .. c0 + 8W) over the value rows of kv: W vectors of the output
// in registers (two sets, even and odd positions, when W is small, to hide the FMA latency).
template <class A, int W>
inline void values(const float* p, const KeyRange<typename A::T>& kv, int64_t hd, int64_t c0, float inv,
                   float* out) {
  constexpr int U = W <= 4 ? 2 : 1;
  __m256 o[U][W];
  for (int u = 0; u < U; ++u)
    for (int w = 0; w < W; ++w) o[u][w] = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + U <= kv.n; t += U)
    for (int u = 0; u < U; ++u) {
      const __m256 pv = _mm256_set1_ps(p[t + u]);
      const typename A::T* row = kv.v(t + u, hd) + c0;
      for (int w = 0; w < W; ++w) o[u][w] = _mm256_fmadd_ps(pv, A::load8(row + 8 * w), o[u][w]);
    }
  for (; t < kv.n; ++t) {
    const __m256 pv = _mm256_set1_ps(p[t]);
    for (int w = 0; w < W; ++w) o[0][w] = _mm256_fmadd_ps(pv, A::load8(kv.v(t, hd) + c0 + 8 * w), o[0][w]);
  }
  for (int w = 0; w < W; ++w) {
    __m256 sum = o[0][w];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, o[u][w]);
    _mm256_storeu_ps(out + 8 * w, _mm256_mul_ps(sum, _mm256_set1_ps(inv)));
  }
}

// One query head over positions 0..n-1 of its kv head: out = softmax(q K^T * scale) V, in fp32, with the
// two-pass softmax of the plain path. hd = 8 * nv; s: scratch for n scores.
template <class A, int nv>
void attend(const float* q, const KeyRange<typename A::T>& kv, float scale, float* s, float* out) {
  constexpr int64_t hd = 8 * nv;
  float qs[hd];
  for (int64_t d = 0; d < hd; ++d) qs[d] = q[d] * scale;
  const int64_t n = kv.n, n0 = std::min(kv.shared, n);
  if (n0 > 0) scores<A, nv>(qs, kv.K0, n0, s);  // the shared positions, then the row's own
  if (n > n0) scores<A, nv>(qs, kv.K + n0 * hd, n - n0, s + n0);
  __m256 mx = _mm256_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + t));
  float m = hmax(mx);
  for (; t < n; ++t) m = std::max(m, s[t]);
  const __m256 mv = _mm256_set1_ps(m);
  const float inv = 1.f / map8(s, n, [&](__m256 x) { return exp8(_mm256_sub_ps(x, mv)); });
  for (int64_t c = 0; c < nv; c += 8) {  // 8 output vectors (64 dimensions) at a time
    switch (std::min(nv - c, int64_t(8))) {
      case 8: values<A, 8>(s, kv, hd, 8 * c, inv, out + 8 * c); break;
      case 4: values<A, 4>(s, kv, hd, 8 * c, inv, out + 8 * c); break;
      default: values<A, 2>(s, kv, hd, 8 * c, inv, out + 8 * c); break;
    }
  }
}

template <class A>
void attend_any(int64_t hd, const float* q, const KeyRange<typename A::T>& kv, float scale, float* s, float* out) {
  switch (hd / 8) {
    case 2: return attend<A, 2>(q, kv, scale, s, out);
    case 4: return attend<A, 4>(q, kv, scale, s, out);
    case 8: return attend<A, 8>(q, kv, scale, s, out);
    case 12: return attend<A, 12>(q, kv, scale, s, out);
    case 16: return attend<A, 16>(q, kv, scale, s, out);
    case 32: return attend<A, 32>(q, kv, scale, s, out);
    default: return;  // excluded by the Python side (SUPPORTED_HEAD_DIMS)
  }
}

// act[n] = round(round(silu(gate[n])) * up[n]) for n < count (gate and up already rounded to T), kept as fp32
// (in matrix order: a whole block of 16 when count is 16).
template <class A>
void silu_times(const float* gate, const float* up, int64_t count, float* act) {
  float sg[16];
  std::memcpy(sg, gate, count * sizeof(float));
  map8(sg, count, [](__m256 g) {
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  });
  for (int64_t i = 0; i < count; ++i) act[i] = A::round(A::round(sg[i]) * up[i]);
  A::to_matrix_order(act, count);
}

}  // namespace

namespace {

template <class A>
void step(const Model& m, int64_t R, const int64_t* ids, const int64_t* pos, const int64_t* slots,
          const int64_t* shared, const void* cos_p, const void* sin_p, void* logits_p, int n_threads) {
  using T = typename A::T;
  const int64_t D = m.D, I = m.I, H = m.H, Hkv = m.Hkv, hd = m.hd, V = m.V, S = m.max_seq;
  const int64_t NQ = H * hd, NK = Hkv * hd, NQKV = NQ + 2 * NK, group = H / Hkv;
  const float scale = 1.f / std::sqrt(float(hd));
  const T* cos = static_cast<const T*>(cos_p);  // [R, hd]
  const T* sin = static_cast<const T*>(sin_p);
  int64_t max_len = 0;
  for (int64_t r = 0; r < R; ++r) max_len = std::max(max_len, pos[r] + 1);

  // fp32 throughout; x, att and act (the inputs of matrix products) hold values rounded to T, in matrix order
  std::vector<float> h(R * D), y(R * D), x(R * D), qkv(R * NQKV), att(R * NQ), gate(R * I), up(R * I),
      act(R * I), scores(R * H * max_len);
  const int64_t tq = tiles(NQ), tk = tiles(NK), t_attn = tq + 2 * tk;
  // the inputs of quantised matrices in the forms their products read, made once per input and step
  QuantScratch quant(R, std::max({D, NQ, I}), m.quantised);

#pragma omp parallel num_threads(n_threads)
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) embed_row<A>(m, ids[r], &h[r * D]);
    for (int64_t l = 0; l < m.n_layers; ++l) {
      const Layer& L = m.layers[l];
      const bool quant_qkv = !(L.wq.dense() && L.wk.dense() && L.wv.dense()), quant_gu = !(L.wg.dense() && L.wu.dense());
      const QuantInput in_x = quant.view(D), in_att = quant.view(NQ), in_act = quant.view(I);
      T* kc = static_cast<T*>(L.kc);
      T* vc = static_cast<T*>(L.vc);
      // the previous layer's MLP residual, then this layer's input norm
#pragma omp for schedule(static)
      for (int64_t r = 0; r < R; ++r) {
        add_then_norm<A>(&h[r * D], l > 0 ? &y[r * D] : nullptr, static_cast<const T*>(L.ln1), D, m.eps, &x[r * D]);
        if (quant_qkv) quant.prepare_row<A>(x.data(), D, r);
      }
      // q, k, v: one loop over the tiles of the three matrices
#pragma omp for schedule(static)
      for (int64_t t = 0; t < t_attn; ++t) {
        const Weight& W = t < tq ? L.wq : t < tq + tk ? L.wk : L.wv;
        const int64_t base = t < tq ? 0 : t < tq + tk ? NQ : NQ + NK;
        const int64_t tt = t < tq ? t : t < tq + tk ? t - tq : t - tq - tk;
        weight_tile<A>(W, base == 0 ? NQ : NK, D, tt, x.data(), in_x, R,
                       Sink<A>{qkv.data() + base, NQKV, Store::Round});
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
          for (int64_t d = 0; d < hd; ++d) dst[d] = A::from_f(v[d]);
        }
      }
      // attention of each query head over its slot's positions 0..pos (two-pass softmax in fp32), ordered kv
      // head, row, query head of the group: the group's heads read the same keys and values one after the
      // other (from L1/L2), and rows sharing a prompt's keys (`shared`) read them from one slot in turn
#pragma omp for schedule(static)
      for (int64_t idx = 0; idx < R * H; ++idx) {
        const int64_t kvh = idx / (R * group), r = idx / group % R, head = kvh * group + idx % group;
        const int64_t slot = slots ? slots[r] : r, src = shared ? shared[2 * r] : slot;
        const int64_t own = (slot * Hkv + kvh) * S * hd, other = (src * Hkv + kvh) * S * hd;
        const KeyRange<T> keys{kc + other, vc + other, kc + own, vc + own, shared ? shared[2 * r + 1] : 0,
                               pos[r] + 1};
        float o[256];
        attend_any<A>(hd, &qkv[r * NQKV + head * hd], keys, scale, &scores[(r * H + head) * max_len], o);
        for (int64_t d = 0; d < hd; ++d) att[r * NQ + head * hd + d] = A::round(o[d]);
        A::to_matrix_order(&att[r * NQ + head * hd], hd);  // hd is a multiple of 16: the row's own blocks
      }
      if (!L.wo.dense()) {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) quant.prepare_row<A>(att.data(), NQ, r);
      }
      linear<A>(L.wo, D, NQ, att.data(), in_att, R, Sink<A>{y.data(), D, Store::Keep});
#pragma omp for schedule(static)
      for (int64_t r = 0; r < R; ++r) {
        add_then_norm<A>(&h[r * D], &y[r * D], static_cast<const T*>(L.ln2), D, m.eps, &x[r * D]);
        if (quant_gu) quant.prepare_row<A>(x.data(), D, r);
      }
      // gate and up for 16 columns (4 tiles of each), then SiLU(gate) * up for those columns
#pragma omp for schedule(static)
      for (int64_t t = 0; t < (I + 15) / 16; ++t) {
        const int64_t n0 = 16 * t, count = std::min<int64_t>(16, I - n0);
        const Sink<A> emit_g{gate.data(), I, Store::Round}, emit_u{up.data(), I, Store::Round};
        for (int64_t tt = 4 * t; tt < std::min(tiles(I), 4 * t + 4); ++tt) {
          weight_tile<A>(L.wg, I, D, tt, x.data(), in_x, R, emit_g);
          weight_tile<A>(L.wu, I, D, tt, x.data(), in_x, R, emit_u);
        }
        for (int64_t r = 0; r < R; ++r) silu_times<A>(&gate[r * I + n0], &up[r * I + n0], count, &act[r * I + n0]);
      }
      if (!L.wd.dense()) {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) quant.prepare_row<A>(act.data(), I, r);
      }
      linear<A>(L.wd, D, I, act.data(), in_act, R, Sink<A>{y.data(), D, Store::Keep});
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      add_then_norm<A>(&h[r * D], &y[r * D], static_cast<const T*>(m.norm), D, m.eps, &x[r * D]);
      if (!m.lm_head.dense()) quant.prepare_row<A>(x.data(), D, r);
    }
    linear<A>(m.lm_head, V, D, x.data(), quant.view(D), R, Sink<A>{logits_p, V, Store::Cast});
  }
}

}  // namespace

extern "C" {

// One decode step of R rows; returns 0, or 1 (token id), 2 (position), 3 (slot), 4 (shared) for an
// out-of-range input. shared: null, or R pairs (slot, length): positions 0..length-1 of row r's keys and
// values are read from that slot, which holds the same ones (rows decoding from one prompt).
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

// out [N, K] = a quantised W (one Weight table) dequantised in fp32 (out_dtype 0) or bf16 (1): what a prefill
// multiplies quantised layers with (kernels/quant_prefill.py).
void idefics3_dequantize(const int64_t* weight, int64_t N, int64_t K, void* out, int out_dtype, int n_threads) {
  dequantize_matrix(weight_from(weight), N, K, out, out_dtype, n_threads, dequantize_row8);
}

// y [R, N] (fp32) = x [R, K] (fp32) W^T for one quantised W (a Weight table, N rows): the quantised products
// alone, the codes streamed once for all R rows: a prefill of few rows (kernels/quant_prefill.py) and tests. This
// build has fp32 inputs only: int8_inputs must be 0 (cpu_decode.quant_linear refuses anything else).
void idefics3_quant_linear(const int64_t* weight, int64_t N, int64_t K, const float* x, int64_t R, float* y,
                           int int8_inputs, int n_threads) {
  (void)int8_inputs;
  const Weight W = weight_from(weight);
  QuantScratch quant(R, K, true);
  for (int64_t r = 0; r < R; ++r) quant.prepare_row<F32>(x, K, r);
  const QuantInput in = quant.view(K);
  const Sink<F32> emit{y, N, Store::Keep};
#pragma omp parallel for schedule(static) num_threads(n_threads)
  for (int64_t t = 0; t < tiles(N); ++t) quant_rows(W, t * NR, std::min(N, t * NR + NR), in, R, emit);
}

}  // extern "C"
