// The CPU decode step in one call: every layer of a batch of single-token decodes, in one OpenMP
// parallel region, on weights packed for our own AVX-512 GEMM (`model.native`).
//
// Why: at decode shapes an eager torch step is ~400 operators, each a dispatch and a parallel
// region of its own, which cost more than the weights' bytes (bench/RESULTS.md). Here a layer is
// a handful of phases between barriers: norm, qkv GEMM, rotary + KV write, attention, o GEMM,
// residual + norm + router, the routed experts' w13 GEMMs (all experts in one phase), SiLU, w2,
// the weighted combine.
//
// Numbers: the residual stream and everything between GEMMs stay fp32; GEMM inputs are rounded
// to the weights' type (bf16 for bf16 weights, whose products accumulate in fp32 with AVX512-BF16
// dot products; fp32 weights use fp32 FMAs). The KV cache holds the model's dtype, as the torch
// path writes it.
//
// Packed weights: a [N, K] matrix as N/16 blocks of 16 output rows, each block contiguous over
// all of K: bf16 as [K/2][16][2] (the pairs a `vdpbf16ps` takes), fp32 and int8 as [K][16]
// (int8 with one fp32 scale per row, applied after the dot products). N and K are multiples of
// 16 (the Python side checks).
//
// Shape legend: S sequences, D hidden, H query heads, KV kv heads, G = H / KV, Dh head dim,
// E experts, A top-k, P = S * A pairs, F expert FFN, N cache blocks, B block size.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

namespace {

typedef uint16_t bf16;
enum DType : int32_t { F32 = 0, BF16 = 1, INT8 = 2 };

inline float bf2f(bf16 h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline bf16 f2bf(float f) {  // round to nearest even, as torch does
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return (bf16)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fff + ((u >> 16) & 1);
  return (bf16)(u >> 16);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

inline void put(float* p, float v) { *p = v; }
inline void put(bf16* p, float v) { *p = f2bf(v); }
inline float get(const float* p) { return *p; }
inline float get(const bf16* p) { return bf2f(*p); }

}  // namespace

extern "C" {

// One packed linear layer (see the header).
struct Linear {
  const void* w;
  const float* scale;  // [N] for INT8 weights (w8a16: q * scale), else null
  int64_t n, k;
  int32_t dtype;  // the weight's: F32 and INT8 take fp32 input rows, BF16 bf16 ones
  int32_t pad_;
};

struct LayerWeights {
  Linear qkv, o;
  const float* router;      // [E, D], the router weight's values in fp32; null for a dense FFN
  const float* input_norm;  // [D]
  const float* post_norm;   // [D]
  const Linear* w13;        // [E] experts, each [2F, D] (gate rows, then up)
  const Linear* w2;         // [E] experts, each [D, F]
};

struct ModelDesc {
  int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, ffn, num_experts, top_k;
  float eps, attn_scale;
  int32_t dtype;  // of the embedding, the KV cache and the hidden states handed back
  int32_t threads;
  const LayerWeights* layers;
  const float* final_norm;  // [D]
  const void* embed;        // [V, D]
  const float* rope;        // [P, 2, Dh]: cos, sin per position (rotate-half convention)
};

struct StepDesc {
  int64_t num_seqs;
  const int64_t* input_ids;     // [S]
  const int64_t* positions;     // [S]
  const int64_t* slots;         // [S], block * B + offset
  const int64_t* block_tables;  // [S, >= max blocks] with row stride bt_stride
  int64_t bt_stride;
  const int64_t* seq_lens;  // [S], tokens in the cache after this step
  void* kv;                 // [L, 2, N, B, KV, Dh]
  int64_t num_blocks, block_size;
  void* out;  // [S, D]: the final norm's output
};

}  // extern "C"

namespace {

// ---- GEMM: y [m, n] fp32 = x[rows] @ W^T, over packed weights -------------------------------

// MR rows of x against NB blocks of 16 outputs, over all of K.
template <int MR, int NB>
inline void tile(const bf16* const* xr, const bf16* w, int64_t bstride, int64_t k, float* y, int64_t ldy) {
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < k / 2; ++k2) {
    __m512bh wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = (__m512bh)_mm512_loadu_si512(w + b * bstride + k2 * 32);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      memcpy(&pair, xr[m] + 2 * k2, 4);
      __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], wv[b], xv);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(y + m * ldy + b * 16, acc[m][b]);
}

template <int MR, int NB>
inline void tile(const float* const* xr, const float* w, int64_t bstride, int64_t k, float* y, int64_t ldy) {
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_ps(w + b * bstride + kk * 16);
    for (int m = 0; m < MR; ++m) {
      __m512 xv = _mm512_set1_ps(xr[m][kk]);
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_fmadd_ps(wv[b], xv, acc[m][b]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(y + m * ldy + b * 16, acc[m][b]);
}

// int8 weights against fp32 rows: each weight widened to fp32 in registers, the row's scale
// applied to the sums.
template <int MR, int NB>
inline void tile(const float* const* xr, const int8_t* w, int64_t bstride, int64_t k, float* y, int64_t ldy,
                 const float* scale) {
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 wv[NB];
    for (int b = 0; b < NB; ++b)
      wv[b] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + b * bstride + kk * 16))));
    for (int m = 0; m < MR; ++m) {
      __m512 xv = _mm512_set1_ps(xr[m][kk]);
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_fmadd_ps(wv[b], xv, acc[m][b]);
    }
  }
  for (int b = 0; b < NB; ++b) {
    const __m512 s = _mm512_loadu_ps(scale + b * 16);
    for (int m = 0; m < MR; ++m) _mm512_storeu_ps(y + m * ldy + b * 16, _mm512_mul_ps(acc[m][b], s));
  }
}

// The same signature for every weight type (the scale unused but for int8).
template <int MR, int NB, typename X, typename W>
inline void tile_any(const X* const* xr, const W* w, int64_t bstride, int64_t k, float* y, int64_t ldy,
                     const float* scale) {
  if constexpr (sizeof(W) == 1)
    tile<MR, NB>(xr, w, bstride, k, y, ldy, scale);
  else
    tile<MR, NB>(xr, w, bstride, k, y, ldy);
}

constexpr int NB_MAX = 4;
constexpr int64_t ROW_CHUNK = 256;

template <int NB, typename X, typename W>
inline void blocks_all_rows(const X* const* xr, int64_t m, const W* w, int64_t bstride, int64_t k, float* y,
                            int64_t ldy, const float* scale) {
  int64_t r = 0;
  for (; r + 6 <= m; r += 6) tile_any<6, NB>(xr + r, w, bstride, k, y + r * ldy, ldy, scale);
  switch (m - r) {
    case 5: tile_any<5, NB>(xr + r, w, bstride, k, y + r * ldy, ldy, scale); break;
    case 4: tile_any<4, NB>(xr + r, w, bstride, k, y + r * ldy, ldy, scale); break;
    case 3: tile_any<3, NB>(xr + r, w, bstride, k, y + r * ldy, ldy, scale); break;
    case 2: tile_any<2, NB>(xr + r, w, bstride, k, y + r * ldy, ldy, scale); break;
    case 1: tile_any<1, NB>(xr + r, w, bstride, k, y + r * ldy, ldy, scale); break;
  }
}

// One GEMM of a phase: y [m, n] = x[rows[i]] for i < m (or rows 0..m-1) @ W^T.
struct Gemm {
  const Linear* lin;
  const void* x;  // the weight's dtype
  int64_t ldx;
  const int32_t* rows;  // null: x's first m rows
  int64_t m;
  float* y;
  int64_t ldy;
};

// X: the input rows' type; W: the weight's.
template <typename X, typename W>
void gemm_blocks(const Gemm& g, int64_t b0, int64_t b1) {
  const int64_t k = g.lin->k, bstride = 16 * k;
  const W* w = (const W*)g.lin->w;
  const X* x = (const X*)g.x;
  const float* sc = g.lin->scale;
  std::vector<const X*> xr(g.m);
  for (int64_t i = 0; i < g.m; ++i) xr[i] = x + (g.rows ? g.rows[i] : i) * g.ldx;
  // Rows in chunks that stay in L2 while this thread's blocks stream past them.
  for (int64_t r0 = 0; r0 < g.m; r0 += ROW_CHUNK) {
    const int64_t m = std::min(ROW_CHUNK, g.m - r0);
    const X* const* x0 = xr.data() + r0;
    float* y0 = g.y + r0 * g.ldy;
    int64_t b = b0;
    for (; b + NB_MAX <= b1; b += NB_MAX)
      blocks_all_rows<4>(x0, m, w + b * bstride, bstride, k, y0 + b * 16, g.ldy, sc ? sc + b * 16 : nullptr);
    const float* s = sc ? sc + b * 16 : nullptr;
    switch (b1 - b) {
      case 3: blocks_all_rows<3>(x0, m, w + b * bstride, bstride, k, y0 + b * 16, g.ldy, s); break;
      case 2: blocks_all_rows<2>(x0, m, w + b * bstride, bstride, k, y0 + b * 16, g.ldy, s); break;
      case 1: blocks_all_rows<1>(x0, m, w + b * bstride, bstride, k, y0 + b * 16, g.ldy, s); break;
    }
  }
}

inline void split(int64_t n, int tid, int nth, int64_t* b, int64_t* e) {
  *b = n * tid / nth;
  *e = n * (tid + 1) / nth;
}

// This thread's share of several GEMMs run as one phase: their 16-row blocks laid end to end and
// divided evenly among the threads (so two experts of a batch-1 step are one phase, not two).
void gemm_phase(const Gemm* gemms, int count, int tid, int nth) {
  int64_t total = 0;
  for (int i = 0; i < count; ++i) total += gemms[i].m ? gemms[i].lin->n / 16 : 0;
  int64_t begin, end;
  split(total, tid, nth, &begin, &end);
  int64_t base = 0;
  for (int i = 0; i < count && base < end; ++i) {
    const Gemm& g = gemms[i];
    const int64_t nb = g.m ? g.lin->n / 16 : 0;
    const int64_t b0 = std::max(begin - base, (int64_t)0), b1 = std::min(end - base, nb);
    if (b0 < b1) {
      if (g.lin->dtype == BF16)
        gemm_blocks<bf16, bf16>(g, b0, b1);
      else if (g.lin->dtype == INT8)
        gemm_blocks<float, int8_t>(g, b0, b1);
      else
        gemm_blocks<float, float>(g, b0, b1);
    }
    base += nb;
  }
}

// ---- the pieces between GEMMs ------------------------------------------------------------

// RMSNorm of x [D] fp32 times weight, rounded to T.
template <typename T>
inline void rms_norm(const float* x, const float* weight, int64_t d, float eps, T* out) {
  float ss = 0.f;
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float r = 1.f / sqrtf(ss / (float)d + eps);
  for (int64_t i = 0; i < d; ++i) put(out + i, weight[i] * (x[i] * r));
}

// Rotate one head [Dh] in place by cos, sin [Dh] (rotate-half convention).
inline void rotate(float* v, const float* cs, int64_t dh) {
  const int64_t half = dh / 2;
  const float* cos = cs;
  const float* sin = cs + dh;
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];
    v[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// a [n] fp32 against b [n] in the cache's type; n % 16 == 0.
template <typename C>
inline float dot(const float* a, const C* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc);
  return _mm512_reduce_add_ps(acc);
}

// Decode attention of one sequence's G query heads q [G, Dh] sharing kv head `g`, over its
// `len` cached tokens; out [G, Dh] in T. `scores` holds G * len floats.
template <typename C, typename T>
void attend(const ModelDesc& md, const StepDesc& sd, const C* kcache, const C* vcache, int64_t s, int64_t g,
            const float* q, T* out, float* scores) {
  const int64_t dh = md.head_dim, kvh = md.num_kv_heads, G = md.num_heads / kvh, bsz = sd.block_size;
  const int64_t len = sd.seq_lens[s];
  const int64_t* table = sd.block_tables + s * sd.bt_stride;
  float mx[64];
  for (int64_t j = 0; j < G; ++j) mx[j] = -INFINITY;
  for (int64_t t = 0; t < len; ++t) {
    const C* k = kcache + ((table[t / bsz] * bsz + t % bsz) * kvh + g) * dh;
    for (int64_t j = 0; j < G; ++j) {
      const float sc = dot(q + j * dh, k, dh) * md.attn_scale;
      scores[j * len + t] = sc;
      mx[j] = std::max(mx[j], sc);
    }
  }
  float sum[64];
  for (int64_t j = 0; j < G; ++j) {
    float acc = 0.f;
    for (int64_t t = 0; t < len; ++t) acc += scores[j * len + t] = expf(scores[j * len + t] - mx[j]);
    sum[j] = acc;
  }
  std::vector<float> o(G * dh, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    const C* v = vcache + ((table[t / bsz] * bsz + t % bsz) * kvh + g) * dh;
    for (int64_t i = 0; i < dh; i += 16) {
      const __m512 vv = load16(v + i);
      for (int64_t j = 0; j < G; ++j) {
        float* oj = o.data() + j * dh + i;
        _mm512_storeu_ps(oj, _mm512_fmadd_ps(_mm512_set1_ps(scores[j * len + t]), vv, _mm512_loadu_ps(oj)));
      }
    }
  }
  for (int64_t j = 0; j < G; ++j)
    for (int64_t i = 0; i < dh; ++i) put(out + j * dh + i, o[j * dh + i] / sum[j]);
}

// Mixtral's routing of one token: softmax over the router's logits (rounded to the model's dtype
// first, as the torch path's 16-bit router GEMM leaves them), the top-k, renormalised.
template <typename T>
void route(const ModelDesc& md, const float* router, const T* h, int32_t* ids, float* weights) {
  const int64_t E = md.num_experts, d = md.hidden;
  float p[256];
  float mx = -INFINITY;
  for (int64_t e = 0; e < E; ++e) {
    float acc = 0.f;
    for (int64_t i = 0; i < d; ++i) acc += router[e * d + i] * get(h + i);
    p[e] = md.dtype == BF16 ? bf2f(f2bf(acc)) : acc;
    mx = std::max(mx, p[e]);
  }
  float sum = 0.f;
  for (int64_t e = 0; e < E; ++e) sum += p[e] = expf(p[e] - mx);
  float kept = 0.f;
  for (int64_t a = 0; a < md.top_k; ++a) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e)
      if (p[e] >= 0.f && (best < 0 || p[e] > p[best])) best = e;
    if (best < 0) best = a % E;  // NaN logits: any expert (its NaN weight carries on), never an id out of range
    ids[a] = (int32_t)best;
    weights[a] = p[best] / sum;
    kept += weights[a];
    p[best] = -1.f;  // taken
  }
  for (int64_t a = 0; a < md.top_k; ++a) weights[a] /= kept;
}

inline float silu(float x) { return x / (1.f + expf(-x)); }

// The step, for T the weights' compute type (the GEMM inputs) and C the cache / model dtype.
template <typename T, typename C>
void decode_step(const ModelDesc& md, const StepDesc& sd) {
  const int64_t S = sd.num_seqs, D = md.hidden, H = md.num_heads, KV = md.num_kv_heads, dh = md.head_dim;
  const int64_t G = H / KV, F = md.ffn, E = md.num_experts, A = md.top_k, P = S * A;
  const int64_t nqkv = (H + 2 * KV) * dh;
  int64_t max_len = 1;
  for (int64_t s = 0; s < S; ++s) max_len = std::max(max_len, sd.seq_lens[s]);

  std::vector<float> x(S * D), tmp(S * D), qkv(S * nqkv), g13(P * 2 * F), ye(P * D);
  std::vector<T> h(S * D), att(S * H * dh), act(P * F);
  std::vector<int32_t> ids(P), pair_row(P), pair_slot(P), by_expert(E + 1);
  std::vector<float> pair_w(P);
  std::vector<Gemm> gemms(E);
  const int nth = md.threads;
  std::vector<std::vector<float>> scores(nth, std::vector<float>(G * max_len));
  const C* embed = (const C*)md.embed;
  const int64_t layer_stride = 2 * sd.num_blocks * sd.block_size * KV * dh;

#pragma omp parallel num_threads(nth)
  {
    // Work is split over the threads the runtime gave (OMP_THREAD_LIMIT, OMP_DYNAMIC may give fewer).
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    int64_t b, e;
    split(S, tid, nth, &b, &e);
    for (int64_t s = b; s < e; ++s) {
      const C* row = embed + sd.input_ids[s] * D;
      for (int64_t i = 0; i < D; ++i) x[s * D + i] = get(row + i);
      rms_norm(&x[s * D], md.layers[0].input_norm, D, md.eps, &h[s * D]);
    }
#pragma omp barrier
    for (int64_t l = 0; l < md.num_layers; ++l) {
      const LayerWeights& lw = md.layers[l];
      C* kc = (C*)sd.kv + l * layer_stride;
      C* vc = kc + layer_stride / 2;
      // q, k, v
      Gemm g{&lw.qkv, h.data(), D, nullptr, S, qkv.data(), nqkv};
      gemm_phase(&g, 1, tid, nth);
#pragma omp barrier
      // rotary on q and k, k and v into the cache
      split(S * (H + KV), tid, nth, &b, &e);
      for (int64_t item = b; item < e; ++item) {
        const int64_t s = item / (H + KV), head = item % (H + KV);
        const float* cs = md.rope + sd.positions[s] * 2 * dh;
        float* v = &qkv[s * nqkv + head * dh];
        rotate(v, cs, dh);
        if (head >= H) {
          const int64_t kvh = head - H, at = (sd.slots[s] * KV + kvh) * dh;
          const float* vv = v + KV * dh;
          for (int64_t i = 0; i < dh; ++i) {
            put(kc + at + i, v[i]);
            put(vc + at + i, vv[i]);
          }
        }
      }
#pragma omp barrier
      split(S * KV, tid, nth, &b, &e);
      for (int64_t item = b; item < e; ++item) {
        const int64_t s = item / KV, g = item % KV;
        attend<C, T>(md, sd, kc, vc, s, g, &qkv[s * nqkv + g * G * dh], &att[s * H * dh + g * G * dh],
                     scores[tid].data());
      }
#pragma omp barrier
      g = Gemm{&lw.o, att.data(), H * dh, nullptr, S, tmp.data(), D};
      gemm_phase(&g, 1, tid, nth);
#pragma omp barrier
      // residual, post-attention norm, routing
      split(S, tid, nth, &b, &e);
      for (int64_t s = b; s < e; ++s) {
        for (int64_t i = 0; i < D; ++i) x[s * D + i] += tmp[s * D + i];
        rms_norm(&x[s * D], lw.post_norm, D, md.eps, &h[s * D]);
        if (lw.router) {
          route(md, lw.router, &h[s * D], &ids[s * A], &pair_w[s * A]);
        } else {
          ids[s] = 0;
          pair_w[s] = 1.f;
        }
      }
#pragma omp barrier
#pragma omp single
      {  // pairs grouped by expert, in token order within each (a counting sort)
        std::fill(by_expert.begin(), by_expert.end(), 0);
        for (int64_t p = 0; p < P; ++p) ++by_expert[ids[p] + 1];
        for (int64_t ex = 0; ex < E; ++ex) by_expert[ex + 1] += by_expert[ex];
        std::vector<int32_t> fill(by_expert.begin(), by_expert.end() - 1);
        for (int64_t p = 0; p < P; ++p) {
          const int32_t slot = fill[ids[p]]++;
          pair_slot[p] = slot;
          pair_row[slot] = (int32_t)(p / A);
        }
        for (int64_t ex = 0; ex < E; ++ex) {
          const int64_t start = by_expert[ex], n = by_expert[ex + 1] - start;
          gemms[ex] = Gemm{&lw.w13[ex], h.data(), D, pair_row.data() + start, n, g13.data() + start * 2 * F, 2 * F};
        }
      }  // implicit barrier
      gemm_phase(gemms.data(), (int)E, tid, nth);
#pragma omp barrier
      split(P * F, tid, nth, &b, &e);
      for (int64_t i = b; i < e; ++i) {
        const int64_t p = i / F, f = i % F;
        put(&act[i], silu(g13[p * 2 * F + f]) * g13[p * 2 * F + F + f]);
      }
#pragma omp barrier
      if (tid == 0)
        for (int64_t ex = 0; ex < E; ++ex) {
          const int64_t start = by_expert[ex];
          gemms[ex] = Gemm{&lw.w2[ex], act.data() + start * F, F, nullptr, by_expert[ex + 1] - start,
                            ye.data() + start * D, D};
        }
#pragma omp barrier
      gemm_phase(gemms.data(), (int)E, tid, nth);
#pragma omp barrier
      // the weighted experts back into the residual, in ascending expert order; the next norm
      split(S, tid, nth, &b, &e);
      for (int64_t s = b; s < e; ++s) {
        int64_t order[64];
        for (int64_t a = 0; a < A; ++a) order[a] = s * A + a;
        std::sort(order, order + A, [&](int64_t p, int64_t q) { return ids[p] < ids[q]; });
        for (int64_t a = 0; a < A; ++a) {
          const int64_t p = order[a];
          const float w = pair_w[p];
          const float* y = &ye[pair_slot[p] * D];
          for (int64_t i = 0; i < D; ++i) x[s * D + i] += w * y[i];
        }
        const float* next = l + 1 < md.num_layers ? md.layers[l + 1].input_norm : md.final_norm;
        if (l + 1 < md.num_layers)
          rms_norm(&x[s * D], next, D, md.eps, &h[s * D]);
        else
          rms_norm(&x[s * D], next, D, md.eps, (C*)sd.out + s * D);
      }
#pragma omp barrier
    }
  }
}

}  // namespace

extern "C" {

// 0 on success; 1 for a dtype pair this build does not run.
int mixtral_decode_step(const ModelDesc* md, const StepDesc* sd) {
  // The GEMM input type follows the weights (bf16 rows for bf16 weights, fp32 for fp32 and int8
  // ones); every layer's linears share one type.
  const int32_t wtype = md->layers[0].qkv.dtype;
  if (wtype == BF16 && md->dtype == BF16)
    decode_step<bf16, bf16>(*md, *sd);
  else if (wtype == INT8 && md->dtype == BF16)
    decode_step<float, bf16>(*md, *sd);
  else if (wtype != BF16 && md->dtype == F32)
    decode_step<float, float>(*md, *sd);
  else
    return 1;
  return 0;
}

// y [m, n] fp32 = x [m, k] @ W^T, x in the weight's dtype, on `threads` threads.
void native_linear(const Linear* lin, const void* x, int64_t m, float* y, int32_t threads) {
  const Gemm g{lin, x, lin->k, nullptr, m, y, lin->n};
#pragma omp parallel num_threads(threads)
  gemm_phase(&g, 1, omp_get_thread_num(), omp_get_num_threads());
}

}  // extern "C"
