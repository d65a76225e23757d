// Greedy choices over rows of logits on the CPU (kangaroo_rt.reference.argmax / greedy_with_confidence). See kr_cpu.h
// for the contract.
//
// torch's CPU argmax over 49152 bf16 logits takes several times as long as widening them to fp32 and taking the
// fp32 argmax, and that pair, with its allocation, ~50 us of a 4.4 ms SmolLM2 step (cold caches), ~120 us of a
// verify pass over 3 tokens; a draft step's softmax for its confidence ~25 us. Here: one pass per row over 16 lanes,
// lane l over elements l, l + 16, ... keeping its largest value and that value's first index, then the lanes
// compared. The index is exact (no rounding: the first index of the largest value, a NaN counting as the largest,
// as torch.argmax). The confidence is 1 / sum_j exp(x_j - max), the softmax of the chosen token, with kr_cpu's
// fixed exp and the fixed-order sum, the same bits on every variant (a tie with eta may fall either side of
// torch's softmax, which only moves where a draft chain stops; the tokens verified stay the target's).
#include <climits>

#include "kr_cpu.h"
#include "kr_cpu_common.h"

namespace {

using kr_cpu::kLanes;

// The first index of the largest value of x[0..n), n >= 1, a NaN counting as the largest; *max_out its value.
template <typename T>
KR_INLINE int64_t argmax_row(const T* x, int64_t n, float* max_out) {
  float best[kLanes];
  int32_t at[kLanes];
  int32_t nan_lanes = 0;
  for (int l = 0; l < kLanes; ++l) best[l] = -__builtin_inff(), at[l] = INT32_MAX;
  const int64_t full = n - n % kLanes;
  for (int64_t k = 0; k < full; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = kr_cpu::to_float(x[k + l]);
      const bool gt = v > best[l];
      best[l] = gt ? v : best[l];
      at[l] = gt ? static_cast<int32_t>(k + l) : at[l];
      nan_lanes |= v != v ? 1 : 0;
    }
  }
  for (int64_t j = full; j < n; ++j) {
    const int l = static_cast<int>(j - full);
    const float v = kr_cpu::to_float(x[j]);
    if (v > best[l]) best[l] = v, at[l] = static_cast<int32_t>(j);
    nan_lanes |= v != v ? 1 : 0;
  }
  if (nan_lanes != 0) {
    for (int64_t j = 0; j < n; ++j) {
      const float v = kr_cpu::to_float(x[j]);
      if (v != v) {
        *max_out = v;
        return j;
      }
    }
  }
  float m = best[0];
  int32_t idx = at[0];
  for (int l = 1; l < kLanes; ++l) {
    if (best[l] > m || (best[l] == m && at[l] < idx)) m = best[l], idx = at[l];
  }
  *max_out = m;
  return idx == INT32_MAX ? 0 : idx;  // every value -inf: the first
}

// 1 / sum_j exp(x_j - m) for the row's largest value m (not NaN, not -inf): the softmax of its first index.
template <typename T>
KR_INLINE float top_probability(const T* x, int64_t n, float m) {
  float acc[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t k = 0; k < full; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] + kr_cpu::exp_nonpositive(kr_cpu::to_float(x[k + l]) - m);
  for (int l = 0; l < kLanes; ++l)
    acc[l] = acc[l] + (full + l < n ? kr_cpu::exp_nonpositive(kr_cpu::to_float(x[full + l]) - m) : 0.0f);
  return 1.0f / kr_cpu::tree16(acc);
}

template <typename T>
KR_INLINE void rows(const T* x, int64_t ld, int64_t n, int64_t* index, float* conf, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    float top;
    index[m] = argmax_row(x + m * ld, n, &top);
    if (conf != nullptr) {
      // a row with a NaN or +inf, or only -inf: torch's softmax is NaN throughout, and its max is index 0
      if (top != top || top == __builtin_inff() || top == -__builtin_inff()) {
        index[m] = 0;
        conf[m] = __builtin_nanf("");
      } else {
        conf[m] = top_probability(x + m * ld, n, top);
      }
    }
  }
}

template <typename T>
void rows_portable(const T* x, int64_t ld, int64_t n, int64_t* i, float* c, int64_t m0, int64_t m1) {
  rows<T>(x, ld, n, i, c, m0, m1);
}

#if KR_CPU_X86
template <typename T>
KR_TARGET_AVX512 void rows_avx512(const T* x, int64_t ld, int64_t n, int64_t* i, float* c, int64_t m0, int64_t m1) {
  rows<T>(x, ld, n, i, c, m0, m1);
}

template <typename T>
KR_TARGET_AVX2 void rows_avx2(const T* x, int64_t ld, int64_t n, int64_t* i, float* c, int64_t m0, int64_t m1) {
  rows<T>(x, ld, n, i, c, m0, m1);
}
#endif

template <typename T>
void dispatch(int isa, const void* x, int64_t ld, int64_t n, int64_t* i, float* c, int64_t m0, int64_t m1) {
  const T* xt = static_cast<const T*>(x);
  switch (isa) {
#if KR_CPU_X86
    case KR_CPU_ISA_AVX512_BF16:
    case KR_CPU_ISA_AVX512: rows_avx512<T>(xt, ld, n, i, c, m0, m1); return;
    case KR_CPU_ISA_AVX2: rows_avx2<T>(xt, ld, n, i, c, m0, m1); return;
#endif
    default: rows_portable<T>(xt, ld, n, i, c, m0, m1); return;
  }
}

}  // namespace

extern "C" int kr_cpu_argmax_rows(int isa, int dtype, const void* x, int64_t ld, int64_t n, int64_t* index, float* conf,
                                  int64_t m_begin, int64_t m_end) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (n <= 0 || n >= INT32_MAX || m_begin < 0 || m_end < m_begin ||
      (dtype != KR_CPU_FLOAT32 && dtype != KR_CPU_BFLOAT16))
    return KR_CPU_BAD_ARGUMENT;
  if (m_begin == m_end) return KR_CPU_OK;
  if (x == nullptr || index == nullptr) return KR_CPU_BAD_ARGUMENT;
  if (dtype == KR_CPU_FLOAT32)
    dispatch<float>(isa, x, ld, n, index, conf, m_begin, m_end);
  else
    dispatch<uint16_t>(isa, x, ld, n, index, conf, m_begin, m_end);
  return KR_CPU_OK;
}
