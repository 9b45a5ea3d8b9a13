// Prefill products on quantised weights on AMX tiles: y = x W^T for x [R, K] bf16 and W int8 / int4 codes, each
// block of 32 weight rows dequantised to bf16 into a buffer of the thread's own (L1 / L2), then multiplied there
// by every block of 16 input rows on the tile unit (amx::block), and never written out as a dense matrix.
//
// Why: a prompt of R tokens multiplies each matrix by R rows. Dequantising the whole matrix to memory first
// (idefics3_dequantize, then oneDNN) writes and reads back 2 bytes per weight: on SmolVLM-256M's decoder that is
// 12 ms of a 20-token prompt whose bf16 multiplies take 7.5 ms, so a short text prompt's first token came 1.4x
// later than bf16's. Here the bf16 weights only pass through the cache, and the products run at the tile unit's
// rate; for prompts with many rows the dense path reuses each row better, so which one a matrix takes is
// measured per shape and row count (kernels/calibrate.py: quantised_prefill).
//
// Layout as cpu_decode_amx.h: the dequantised rows are the A operand, row-major [32][K] (no repacking: they are
// made in that layout), x in AMX's pair layout is the B operand (amx::to_pairs, once per call and shared by the
// threads), C is 16 output rows x 16 input rows in fp32, stored transposed into y [R, N].
//
// Numerics: each weight is rounded to bf16 as the dense path (`dequantized(bfloat16)`) rounds it, products of
// bf16 values are exact in fp32, sums are fp32: the dense path's result up to the order of the sums.
//
// Not a standalone header: cpu_decode.cpp includes it inside its anonymous namespace, after cpu_decode_quant.h
// (dequantize_row16) and BF16.

#pragma once

#ifdef IDEFICS3_HAVE_AMX

// Row n of a quantised W rounded to bf16, out [K] (K a multiple of 32): the values of dequantize_row16 (the same
// fp32 arithmetic), each run of 32 rounded to nearest even in one vcvtne2ps2bf16 straight from the registers.
inline void dequantize_row_bf16(const Weight& w, int64_t n, int64_t K, uint16_t* out) {
  const uint16_t* sc = w.scales + n * w.groups;
  const uint16_t* mn = w.kind == kInt4Mins ? w.mins + n * w.groups : nullptr;
  const int8_t* q8 = static_cast<const int8_t*>(w.data) + n * w.cols;
  const uint8_t* q4 = static_cast<const uint8_t*>(w.data) + n * (w.cols / 2);
  const __m512i low = _mm512_set1_epi32(0x0f), eight = _mm512_set1_epi32(8);
  for (int64_t g = 0, k = 0; g < w.groups && k < K; ++g) {
    const __m512 s = _mm512_set1_ps(half_to_float(sc[g])), m = _mm512_set1_ps(mn ? half_to_float(mn[g]) : 0.f);
    for (const int64_t end = std::min<int64_t>(K, k + w.group); k < end; k += 32) {  // groups: multiples of 32
      __m512 v0, v1;  // inputs k .. k + 15 and k + 16 .. k + 31
      if (w.kind == kInt8) {
        v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q8 + k)))), s);
        v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q8 + k + 16)))), s);
      } else {  // the run's 16 bytes: inputs 0-15 in the low nibbles, 16-31 in the high ones
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q4 + k / 32 * 16)));
        const __m512i c0 = _mm512_and_si512(bytes, low), c1 = _mm512_and_si512(_mm512_srli_epi32(bytes, 4), low);
        v0 = mn ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(c0), s, m) : _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c0, eight)), s);
        v1 = mn ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(c1), s, m) : _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c1, eight)), s);
      }
      _mm512_storeu_si512(out + k, _mm512_castps_si512((__m512)_mm512_cvtne2ps_pbh(v1, v0)));
    }
  }
}

// Rows n0 .. n0 + count - 1 of a quantised W as bf16 into out [32][K] (rows past count zero).
inline void dequantize_block_bf16(const Weight& w, int64_t n0, int64_t count, int64_t K, uint16_t* out) {
  for (int64_t i = 0; i < 32; ++i) {
    if (i < count) dequantize_row_bf16(w, n0 + i, K, out + i * K);
    else std::fill(out + i * K, out + (i + 1) * K, uint16_t(0));
  }
}

// C [16 output rows][rb input rows] fp32 as y[r0 + j][n0 .. n0 + count) in bf16, for the valid input rows j.
inline void store_columns_bf16(const float* c, int64_t rb, int64_t valid, int64_t r0, int64_t n0, int64_t count,
                               uint16_t* y, int64_t N) {
  const __m512i stride = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(int(rb)));
  for (int64_t j = 0; j < valid; ++j)
    BF16::store16(y + (r0 + j) * N + n0, _mm512_i32gather_ps(stride, c + j, 4), lanes(count));
}

// y [R, N] bf16 = x [R, K] bf16 times the quantised W^T, K a multiple of 32; the AMX state already granted.
inline void quant_matmul_amx(const Weight& W, int64_t N, int64_t K, const uint16_t* x, int64_t R, uint16_t* y,
                             int n_threads) {
  const int64_t rb = std::min<int64_t>(R, amx::MAXB), blocks = (R + amx::MAXB - 1) / amx::MAXB;
  std::vector<uint16_t> pairs(blocks * (K / amx::KC) * 16 * rb * 2);  // [blocks][K/32][16 pairs][rb][2]
#pragma omp parallel num_threads(n_threads)
  {
    amx::configure(int(rb));
    std::vector<uint16_t> a(32 * K);  // the A tiles: 32 dequantised weight rows [32][K]
    float c[2][16 * amx::MAXB];
    amx::to_pairs(x, R, K, pairs.data());  // an orphaned omp for, ending in a barrier
#pragma omp for schedule(static)
    for (int64_t u = 0; u < (N + 31) / 32; ++u) {
      const int64_t n0 = 32 * u, count = std::min<int64_t>(32, N - n0);
      dequantize_block_bf16(W, n0, count, K, a.data());
      for (int64_t b = 0; b < blocks; ++b) {
        amx::block(a.data(), count > 16 ? a.data() + 16 * K : nullptr, K,
                   pairs.data() + b * (K / amx::KC) * 16 * rb * 2, int(rb), c[0], c[1], 0);
        const int64_t valid = std::min<int64_t>(rb, R - b * amx::MAXB);
        store_columns_bf16(c[0], rb, valid, b * amx::MAXB, n0, std::min<int64_t>(16, count), y, N);
        if (count > 16) store_columns_bf16(c[1], rb, valid, b * amx::MAXB, n0 + 16, count - 16, y, N);
      }
    }
    amx::release();
  }
}

#endif  // IDEFICS3_HAVE_AMX
