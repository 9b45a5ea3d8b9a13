// Quantised matrix products of cpu_decode.cpp (AVX-512): y = x W^T with W stored as int8 or int4 codes and fp16
// scales (cpu_decode_model.h's Weight, quant/format.py's layouts), the codes streamed once per step and
// dequantised in registers, never in memory.
//
// Why: a decode step reads every weight once, so its time is the bytes it streams; int8 halves them against
// bf16, int4 (with the int8 head of the package's policy) cuts them to a third. Dequantising a matrix into a
// dense copy every step (the plain path) reads the codes, writes and reads the copy again: slower than bf16.
//
// How: x in fp32 (widened from a bf16 model's activations once per step and input by prepare_row, which also
// lays it out as the int4 products read it), and per code vector
// - int8: 16 codes sign-extended to int32 (vpmovsxbd) and converted (vcvtdq2ps);
// - int4: 32 bytes, two runs of 32 inputs, zero-extended to words (vpmovzxbw) are 16 dwords, dword j holding
//   bytes 2j and 2j+1; its four nibbles become four vectors of codes: A (bits 0-3) through vpermps from a table
//   of 0..15 (it reads the low 4 bits), B (bits 4-7) and C (bits 16-19) masked in place and converted as 16 c
//   and 65536 c, D (bits 20-23) shifted down and converted; x is arranged to match (int4_order: B's x divided
//   by 16, C's by 65536, exact powers of two), so no other shift or mask is needed;
// then FMA with x into partial sums per group, and one FMA per group by its scale (broadcast from memory, or for
// groups of 32, which take lanes 0-7 and 8-15 of the int4 sums, permuted from the 16 scales in a register).
// int4 codes are taken as c in 0..15: W = s (c - 8) gives y = sum_g s_g (x_g . c_g) - 8 sum_g s_g X_g, and with
// minimums W = s c + m gives sum_g s_g (x_g . c_g) + m_g X_g, where X_g is the sum of x over group g, made once
// per step and input (prepare_row) and shared by every matrix row: one FMA per 16 groups.
// Why this way on the Xeon (Sapphire Rapids class) it was measured on: its two 512-bit ports do and / convert /
// FMA at two per cycle, shifts and shuffles at one, vdpbf16ps at one per two cycles, so about 14 port slots per
// 64 int4 codes and 7 per 32 int8 codes (with the FMAs) is about as little as fp32 arithmetic allows: ~22 G codes
// per second and core, in cache. Unpacking to bf16 for vdpbf16ps (vpermw lookups) measured slower.
// At batch 1 four matrix rows go together (each x load feeds four rows, one reduction for the four, four
// independent chains); in batches each unpacked code vector feeds up to RB batch rows. Scales (and mins) are
// converted 16 at a time. The code stream is prefetched PREFETCH_BYTES ahead, as the dense one is.
//
// Numerics: fp32 accumulation; for fp32 models the result differs from the plain path's (dequantise, then
// F.linear) only by the order of fp32 roundings. For bf16 models x is the same bf16 values, but the weights are
// exact (the plain path rounds each dequantised weight to bf16): within bf16's tolerance.
//
// Not a standalone header: cpu_decode.cpp includes it inside its anonymous namespace after the element traits,
// lanes(), RB and PREFETCH_BYTES.

#pragma once

// One matrix input x [R, K] in the forms the quantised products read (made by prepare_row, row by row), each
// row zero-padded to XS = K rounded up to 128 (the stored columns Kp of any matrix over these inputs fit in it).
struct QuantInput {
  const float* x = nullptr;     // [R, XS] fp32
  const float* x4 = nullptr;    // [R, XS] fp32 in int4 order (see int4_order)
  const float* sums = nullptr;  // [R, SS] sums of x over groups of 32, then of 64, then of 128, up to XS; the total
  int64_t K = 0, XS = 0, SS = 0;
  // int8 inputs (cpu_decode_quant_vnni.h), where `int8` is set: x rounded per run of 32 to int8 codes q with one
  // scale d each (x ~ d q); `sums` then sums d q, the values the products see
  bool int8 = false;
  const int8_t* xq = nullptr;   // [R, XS] q in natural order
  const int8_t* xq4 = nullptr;  // [R, XS] q in int4 order (int8_inputs_row)
  const float* d8 = nullptr;    // [R, XS / 4] d per lane of the int8 products: 16 per 64 inputs, 8 per run
  const float* d4 = nullptr;    // [R, XS / 4] d per lane of the int4 products: 16 per 128 inputs, 4 per run
  const float* group_sums(int64_t r, int64_t G) const {
    return sums + r * SS + (G == 32 ? 0 : G == 64 ? XS / 32 : XS / 32 + XS / 64);
  }
  float total(int64_t r) const { return sums[r * SS + SS - 1]; }
};

inline int64_t padded_inputs(int64_t K) { return (K + 127) / 128 * 128; }
inline int64_t group_sums_size(int64_t XS) { return XS / 32 + XS / 64 + XS / 128 + 1; }

// One row f (fp32, XS values, zero past K) as int8 inputs: per run b of 32, d = max |x| / 127 and
// q = round-to-nearest-even(x * (1 / d)) (0 for a run of zeros), as quant/format.py's quantize_inputs computes
// them; q stored in natural order and in int4 order (per 128 inputs: the first 16 of each of the four runs, then
// their last 16, as a Q4_0 block's low and high nibbles hold them); d spread over the lanes that read the run;
// s32[b] = d * (sum of the run's q).
inline void int8_inputs_row(const float* f, int64_t XS, int8_t* q, int8_t* q4, float* d8, float* d4, float* s32) {
  for (int64_t b = 0; b < XS / 32; ++b) {
    const __m512 v0 = _mm512_loadu_ps(f + 32 * b), v1 = _mm512_loadu_ps(f + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
    const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
    const __m128i b0 = _mm512_cvtsepi32_epi8(i0), b1 = _mm512_cvtsepi32_epi8(i1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b), b0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b + 16), b1);
    int8_t* c = q4 + (b / 4) * 128 + (b % 4) * 16;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(c), b0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(c + 64), b1);
    s32[b] = d * float(_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1)));
    for (int l = 0; l < 8; ++l) d8[(b / 2) * 16 + (b % 2) * 8 + l] = d;
    for (int l = 0; l < 4; ++l) d4[(b / 4) * 16 + (b % 4) * 4 + l] = d;
  }
}

// x in the order int4_block reads it. 32 bytes of codes (two runs of 32 inputs) zero-extended to words are 16
// dwords, dword j holding bytes 2j and 2j+1 of the runs (j < 8: the first run, p = 2 (j % 8) its byte); its
// four nibbles are four vectors of codes: A (bits 0-3: input p), B (bits 4-7, taken as 16 c: input p + 16),
// C (bits 16-19, taken as 65536 c: input p + 1), D (bits 20-23: input p + 17). Each 64 inputs become the 16 x
// values of A, then of B divided by 16, of C divided by 65536, of D: exact powers of two, so that no code needs
// shifting into place (values that would become subnormal are 0: their products are far below any rounding).
inline void int4_order(const float* x, int64_t K, float* out) {
  const __m512i j = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i base = _mm512_add_epi32(_mm512_slli_epi32(_mm512_srli_epi32(j, 3), 5),
                                        _mm512_slli_epi32(_mm512_and_si512(j, _mm512_set1_epi32(7)), 1));
  const int offsets[4] = {0, 16, 1, 17};
  const float scales[4] = {1.f, 1.f / 16, 1.f / 65536, 1.f};
  for (int64_t c = 0; c < padded_inputs(K); c += 64)
    for (int v = 0; v < 4; ++v) {
      const __m512i idx = _mm512_add_epi32(base, _mm512_set1_epi32(int(c) + offsets[v]));
      const __mmask16 in = _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32(int(K)));
      __m512 val = _mm512_mul_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, idx, x, 4), _mm512_set1_ps(scales[v]));
      val = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(val), _mm512_set1_ps(1.17549435e-38f), _CMP_GE_OQ), val);
      _mm512_storeu_ps(out + c + 16 * v, val);
    }
}

// Scratch for the QuantInput of every matrix input of a step (one at a time: x, att or act), R rows of at most
// kmax inputs.
struct QuantScratch {
  bool int8;  // int8 inputs (int8_inputs_row) instead of fp32 ones
  std::vector<float> xf, x4, sums, d8, d4;
  std::vector<int8_t> xq, xq4;
  QuantScratch(int64_t R, int64_t kmax, bool used, bool int8_inputs)
      : int8(used && int8_inputs), xf(used ? R * padded_inputs(kmax) : 0),
        x4(used && !int8 ? R * padded_inputs(kmax) : 0), sums(used ? R * group_sums_size(padded_inputs(kmax)) : 0),
        d8(int8 ? R * padded_inputs(kmax) / 4 : 0), d4(d8.size()), xq(int8 ? R * padded_inputs(kmax) : 0),
        xq4(xq.size()) {}
  // The view for an input of K values per row.
  QuantInput view(int64_t K) {
    QuantInput in;
    in.K = K, in.XS = padded_inputs(K), in.SS = group_sums_size(in.XS);
    in.x = xf.data(), in.x4 = x4.data(), in.sums = sums.data();
    in.int8 = int8, in.xq = xq.data(), in.xq4 = xq4.data(), in.d8 = d8.data(), in.d4 = d4.data();
    return in;
  }
  // Fill row r of `view(K)` from row r of x [R, K].
  template <class A>
  void prepare_row(const typename A::T* x, int64_t K, int64_t r) {
    const int64_t XS = padded_inputs(K);
    float* f = xf.data() + r * XS;
    for (int64_t k = 0; k < XS; k += 16) {
      const __mmask16 m = k < K ? lanes(K - k) : __mmask16(0);
      _mm512_storeu_ps(f + k, A::load16(x + r * K + k, m));
    }
    float* s = sums.data() + r * group_sums_size(XS);
    const int64_t n32 = XS / 32, n64 = XS / 64;
    if (int8) {
      int8_inputs_row(f, XS, xq.data() + r * XS, xq4.data() + r * XS, d8.data() + r * XS / 4, d4.data() + r * XS / 4, s);
    } else {
      int4_order(f, K, x4.data() + r * XS);
      for (int64_t b = 0; b < n32; ++b)
        s[b] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(f + 32 * b), _mm512_loadu_ps(f + 32 * b + 16)));
    }
    for (int64_t b = 0; b < n64; ++b) s[n32 + b] = s[2 * b] + s[2 * b + 1];
    for (int64_t b = 0; b < XS / 128; ++b) s[n32 + n64 + b] = s[n32 + 2 * b] + s[n32 + 2 * b + 1];
    s[group_sums_size(XS) - 1] = 0.f;
    for (int64_t b = 0; b < XS / 128; ++b) s[group_sums_size(XS) - 1] += s[n32 + n64 + b];
  }
};

// 16 fp16 values from p (n of them, the rest 0) as fp32.
inline __m512 halves16(const uint16_t* p, int64_t n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(n), p));
}

inline void prefetch_ahead(const void* p) {
  if (PREFETCH_BYTES > 0) _mm_prefetch(static_cast<const char*>(p) + PREFETCH_BYTES, _MM_HINT_T0);
}

// The sums of the lanes of 4 vectors.
inline void reduce4(const __m512* v, float* out) {
  const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x44), _mm512_shuffle_f32x4(v[0], v[1], 0xEE));
  const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x44), _mm512_shuffle_f32x4(v[2], v[3], 0xEE));
  __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, 0x88), _mm512_shuffle_f32x4(t0, t1, 0xDD));  // a row per block
  u = _mm512_add_ps(u, _mm512_shuffle_ps(u, u, _MM_SHUFFLE(1, 0, 3, 2)));
  u = _mm512_add_ps(u, _mm512_shuffle_ps(u, u, _MM_SHUFFLE(2, 3, 0, 1)));
  _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), u)));
}

// out[i * rb + r] = sums of acc[i][r].
template <int nw, int rb>
inline void reduce_block(const __m512 (&acc)[nw][rb], float* out) {
  if constexpr (nw == 4 && rb == 1) {
    const __m512 v[4] = {acc[0][0], acc[1][0], acc[2][0], acc[3][0]};
    reduce4(v, out);
  } else {
    for (int i = 0; i < nw; ++i)
      for (int r = 0; r < rb; ++r) out[i * rb + r] = _mm512_reduce_add_ps(acc[i][r]);
  }
}

// Row n of a quantised W (its first K columns) in fp32, one run of 32 inputs at a time: store(k, v0, v1, keep0,
// keep1) gets inputs k .. k+15 in v0 and k+16 .. k+31 in v1, the lanes before K in keep0 / keep1 (int8 codes are
// read only there: a per-channel row may end at a multiple of 16; an int4 run is always stored whole). The values
// are those of dequantize_row (cpu_decode_model.h) and quant/format.py's dequantize.
template <class Store>
inline void dequantize_runs(const Weight& w, int64_t n, int64_t K, const Store& store) {
  const uint16_t* sc = w.scales + n * w.groups;
  const uint16_t* mn = w.kind == kInt4Mins ? w.mins + n * w.groups : nullptr;
  const int8_t* q8 = static_cast<const int8_t*>(w.data) + n * w.cols;
  const uint8_t* q4 = static_cast<const uint8_t*>(w.data) + n * (w.cols / 2);
  const __m512i low = _mm512_set1_epi32(0x0f), eight = _mm512_set1_epi32(8);
  for (int64_t g = 0, k = 0; g < w.groups && k < K; ++g) {
    const __m512 s = _mm512_set1_ps(half_to_float(sc[g])), m = _mm512_set1_ps(mn ? half_to_float(mn[g]) : 0.f);
    for (const int64_t end = std::min<int64_t>(K, k + w.group); k < end; k += 32) {  // int4 groups: whole runs
      const __mmask16 keep0 = lanes(end - k), keep1 = end - k > 16 ? lanes(end - k - 16) : 0;
      __m512 v0, v1;
      if (w.kind == kInt8) {
        v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(keep0, q8 + k))), s);
        v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(keep1, q8 + k + 16))), s);
      } else {  // the run's 16 bytes: inputs 0-15 in the low nibbles, 16-31 in the high ones
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q4 + k / 2)));
        const __m512i c0 = _mm512_and_si512(bytes, low), c1 = _mm512_and_si512(_mm512_srli_epi32(bytes, 4), low);
        v0 = mn ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(c0), s, m) : _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c0, eight)), s);
        v1 = mn ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(c1), s, m) : _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c1, eight)), s);
      }
      store(k, v0, v1, keep0, keep1);
    }
  }
}

// Row n of a quantised W in fp32 (dequantize_runs): what idefics3_dequantize makes for a prefill's dense multiply.
inline void dequantize_row16(const Weight& w, int64_t n, int64_t K, float* out) {
  dequantize_runs(w, n, K, [out](int64_t k, __m512 v0, __m512 v1, __mmask16 keep0, __mmask16 keep1) {
    _mm512_mask_storeu_ps(out + k, keep0, v0);
    _mm512_mask_storeu_ps(out + k + 16, keep1, v1);
  });
}

// The same row rounded to bf16 (to nearest even, vcvtneps2bf16, straight from the registers: the values of
// float_to_bf16 on dequantize_row16's, as torch's cast gives them).
inline void dequantize_row_bf16(const Weight& w, int64_t n, int64_t K, uint16_t* out) {
  dequantize_runs(w, n, K, [out](int64_t k, __m512 v0, __m512 v1, __mmask16 keep0, __mmask16 keep1) {
    _mm256_mask_storeu_epi16(out + k, keep0, (__m256i)_mm512_cvtneps_pbh(v0));
    _mm256_mask_storeu_epi16(out + k + 16, keep1, (__m256i)_mm512_cvtneps_pbh(v1));
  });
}

// Where a block of nw matrix rows starts: codes q (rows qs bytes apart), scales sc and mins mn (rows gs groups
// apart; mn null without minimums).
struct RowBlock {
  const void* q;
  int64_t qs;
  const uint16_t *sc, *mn;
  int64_t gs;
};

// The scales of the groups g0 .. g0+n-1 of the nw rows as fp32, S[i] (the rest 0).
template <int nw>
inline void group_scales(const RowBlock& w, int64_t g0, int64_t n, __m512 (&S)[nw]) {
  for (int i = 0; i < nw; ++i) S[i] = halves16(w.sc + i * w.gs + g0, n);
}

// For int4: off[i][r] += each group's offset coefficient times the group's x sum: with mins, m X into the sums
// themselves (acc); without, s X into off, which the caller multiplies by -8 at the end.
template <int nw, int rb>
inline void group_offsets(const RowBlock& w, int64_t g0, int64_t n, const __m512 (&S)[nw], const QuantInput& in,
                          int64_t r0, int64_t G, __m512 (&acc)[nw][rb], __m512 (&off)[nw][rb]) {
  __m512 X[rb];
  for (int r = 0; r < rb; ++r) X[r] = _mm512_maskz_loadu_ps(lanes(n), in.group_sums(r0 + r, G) + g0);
  for (int i = 0; i < nw; ++i) {
    if (w.mn) {
      const __m512 M = halves16(w.mn + i * w.gs + g0, n);
      for (int r = 0; r < rb; ++r) acc[i][r] = _mm512_fmadd_ps(M, X[r], acc[i][r]);
    } else {
      for (int r = 0; r < rb; ++r) off[i][r] = _mm512_fmadd_ps(S[i], X[r], off[i][r]);
    }
  }
}

// t[i][r] += codes (16 int8 at q + i * qs) . x[r] (16 values, rows xs apart), for the nw rows and rb batch rows;
// m: the lanes to take (all but at the end of a row whose per-channel scale spans a K off 16).
template <int nw, int rb, bool masked = false>
inline void int8_step(const int8_t* q, int64_t qs, const float* x, int64_t xs, __m512 (&t)[nw][rb],
                      __mmask16 m = 0xffff) {
  __m512 xv[rb];
  for (int r = 0; r < rb; ++r) xv[r] = masked ? _mm512_maskz_loadu_ps(m, x + r * xs) : _mm512_loadu_ps(x + r * xs);
  for (int i = 0; i < nw; ++i) {
    const __m128i b = masked ? _mm_maskz_loadu_epi8(m, q + i * qs) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i * qs));
    const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    for (int r = 0; r < rb; ++r) t[i][r] = _mm512_fmadd_ps(c, xv[r], t[i][r]);
  }
}

// out[i * rb + r] = W[row i] . x[r0 + r] for nw int8 rows of K stored codes (scales per G: 32, 64, 128, or K with
// any K).
template <int nw, int rb>
inline void int8_block(const RowBlock& w, int64_t K, int64_t G, const QuantInput& in, int64_t r0, float* out) {
  const int8_t* q = static_cast<const int8_t*>(w.q);
  const float* x = in.x + r0 * in.XS;
  const int64_t xs = in.XS;
  __m512 acc[nw][rb];
  for (int i = 0; i < nw; ++i)
    for (int r = 0; r < rb; ++r) acc[i][r] = _mm512_setzero_ps();
  if (G == K) {  // one scale per row (any K): the sums first, the scale at the end
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      if ((k & 63) == 0)
        for (int i = 0; i < nw; ++i) prefetch_ahead(q + i * w.qs + k);
      int8_step<nw, rb>(q + k, w.qs, x + k, xs, acc);
      int8_step<nw, rb>(q + k + 16, w.qs, x + k + 16, xs, acc);
    }
    for (; k < K; k += 16) int8_step<nw, rb, true>(q + k, w.qs, x + k, xs, acc, lanes(K - k));
    for (int i = 0; i < nw; ++i) {
      const __m512 sv = _mm512_set1_ps(half_to_float(w.sc[i * w.gs]));
      for (int r = 0; r < rb; ++r) acc[i][r] = _mm512_mul_ps(acc[i][r], sv);
    }
    reduce_block<nw, rb>(acc, out);
    return;
  }
  const int64_t groups = w.gs;
  alignas(64) float s[nw][16];
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t n = std::min<int64_t>(16, groups - g0);
    __m512 S[nw];
    group_scales<nw>(w, g0, n, S);
    for (int i = 0; i < nw; ++i) _mm512_store_ps(s[i], S[i]);  // broadcast from memory, group by group
    for (int64_t g = 0; g < n; ++g) {
      const int64_t k0 = (g0 + g) * G;
      __m512 t[nw][rb];
      for (int i = 0; i < nw; ++i)
        for (int r = 0; r < rb; ++r) t[i][r] = _mm512_setzero_ps();
      for (int64_t k = k0; k < k0 + G; k += 32) {  // G: a multiple of 32
        if ((k & 63) == 0)
          for (int i = 0; i < nw; ++i) prefetch_ahead(q + i * w.qs + k);
        int8_step<nw, rb>(q + k, w.qs, x + k, xs, t);
        int8_step<nw, rb>(q + k + 16, w.qs, x + k + 16, xs, t);
      }
      for (int i = 0; i < nw; ++i) {
        const __m512 sv = _mm512_set1_ps(s[i][g]);
        for (int r = 0; r < rb; ++r) acc[i][r] = _mm512_fmadd_ps(t[i][r], sv, acc[i][r]);
      }
    }
  }
  reduce_block<nw, rb>(acc, out);
}

// t[i][r] += the 64 codes of two runs (32 bytes at q + i * qs; the first run's 16 only when `one`) . x[r] (in
// int4 order, rows xs apart), for the nw rows and rb batch rows. Lanes 0-7 of t take the first run, 8-15 the
// second.
template <int nw, int rb>
inline void int4_step(const uint8_t* q, int64_t qs, bool one, const float* x4, int64_t xs, __m512 (&t)[nw][rb]) {
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int i = 0; i < nw; ++i) {
    const uint8_t* p = q + i * qs;
    const __m256i bytes = one ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                              : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i w = _mm512_cvtepu8_epi16(bytes);
    const __m512 a = _mm512_permutexvar_ps(w, table);  // the low 4 bits of each dword
    const __m512 b = _mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(0xf0)));
    const __m512 c = _mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(0xf0000)));
    const __m512 d = _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 20));
    for (int r = 0; r < rb; ++r) {  // x from L1 at each use (at rb 8 all of it would not fit in registers)
      const float* xr = x4 + r * xs;
      t[i][r] = _mm512_fmadd_ps(a, _mm512_loadu_ps(xr), t[i][r]);
      t[i][r] = _mm512_fmadd_ps(b, _mm512_loadu_ps(xr + 16), t[i][r]);
      t[i][r] = _mm512_fmadd_ps(c, _mm512_loadu_ps(xr + 32), t[i][r]);
      t[i][r] = _mm512_fmadd_ps(d, _mm512_loadu_ps(xr + 48), t[i][r]);
    }
  }
}

// As int8_block for nw int4 rows (K/2 stored bytes each, Q4_0 runs; G: 32, 64 or 128; with or without mins), x in
// int4 order. Groups of 32 take two scales per 64 inputs (lanes 0-7 and 8-15 of the sums), larger ones one per G / 64
// steps.
template <int nw, int rb>
inline void int4_block(const RowBlock& w, int64_t K, int64_t G, const QuantInput& in, int64_t r0, float* out) {
  const uint8_t* q = static_cast<const uint8_t*>(w.q);
  const float* x4 = in.x4 + r0 * in.XS;
  __m512 acc[nw][rb], off[nw][rb];
  for (int i = 0; i < nw; ++i)
    for (int r = 0; r < rb; ++r) acc[i][r] = off[i][r] = _mm512_setzero_ps();
  const int64_t groups = w.gs, runs = K >> 5;
  alignas(64) float s[nw][16];
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t n = std::min<int64_t>(16, groups - g0);
    __m512 S[nw];
    group_scales<nw>(w, g0, n, S);
    group_offsets<nw, rb>(w, g0, n, S, in, r0, G, acc, off);
    if (G == 32) {
      __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
      for (int64_t b = g0; b < g0 + n; b += 2) {  // runs b, b + 1 (b even: g0 is a multiple of 16)
        if ((b & 3) == 0)
          for (int i = 0; i < nw; ++i) prefetch_ahead(q + i * w.qs + 16 * b);
        __m512 t[nw][rb];
        for (int i = 0; i < nw; ++i)
          for (int r = 0; r < rb; ++r) t[i][r] = _mm512_setzero_ps();
        int4_step<nw, rb>(q + 16 * b, w.qs, b + 1 == runs, x4 + 32 * b, in.XS, t);
        for (int i = 0; i < nw; ++i) {
          const __m512 sv = _mm512_permutexvar_ps(idx, S[i]);
          for (int r = 0; r < rb; ++r) acc[i][r] = _mm512_fmadd_ps(t[i][r], sv, acc[i][r]);
        }
        idx = _mm512_add_epi32(idx, _mm512_set1_epi32(2));
      }
      continue;
    }
    for (int i = 0; i < nw; ++i) _mm512_store_ps(s[i], S[i]);  // broadcast from memory, group by group
    for (int64_t g = 0; g < n; ++g) {
      __m512 t[nw][rb];
      for (int i = 0; i < nw; ++i)
        for (int r = 0; r < rb; ++r) t[i][r] = _mm512_setzero_ps();
      for (int64_t k = (g0 + g) * G; k < (g0 + g + 1) * G; k += 64) {
        if ((k & 127) == 0)
          for (int i = 0; i < nw; ++i) prefetch_ahead(q + i * w.qs + k / 2);
        int4_step<nw, rb>(q + k / 2, w.qs, false, x4 + k, in.XS, t);
      }
      for (int i = 0; i < nw; ++i) {
        const __m512 sv = _mm512_set1_ps(s[i][g]);
        for (int r = 0; r < rb; ++r) acc[i][r] = _mm512_fmadd_ps(t[i][r], sv, acc[i][r]);
      }
    }
  }
  if (!w.mn)
    for (int i = 0; i < nw; ++i)
      for (int r = 0; r < rb; ++r) acc[i][r] = _mm512_fmadd_ps(off[i][r], _mm512_set1_ps(-8.f), acc[i][r]);
  reduce_block<nw, rb>(acc, out);
}

#include "cpu_decode_quant_vnni.h"  // int8_block_vnni, int4_block_vnni: the products of int8 inputs

// f(std::integral_constant<int, rb>) for a runtime rb in 1..8.
template <class F>
inline void with_rows(int rb, const F& f) {
  switch (rb) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
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
    if (in.int8) {
      if (W.kind == kInt8) int8_block_vnni<nw, rb>(block(n), K, G, in, r0, out);
      else int4_block_vnni<nw, rb>(block(n), K, G, in, r0, out);
    } else {
      if (W.kind == kInt8) int8_block<nw, rb>(block(n), K, G, in, r0, out);
      else int4_block<nw, rb>(block(n), K, G, in, r0, out);
    }
    if constexpr (rb == 1 && nw == 4) {  // vectorised rounding and store of the 4 columns, loaded as stored
      emit.lanes16(r0, n, _mm512_castps128_ps512(_mm_loadu_ps(out)), 0xf);
    } else {
      for (int i = 0; i < nw; ++i)
        for (int r = 0; r < rb; ++r) emit(r0 + r, n + i, out[i * rb + r]);
    }
  };
  using one = std::integral_constant<int, 1>;
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int rb = int(std::min<int64_t>(RB, R - r0));
    int64_t n = n0;
    if (rb == 1)
      for (; n + 4 <= n1; n += 4) run(std::integral_constant<int, 4>{}, one{}, n, r0);
    if (rb == 2)
      for (; n + 2 <= n1; n += 2) run(std::integral_constant<int, 2>{}, std::integral_constant<int, 2>{}, n, r0);
    for (; n < n1; ++n) with_rows(rb, [&](auto rb_c) { run(one{}, rb_c, n, r0); });
  }
}
