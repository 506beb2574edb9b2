// Chunked causal linear attention with decay, forward, one fused pass per (batch, head) on the CPU.
//
// "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language
// Models", arXiv 2401.04658 (Algorithm 1, generalised to per-token log-decay as in linear_chunk.py).
//
// Why a compiled kernel: the torch-ops path (ops/linear_chunk.py) batches each step over all chunks
// of a segment, so every intermediate (scores, chunk states, prefix states) makes a round trip
// through DRAM and its 64^3 GEMMs run at ~45 % of the matmul roof. Here one thread walks the chunks
// of one head in order, carrying the state S (D x Dv) in cache: per chunk four small GEMMs on
// the caller's strided rows plus a few C x C / C x D scalings, and q, k, v are read and o written
// exactly once. No prefix scan is needed because the walk is sequential; heads run in parallel.
//
// Per chunk of L <= C tokens with in-chunk cumulative log-decay b_i (restarted every chunk, <= 0):
//     A   = (Q K^T) * scale * exp(b_i - b_j) [j <= i]           intra scores, L x L
//     O   = A V + (Q * scale * exp(b_i)) S                        intra + inter
//     S   = exp(b_L) S + (K * exp(b_L - b_j))^T V                 state carried to the next chunk
//
// GEMMs call the BLAS that libtorch_cpu exports (sgemm_/dgemm_, MKL in the pip wheels). Inside
// at::parallel_for each call runs on its own thread.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace {

// A fresh output of tens of MiB is an mmap that faults one 4 KiB page at a time (~3 us each on a VM,
// and heads-last rows make both threads fault the same pages). Asking for transparent huge pages on
// it cuts a 32 MiB output's first touch from ~17 ms to ~3.5 ms; on a reused heap block it changes nothing.
void advise_huge(void* p, int64_t nbytes) {
#ifdef __linux__
  constexpr int64_t kMin = int64_t(8) << 20, kPage = 4096;
  if (nbytes < kMin) return;
  const auto a = (reinterpret_cast<uintptr_t>(p) + kPage - 1) / kPage * kPage;
  const auto e = (reinterpret_cast<uintptr_t>(p) + nbytes) / kPage * kPage;
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#endif
}

inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                      const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C (M x N, row stride ldc) = alpha op(A) op(B) + beta C. BLAS is column-major and a
// row-major matrix is its transpose there, so this is C^T = op(B)^T op(A)^T with the operands swapped.
template <typename T>
inline void gemm_rm(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T beta, T* C, int64_t ldc) {
  blas_gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', N, M, K, alpha, B, static_cast<int>(ldb), A, static_cast<int>(lda),
            beta, C, static_cast<int>(ldc));
}

struct Geometry {
  int64_t B, N, H, Hkv, D, Dv, C, seg;
  int64_t qs[3], ks[3], vs[3], os[3];  // strides of (batch, token, head); the feature stride is 1
  int64_t gs[3];                        // log-decay strides (batch, token, head); all 0 but head for (H,)
  bool has_g, has_s0;
  double scale;
};

template <typename T>
void forward_head(const Geometry& G, int64_t b, int64_t h, const T* q, const T* k, const T* v, const T* g, T* o,
                  T* S_out, T* bounds) {
  const int64_t C = G.C, D = G.D, Dv = G.Dv, hk = h / (G.H / G.Hkv), W = C + D;
  const T scale = static_cast<T>(G.scale);
  const T* Q = q + b * G.qs[0] + h * G.qs[2];
  const T* K = k + b * G.ks[0] + hk * G.ks[2];
  const T* V = v + b * G.vs[0] + hk * G.vs[2];
  T* O = o + b * G.os[0] + h * G.os[2];
  const T* gh = G.has_g ? g + b * G.gs[0] + h * G.gs[2] : nullptr;
  const bool per_token = G.has_g && G.gs[1] != 0;
  // Intra and inter terms are one GEMM: O = [A | Qd] [V ; S] with K = C + D, so the output is
  // written once. AQ (C x (C+D)) holds the masked scores and the decayed queries side by side;
  // VS ((C+D) x Dv) holds the packed values and, below them, the carried state S itself.
  // (Heads-last rows are H*D apart, which aliases in L1, so every operand is packed.)
  std::vector<T> Qp(C * D), Kp(C * D), AQ(C * W, T(0)), VS(W * Dv, T(0)), lb(C), Dm;
  T* S = VS.data() + C * Dv;
  std::copy_n(S_out, D * Dv, S);  // initial state (zeros without s0)
  if (G.has_g && !per_token) {
    // constant decay: exp(b_i - b_j) = exp((i - j) g) in every full chunk; scale rides on it
    Dm.assign(C * C, T(0));
    for (int64_t i = 0; i < C; ++i)
      for (int64_t j = 0; j <= i; ++j) Dm[i * C + j] = scale * std::exp(static_cast<T>(i - j) * gh[0]);
  }
  const int64_t nseg_stride = G.B * G.H * D * Dv;
  for (int64_t c0 = 0; c0 < G.N; c0 += C) {
    const int L = static_cast<int>(std::min(C, G.N - c0));
    if (c0 % G.seg == 0) std::copy_n(S, D * Dv, bounds + (c0 / G.seg) * nseg_stride + (b * G.H + h) * D * Dv);
    for (int i = 0; i < L; ++i) {
      std::copy_n(Q + (c0 + i) * G.qs[1], D, Qp.data() + i * D);
      std::copy_n(K + (c0 + i) * G.ks[1], D, Kp.data() + i * D);
      std::copy_n(V + (c0 + i) * G.vs[1], Dv, VS.data() + i * Dv);
    }
    if (L < C) {  // ragged last chunk: rows L..C-1 of V and columns L..C-1 of A must add nothing
      std::fill(VS.data() + L * Dv, VS.data() + C * Dv, T(0));
      for (int i = 0; i < L; ++i) std::fill(AQ.data() + i * W + L, AQ.data() + i * W + C, T(0));
    }
    T bend = 0;
    if (G.has_g) {
      T acc = 0;
      for (int i = 0; i < L; ++i) lb[i] = (acc += gh[(c0 + i) * G.gs[1]]);
      bend = lb[L - 1];
    }
    // A = Q K^T into the left block, then the causal decay mask with the scale
    gemm_rm<T>(false, true, L, L, static_cast<int>(D), T(1), Qp.data(), D, Kp.data(), D, T(0), AQ.data(), W);
    const bool const_mask = !G.has_g || (!per_token && L == C);
    for (int i = 0; i < L; ++i) {
      T* Ai = AQ.data() + i * W;
      if (!G.has_g) {
        for (int j = 0; j <= i; ++j) Ai[j] *= scale;
      } else if (const_mask) {
        const T* Di = Dm.data() + i * C;
        for (int j = 0; j <= i; ++j) Ai[j] *= Di[j];
      } else {
        for (int j = 0; j <= i; ++j) Ai[j] *= scale * std::exp(lb[i] - lb[j]);
      }
      for (int j = i + 1; j < L; ++j) Ai[j] = 0;
      // decayed queries into the right block
      const T f = G.has_g ? scale * std::exp(lb[i]) : scale;
      const T* qi = Qp.data() + i * D;
      T* di = Ai + C;
      for (int64_t d = 0; d < D; ++d) di[d] = qi[d] * f;
    }
    gemm_rm<T>(false, false, L, static_cast<int>(Dv), static_cast<int>(W), T(1), AQ.data(), W, VS.data(), Dv, T(0),
               O + c0 * G.os[1], G.os[1]);
    // S = exp(b_L) S + (K * exp(b_L - b_j))^T V
    if (G.has_g) {
      for (int j = 0; j < L; ++j) {
        const T f = std::exp(bend - lb[j]);
        T* kj = Kp.data() + j * D;
        for (int64_t d = 0; d < D; ++d) kj[d] *= f;
      }
    }
    gemm_rm<T>(true, false, static_cast<int>(D), static_cast<int>(Dv), L, T(1), Kp.data(), D, VS.data(), Dv,
               G.has_g ? std::exp(bend) : T(1), S, Dv);
  }
  std::copy_n(S, D * Dv, S_out);
}

// q (B, N, H, D), k (B, N, Hkv, D), v (B, N, Hkv, Dv), feature dim contiguous, same float dtype;
// g: log-decay (H,) or (B, N, H), or an empty tensor for no decay; s0 (B, H, D, Dv) or empty.
// Returns o (B, N, H, Dv), the final state (B, H, D, Dv) and the state entering every segment of
// `seg` tokens (nseg, B, H, D, Dv), which the backward recomputes from.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_chunk_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& g,
                                                                const at::Tensor& s0, double scale, int64_t chunk,
                                                                int64_t seg) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, N, H, D)");
  TORCH_CHECK(q.device().is_cpu(), "linear_chunk_fwd runs on the CPU");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "feature dim must be contiguous");
  TORCH_CHECK(chunk > 0 && seg > 0 && seg % chunk == 0, "seg must be a positive multiple of chunk");
  Geometry G{};
  G.B = q.size(0);
  G.N = q.size(1);
  G.H = q.size(2);
  G.D = q.size(3);
  G.Hkv = k.size(2);
  G.Dv = v.size(3);
  G.C = chunk;
  G.seg = seg;
  G.scale = scale;
  TORCH_CHECK(G.H % G.Hkv == 0 && k.size(1) == G.N && v.size(1) == G.N, "bad k/v shapes");
  for (int i = 0; i < 3; ++i) {
    G.qs[i] = q.stride(i);
    G.ks[i] = k.stride(i);
    G.vs[i] = v.stride(i);
  }
  G.has_g = g.numel() > 0;
  at::Tensor gc;
  if (G.has_g) {
    gc = g.to(q.scalar_type()).contiguous();
    if (gc.dim() == 1) {
      G.gs[0] = 0; G.gs[1] = 0; G.gs[2] = 1;
    } else {
      G.gs[0] = gc.stride(0); G.gs[1] = gc.stride(1); G.gs[2] = gc.stride(2);
    }
  }
  auto opts = q.options();
  at::Tensor o = at::empty({G.B, G.N, G.H, G.Dv}, opts);
  advise_huge(o.data_ptr(), o.nbytes());
  for (int i = 0; i < 3; ++i) G.os[i] = o.stride(i);
  G.has_s0 = s0.numel() > 0;
  at::Tensor S = G.has_s0 ? s0.to(q.scalar_type()).contiguous().clone() : at::zeros({G.B, G.H, G.D, G.Dv}, opts);
  const int64_t nseg = std::max<int64_t>(1, (G.N + seg - 1) / seg);
  at::Tensor bounds = at::empty({nseg, G.B, G.H, G.D, G.Dv}, opts);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "linear_chunk_fwd", [&] {
    const scalar_t* gp = G.has_g ? gc.data_ptr<scalar_t>() : nullptr;
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    scalar_t *op = o.data_ptr<scalar_t>(), *Sp = S.data_ptr<scalar_t>(), *bp = bounds.data_ptr<scalar_t>();
    const int64_t DDv = G.D * G.Dv;
    at::parallel_for(0, G.B * G.H, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t bh = lo; bh < hi; ++bh)
        forward_head<scalar_t>(G, bh / G.H, bh % G.H, qp, kp, vp, gp, op, Sp + bh * DDv, bp);
    });
  });
  if (G.N == 0) bounds.copy_(S.unsqueeze(0));
  return {o, S, bounds};
}

}  // namespace

TORCH_LIBRARY(attnkit_native, m) {
  m.def("linear_chunk_fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor s0, float scale, int chunk, int seg)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnkit_native, CPU, m) { m.impl("linear_chunk_fwd", &linear_chunk_fwd); }
