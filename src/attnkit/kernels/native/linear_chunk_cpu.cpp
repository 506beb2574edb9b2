// Chunked causal linear attention with decay, forward and backward, one pass per (batch, head) on the CPU.
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
// The backward walks each segment twice: forward to recompute the state entering every chunk (from
// the segment-entry states the forward saved), then backward carrying R = dL/dS:
//     dA  = dO V^T ;  dQ = (dA * Dm) K + qd dO P^T ;  dK = (dA * Dm)^T Q + kd V R^T
//     dV  = A^T dO + kd K R ;  R <- exp(b_L) R + (Q qd)^T dO
// with P the state entering the chunk, qd = scale exp(b_i), kd = exp(b_L - b_j), Dm the decay mask.
// The log-decay gradient per position comes from the same products (rowsum/colsum of dA * A, and
// the diagonals of Q X, K Y with X = dO P^T, Y = V R^T), reverse-summed inside the chunk.
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

// Pointers of head h (query side) / hk (key side) of batch b, and the chunk helpers both passes use.
template <typename T>
struct HeadView {
  const T *Q, *K, *V, *gh;
  int64_t gstride;  // log-decay stride between tokens (0 for one decay per head)
  HeadView(const Geometry& G, int64_t b, int64_t h, const T* q, const T* k, const T* v, const T* g) {
    const int64_t hk = h / (G.H / G.Hkv);
    Q = q + b * G.qs[0] + h * G.qs[2];
    K = k + b * G.ks[0] + hk * G.ks[2];
    V = v + b * G.vs[0] + hk * G.vs[2];
    gh = G.has_g ? g + b * G.gs[0] + h * G.gs[2] : nullptr;
    gstride = G.has_g ? G.gs[1] : 0;
  }
};

// Copy L rows of width w, `stride` apart, into a packed (L x w) block. Heads-last rows are H*D
// apart, which aliases in L1 and slows every GEMM on them, so every operand is packed first.
template <typename T>
inline void pack(const T* src, int64_t stride, int L, int64_t w, T* dst) {
  for (int i = 0; i < L; ++i) std::copy_n(src + i * stride, w, dst + i * w);
}

// In-chunk cumulative log-decay of the L tokens from c0 into lb; returns b_L (0 without decay).
template <typename T>
inline T chunk_decay(const HeadView<T>& hv, int64_t c0, int L, T* lb) {
  if (hv.gh == nullptr) return T(0);
  T acc = 0;
  for (int i = 0; i < L; ++i) lb[i] = (acc += hv.gh[(c0 + i) * hv.gstride]);
  return lb[L - 1];
}

// The causal decay mask with the scale: Dm[i][j] = scale exp(b_i - b_j) for j <= i. With one decay
// per head it depends on i - j only (b_i = (i + 1) g), so one C x C table serves every chunk.
template <typename T>
struct DecayMask {
  std::vector<T> table;
  bool has_g, per_token;
  T scale;
  DecayMask(const Geometry& G, const HeadView<T>& hv)
      : has_g(G.has_g), per_token(G.has_g && hv.gstride != 0), scale(static_cast<T>(G.scale)) {
    if (has_g && !per_token) {
      const int64_t C = G.C;
      std::vector<T> lag(C);  // scale exp(d g) for lags d = i - j: C exps, not C^2 / 2
      for (int64_t d = 0; d < C; ++d) lag[d] = scale * std::exp(static_cast<T>(d) * hv.gh[0]);
      table.assign(C * C, T(0));
      for (int64_t i = 0; i < C; ++i)
        for (int64_t j = 0; j <= i; ++j) table[i * C + j] = lag[i - j];
    }
  }
  // X[i][j] *= Dm[i][j] for j <= i, X[i][j] = 0 for i < j < L (rows of X are ldx apart)
  void apply(T* X, int64_t ldx, int L, const T* lb, int64_t C) const {
    for (int i = 0; i < L; ++i) {
      T* xi = X + i * ldx;
      if (!has_g) {
        for (int j = 0; j <= i; ++j) xi[j] *= scale;
      } else if (!per_token) {
        const T* di = table.data() + i * C;
        for (int j = 0; j <= i; ++j) xi[j] *= di[j];
      } else {
        for (int j = 0; j <= i; ++j) xi[j] *= scale * std::exp(lb[i] - lb[j]);
      }
      std::fill(xi + i + 1, xi + L, T(0));
    }
  }
};

// dst[i][:] = src[i][:] * f_i for L rows of width w (row strides lds, ldd)
template <typename T>
inline void scale_rows(const T* src, int64_t lds, T* dst, int64_t ldd, int L, int64_t w, const T* f) {
  for (int i = 0; i < L; ++i) {
    const T fi = f[i];
    const T* si = src + i * lds;
    T* di = dst + i * ldd;
    for (int64_t d = 0; d < w; ++d) di[d] = si[d] * fi;
  }
}

// qd_i = scale exp(b_i) and kd_j = exp(b_L - b_j) (scale and 1 without decay)
template <typename T>
inline void chunk_factors(bool has_g, T scale, const T* lb, T bend, int L, T* qd, T* kd) {
  for (int i = 0; i < L; ++i) {
    qd[i] = has_g ? scale * std::exp(lb[i]) : scale;
    kd[i] = has_g ? std::exp(bend - lb[i]) : T(1);
  }
}

template <typename T>
void forward_head(const Geometry& G, int64_t b, int64_t h, const T* q, const T* k, const T* v, const T* g, T* o,
                  T* S_out, T* bounds) {
  const int64_t C = G.C, D = G.D, Dv = G.Dv, W = C + D;
  const HeadView<T> hv(G, b, h, q, k, v, g);
  const DecayMask<T> mask(G, hv);
  T* O = o + b * G.os[0] + h * G.os[2];
  // Intra and inter terms are one GEMM: O = [A | Qd] [V ; S] with K = C + D, so the output is
  // written once. AQ (C x (C+D)) holds the masked scores and the decayed queries side by side;
  // VS ((C+D) x Dv) holds the packed values and, below them, the carried state S itself.
  std::vector<T> Qp(C * D), Kp(C * D), AQ(C * W, T(0)), VS(W * Dv, T(0)), lb(C), qd(C), kd(C);
  T* S = VS.data() + C * Dv;
  std::copy_n(S_out, D * Dv, S);  // initial state (zeros without s0)
  const int64_t nseg_stride = G.B * G.H * D * Dv;
  for (int64_t c0 = 0; c0 < G.N; c0 += C) {
    const int L = static_cast<int>(std::min(C, G.N - c0));
    if (c0 % G.seg == 0) std::copy_n(S, D * Dv, bounds + (c0 / G.seg) * nseg_stride + (b * G.H + h) * D * Dv);
    pack(hv.Q + c0 * G.qs[1], G.qs[1], L, D, Qp.data());
    pack(hv.K + c0 * G.ks[1], G.ks[1], L, D, Kp.data());
    pack(hv.V + c0 * G.vs[1], G.vs[1], L, Dv, VS.data());
    if (L < C) {  // ragged last chunk: rows L..C-1 of V and columns L..C-1 of A must add nothing
      std::fill(VS.data() + L * Dv, VS.data() + C * Dv, T(0));
      for (int i = 0; i < L; ++i) std::fill(AQ.data() + i * W + L, AQ.data() + i * W + C, T(0));
    }
    const T bend = chunk_decay(hv, c0, L, lb.data());
    chunk_factors(G.has_g, mask.scale, lb.data(), bend, L, qd.data(), kd.data());
    // A = Q K^T into the left block, masked; decayed queries into the right block
    gemm_rm<T>(false, true, L, L, static_cast<int>(D), T(1), Qp.data(), D, Kp.data(), D, T(0), AQ.data(), W);
    mask.apply(AQ.data(), W, L, lb.data(), C);
    scale_rows(Qp.data(), D, AQ.data() + C, W, L, D, qd.data());
    gemm_rm<T>(false, false, L, static_cast<int>(Dv), static_cast<int>(W), T(1), AQ.data(), W, VS.data(), Dv, T(0),
               O + c0 * G.os[1], G.os[1]);
    // S = exp(b_L) S + (K * kd)^T V
    if (G.has_g) scale_rows(Kp.data(), D, Kp.data(), D, L, D, kd.data());
    gemm_rm<T>(true, false, static_cast<int>(D), static_cast<int>(Dv), L, T(1), Kp.data(), D, VS.data(), Dv,
               G.has_g ? std::exp(bend) : T(1), S, Dv);
  }
  std::copy_n(S, D * Dv, S_out);
}

struct Grads {
  int64_t dqs[3], dks[3], dvs[3], dos[3];  // strides (batch, token, head)
  bool need_g;
};

// Backward of query head h; adds (accumulate) or writes its dK, dV into kv head hk's rows.
template <typename T>
void backward_head(const Geometry& G, const Grads& R_, int64_t b, int64_t h, bool accumulate, const T* q, const T* k,
                   const T* v, const T* g, const T* dout, const T* bounds, T* dq, T* dk, T* dv, T* dgtok, T* R) {
  const int64_t C = G.C, D = G.D, Dv = G.Dv, hk = h / (G.H / G.Hkv);
  const HeadView<T> hv(G, b, h, q, k, v, g);
  const DecayMask<T> mask(G, hv);
  const T* dO = dout + b * R_.dos[0] + h * R_.dos[2];
  T* dQ = dq + b * R_.dqs[0] + h * R_.dqs[2];
  T* dK = dk + b * R_.dks[0] + hk * R_.dks[2];
  T* dV = dv + b * R_.dvs[0] + hk * R_.dvs[2];
  const int64_t cps = G.seg / C;  // chunks per segment
  std::vector<T> P(cps * D * Dv), Qp(C * D), Kp(C * D), Vp(C * Dv), dOp(C * Dv), A(C * C), dA(C * C), X(C * D),
      Y(C * D), Z(C * Dv), gQ(C * D), gK(C * D), gV(C * Dv), lb(C), qd(C), kd(C), gb(C), Tmp(C * std::max(D, Dv));
  const int64_t nseg = (G.N + G.seg - 1) / G.seg, nseg_stride = G.B * G.H * D * Dv;
  for (int64_t s = nseg - 1; s >= 0; --s) {
    const int64_t s0 = s * G.seg, s1 = std::min(G.N, s0 + G.seg);
    // states entering each chunk of the segment, recomputed from the saved segment-entry state
    std::copy_n(bounds + s * nseg_stride + (b * G.H + h) * D * Dv, D * Dv, P.data());
    for (int64_t c0 = s0, i = 0; c0 + C < s1; c0 += C, ++i) {
      const int L = static_cast<int>(C);
      const T bend = chunk_decay(hv, c0, L, lb.data());
      chunk_factors(G.has_g, mask.scale, lb.data(), bend, L, qd.data(), kd.data());
      pack(hv.V + c0 * G.vs[1], G.vs[1], L, Dv, Vp.data());
      scale_rows(hv.K + c0 * G.ks[1], G.ks[1], Kp.data(), D, L, D, kd.data());
      T* Pn = P.data() + (i + 1) * D * Dv;
      std::copy_n(P.data() + i * D * Dv, D * Dv, Pn);
      gemm_rm<T>(true, false, static_cast<int>(D), static_cast<int>(Dv), L, T(1), Kp.data(), D, Vp.data(), Dv,
                 G.has_g ? std::exp(bend) : T(1), Pn, Dv);
    }
    for (int64_t c0 = s0 + ((s1 - s0 - 1) / C) * C; c0 >= s0; c0 -= C) {
      const int L = static_cast<int>(std::min(C, s1 - c0));
      const T* Pc = P.data() + ((c0 - s0) / C) * D * Dv;
      const T bend = chunk_decay(hv, c0, L, lb.data());
      const T cd = G.has_g ? std::exp(bend) : T(1);
      chunk_factors(G.has_g, mask.scale, lb.data(), bend, L, qd.data(), kd.data());
      pack(hv.Q + c0 * G.qs[1], G.qs[1], L, D, Qp.data());
      pack(hv.K + c0 * G.ks[1], G.ks[1], L, D, Kp.data());
      pack(hv.V + c0 * G.vs[1], G.vs[1], L, Dv, Vp.data());
      pack(dO + c0 * R_.dos[1], R_.dos[1], L, Dv, dOp.data());
      const int iD = static_cast<int>(D), iDv = static_cast<int>(Dv);
      // A = (Q K^T) * Dm ; dA = dO V^T
      gemm_rm<T>(false, true, L, L, iD, T(1), Qp.data(), D, Kp.data(), D, T(0), A.data(), C);
      mask.apply(A.data(), C, L, lb.data(), C);
      gemm_rm<T>(false, true, L, L, iDv, T(1), dOp.data(), Dv, Vp.data(), Dv, T(0), dA.data(), C);
      // raw inter products: X = dO P^T (L x D), Y = V R^T (L x D), Z = K R (L x Dv)
      gemm_rm<T>(false, true, L, iD, iDv, T(1), dOp.data(), Dv, Pc, Dv, T(0), X.data(), D);
      gemm_rm<T>(false, true, L, iD, iDv, T(1), Vp.data(), Dv, R, Dv, T(0), Y.data(), D);
      gemm_rm<T>(false, false, L, iDv, iD, T(1), Kp.data(), D, R, Dv, T(0), Z.data(), Dv);
      if (R_.need_g) {
        // d/db_i: rows of dA * A (+), its columns (-), the key factor (-), the query factor (+);
        // b_L collects the key factors and the state decay exp(b_L) (its R . P term)
        std::fill_n(gb.data(), L, T(0));
        T gend = 0;
        for (int i = 0; i < L; ++i) {
          const T* ai = A.data() + i * C;
          const T* di = dA.data() + i * C;
          for (int j = 0; j <= i; ++j) {
            const T m = ai[j] * di[j];
            gb[i] += m;
            gb[j] -= m;
          }
          T qx = 0, ky = 0;
          for (int64_t d = 0; d < D; ++d) {
            qx += Qp[i * D + d] * X[i * D + d];
            ky += Kp[i * D + d] * Y[i * D + d];
          }
          gb[i] += qd[i] * qx - kd[i] * ky;
          gend += kd[i] * ky;
        }
        if (G.has_g) {
          T rp = 0;
          for (int64_t e = 0; e < D * Dv; ++e) rp += R[e] * Pc[e];
          gend += cd * rp;
        }
        gb[L - 1] += gend;
        // b_i = sum_{r <= i} g_r inside the chunk, so dg_r = sum_{i >= r} db_i
        T acc = 0;
        for (int i = L - 1; i >= 0; --i) {
          acc += gb[i];
          dgtok[((b * G.N) + c0 + i) * G.H + h] = acc;
        }
      }
      mask.apply(dA.data(), C, L, lb.data(), C);  // dA * Dm: the gradient of the raw scores
      // dQ = dS K + qd X ; dK = dS^T Q + kd Y ; dV = A^T dO + kd Z
      gemm_rm<T>(false, false, L, iD, L, T(1), dA.data(), C, Kp.data(), D, T(0), gQ.data(), D);
      gemm_rm<T>(true, false, L, iD, L, T(1), dA.data(), C, Qp.data(), D, T(0), gK.data(), D);
      gemm_rm<T>(true, false, L, iDv, L, T(1), A.data(), C, dOp.data(), Dv, T(0), gV.data(), Dv);
      T* dQc = dQ + c0 * R_.dqs[1];
      T* dKc = dK + c0 * R_.dks[1];
      T* dVc = dV + c0 * R_.dvs[1];
      for (int i = 0; i < L; ++i) {
        T* oq = dQc + i * R_.dqs[1];
        T* ok = dKc + i * R_.dks[1];
        T* ov = dVc + i * R_.dvs[1];
        const T* xq = gQ.data() + i * D;
        const T* xk = gK.data() + i * D;
        const T* xv = gV.data() + i * Dv;
        const T* xi = X.data() + i * D;
        const T* yi = Y.data() + i * D;
        const T* zi = Z.data() + i * Dv;
        for (int64_t d = 0; d < D; ++d) oq[d] = xq[d] + qd[i] * xi[d];
        if (accumulate) {
          for (int64_t d = 0; d < D; ++d) ok[d] += xk[d] + kd[i] * yi[d];
          for (int64_t e = 0; e < Dv; ++e) ov[e] += xv[e] + kd[i] * zi[e];
        } else {
          for (int64_t d = 0; d < D; ++d) ok[d] = xk[d] + kd[i] * yi[d];
          for (int64_t e = 0; e < Dv; ++e) ov[e] = xv[e] + kd[i] * zi[e];
        }
      }
      // R <- exp(b_L) R + (Q qd)^T dO : the gradient of the state entering this chunk
      scale_rows(Qp.data(), D, Tmp.data(), D, L, D, qd.data());
      gemm_rm<T>(true, false, iD, iDv, L, T(1), Tmp.data(), D, dOp.data(), Dv, cd, R, Dv);
    }
  }
}

// Checks shared by both ops and the geometry of a call; gc receives the contiguous log-decay.
Geometry make_geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                       double scale, int64_t chunk, int64_t seg, at::Tensor& gc) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, N, H, D)");
  TORCH_CHECK(q.device().is_cpu(), "attnkit_native linear-attention ops run on the CPU");
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
  if (G.has_g) {
    gc = g.to(q.scalar_type()).contiguous();
    if (gc.dim() == 1) {
      G.gs[0] = 0; G.gs[1] = 0; G.gs[2] = 1;
    } else {
      G.gs[0] = gc.stride(0); G.gs[1] = gc.stride(1); G.gs[2] = gc.stride(2);
    }
  }
  return G;
}

// q (B, N, H, D), k (B, N, Hkv, D), v (B, N, Hkv, Dv), feature dim contiguous, same float dtype;
// g: log-decay (H,) or (B, N, H), or an empty tensor for no decay; s0 (B, H, D, Dv) or empty.
// Returns o (B, N, H, Dv), the final state (B, H, D, Dv) and the state entering every segment of
// `seg` tokens (nseg, B, H, D, Dv), which the backward recomputes from.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_chunk_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& g,
                                                                const at::Tensor& s0, double scale, int64_t chunk,
                                                                int64_t seg) {
  at::Tensor gc;
  Geometry G = make_geometry(q, k, v, g, scale, chunk, seg, gc);
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


// Gradients of linear_chunk_fwd. dout (B, N, H, Dv) feature-contiguous; bounds from the forward;
// dS (B, H, D, Dv) the gradient of the final state (or empty). Returns dq, dk, dv, the log-decay
// gradient per token (B, N, H) (empty unless need_g) and the gradient of the initial state.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_chunk_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, const at::Tensor& dout,
    const at::Tensor& bounds, const at::Tensor& dS, double scale, int64_t chunk, int64_t seg, bool need_g) {
  at::Tensor gc;
  Geometry G = make_geometry(q, k, v, g, scale, chunk, seg, gc);
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && dout.stride(3) == 1, "dout must match q's dtype, feature-contiguous");
  TORCH_CHECK(bounds.is_contiguous() && bounds.scalar_type() == q.scalar_type(), "bad segment states");
  TORCH_CHECK(!need_g || G.has_g, "need_g without a decay");
  auto opts = q.options();
  at::Tensor dq = at::empty({G.B, G.N, G.H, G.D}, opts), dk = at::empty({G.B, G.N, G.Hkv, G.D}, opts),
             dv = at::empty({G.B, G.N, G.Hkv, G.Dv}, opts);
  for (const at::Tensor* t : {&dq, &dk, &dv}) advise_huge(t->data_ptr(), t->nbytes());
  at::Tensor dgtok = need_g ? at::empty({G.B, G.N, G.H}, opts) : at::empty({0}, opts);
  at::Tensor R = dS.numel() > 0 ? dS.to(q.scalar_type()).contiguous().clone() : at::zeros({G.B, G.H, G.D, G.Dv}, opts);
  Grads Gr{};
  for (int i = 0; i < 3; ++i) {
    Gr.dqs[i] = dq.stride(i);
    Gr.dks[i] = dk.stride(i);
    Gr.dvs[i] = dv.stride(i);
    Gr.dos[i] = dout.stride(i);
  }
  Gr.need_g = need_g;
  const int64_t rep = G.H / G.Hkv;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "linear_chunk_bwd", [&] {
    const scalar_t* gp = G.has_g ? gc.data_ptr<scalar_t>() : nullptr;
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    const scalar_t *dop = dout.data_ptr<scalar_t>(), *bp = bounds.data_ptr<scalar_t>();
    scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
    scalar_t *dgp = need_g ? dgtok.data_ptr<scalar_t>() : nullptr, *Rp = R.data_ptr<scalar_t>();
    // one task per (batch, kv head): its query heads run in turn, so dK/dV accumulate without races
    at::parallel_for(0, G.B * G.Hkv, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t bk = lo; bk < hi; ++bk) {
        const int64_t b = bk / G.Hkv, hk = bk % G.Hkv;
        for (int64_t r = 0; r < rep; ++r) {
          const int64_t h = hk * rep + r;
          backward_head<scalar_t>(G, Gr, b, h, r > 0, qp, kp, vp, gp, dop, bp, dqp, dkp, dvp, dgp,
                                  Rp + (b * G.H + h) * G.D * G.Dv);
        }
      }
    });
  });
  if (G.N == 0) {
    dk.zero_();
    dv.zero_();
  }
  return {dq, dk, dv, dgtok, R};
}

}  // namespace

TORCH_LIBRARY(attnkit_native, m) {
  m.def("linear_chunk_fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor s0, float scale, int chunk, int seg)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("linear_chunk_bwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor dout, Tensor bounds, Tensor dS, float scale,"
        " int chunk, int seg, bool need_g) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnkit_native, CPU, m) {
  m.impl("linear_chunk_fwd", &linear_chunk_fwd);
  m.impl("linear_chunk_bwd", &linear_chunk_bwd);
}
