// The decoder as the decode kernels see it: pointers into tensors owned by Python, the C functions that
// make, fill and check it, and bf16 / fp16 <-> fp32 for single values. Shared by both builds of the kernel
// (cpu_decode.cpp for AVX-512 / AMX, cpu_decode_avx2.cpp for AVX2), which add `idefics3_decoder_step` (and the
// AVX-512 one its AMX switches).
//
// Each matrix is a `Weight`: dense in the model's dtype, or quantised as quant/format.py stores it (int8 codes
// with fp16 scales per group of inputs; int4 codes in llama.cpp's Q4_0 runs with fp16 scales, and fp16 minimums
// for the asymmetric form). The builds' quantised products (cpu_decode_quant.h, cpu_decode_quant_avx2.h)
// stream the codes and dequantise them in registers; the embedding lookup dequantises one row (embed_row).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

inline float bf16_to_float(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as c10::BFloat16 does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float half_to_float(uint16_t h) {  // IEEE fp16 -> fp32, exactly (subnormals included)
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else {
    float f = float(mant) * (1.f / 16777216.f);  // mant * 2^-24
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// How a matrix W [N, K] is stored (quant/format.py): kind and, for the quantised kinds, the group size G and the
// stored columns Kp (K rounded up to a multiple of G, and of 32 for int4; the padding holds codes of zeros and
// is read against inputs that count as 0).
enum WeightKind : int32_t {
  kDense = 0,     // data: W in the model's dtype, row-major
  kInt8 = 1,      // data: int8 [N, Kp]; W = scales[n, k / G] * q
  kInt4 = 2,      // data: uint8 [N, Kp / 2], Q4_0 runs of 32 inputs; W = scales * (c - 8)
  kInt4Mins = 3,  // as kInt4 with mins [N, Kp / G]: W = scales * c + mins
};

struct Weight {
  const void* data = nullptr;
  const uint16_t* scales = nullptr;  // fp16 [N, Kp / G] (quantised kinds)
  const uint16_t* mins = nullptr;    // fp16 [N, Kp / G] (kInt4Mins)
  int32_t kind = kDense;
  int32_t group = 0;  // G, inputs per scale: 32, 64, 128 or K (int8 per output channel)
  int64_t cols = 0;   // Kp, the stored columns
  int64_t groups = 0;  // Kp / G, scales per row (computed here: no division per row block in the kernels)
  bool dense() const { return kind == kDense; }
};

constexpr int kWeightFields = 6;  // a Weight in the tables Python passes: data, scales, mins, kind, group, cols

inline Weight weight_from(const int64_t* f) {
  return Weight{reinterpret_cast<const void*>(f[0]), reinterpret_cast<const uint16_t*>(f[1]),
                reinterpret_cast<const uint16_t*>(f[2]), int32_t(f[3]), int32_t(f[4]), f[5],
                f[3] != kDense && f[4] > 0 ? f[5] / f[4] : 0};
}

// Row n of W [N, K] (its first K stored columns) in fp32, as quant/format.py's dequantize computes it: exactly,
// since an fp16 scale times a small integer is exact in fp32 and the minimum is added with one rounding.
// Quantised kinds only.
inline void dequantize_row(const Weight& w, int64_t n, int64_t K, float* out) {
  const uint16_t* sc = w.scales + n * w.groups;
  const uint16_t* mn = w.kind == kInt4Mins ? w.mins + n * w.groups : nullptr;
  const int8_t* q8 = static_cast<const int8_t*>(w.data) + n * w.cols;
  const uint8_t* q4 = static_cast<const uint8_t*>(w.data) + n * (w.cols / 2);
  for (int64_t g = 0, k = 0; g < w.groups && k < K; ++g) {
    const float s = half_to_float(sc[g]), m = mn ? half_to_float(mn[g]) : 0.f;
    for (int64_t end = std::min<int64_t>(K, k + w.group); k < end; ++k) {
      if (w.kind == kInt8) {
        out[k] = float(q8[k]) * s;
        continue;
      }
      const uint8_t byte = q4[k / 32 * 16 + k % 16];
      const int c = k % 32 < 16 ? byte & 0x0f : byte >> 4;
      out[k] = mn ? float(c) * s + m : float(c - 8) * s;
    }
  }
}

struct Layer {
  const void *ln1, *ln2;
  Weight wq, wk, wv, wo, wg, wu, wd;
  void *kc, *vc;  // [max_batch, Hkv, max_seq, hd]
  // bf16 packed copies for batches (cpu_decode.cpp's packed_tile), or null: q|k|v stacked, o, gate|up
  // interleaved by 16-column blocks (block 2j: gate columns 16j.., block 2j+1: the same up columns), down.
  // The AVX2 build keeps them only because the ABI is the same; it never reads them.
  const uint16_t *pqkv = nullptr, *po = nullptr, *pgu = nullptr, *pd = nullptr;
};

struct Model {
  int dtype;  // 0 float32, 1 bfloat16
  int64_t n_layers, D, I, H, Hkv, hd, V, max_batch, max_seq;
  float eps;
  std::vector<Layer> layers;
  Weight embed;  // [V, D]
  const void* norm;
  Weight lm_head;  // [V, D]
  const uint16_t* plm_head = nullptr;  // packed lm_head, with the layers' packed copies
  int64_t amx_min_rows = 0;            // bf16 steps of at least this many rows run on AMX tiles (0: never)
  bool quantised = false;              // any matrix (lm_head included) quantised: no packed copies, no AMX
  bool int8_inputs = false;            // quantised products take x rounded to int8 (the AVX-512 build's VNNI path)
};

// Row `id` of the token embedding as the plain path gives it, in fp32: the dense row, or the dequantised one
// rounded to the model's dtype (QuantEmbedding's rows come out in it). A: the element traits of the build.
template <class A>
inline void embed_row(const Model& m, int64_t id, float* h) {
  if (m.embed.dense()) {
    const typename A::T* e = static_cast<const typename A::T*>(m.embed.data) + id * m.D;
    for (int64_t i = 0; i < m.D; ++i) h[i] = A::to_f(e[i]);
    return;
  }
  dequantize_row(m.embed, id, m.D, h);
  for (int64_t i = 0; i < m.D; ++i) h[i] = A::round(h[i]);
}

// 0, or 1 (token id), 2 (position), 3 (slot), 4 (shared) for an out-of-range input of a step of R rows.
// shared: null, or R pairs (slot, length): positions 0..length-1 of row r's keys and values may be read from
// that slot, which holds the same ones (rows decoding from one prompt).
inline int check_step_inputs(const Model& m, int64_t R, const int64_t* ids, const int64_t* pos,
                             const int64_t* slots, const int64_t* shared) {
  for (int64_t r = 0; r < R; ++r) {
    if (ids[r] < 0 || ids[r] >= m.V) return 1;
    if (pos[r] < 0 || pos[r] >= m.max_seq) return 2;
    if ((slots ? slots[r] : r) < 0 || (slots ? slots[r] : r) >= m.max_batch) return 3;
    if (shared && (shared[2 * r] < 0 || shared[2 * r] >= m.max_batch || shared[2 * r + 1] < 0 ||
                   shared[2 * r + 1] > pos[r]))
      return 4;
  }
  return 0;
}

// Where a matrix product's outputs go, and how they are stored: as fp32 (Keep), as fp32 rounded to T (Round),
// or as T (Cast). Element (r, n) lands at dst[r * stride + n]. A: the element traits of the build (F32, BF16).
enum class Store { Keep, Round, Cast };

template <class A>
struct ScalarSink {
  void* dst;
  int64_t stride;
  Store how;
  void operator()(int64_t r, int64_t n, float v) const {
    if (how == Store::Cast) static_cast<typename A::T*>(dst)[r * stride + n] = A::from_f(v);
    else static_cast<float*>(dst)[r * stride + n] = how == Store::Round ? A::round(v) : v;
  }
};

// out [N, K] = the quantised W dequantised as quant/format.py's dequantize does it, in fp32 (out_dtype 0) or
// rounded to bf16 (1), rows split over the threads; row(w, n, K, fp32 out) makes one row (each build its own).
template <class RowFn>
inline void dequantize_matrix(const Weight& w, int64_t N, int64_t K, void* out, int out_dtype, int n_threads,
                              const RowFn& row_fn) {
#pragma omp parallel num_threads(n_threads)
  {
    std::vector<float> row(out_dtype == 0 ? 0 : K);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      if (out_dtype == 0) {
        row_fn(w, n, K, static_cast<float*>(out) + n * K);
        continue;
      }
      row_fn(w, n, K, row.data());
      uint16_t* o = static_cast<uint16_t*>(out) + n * K;
      for (int64_t k = 0; k < K; ++k) o[k] = float_to_bf16(row[k]);
    }
  }
}

extern "C" {

// The layout of the tables idefics3_decoder_create reads; cpu_decode.py checks it against its own
// (idefics3_decoder_abi) before passing any: a library built from older sources is refused, not misread.
constexpr int kLayerFields = 4 + 7 * kWeightFields;
constexpr int kAbiVersion = 2;

// layers: n_layers rows of kLayerFields int64: ln1, ln2, k cache, v cache, then the Weights (kWeightFields each)
// q, k, v, o, gate, up, down. embed, lm_head: one Weight each.
void* idefics3_decoder_create(int dtype, int64_t n_layers, int64_t D, int64_t I, int64_t H, int64_t Hkv,
                              int64_t hd, int64_t V, int64_t max_batch, int64_t max_seq, float eps,
                              const int64_t* layers, const int64_t* embed, const void* norm, const int64_t* lm_head) {
  Model* m = new Model{dtype, n_layers, D, I, H, Hkv, hd, V, max_batch, max_seq, eps, {}, weight_from(embed), norm,
                       weight_from(lm_head)};
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t* p = layers + kLayerFields * l;
    auto w = [&](int i) { return weight_from(p + 4 + kWeightFields * i); };
    m->layers.push_back(Layer{reinterpret_cast<const void*>(p[0]), reinterpret_cast<const void*>(p[1]), w(0), w(1),
                              w(2), w(3), w(4), w(5), w(6), reinterpret_cast<void*>(p[2]),
                              reinterpret_cast<void*>(p[3])});
    const Layer& L = m->layers.back();
    for (const Weight* w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.wg, &L.wu, &L.wd}) m->quantised |= !w->dense();
  }
  m->quantised |= !m->lm_head.dense();
  return m;
}

// {kAbiVersion, kLayerFields, kWeightFields}: what idefics3_decoder_create expects.
void idefics3_decoder_abi(int64_t* out) {
  out[0] = kAbiVersion;
  out[1] = kLayerFields;
  out[2] = kWeightFields;
}

// The packed bf16 copies for batched steps: n_layers x 4 addresses (q|k|v, o, gate|up, down) and the
// lm_head's; the tensors stay owned by Python. Only for models whose matrices are all dense bf16.
void idefics3_decoder_set_packed(void* handle, const int64_t* layer_ptrs, const void* lm_head) {
  Model* m = static_cast<Model*>(handle);
  for (int64_t l = 0; l < m->n_layers; ++l) {
    const int64_t* p = layer_ptrs + 4 * l;
    Layer& L = m->layers[l];
    L.pqkv = reinterpret_cast<const uint16_t*>(p[0]);
    L.po = reinterpret_cast<const uint16_t*>(p[1]);
    L.pgu = reinterpret_cast<const uint16_t*>(p[2]);
    L.pd = reinterpret_cast<const uint16_t*>(p[3]);
  }
  m->plm_head = static_cast<const uint16_t*>(lm_head);
}

void idefics3_decoder_destroy(void* handle) { delete static_cast<Model*>(handle); }

}  // extern "C"
