// Quantised matrix products of cpu_decode_avx2.cpp (AVX2 + FMA + F16C): y = x W^T with W stored as int8 or int4
// codes and fp16 scales (cpu_decode_model.h's Weight, quant/format.py's layouts), the codes streamed once per
// step and dequantised in registers, as cpu_decode_quant.h does with AVX-512 (see there for why).
//
// How, per output row and block of up to RB batch rows (each unpacked weight vector serves every batch row):
// - int8: 8 codes sign-extended to int32 and converted to fp32, FMA with fp32 x, one scale per group applied to
//   the group's partial sums;
// - int4: 8 bytes of a run of 32 inputs zero-extended to 8 dwords: the low nibbles (and 15) are inputs j..j+7 of
//   the run, the high nibbles (shift right 4) inputs 16+j..; converted to fp32 and multiplied with fp32 x by FMA.
//   The codes are taken as c in 0..15: W = s (c - 8) gives y = sum_g s_g (x_g . c_g) - 8 s_g X_g, and with
//   minimums W = s c + m gives sum_g s_g (x_g . c_g) + m_g X_g, X_g the sum of x over group g, made once per step
//   and row (prepare_row) and shared by every matrix row.
// x is fp32 holding the values rounded to the model's dtype, in natural order here (the dense products read a
// bf16 model's activations in "matrix order", which prepare_row undoes). Scales are converted 8 at a time. The
// weight stream is prefetched PFD bytes ahead, as the dense one is.
//
// Numerics as cpu_decode_quant.h: fp32 accumulation; for fp32 models only the order of fp32 roundings differs
// from the plain path's, for bf16 models also the plain path's rounding of each dequantised weight to bf16.
//
// Not a standalone header: cpu_decode_avx2.cpp includes it inside its anonymous namespace after the element
// traits, hsum(), RB and PFD.

#pragma once

// One matrix input x [R, K] in the forms the quantised products read (made by prepare_row, row by row), each
// row zero-padded to XS = K rounded up to 128 (the stored columns Kp of any matrix over these inputs fit in it).
struct QuantInput {
  const float* x = nullptr;     // [R, XS] fp32 in natural order
  const float* sums = nullptr;  // [R, SS] sums of x over groups of 32, then of 64, then of 128, up to XS
  int64_t K = 0, XS = 0, SS = 0;
  const float* group_sums(int64_t r, int64_t G) const {
    return sums + r * SS + (G == 32 ? 0 : G == 64 ? XS / 32 : XS / 32 + XS / 64);
  }
};

inline int64_t padded_inputs(int64_t K) { return (K + 127) / 128 * 128; }
inline int64_t group_sums_size(int64_t XS) { return XS / 32 + XS / 64 + XS / 128; }

// Scratch for the QuantInput of every matrix input of a step (one at a time: x, att or act), R rows of at most
// kmax inputs.
struct QuantScratch {
  std::vector<float> xf, sums;
  QuantScratch(int64_t R, int64_t kmax, bool used)
      : xf(used ? R * padded_inputs(kmax) : 0), sums(used ? R * group_sums_size(padded_inputs(kmax)) : 0) {}
  QuantInput view(int64_t K) {
    QuantInput in;
    in.K = K, in.XS = padded_inputs(K), in.SS = group_sums_size(in.XS), in.x = xf.data(), in.sums = sums.data();
    return in;
  }
  // Fill row r of `view(K)` from row r of x [R, K] (in matrix order).
  template <class A>
  void prepare_row(const float* x, int64_t K, int64_t r) {
    const int64_t XS = padded_inputs(K);
    float* f = xf.data() + r * XS;
    std::memcpy(f, x + r * K, K * sizeof(float));
    std::memset(f + K, 0, (XS - K) * sizeof(float));
    A::to_matrix_order(f, K);  // swaps the same quarters back: natural order
    float* s = sums.data() + r * group_sums_size(XS);
    const int64_t n32 = XS / 32, n64 = XS / 64;
    for (int64_t b = 0; b < n32; ++b)
      s[b] = hsum(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(f + 32 * b), _mm256_loadu_ps(f + 32 * b + 8)),
                                _mm256_add_ps(_mm256_loadu_ps(f + 32 * b + 16), _mm256_loadu_ps(f + 32 * b + 24))));
    for (int64_t b = 0; b < n64; ++b) s[n32 + b] = s[2 * b] + s[2 * b + 1];
    for (int64_t b = 0; b < XS / 128; ++b) s[n32 + n64 + b] = s[n32 + 2 * b] + s[n32 + 2 * b + 1];
  }
};

// n (at most 8) fp16 values from p as fp32 into out.
inline void halves8(const uint16_t* p, int64_t n, float* out) {
  if (n == 8) {
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(p[i]);
}

inline __m256 int8x8(const int8_t* p) {  // 8 codes as fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// out[r] = W[n] . x[r] for r < rb: int8 codes q [K] (stored columns), scales sc [K / G] (G: 32, 64, 128, or K
// with any K), fp32 x (rows xs apart).
template <int rb>
inline void int8_dot(const int8_t* q, const uint16_t* sc, int64_t K, int64_t G, const float* x, int64_t xs,
                     float* out) {
  constexpr int nt = rb <= 2 ? 2 : 1;
  __m256 acc[rb];
  float tails[rb];
  for (int r = 0; r < rb; ++r) acc[r] = _mm256_setzero_ps(), tails[r] = 0.f;
  const int64_t groups = K / G;
  float s8[8];
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
    const int64_t n = std::min<int64_t>(8, groups - g0);
    halves8(sc + g0, n, s8);
    for (int64_t g = 0; g < n; ++g) {
      const int64_t k0 = (g0 + g) * G, k1 = k0 + G;
      __m256 t[rb][nt];
      for (int r = 0; r < rb; ++r)
        for (int a = 0; a < nt; ++a) t[r][a] = _mm256_setzero_ps();
      int64_t k = k0;
      for (; k + 8 * nt <= k1; k += 8 * nt) {
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + k) + PFD, _MM_HINT_T0);
        for (int a = 0; a < nt; ++a) {
          const __m256 w = int8x8(q + k + 8 * a);
          for (int r = 0; r < rb; ++r) t[r][a] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * xs + k + 8 * a), t[r][a]);
        }
      }
      for (; k + 8 <= k1; k += 8) {
        const __m256 w = int8x8(q + k);
        for (int r = 0; r < rb; ++r) t[r][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * xs + k), t[r][0]);
      }
      float tail[rb];  // per-channel scales over a K that is not a multiple of 8
      for (int r = 0; r < rb; ++r) tail[r] = 0.f;
      for (; k < k1; ++k)
        for (int r = 0; r < rb; ++r) tail[r] += float(q[k]) * x[r * xs + k];
      const __m256 s = _mm256_set1_ps(s8[g]);
      for (int r = 0; r < rb; ++r) {
        __m256 sum = t[r][0];
        for (int a = 1; a < nt; ++a) sum = _mm256_add_ps(sum, t[r][a]);
        acc[r] = _mm256_fmadd_ps(sum, s, acc[r]);
        tails[r] += tail[r] * s8[g];
      }
    }
  }
  for (int r = 0; r < rb; ++r) out[r] = hsum(acc[r]) + tails[r];
}

// out[r] = W[n] . x[r] for batch rows r0 .. r0+rb-1: int4 codes q [K/2] (stored columns, Q4_0 runs), scales sc
// [K/G], mins mn [K/G] or null.
template <int rb>
inline void int4_dot(const uint8_t* q, const uint16_t* sc, const uint16_t* mn, int64_t K, int64_t G,
                     const QuantInput& in, int64_t r0, float* out) {
  const float* x = in.x + r0 * in.XS;
  const int64_t xs = in.XS;
  const __m256i nibble = _mm256_set1_epi32(15);
  __m256 acc[rb];
  float corr[rb];  // sum_g (m_g, or -8 s_g) X_g
  for (int r = 0; r < rb; ++r) acc[r] = _mm256_setzero_ps(), corr[r] = 0.f;
  const int64_t groups = K / G, runs = G / 32;
  float s8[8], m8[8];
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
    const int64_t n = std::min<int64_t>(8, groups - g0);
    halves8(sc + g0, n, s8);
    if (mn) halves8(mn + g0, n, m8);
    for (int64_t g = 0; g < n; ++g) {
      __m256 lo_sum[rb], hi_sum[rb];
      for (int r = 0; r < rb; ++r) lo_sum[r] = hi_sum[r] = _mm256_setzero_ps();
      for (int64_t b = (g0 + g) * runs; b < (g0 + g + 1) * runs; ++b) {
        if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + 16 * b) + PFD, _MM_HINT_T0);
        for (int h = 0; h < 2; ++h) {  // bytes 8h .. 8h+7 of the run: inputs 8h.. (low) and 16+8h.. (high)
          const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 16 * b + 8 * h)));
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, nibble));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
          for (int r = 0; r < rb; ++r) {
            lo_sum[r] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + r * xs + 32 * b + 8 * h), lo_sum[r]);
            hi_sum[r] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + r * xs + 32 * b + 16 + 8 * h), hi_sum[r]);
          }
        }
      }
      const __m256 s = _mm256_set1_ps(s8[g]);
      const float coef = mn ? m8[g] : -8.f * s8[g];
      for (int r = 0; r < rb; ++r) {
        acc[r] = _mm256_fmadd_ps(_mm256_add_ps(lo_sum[r], hi_sum[r]), s, acc[r]);
        corr[r] += coef * in.group_sums(r0 + r, G)[g0 + g];
      }
    }
  }
  for (int r = 0; r < rb; ++r) out[r] = hsum(acc[r]) + corr[r];
}

// Row n of a quantised W [N, K] against all R rows of the prepared input: emit(r, n, value). All Kp stored
// columns are read (the inputs past K are zeros).
template <class Emit>
inline void quant_row_times_batch(const Weight& W, int64_t n, const QuantInput& in, int64_t R, const Emit& emit) {
  const int64_t K = W.cols, G = W.group, groups = K / G;
  const uint16_t* sc = W.scales + n * groups;
  const uint16_t* mn = W.kind == kInt4Mins ? W.mins + n * groups : nullptr;
  const int8_t* q8 = static_cast<const int8_t*>(W.data) + n * K;
  const uint8_t* q4 = static_cast<const uint8_t*>(W.data) + n * (K / 2);
  float out[RB];
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int rb = int(std::min<int64_t>(RB, R - r0));
    const float* x = in.x + r0 * in.XS;
    if (W.kind == kInt8) {
      switch (rb) {
        case 4: int8_dot<4>(q8, sc, K, G, x, in.XS, out); break;
        case 3: int8_dot<3>(q8, sc, K, G, x, in.XS, out); break;
        case 2: int8_dot<2>(q8, sc, K, G, x, in.XS, out); break;
        default: int8_dot<1>(q8, sc, K, G, x, in.XS, out); break;
      }
    } else {
      switch (rb) {
        case 4: int4_dot<4>(q4, sc, mn, K, G, in, r0, out); break;
        case 3: int4_dot<3>(q4, sc, mn, K, G, in, r0, out); break;
        case 2: int4_dot<2>(q4, sc, mn, K, G, in, r0, out); break;
        default: int4_dot<1>(q4, sc, mn, K, G, in, r0, out); break;
      }
    }
    for (int r = 0; r < rb; ++r) emit(r0 + r, n, out[r]);
  }
}
