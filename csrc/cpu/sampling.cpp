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
#include <cmath>
#include <utility>
#include <vector>

#include "kr_cpu.h"
#include "kr_cpu_common.h"

namespace {

using kr_cpu::kLanes;

constexpr float kNegInf = -__builtin_inff();

// s[i] = x[i] / divisor for i < n -> the largest s; *bad when an s is NaN or +inf.
template <typename T>
KR_INLINE float scale_max(const T* x, int64_t n, float divisor, float* s, bool* bad) {
  float best[kLanes];
  int32_t flag[kLanes] = {};
  for (int l = 0; l < kLanes; ++l) best[l] = kNegInf;
  const int64_t full = n - n % kLanes;
  for (int64_t k = 0; k < full; k += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float v = kr_cpu::to_float(x[k + l]) / divisor;
      s[k + l] = v;
      best[l] = v > best[l] ? v : best[l];
      flag[l] |= (v != v || v == __builtin_inff()) ? 1 : 0;
    }
  for (int64_t k = full; k < n; ++k) {
    const float v = kr_cpu::to_float(x[k]) / divisor;
    s[k] = v;
    best[0] = v > best[0] ? v : best[0];
    flag[0] |= (v != v || v == __builtin_inff()) ? 1 : 0;
  }
  float m = kNegInf;
  int32_t any = 0;
  for (int l = 0; l < kLanes; ++l) m = best[l] > m ? best[l] : m, any |= flag[l];
  *bad = any != 0;
  return m;
}

// e[i] = exp(s[i] - m) for the scores at or above floor (not -inf), else 0 -> their sum, in double (16 lanes, then
// in order).
KR_INLINE double exp_sum(const float* s, int64_t n, float m, float floor, float* e) {
  double acc[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t k = 0; k < full; k += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float v = s[k + l];
      const float t = (v >= floor && v > kNegInf) ? kr_cpu::exp_nonpositive(v - m) : 0.0f;
      e[k + l] = t;
      acc[l] += static_cast<double>(t);
    }
  for (int64_t k = full; k < n; ++k) {
    const float v = s[k];
    const float t = (v >= floor && v > kNegInf) ? kr_cpu::exp_nonpositive(v - m) : 0.0f;
    e[k] = t;
    acc[0] += static_cast<double>(t);
  }
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// The indices i < n with s[i] >= floor, in increasing order, into idx -> their count.
KR_INLINE int64_t collect(const float* s, int64_t n, float floor, int32_t* idx) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    idx[c] = static_cast<int32_t>(i);
    c += s[i] >= floor ? 1 : 0;
  }
  return c;
}

// p[i] = e[i] / total (in double, rounded once) where i ranks at or above the cut (score > cut_score, or == cut_score
// at an index <= cut_index), else 0. No cut (cut_index < 0): every e[i] / total.
KR_INLINE void normalize(const float* s, float* p, int64_t n, double total, float cut_score, int64_t cut_index) {
  const double inv = 1.0 / total;  // (e / total within an ulp of double: far below fp32's rounding)
  if (cut_index < 0) {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(static_cast<double>(p[i]) * inv);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const bool kept = s[i] > cut_score || (s[i] == cut_score && i <= cut_index);
    p[i] = kept ? static_cast<float>(static_cast<double>(p[i]) * inv) : 0.0f;
  }
}

struct Scratch {
  std::vector<float> s;
  std::vector<int32_t> idx;
  std::vector<std::pair<float, int32_t>> ranked;  // (-score, index): ascending = the ranking
};

// One row: 0, or 1 when the caller must compute it (a NaN or +inf score, or only -inf).
template <typename T>
KR_INLINE int process_row(const T* x, int64_t n, float divisor, int64_t top_k, float top_p, float* p, Scratch& w) {
  w.s.resize(static_cast<size_t>(n));
  w.idx.resize(static_cast<size_t>(n));
  float* s = w.s.data();
  int32_t* idx = w.idx.data();
  bool bad = false;
  const float m = scale_max(x, n, divisor, s, &bad);
  if (bad || m == kNegInf) return 1;
  const bool use_k = top_k > 0 && top_k < n, use_p = top_p < 1.0f;
  if (!use_k && !use_p) {
    const double total = exp_sum(s, n, m, kNegInf, p);
    normalize(s, p, n, total, 0.0f, -1);
    return 0;
  }
  // The candidates: the scores within D of the largest, D widened (8, 64, then everything) until they hold the k-th
  // largest score (top-k) and, at or above it, the top_p mass (top-p).
  float floor = kNegInf;  // the k-th largest score (top-k), else -inf
  double total = 0.0;     // sum of exp(s - m) over the scores at or above floor
  int64_t count = 0;
  for (const float d : {8.0f, 64.0f, __builtin_inff()}) {
    const float lo = m - d;  // (-inf at the last step: every index)
    count = collect(s, n, lo, idx);
    if (use_k) {
      if (count < top_k) continue;  // (at the last step count = n > top_k)
      w.ranked.resize(static_cast<size_t>(count));
      for (int64_t c = 0; c < count; ++c) w.ranked[c] = {-s[idx[c]], idx[c]};
      std::nth_element(w.ranked.begin(), w.ranked.begin() + (top_k - 1), w.ranked.end());
      floor = -w.ranked[top_k - 1].first;
    }
    total = exp_sum(s, n, m, floor, p);
    if (!use_p) break;
    // the candidates with mass at or above floor (with top-k, every score at or above floor is one of them)
    int64_t kept = 0;
    double mass = 0.0;
    for (int64_t c = 0; c < count; ++c) {
      const int32_t i = idx[c];
      if (s[i] >= floor && p[i] > 0.0f) idx[kept++] = i, mass += p[i];
    }
    count = kept;
    if (use_k || lo == kNegInf || mass >= static_cast<double>(top_p) * total) break;
  }
  if (!use_p) {
    normalize(s, p, n, total, floor, n);  // every index at or above floor
    return 0;
  }
  w.ranked.resize(static_cast<size_t>(count));
  for (int64_t c = 0; c < count; ++c) w.ranked[c] = {-s[idx[c]], idx[c]};
  std::sort(w.ranked.begin(), w.ranked.end());
  const double limit = static_cast<double>(top_p) * total;
  double above = p[w.ranked[0].second];
  int64_t last = 0;  // the most likely token always stays
  for (int64_t r = 1; r < count && above < limit; ++r) {
    above += p[w.ranked[r].second];
    last = r;
  }
  double kept_total = 0.0;
  for (int64_t r = 0; r <= last; ++r) kept_total += p[w.ranked[r].second];
  normalize(s, p, n, kept_total, -w.ranked[last].first, w.ranked[last].second);
  return 0;
}

template <typename T>
KR_INLINE void process_rows(const T* x, int64_t ld, int64_t n, float divisor, int64_t top_k, float top_p, float* probs,
                            int64_t ldp, int32_t* status, int64_t m0, int64_t m1) {
  static thread_local Scratch scratch;
  for (int64_t m = m0; m < m1; ++m)
    status[m] = process_row(x + m * ld, n, divisor, top_k, top_p, probs + m * ldp, scratch);
}

constexpr int64_t kChunk = 64;  // elements per partial sum of a draw

// The chunk sum of p[0..len) in double (8 lanes, fixed order); *bad when a value is negative, NaN or +inf.
KR_INLINE double chunk_sum(const float* p, int64_t len, bool* bad) {
  double acc[8] = {};
  int32_t flag = 0;
  int64_t k = 0;
  for (; k + 8 <= len; k += 8)
    for (int l = 0; l < 8; ++l) {
      const float v = p[k + l];
      acc[l] += static_cast<double>(v);
      flag |= (v >= 0.0f && v < __builtin_inff()) ? 0 : 1;
    }
  for (; k < len; ++k) {
    const float v = p[k];
    acc[0] += static_cast<double>(v);
    flag |= (v >= 0.0f && v < __builtin_inff()) ? 0 : 1;
  }
  *bad = *bad || flag != 0;
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

// The token drawn from one row with u in [0, 1), or -1 when the row is not a distribution (a negative, NaN or
// infinite value, or a sum of 0).
KR_INLINE int64_t sample_row(const float* p, int64_t n, double u) {
  bool bad = false;
  double total = 0.0;
  for (int64_t c = 0; c < n; c += kChunk) total += chunk_sum(p + c, std::min(kChunk, n - c), &bad);
  if (bad || !(total > 0.0) || !(u >= 0.0 && u < 1.0)) return -1;
  const double target = u * total;
  double run = 0.0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t len = std::min(kChunk, n - c);
    const double next = run + chunk_sum(p + c, len, &bad);
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

#if KR_CPU_X86
template <typename T>
KR_TARGET_AVX512 void process_avx512(const T* x, int64_t ld, int64_t n, float d, int64_t k, float tp, float* p,
                                     int64_t ldp, int32_t* st, int64_t m0, int64_t m1) {
  process_rows<T>(x, ld, n, d, k, tp, p, ldp, st, m0, m1);
}

template <typename T>
KR_TARGET_AVX2 void process_avx2(const T* x, int64_t ld, int64_t n, float d, int64_t k, float tp, float* p,
                                 int64_t ldp, int32_t* st, int64_t m0, int64_t m1) {
  process_rows<T>(x, ld, n, d, k, tp, p, ldp, st, m0, m1);
}
#endif

template <typename T>
void process_dispatch(int isa, const void* x, int64_t ld, int64_t n, float d, int64_t k, float tp, float* p,
                      int64_t ldp, int32_t* st, int64_t m0, int64_t m1) {
  const T* xt = static_cast<const T*>(x);
  switch (isa) {
#if KR_CPU_X86
    case KR_CPU_ISA_AVX512_BF16:
    case KR_CPU_ISA_AVX512: process_avx512<T>(xt, ld, n, d, k, tp, p, ldp, st, m0, m1); return;
    case KR_CPU_ISA_AVX2: process_avx2<T>(xt, ld, n, d, k, tp, p, ldp, st, m0, m1); return;
#endif
    default: process_rows<T>(xt, ld, n, d, k, tp, p, ldp, st, m0, m1); return;
  }
}

}  // namespace

extern "C" int kr_cpu_process_logits_rows(int isa, int dtype, const void* logits, int64_t ld, int64_t n,
                                          float divisor, int64_t top_k, float top_p, float* probs, int64_t ldp,
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

extern "C" int kr_cpu_sample_rows(const float* probs, int64_t ld, int64_t n, const double* u, int64_t* tokens,
                                  int64_t m_begin, int64_t m_end) {
  if (n <= 0 || m_begin < 0 || m_end < m_begin) return KR_CPU_BAD_ARGUMENT;
  if (m_begin == m_end) return KR_CPU_OK;
  if (probs == nullptr || u == nullptr || tokens == nullptr) return KR_CPU_BAD_ARGUMENT;
  for (int64_t m = m_begin; m < m_end; ++m) tokens[m] = sample_row(probs + m * ld, n, u[m]);
  return KR_CPU_OK;
}
