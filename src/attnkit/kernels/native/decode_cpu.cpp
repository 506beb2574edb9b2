// Decode-time attention on the CPU: a few queries (1..16) against a long K/V cache, split over the keys.
//
// "Lean Attention: Hardware-Aware Scalable Attention Mechanism for the Decode-Phase of Transformers",
// arXiv 2405.10480 (§3-4): the key work of every (batch, KV head) is laid end to end and cut into P equal
// contiguous parts, one per thread (stream-K). A part that crosses a head boundary emits one partial per head
// it touches; a partial is the unnormalised online-softmax state (m, l, O) of its rows, and the partials of a
// head are merged exactly afterwards (o = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s), in a fixed order, so
// the result does not depend on thread timing.
//
// GQA: the rows of one work item are all G = Hq / Hkv query heads of a KV group times the Nq queries, so every
// key and value row is read from memory once for the whole group (SDPA's per-head kernels read it G times).
// A key row is dotted with four query rows at a time (vectorised, the four sums reduced together by shuffles);
// P V is accumulated four rows at a time in registers.
//
// Masks are per-query-row unions of inclusive key intervals (lo, hi: (R, Nq), clipped to [0, Nk)); the keys
// no row can see are never read (a sliding window plus sinks reads only those keys), blocks a row fully
// sees run without a mask test, only blocks on an interval edge test keys one by one.
//
// Caches: dense heads-last (B, Nk, Hkv, D) with any strides but a contiguous feature dim (the KVCache's
// heads-first storage viewed heads-last is such a tensor), float32 / bfloat16 / float16 (16-bit rows are
// converted to float32 a block at a time); and KIVI-quantized caches (arXiv 2402.02750 §3): codes packed
// planar (byte t of a row of C codes holds codes t + s C / per, s = 0..per-1, in bits s*bits..), keys with a
// (step, zero) pair per channel and group of `group` tokens, values with one per token and group of `vgroup`
// channels; a block of codes is dequantized into a block-sized buffer, never the whole cache.
// All arithmetic is float32; scores are kept in base 2 (scale * log2 e folded into the queries).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t BK = 32;  // keys per block: the block's K/V rows (32 x 512 B each at D = 128) stay in L1
constexpr int64_t RT = 4;   // query rows per register tile

using v16f = float __attribute__((vector_size(64)));
using v16i = int32_t __attribute__((vector_size(64)));

inline v16f load(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, v16f v) { std::memcpy(p, &v, sizeof v); }
inline v16f splat(float x) { return v16f{} + x; }

// 2^t for t <= 0 (scores minus their running max), clamped below at -127 where it returns exactly 0, so a
// masked (-inf) score gives p = 0 without a branch; NaN stays NaN. t = n + f with |f| <= 1/2, 2^f by a
// degree-6 polynomial (relative error below 2e-7).
inline v16f exp2v(v16f t) {
  t = t < -127.f ? splat(-127.f) : t;
  const v16f magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
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
  const v16f e = (v16f)((n + 127) << 23);
  return t <= -127.f ? v16f{} : p * e;
}

// The four lane sums of a, b, c, d: halves folded pairwise by shuffles, ~3 instructions per sum instead of a
// full horizontal reduction each.
inline void hsum4(v16f a, v16f b, v16f c, v16f d, float* out) {
  const v16f ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                  __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const v16f cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                  __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // lanes 0-3: a, 4-7: b, 8-11: c, 12-15: d
  v16f x = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  x = x + __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  x = x + __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  out[0] = x[0];
  out[1] = x[4];
  out[2] = x[8];
  out[3] = x[12];
}

inline float hmax(v16f v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline float hsum(v16f v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// ---- K/V sources: hand a block of nj consecutive keys of (b, h) as float rows ------------------------------

// Dense cache of element type T, heads-last with strides (elements) s0 (batch), s1 (token), s2 (head).
template <typename T>
struct Dense {
  const T* k;
  const T* v;
  int64_t ks0, ks1, ks2, vs0, vs1, vs2, D, Dv;

  // K rows at *K with row stride *kst (floats), V likewise; buffers hold BK rows when a conversion is needed.
  void block(int64_t b, int64_t h, int64_t j0, int64_t nj, const float** K, int64_t* kst, const float** V,
             int64_t* vst, float* kbuf, float* vbuf) const {
    const T* kp = k + b * ks0 + h * ks2 + j0 * ks1;
    const T* vp = v + b * vs0 + h * vs2 + j0 * vs1;
    if constexpr (std::is_same_v<T, float>) {
      *K = kp, *kst = ks1, *V = vp, *vst = vs1;
    } else {
      for (int64_t j = 0; j < nj; ++j) {
        for (int64_t d = 0; d < D; ++d) kbuf[j * D + d] = static_cast<float>(kp[j * ks1 + d]);
        for (int64_t d = 0; d < Dv; ++d) vbuf[j * Dv + d] = static_cast<float>(vp[j * vs1 + d]);
      }
      *K = kbuf, *kst = D, *V = vbuf, *vst = Dv;
    }
  }
};

// Unpack one planar row of C codes (C / per bytes) into floats: out[c] = code[c] * step[c] + zero[c].
inline void dequant_row(const uint8_t* row, int64_t C, int bits, const float* step, const float* zero, float* out) {
  const int per = 8 / bits;
  const int64_t W = C / per;
  const int mask = (1 << bits) - 1;
  for (int s = 0; s < per; ++s) {
    float* o = out + s * W;
    const float* st = step + s * W;
    const float* ze = zero + s * W;
    const int sh = s * bits;
    for (int64_t t = 0; t < W; ++t) o[t] = static_cast<float>((row[t] >> sh) & mask) * st[t] + ze[t];
  }
}

// KIVI cache, heads-first: kc (B, H, cap, D / per) uint8, kstep / kzero (B, H, cap / group, D) of type P;
// vc (B, H, cap, Dv / per), vstep / vzero (B, H, cap, Dv / vgroup).
template <typename P>
struct Kivi {
  const uint8_t* kc;
  const uint8_t* vc;
  const P* kst;
  const P* kze;
  const P* vst;
  const P* vze;
  int64_t H, cap, D, Dv, group, vgroup;
  int bits;

  void block(int64_t b, int64_t h, int64_t j0, int64_t nj, const float** K, int64_t* kstr, const float** V,
             int64_t* vstr, float* kbuf, float* vbuf) const {
    const int per = 8 / bits;
    const int64_t bh = b * H + h, ngr = cap / group, nvg = Dv / vgroup;
    std::vector<float> st(D), ze(D), vs(Dv), vz(Dv);
    int64_t gcur = -1;
    for (int64_t j = 0; j < nj; ++j) {
      const int64_t t = j0 + j, g = t / group;
      if (g != gcur) {  // the key parameters change once per group of tokens
        const P* s = kst + (bh * ngr + g) * D;
        const P* z = kze + (bh * ngr + g) * D;
        for (int64_t d = 0; d < D; ++d) st[d] = static_cast<float>(s[d]), ze[d] = static_cast<float>(z[d]);
        gcur = g;
      }
      dequant_row(kc + (bh * cap + t) * (D / per), D, bits, st.data(), ze.data(), kbuf + j * D);
      const P* s = vst + (bh * cap + t) * nvg;
      const P* z = vze + (bh * cap + t) * nvg;
      for (int64_t gi = 0; gi < nvg; ++gi) {
        const float sv = static_cast<float>(s[gi]), zv = static_cast<float>(z[gi]);
        std::fill(vs.begin() + gi * vgroup, vs.begin() + (gi + 1) * vgroup, sv);
        std::fill(vz.begin() + gi * vgroup, vz.begin() + (gi + 1) * vgroup, zv);
      }
      dequant_row(vc + (bh * cap + t) * (Dv / per), Dv, bits, vs.data(), vz.data(), vbuf + j * Dv);
    }
    *K = kbuf, *kstr = D, *V = vbuf, *vstr = Dv;
  }
};

// ---- the work plan ---------------------------------------------------------------------------------------

struct Geo {
  int64_t B, Nq, Hq, Hkv, G, D, Dv, Nk, R, Rp, nint;
};

// Sorted disjoint key ranges [r0, r1) that at least one query row sees (the same for every batch row and head).
void live_ranges(const int64_t* lo, const int64_t* hi, int64_t nint, int64_t Nq, std::vector<int64_t>& r0,
                 std::vector<int64_t>& r1) {
  std::vector<std::pair<int64_t, int64_t>> iv;
  for (int64_t t = 0; t < nint * Nq; ++t)
    if (lo[t] <= hi[t]) iv.emplace_back(lo[t], hi[t] + 1);
  std::sort(iv.begin(), iv.end());
  for (auto& [a, e] : iv) {
    if (!r1.empty() && a <= r1.back()) {
      r1.back() = std::max(r1.back(), e);
    } else {
      r0.push_back(a);
      r1.push_back(e);
    }
  }
}

// 0: row i sees no key of [j0, j1); 1: all of them; 2: some.
inline int row_block(const int64_t* lo, const int64_t* hi, int64_t nint, int64_t Nq, int64_t i, int64_t j0,
                     int64_t j1) {
  bool any = false;
  for (int64_t t = 0; t < nint; ++t) {
    const int64_t a = lo[t * Nq + i], e = hi[t * Nq + i];
    if (a > e) continue;
    if (a <= j0 && e >= j1 - 1) return 1;
    if (a <= j1 - 1 && e >= j0) any = true;
  }
  return any ? 2 : 0;
}

inline bool row_sees(const int64_t* lo, const int64_t* hi, int64_t nint, int64_t Nq, int64_t i, int64_t j) {
  for (int64_t t = 0; t < nint; ++t)
    if (lo[t * Nq + i] <= j && j <= hi[t * Nq + i]) return true;
  return false;
}

// Scores of a block: S[r][j] = Q[r] . K[j] for the Rp (padded) rows, four rows at a time.
inline void scores(const float* Q, int64_t Rp, int64_t D, const float* K, int64_t kst, int64_t nj, float* S) {
  const int64_t Dm = D - D % 16;
  for (int64_t r = 0; r < Rp; r += RT) {
    const float* q0 = Q + r * D;
    const float* q1 = q0 + D;
    const float* q2 = q1 + D;
    const float* q3 = q2 + D;
    for (int64_t j = 0; j < nj; ++j) {
      const float* kr = K + j * kst;
      v16f a0{}, a1{}, a2{}, a3{};
      for (int64_t d = 0; d < Dm; d += 16) {
        const v16f kv = load(kr + d);
        a0 += load(q0 + d) * kv;
        a1 += load(q1 + d) * kv;
        a2 += load(q2 + d) * kv;
        a3 += load(q3 + d) * kv;
      }
      float s[4];
      hsum4(a0, a1, a2, a3, s);
      for (int64_t d = Dm; d < D; ++d) {
        s[0] += q0[d] * kr[d];
        s[1] += q1[d] * kr[d];
        s[2] += q2[d] * kr[d];
        s[3] += q3[d] * kr[d];
      }
      for (int64_t t = 0; t < RT; ++t) S[(r + t) * BK + j] = s[t];
    }
  }
}

// O[r] = alpha[r] O[r] + sum_j P[r][j] V[j] for the Rp rows, four rows in registers at a time.
inline void accumulate(float* O, const float* alpha, const float* P, int64_t Rp, int64_t Dv, const float* V,
                       int64_t vst, int64_t nj) {
  const int64_t Dm = Dv - Dv % 16;
  for (int64_t r = 0; r < Rp; r += RT) {
    const float* p0 = P + r * BK;
    const float* p1 = p0 + BK;
    const float* p2 = p1 + BK;
    const float* p3 = p2 + BK;
    float* o0 = O + r * Dv;
    float* o1 = o0 + Dv;
    float* o2 = o1 + Dv;
    float* o3 = o2 + Dv;
    for (int64_t c = 0; c < Dm; c += 16) {
      v16f a0 = load(o0 + c) * alpha[r], a1 = load(o1 + c) * alpha[r + 1];
      v16f a2 = load(o2 + c) * alpha[r + 2], a3 = load(o3 + c) * alpha[r + 3];
      for (int64_t j = 0; j < nj; ++j) {
        const v16f vv = load(V + j * vst + c);
        a0 += p0[j] * vv;
        a1 += p1[j] * vv;
        a2 += p2[j] * vv;
        a3 += p3[j] * vv;
      }
      store(o0 + c, a0), store(o1 + c, a1), store(o2 + c, a2), store(o3 + c, a3);
    }
    for (int64_t c = Dm; c < Dv; ++c) {
      for (int64_t t = 0; t < RT; ++t) {
        float a = O[(r + t) * Dv + c] * alpha[r + t];
        for (int64_t j = 0; j < nj; ++j) a += P[(r + t) * BK + j] * V[j * vst + c];
        O[(r + t) * Dv + c] = a;
      }
    }
  }
}

// One online-softmax step of a block for the Rp rows of one head: S holds the scores on entry and P on exit,
// (m, l, O) the running state.
inline void softmax_step(const Geo& g, const int64_t* lo, const int64_t* hi, int64_t j0, int64_t nj, float* S,
                         float* m, float* l, float* O, float* alpha, int* st, const float* V, int64_t vst) {
  bool all_full = true;
  for (int64_t r = 0; r < g.Rp; ++r) {
    st[r] = r < g.R ? row_block(lo, hi, g.nint, g.Nq, r % g.Nq, j0, j0 + nj) : 0;
    all_full = all_full && (st[r] == 1 || r >= g.R);
  }
  for (int64_t r = 0; r < g.Rp; ++r) {
    float* s = S + r * BK;
    for (int64_t j = nj; j < BK; ++j) s[j] = kNegInf;
    if (!all_full && st[r] != 1) {
      if (st[r] == 0) {
        for (int64_t j = 0; j < nj; ++j) s[j] = kNegInf;
      } else {
        for (int64_t j = 0; j < nj; ++j)
          if (!row_sees(lo, hi, g.nint, g.Nq, r % g.Nq, j0 + j)) s[j] = kNegInf;
      }
    }
    const v16f s0 = load(s), s1 = load(s + 16);
    const float mnew = std::max(m[r], hmax(s0 > s1 ? s0 : s1));
    if (mnew == kNegInf) {  // nothing seen by this row yet: (m, l, O) stay (-inf, 0, 0)
      alpha[r] = 1.f;
      store(s, v16f{});
      store(s + 16, v16f{});
      continue;
    }
    alpha[r] = m[r] == kNegInf ? 0.f : std::exp2(m[r] - mnew);
    const v16f p0 = exp2v(s0 - mnew), p1 = exp2v(s1 - mnew);
    store(s, p0);
    store(s + 16, p1);
    l[r] = l[r] * alpha[r] + hsum(p0 + p1);
    m[r] = mnew;
  }
  accumulate(O, alpha, S, g.Rp, g.Dv, V, vst, nj);
}

// Work units are (batch row, group of hg consecutive KV heads). hg = 1 when each head's keys are contiguous
// (heads-first storage); hg = Hkv when the heads of one token are adjacent (a heads-last tensor), so a unit
// sweeps whole token rows of the cache and reads memory in address order.
template <typename Src, typename QT, typename OT>
void decode(const Src& src, const at::Tensor& q, const Geo& g, int64_t hg, const int64_t* lo, const int64_t* hi,
            float scale, int64_t parts, OT* out, float* lse) {
  std::vector<int64_t> r0, r1;
  live_ranges(lo, hi, g.nint, g.Nq, r0, r1);
  int64_t L = 0;
  for (size_t t = 0; t < r0.size(); ++t) L += r1[t] - r0[t];
  const int64_t ngrp = g.Hkv / hg, nunit = g.B * ngrp, W = nunit * L;
  const int64_t P = W == 0 ? 0 : std::max<int64_t>(1, std::min<int64_t>(parts, W));
  const int64_t RS = hg * g.Rp;  // rows of state per slot
  // slots: part p emits one partial per unit its work range [w0(p), w0(p + 1)) touches
  auto w0_of = [&](int64_t p) { return W / std::max<int64_t>(P, 1) * p + std::min(p, W % std::max<int64_t>(P, 1)); };
  std::vector<int64_t> part_slot0(P + 1, 0), unit_slot0(nunit, 0), unit_slot1(nunit, 0);
  int64_t S = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t w0 = w0_of(p), w1 = w0_of(p + 1);
    part_slot0[p] = S;
    if (w1 > w0) {
      for (int64_t u = w0 / L; u <= (w1 - 1) / L; ++u) {
        if (unit_slot1[u] == unit_slot0[u]) unit_slot0[u] = S;
        unit_slot1[u] = ++S;
      }
    }
  }
  std::vector<float> PO(S * RS * g.Dv, 0.f), Pm(S * RS, kNegInf), Pl(S * RS, 0.f);

  const QT* qp = q.data_ptr<QT>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const float qscale = scale * kLog2e;

  at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
    std::vector<float> Q(RS * g.D, 0.f), Sb(g.Rp * BK), alpha(g.Rp), kbuf(BK * g.D), vbuf(BK * g.Dv);
    std::vector<int> st(g.Rp);
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t w1 = w0_of(p + 1);
      int64_t w = w0_of(p), slot = part_slot0[p];
      while (w < w1) {
        const int64_t u = w / L, u0 = w % L, u1 = std::min(L, u0 + (w1 - w));
        const int64_t b = u / ngrp, h0 = (u % ngrp) * hg;
        for (int64_t hh = 0; hh < hg; ++hh) {
          for (int64_t r = 0; r < g.R; ++r) {  // row r = (group member r / Nq, query r % Nq), prescaled
            const int64_t i = r % g.Nq, hq = (h0 + hh) * g.G + r / g.Nq;
            const QT* sq = qp + b * qs0 + i * qs1 + hq * qs2;
            for (int64_t d = 0; d < g.D; ++d) Q[(hh * g.Rp + r) * g.D + d] = static_cast<float>(sq[d]) * qscale;
          }
        }
        float* O = PO.data() + slot * RS * g.Dv;
        float* m = Pm.data() + slot * RS;
        float* l = Pl.data() + slot * RS;
        int64_t c = 0;  // live keys before range t
        for (size_t t = 0; t < r0.size(); ++t) {
          const int64_t len = r1[t] - r0[t];
          const int64_t a = std::max(u0, c), e = std::min(u1, c + len);
          for (int64_t x = a; x < e; x += BK) {
            const int64_t j0 = r0[t] + (x - c), nj = std::min(BK, e - x);
            for (int64_t hh = 0; hh < hg; ++hh) {
              const float *K, *V;
              int64_t kst, vst;
              src.block(b, h0 + hh, j0, nj, &K, &kst, &V, &vst, kbuf.data(), vbuf.data());
              scores(Q.data() + hh * g.Rp * g.D, g.Rp, g.D, K, kst, nj, Sb.data());
              softmax_step(g, lo, hi, j0, nj, Sb.data(), m + hh * g.Rp, l + hh * g.Rp, O + hh * g.Rp * g.Dv,
                           alpha.data(), st.data(), V, vst);
            }
          }
          c += len;
        }
        w += u1 - u0;
        ++slot;
      }
    }
  });

  // merge the partials of each (b, h) in slot order; rows that saw no key give 0 and -inf
  at::parallel_for(0, g.B * g.Hkv, 1, [&](int64_t hb, int64_t he) {
    std::vector<float> acc(g.Dv);
    for (int64_t bh = hb; bh < he; ++bh) {
      const int64_t b = bh / g.Hkv, h = bh % g.Hkv, u = b * ngrp + h / hg, hh = h % hg;
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t i = r % g.Nq, hq = h * g.G + r / g.Nq, row = hh * g.Rp + r;
        OT* o = out + ((b * g.Nq + i) * g.Hq + hq) * g.Dv;
        float* ls = lse + (b * g.Nq + i) * g.Hq + hq;
        float M = kNegInf;
        for (int64_t s = unit_slot0[u]; s < unit_slot1[u]; ++s) M = std::max(M, Pm[s * RS + row]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float den = 0.f;
        if (M != kNegInf) {
          for (int64_t s = unit_slot0[u]; s < unit_slot1[u]; ++s) {
            const float ms = Pm[s * RS + row];
            if (ms == kNegInf) continue;
            const float wt = std::exp2(ms - M);
            den += wt * Pl[s * RS + row];
            const float* Os = PO.data() + (s * RS + row) * g.Dv;
            for (int64_t d = 0; d < g.Dv; ++d) acc[d] += wt * Os[d];
          }
        }
        if (den > 0.f || std::isnan(den)) {
          const float inv = 1.f / den;
          for (int64_t d = 0; d < g.Dv; ++d) o[d] = static_cast<OT>(acc[d] * inv);
          *ls = (M + std::log2(den)) * kLn2;
        } else {
          for (int64_t d = 0; d < g.Dv; ++d) o[d] = static_cast<OT>(0.f);
          *ls = kNegInf;
        }
      }
    }
  });
}

Geo geometry(const at::Tensor& q, int64_t Hkv, int64_t Nk, int64_t Dv, const at::Tensor& lo, const at::Tensor& hi) {
  Geo g;
  g.B = q.size(0), g.Nq = q.size(1), g.Hq = q.size(2), g.D = q.size(3);
  g.Hkv = Hkv, g.G = g.Hq / Hkv, g.Dv = Dv, g.Nk = Nk;
  g.R = g.G * g.Nq, g.Rp = (g.R + RT - 1) / RT * RT;
  TORCH_CHECK(lo.dim() == 2 && lo.sizes() == hi.sizes() && lo.size(1) == g.Nq, "decode: lo/hi must be (R, Nq)");
  TORCH_CHECK(lo.scalar_type() == at::kLong && hi.scalar_type() == at::kLong && lo.is_contiguous() &&
              hi.is_contiguous(), "decode: lo/hi must be contiguous int64");
  g.nint = lo.size(0);
  return g;
}

int64_t resolve_parts(int64_t parts) { return parts > 0 ? parts : std::max<int64_t>(1, at::get_num_threads()); }

std::tuple<at::Tensor, at::Tensor> decode_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& lo, const at::Tensor& hi, double scale,
                                              int64_t parts) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_fwd: q, k, v must be 4-D heads-last");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_fwd: feature dims must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "decode_fwd: one dtype");
  TORCH_CHECK(q.size(2) % k.size(2) == 0 && k.size(3) == q.size(3), "decode_fwd: Hq % Hkv, D");
  const Geo g = geometry(q, k.size(2), k.size(1), v.size(3), lo, hi);
  auto out = at::empty({g.B, g.Nq, g.Hq, g.Dv}, q.options());
  auto lse = at::empty({g.B, g.Nq, g.Hq}, q.options().dtype(at::kFloat));
  const int64_t P = resolve_parts(parts);
  const int64_t* lp = lo.data_ptr<int64_t>();
  const int64_t* hp = hi.data_ptr<int64_t>();
  auto go = [&](auto tag) {
    using T = decltype(tag);
    Dense<T> src{k.data_ptr<T>(), v.data_ptr<T>(), k.stride(0), k.stride(1), k.stride(2),
                 v.stride(0), v.stride(1), v.stride(2), g.D, g.Dv};
    // heads of one token adjacent (heads-last): sweep all heads of a token range together
    const int64_t hg = (g.Hkv > 1 && std::abs(k.stride(2)) < std::abs(k.stride(1)) &&
                        std::abs(v.stride(2)) < std::abs(v.stride(1))) ? g.Hkv : 1;
    decode<Dense<T>, T, T>(src, q, g, hg, lp, hp, static_cast<float>(scale), P, out.data_ptr<T>(),
                           lse.data_ptr<float>());
  };
  switch (q.scalar_type()) {
    case at::kFloat: go(float{}); break;
    case at::kBFloat16: go(c10::BFloat16{}); break;
    case at::kHalf: go(c10::Half{}); break;
    default: TORCH_CHECK(false, "decode_fwd: float32, bfloat16 or float16 only");
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> kivi_decode_fwd(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& kstep,
                                                   const at::Tensor& kzero, const at::Tensor& vc,
                                                   const at::Tensor& vstep, const at::Tensor& vzero,
                                                   const at::Tensor& lo, const at::Tensor& hi, double scale,
                                                   int64_t bits, int64_t group, int64_t vgroup, int64_t parts) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "kivi_decode_fwd: bits in {2, 4, 8}");
  TORCH_CHECK(kc.dim() == 4 && vc.dim() == 4 && kc.is_contiguous() && vc.is_contiguous() &&
              kc.scalar_type() == at::kByte && vc.scalar_type() == at::kByte, "kivi_decode_fwd: codes");
  TORCH_CHECK(kstep.is_contiguous() && kzero.is_contiguous() && vstep.is_contiguous() && vzero.is_contiguous() &&
              kstep.scalar_type() == kzero.scalar_type() && vstep.scalar_type() == kstep.scalar_type() &&
              vzero.scalar_type() == kstep.scalar_type(), "kivi_decode_fwd: parameters");
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1, "kivi_decode_fwd: q");
  const int64_t per = 8 / bits, H = kc.size(1), cap = kc.size(2), D = kc.size(3) * per, Dv = vc.size(3) * per;
  TORCH_CHECK(D == q.size(3) && q.size(2) % H == 0 && cap % group == 0 && Dv % vgroup == 0 &&
              kstep.size(2) == cap / group && kstep.size(3) == D && vstep.size(3) == Dv / vgroup,
              "kivi_decode_fwd: shapes");
  const Geo g = geometry(q, H, cap, Dv, lo, hi);
  auto out = at::empty({g.B, g.Nq, g.Hq, g.Dv}, q.options().dtype(at::kFloat));
  auto lse = at::empty({g.B, g.Nq, g.Hq}, q.options().dtype(at::kFloat));
  const int64_t P = resolve_parts(parts);
  auto go = [&](auto ptag, auto qtag) {
    using PT = decltype(ptag);
    using QT = decltype(qtag);
    Kivi<PT> src{kc.data_ptr<uint8_t>(), vc.data_ptr<uint8_t>(), kstep.data_ptr<PT>(), kzero.data_ptr<PT>(),
                 vstep.data_ptr<PT>(), vzero.data_ptr<PT>(), H, cap, D, Dv, group, vgroup, static_cast<int>(bits)};
    decode<Kivi<PT>, QT, float>(src, q, g, 1, lo.data_ptr<int64_t>(), hi.data_ptr<int64_t>(),
                                static_cast<float>(scale), P, out.data_ptr<float>(), lse.data_ptr<float>());
  };
  auto with_q = [&](auto ptag) {
    switch (q.scalar_type()) {
      case at::kFloat: go(ptag, float{}); break;
      case at::kBFloat16: go(ptag, c10::BFloat16{}); break;
      case at::kHalf: go(ptag, c10::Half{}); break;
      default: TORCH_CHECK(false, "kivi_decode_fwd: q must be float32, bfloat16 or float16");
    }
  };
  switch (kstep.scalar_type()) {
    case at::kFloat: with_q(float{}); break;
    case at::kHalf: with_q(c10::Half{}); break;
    case at::kBFloat16: with_q(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "kivi_decode_fwd: parameters must be float32, float16 or bfloat16");
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(attnkit_decode, m) {
  m.def("decode_fwd(Tensor q, Tensor k, Tensor v, Tensor lo, Tensor hi, float scale, int parts) -> (Tensor, Tensor)");
  m.def("kivi_decode_fwd(Tensor q, Tensor kc, Tensor kstep, Tensor kzero, Tensor vc, Tensor vstep, Tensor vzero, "
        "Tensor lo, Tensor hi, float scale, int bits, int group, int vgroup, int parts) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnkit_decode, CPU, m) {
  m.impl("decode_fwd", &decode_fwd);
  m.impl("kivi_decode_fwd", &kivi_decode_fwd);
}
