// Decode attention of cpu_decode.cpp: one query (or the query heads of one kv head) against a slot's keys and
// values, two-pass softmax in fp32, on AVX-512 (vdpbf16ps for bf16 caches).
//
// Not a standalone header: cpu_decode.cpp includes it inside its anonymous namespace, after the element traits
// (F32, BF16), lanes(), round_bf16_bits(), exp16() and PREFETCH_BYTES it uses. Kept apart because attention is
// its own concern (the cache layout, GQA grouping, shared prompt prefixes) next to the matrix products there.

#pragma once

// The sums of 8 vectors, in order.
inline __m256 sums8(const __m512* v) {
  __m512 t[4];
  for (int i = 0; i < 4; ++i)  // [v2i block sums (8 lanes) | v2i+1 block sums (8 lanes)]
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x88), _mm512_shuffle_f32x4(t[0], t[1], 0xDD));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x88), _mm512_shuffle_f32x4(t[2], t[3], 0xDD));
  const __m512 x = _mm512_add_ps(_mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 y = _mm512_add_ps(x, _mm512_shuffle_ps(x, x, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512 z = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0), y);
  return _mm512_castps512_ps256(z);
}

inline void reduce8(const __m512* v, float* out) { _mm256_storeu_ps(out, sums8(v)); }

// Softmax of n scores in place, two passes in fp32: s = exp(s - max(s)); returns 1 / sum(s).
inline float softmax_in_place(float* s, int64_t n) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < n; t += 16) mx = _mm512_mask_max_ps(mx, lanes(n - t), mx, _mm512_maskz_loadu_ps(lanes(n - t), s + t));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 k = lanes(n - t);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), m));
    _mm512_mask_storeu_ps(s + t, k, e);
    sum = _mm512_mask_add_ps(sum, k, sum, e);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// n fp32 values rounded to bf16 in place: the row's first 2n bytes become n bf16 (converted front to back, each
// block read before it is overwritten), then zeros up to `padded` (at most 2n) values.
inline void to_bf16_in_place(float* s, int64_t n, int64_t padded) {
  uint16_t* pb = reinterpret_cast<uint16_t*>(s);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 k = lanes(n - t);
    const __m512i bits = round_bf16_bits(_mm512_maskz_loadu_ps(k, s + t));
    _mm256_mask_storeu_epi16(pb + t, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
  }
  for (int64_t t = n; t < padded; ++t) pb[t] = 0;
}

// One query head over positions 0..n-1 of its kv head: out = softmax(q K^T * scale) V, in fp32.
// hd = 16 * nv; q sits in registers, scores are computed 8 positions per reduction, and the output
// accumulates in registers. s: scratch for n scores.
template <class A, int nv>
void attend(const float* q, const typename A::T* K, const typename A::T* V, int64_t n, float scale, float* s,
            float* out) {
  constexpr int64_t hd = 16 * nv;
  __m512 qv[nv];
  for (int v = 0; v < nv; ++v) qv[v] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * v), _mm512_set1_ps(scale));
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    __m512 acc[8];
    for (int j = 0; j < 8; ++j) {
      acc[j] = _mm512_mul_ps(qv[0], A::load16(K + (t + j) * hd, 0xffff));
      for (int v = 1; v < nv; ++v) acc[j] = _mm512_fmadd_ps(qv[v], A::load16(K + (t + j) * hd + 16 * v, 0xffff), acc[j]);
    }
    reduce8(acc, s + t);
  }
  for (; t < n; ++t) {
    __m512 acc = _mm512_mul_ps(qv[0], A::load16(K + t * hd, 0xffff));
    for (int v = 1; v < nv; ++v) acc = _mm512_fmadd_ps(qv[v], A::load16(K + t * hd + 16 * v, 0xffff), acc);
    s[t] = _mm512_reduce_add_ps(acc);
  }
  const float inv_sum = softmax_in_place(s, n);
  __m512 o[nv];
  for (int v = 0; v < nv; ++v) o[v] = _mm512_setzero_ps();
  for (t = 0; t < n; ++t) {
    const __m512 p = _mm512_set1_ps(s[t]);
    for (int v = 0; v < nv; ++v) o[v] = _mm512_fmadd_ps(p, A::load16(V + t * hd + 16 * v, 0xffff), o[v]);
  }
  const __m512 inv = _mm512_set1_ps(inv_sum);
  for (int v = 0; v < nv; ++v) _mm512_storeu_ps(out + 16 * v, _mm512_mul_ps(o[v], inv));
}

template <class A>
void attend_any(int64_t hd, const float* q, const typename A::T* K, const typename A::T* V, int64_t n, float scale,
                float* s, float* out) {
  switch (hd / 16) {
    case 1: return attend<A, 1>(q, K, V, n, scale, s, out);
    case 2: return attend<A, 2>(q, K, V, n, scale, s, out);
    case 4: return attend<A, 4>(q, K, V, n, scale, s, out);
    case 6: return attend<A, 6>(q, K, V, n, scale, s, out);
    case 8: return attend<A, 8>(q, K, V, n, scale, s, out);
    case 16: return attend<A, 16>(q, K, V, n, scale, s, out);
    default: return;  // excluded by the Python side (SUPPORTED_HEAD_DIMS)
  }
}

// The scores q.k * scale of G bf16 query heads (values already rounded to bf16, held in fp32) against keys
// 0..n-1, with vdpbf16ps: products of bf16 values are exact in fp32, so only the order of the sums differs
// from widening k to fp32, at half the instructions per key (the batched decode step spends most of its
// attention time here). nw: 32-element bf16 vectors per head. s: G rows of n scores, ld apart.
template <int nw, int G>
inline void scores_bf16(const float* q, const uint16_t* K, int64_t n, float scale, float* s, int64_t ld) {
  constexpr int64_t hd = 32 * nw;
  __m512i qb[G][nw];
  for (int g = 0; g < G; ++g)
    for (int w = 0; w < nw; ++w)
      qb[g][w] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + g * hd + 32 * w + 16), _mm512_loadu_ps(q + g * hd + 32 * w));
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    // the key stream asks for its lines PREFETCH_BYTES ahead, as the weight streams do (harmless past the end)
    for (int64_t b = 0; b < 8 * hd * 2; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(K + t * hd) + PREFETCH_BYTES + b, _MM_HINT_T0);
    for (int g = 0; g < G; ++g) {
      __m512 acc[8];
      for (int j = 0; j < 8; ++j) {
        __m512 a = _mm512_setzero_ps();
        for (int w = 0; w < nw; ++w) a = _mm512_dpbf16_ps(a, (__m512bh)qb[g][w], (__m512bh)_mm512_loadu_si512(K + (t + j) * hd + 32 * w));
        acc[j] = a;
      }
      _mm256_storeu_ps(s + g * ld + t, _mm256_mul_ps(sums8(acc), _mm512_castps512_ps256(sc)));
    }
  }
  for (; t < n; ++t)
    for (int g = 0; g < G; ++g) {
      __m512 a = _mm512_setzero_ps();
      for (int w = 0; w < nw; ++w) a = _mm512_dpbf16_ps(a, (__m512bh)qb[g][w], (__m512bh)_mm512_loadu_si512(K + t * hd + 32 * w));
      s[g * ld + t] = _mm512_reduce_add_ps(a) * scale;
    }
}

#ifdef IDEFICS3_HAVE_AMX
// The same scores on AMX tiles (configured by amx::configure_scores(G); head sizes 64 and 128): the keys are
// the A operand where they sit in the cache (16 positions x 32 dimensions per tile, rows hd apart), the G
// queries the B operand (pairs of dimensions, loaded once), C the scores of 16 positions; one tile product
// replaces 16 x G dot products and their horizontal sums. Positions past the last block of 16 go through
// scores_bf16. Sums in another order than scores_bf16: the same up to fp32 rounding.
template <int nw, int G>
inline void scores_amx(const float* q, const uint16_t* K, int64_t n, float scale, float* s, int64_t ld) {
  static_assert(nw == 2 || nw == 4, "head sizes 64 and 128");
  constexpr int64_t hd = 32 * nw;
  alignas(64) uint32_t qb[nw][16][G];  // [chunk][dimension pair][head]: two bf16 dimensions per entry
  for (int w = 0; w < nw; ++w)
    for (int p = 0; p < 16; ++p)
      for (int g = 0; g < G; ++g)
        qb[w][p][g] = uint32_t(float_to_bf16(q[g * hd + 32 * w + 2 * p])) |
                      (uint32_t(float_to_bf16(q[g * hd + 32 * w + 2 * p + 1])) << 16);
  _tile_loadd(4, qb[0], G * 4);
  _tile_loadd(5, qb[1], G * 4);
  if constexpr (nw == 4) {
    _tile_loadd(6, qb[2], G * 4);
    _tile_loadd(7, qb[3], G * 4);
  }
  alignas(64) float c[16][G];
  const int64_t blocks = n / 16;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint16_t* Kb = K + b * 16 * hd;
    for (int64_t x = 0; x < 16 * hd * 2; x += 64)
      _mm_prefetch(reinterpret_cast<const char*>(Kb) + PREFETCH_BYTES + x, _MM_HINT_T0);
    _tile_zero(0);
    _tile_loadd(2, Kb, hd * 2);
    _tile_dpbf16ps(0, 2, 4);
    _tile_loadd(3, Kb + 32, hd * 2);
    _tile_dpbf16ps(0, 3, 5);
    if constexpr (nw == 4) {
      _tile_loadd(2, Kb + 64, hd * 2);
      _tile_dpbf16ps(0, 2, 6);
      _tile_loadd(3, Kb + 96, hd * 2);
      _tile_dpbf16ps(0, 3, 7);
    }
    _tile_stored(0, c, G * 4);
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 16; ++i) s[g * ld + b * 16 + i] = c[i][g] * scale;
  }
  if (blocks * 16 < n) scores_bf16<nw, G>(q, K + blocks * 16 * hd, n - blocks * 16, scale, s + blocks * 16, ld);
}
#endif

// The same scores with k widened to fp32 (fp32 models, and head sizes that are not a multiple of 32).
template <class A, int nv, int G>
inline void scores_widened(const float* q, const typename A::T* K, int64_t n, float scale, float* s, int64_t ld) {
  constexpr int64_t hd = 16 * nv;
  __m512 qv[G][nv];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < nv; ++v) qv[g][v] = _mm512_mul_ps(_mm512_loadu_ps(q + g * hd + 16 * v), _mm512_set1_ps(scale));
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    __m512 acc[G][8];
    for (int j = 0; j < 8; ++j) {
      __m512 kv[nv];
      for (int v = 0; v < nv; ++v) kv[v] = A::load16(K + (t + j) * hd + 16 * v, 0xffff);
      for (int g = 0; g < G; ++g) {
        __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
        for (int v = 1; v < nv; ++v) a = _mm512_fmadd_ps(qv[g][v], kv[v], a);
        acc[g][j] = a;
      }
    }
    for (int g = 0; g < G; ++g) reduce8(acc[g], s + g * ld + t);
  }
  for (; t < n; ++t) {
    __m512 kv[nv];
    for (int v = 0; v < nv; ++v) kv[v] = A::load16(K + t * hd + 16 * v, 0xffff);
    for (int g = 0; g < G; ++g) {
      __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int v = 1; v < nv; ++v) a = _mm512_fmadd_ps(qv[g][v], kv[v], a);
      s[g * ld + t] = _mm512_reduce_add_ps(a);
    }
  }
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

// out = (P V) * inv for G heads with vdpbf16ps, P being the unnormalised probabilities s (G rows of n fp32)
// rounded to bf16 first, as aten's CPU flash attention rounds them for bf16 inputs before its P.V product.
// Two keys per step: the two V rows are interleaved into (t, t+1) pairs of each dimension
// (unpacklo/hi_epi16, within 128-bit lanes), so one broadcast probability pair serves 16 dimensions; the
// lane order is restored at the end. Each row of s is overwritten by its bf16 probabilities (2 bytes per
// 4-byte score, converted front to back, plus a zero for odd n). nw: 32-element vectors per head.
template <int nw, int G>
inline void values_bf16(float* s, const KeyRange<uint16_t>& kv, const float* inv, float* out) {
  constexpr int64_t hd = 32 * nw;
  const int64_t n = kv.n;
  for (int g = 0; g < G; ++g) {
    to_bf16_in_place(s + g * n, n, n + n % 2);
  }
  __m512 lo[G][nw], hi[G][nw];
  for (int g = 0; g < G; ++g)
    for (int w = 0; w < nw; ++w) lo[g][w] = hi[g][w] = _mm512_setzero_ps();
  constexpr int64_t ahead = PREFETCH_BYTES / (hd * 2);  // value rows
  for (int64_t t = 0; t < n; t += 2) {
    if (t + ahead + 1 < n)
      for (int64_t b = 0; b < hd * 2; b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(kv.v(t + ahead, hd)) + b, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(kv.v(t + ahead + 1, hd)) + b, _MM_HINT_T0);
      }
    __m512i vl[nw], vh[nw];
    for (int w = 0; w < nw; ++w) {
      const __m512i a = _mm512_loadu_si512(kv.v(t, hd) + 32 * w);
      const __m512i b = t + 1 < n ? _mm512_loadu_si512(kv.v(t + 1, hd) + 32 * w) : _mm512_setzero_si512();
      vl[w] = _mm512_unpacklo_epi16(a, b);  // lane 4L+j: dimension 8L+j of keys t, t+1
      vh[w] = _mm512_unpackhi_epi16(a, b);  // lane 4L+j: dimension 8L+4+j
    }
    for (int g = 0; g < G; ++g) {
      int32_t pair;
      std::memcpy(&pair, reinterpret_cast<const uint16_t*>(s + g * n) + t, 4);
      const __m512i pp = _mm512_set1_epi32(pair);
      for (int w = 0; w < nw; ++w) {
        lo[g][w] = _mm512_dpbf16_ps(lo[g][w], (__m512bh)vl[w], (__m512bh)pp);
        hi[g][w] = _mm512_dpbf16_ps(hi[g][w], (__m512bh)vh[w], (__m512bh)pp);
      }
    }
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int g = 0; g < G; ++g) {
    const __m512 scale = _mm512_set1_ps(inv[g]);
    for (int w = 0; w < nw; ++w) {
      _mm512_storeu_ps(out + g * hd + 32 * w, _mm512_mul_ps(_mm512_permutex2var_ps(lo[g][w], first, hi[g][w]), scale));
      _mm512_storeu_ps(out + g * hd + 32 * w + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo[g][w], second, hi[g][w]), scale));
    }
  }
}

#ifdef IDEFICS3_HAVE_AMX
// The same as values_bf16 for head size 64 on AMX tiles (configured by amx::configure_values(G)), for n >= 32:
// C[G x 16 dims] += P[G x 32 positions] . V-pairs[16 position pairs x 16 dims x 2]. P is s rounded to bf16 in
// place (rows n floats apart, zero-padded to whole blocks of 32 positions, which fit in a row's 4n bytes). The V
// pairs are values_bf16's unpacklo/hi of two positions, written to a scratch tile (positions from n on as zeros):
// each 512-bit half of a key row gives the B tiles of dims {0-3, 8-11, 16-19, 24-27} (lo) and {4-7, ..} (hi),
// whose columns are put back in order at the end. Tiles: C 0-3 (lo, hi of dims 0-31 and 32-63), A 4, B 5 and 6.
template <int G>
inline void values_amx(float* s, const KeyRange<uint16_t>& kv, const float* inv, float* out) {
  constexpr int64_t hd = 64;
  const int64_t n = kv.n, n32 = (n + 31) / 32 * 32;
  for (int g = 0; g < G; ++g) {
    to_bf16_in_place(s + g * n, n, n32);
  }
  alignas(64) uint16_t pairs[2][4][16][32];  // [scratch][lo0, hi0, lo1, hi1][position pair][16 dims x 2]
  constexpr int64_t ahead = PREFETCH_BYTES / (hd * 2);
  _tile_zero(0);  // tile numbers are immediates: no loop
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t t0 = 0; t0 < n32; t0 += 32) {
    auto& buf = pairs[(t0 / 32) % 2];
    for (int64_t p = 0; p < 16; ++p) {
      const int64_t t = t0 + 2 * p;
      if (t + ahead + 1 < n)
        for (int64_t b = 0; b < hd * 2; b += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(kv.v(t + ahead, hd)) + b, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(kv.v(t + ahead + 1, hd)) + b, _MM_HINT_T0);
        }
      for (int w = 0; w < 2; ++w) {
        const __m512i a = t < n ? _mm512_loadu_si512(kv.v(t, hd) + 32 * w) : _mm512_setzero_si512();
        const __m512i b = t + 1 < n ? _mm512_loadu_si512(kv.v(t + 1, hd) + 32 * w) : _mm512_setzero_si512();
        _mm512_store_si512(buf[2 * w][p], _mm512_unpacklo_epi16(a, b));
        _mm512_store_si512(buf[2 * w + 1][p], _mm512_unpackhi_epi16(a, b));
      }
    }
    _tile_loadd(4, reinterpret_cast<const uint16_t*>(s) + t0, n * 4);  // P: G rows of 32 positions
    _tile_loadd(5, buf[0], 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, buf[1], 64);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, buf[2], 64);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(6, buf[3], 64);
    _tile_dpbf16ps(3, 4, 6);
  }
  alignas(64) float c[4][G][16];
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  _tile_stored(2, c[2], 64);
  _tile_stored(3, c[3], 64);
  for (int g = 0; g < G; ++g)
    for (int h = 0; h < 4; ++h)  // column j of tile h: dimension 32 (h / 2) + 8 (j / 4) + 4 (h % 2) + j % 4
      for (int j = 0; j < 16; ++j) out[g * hd + 32 * (h / 2) + 8 * (j / 4) + 4 * (h % 2) + j % 4] = c[h][g][j] * inv[g];
}
#endif

// The G query heads of one kv head (GQA) over positions 0..n-1, each as attend<A, nv> computes it (the same
// bits, except bf16 scores of head sizes that are multiples of 32: see scores_bf16), but every K and V
// vector is loaded once for all G heads: at batch > 1 attention reads R x the KV cache and this cuts its
// loads G times.
// q: G heads of hd floats; s: scratch for G * n scores; out: G heads of hd floats.
template <class A, int nv, int G>
void attend_group(const float* q, const KeyRange<typename A::T>& kv, float scale, float* s, float* out, bool tiles,
                  float* inv_out = nullptr) {
  constexpr int64_t hd = 16 * nv;
  const int64_t n = kv.n, n0 = std::min(kv.shared, n);
  for (int part = 0; part < 2; ++part) {  // the shared positions, then the row's own
    const typename A::T* K = part ? kv.K + n0 * hd : kv.K0;
    const int64_t count = part ? n - n0 : n0, first = part ? n0 : 0;
    if (count == 0) continue;
#ifdef IDEFICS3_HAVE_AMX
    if constexpr (std::is_same<A, BF16>::value && (nv == 4 || nv == 8))
      if (tiles) {
        scores_amx<nv / 2, G>(q, K, count, scale, s + first, n);
        continue;
      }
#endif
    if constexpr (std::is_same<A, BF16>::value && nv % 2 == 0)
      scores_bf16<nv / 2, G>(q, K, count, scale, s + first, n);
    else
      scores_widened<A, nv, G>(q, K, count, scale, s + first, n);
  }
  int64_t t;
  float inv[G];
  for (int g = 0; g < G; ++g) {
    inv[g] = softmax_in_place(s + g * n, n);
  }
  if (inv_out != nullptr) {  // the caller takes P.V on tiles afterwards (values_amx): s holds exp(scores - max)
    std::memcpy(inv_out, inv, sizeof(inv));
    return;
  }
  if constexpr (std::is_same<A, BF16>::value && nv % 2 == 0) {
    values_bf16<nv / 2, G>(s, kv, inv, out);
    return;
  }
  __m512 o[G][nv];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < nv; ++v) o[g][v] = _mm512_setzero_ps();
  for (t = 0; t < n; ++t) {
    __m512 vv[nv];
    for (int v = 0; v < nv; ++v) vv[v] = A::load16(kv.v(t, hd) + 16 * v, 0xffff);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(s[g * n + t]);
      for (int v = 0; v < nv; ++v) o[g][v] = _mm512_fmadd_ps(p, vv[v], o[g][v]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < nv; ++v) _mm512_storeu_ps(out + g * hd + 16 * v, _mm512_mul_ps(o[g][v], _mm512_set1_ps(inv[g])));
}

template <class A, int G>
bool attend_group_hd(int64_t hd, const float* q, const KeyRange<typename A::T>& kv, float scale, float* s,
                     float* out, bool tiles, float* inv_out) {
  switch (hd / 16) {
    case 1: attend_group<A, 1, G>(q, kv, scale, s, out, tiles, inv_out); return true;
    case 2: attend_group<A, 2, G>(q, kv, scale, s, out, tiles, inv_out); return true;
    case 4: attend_group<A, 4, G>(q, kv, scale, s, out, tiles, inv_out); return true;
    case 6: attend_group<A, 6, G>(q, kv, scale, s, out, tiles, inv_out); return true;
    case 8: attend_group<A, 8, G>(q, kv, scale, s, out, tiles, inv_out); return true;
    default: return false;  // 256: G x 16 query vectors would not fit the registers
  }
}

// Grouped attention for groups of 2..4 query heads; false where the caller should go head by head. tiles: the
// scores of head sizes 64 and 128 on AMX (the caller configured them with amx::configure_scores(group)).
// inv_out: stop after the softmax, leaving exp(scores - max) in s and 1 / their sums in inv_out (values_amx next).
template <class A>
bool attend_group_any(int64_t group, int64_t hd, const float* q, const KeyRange<typename A::T>& kv, float scale,
                      float* s, float* out, bool tiles = false, float* inv_out = nullptr) {
  switch (group) {
    case 2: return attend_group_hd<A, 2>(hd, q, kv, scale, s, out, tiles, inv_out);
    case 3: return attend_group_hd<A, 3>(hd, q, kv, scale, s, out, tiles, inv_out);
    case 4: return attend_group_hd<A, 4>(hd, q, kv, scale, s, out, tiles, inv_out);
    default: return false;
  }
}
