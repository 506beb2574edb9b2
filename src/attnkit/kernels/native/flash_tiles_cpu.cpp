// Softmax attention over a list of (query tile, key tile, full | partial) entries, forward and backward, on the CPU.
//
// "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", arXiv 2307.08691
// (Algorithm 1 for the forward with its online softmax, Algorithm 2 for the backward from the saved
// log-sum-exp), restricted to the tiles a mask leaves non-empty.
//
// Entry list (CSR, built in Python from the mask's tile classes): query tile i visits entries
// row_ptr[i] .. row_ptr[i+1] of (cols, slots); cols holds the key tile index (ascending), slots -1 for a
// FULL tile or the index of the tile's bitmask in `bits` (bit c of word w of row r set = key c + 64 w of
// the tile is allowed to row r). Lead dims let later callers route per batch / per KV head:
//   row_ptr (Lb, Lh, nqt + 1), Lb in {1, B}, Lh in {1, Hkv};  bits (Bm, Hm, nslots, bq, words), Bm in {1, B},
//   Hm in {1, Hq}.
//
// Work unit: one query tile of ALL the G = Hq / Hkv query heads that share a KV head, stacked as one
// (G * rows) x D matrix, so every K/V tile is read and converted once per group (GQA costs no copy) and
// each GEMM is G times taller. Consecutive key tiles run as one span of up to `span` keys (one GEMM).
// Inputs are heads-last (B, N, H, D) with any strides but a contiguous feature dim. float32 K / V are
// read in place (the GEMMs take their token stride as leading dimension: no per-tile copy, which cost
// ~15% of the forward); bf16 / fp16 K / V are converted to float32 once per call (O(N D), where a
// per-tile conversion repeats for every query tile) and Q / dO per query tile. All arithmetic is
// float32. Scores are kept in base 2 (scale * log2 e folded into the GEMM's alpha) so one vectorised
// exp2 serves both passes.
//
// Non-finite inputs (the NaN policy of docs/design.md): masked scores are overwritten (a select, never
// a -inf bias added to a NaN), a row whose allowed scores hold a NaN or +inf gets a NaN output and lse;
// a key tile whose V holds a non-finite value (found by one O(N Dv) scan per call) is multiplied by
// its finite part and the non-finite entries are added back for the allowed (query, key) pairs only,
// so a masked-out key never multiplies a non-finite value. The backward selects dS = 0 where P = 0.
//
// Backward: one task per (batch, KV head, query split). A task walks its query tiles and, per tile,
// its spans: P = exp2(S - lse), dV += P^T dO, dP = dO V^T, dS = P (dP - delta) scale, dQ += dS K,
// dK += dS^T Q. The task owns its dQ rows and one dK/dV accumulator per split; splits are summed in a
// fixed order afterwards, so the result does not depend on thread timing (deterministic).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
}

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row-major C (M x N) = alpha op(A) op(B) + beta C, through column-major BLAS (operands swapped).
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  sgemm_(&a, &b, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

// 16 floats in GCC's portable vector type: AVX-512 registers with -march=native on such a CPU, two AVX2
// or four SSE registers elsewhere. Score rows are padded to a multiple of 16.
using v16f = float __attribute__((vector_size(64)));
using v16i = int32_t __attribute__((vector_size(64)));

inline v16f load(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, v16f v) { std::memcpy(p, &v, sizeof v); }
inline v16f splat(float x) { return v16f{} + x; }

// 2^t, with t clamped to [-127, 127]: 2^-127 and below come out as exactly 0, so masked (-inf) scores
// give P = 0 without a branch. Rounds t to n + f with |f| <= 1/2 and evaluates 2^f by its degree-6 Taylor
// series (relative error < 2e-7, float's own rounding).
#if defined(__AVX512F__)
// AVX-512: the same polynomial, rounding by roundscale and the 2^n scaling by scalef, lanes below -127 zeroed by
// one mask (a NaN stays NaN): 4 instructions fewer per 16 scores than the portable form below.
inline v16f exp2v(v16f tv) {
  const __m512 t = (__m512)tv;
  const __mmask16 live = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-127.f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return (v16f)_mm512_maskz_scalef_ps(live, p, n);
}
#else
inline v16f exp2v(v16f t) {
  t = t < -127.f ? splat(-127.f) : t;
  t = t > 127.f ? splat(127.f) : t;
  const v16f magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const v16f y = t + magic;
  const v16i n = (v16i)y - 0x4B400000;
  const v16f f = t - (y - magic);
  v16f p = splat(1.5403530e-4f);
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const v16i e = (n + 127) << 23;
  return p * (v16f)e;
}
#endif

// Horizontal max / sum of 16 lanes. AVX-512: a 4-step tree (a lane-by-lane loop was a chain of 15 dependent
// scalar ops, paid twice per row per span: ~5 ms of a Combiner forward whose rows meet two short spans).
#if defined(__AVX512F__)
inline float hmax(v16f v) { return _mm512_reduce_max_ps((__m512)v); }
inline float hsum(v16f v) { return _mm512_reduce_add_ps((__m512)v); }
#else
inline float hmax(v16f v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v[i]);
  return m;
}
inline float hsum(v16f v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}
#endif

template <typename T>
inline void to_float(const T* src, int64_t n, float* dst) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

// Copy `rows` rows of width w, `stride` apart, converted to float, into a packed rows x w block.
template <typename T>
inline void pack(const T* src, int64_t stride, int64_t rows, int64_t w, float* dst) {
  for (int64_t i = 0; i < rows; ++i) to_float(src + i * stride, w, dst + i * w);
}

struct Geo {
  int64_t B, Nq, Nk, Hq, Hkv, G, D, Dv, bq, bk, nqt, words, span;
  int64_t qs[3], ks[3], vs[3];  // (batch, token, head) strides; the feature stride is 1
  int64_t Lb, Lh, Bm, Hm, nslots;
  float scale;
  const int64_t *row_ptr, *cols, *slots;
  const uint64_t* bits;

  const int64_t* rows_of(int64_t b, int64_t hk) const {
    return row_ptr + ((Lb == 1 ? 0 : b) * Lh + (Lh == 1 ? 0 : hk)) * (nqt + 1);
  }
  const uint64_t* tile_bits(int64_t b, int64_t h, int64_t slot) const {
    return bits + (((Bm == 1 ? 0 : b) * Hm + (Hm == 1 ? 0 : h)) * nslots + slot) * bq * words;
  }
  int64_t spad() const { return (span + 15) / 16 * 16; }
};

Geo make_geo(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& row_ptr,
             const at::Tensor& cols, const at::Tensor& slots, const at::Tensor& bits, int64_t bq, int64_t bk,
             double scale, int64_t span) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "flash_tiles: q, k, v must be (B, N, H, D)");
  TORCH_CHECK(q.device().is_cpu(), "flash_tiles runs on the CPU");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "flash_tiles: dtypes differ");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "flash_tiles: feature dim must be contiguous");
  TORCH_CHECK(bk > 0 && bk % 16 == 0 && bq > 0 && span >= bk, "flash_tiles: bk must be a multiple of 16, span >= bk");
  Geo g{};
  g.B = q.size(0);
  g.Nq = q.size(1);
  g.Hq = q.size(2);
  g.D = q.size(3);
  g.Nk = k.size(1);
  g.Hkv = k.size(2);
  g.Dv = v.size(3);
  TORCH_CHECK(g.Hq % g.Hkv == 0 && v.size(1) == g.Nk && v.size(2) == g.Hkv && k.size(0) == g.B &&
                  v.size(0) == g.B && k.size(3) == g.D,
              "flash_tiles: bad k/v shapes");
  g.G = g.Hq / g.Hkv;
  g.bq = bq;
  g.bk = bk;
  g.nqt = (g.Nq + bq - 1) / bq;
  g.words = (bk + 63) / 64;
  g.span = span / bk * bk;
  g.scale = static_cast<float>(scale);
  for (int i = 0; i < 3; ++i) {
    g.qs[i] = q.stride(i);
    g.ks[i] = k.stride(i);
    g.vs[i] = v.stride(i);
  }
  TORCH_CHECK(row_ptr.dim() == 3 && row_ptr.size(2) == g.nqt + 1 && row_ptr.is_contiguous() &&
                  row_ptr.scalar_type() == at::kLong,
              "flash_tiles: row_ptr must be int64 (Lb, Lh, nqt + 1)");
  g.Lb = row_ptr.size(0);
  g.Lh = row_ptr.size(1);
  TORCH_CHECK((g.Lb == 1 || g.Lb == g.B) && (g.Lh == 1 || g.Lh == g.Hkv), "flash_tiles: row_ptr lead dims");
  TORCH_CHECK(cols.is_contiguous() && slots.is_contiguous() && cols.scalar_type() == at::kLong &&
                  slots.scalar_type() == at::kLong && cols.numel() == slots.numel(),
              "flash_tiles: cols / slots must be int64 of one length");
  TORCH_CHECK(bits.dim() == 5 && bits.is_contiguous() && bits.scalar_type() == at::kLong &&
                  bits.size(3) == bq && bits.size(4) == g.words,
              "flash_tiles: bits must be int64 (Bm, Hm, nslots, bq, ceil(bk / 64))");
  g.Bm = bits.size(0);
  g.Hm = bits.size(1);
  g.nslots = bits.size(2);
  TORCH_CHECK((g.Bm == 1 || g.Bm == g.B) && (g.Hm == 1 || g.Hm == g.Hq), "flash_tiles: bits lead dims");
  g.row_ptr = row_ptr.data_ptr<int64_t>();
  g.cols = cols.data_ptr<int64_t>();
  g.slots = slots.data_ptr<int64_t>();
  g.bits = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  return g;
}

// The next span of entries [e, e_end): consecutive key tiles, at most g.span keys. Returns its end entry.
inline int64_t next_span(const Geo& g, int64_t e, int64_t end, int64_t& k0, int64_t& w) {
  const int64_t c0 = g.cols[e];
  int64_t f = e + 1;
  while (f < end && g.cols[f] == g.cols[f - 1] + 1 && (g.cols[f] - c0 + 1) * g.bk <= g.span) ++f;
  k0 = c0 * g.bk;
  w = std::min(g.Nk, (g.cols[f - 1] + 1) * g.bk) - k0;
  return f;
}

// Scores of masked-out pairs in partial tiles of a span -> -inf; padding columns [w, ld) -> -inf.
inline void apply_masks(const Geo& g, int64_t b, int64_t hk, int64_t rows, int64_t e0, int64_t e1, int64_t k0,
                        int64_t w, float* S, int64_t ld) {
  static const v16i lane = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t slot = g.slots[e];
    if (slot < 0) continue;
    const int64_t c0 = g.cols[e] * g.bk - k0, tw = std::min(g.bk, w - c0);
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const uint64_t* tb = g.tile_bits(b, hk * g.G + gi, slot);
      for (int64_t i = 0; i < rows; ++i) {
        float* s = S + (gi * rows + i) * ld + c0;
        const uint64_t* rb = tb + i * g.words;
        for (int64_t c = 0; c < tw; c += 16) {
          const int32_t chunk = static_cast<int32_t>((rb[c >> 6] >> (c & 63)) & 0xFFFF);
          const v16i off = ((v16i{} + chunk) & lane) == 0;
          store(s + c, off ? splat(kNegInf) : load(s + c));  // the padding past tw is reset below
        }
      }
    }
  }
  if (w % 16 != 0) {
    const int64_t R = g.G * rows;
    for (int64_t r = 0; r < R; ++r) std::fill(S + r * ld + w, S + r * ld + (w + 15) / 16 * 16, kNegInf);
  }
}

// q in the input dtype; k, v float32 (the inputs themselves, or their one-off float32 copies); vbad[(b * Hkv +
// hk) * nkt + kt] != 0 where key tile kt of V holds a non-finite value (null: V is finite).
template <typename T>
struct Ptrs {
  const T* q;
  const float *k, *v;
  const uint8_t* vbad;
  const float* krow(const Geo& g, int64_t b, int64_t n, int64_t h) const { return k + b * g.ks[0] + n * g.ks[1] + h * g.ks[2]; }
  const float* vrow(const Geo& g, int64_t b, int64_t n, int64_t h) const { return v + b * g.vs[0] + n * g.vs[1] + h * g.vs[2]; }
};

// An uninitialised tensor whose pages, when it is large, are asked to be transparent huge pages before
// anything touches them. Buffers this size come from fresh mmap'd memory on every call, and faulting it in
// 4 KiB at a time cost as much as a quarter of a Combiner forward (first touch of 32 MiB on the 2-core VM:
// 9.6 ms with 4 KiB pages, 2.2 ms with 2 MiB ones, 1.0 ms warm). Advice only: where the kernel declines (THP
// off, another OS), the buffer is the same, just slower to fault in.
at::Tensor fresh(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t a = reinterpret_cast<uintptr_t>(t.data_ptr()), n = t.nbytes();
  const uintptr_t lo = (a + kHuge - 1) & ~(kHuge - 1), hi = (a + n) & ~(kHuge - 1);
  if (n >= 4 * kHuge && hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
  return t;
}

// Float32 scratch (packed K^T / V^T, float copies of K / V, dK / dV accumulators) from a small pool kept across
// calls. Freshly mapped memory is slow to touch, and on the VM we measure on, memory freed and left idle for
// ~2 s is handed back to the host: a Combiner forward run after a 2 s pause (or after a 2 s dense SDPA call,
// as the benchmark alternates them) took 360 ms instead of 90 ms with every buffer fresh. A pooled buffer is
// free when the pool holds its only reference; at most kPool buffers are kept (the largest ones a call
// needed), and flash_tiles_release() hands them back.
constexpr size_t kPool = 4;
std::mutex pool_mu;
std::vector<at::Tensor>& pool = *new std::vector<at::Tensor>;  // never destroyed: no tensor freed at exit

at::Tensor scratch(at::IntArrayRef sizes) {
  int64_t n = 1;
  for (int64_t x : sizes) n *= x;
  std::lock_guard<std::mutex> lock(pool_mu);
  // pooled buffers outlive the call: never inference tensors (a later call outside inference mode writes them)
  c10::InferenceMode normal(false);
  at::Tensor* best = nullptr;
  for (at::Tensor& t : pool)  // the smallest free buffer that fits
    if (t.storage().use_count() == 1 && t.numel() >= n && (!best || t.numel() < best->numel())) best = &t;
  if (!best) {
    at::Tensor t = fresh({n}, at::TensorOptions().dtype(at::kFloat));
    if (pool.size() < kPool) {
      pool.push_back(t);
    } else {  // replace the smallest free buffer, if one is free and smaller
      at::Tensor* small = nullptr;
      for (at::Tensor& u : pool)
        if (u.storage().use_count() == 1 && u.numel() < n && (!small || u.numel() < small->numel())) small = &u;
      if (small) *small = t;
    }
    return t.view(sizes);
  }
  return best->narrow(0, 0, n).view(sizes);
}

void flash_tiles_release() {
  std::lock_guard<std::mutex> lock(pool_mu);
  pool.clear();
}

// float32 K or V: the input, or a one-off float32 copy of a half input. With `rows`, the copy (when one is made,
// or when the input's tokens are not adjacent) is heads-first, (B, Hkv, N, D) memory seen through (B, N, Hkv, D)
// strides: the micro-kernels stream a span's rows, and rows H * D floats apart crossed a 4 KiB page every two
// rows (one DTLB entry per row over a 512-key span); adjacent rows cost one O(N D) copy per call.
inline at::Tensor as_float(const at::Tensor& t, bool rows = false) {
  const bool adjacent = t.stride(1) == t.size(3) || t.size(1) == 1;
  if (t.scalar_type() == at::kFloat && (adjacent || !rows)) return t;
  at::Tensor f = rows ? scratch({t.size(0), t.size(2), t.size(1), t.size(3)}).transpose(1, 2)  // (B, N, H, D) view
                      : scratch(t.sizes());
  f.copy_(t);
  return f;
}

// Per (batch, KV head, key tile) flag: does this tile of V (float32) hold a NaN or an infinity? x * 0 is 0 for
// every finite x and NaN otherwise, so one vector sum per tile answers it. Empty tensor when V is finite.
at::Tensor nonfinite_tiles(const Geo& g, const at::Tensor& vf) {
  const int64_t nkt = (g.Nk + g.bk - 1) / g.bk;
  at::Tensor flags = at::zeros({g.B, g.Hkv, nkt}, vf.options().dtype(at::kByte));
  uint8_t* fp = flags.data_ptr<uint8_t>();
  const float* v = vf.data_ptr<float>();
  const int64_t s0 = vf.stride(0), s1 = vf.stride(1), s2 = vf.stride(2);
  std::vector<uint8_t> any(at::get_num_threads() + 1, 0);
  at::parallel_for(0, g.B * g.Hkv * nkt, 1, [&](int64_t lo, int64_t hi) {
    bool seen = false;
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t kt = t % nkt, bh = t / nkt, b = bh / g.Hkv, hk = bh % g.Hkv;
      const int64_t n1 = std::min(g.Nk, (kt + 1) * g.bk);
      v16f zv = splat(0.f);  // 16 independent sums: vectorised without reassociating float adds
      float z = 0.f;
      const int64_t d16 = g.Dv / 16 * 16;
      for (int64_t n = kt * g.bk; n < n1; ++n) {
        const float* r = v + b * s0 + n * s1 + hk * s2;
        for (int64_t d = 0; d < d16; d += 16) zv += load(r + d) * 0.f;
        for (int64_t d = d16; d < g.Dv; ++d) z += r[d] * 0.f;
      }
      z += hsum(zv);
      fp[t] = z != z;
      seen = seen || z != z;
    }
    if (seen) any[at::get_thread_num()] = 1;
  });
  for (uint8_t a : any)
    if (a) return flags;
  return at::Tensor();
}

// Is key c of partial tile `slot` allowed to row i (of query head h)?
inline bool allowed_bit(const Geo& g, int64_t b, int64_t h, int64_t slot, int64_t i, int64_t c) {
  if (slot < 0) return true;
  return (g.tile_bits(b, h, slot)[i * g.words + (c >> 6)] >> (c & 63)) & 1;
}

// After P @ finite(V) over the entries [e0, e1) of a span: add P[r, j] * V[j, d] for the non-finite V[j, d]
// of the allowed pairs only (IEEE's own products: inf for P > 0, NaN for P = 0 or a NaN value).
template <typename T>
void add_nonfinite_v(const Geo& g, const Ptrs<T>& p, int64_t b, int64_t hk, int64_t rows, int64_t e0, int64_t e1,
                     int64_t k0, int64_t w, const float* P, int64_t ld, float* acc, int64_t acc_ld) {
  const int64_t nkt = (g.Nk + g.bk - 1) / g.bk;
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t kt = g.cols[e], slot = g.slots[e];
    if (!p.vbad[(b * g.Hkv + hk) * nkt + kt]) continue;
    const int64_t c0 = kt * g.bk - k0, tw = std::min(g.bk, w - c0);
    for (int64_t c = 0; c < tw; ++c) {
      const float* vr = p.vrow(g, b, k0 + c0 + c, hk);
      for (int64_t d = 0; d < g.Dv; ++d) {
        if (std::isfinite(vr[d])) continue;
        for (int64_t gi = 0; gi < g.G; ++gi)
          for (int64_t i = 0; i < rows; ++i)
            if (allowed_bit(g, b, hk * g.G + gi, slot, i, c)) {
              const int64_t r = gi * rows + i;
              acc[r * acc_ld + d] += P[r * ld + c0 + c] * vr[d];
            }
      }
    }
  }
}

// V rows [k0, k0 + w) with non-finite entries replaced by 0, packed (w, Dv), when the span touches a flagged
// tile; else null (the GEMM reads V in place).
template <typename T>
const float* finite_v_span(const Geo& g, const Ptrs<T>& p, int64_t b, int64_t hk, int64_t e0, int64_t e1,
                           int64_t k0, int64_t w, float* Vp) {
  if (!p.vbad) return nullptr;
  const int64_t nkt = (g.Nk + g.bk - 1) / g.bk;
  bool bad = false;
  for (int64_t e = e0; e < e1 && !bad; ++e) bad = p.vbad[(b * g.Hkv + hk) * nkt + g.cols[e]];
  if (!bad) return nullptr;
  for (int64_t j = 0; j < w; ++j) {
    const float* vr = p.vrow(g, b, k0 + j, hk);
    for (int64_t d = 0; d < g.Dv; ++d) Vp[j * g.Dv + d] = std::isfinite(vr[d]) ? vr[d] : 0.f;
  }
  return Vp;
}

// Packed Q (or dO) of one query tile of the G heads of KV head hk: rows ordered (head, token).
template <typename T>
void pack_group(const Geo& g, const T* base, const int64_t* st, int64_t b, int64_t hk, int64_t q0, int64_t rows,
                int64_t width, float* dst) {
  for (int64_t gi = 0; gi < g.G; ++gi)
    pack(base + b * st[0] + q0 * st[1] + (hk * g.G + gi) * st[2], st[1], rows, width, dst + gi * rows * width);
}

// Prefetch `rows` rows (width elements each) of the G heads of KV head hk from token q0: for reading, or for
// writing (the lines are owned before the stores arrive).
template <typename T>
void prefetch_group(const Geo& g, const T* base, const int64_t* st, int64_t b, int64_t hk, int64_t q0, int64_t rows,
                    int64_t width, bool write) {
  const int64_t bytes = width * static_cast<int64_t>(sizeof(T));
  for (int64_t gi = 0; gi < g.G; ++gi)
    for (int64_t i = 0; i < rows; ++i) {
      const char* r = reinterpret_cast<const char*>(base + b * st[0] + (q0 + i) * st[1] + (hk * g.G + gi) * st[2]);
      for (int64_t c = 0; c < bytes; c += 64) {
        if (write)
          __builtin_prefetch(r + c, 1, 3);
        else
          __builtin_prefetch(r + c, 0, 3);
      }
    }
}

// Register-blocked AVX-512 micro-kernels for the forward's two GEMMs (64-key tiles, 64-row query tiles): the
// BLAS call re-packed K or V for every query tile (K / V tiles are shared by the query tiles of a window) and
// spent a large share of each small GEMM outside its inner loop. K is packed ONCE per call instead, scaled and
// transposed per key tile (D x 64 floats); V is read in place. Without AVX-512 the BLAS path runs.
#if defined(__AVX512F__)
constexpr bool kMicro = true;

// S[i, 0..64) = sum_d Q[i, d] Kt[d, 0..64) for RB rows of Q (row stride D) and one packed key tile.
template <int RB>
inline void qk_block(const float* Q, int64_t D, const float* Kt, float* S, int64_t ld) {
  __m512 c[RB][4];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < 4; ++j) c[r][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 k0 = _mm512_loadu_ps(Kt + d * 64), k1 = _mm512_loadu_ps(Kt + d * 64 + 16);
    const __m512 k2 = _mm512_loadu_ps(Kt + d * 64 + 32), k3 = _mm512_loadu_ps(Kt + d * 64 + 48);
    for (int r = 0; r < RB; ++r) {
      const __m512 a = _mm512_set1_ps(Q[r * D + d]);
      c[r][0] = _mm512_fmadd_ps(a, k0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(a, k1, c[r][1]);
      c[r][2] = _mm512_fmadd_ps(a, k2, c[r][2]);
      c[r][3] = _mm512_fmadd_ps(a, k3, c[r][3]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(S + r * ld + 16 * j, c[r][j]);
}

// S (R x 64, row stride ld) = Q (R x D) Kt (D x 64).
inline void qk_tile(const float* Q, int64_t R, int64_t D, const float* Kt, float* S, int64_t ld) {
  int64_t i = 0;
  for (; i + 6 <= R; i += 6) qk_block<6>(Q + i * D, D, Kt, S + i * ld, ld);
  switch (R - i) {
    case 5: qk_block<5>(Q + i * D, D, Kt, S + i * ld, ld); break;
    case 4: qk_block<4>(Q + i * D, D, Kt, S + i * ld, ld); break;
    case 3: qk_block<3>(Q + i * D, D, Kt, S + i * ld, ld); break;
    case 2: qk_block<2>(Q + i * D, D, Kt, S + i * ld, ld); break;
    case 1: qk_block<1>(Q + i * D, D, Kt, S + i * ld, ld); break;
    default: break;
  }
}

// acc[i * ald + d0 + 16 j] += sum_k A[i * ars + k * acs] B[k * bld + d0 + 16 j] for RB rows of A, w reduction
// steps, NV 16-float columns. A's two strides let one kernel serve P V and dS K (A row-major) as well as
// P^T dO and dS^T Q (A read transposed: ars = 1, acs = ld): its elements are broadcast one at a time anyway.
template <int RB, int NV>
inline void mac_block(const float* A, int64_t ars, int64_t acs, int64_t w, const float* B, int64_t bld, float* acc,
                      int64_t ald) {
  __m512 c[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) c[r][j] = _mm512_loadu_ps(acc + r * ald + 16 * j);
  for (int64_t k = 0; k < w; ++k) {
    __m512 v[NV];
    for (int j = 0; j < NV; ++j) v[j] = _mm512_loadu_ps(B + k * bld + 16 * j);
    const float* a = A + k * acs;
    for (int r = 0; r < RB; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * ars]);
      for (int j = 0; j < NV; ++j) c[r][j] = _mm512_fmadd_ps(x, v[j], c[r][j]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(acc + r * ald + 16 * j, c[r][j]);
}

template <int NV>
inline void mac_rows(const float* A, int64_t R, int64_t ars, int64_t acs, int64_t w, const float* B, int64_t bld,
                     float* acc, int64_t ald) {
  int64_t i = 0;
  for (; i + 6 <= R; i += 6) mac_block<6, NV>(A + i * ars, ars, acs, w, B, bld, acc + i * ald, ald);
  const float* a = A + i * ars;
  float* c = acc + i * ald;
  switch (R - i) {
    case 5: mac_block<5, NV>(a, ars, acs, w, B, bld, c, ald); break;
    case 4: mac_block<4, NV>(a, ars, acs, w, B, bld, c, ald); break;
    case 3: mac_block<3, NV>(a, ars, acs, w, B, bld, c, ald); break;
    case 2: mac_block<2, NV>(a, ars, acs, w, B, bld, c, ald); break;
    case 1: mac_block<1, NV>(a, ars, acs, w, B, bld, c, ald); break;
    default: break;
  }
}

// acc (R x W, row stride ald) += A (R x w, strides ars / acs) B (w x W, row stride bld); W a multiple of 16.
// (Chunking the keys so a V chunk stays in L1 measured no faster.)
inline void mac(const float* A, int64_t R, int64_t ars, int64_t acs, int64_t w, const float* B, int64_t bld,
                float* acc, int64_t ald, int64_t W) {
  for (int64_t d0 = 0; d0 < W; d0 += 64) {
    switch (std::min<int64_t>(4, (W - d0) / 16)) {
      case 4: mac_rows<4>(A, R, ars, acs, w, B + d0, bld, acc + d0, ald); break;
      case 3: mac_rows<3>(A, R, ars, acs, w, B + d0, bld, acc + d0, ald); break;
      case 2: mac_rows<2>(A, R, ars, acs, w, B + d0, bld, acc + d0, ald); break;
      default: mac_rows<1>(A, R, ars, acs, w, B + d0, bld, acc + d0, ald); break;
    }
  }
}

// acc (R x Dv) += P (R x w, row stride ld) V (w x Dv, row stride vld); Dv a multiple of 16.
inline void pv_span(const float* P, int64_t R, int64_t ld, int64_t w, const float* V, int64_t vld, float* acc,
                    int64_t Dv) {
  mac(P, R, ld, 1, w, V, vld, acc, Dv, Dv);
}
#else
constexpr bool kMicro = false;
inline void qk_tile(const float*, int64_t, int64_t, const float*, float*, int64_t) {}
inline void mac(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t, int64_t) {}
inline void pv_span(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t) {}
#endif

// K (or V: width D, strides ks) of the key tiles of one call, scaled by alpha and transposed per 64-key tile:
// tile kt of (b, hk) at dst + ((b * Hkv + hk) * nkt + kt) * D * 64, zero columns past the last key.
// Rows [0, n1) of K from k (strides g.ks), rows [n1, g.Nk) from a second float32 source k2 (strides s2), if any.
struct KRows {
  const float* k;
  const float* k2 = nullptr;
  int64_t s2[3] = {0, 0, 0};
  int64_t n1 = std::numeric_limits<int64_t>::max();
};

void pack_kt(Geo g, KRows src, float alpha, float* dst, int64_t width = 0, const int64_t* strides = nullptr) {
  if (width > 0) {  // V^T for the backward's dP = dO V^T
    g.D = width;
    for (int i = 0; i < 3; ++i) g.ks[i] = strides[i];
  }
  const int64_t nkt = (g.Nk + 63) / 64;
  // (base of row n for (b, hk), token stride)
  auto row = [&](int64_t b, int64_t n, int64_t hk, int64_t& st) -> const float* {
    if (n < src.n1) {
      st = g.ks[1];
      return src.k + b * g.ks[0] + n * g.ks[1] + hk * g.ks[2];
    }
    st = src.s2[1];
    return src.k2 + b * src.s2[0] + (n - src.n1) * src.s2[1] + hk * src.s2[2];
  };
  at::parallel_for(0, g.B * g.Hkv * nkt, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t kt = t % nkt, bh = t / nkt, b = bh / g.Hkv, hk = bh % g.Hkv;
      const int64_t tw = std::min<int64_t>(64, g.Nk - kt * 64);
      float* o = dst + t * g.D * 64;
      int64_t j0 = 0, st;
#if defined(__AVX512F__)
      const __m512 va = _mm512_set1_ps(alpha);
      // 16 rows at a time from one source: gather one feature of 16 keys, store it
      for (; j0 + 16 <= tw; j0 += 16) {
        const int64_t n = kt * 64 + j0;
        const float* r0 = row(b, n, hk, st);
        if ((n < src.n1) != (n + 15 < src.n1) || st * 16 >= (int64_t{1} << 31)) break;
        const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(static_cast<int32_t>(st)));
        for (int64_t d = 0; d < g.D; ++d)
          _mm512_storeu_ps(o + d * 64 + j0, _mm512_mul_ps(va, _mm512_i32gather_ps(idx, r0 + d, 4)));
      }
#endif
      for (int64_t j = j0; j < 64; ++j) {
        if (j >= tw) {
          for (int64_t d = 0; d < g.D; ++d) o[d * 64 + j] = 0.f;
          continue;
        }
        const float* r = row(b, kt * 64 + j, hk, st);
        for (int64_t d = 0; d < g.D; ++d) o[d * 64 + j] = r[d] * alpha;
      }
    }
  });
}

template <typename T>
void forward_tile(const Geo& g, const Ptrs<T>& p, int64_t b, int64_t hk, int64_t qt, T* out, const int64_t* os,
                  float* lse, const int64_t* ls, std::vector<float>& buf, const float* kt_packed = nullptr) {
  const int64_t D = g.D, Dv = g.Dv, q0 = qt * g.bq, rows = std::min(g.bq, g.Nq - q0), R = g.G * rows;
  const int64_t ld = g.spad();
  float *Qp = buf.data(), *Vp = Qp + g.G * g.bq * D, *S = Vp + g.span * Dv;
  float *acc = S + g.G * g.bq * ld, *m = acc + g.G * g.bq * Dv, *l = m + g.G * g.bq, *bad = l + g.G * g.bq;
  std::fill(acc, acc + R * Dv, 0.f);
  std::fill(m, m + R, kNegInf);
  std::fill(l, l + R, 0.f);
  std::fill(bad, bad + R, 0.f);
  const int64_t* rp = g.rows_of(b, hk);
  const int64_t e_end = rp[qt + 1];
  if (rp[qt] < e_end) pack_group(g, p.q, g.qs, b, hk, q0, rows, D, Qp);
  // The next query tile's Q rows and this tile's output rows are cold (read / written once per call, H * D
  // elements apart, so each row sits on its own page and the hardware prefetchers do not follow): ask for
  // them now, and the GEMMs below hide the misses. (Q loads and output stores were ~40% of this function's
  // own time in a Combiner forward, where a query tile meets only four key tiles.)
  if (qt + 1 < g.nqt) prefetch_group(g, p.q, g.qs, b, hk, q0 + g.bq, std::min(g.bq, g.Nq - q0 - g.bq), D, false);
  prefetch_group(g, out, os, b, hk, q0, rows, Dv, true);
  const float alpha = g.scale * kLog2e;
  for (int64_t e = rp[qt]; e < e_end;) {
    int64_t k0, w;
    const int64_t f = next_span(g, e, e_end, k0, w);
    if (kt_packed) {
      const int64_t nkt = (g.Nk + 63) / 64;
      for (int64_t x = e; x < f; ++x)
        qk_tile(Qp, R, D, kt_packed + ((b * g.Hkv + hk) * nkt + g.cols[x]) * D * 64, S + g.cols[x] * 64 - k0, ld);
    } else {
      gemm(false, true, R, w, D, alpha, Qp, D, p.krow(g, b, k0, hk), g.ks[1], 0.f, S, ld);
    }
    apply_masks(g, b, hk, rows, e, f, k0, w, S, ld);
    const int64_t wp = (w + 15) / 16 * 16;
    for (int64_t r = 0; r < R; ++r) {
      float* s = S + r * ld;
      v16f vm = splat(kNegInf);
      v16i vn = v16i{};
      for (int64_t c = 0; c < wp; c += 16) {
        const v16f x = load(s + c);
        vm = x > vm ? x : vm;
        vn |= x != x;  // a NaN score (NaN or inf in q or k on an allowed pair)
      }
      float mx = std::max(m[r], hmax(vm));
      bool nan_row = bad[r] != 0.f || mx == std::numeric_limits<float>::infinity();
      for (int i = 0; i < 16 && !nan_row; ++i) nan_row = vn[i] != 0;
      if (nan_row || mx == kNegInf) {  // NaN row: its output is NaN; no key allowed yet: P = 0
        if (nan_row) bad[r] = 1.f;
        std::fill(s, s + wp, 0.f);
        continue;
      }
      v16f vs = splat(0.f);
      const v16f vmx = splat(mx);
      for (int64_t c = 0; c < wp; c += 16) {
        const v16f pe = exp2v(load(s + c) - vmx);
        store(s + c, pe);
        vs += pe;
      }
      const float corr = m[r] == kNegInf ? 0.f : std::exp2(m[r] - mx);
      l[r] = l[r] * corr + hsum(vs);
      if (corr != 1.f) {
        float* a = acc + r * Dv;
        for (int64_t d = 0; d < Dv; ++d) a[d] *= corr;
      }
      m[r] = mx;
    }
    const float* vfin = finite_v_span(g, p, b, hk, e, f, k0, w, Vp);
    if (vfin) {
      gemm(false, false, R, Dv, w, 1.f, S, ld, vfin, Dv, 1.f, acc, Dv);
      add_nonfinite_v(g, p, b, hk, rows, e, f, k0, w, S, ld, acc, Dv);
    } else if (kt_packed) {
      pv_span(S, R, ld, w, p.vrow(g, b, k0, hk), g.vs[1], acc, Dv);
    } else {
      gemm(false, false, R, Dv, w, 1.f, S, ld, p.vrow(g, b, k0, hk), g.vs[1], 1.f, acc, Dv);
    }
    e = f;
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t gi = 0; gi < g.G; ++gi) {
    const int64_t h = hk * g.G + gi;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = gi * rows + i;
      T* o = out + b * os[0] + (q0 + i) * os[1] + h * os[2];
      float* lrow = lse + b * ls[0] + (q0 + i) * ls[1] + h * ls[2];
      if (bad[r] != 0.f) {
        for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<T>(nan);
        *lrow = nan;
      } else if (l[r] > 0.f) {
        const float inv = 1.f / l[r];
        for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<T>(acc[r * Dv + d] * inv);
        *lrow = (m[r] + std::log2(l[r])) * kLn2;
      } else {
        for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<T>(0.f);
        *lrow = kNegInf;
      }
    }
  }
}

// K / V as float32 with their strides in g, and V's non-finite tile flags.
// [x, x2] along the tokens, float32, heads-first memory (pooled scratch) seen through (B, N + N2, H, E) strides.
at::Tensor cat_heads_first(const at::Tensor& x, const at::Tensor& x2) {
  const int64_t n = x.size(1), n2 = x2.size(1);
  at::Tensor f = scratch({x.size(0), x.size(2), n + n2, x.size(3)});  // (B, H, N + N2, E)
  f.narrow(2, 0, n).copy_(x.transpose(1, 2));
  f.narrow(2, n, n2).copy_(x2.transpose(1, 2));
  return f.transpose(1, 2);  // (B, N + N2, H, E)
}

// Optional second key / value source appended after the first: (B, N2, Hkv, D | Dv), the dtype of k / v.
// Defined or not together; checked against k / v and counted into g.Nk.
bool second_source(Geo& g, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& k2,
                   const std::optional<at::Tensor>& v2) {
  const bool has = k2.has_value() && k2->defined();
  TORCH_CHECK(has == (v2.has_value() && v2->defined()), "flash_tiles: k2 and v2 come together");
  if (!has) return false;
  TORCH_CHECK(k2->dim() == 4 && v2->dim() == 4 && k2->scalar_type() == k.scalar_type() &&
                  v2->scalar_type() == v.scalar_type() && k2->size(0) == g.B && v2->size(0) == g.B &&
                  k2->size(1) == v2->size(1) && k2->size(2) == g.Hkv && v2->size(2) == g.Hkv &&
                  k2->size(3) == g.D && v2->size(3) == g.Dv && k2->device().is_cpu() && v2->device().is_cpu(),
              "flash_tiles: k2 / v2 must be (B, N2, Hkv, D | Dv) CPU tensors of k / v's dtype");
  g.Nk += k2->size(1);
  return true;
}

struct FloatKV {
  at::Tensor k, v, vbad, k2;  // k2: the second K source (float32) when K is read from two sources
  // With a second source, V is the heads-first concatenation [v0, v2] (one copy, into pooled memory: the work a
  // caller's torch.cat would do, without its fresh buffers). K is concatenated the same way when its rows are
  // read in place (k_cat); otherwise (the forward's micro-kernels only read K while packing K^T) both sources
  // are packed directly, one pass over K fewer.
  FloatKV(Geo& g, const at::Tensor& k0, const at::Tensor& v0, bool k_rows, bool v_rows,
          const at::Tensor* k2_ = nullptr, const at::Tensor* v2 = nullptr, bool k_cat = true)
      : k(k2_ && k_cat ? cat_heads_first(k0, *k2_) : as_float(k0, k_rows)),
        v(v2 ? cat_heads_first(v0, *v2) : as_float(v0, v_rows)) {
    if (k2_ && !k_cat) k2 = as_float(*k2_);
    for (int i = 0; i < 3; ++i) {
      g.ks[i] = k.stride(i);
      g.vs[i] = v.stride(i);
    }
    vbad = nonfinite_tiles(g, v);
  }
  // K's rows for pack_kt
  KRows rows() const {
    KRows r{k.data_ptr<float>()};
    if (k2.defined()) {
      r.k2 = k2.data_ptr<float>();
      for (int i = 0; i < 3; ++i) r.s2[i] = k2.stride(i);
      r.n1 = k.size(1);
    }
    return r;
  }
  template <typename T>
  Ptrs<T> ptrs(const T* q) const {
    return {q, k.data_ptr<float>(), v.data_ptr<float>(), vbad.defined() ? vbad.data_ptr<uint8_t>() : nullptr};
  }
};

// q (B, Nq, Hq, D), k (B, Nk, Hkv, D), v (B, Nk, Hkv, Dv): float32 / bfloat16 / float16, feature-contiguous.
// Returns out (B, Nq, Hq, Dv) in the input dtype and lse (B, Nq, Hq) float32 (-inf on rows with no key).
std::tuple<at::Tensor, at::Tensor> flash_tiles_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& row_ptr, const at::Tensor& cols,
                                                   const at::Tensor& slots, const at::Tensor& bits, int64_t bq,
                                                   int64_t bk, double scale, int64_t span,
                                                   const std::optional<at::Tensor>& k2,
                                                   const std::optional<at::Tensor>& v2) {
  Geo g = make_geo(q, k, v, row_ptr, cols, slots, bits, bq, bk, scale, span);
  const bool two = second_source(g, k, v, k2, v2);
  // the micro-kernels: 64-key tiles, Dv a multiple of 16 (one K^T copy per call: O(N D), like K itself)
  const bool micro = kMicro && g.bk == 64 && g.Dv % 16 == 0;
  const FloatKV kv(g, k, v, false, micro, two ? &*k2 : nullptr, two ? &*v2 : nullptr, !micro);
  at::Tensor out = fresh({g.B, g.Nq, g.Hq, g.Dv}, q.options());
  at::Tensor lse = at::empty({g.B, g.Nq, g.Hq}, q.options().dtype(at::kFloat));
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  const int64_t ls[3] = {lse.stride(0), lse.stride(1), lse.stride(2)};
  const int64_t tasks = g.B * g.Hkv * g.nqt;
  const int64_t need = g.G * g.bq * (g.D + g.spad() + g.Dv + 3) + g.span * g.Dv;
  at::Tensor ktp;
  if (micro) {
    ktp = scratch({g.B * g.Hkv * ((g.Nk + 63) / 64) * g.D * 64});
    pack_kt(g, kv.rows(), g.scale * kLog2e, ktp.data_ptr<float>());
  }
  const float* ktpp = ktp.defined() ? ktp.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_tiles_fwd", [&] {
    using T = scalar_t;
    const Ptrs<T> p = kv.ptrs<T>(q.data_ptr<T>());
    T* op = out.data_ptr<T>();
    float* lp = lse.data_ptr<float>();
    at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> buf(need);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t qt = t % g.nqt, bh = t / g.nqt;
        forward_tile<T>(g, p, bh / g.Hkv, bh % g.Hkv, qt, op, os, lp, ls, buf, ktpp);
      }
    });
  });
  return {out, lse};
}

// dP[r, j] = dO[r] . V[j] recomputed in IEEE arithmetic for the keys of flagged tiles whose V row holds a non-finite
// value (the GEMM used its finite part), on allowed pairs only.
template <typename T>
void exact_nonfinite_dp(const Geo& g, const Ptrs<T>& p, int64_t b, int64_t hk, int64_t rows, int64_t e0, int64_t e1,
                        int64_t k0, int64_t w, const float* dOp, float* dP, int64_t ld) {
  const int64_t nkt = (g.Nk + g.bk - 1) / g.bk;
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t kt = g.cols[e], slot = g.slots[e];
    if (!p.vbad[(b * g.Hkv + hk) * nkt + kt]) continue;
    const int64_t c0 = kt * g.bk - k0, tw = std::min(g.bk, w - c0);
    for (int64_t c = 0; c < tw; ++c) {
      const float* vr = p.vrow(g, b, k0 + c0 + c, hk);
      bool finite = true;
      for (int64_t d = 0; d < g.Dv && finite; ++d) finite = std::isfinite(vr[d]);
      if (finite) continue;
      for (int64_t gi = 0; gi < g.G; ++gi)
        for (int64_t i = 0; i < rows; ++i) {
          if (!allowed_bit(g, b, hk * g.G + gi, slot, i, c)) continue;
          const int64_t r = gi * rows + i;
          float acc = 0.f;
          for (int64_t d = 0; d < g.Dv; ++d) acc += dOp[r * g.Dv + d] * vr[d];
          dP[r * ld + c0 + c] = acc;
        }
    }
  }
}

template <typename T>
void backward_tile(const Geo& g, const Ptrs<T>& p, int64_t b, int64_t hk, int64_t qt, const T* out,
                   const int64_t* os, const T* dout, const int64_t* dos, const float* lse, const int64_t* ls,
                   const float* dlse, T* dq, const int64_t* dqs, float* dk, float* dv, int64_t dk_ld,
                   int64_t dv_ld, std::vector<float>& buf, const float* ktp = nullptr, const float* vtp = nullptr) {
  const int64_t D = g.D, Dv = g.Dv, q0 = qt * g.bq, rows = std::min(g.bq, g.Nq - q0), R = g.G * rows;
  const int64_t ld = g.spad(), cap = g.G * g.bq;
  float *Qp = buf.data(), *dOp = Qp + cap * D, *Vp = dOp + cap * Dv;
  float *P = Vp + g.span * Dv, *dP = P + cap * ld, *dQa = dP + cap * ld, *lse2 = dQa + cap * D;
  float *delta = lse2 + cap, *orow = delta + cap;
  const int64_t* rp = g.rows_of(b, hk);
  const int64_t e_end = rp[qt + 1];
  for (int64_t gi = 0; gi < g.G; ++gi) {
    const int64_t h = hk * g.G + gi;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = gi * rows + i;
      T* dqr = dq + b * dqs[0] + (q0 + i) * dqs[1] + h * dqs[2];
      if (rp[qt] == e_end) {  // a query tile with no key: zero gradient
        for (int64_t d = 0; d < D; ++d) dqr[d] = static_cast<T>(0.f);
        continue;
      }
      const float lv = lse[b * ls[0] + (q0 + i) * ls[1] + h * ls[2]];
      lse2[r] = lv == kNegInf ? std::numeric_limits<float>::infinity() : lv * kLog2e;  // empty row: P = 0
      to_float(out + b * os[0] + (q0 + i) * os[1] + h * os[2], Dv, orow);
      to_float(dout + b * dos[0] + (q0 + i) * dos[1] + h * dos[2], Dv, dOp + r * Dv);
      float dl = 0.f;
      for (int64_t d = 0; d < Dv; ++d) dl += orow[d] * dOp[r * Dv + d];
      delta[r] = dl - (dlse ? dlse[b * ls[0] + (q0 + i) * ls[1] + h * ls[2]] : 0.f);
    }
  }
  if (rp[qt] == e_end) return;
  pack_group(g, p.q, g.qs, b, hk, q0, rows, D, Qp);
  std::fill(dQa, dQa + R * D, 0.f);
  const float alpha = g.scale * kLog2e;
  for (int64_t e = rp[qt]; e < e_end;) {
    int64_t k0, w;
    const int64_t f = next_span(g, e, e_end, k0, w);
    const float* kp = p.krow(g, b, k0, hk);
    const int64_t nkt = (g.Nk + 63) / 64;
    if (ktp) {
      for (int64_t x = e; x < f; ++x)
        qk_tile(Qp, R, D, ktp + ((b * g.Hkv + hk) * nkt + g.cols[x]) * D * 64, P + g.cols[x] * 64 - k0, ld);
    } else {
      gemm(false, true, R, w, D, alpha, Qp, D, kp, g.ks[1], 0.f, P, ld);
    }
    apply_masks(g, b, hk, rows, e, f, k0, w, P, ld);
    const float* vfin = finite_v_span(g, p, b, hk, e, f, k0, w, Vp);
    if (vtp && !vfin) {
      for (int64_t x = e; x < f; ++x)
        qk_tile(dOp, R, Dv, vtp + ((b * g.Hkv + hk) * nkt + g.cols[x]) * Dv * 64, dP + g.cols[x] * 64 - k0, ld);
    } else {
      gemm(false, true, R, w, Dv, 1.f, dOp, Dv, vfin ? vfin : p.vrow(g, b, k0, hk), vfin ? Dv : g.vs[1], 0.f, dP,
           ld);
    }
    if (vfin) exact_nonfinite_dp(g, p, b, hk, rows, e, f, k0, w, dOp, dP, ld);
    const int64_t wp = (w + 15) / 16 * 16;
    const v16f zero = splat(0.f), vnan = splat(std::numeric_limits<float>::quiet_NaN()), ninf = splat(kNegInf);
    for (int64_t r = 0; r < R; ++r) {
      float *s = P + r * ld, *dp = dP + r * ld;
      const v16f sub = splat(lse2[r]), dl = splat(delta[r]);
      if (lse2[r] != lse2[r]) {  // a NaN row (see the forward): NaN on its allowed pairs, 0 elsewhere
        for (int64_t c = 0; c < wp; c += 16) {
          const v16f pe = load(s + c) == ninf ? zero : vnan;
          store(s + c, pe);
          store(dp + c, pe);
        }
        continue;
      }
      for (int64_t c = 0; c < wp; c += 16) {
        const v16f pe = exp2v(load(s + c) - sub);
        store(s + c, pe);
        // dS = P (dP - delta) scale, and exactly 0 where P is: a non-finite dP or delta never leaks to masked pairs
        store(dp + c, pe == 0.f ? zero : pe * (load(dp + c) - dl) * g.scale);
      }
    }
    if (vtp)  // dV += P^T dO: P read transposed (the micro-kernel; MKL's small NT GEMM ran at ~half speed)
      mac(P, w, 1, ld, R, dOp, Dv, dv + k0 * dv_ld, dv_ld, Dv);
    else
      gemm(true, false, w, Dv, R, 1.f, P, ld, dOp, Dv, 1.f, dv + k0 * dv_ld, dv_ld);
    if (ktp && D % 16 == 0) {
      mac(dP, R, ld, 1, w, kp, g.ks[1], dQa, D, D);                   // dQ += dS K
      mac(dP, w, 1, ld, R, Qp, D, dk + k0 * dk_ld, dk_ld, D);         // dK += dS^T Q
    } else {
      gemm(false, false, R, D, w, 1.f, dP, ld, kp, g.ks[1], 1.f, dQa, D);
      gemm(true, false, w, D, R, 1.f, dP, ld, Qp, D, 1.f, dk + k0 * dk_ld, dk_ld);
    }
    e = f;
  }
  for (int64_t gi = 0; gi < g.G; ++gi) {
    const int64_t h = hk * g.G + gi;
    for (int64_t i = 0; i < rows; ++i) {
      T* dqr = dq + b * dqs[0] + (q0 + i) * dqs[1] + h * dqs[2];
      const float* a = dQa + (gi * rows + i) * D;
      for (int64_t d = 0; d < D; ++d) dqr[d] = static_cast<T>(a[d]);
    }
  }
}

// Gradients of flash_tiles_fwd. out, dout (B, Nq, Hq, Dv) in the input dtype, lse (B, Nq, Hq) float32 from the
// forward, dlse the same shape or empty. `splits` query ranges per (batch, KV head) run as separate tasks
// with their own dK/dV accumulators (more parallelism when B * Hkv is below the thread count).
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_tiles_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& dout,
    const at::Tensor& lse, const at::Tensor& dlse, const at::Tensor& row_ptr, const at::Tensor& cols,
    const at::Tensor& slots, const at::Tensor& bits, int64_t bq, int64_t bk, double scale, int64_t span,
    int64_t splits, const std::optional<at::Tensor>& k2, const std::optional<at::Tensor>& v2) {
  Geo g = make_geo(q, k, v, row_ptr, cols, slots, bits, bq, bk, scale, span);
  const bool two = second_source(g, k, v, k2, v2);
  const bool micro = kMicro && g.bk == 64 && g.Dv % 16 == 0;
  const FloatKV kv(g, k, v, micro && g.D % 16 == 0, false, two ? &*k2 : nullptr, two ? &*v2 : nullptr);
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type() &&
                  out.stride(3) == 1 && dout.stride(3) == 1,
              "flash_tiles_bwd: out / dout must match q's dtype, feature-contiguous");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3, "flash_tiles_bwd: lse must be float32 (B, Nq, Hq)");
  const bool has_dlse = dlse.numel() > 0;
  TORCH_CHECK(!has_dlse || (dlse.scalar_type() == at::kFloat && dlse.sizes() == lse.sizes() &&
                            dlse.strides() == lse.strides()),
              "flash_tiles_bwd: dlse must be float32 laid out like lse");
  const int64_t S = std::max<int64_t>(1, std::min(splits, g.nqt));
  at::Tensor dq = fresh({g.B, g.Nq, g.Hq, g.D}, q.options());
  // float32 accumulators (S, B, Hkv, Nk, D|Dv), heads-first: accumulating into the (B, Nk, Hkv, D) outputs
  // directly put a span's dK / dV rows H * D floats apart, and the row loads missed the DTLB (the backward
  // measured 12% slower at N = 8192, H = 8)
  at::Tensor dk = scratch({S, g.B, g.Hkv, g.Nk, g.D}).zero_();
  at::Tensor dv = scratch({S, g.B, g.Hkv, g.Nk, g.Dv}).zero_();
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  const int64_t dos[3] = {dout.stride(0), dout.stride(1), dout.stride(2)};
  const int64_t ls[3] = {lse.stride(0), lse.stride(1), lse.stride(2)};
  const int64_t dqs[3] = {dq.stride(0), dq.stride(1), dq.stride(2)};
  const int64_t cap = g.G * g.bq;
  const int64_t need = cap * (g.D + g.Dv + 2 * g.spad() + g.D + 2) + g.span * g.Dv + g.Dv;
  float *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  // the forward's micro-kernels for P = Q K^T, dP = dO V^T and dQ += dS K (K^T and V^T packed once per call)
  at::Tensor ktp, vtp;
  if (micro) {
    const int64_t nkt = (g.Nk + 63) / 64;
    ktp = scratch({g.B * g.Hkv * nkt * g.D * 64});
    vtp = scratch({g.B * g.Hkv * nkt * g.Dv * 64});
    pack_kt(g, kv.rows(), g.scale * kLog2e, ktp.data_ptr<float>());
    pack_kt(g, KRows{kv.v.data_ptr<float>()}, 1.f, vtp.data_ptr<float>(), g.Dv, g.vs);
  }
  const float* ktpp = ktp.defined() ? ktp.data_ptr<float>() : nullptr;
  const float* vtpp = vtp.defined() ? vtp.data_ptr<float>() : nullptr;
  const float* lp = lse.data_ptr<float>();
  const float* dlp = has_dlse ? dlse.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_tiles_bwd", [&] {
    using T = scalar_t;
    const Ptrs<T> p = kv.ptrs<T>(q.data_ptr<T>());
    const T *outp = out.data_ptr<T>(), *dop = dout.data_ptr<T>();
    T* dqp = dq.data_ptr<T>();
    at::parallel_for(0, g.B * g.Hkv * S, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> buf(need);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t s = t % S, bh = t / S, b = bh / g.Hkv, hk = bh % g.Hkv;
        float* dkt = dkp + ((s * g.B + b) * g.Hkv + hk) * g.Nk * g.D;
        float* dvt = dvp + ((s * g.B + b) * g.Hkv + hk) * g.Nk * g.Dv;
        const int64_t qa = g.nqt * s / S, qb = g.nqt * (s + 1) / S;
        for (int64_t qt = qa; qt < qb; ++qt)
          backward_tile<T>(g, p, b, hk, qt, outp, os, dop, dos, lp, ls, dlp, dqp, dqs, dkt, dvt, g.D, g.Dv, buf,
                           ktpp, vtpp);
      }
    });
  });
  // sum the splits in order (deterministic) into heads-last outputs of the input dtype
  at::Tensor gk = fresh({g.B, g.Nk, g.Hkv, g.D}, q.options()), gv = fresh({g.B, g.Nk, g.Hkv, g.Dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "flash_tiles_bwd_reduce", [&] {
    using T = scalar_t;
    T *gkp = gk.data_ptr<T>(), *gvp = gv.data_ptr<T>();
    at::parallel_for(0, g.B * g.Hkv, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> row(std::max(g.D, g.Dv));
      for (int64_t bh = lo; bh < hi; ++bh) {
        const int64_t b = bh / g.Hkv, hk = bh % g.Hkv;
        for (int64_t n = 0; n < g.Nk; ++n) {
          for (int pass = 0; pass < 2; ++pass) {
            const int64_t W = pass == 0 ? g.D : g.Dv;
            const float* src = pass == 0 ? dkp : dvp;
            T* dst = (pass == 0 ? gkp : gvp) + ((b * g.Nk + n) * g.Hkv + hk) * W;
            std::fill(row.begin(), row.begin() + W, 0.f);
            for (int64_t s = 0; s < S; ++s) {
              const float* a = src + (((s * g.B + b) * g.Hkv + hk) * g.Nk + n) * W;
              for (int64_t d = 0; d < W; ++d) row[d] += a[d];
            }
            for (int64_t d = 0; d < W; ++d) dst[d] = static_cast<T>(row[d]);
          }
        }
      }
    });
  });
  return {dq, gk, gv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(attnkit_native, m) {
  m.def("flash_tiles_fwd(Tensor q, Tensor k, Tensor v, Tensor row_ptr, Tensor cols, Tensor slots, Tensor bits,"
        " int bq, int bk, float scale, int span, Tensor? k2=None, Tensor? v2=None) -> (Tensor, Tensor)");
  m.def("flash_tiles_bwd(Tensor q, Tensor k, Tensor v, Tensor out, Tensor dout, Tensor lse, Tensor dlse,"
        " Tensor row_ptr, Tensor cols, Tensor slots, Tensor bits, int bq, int bk, float scale, int span,"
        " int splits, Tensor? k2=None, Tensor? v2=None) -> (Tensor, Tensor, Tensor)");
  m.def("flash_tiles_release() -> ()");
}

TORCH_LIBRARY_IMPL(attnkit_native, CPU, m) {
  m.impl("flash_tiles_fwd", &flash_tiles_fwd);
  m.impl("flash_tiles_bwd", &flash_tiles_bwd);
}

TORCH_LIBRARY_IMPL(attnkit_native, CatchAll, m) { m.impl("flash_tiles_release", &flash_tiles_release); }
