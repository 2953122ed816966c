// y = x w on CPU with w pre-packed into column panels: the engine's weight products. An XLA FFI
// handler (cna_jax/cpu_kernels.py builds and registers it). Shapes: x [M, K], w_packed [P, K, W] (panel p
// holds columns Wp .. Wp + W - 1 of w [K, N], k-major; columns past N are zero), y [M, N]; all float32. The
// panel width W is one register tile's: 48 columns in the AVX-512 build, 24 in the AVX2 and portable ones
// (cpu_kernels.panel() names the build's).
//
// Why packed: a decode step multiplies a few dozen rows by every weight matrix once, so the weights come
// from memory each step. XLA:CPU's matmul copies ("packs") each weight into a cache-friendly layout per
// call; that copy costs as much as the arithmetic at these shapes. Packed once per model, a panel is read
// straight into registers (one-core rates and the trade in cpu_kernels.py).
//
// Every y[m, n] is one fused multiply-add chain over k = 0 .. K-1 in order, whatever the vector width, so
// the AVX-512, AVX2+FMA and portable (std::fma) builds give the same bits. Column tiles are split over
// XLA's intra-op threads where the process may use more than one CPU (parallel.h): each tile is still
// computed whole by one thread, so the bits do not depend on the number of threads either.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// Rows of a panel tile a pass runs over every row block (kDepth x kCols floats, 12 KB: they stay in L1 for
// the next row block instead of coming again from L2; one core of the AVX2 machine, [48, 1536] x [1536, 576]:
// 77 -> 84 GFLOP/s). The accumulators go to y and back between passes, which changes no bit.
constexpr int64_t kDepthBytes = 12 * 1024;

// How far ahead of the row being multiplied a tile asks for its panel's rows into L2. A decode step's
// weights (540 MB for SmolLM2) come from DRAM every step and the hardware prefetcher alone left the kernel
// waiting on them: one core of the Intel AVX-512 machine streamed 8-9 GB/s of panels where it reads 17 GB/s,
// and the 30 layers' products at 32 rows ran 74 -> 60 ms with this (BENCHMARKS.md). Bits unchanged.
constexpr int64_t kPrefetchBytes = 24 * 1024;

#if defined(__AVX512F__)
typedef __m512 Vec;
constexpr int kLanes = 16, kRows = 8;
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec Splat(float a) { return _mm512_set1_ps(a); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Zero() { return _mm512_setzero_ps(); }
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 Vec;
constexpr int kLanes = 8, kRows = 4;
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec Splat(float a) { return _mm256_set1_ps(a); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec Zero() { return _mm256_setzero_ps(); }
#else
#define CNA_PORTABLE 1
constexpr int kRows = 4;
#endif

#ifndef CNA_PORTABLE
// Asks for the panel row kPrefetchBytes past b (every cache line of it) into L2; a row past the panel's end
// is the next panel's, or nothing (a prefetch never faults). The portable build does not (never measured).
inline void Prefetch(const float* b, int64_t row_floats) {
  const char* p = reinterpret_cast<const char*>(b) + kPrefetchBytes;
  for (int64_t j = 0; j < row_floats * static_cast<int64_t>(sizeof(float)); j += 64) __builtin_prefetch(p + j, 0, 2);
}

// 3 vectors of columns x kRows rows accumulate in registers (24 or 12 accumulators).
constexpr int kVecs = 3, kCols = kVecs * kLanes;
// A panel is one tile wide, so a tile reads its panel rows whole and in order. With AVX2's 24-column tiles
// over 48-column panels each tile read half of every 192-byte panel row (three cache lines, two touched):
// a SmolLM2 decode step's products on one core of the AVX2 machine ran 4-5% slower at 48 rows and 8-11%
// at 32 (BENCHMARKS.md).
constexpr int64_t kPanel = kCols;
constexpr int64_t kDepth = kDepthBytes / (kCols * sizeof(float));

// c [kRows, kCols] (row stride ldc) = a [kRows, K] (row stride lda) times the panel's columns b [K, kCols]
// (row stride kPanel); with ``more``, c's values are the chain's partial sums over the previous rows of the
// panel and it goes on from them (the same fused multiply-add chain as one pass over all of K).
inline void Tile(const float* a, int64_t lda, const float* b, int64_t k_n, float* c, int64_t ldc, bool more = false) {
  Vec acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kVecs; ++j) acc[r][j] = more ? Load(c + r * ldc + j * kLanes) : Zero();
  for (int64_t k = 0; k < k_n; ++k) {
    const float* bk = b + k * kPanel;
    Prefetch(bk, kPanel);
    Vec bv[kVecs];
    for (int j = 0; j < kVecs; ++j) bv[j] = Load(bk + j * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const Vec av = Splat(a[r * lda + k]);
      for (int j = 0; j < kVecs; ++j) acc[r][j] = Fma(av, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kVecs; ++j) Store(c + r * ldc + j * kLanes, acc[r][j]);
}

// A product of very few rows (batch-1 decoding) is bound by how fast the panels arrive, not by arithmetic:
// up to kFewRows rows, kStreams panels are multiplied at once, so that as many streams of weights are in flight
// (one core of the Intel AVX-512 machine, one row, 30 SmolLM2 layers: 36 -> 29 ms; more streams or rows per
// pass gave no more, BENCHMARKS.md X2). Same chains, same bits. c [kStreams, kFewRows, kCols] = a [kFewRows, K]
// (row stride lda) times the kStreams panels at b, b + stride, ...
#if defined(__AVX512F__)
constexpr int kFewRows = 2, kStreams = 4;
#else
constexpr int kFewRows = 1, kStreams = 4;
#endif
inline void FewRowsTile(const float* a, int64_t lda, const float* b, int64_t stride, int64_t k_n, float* c) {
  Vec acc[kFewRows][kStreams * kVecs];
  for (int r = 0; r < kFewRows; ++r)
    for (int j = 0; j < kStreams * kVecs; ++j) acc[r][j] = Zero();
  for (int64_t k = 0; k < k_n; ++k) {
    Vec bv[kStreams * kVecs];
    for (int p = 0; p < kStreams; ++p) {
      const float* bk = b + p * stride + k * kPanel;
      Prefetch(bk, kPanel);
      for (int j = 0; j < kVecs; ++j) bv[p * kVecs + j] = Load(bk + j * kLanes);
    }
    for (int r = 0; r < kFewRows; ++r) {
      const Vec av = Splat(a[r * lda + k]);
      for (int j = 0; j < kStreams * kVecs; ++j) acc[r][j] = Fma(av, bv[j], acc[r][j]);
    }
  }
  for (int p = 0; p < kStreams; ++p)
    for (int r = 0; r < kFewRows; ++r)
      for (int j = 0; j < kVecs; ++j) Store(c + (p * kFewRows + r) * kCols + j * kLanes, acc[r][p * kVecs + j]);
}
#else
constexpr int kCols = 24;
constexpr int64_t kPanel = kCols;
constexpr int64_t kDepth = kDepthBytes / (kCols * sizeof(float));
inline void Tile(const float* a, int64_t lda, const float* b, int64_t k_n, float* c, int64_t ldc, bool more = false) {
  for (int r = 0; r < kRows; ++r)
    for (int64_t j = 0; j < kCols; ++j) {
      float acc = more ? c[r * ldc + j] : 0.0f;
      for (int64_t k = 0; k < k_n; ++k) acc = std::fma(a[r * lda + k], b[k * kPanel + j], acc);
      c[r * ldc + j] = acc;
    }
}
#endif

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kPanel || wd[1] != xd[1] ||
      yd[0] != xd[0] || yd[1] > wd[0] * kPanel || yd[1] <= (wd[0] - 1) * kPanel) {
    return ffi::Error::InvalidArgument("packed_matmul: want x [M, K], w [ceil(N / W), K, W], y [M, N] with W = " +
                                       std::to_string(kPanel) + " (this build's panel width)");
  }
  const int64_t m_n = xd[0], k_n = xd[1], n_n = yd[1];
  const float* a = x.typed_data();
  const float* b = w.typed_data();
  float* c = y->typed_data();
  // A last row block short of kRows rows reads its rows from a zero-padded copy; a tile past M or N is
  // computed whole into `tail` and its valid part copied out.
  const int64_t full_rows = m_n - m_n % kRows;
  std::vector<float> last_rows;
  if (full_rows < m_n) {
    last_rows.assign(kRows * k_n, 0.0f);
    std::memcpy(last_rows.data(), a + full_rows * k_n, sizeof(float) * (m_n - full_rows) * k_n);
  }
  const int64_t tiles = (n_n + kCols - 1) / kCols;
#ifndef CNA_PORTABLE
  if (0 < m_n && m_n <= kFewRows && tiles >= kStreams) {  // its rows zero-padded: last_rows (no full block)
    // Group q: tiles [q * kStreams, (q + 1) * kStreams); the last group starts early enough to be whole and
    // writes only its own tiles.
    const auto group = [&](int64_t q) {
      float out[kStreams * kFewRows * kCols];
      const int64_t t0 = std::min(q * kStreams, tiles - kStreams);
      FewRowsTile(last_rows.data(), k_n, b + t0 * k_n * kPanel, k_n * kPanel, k_n, out);
      for (int64_t t = q * kStreams; t < t0 + kStreams; ++t) {
        const int64_t n0 = t * kCols, cols = std::min<int64_t>(n_n - n0, kCols);
        for (int64_t r = 0; r < m_n; ++r) {
          std::memcpy(c + r * n_n + n0, out + ((t - t0) * kFewRows + r) * kCols, sizeof(float) * cols);
        }
      }
    };
    cna::ParallelFor(pool, (tiles + kStreams - 1) / kStreams, 2.0 * kStreams * m_n * k_n * kCols, group);
    return ffi::Error::Success();
  }
#endif
  // Column tile t: columns [t * kCols, t * kCols + kCols) of y, every row block.
  const auto tile = [&](int64_t t) {
    float tail[kRows * kCols];
    const int64_t n0 = t * kCols;
    const float* bp = b + t * k_n * kPanel;  // tile t is panel t
    const int64_t cols = n_n - n0 < kCols ? n_n - n0 : kCols;
    if (cols == kCols) {  // whole row blocks, kDepth rows of the panel at a time over all of them
      for (int64_t k0 = 0; k0 == 0 || k0 < k_n; k0 += kDepth) {  // K = 0 still writes the zeros
        const int64_t depth = k_n - k0 < kDepth ? k_n - k0 : kDepth;
        for (int64_t m0 = 0; m0 < full_rows; m0 += kRows) {
          Tile(a + m0 * k_n + k0, k_n, bp + k0 * kPanel, depth, c + m0 * n_n + n0, n_n, k0 > 0);
        }
      }
    }
    for (int64_t m0 = cols == kCols ? full_rows : 0; m0 < m_n; m0 += kRows) {
      const int64_t rows = m_n - m0 < kRows ? m_n - m0 : kRows;
      const float* am = rows == kRows ? a + m0 * k_n : last_rows.data();
      Tile(am, k_n, bp, k_n, tail, kCols);
      for (int64_t r = 0; r < rows; ++r) std::memcpy(c + (m0 + r) * n_n + n0, tail + r * kCols, sizeof(float) * cols);
    }
  };
  cna::ParallelFor(pool, tiles, 2.0 * m_n * k_n * kCols, tile);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnaPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
