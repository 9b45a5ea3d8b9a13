// Quantised matrix products of int8 inputs (AVX512-VNNI): y = x W^T with W's int8 / int4 codes multiplied by
// int8 codes of x in integer arithmetic, four byte products per 32-bit lane and instruction (vpdpbusd).
//
// Why: cpu_decode_quant.h's products widen every code to fp32 and spend an FMA on it: ~0.22 port slots per code
// (7 per 32 int8 codes, 14 per 64 int4 codes), so on a Xeon core they run at 20-25 G codes/s, below what the
// memory gives at batch 1 (int4: 2 codes per byte). With x rounded to int8 once per step and input, a 64-byte
// vector of codes takes one vpdpbusd (int8 weights) or two plus a mask and a shift (int4: 128 codes), and the
// scales are applied per 16 lanes: ~0.11 slots per int8 code and ~0.08 per int4 code. Measured on SmolVLM-256M's
// decoder at batch 1 (bench/quant_decode_micro.py, 2 threads): int4 steps 1.55x, int8 1.2x faster than on fp32
// inputs. llama.cpp's CPU path does the same (Q8_0 activations).
//
// Numerics: the products are exact integer sums of codes times codes; what changes is x, rounded per run of 32
// inputs to int8 with one fp32 scale d = max|x| / 127 (int8_inputs_row, quant/format.py's quantize_inputs): a
// relative error of at most 1/254 of the run's largest input per input. The result equals dequantise(W) times
// the rounded x up to the order of fp32 roundings, which is what the tests check. The fp32-input products of
// cpu_decode_quant.h stay the reference (IDEFICS3_QUANT_INPUTS=fp32 selects them; see cpu_decode.py).
//
// How, per 64 codes (int8) or 128 codes (int4, a Q4_0 block of 4 runs of 32):
// - int8 W: vpdpbusd multiplies unsigned bytes by signed ones; the codes w are made unsigned as w + 128 (an xor
//   of the sign bit) and the extra 128 sum(q) of each run is taken off at the end with the group sums, as the
//   int4 offset -8 sum(x) is (one FMA per 16 groups): y = sum_g s_g (sum (w + 128) q d) - 128 s_g X_g;
// - int4 W: the low and high nibbles of 64 bytes are 128 unsigned codes c in 0..15 as they are, against q in
//   int4 order (per 128 inputs the first 16 of each run, then the last 16); W = s (c - 8) or s c + m as in
//   cpu_decode_quant.h;
// then lane l of the int32 sums belongs to one run: converted to fp32 and multiplied by its run's d and its
// group's scale (both spread over the lanes: d once per step and input, the scales from 16 in a register by a
// permute), summed into fp32 accumulators.
//
// Not a standalone header: cpu_decode_quant.h includes it after RowBlock, group_scales and group_offsets.

#pragma once

// 64-bit lane mask of the first n bytes (all for n >= 64).
inline __mmask64 bytes64(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }

// out[i * rb + r] = W[row i] . x[r0 + r] for nw int8 rows (as int8_block; x as int8 inputs).
template <int nw, int rb>
inline void int8_block_vnni(const RowBlock& w, int64_t K, int64_t G, const QuantInput& in, int64_t r0, float* out) {
  const int8_t* q = static_cast<const int8_t*>(w.q);
  const int8_t* xq = in.xq + r0 * in.XS;
  const float* d8 = in.d8 + r0 * (in.XS / 4);
  const int64_t xs = in.XS, ds = in.XS / 4;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512 acc[nw][rb], off[nw][rb];
  for (int i = 0; i < nw; ++i)
    for (int r = 0; r < rb; ++r) acc[i][r] = off[i][r] = _mm512_setzero_ps();
  // the 64 codes at k of the nw rows (the first `n` of them) times x, each lane's sum times sv[i] and d
  const auto step = [&](int64_t k, int64_t n, const __m512 (&sv)[nw]) {
    __m512i xv[rb];
    __m512 dv[rb];
    for (int r = 0; r < rb; ++r) {
      xv[r] = _mm512_loadu_si512(xq + r * xs + k);  // zero past K: a masked code's 128 adds nothing
      dv[r] = _mm512_loadu_ps(d8 + r * ds + k / 4);
    }
    if (n >= 64 && (k & 63) == 0)
      for (int i = 0; i < nw; ++i) prefetch_ahead(q + i * w.qs + k);
    for (int i = 0; i < nw; ++i) {
      const int8_t* p = q + i * w.qs + k;
      const __m512i c = _mm512_xor_si512(n >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(bytes64(n), p), flip);
      for (int r = 0; r < rb; ++r) {
        const __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, xv[r]);
        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sv[i], dv[r]), acc[i][r]);
      }
    }
  };
  if (G == K) {  // one scale per row (any K): the scale with the sums, the offset from the row's total
    __m512 sv[nw];
    for (int i = 0; i < nw; ++i) sv[i] = _mm512_set1_ps(half_to_float(w.sc[i * w.gs]));
    for (int64_t k = 0; k < K; k += 64) step(k, K - k, sv);
    for (int i = 0; i < nw; ++i)
      for (int r = 0; r < rb; ++r)
        acc[i][r] = _mm512_add_ps(acc[i][r], _mm512_maskz_mov_ps(1, _mm512_set1_ps(-128.f * half_to_float(w.sc[i * w.gs]) * in.total(r0 + r))));
    reduce_block<nw, rb>(acc, out);
    return;
  }
  const int64_t groups = w.gs;
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t n = std::min<int64_t>(16, groups - g0), end = (g0 + n) * G;
    __m512 S[nw];
    group_scales<nw>(w, g0, n, S);
    group_offsets<nw, rb>(w, g0, n, S, in, r0, G, acc, off);
    for (int64_t k = g0 * G; k < end; k += 64) {
      // lanes 0-7 read the run at k, lanes 8-15 the next: their groups' scales
      const __m512i idx = _mm512_mask_blend_epi32(0xff00, _mm512_set1_epi32(int(k / G - g0)),
                                                  _mm512_set1_epi32(int((k + 32) / G - g0)));
      __m512 sv[nw];
      for (int i = 0; i < nw; ++i) sv[i] = _mm512_permutexvar_ps(idx, S[i]);
      step(k, end - k, sv);
    }
  }
  for (int i = 0; i < nw; ++i)
    for (int r = 0; r < rb; ++r) acc[i][r] = _mm512_fmadd_ps(off[i][r], _mm512_set1_ps(-128.f), acc[i][r]);
  reduce_block<nw, rb>(acc, out);
}

// As int4_block for nw int4 rows (Q4_0 runs; G: 32, 64 or 128; with or without mins), x as int8 inputs.
template <int nw, int rb>
inline void int4_block_vnni(const RowBlock& w, int64_t K, int64_t G, const QuantInput& in, int64_t r0, float* out) {
  const uint8_t* q = static_cast<const uint8_t*>(w.q);
  const int8_t* xq4 = in.xq4 + r0 * in.XS;
  const float* d4 = in.d4 + r0 * (in.XS / 4);
  const int64_t xs = in.XS, ds = in.XS / 4;
  const __m512i low = _mm512_set1_epi8(0x0f);
  // lane l reads run l / 4 of a block of 128: its group's place among the 16 in a register is
  // (k / 32 + l / 4) >> shift, less g0
  const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const int shift = G == 32 ? 0 : G == 64 ? 1 : 2;
  __m512 acc[nw][rb], off[nw][rb];
  for (int i = 0; i < nw; ++i)
    for (int r = 0; r < rb; ++r) acc[i][r] = off[i][r] = _mm512_setzero_ps();
  const int64_t groups = w.gs;
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t n = std::min<int64_t>(16, groups - g0), end = (g0 + n) * G;
    __m512 S[nw];
    group_scales<nw>(w, g0, n, S);
    group_offsets<nw, rb>(w, g0, n, S, in, r0, G, acc, off);
    for (int64_t k = g0 * G; k < end; k += 128) {  // the block's codes at k / 2; the last may have 32, 64 or 96
      const __m512i idx = _mm512_sub_epi32(
          _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32(int(k / 32)), quarter), shift), _mm512_set1_epi32(int(g0)));
      __m512i lo[rb], hi[rb];
      __m512 dv[rb];
      for (int r = 0; r < rb; ++r) {
        lo[r] = _mm512_loadu_si512(xq4 + r * xs + k);
        hi[r] = _mm512_loadu_si512(xq4 + r * xs + k + 64);
        dv[r] = _mm512_loadu_ps(d4 + r * ds + k / 8);
      }
      const bool whole = end - k >= 128;
      for (int i = 0; i < nw; ++i) {
        const uint8_t* p = q + i * w.qs + k / 2;
        if (whole) prefetch_ahead(p);
        const __m512i bytes = whole ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(bytes64((end - k) / 2), p);
        const __m512i cl = _mm512_and_si512(bytes, low), ch = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
        const __m512 sv = _mm512_permutexvar_ps(idx, S[i]);
        for (int r = 0; r < rb; ++r) {
          const __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), cl, lo[r]), ch, hi[r]);
          acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sv, dv[r]), acc[i][r]);
        }
      }
    }
  }
  if (!w.mn)
    for (int i = 0; i < nw; ++i)
      for (int r = 0; r < rb; ++r) acc[i][r] = _mm512_fmadd_ps(off[i][r], _mm512_set1_ps(-8.f), acc[i][r]);
  reduce_block<nw, rb>(acc, out);
}
