// Decode attention on CPU: one query token per slot against that slot's cached keys/values, reading
// only the cache columns the slot's mask marks valid. An XLA FFI handler (cna_jax/cpu_kernels.py builds
// and registers it). Shapes: q [B, K, G, D], k and v [B, K, S, D], mask [B, S] (true = attend),
// out [B, K, G, D]; all float32. The arithmetic is the XLA path's (scores * scale, softmax over the
// valid columns, probabilities times values) in a fixed order, with its own exp, so one build gives the same
// bits on every machine it runs on. Slots are split over XLA's intra-op threads where the process may use
// more than one CPU (parallel.h); a slot is computed whole by one thread, so the bits stay the same.
// Speed (one core of the AVX2 machine, 48 slots x 3 KV heads x ~100 valid columns, 30 layers' caches: 220 MB):
// eight columns' scores share their horizontal sums (Sums8), the exponentials run in 8 lanes, the value sums
// stay in registers and the key pass prefetches: 27.7 -> 21.1 ms, every bit the same.
#include <cmath>
#include <algorithm>
#include <cstring>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "vec8.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace cna;  // NOLINT: the kernels' shared vector helpers (vec8.h)
constexpr int kBlock = 64;  // lanes of D accumulated in registers at once

// out[0 : C * kLanes] = sum_j p[j] v[cols[j], 0 : C * kLanes] (v rows of length d), in registers.
template <int C>
inline void AccumulateValues(const float* p, const float* v, const int32_t* cols, int64_t n, int64_t d, float* out) {
  Vec acc[C] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float* vr = v + cols[j] * d;
    const float w = p[j];
    for (int c = 0; c < C; ++c) acc[c] += w * Load(vr + c * kLanes);
  }
  for (int c = 0; c < C; ++c) std::memcpy(out + c * kLanes, &acc[c], sizeof(Vec));  // one copy would keep acc in memory
}

// The first query row's pass over the keys streams them from memory: it prefetches the keys kAhead columns
// ahead and the values of the columns it reads (read again by the value pass), so two streams are in flight.
constexpr int64_t kAhead = 16;
inline void Prefetch(const float* kh, const float* vh, const int32_t* cols, int64_t j, int64_t n, int64_t d) {
  for (int64_t c = j; c < j + 8; ++c) {
    if (c + kAhead < n) {
      const float* kr = kh + cols[c + kAhead] * d;
      for (int64_t x = 0; x < d; x += 16) __builtin_prefetch(kr + x);
    }
    const float* vr = vh + cols[c] * d;
    for (int64_t x = 0; x < d; x += 16) __builtin_prefetch(vr + x);
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, float scale, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4 || mask.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("decode_attention: q, k, v must be 4-D and mask 2-D");
  }
  const int64_t b_n = qd[0], k_n = qd[1], g_n = qd[2], d_n = qd[3], s_n = kd[2];
  if (kd[0] != b_n || kd[1] != k_n || kd[3] != d_n || mask.dimensions()[0] != b_n || mask.dimensions()[1] != s_n) {
    return ffi::Error::InvalidArgument("decode_attention: shapes do not match");
  }
  if (d_n % kLanes != 0) return ffi::Error::InvalidArgument("decode_attention: head_dim must be a multiple of 8");
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();

  const auto slot = [&](int64_t b) {
    // Scratch per thread, grown to this call's sizes: the valid columns, probabilities [G, valid], per-row
    // maxima and totals.
    thread_local std::vector<int32_t> cols;
    thread_local std::vector<float> p, mx, total;
    cols.resize(s_n);
    p.resize(g_n * s_n);
    mx.resize(g_n);
    total.resize(g_n);
    const bool* m = mp + b * s_n;
    int64_t n = 0;
    for (int64_t s = 0; s < s_n; ++s) {
      if (m[s]) cols[n++] = static_cast<int32_t>(s);
    }
    for (int64_t h = 0; h < k_n; ++h) {
      const int64_t bh = b * k_n + h;
      const float* qh = qp + bh * g_n * d_n;
      const float* kh = kp + bh * s_n * d_n;
      const float* vh = vp + bh * s_n * d_n;
      float* oh = op + bh * g_n * d_n;
      if (n == 0) {  // an empty slot: nothing to attend to (its output is never read)
        std::memset(oh, 0, g_n * d_n * sizeof(float));
        continue;
      }
      for (int64_t g = 0; g < g_n; ++g) {
        const float* qg = qh + g * d_n;
        float* pg = p.data() + g * n;
        float m = -INFINITY;
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {  // eight columns at once, their horizontal sums together (Sums8)
          if (g == 0) Prefetch(kh, vh, cols.data(), j, n, d_n);
          const float* kr[8];
          for (int c = 0; c < 8; ++c) kr[c] = kh + cols[j + c] * d_n;
          Vec acc[8] = {};
          for (int64_t d = 0; d < d_n; d += kLanes) {
            const Vec qv = Load(qg + d);
            for (int c = 0; c < 8; ++c) acc[c] += qv * Load(kr[c] + d);
          }
          const Vec s = Sums8(acc) * scale;
          std::memcpy(pg + j, &s, sizeof(s));
          for (int c = 0; c < 8; ++c) m = std::max(m, s[c]);
        }
        for (; j + 4 <= n; j += 4) {  // four columns at once: four independent accumulation chains
          const float* k0 = kh + cols[j] * d_n;
          const float* k1 = kh + cols[j + 1] * d_n;
          const float* k2 = kh + cols[j + 2] * d_n;
          const float* k3 = kh + cols[j + 3] * d_n;
          Vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
          for (int64_t d = 0; d < d_n; d += kLanes) {
            const Vec qv = Load(qg + d);
            a0 += qv * Load(k0 + d);
            a1 += qv * Load(k1 + d);
            a2 += qv * Load(k2 + d);
            a3 += qv * Load(k3 + d);
          }
          const float s0 = Sum(a0) * scale, s1 = Sum(a1) * scale, s2 = Sum(a2) * scale, s3 = Sum(a3) * scale;
          pg[j] = s0;
          pg[j + 1] = s1;
          pg[j + 2] = s2;
          pg[j + 3] = s3;
          m = std::max(std::max(m, std::max(s0, s1)), std::max(s2, s3));
        }
        for (; j < n; ++j) {
          const float* kr = kh + cols[j] * d_n;
          Vec acc = {};
          for (int64_t d = 0; d < d_n; d += kLanes) acc += Load(qg + d) * Load(kr + d);
          const float sc = Sum(acc) * scale;
          pg[j] = sc;
          m = std::max(m, sc);
        }
        mx[g] = m;
      }
      for (int64_t g = 0; g < g_n; ++g) {
        float* pg = p.data() + g * n;
        const float m = mx[g];
        int64_t j = 0;
        for (; j + kLanes <= n; j += kLanes) {  // Exp gives ExpNonPositive's bits in 8 lanes
          const Vec e = Exp(Load(pg + j) - m);
          std::memcpy(pg + j, &e, sizeof(e));
        }
        for (; j < n; ++j) pg[j] = ExpNonPositive(pg[j] - m);
        float t = 0.0f;
        for (int64_t j = 0; j < n; ++j) t += pg[j];
        total[g] = t;
      }
      for (int64_t g = 0; g < g_n; ++g) {
        for (int64_t j = 0; j < n; ++j) p[g * n + j] /= total[g];
      }
      for (int64_t g = 0; g < g_n; ++g) {  // out[g] = sum_j p[g, j] v[j], in blocks of kBlock lanes of D
        const float* pg = p.data() + g * n;
        float* o = oh + g * d_n;
        int64_t d0 = 0;
        for (; d0 + kBlock <= d_n; d0 += kBlock) AccumulateValues<kBlock / kLanes>(pg, vh + d0, cols.data(), n, d_n, o + d0);
        for (; d0 < d_n; d0 += kLanes) AccumulateValues<1>(pg, vh + d0, cols.data(), n, d_n, o + d0);
      }
    }
  };
  cna::ParallelFor(pool, b_n, 4.0 * k_n * g_n * s_n * d_n, slot);  // a slot's full window as its cost
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnaDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<float>("scale")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
