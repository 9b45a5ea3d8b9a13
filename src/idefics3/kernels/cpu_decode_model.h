// The decoder as the decode kernels see it: pointers into tensors owned by Python, the C functions that
// make, fill and check it, and bf16 <-> fp32 for single values. Shared by both builds of the kernel (cpu_decode.cpp for AVX-512 / AMX,
// cpu_decode_avx2.cpp for AVX2), which add `idefics3_decoder_step` (and the AVX-512 one its AMX switches).

#pragma once

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

struct Layer {
  const void *ln1, *wq, *wk, *wv, *wo, *ln2, *wg, *wu, *wd;
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
  const void *embed, *norm, *lm_head;
  const uint16_t* plm_head = nullptr;  // packed lm_head, with the layers' packed copies
  int64_t amx_min_rows = 0;            // bf16 steps of at least this many rows run on AMX tiles (0: never)
};

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

extern "C" {

// layer_ptrs: n_layers x 11 addresses (ln1, q, k, v, o, ln2, gate, up, down, k cache, v cache).
void* idefics3_decoder_create(int dtype, int64_t n_layers, int64_t D, int64_t I, int64_t H, int64_t Hkv,
                              int64_t hd, int64_t V, int64_t max_batch, int64_t max_seq, float eps,
                              const int64_t* layer_ptrs, const void* embed, const void* norm, const void* lm_head) {
  Model* m = new Model{dtype, n_layers, D, I, H, Hkv, hd, V, max_batch, max_seq, eps, {}, embed, norm, lm_head};
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t* p = layer_ptrs + 11 * l;
    auto c = [&](int i) { return reinterpret_cast<const void*>(p[i]); };
    m->layers.push_back(Layer{c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7), c(8),
                              reinterpret_cast<void*>(p[9]), reinterpret_cast<void*>(p[10])});
  }
  return m;
}

// The packed bf16 copies for batched steps: n_layers x 4 addresses (q|k|v, o, gate|up, down) and the
// lm_head's; the tensors stay owned by Python.
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
