// y [M, N] = x [M, K] @ w [N, K]^T for bf16 x, w, y with fp32 accumulation (AVX512-BF16).
//
// A probe, not part of the server: `python -m bench.gemv_probe` builds it and measures it against
// oneDNN's prepacked GEMM on the same weights, to learn whether our own small-batch kernel would
// stream weights faster. Plain row-major weights; each thread takes a contiguous run of rows,
// four at a time, against up to four rows of x at a time.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

namespace {

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fff + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

// MR rows of x against NR rows of w, over all of K.
template <int MR, int NR>
inline void tile(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t N, int64_t K, int64_t ldx) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
    for (int m = 0; m < MR; ++m) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  if (k < K) {
    __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k);
    for (int m = 0; m < MR; ++m) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * N + r] = to_bf16(_mm512_reduce_add_ps(acc[m][r]));
}

template <int NR>
inline void rows(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t M, int64_t N, int64_t K) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, NR>(x + m * K, w, y + m * N, N, K, K);
  switch (M - m) {
    case 3: tile<3, NR>(x + m * K, w, y + m * N, N, K, K); break;
    case 2: tile<2, NR>(x + m * K, w, y + m * N, N, K, K); break;
    case 1: tile<1, NR>(x + m * K, w, y + m * N, N, K, K); break;
  }
}

}  // namespace

extern "C" void bf16_linear(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t per = ((N + threads - 1) / threads + 3) / 4 * 4;  // whole groups of 4 rows
    const int64_t begin = t * per < N ? t * per : N, end = begin + per < N ? begin + per : N;
    int64_t n = begin;
    for (; n + 4 <= end; n += 4) rows<4>(x, w + n * K, y + n, M, N, K);
    for (; n < end; ++n) rows<1>(x, w + n * K, y + n, M, N, K);
  }
}
