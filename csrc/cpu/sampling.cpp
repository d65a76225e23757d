// Sampling on the CPU: temperature / top-k / top-p probabilities over rows of logits and the draw of a token from
// rows of probabilities (kangaroo_rt.reference.process_logits and torch.multinomial). See kr_cpu.h for the contract.
//
// Why: sampling SmolLM2 (49152 logits) through torch took more of a bf16 plain step than the layers' attention and
// norms together: torch.sort for top-p about 2.4 ms, torch.multinomial about 0.9 ms, next to a 5 ms decode step.
// Neither needs a sort of the whole vocabulary:
//   - the k-th largest score (top-k) and the nucleus (top-p) lie among the few scores near the largest. The kernel
//     collects the indices whose score is within D of the largest (one pass), takes the k-th largest among them
//     (nth_element) and sorts only them for the nucleus, and widens D (another pass) in the rare case that they do
//     not hold k scores or the top_p mass. Every score outside ranks below every score inside, so the result is
//     that of a sort of the whole row;
//   - a draw is one pass: the row's sum in chunks of 64, then the first index at which the running sum passes
//     u * sum, found inside the chunk where it is passed.
//
// The kept set is the reference's: temperature as scores = logits / max(T, 1e-6) in fp32 (a division, as torch's),
// top-k removes the scores below the k-th largest (ties with it stay), top-p keeps a token while the mass of the
// tokens ranked above it (descending score, ties by index) is below top_p (the reference's "ascending cumulative
// mass <= 1 - top_p is removed", counted from the other end, so that the most likely token always stays). The
// masses are exp(s - max) summed in double from fp32 terms; the reference sums fp32 softmax values, so the two can
// part only where a token's mass above lies within float rounding of top_p. The probabilities are
// exp(s - max) / sum over the kept tokens, with kr_cpu's exp (within a few ulp of torch's softmax); removed tokens
// get exactly 0. A row with a NaN or +inf score (torch's softmax is NaN there) or only -inf scores is left to the
// caller (status 1): the wrappers compute it with torch, which gives its NaNs or its error.
#include <algorithm>
#include <climits>
#include <cmath>
#include <utility>
#include <vector>

#include "kr_cpu.h"
#include "kr_cpu_avx512.h"
#include "kr_cpu_common.h"

namespace {

using kr_cpu::kLanes;

constexpr float kNegInf = -__builtin_inff();
constexpr float kPosInf = __builtin_inff();
// exp(s - max) below this is 0: kr_cpu's exp clamps there (exp(-87) ~ 1.6e-38), and torch's fp32 softmax gives such
// a token a denormal or 0; neither can be drawn in practice, but 0 keeps "a token torch gives no mass never gets any".
constexpr float kExpFloor = -87.0f;
constexpr int64_t kChunk = 64;  // elements per partial sum of a draw

// The passes over a row, in plain C++ (the portable and AVX2 variants) and with AVX-512 intrinsics: the same
// operations lane for lane, so the same bits. Lanes: element k of a row is lane k % 16 (a draw's sums: k % 8).
struct PlainLoops {
  // s[i] = x[i] / divisor for i < n -> the largest s; *bad when an s is NaN or +inf.
  template <typename T>
  static KR_INLINE float scale_max(const T* x, int64_t n, float divisor, float* s, bool* bad) {
    float best = kNegInf;
    bool flag = false;
    for (int64_t k = 0; k < n; ++k) {
      const float v = kr_cpu::to_float(x[k]) / divisor;
      s[k] = v;
      best = v > best ? v : best;
      flag = flag || v != v || v == kPosInf;
    }
    *bad = flag;
    return best;
  }

  // e[i] = exp(s[i] - m) for the scores at or above floor with s[i] - m >= kExpFloor, else 0 -> their sum: per lane
  // in double, then the lanes in order.
  static KR_INLINE double exp_sum(const float* s, int64_t n, float m, float floor, float* e) {
    double acc[kLanes] = {};
    for (int64_t k = 0; k < n; ++k) {
      const float v = s[k];
      const float d = v - m;  // (-inf for -inf scores)
      const float t = (v >= floor && d >= kExpFloor) ? kr_cpu::exp_nonpositive(d) : 0.0f;
      e[k] = t;
      acc[k % kLanes] += static_cast<double>(t);
    }
    double total = 0.0;
    for (int l = 0; l < kLanes; ++l) total += acc[l];
    return total;
  }

  // The indices i < n with s[i] >= floor, in increasing order, into idx -> their count.
  static KR_INLINE int64_t collect(const float* s, int64_t n, float floor, int32_t* idx) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i) {
      idx[c] = static_cast<int32_t>(i);
      c += s[i] >= floor ? 1 : 0;
    }
    return c;
  }

  // p[i] = e[i] * (1 / total) in double, rounded once, where i ranks at or above the cut (score > cut_score, or
  // == cut_score at an index <= cut_index), else 0.
  static KR_INLINE void normalize(const float* s, float* p, int64_t n, double inv, float cut_score, int64_t cut_index) {
    for (int64_t i = 0; i < n; ++i) {
      const bool kept = s[i] > cut_score || (s[i] == cut_score && i <= cut_index);
      p[i] = kept ? static_cast<float>(static_cast<double>(p[i]) * inv) : 0.0f;
    }
  }

  // The sum of p[0..len), len <= kChunk, in double (8 lanes, a fixed tree); *bad when a value is negative, NaN or
  // +inf.
  static KR_INLINE double chunk_sum(const float* p, int64_t len, bool* bad) {
    double acc[8] = {};
    bool flag = false;
    for (int64_t k = 0; k < len; ++k) {
      const float v = p[k];
      acc[k % 8] += static_cast<double>(v);
      flag = flag || !(v >= 0.0f && v < kPosInf);
    }
    *bad = *bad || flag;
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  }
};

#if KR_CPU_X86
struct Avx512Loops {
  static KR_TARGET_AVX512 inline __mmask16 live_of(int64_t k, int64_t n) {
    return n - k >= kLanes ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - k)) - 1u);
  }

  template <typename T>
  static KR_TARGET_AVX512 inline float scale_max(const T* x, int64_t n, float divisor, float* s, bool* bad) {
    const __m512 d = _mm512_set1_ps(divisor), inf = _mm512_set1_ps(kPosInf);
    __m512 best = _mm512_set1_ps(kNegInf);
    __mmask16 flag = 0;
    for (int64_t k = 0; k < n; k += kLanes) {
      const __mmask16 live = live_of(k, n);
      const __m512 v = _mm512_div_ps(kr_cpu::load16_tail(x + k, live), d);
      _mm512_mask_storeu_ps(s + k, live, v);
      best = _mm512_mask_max_ps(best, live, v, best);
      flag |= _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q) | _mm512_mask_cmp_ps_mask(live, v, inf, _CMP_EQ_OQ);
    }
    *bad = flag != 0;
    return _mm512_reduce_max_ps(best);
  }

  static KR_TARGET_AVX512 inline double exp_sum(const float* s, int64_t n, float m, float floor, float* e) {
    const __m512 mv = _mm512_set1_ps(m), fv = _mm512_set1_ps(floor), lowest = _mm512_set1_ps(kExpFloor);
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
    for (int64_t k = 0; k < n; k += kLanes) {
      const __mmask16 live = live_of(k, n);
      const __m512 v = _mm512_maskz_loadu_ps(live, s + k);
      const __m512 d = _mm512_sub_ps(v, mv);
      const __mmask16 on = live & _mm512_cmp_ps_mask(v, fv, _CMP_GE_OQ) & _mm512_cmp_ps_mask(d, lowest, _CMP_GE_OQ);
      const __m512 t = _mm512_maskz_mov_ps(on, kr_cpu::exp16(d));
      _mm512_mask_storeu_ps(e + k, live, t);
      lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(t)));
      hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1))));
    }
    double acc[kLanes];
    _mm512_storeu_pd(acc, lo);
    _mm512_storeu_pd(acc + 8, hi);
    double total = 0.0;
    for (int l = 0; l < kLanes; ++l) total += acc[l];
    return total;
  }

  static KR_TARGET_AVX512 inline int64_t collect(const float* s, int64_t n, float floor, int32_t* idx) {
    const __m512 fv = _mm512_set1_ps(floor);
    __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(kLanes);
    int64_t c = 0;
    for (int64_t k = 0; k < n; k += kLanes) {
      const __mmask16 live = live_of(k, n);
      const __mmask16 in = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, s + k), fv, _CMP_GE_OQ);
      _mm512_mask_compressstoreu_epi32(idx + c, in, at);
      c += __builtin_popcount(static_cast<unsigned>(in));
      at = _mm512_add_epi32(at, step);
    }
    return c;
  }

  static KR_TARGET_AVX512 inline void normalize(const float* s, float* p, int64_t n, double inv, float cut_score,
                                                int64_t cut_index) {
    const __m512 cv = _mm512_set1_ps(cut_score);
    const __m512d iv = _mm512_set1_pd(inv);
    const __m512i ci = _mm512_set1_epi32(static_cast<int32_t>(std::min<int64_t>(cut_index, INT32_MAX)));
    __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(kLanes);
    for (int64_t k = 0; k < n; k += kLanes) {
      const __mmask16 live = live_of(k, n);
      const __m512 v = _mm512_maskz_loadu_ps(live, s + k);
      const __mmask16 kept = _mm512_cmp_ps_mask(v, cv, _CMP_GT_OQ) |
                             (_mm512_cmp_ps_mask(v, cv, _CMP_EQ_OQ) & _mm512_cmple_epi32_mask(at, ci));
      const __m512 e = _mm512_maskz_loadu_ps(live, p + k);
      const __m256 lo = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(e)), iv));
      const __m256 hi = _mm512_cvtpd_ps(
          _mm512_mul_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))), iv));
      const __m512 q = _mm512_castpd_ps(
          _mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
      _mm512_mask_storeu_ps(p + k, live, _mm512_maskz_mov_ps(kept, q));
      at = _mm512_add_epi32(at, step);
    }
  }

  static KR_TARGET_AVX512 inline double chunk_sum(const float* p, int64_t len, bool* bad) {
    __m512d acc = _mm512_setzero_pd();
    const __m256 zero = _mm256_setzero_ps(), inf = _mm256_set1_ps(kPosInf);
    __mmask8 flag = 0;
    for (int64_t k = 0; k < len; k += 8) {
      const __mmask8 live = len - k >= 8 ? static_cast<__mmask8>(0xff) : static_cast<__mmask8>((1u << (len - k)) - 1u);
      const __m256 v = _mm256_maskz_loadu_ps(live, p + k);
      acc = _mm512_add_pd(acc, _mm512_cvtps_pd(v));
      flag |= live & ~(_mm256_cmp_ps_mask(v, zero, _CMP_GE_OQ) & _mm256_cmp_ps_mask(v, inf, _CMP_LT_OQ));
    }
    *bad = *bad || flag != 0;
    double a[8];
    _mm512_storeu_pd(a, acc);
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
  }
};
#endif

struct Scratch {
  std::vector<float> s;
  std::vector<int32_t> idx;
  std::vector<std::pair<float, int32_t>> ranked;  // (-score, index): ascending = the ranking

  // ranked = the candidates idx[0..count) with their scores, to be ordered.
  void rank(const float* scores, const int32_t* at, int64_t count) {
    ranked.resize(static_cast<size_t>(count));
    for (int64_t c = 0; c < count; ++c) ranked[c] = {-scores[at[c]], at[c]};
  }
};

// One row: 0, or 1 when the caller must compute it (a NaN or +inf score, or only -inf).
template <class L, typename T>
KR_INLINE int process_row(const T* x, int64_t n, float divisor, int64_t top_k, double top_p, float* p, Scratch& w) {
  w.s.resize(static_cast<size_t>(n));
  w.idx.resize(static_cast<size_t>(n));
  float* s = w.s.data();
  int32_t* idx = w.idx.data();
  bool bad = false;
  const float m = L::scale_max(x, n, divisor, s, &bad);
  if (bad || m == kNegInf) return 1;
  const bool use_k = top_k > 0 && top_k < n, use_p = top_p < 1.0;
  if (!use_k && !use_p) {
    const double total = L::exp_sum(s, n, m, kNegInf, p);
    L::normalize(s, p, n, 1.0 / total, kNegInf, n);  // every score
    return 0;
  }
  // The candidates: the scores within D of the largest, D widened (8, 64, then everything) until they hold the k-th
  // largest score (top-k) and, at or above it, the top_p mass (top-p).
  float floor = kNegInf;  // the k-th largest score (top-k), else -inf
  double total = 0.0;     // sum of exp(s - m) over the scores at or above floor
  int64_t count = 0;
  for (const float d : {8.0f, 64.0f, __builtin_inff()}) {
    const float lo = m - d;  // (-inf at the last step: every index)
    count = L::collect(s, n, lo, idx);
    if (use_k) {
      if (count < top_k) continue;  // (at the last step count = n > top_k)
      w.rank(s, idx, count);
      std::nth_element(w.ranked.begin(), w.ranked.begin() + (top_k - 1), w.ranked.end());
      floor = -w.ranked[top_k - 1].first;
    }
    total = L::exp_sum(s, n, m, floor, p);
    if (!use_p) break;
    // the candidates with mass at or above floor (with top-k, every score at or above floor is one of them)
    int64_t kept = 0;
    double mass = 0.0;
    for (int64_t c = 0; c < count; ++c) {
      const int32_t i = idx[c];
      if (s[i] >= floor && p[i] > 0.0f) idx[kept++] = i, mass += p[i];
    }
    count = kept;
    if (use_k || lo == kNegInf || mass >= top_p * total) break;
  }
  if (!use_p) {
    L::normalize(s, p, n, 1.0 / total, floor, n);  // every score at or above floor
    return 0;
  }
  w.rank(s, idx, count);
  std::sort(w.ranked.begin(), w.ranked.end());
  const double limit = top_p * total;
  double above = p[w.ranked[0].second];
  int64_t last = 0;  // the most likely token always stays
  for (int64_t r = 1; r < count && above < limit; ++r) {
    above += p[w.ranked[r].second];
    last = r;
  }
  double kept_total = 0.0;
  for (int64_t r = 0; r <= last; ++r) kept_total += p[w.ranked[r].second];
  L::normalize(s, p, n, 1.0 / kept_total, -w.ranked[last].first, w.ranked[last].second);
  return 0;
}

template <class L, typename T>
KR_INLINE void process_rows(const T* x, int64_t ld, int64_t n, float divisor, int64_t top_k, double top_p, float* probs,
                            int64_t ldp, int32_t* status, int64_t m0, int64_t m1) {
  static thread_local Scratch scratch;
  for (int64_t m = m0; m < m1; ++m)
    status[m] = process_row<L>(x + m * ld, n, divisor, top_k, top_p, probs + m * ldp, scratch);
}

// The token drawn from one row with u in [0, 1), or -1 when the row is not a distribution (a negative, NaN or
// infinite value, or a sum of 0).
template <class L>
KR_INLINE int64_t sample_row(const float* p, int64_t n, double u) {
  bool bad = false;
  double total = 0.0;
  for (int64_t c = 0; c < n; c += kChunk) total += L::chunk_sum(p + c, std::min(kChunk, n - c), &bad);
  if (bad || !(total > 0.0) || !(u >= 0.0 && u < 1.0)) return -1;
  const double target = u * total;
  double run = 0.0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t len = std::min(kChunk, n - c);
    const double next = run + L::chunk_sum(p + c, len, &bad);
    if (next > target) {  // the same partial sums as total's: some chunk passes target < total
      int64_t last = -1;
      for (int64_t j = 0; j < len; ++j) {
        if (p[c + j] <= 0.0f) continue;
        run += static_cast<double>(p[c + j]);
        last = c + j;
        if (run > target) return last;
      }
      return last;  // the chunk's own sum rounded above its running sum: its last token with mass
    }
    run = next;
  }
  return -1;  // unreachable: target < total
}

template <class L>
KR_INLINE void sample_rows(const float* p, int64_t ld, int64_t n, const double* u, int64_t* tokens, int64_t m0,
                           int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) tokens[m] = sample_row<L>(p + m * ld, n, u[m]);
}

// Speculative sampling's acceptance and next token for rows [m0, m1) (kr_cpu_accept_sampling_rows).
template <class L>
KR_INLINE void accept_rows(const int64_t* drafts, int64_t ld_drafts, const int64_t* n_drafts, const float* p,
                           const float* q, int64_t K, int64_t V, const float* u_accept, const double* u_next,
                           int64_t* accepted, int64_t* next, int64_t m0, int64_t m1) {
  static thread_local std::vector<float> residual;
  residual.resize(static_cast<size_t>(V));
  for (int64_t b = m0; b < m1; ++b) {
    const float* pb = p + b * (K + 1) * V;
    const float* qb = q + b * K * V;
    const int64_t n = n_drafts[b];
    int64_t a = 0;
    for (; a < n; ++a) {  // the reference's float test: u * q(d) < p(d)
      const int64_t d = drafts[b * ld_drafts + a];
      if (d < 0 || d >= V || !(u_accept[b * K + a] * qb[a * V + d] < pb[a * V + d])) break;
    }
    accepted[b] = a;
    const float* pa = pb + a * V;
    if (a < n) {  // rejected at a: max(p_a - q_a, 0), or p_a where round-off left it no mass
      const float* qa = qb + a * V;
      float* r = residual.data();
      bool any = false, nan = false;
      for (int64_t v = 0; v < V; ++v) {
        const float x = pa[v] - qa[v];
        r[v] = x > 0.0f ? x : 0.0f;
        any = any || r[v] > 0.0f;
        nan = nan || x != x;
      }
      next[b] = nan ? -1 : sample_row<L>(any ? r : pa, V, u_next[b]);  // (-1: the caller raises torch's error)
    } else {
      next[b] = sample_row<L>(pa, V, u_next[b]);
    }
  }
}

template <typename T>
void process_portable(const T* x, int64_t ld, int64_t n, float d, int64_t k, double tp, float* p, int64_t ldp,
                      int32_t* st, int64_t m0, int64_t m1) {
  process_rows<PlainLoops, T>(x, ld, n, d, k, tp, p, ldp, st, m0, m1);
}

void sample_portable(const float* p, int64_t ld, int64_t n, const double* u, int64_t* t, int64_t m0, int64_t m1) {
  sample_rows<PlainLoops>(p, ld, n, u, t, m0, m1);
}

void accept_portable(const int64_t* d, int64_t ldd, const int64_t* nd, const float* p, const float* q, int64_t K,
                     int64_t V, const float* ua, const double* un, int64_t* acc, int64_t* next, int64_t m0,
                     int64_t m1) {
  accept_rows<PlainLoops>(d, ldd, nd, p, q, K, V, ua, un, acc, next, m0, m1);
}

#if KR_CPU_X86
template <typename T>
KR_TARGET_AVX512 void process_avx512(const T* x, int64_t ld, int64_t n, float d, int64_t k, double tp, float* p,
                                     int64_t ldp, int32_t* st, int64_t m0, int64_t m1) {
  process_rows<Avx512Loops, T>(x, ld, n, d, k, tp, p, ldp, st, m0, m1);
}

template <typename T>
KR_TARGET_AVX2 void process_avx2(const T* x, int64_t ld, int64_t n, float d, int64_t k, double tp, float* p,
                                 int64_t ldp, int32_t* st, int64_t m0, int64_t m1) {
  process_rows<PlainLoops, T>(x, ld, n, d, k, tp, p, ldp, st, m0, m1);
}

KR_TARGET_AVX512 void sample_avx512(const float* p, int64_t ld, int64_t n, const double* u, int64_t* t, int64_t m0,
                                    int64_t m1) {
  sample_rows<Avx512Loops>(p, ld, n, u, t, m0, m1);
}

KR_TARGET_AVX512 void accept_avx512(const int64_t* d, int64_t ldd, const int64_t* nd, const float* p, const float* q,
                                    int64_t K, int64_t V, const float* ua, const double* un, int64_t* acc,
                                    int64_t* next, int64_t m0, int64_t m1) {
  accept_rows<Avx512Loops>(d, ldd, nd, p, q, K, V, ua, un, acc, next, m0, m1);
}
#endif

template <typename T>
void process_dispatch(int isa, const void* x, int64_t ld, int64_t n, float d, int64_t k, double tp, float* p,
                      int64_t ldp, int32_t* st, int64_t m0, int64_t m1) {
  const T* xt = static_cast<const T*>(x);
  switch (isa) {
#if KR_CPU_X86
    case KR_CPU_ISA_AVX512_BF16:
    case KR_CPU_ISA_AVX512: process_avx512<T>(xt, ld, n, d, k, tp, p, ldp, st, m0, m1); return;
    case KR_CPU_ISA_AVX2: process_avx2<T>(xt, ld, n, d, k, tp, p, ldp, st, m0, m1); return;
#endif
    default: process_portable<T>(xt, ld, n, d, k, tp, p, ldp, st, m0, m1); return;
  }
}

}  // namespace

extern "C" int kr_cpu_process_logits_rows(int isa, int dtype, const void* logits, int64_t ld, int64_t n,
                                          float divisor, int64_t top_k, double top_p, float* probs, int64_t ldp,
                                          int32_t* status, int64_t m_begin, int64_t m_end) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (n <= 0 || n >= INT32_MAX || m_begin < 0 || m_end < m_begin || !(top_p == top_p) || !(divisor > 0.0f) ||
      (dtype != KR_CPU_FLOAT32 && dtype != KR_CPU_BFLOAT16))
    return KR_CPU_BAD_ARGUMENT;
  if (m_begin == m_end) return KR_CPU_OK;
  if (logits == nullptr || probs == nullptr || status == nullptr) return KR_CPU_BAD_ARGUMENT;
  if (dtype == KR_CPU_FLOAT32)
    process_dispatch<float>(isa, logits, ld, n, divisor, top_k, top_p, probs, ldp, status, m_begin, m_end);
  else
    process_dispatch<uint16_t>(isa, logits, ld, n, divisor, top_k, top_p, probs, ldp, status, m_begin, m_end);
  return KR_CPU_OK;
}

extern "C" int kr_cpu_sample_rows(int isa, const float* probs, int64_t ld, int64_t n, const double* u,
                                  int64_t* tokens, int64_t m_begin, int64_t m_end) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (n <= 0 || m_begin < 0 || m_end < m_begin) return KR_CPU_BAD_ARGUMENT;
  if (m_begin == m_end) return KR_CPU_OK;
  if (probs == nullptr || u == nullptr || tokens == nullptr) return KR_CPU_BAD_ARGUMENT;
#if KR_CPU_X86
  if (isa >= KR_CPU_ISA_AVX512) {
    sample_avx512(probs, ld, n, u, tokens, m_begin, m_end);
    return KR_CPU_OK;
  }
#endif
  sample_portable(probs, ld, n, u, tokens, m_begin, m_end);
  return KR_CPU_OK;
}

extern "C" int kr_cpu_accept_sampling_rows(int isa, const int64_t* drafts, int64_t ld_drafts, const int64_t* n_drafts,
                                           const float* p, const float* q, int64_t K, int64_t V, const float* u_accept,
                                           const double* u_next, int64_t* accepted, int64_t* next, int64_t m_begin,
                                           int64_t m_end) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (K < 0 || V <= 0 || ld_drafts < K || m_begin < 0 || m_end < m_begin) return KR_CPU_BAD_ARGUMENT;
  if (m_begin == m_end) return KR_CPU_OK;
  if (n_drafts == nullptr || p == nullptr || u_next == nullptr || accepted == nullptr || next == nullptr ||
      (K > 0 && (drafts == nullptr || q == nullptr || u_accept == nullptr)))
    return KR_CPU_BAD_ARGUMENT;
  for (int64_t b = m_begin; b < m_end; ++b)
    if (n_drafts[b] < 0 || n_drafts[b] > K) return KR_CPU_BAD_ARGUMENT;
#if KR_CPU_X86
  if (isa >= KR_CPU_ISA_AVX512) {
    accept_avx512(drafts, ld_drafts, n_drafts, p, q, K, V, u_accept, u_next, accepted, next, m_begin, m_end);
    return KR_CPU_OK;
  }
#endif
  accept_portable(drafts, ld_drafts, n_drafts, p, q, K, V, u_accept, u_next, accepted, next, m_begin, m_end);
  return KR_CPU_OK;
}

extern "C" int kr_cpu_row_sampling_check(const kr_cpu_row_sampling* s, int64_t batch) {
  if (s == nullptr || batch < 0 || (batch > 0 && (s->divisor == nullptr || s->top_k == nullptr || s->top_p == nullptr)))
    return KR_CPU_BAD_ARGUMENT;
  for (int64_t b = 0; b < batch; ++b)
    if (!(s->divisor[b] >= 0.0f) || s->top_k[b] < 0 || s->top_p[b] != s->top_p[b]) return KR_CPU_BAD_ARGUMENT;
  return KR_CPU_OK;
}
