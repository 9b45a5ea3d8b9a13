// Flash attention on CPUs with AVX512-BF16, for the vision encoder and the text prefill (see cpu_attention.py).
//
// out[b, t, h, :] = softmax_j(q[b, h, t, :] . k[b, h / G, j, :] * scale) v[b, h / G, j, :] over the keys j that
// query row t may see: the valid keys of frame b (key_valid; the vision encoder's padded patches), or keys
// j < limit[b, t] (the text's causal mask, with a cached prefix or not), or all. q, k and v are bf16 in any
// layout with unit stride along the head dimension (strides passed in elements: the projections' [B, S, H, D]
// output read in place, or the KV cache's [B, Hkv, L, D]); out is written as a contiguous [B, T, H, D], what
// o_proj / out_proj read, so no transpose or copy happens around the call. G = H / Hkv query heads share a
// kv head (GQA) and read the same packed K/V.
//
// Why a kernel of our own: aten's CPU flash attention runs a SigLIP layer at about a third of the bf16
// matrix-multiply rate (many small oneDNN calls and fp32 <-> bf16 passes over each score block), and
// attention was 35% of the encoder's time. Here both products run on vdpbf16ps straight from registers:
//   1. K and V of one (frame, kv head) are packed once into pair-interleaved tiles (K: 16 keys x 2 dims per
//      vector, V: 16 dims x 2 keys per vector), only the valid keys, zero-padded to a block of 64;
//   2. 4 query rows at a time sweep the keys they may see in blocks of 64: the 4x64 scores live in 16
//      registers, the online softmax (running max, exp2 by polynomial, fp32 sums) runs on them in place, the
//      4x64 probabilities are rounded to bf16 (as aten does before its second product) and multiplied into V
//      with the 4 x D output accumulators in registers. Causal rows stop at their last block.
// The packed K/V of a head (256 KB at 1024 keys of 64 dims) stay in L2 while its query rows sweep them.
// Masked keys are dropped at packing (or past a row's limit), which is what an additive -inf mask computes.
// No torch header is included (it compiles in about a second); the C ABI is called through ctypes.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

typedef uint16_t bf16;

namespace {

constexpr int KB = 64;  // keys per softmax block: 4 vectors of 16 scores per query row
constexpr int MR = 4;   // query rows that sweep the keys together
constexpr int QB = 32;  // query rows per work item (the unit split between threads)

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// 2^x for x <= 0 (fp32, ~1e-7 relative): 2^round(x) * p(x - round(x)), p the degree-7 Taylor series of 2^f.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5252734e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// K of one (frame, head) -> kp[key block of 16][dim pair][16 keys][2 dims]; keys `idx[0..nkv)` (all when
// idx is null), zero past nkv up to npad.
void pack_k(const bf16* k, int64_t stride, const int32_t* idx, int64_t nkv, int64_t npad, int pairs, bf16* kp) {
  uint32_t* dst = reinterpret_cast<uint32_t*>(kp);
  for (int64_t jb = 0; jb < npad / 16; ++jb)
    for (int p = 0; p < pairs; ++p)
      for (int t = 0; t < 16; ++t) {
        const int64_t j = jb * 16 + t;
        const int64_t row = j < nkv ? (idx ? idx[j] : j) : -1;
        *dst++ = row >= 0 ? *reinterpret_cast<const uint32_t*>(k + row * stride + 2 * p) : 0u;
      }
}

// V of one (frame, head) -> vp[key pair][dim, padded to dpad][2 keys].
void pack_v(const bf16* v, int64_t stride, const int32_t* idx, int64_t nkv, int64_t npad, int d, int dpad,
            bf16* vp) {
  for (int64_t jp = 0; jp < npad / 2; ++jp) {
    const int64_t j0 = 2 * jp, j1 = j0 + 1;
    const bf16* r0 = j0 < nkv ? v + (idx ? idx[j0] : j0) * stride : nullptr;
    const bf16* r1 = j1 < nkv ? v + (idx ? idx[j1] : j1) * stride : nullptr;
    bf16* dst = vp + jp * dpad * 2;
    for (int c = 0; c < dpad; ++c) {
      dst[2 * c] = (r0 && c < d) ? r0[c] : 0;
      dst[2 * c + 1] = (r1 && c < d) ? r1[c] : 0;
    }
  }
}

// acc[r][c] += sum over the block's key pairs of p[r][pair] * v[pair][c], for PR rows from `row0`.
template <int ND, int PR>
inline void probs_times_v(const bf16 (*pb)[KB], int row0, const bf16* vb, int dpad, const float* alpha,
                          float (*o)[ND * 16]) {
  __m512 acc[PR][ND];
#pragma GCC unroll 8
  for (int r = 0; r < PR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < ND; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int jp = 0; jp < KB / 2; ++jp) {
    __m512i vv[ND];
#pragma GCC unroll 8
    for (int c = 0; c < ND; ++c) vv[c] = _mm512_loadu_si512(vb + (jp * dpad + c * 16) * 2);
#pragma GCC unroll 8
    for (int r = 0; r < PR; ++r) {
      const __m512i p = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(&pb[row0 + r][2 * jp]));
#pragma GCC unroll 8
      for (int c = 0; c < ND; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(vv[c]), as_bh(p));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < PR; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[row0 + r]);
#pragma GCC unroll 8
    for (int c = 0; c < ND; ++c) {
      float* dst = &o[row0 + r][c * 16];
      _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_loadu_ps(dst), a, acc[r][c]));
    }
  }
}

// MR query rows (`rows` of them real; the rest repeat the last, lim included) against the keys of one head:
// row r sees packed keys j < lim[r] (each at most the packed count).
template <int ND>
void attend_rows(const bf16* q, int64_t stride, int rows, const bf16* kp, const bf16* vp, const int64_t* lim,
                 int d, float s2, bf16* out, int64_t out_stride) {
  constexpr int DPAD = ND * 16;
  const int pairs = d / 2;
  const bf16* qr[MR];
  int64_t last = 0;  // the furthest key any of the rows sees
  for (int r = 0; r < MR; ++r) {
    qr[r] = q + std::min(r, rows - 1) * stride;
    last = std::max(last, lim[r]);
  }
  const int64_t npad = (last + KB - 1) / KB * KB;
  alignas(64) float o[MR][DPAD];
  alignas(64) bf16 pb[MR][KB];
  float m[MR], alpha[MR];
  __m512 lsum[MR];
  memset(o, 0, sizeof(o));
  for (int r = 0; r < MR; ++r) m[r] = -INFINITY, lsum[r] = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < npad; j0 += KB) {
    __m512 s[MR][4];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
    const bf16* kb = kp + (j0 / 16) * pairs * 32;
    for (int p = 0; p < pairs; ++p) {
      __m512i kv[4];
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) kv[c] = _mm512_loadu_si512(kb + (c * pairs + p) * 32);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m512i qq = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(qr[r] + 2 * p));
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) s[r][c] = _mm512_dpbf16_ps(s[r][c], as_bh(kv[c]), as_bh(qq));
      }
    }
    // keys at or past a row's limit (its causal bound, or the zero padding of the last block) are left out
    // of the max and get probability 0
    __mmask16 valid[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < 4; ++c) {
        const int64_t left = lim[r] - (j0 + 16 * c);
        valid[r][c] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
      }
    const __m512 neg = _mm512_set1_ps(-INFINITY), scale = _mm512_set1_ps(s2);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      __m512 mx = neg;
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        s[r][c] = _mm512_mask_mul_ps(neg, valid[r][c], s[r][c], scale);
        mx = _mm512_max_ps(mx, s[r][c]);
      }
      const float mnew = std::max(m[r], _mm512_reduce_max_ps(mx));
      alpha[r] = std::exp2(m[r] - mnew);  // 0 on the first block (m = -inf)
      m[r] = mnew;
      const __m512 mv = _mm512_set1_ps(mnew);
      __m512 p[4];
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) p[c] = _mm512_maskz_mov_ps(valid[r][c], exp2_ps(_mm512_sub_ps(s[r][c], mv)));
      lsum[r] = _mm512_fmadd_ps(lsum[r], _mm512_set1_ps(alpha[r]),
                                _mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3])));
      _mm512_storeu_si512(&pb[r][0], (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0]));
      _mm512_storeu_si512(&pb[r][32], (__m512i)_mm512_cvtne2ps_pbh(p[3], p[2]));
    }
    const bf16* vb = vp + j0 * DPAD;  // (j0 / 2) key pairs of DPAD x 2
    if constexpr (ND <= 5) {
      probs_times_v<ND, 4>(pb, 0, vb, DPAD, alpha, o);
    } else {
      probs_times_v<ND, 2>(pb, 0, vb, DPAD, alpha, o);
      probs_times_v<ND, 2>(pb, 2, vb, DPAD, alpha, o);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(lsum[r]));
    bf16* dst = out + r * out_stride;
    for (int c = 0; c < ND; ++c) {
      const int left = d - 16 * c;
      const __mmask16 k = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m256i y = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(&o[r][c * 16]), inv));
      _mm256_mask_storeu_epi16(dst + c * 16, k, y);
    }
  }
}

using RowsFn = void (*)(const bf16*, int64_t, int, const bf16*, const bf16*, const int64_t*, int, float, bf16*,
                        int64_t);

RowsFn rows_fn(int d) {
  switch ((d + 15) / 16) {
    case 1: return attend_rows<1>;
    case 2: return attend_rows<2>;
    case 3: return attend_rows<3>;
    case 4: return attend_rows<4>;
    case 5: return attend_rows<5>;
    case 6: return attend_rows<6>;
    case 7: return attend_rows<7>;
    case 8: return attend_rows<8>;
    default: return nullptr;
  }
}

}  // namespace

extern "C" {

// q: [B, H, T, D] at strides (qs[0], qs[1], qs[2]); k, v: [B, Hkv, L, D] at strides ks (both); unit stride
// along D. out: contiguous [B, T, H, D]. key_valid: uint8 [B, L] (1 = attend) or null; limit: int64 [B, T]
// (row t sees keys j < limit) or null; not both. Returns 0; 1 for an unsupported head size (odd or above 128)
// or H not a multiple of Hkv; 2 when a frame has no valid key or a limit is outside 1..L.
int idefics3_attention(const void* q_p, const void* k_p, const void* v_p, void* out_p, int64_t B, int64_t H,
                       int64_t Hkv, int64_t T, int64_t L, int64_t D, const int64_t* qs, const int64_t* ks,
                       const uint8_t* key_valid, const int64_t* limit, float scale, int n_threads) {
  const RowsFn fn = rows_fn(int(D));
  if (!fn || D % 2 || Hkv <= 0 || H % Hkv || T <= 0 || L <= 0) return 1;
  const bf16* q = static_cast<const bf16*>(q_p);
  const bf16* k = static_cast<const bf16*>(k_p);
  const bf16* v = static_cast<const bf16*>(v_p);
  bf16* out = static_cast<bf16*>(out_p);
  const int64_t G = H / Hkv, dpad = (D + 15) / 16 * 16, npad = (L + KB - 1) / KB * KB;
  std::vector<int32_t> idx(key_valid ? B * L : 0);
  std::vector<int64_t> nkv(B, L);
  if (key_valid)
    for (int64_t b = 0; b < B; ++b) {
      int64_t n = 0;
      for (int64_t j = 0; j < L; ++j)
        if (key_valid[b * L + j]) idx[b * L + n++] = int32_t(j);
      if (n == 0) return 2;
      nkv[b] = n;
    }
  if (limit)
    for (int64_t i = 0; i < B * T; ++i)
      if (limit[i] < 1 || limit[i] > L) return 2;
  const int64_t kp_size = npad * D, vp_size = npad * dpad;  // elements per (frame, kv head)
  std::vector<bf16> kp(B * Hkv * kp_size), vp(B * Hkv * vp_size);
  const float s2 = scale * 1.4426950408889634f;  // scores in log2 units: softmax by exp2
  const int64_t qblocks = (T + QB - 1) / QB, out_stride = H * D;
#pragma omp parallel num_threads(n_threads)
  {
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * Hkv; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const int32_t* ix = key_valid ? idx.data() + b * L : nullptr;
      const int64_t at = b * ks[0] + h * ks[1];
      pack_k(k + at, ks[2], ix, nkv[b], npad, int(D / 2), kp.data() + bh * kp_size);
      pack_v(v + at, ks[2], ix, nkv[b], npad, int(D), int(dpad), vp.data() + bh * vp_size);
    }
    // round-robin over (frame, head, query block): causal rows grow longer down the sequence
#pragma omp for schedule(static, 1)
    for (int64_t item = 0; item < B * H * qblocks; ++item) {
      const int64_t bh = item / qblocks, b = bh / H, h = bh % H, i0 = (item % qblocks) * QB;
      const int64_t kvh = b * Hkv + h / G;
      int64_t lim[MR];
      for (int64_t i = i0; i < std::min(i0 + QB, T); i += MR) {
        const int rows = int(std::min<int64_t>(MR, T - i));
        for (int r = 0; r < MR; ++r) lim[r] = limit ? limit[b * T + i + std::min(r, rows - 1)] : nkv[b];
        fn(q + b * qs[0] + h * qs[1] + i * qs[2], qs[2], rows, kp.data() + kvh * kp_size, vp.data() + kvh * vp_size,
           lim, int(D), s2, out + (b * T + i) * out_stride + h * D, out_stride);
      }
    }
  }
  return 0;
}

}  // extern "C"
