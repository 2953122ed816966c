// KL divergence between two rows of logits over the vocabulary, one row (one scored position) at a time, for
// the damage stage (cna_jax/damage.py). XLA FFI handler (cna_jax/cpu_kernels.py builds and registers it).
//
// XLA:CPU runs a log-softmax over [rows, 49152] and the KL's multiply-reduce at ~3 ns per element (its
// row reductions of fused elementwise work are not vectorised); here each row's passes (max, sum of exp,
// the KL sum) run in 8-lane vectors while the row is in cache.
//
// Both distributions' log-probabilities are (z - max) - log(sum exp(z - max)) from the same code, so a
// condition whose logits equal the reference's gives log q == log p bit for bit and a KL of exactly 0. Sums
// run in a fixed order (8 lanes in blocks, then the lanes pairwise), so one build gives the same bits on every
// machine.
//
//   CnaRowKl: z [R, V], ref [R, V] float32 logits -> KL(softmax(ref) || softmax(z)) [R]
#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec8.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace cna;  // NOLINT: the kernels' shared vector helpers (vec8.h)

// One element through the vector code (a row's last n % 8 entries).
inline float Exp1(float x) { return Exp(Vec{} + x)[0]; }

inline float RowMax(const float* z, int64_t n) {
  float m = -INFINITY;
  int64_t j = 0;
  if (n >= kLanes) {
    Vec v = Load(z);
    for (j = kLanes; j + kLanes <= n; j += kLanes) {
      const Vec x = Load(z + j);
      v = v > x ? v : x;
    }
    for (int l = 0; l < kLanes; ++l) m = m > v[l] ? m : v[l];
  }
  for (; j < n; ++j) m = m > z[j] ? m : z[j];
  return m;
}

// sum over j < n of term(j), where term(j) is a Vec of entries j..j+7 and term1(j) one entry (the last n % 8):
// two vectors in flight, summed per block of kBlock entries into an outer vector (float32 error then grows
// with ~n / 16 / kBlock + kBlock / 16 terms per lane, not n / 16), then the lanes; a fixed order throughout.
constexpr int64_t kBlock = 512;
template <class Term, class Term1>
inline float RowSum(int64_t n, Term term, Term1 term1) {
  Vec outer = {};
  int64_t j = 0;
  while (j + 2 * kLanes <= n) {
    Vec s0 = {}, s1 = {};
    const int64_t end = j + kBlock < n ? j + kBlock : n;
    for (; j + 2 * kLanes <= end; j += 2 * kLanes) {
      s0 += term(j);
      s1 += term(j + kLanes);
    }
    outer += s0 + s1;
  }
  for (; j + kLanes <= n; j += kLanes) outer += term(j);
  float t = Sum(outer);
  for (; j < n; ++j) t += term1(j);
  return t;
}

// The row's max and log(sum exp(z - max)).
inline void RowLogSumExp(const float* z, int64_t n, float* mx, float* log_sum) {
  const float m = RowMax(z, n);
  const float t = RowSum(n, [&](int64_t j) { return Exp(Load(z + j) - m); }, [&](int64_t j) { return Exp1(z[j] - m); });
  *mx = m;
  *log_sum = std::log(t);
}

ffi::Error Shapes(const ffi::Buffer<ffi::F32>& z, int64_t* rows, int64_t* n) {
  auto d = z.dimensions();
  if (d.size() < 1) return ffi::Error::InvalidArgument("row kernels: z needs a vocabulary axis");
  *n = d[d.size() - 1];
  *rows = 1;
  for (size_t i = 0; i + 1 < d.size(); ++i) *rows *= d[i];
  return ffi::Error::Success();
}

ffi::Error RowKl(ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> ref, ffi::ResultBuffer<ffi::F32> out) {
  int64_t rows, n;
  if (auto e = Shapes(z, &rows, &n); e.failure()) return e;
  if (ref.element_count() != z.element_count()) {
    return ffi::Error::InvalidArgument("row_kl: z and ref must have the same shape");
  }
  const float* zp = z.typed_data();
  const float* rp = ref.typed_data();
  float* op = out->typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* zr = zp + r * n;
    const float* rr = rp + r * n;
    float m, ls, mr, lsr;
    RowLogSumExp(zr, n, &m, &ls);
    RowLogSumExp(rr, n, &mr, &lsr);
    // The sum of p * (log p - log q), each log-probability as two subtractions (the same bits in a vector lane
    // as in scalar code, so equal rows give equal log-probabilities and a KL of exactly 0).
    op[r] = RowSum(
        n,
        [&](int64_t j) {
          const Vec a = (Load(rr + j) - mr) - lsr;
          return Exp(a) * (a - ((Load(zr + j) - m) - ls));
        },
        [&](int64_t j) {
          const float a = (rr[j] - mr) - lsr;
          return Exp1(a) * (a - ((zr[j] - m) - ls));
        });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnaRowKl, RowKl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
