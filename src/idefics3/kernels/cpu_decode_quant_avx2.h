// Quantised matrix products of cpu_decode_avx2.cpp (AVX2 + FMA + F16C): y = x W^T with W stored as int8 or int4
// codes and fp16 scales (cpu_decode_model.h's Weight, quant/format.py's layouts), the codes streamed once per
// step and dequantised in registers, as cpu_decode_quant.h does with AVX-512 (see there for why).
//
// How: x in fp32 (prepare_row makes its copies once per step and input), and per code vector
// - int8: 8 codes sign-extended to int32 (vpmovsxbd) and converted (vcvtdq2ps);
// - int4: the 16 bytes of a run of 32 inputs zero-extended to words (vpmovzxbw) are 8 dwords, dword j holding
//   bytes 2j and 2j+1; its nibbles are four vectors of codes with no shift but one: A (bits 0-3: input 2j),
//   B (bits 4-7, taken as 16 c: input 2j + 16), C (bits 16-19, taken as 65536 c: input 2j + 1), D (shifted down
//   from bits 20-23: input 2j + 17), each converted (vcvtdq2ps), against x arranged to match (int4_order: x / 16
//   for B, x / 65536 for C, exact powers of two);
// then FMA with x into partial sums per group, and one FMA per group by its scale (broadcast from memory). int4
// codes are taken as c in 0..15: W = s (c - 8) gives y = sum_g s_g (x_g . c_g) + s_g (-8 X_g), and with minimums
// W = s c + m gives sum_g s_g (x_g . c_g) + m_g X_g, X_g the sum of x over group g, made once per step and input
// (prepare_row, also as -8 X_g) and shared by every matrix row: one FMA per 8 groups.
// At batch 1 four matrix rows go together (each x load feeds four rows); in batches each unpacked code vector
// feeds up to RB batch rows. The code stream is prefetched PFD bytes ahead, as the dense one is.
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
  const float* x4 = nullptr;    // [R, XS] fp32 in int4 order (int4_order)
  const float* sums = nullptr;  // [R, 2 SS]: sums of x over groups of 32, then of 64, then of 128, up to XS; then
                                // the same times -8
  int64_t K = 0, XS = 0, SS = 0;
  const float* group_sums(int64_t r, int64_t G, bool times_minus_8) const {
    return sums + r * 2 * SS + (times_minus_8 ? SS : 0) + (G == 32 ? 0 : G == 64 ? XS / 32 : XS / 32 + XS / 64);
  }
};

inline int64_t padded_inputs(int64_t K) { return (K + 127) / 128 * 128; }
inline int64_t group_sums_size(int64_t XS) { return XS / 32 + XS / 64 + XS / 128; }

// x (natural order, zero past K, XS values) in the order int4_block reads it: per run of 32 inputs, the 8 x values
// of A, then of B divided by 16, of C divided by 65536, of D (see the header comment); values that would become
// subnormal are 0 (their products are far below any rounding).
inline void int4_order(const float* x, int64_t XS, float* out) {
  for (int64_t b = 0; b < XS; b += 32)
    for (int j = 0; j < 8; ++j) {
      const float v[4] = {x[b + 2 * j], x[b + 2 * j + 16] * (1.f / 16), x[b + 2 * j + 1] * (1.f / 65536),
                          x[b + 2 * j + 17]};
      for (int q = 0; q < 4; ++q) out[b + 8 * q + j] = std::fabs(v[q]) < 1.17549435e-38f ? 0.f : v[q];
    }
}

// Scratch for the QuantInput of every matrix input of a step (one at a time: x, att or act), R rows of at most
// kmax inputs.
struct QuantScratch {
  std::vector<float> xf, x4, sums;
  QuantScratch(int64_t R, int64_t kmax, bool used)
      : xf(used ? R * padded_inputs(kmax) : 0), x4(used ? R * padded_inputs(kmax) : 0),
        sums(used ? R * 2 * group_sums_size(padded_inputs(kmax)) : 0) {}
  QuantInput view(int64_t K) {
    QuantInput in;
    in.K = K, in.XS = padded_inputs(K), in.SS = group_sums_size(in.XS);
    in.x = xf.data(), in.x4 = x4.data(), in.sums = sums.data();
    return in;
  }
  // Fill row r of `view(K)` from row r of x [R, K] (in matrix order).
  template <class A>
  void prepare_row(const float* x, int64_t K, int64_t r) {
    const int64_t XS = padded_inputs(K), SS = group_sums_size(XS);
    float* f = xf.data() + r * XS;
    std::memcpy(f, x + r * K, K * sizeof(float));
    std::memset(f + K, 0, (XS - K) * sizeof(float));
    A::to_matrix_order(f, K);  // swaps the same quarters back: natural order
    int4_order(f, XS, x4.data() + r * XS);
    float* s = sums.data() + r * 2 * SS;
    const int64_t n32 = XS / 32, n64 = XS / 64;
    for (int64_t b = 0; b < n32; ++b)
      s[b] = hsum(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(f + 32 * b), _mm256_loadu_ps(f + 32 * b + 8)),
                                _mm256_add_ps(_mm256_loadu_ps(f + 32 * b + 16), _mm256_loadu_ps(f + 32 * b + 24))));
    for (int64_t b = 0; b < n64; ++b) s[n32 + b] = s[2 * b] + s[2 * b + 1];
    for (int64_t b = 0; b < XS / 128; ++b) s[n32 + n64 + b] = s[n32 + 2 * b] + s[n32 + 2 * b + 1];
    for (int64_t i = 0; i < SS; ++i) s[SS + i] = -8.f * s[i];
  }
};

// 8 fp16 values from p as fp32.
inline __m256 halves8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

inline void prefetch_ahead(const void* p) { _mm_prefetch(static_cast<const char*>(p) + PFD, _MM_HINT_T0); }

// Where a block of nw matrix rows starts: codes q (rows qs bytes apart), scales sc and mins mn (rows gs groups
// apart; mn null without minimums).
struct RowBlock {
  const void* q;
  int64_t qs;
  const uint16_t *sc, *mn;
  int64_t gs;
};

// out[i * rb + r] = sums of acc[i][r].
template <int nw, int rb>
inline void reduce_block(const __m256 (&acc)[nw][rb], float* out) {
  if constexpr (nw * rb == 4) {  // four at once: two rounds of hadd and the two halves
    __m256 v[4];
    for (int k = 0; k < 4; ++k) v[k] = acc[k / rb][k % rb];
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  } else {
    for (int i = 0; i < nw; ++i)
      for (int r = 0; r < rb; ++r) out[i * rb + r] = hsum(acc[i][r]);
  }
}

// The scales of the groups g0 .. g0+n-1 (n <= 8) of the nw rows as fp32 into s[i]: 8 at once, or one by one for
// the last n < 8 of a row (AVX2 has no 16-bit masked load; bytes copied to a buffer and reloaded as a vector
// would stall on store forwarding).
template <int nw>
inline void group_scales(const RowBlock& w, int64_t g0, int64_t n, float (&s)[nw][8]) {
  for (int i = 0; i < nw; ++i) {
    if (n == 8) _mm256_store_ps(s[i], halves8(w.sc + i * w.gs + g0));
    else
      for (int64_t g = 0; g < n; ++g) s[i][g] = half_to_float(w.sc[i * w.gs + g0 + g]);
  }
}

// t[i][r] += codes (8 int8 at q + i * qs) . x[r] (8 values, rows xs apart), for the nw rows and rb batch rows.
template <int nw, int rb>
inline void int8_step(const int8_t* q, int64_t qs, const float* x, int64_t xs, __m256 (&t)[nw][rb]) {
  for (int i = 0; i < nw; ++i) {
    const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i * qs))));
    for (int r = 0; r < rb; ++r) t[i][r] = _mm256_fmadd_ps(c, _mm256_loadu_ps(x + r * xs), t[i][r]);
  }
}

// out[i * rb + r] = W[row i] . x[r0 + r] for nw int8 rows of K stored codes (scales per G: 32, 64, 128, or K with
// any K).
template <int nw, int rb>
inline void int8_block(const RowBlock& w, int64_t K, int64_t G, const QuantInput& in, int64_t r0, float* out) {
  const int8_t* q = static_cast<const int8_t*>(w.q);
  const float* x = in.x + r0 * in.XS;
  const int64_t xs = in.XS;
  __m256 acc[nw][rb];
  for (int i = 0; i < nw; ++i)
    for (int r = 0; r < rb; ++r) acc[i][r] = _mm256_setzero_ps();
  if (G == K) {  // one scale per row (any K): the sums first, the scale at the end
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      if ((k & 63) == 0)
        for (int i = 0; i < nw; ++i) prefetch_ahead(q + i * w.qs + k);
      int8_step<nw, rb>(q + k, w.qs, x + k, xs, acc);
    }
    if (k < K) {  // the last K % 8 codes, through a zero-padded copy (x is zero past K)
      alignas(16) int8_t tail[nw][16] = {};
      for (int i = 0; i < nw; ++i) std::memcpy(tail[i], q + i * w.qs + k, K - k);
      int8_step<nw, rb>(tail[0], 16, x + k, xs, acc);
    }
    for (int i = 0; i < nw; ++i) {
      const __m256 sv = _mm256_set1_ps(half_to_float(w.sc[i * w.gs]));
      for (int r = 0; r < rb; ++r) acc[i][r] = _mm256_mul_ps(acc[i][r], sv);
    }
    reduce_block<nw, rb>(acc, out);
    return;
  }
  const int64_t groups = w.gs;
  alignas(32) float s[nw][8];
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
    const int64_t n = std::min<int64_t>(8, groups - g0);
    group_scales<nw>(w, g0, n, s);
    for (int64_t g = 0; g < n; ++g) {
      const int64_t k0 = (g0 + g) * G;
      __m256 t[nw][rb];
      for (int i = 0; i < nw; ++i)
        for (int r = 0; r < rb; ++r) t[i][r] = _mm256_setzero_ps();
      for (int64_t k = k0; k < k0 + G; k += 32) {  // G: a multiple of 32
        for (int i = 0; i < nw; ++i) prefetch_ahead(q + i * w.qs + k);
        for (int h = 0; h < 32; h += 8) int8_step<nw, rb>(q + k + h, w.qs, x + k + h, xs, t);
      }
      for (int i = 0; i < nw; ++i) {
        const __m256 sv = _mm256_broadcast_ss(&s[i][g]);
        for (int r = 0; r < rb; ++r) acc[i][r] = _mm256_fmadd_ps(t[i][r], sv, acc[i][r]);
      }
    }
  }
  reduce_block<nw, rb>(acc, out);
}

// As int8_block for nw int4 rows (K/2 stored bytes each, Q4_0 runs; G: 32, 64 or 128; with or without mins), x in
// int4 order.
template <int nw, int rb>
inline void int4_block(const RowBlock& w, int64_t K, int64_t G, const QuantInput& in, int64_t r0, float* out) {
  const uint8_t* q = static_cast<const uint8_t*>(w.q);
  const float* x4 = in.x4 + r0 * in.XS;
  const int64_t xs = in.XS;
  __m256 acc[nw][rb];
  for (int i = 0; i < nw; ++i)
    for (int r = 0; r < rb; ++r) acc[i][r] = _mm256_setzero_ps();
  const int64_t groups = w.gs, runs = G >> 5;
  alignas(32) float s[nw][8];
  float off[nw][rb] = {};  // the offsets of a last n < 8 groups, one by one
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
    const int64_t n = std::min<int64_t>(8, groups - g0);
    group_scales<nw>(w, g0, n, s);
    for (int r = 0; r < rb; ++r) {  // the offsets: m X, or s (-8 X), for 8 groups at once
      const float* X = in.group_sums(r0 + r, G, w.mn == nullptr) + g0;
      for (int i = 0; i < nw; ++i) {
        if (n == 8) {
          const __m256 c = w.mn ? halves8(w.mn + i * w.gs + g0) : _mm256_load_ps(s[i]);
          acc[i][r] = _mm256_fmadd_ps(c, _mm256_loadu_ps(X), acc[i][r]);
        } else {
          for (int64_t g = 0; g < n; ++g)
            off[i][r] += (w.mn ? half_to_float(w.mn[i * w.gs + g0 + g]) : s[i][g]) * X[g];
        }
      }
    }
    for (int64_t g = 0; g < n; ++g) {
      __m256 t[nw][rb];
      for (int i = 0; i < nw; ++i)
        for (int r = 0; r < rb; ++r) t[i][r] = _mm256_setzero_ps();
      for (int64_t b = (g0 + g) * runs; b < (g0 + g + 1) * runs; ++b) {
        if ((b & 3) == 0)
          for (int i = 0; i < nw; ++i) prefetch_ahead(q + i * w.qs + 16 * b);
        for (int i = 0; i < nw; ++i) {
          const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i * w.qs + 16 * b)));
          const __m256 a = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xf)));
          const __m256 bb = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xf0)));
          const __m256 c = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xf0000)));
          const __m256 d = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 20));
          for (int r = 0; r < rb; ++r) {
            const float* xr = x4 + r * xs + 32 * b;
            t[i][r] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xr), t[i][r]);
            t[i][r] = _mm256_fmadd_ps(bb, _mm256_loadu_ps(xr + 8), t[i][r]);
            t[i][r] = _mm256_fmadd_ps(c, _mm256_loadu_ps(xr + 16), t[i][r]);
            t[i][r] = _mm256_fmadd_ps(d, _mm256_loadu_ps(xr + 24), t[i][r]);
          }
        }
      }
      for (int i = 0; i < nw; ++i) {
        const __m256 sv = _mm256_broadcast_ss(&s[i][g]);
        for (int r = 0; r < rb; ++r) acc[i][r] = _mm256_fmadd_ps(t[i][r], sv, acc[i][r]);
      }
    }
  }
  reduce_block<nw, rb>(acc, out);
  for (int i = 0; i < nw; ++i)
    for (int r = 0; r < rb; ++r) out[i * rb + r] += off[i][r];
}

// Rows n0 .. n1-1 of a quantised W [N, K] against all R rows of the prepared input: emit(r, n, value). A batch
// block of one row takes the matrix rows four at a time, of two rows two at a time, else one at a time. All Kp
// stored columns are read (the inputs past K are zeros).
template <class Emit>
inline void quant_rows(const Weight& W, int64_t n0, int64_t n1, const QuantInput& in, int64_t R, const Emit& emit) {
  const int64_t K = W.cols, G = W.group, groups = W.groups, qs = W.kind == kInt8 ? K : K / 2;
  const auto block = [&](int64_t n) {
    return RowBlock{static_cast<const uint8_t*>(W.data) + n * qs, qs, W.scales + n * groups,
                    W.kind == kInt4Mins ? W.mins + n * groups : nullptr, groups};
  };
  const auto run = [&](auto nw_c, auto rb_c, int64_t n, int64_t r0) {
    constexpr int nw = decltype(nw_c)::value, rb = decltype(rb_c)::value;
    float out[nw * rb];
    if (W.kind == kInt8) int8_block<nw, rb>(block(n), K, G, in, r0, out);
    else int4_block<nw, rb>(block(n), K, G, in, r0, out);
    for (int i = 0; i < nw; ++i)
      for (int r = 0; r < rb; ++r) emit(r0 + r, n + i, out[i * rb + r]);
  };
  using one = std::integral_constant<int, 1>;
  using two = std::integral_constant<int, 2>;
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int rb = int(std::min<int64_t>(RB, R - r0));
    int64_t n = n0;
    if (rb == 1)
      for (; n + 4 <= n1; n += 4) run(std::integral_constant<int, 4>{}, one{}, n, r0);
    if (rb == 2)
      for (; n + 2 <= n1; n += 2) run(two{}, two{}, n, r0);
    for (; n < n1; ++n) {
      switch (rb) {
        case 4: run(one{}, std::integral_constant<int, 4>{}, n, r0); break;
        case 3: run(one{}, std::integral_constant<int, 3>{}, n, r0); break;
        case 2: run(one{}, two{}, n, r0); break;
        default: run(one{}, one{}, n, r0); break;
      }
    }
  }
}

// Row n of a quantised W (its first K columns) in fp32, a run of 32 inputs at a time in registers: exactly
// dequantize_row's values (cpu_decode_model.h), which stays the scalar reference. int8: 8 codes per vpmovsxbd;
// int4: the run's 16 bytes split into low nibbles (inputs 0-15) and high ones (16-31), 8 per vpmovzxbd; then
// (c - 8) s, exact, or c s + m by one FMA, as exact as torch's addcmul (c s is exact: an fp16 scale times a code
// below 256). What idefics3_dequantize makes for a prefill's dense multiply: 12x faster than the scalar loop's
// per-element branches and nibble indexing on int4 (0.98 -> 0.08 ms for a [1536, 576] matrix, 2 threads).
inline void dequantize_row8(const Weight& w, int64_t n, int64_t K, float* out) {
  const uint16_t* sc = w.scales + n * w.groups;
  const uint16_t* mn = w.kind == kInt4Mins ? w.mins + n * w.groups : nullptr;
  const __m128i low = _mm_set1_epi8(0x0f);
  const __m256 eight = _mm256_set1_ps(8.f);
  alignas(32) float tail[32];
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t count = std::min<int64_t>(32, K - k), g = k / w.group;  // runs of 32 never straddle groups
    float* dst = count == 32 ? out + k : tail;
    const __m256 s = _mm256_set1_ps(half_to_float(sc[g]));
    if (w.kind == kInt8) {
      const int8_t* q = static_cast<const int8_t*>(w.data) + n * w.cols + k;
      if (count < 32) {  // an int8 row's stored columns may end inside the run: no read past them
        for (int64_t i = 0; i < count; ++i) out[k + i] = float(q[i]) * half_to_float(sc[g]);
        break;
      }
      for (int j = 0; j < 4; ++j) {
        const __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * j)));
        _mm256_storeu_ps(dst + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(c), s));
      }
      continue;
    }
    // int4 rows store whole runs (Kp is a multiple of 32), so the run's 16 bytes are always there
    const uint8_t* p = static_cast<const uint8_t*>(w.data) + n * (w.cols / 2) + k / 2;
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i halves[2] = {_mm_and_si128(bytes, low), _mm_and_si128(_mm_srli_epi16(bytes, 4), low)};
    const __m256 m = _mm256_set1_ps(mn ? half_to_float(mn[g]) : 0.f);
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 2; ++j) {
        const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(j ? _mm_srli_si128(halves[h], 8) : halves[h]));
        _mm256_storeu_ps(dst + 16 * h + 8 * j, mn ? _mm256_fmadd_ps(c, s, m) : _mm256_mul_ps(_mm256_sub_ps(c, eight), s));
      }
    if (count < 32) std::copy(tail, tail + count, out + k);
  }
}
