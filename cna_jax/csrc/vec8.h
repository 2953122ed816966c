// 8-lane float32 vectors (GCC / Clang vector extensions) and exp for the CPU kernels: one AVX2 register
// where a kernel is built with -mavx2, SSE pairs or scalar code elsewhere, the same arithmetic in every build.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace cna {

constexpr int kLanes = 8;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float Sum(Vec v) {  // a fixed order: pairs, then pairs of pairs
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7]: in-lane shuffles (one vshufps each on AVX2).
inline Vec PairSums(Vec a, Vec b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// Lane i = Sum(v[i]), bit for bit (the same pairs, then pairs of pairs): eight horizontal sums for the
// shuffles of about one.
inline Vec Sums8(const Vec* v) {
  const Vec a = PairSums(PairSums(v[0], v[1]), PairSums(v[2], v[3]));  // Sum's two halves of v[0..3]
  const Vec b = PairSums(PairSums(v[4], v[5]), PairSums(v[6], v[7]));
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
}

// exp(x) for x <= 0 (e.g. scores less their maximum), branch-free, as a float or in 8 lanes: x = n ln2 + r,
// |r| <= ln2 / 2, a degree-6 polynomial for exp(r) (Cephes' expf coefficients, ~1 ulp), times 2^n. Below -87
// it returns exp(-87) ~ 1.6e-38 instead of a denormal or 0: nothing next to the maximum's 1.

// exp(r) for r = x - n ln2 (T: float or Vec).
template <class T>
inline T ExpReduced(T x, T n) {
  T r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  T y = T{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * r * r + r + 1.0f;
}

inline float ExpNonPositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return ExpReduced(x, n) * scale;
}

inline Vec Exp(Vec x) {
  const Vec lo = Vec{} - 87.0f;
  x = x < lo ? lo : x;
  const Vec t = x * 1.44269504088896341f + 0.5f;
  Vec n = __builtin_convertvector(__builtin_convertvector(t, IVec), Vec);  // truncation, then floor
  n = n > t ? n - 1.0f : n;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return ExpReduced(x, n) * scale;
}

}  // namespace cna
