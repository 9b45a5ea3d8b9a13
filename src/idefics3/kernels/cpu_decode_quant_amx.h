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
// (dequantize_row_bf16), Sink and emit_columns.

#pragma once

#ifdef IDEFICS3_HAVE_AMX

// Rows n0 .. n0 + count - 1 (count <= 32) of a quantised W rounded to bf16 (dequantize_row_bf16) into out [32][K].
// Rows past count keep what they held: they only feed output rows that are never stored.
inline void dequantize_block_bf16(const Weight& w, int64_t n0, int64_t count, int64_t K, uint16_t* out) {
  for (int64_t i = 0; i < count; ++i) dequantize_row_bf16(w, n0 + i, K, out + i * K);
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
    const Sink<BF16> emit{{y, N, Store::Cast}};
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
        emit_columns(c[0], rb, valid, b * amx::MAXB, n0, emit, int(std::min<int64_t>(16, count)));
        if (count > 16) emit_columns(c[1], rb, valid, b * amx::MAXB, n0 + 16, emit, int(count - 16));
      }
    }
    amx::release();
  }
}

#endif  // IDEFICS3_HAVE_AMX
