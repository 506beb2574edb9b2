// Combiner-Fixed's segment summaries in one pass over q, k and v, for inference.
//
// "Combiner: Full Attention Transformer with Sparse Computation Cost", arXiv 2107.05768, Section 4.1: segment m
// of s tokens is summarised by a key kR_m = max-pool of its keys and a value vR_m = sum_j softmax_j(scale qR_m .
// k_j) v_j, with qR_m the max-pool of its queries. The torch form reads k twice (max-pool, then the summary
// attention) and q once more besides, in three calls; here one task per (batch, segment) reads the segment's
// q, k and v rows once (k's rows are re-read from cache for the scores).
//
// IEEE semantics as the torch form: a NaN in a segment's q or k makes its max-pool NaN (torch.amax propagates
// NaN), and the summary value follows from plain float arithmetic (a NaN score gives a NaN softmax row).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// NaN-propagating max, as torch.amax
inline float nan_max(float a, float x) { return (x > a || x != x) ? x : a; }

using v16f = float __attribute__((vector_size(64)));

// a . b over D floats: 16 independent partial sums (a single scalar chain waits on each add)
inline float dot(const float* a, const float* b, int64_t D) {
  v16f acc = {};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    v16f x, y;
    std::memcpy(&x, a + d, sizeof x);
    std::memcpy(&y, b + d, sizeof y);
    acc += x * y;
  }
  float r = 0.f;
  for (int i = 0; i < 16; ++i) r += acc[i];
  for (; d < D; ++d) r += a[d] * b[d];
  return r;
}

// q (B, N, H, D), k (B, N, H, D), v (B, N, H, Dv): float32, feature-contiguous, N a multiple of `segment`.
// Returns kR (B, N / s, H, D) and vR (B, N / s, H, Dv).
std::tuple<at::Tensor, at::Tensor> combiner_summaries(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      int64_t segment, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "combiner_summaries: q, k must be (B, N, H, D) and v (B, N, H, Dv)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "combiner_summaries: float32 CPU tensors");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "combiner_summaries: feature dim must be contiguous");
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3), Dv = v.size(3), s = segment;
  TORCH_CHECK(s > 0 && N % s == 0, "combiner_summaries: N must be a multiple of segment");
  const int64_t n = N / s;
  at::Tensor kR = at::empty({B, n, H, D}, q.options()), vR = at::empty({B, n, H, Dv}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float *kr = kR.data_ptr<float>(), *vr = vR.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // one task per (batch, segment), all heads together: the segment's rows are read in token order (each row
  // holds every head; per-head tasks read 256-byte pieces H * D floats apart and ran slower than torch)
  at::parallel_for(0, B * n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> qm(H * D), km(H * D), p(H * s), acc(H * Dv), mx(H), sum(H);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t m = t % n, b = t / n;
      auto row = [&](const float* base, const at::Tensor& x, int64_t j, int64_t h) {
        return base + b * x.stride(0) + (m * s + j) * x.stride(1) + h * x.stride(2);
      };
      std::fill(qm.begin(), qm.end(), -std::numeric_limits<float>::infinity());
      std::fill(km.begin(), km.end(), -std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < s; ++j)
        for (int64_t h = 0; h < H; ++h) {
          const float *qj = row(qp, q, j, h), *kj = row(kp, k, j, h);
          float *qh = qm.data() + h * D, *kh = km.data() + h * D;
          for (int64_t d = 0; d < D; ++d) {
            qh[d] = nan_max(qh[d], qj[d]);
            kh[d] = nan_max(kh[d], kj[d]);
          }
        }
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < s; ++j)  // scores (the segment's k rows again, now in cache)
        for (int64_t h = 0; h < H; ++h) {
          const float x = dot(qm.data() + h * D, row(kp, k, j, h), D) * sc;
          p[h * s + j] = x;
          mx[h] = nan_max(mx[h], x);
        }
      for (int64_t h = 0; h < H; ++h) {
        float z = 0.f;
        for (int64_t j = 0; j < s; ++j) {
          p[h * s + j] = std::exp(p[h * s + j] - mx[h]);
          z += p[h * s + j];
        }
        sum[h] = z;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < s; ++j)
        for (int64_t h = 0; h < H; ++h) {
          const float* vj = row(vp, v, j, h);
          const float w = p[h * s + j] / sum[h];
          float* ah = acc.data() + h * Dv;
          for (int64_t d = 0; d < Dv; ++d) ah[d] += w * vj[d];
        }
      for (int64_t h = 0; h < H; ++h) {
        std::copy(km.begin() + h * D, km.begin() + (h + 1) * D, kr + ((b * n + m) * H + h) * D);
        std::copy(acc.begin() + h * Dv, acc.begin() + (h + 1) * Dv, vr + ((b * n + m) * H + h) * Dv);
      }
    }
  });
  return {kR, vR};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnkit_native, m) {
  m.def("combiner_summaries(Tensor q, Tensor k, Tensor v, int segment, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnkit_native, CPU, m) { m.impl("combiner_summaries", &combiner_summaries); }
