// CPU RMSNorm of the decode path, fused with the residual add before it. See kr_cpu.h for the contract.
//
// torch's fused rms_norm takes about 50 us for one 576-wide row on this 2-core machine (thread start-up and
// dispatch), so a decode step of SmolLM2 spent 3 ms in its 61 norms. This is a loop over the row: the sum of
// squares by the fixed 16-lane order, so a row's bits do not depend on the other rows in the call.
#include <cmath>

#include "kr_cpu.h"
#include "kr_cpu_common.h"

namespace {

using kr_cpu::kLanes;

template <typename T>
KR_INLINE void norm_rows(const T* x, int64_t ld_x, const T* residual, int64_t ld_res, const T* weight, int64_t D,
                         float eps, T* out, T* residual_out, int64_t m_begin, int64_t m_end) {
  const int64_t full = D - D % kLanes;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const T* h = x + m * ld_x;
    if (residual != nullptr) {  // h = x + residual, stored in the dtype; the norm reads the stored values
      const T* r = residual + m * ld_res;
      T* ro = residual_out + m * D;
      for (int64_t d = 0; d < D; ++d) ro[d] = kr_cpu::from_float<T>(kr_cpu::to_float(h[d]) + kr_cpu::to_float(r[d]));
      h = ro;
    }
    float acc[kLanes] = {};
    for (int64_t k = 0; k < full; k += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float v = kr_cpu::to_float(h[k + l]);
        acc[l] = acc[l] + v * v;
      }
    if (full < D)
      for (int l = 0; l < kLanes; ++l) {
        const float v = full + l < D ? kr_cpu::to_float(h[full + l]) : 0.0f;
        acc[l] = acc[l] + v * v;
      }
    const float rstd = 1.0f / std::sqrt(kr_cpu::tree16(acc) / static_cast<float>(D) + eps);
    T* o = out + m * D;
    for (int64_t d = 0; d < D; ++d) {
      // fp32: weight * (h * rstd); bf16: the normalized value is rounded to bf16 before the product, as
      // transformers' LlamaRMSNorm does (weight * hidden.to(input_dtype)).
      const float normed = kr_cpu::round_to<T>(kr_cpu::to_float(h[d]) * rstd);
      o[d] = kr_cpu::from_float<T>(kr_cpu::to_float(weight[d]) * normed);
    }
  }
}

template <typename T>
void norm_portable(const T* x, int64_t ld_x, const T* res, int64_t ld_res, const T* w, int64_t D, float eps, T* out,
                   T* res_out, int64_t m0, int64_t m1) {
  norm_rows<T>(x, ld_x, res, ld_res, w, D, eps, out, res_out, m0, m1);
}

#if KR_CPU_X86
template <typename T>
KR_TARGET_AVX512 void norm_avx512(const T* x, int64_t ld_x, const T* res, int64_t ld_res, const T* w, int64_t D,
                                  float eps, T* out, T* res_out, int64_t m0, int64_t m1) {
  norm_rows<T>(x, ld_x, res, ld_res, w, D, eps, out, res_out, m0, m1);
}

template <typename T>
KR_TARGET_AVX2 void norm_avx2(const T* x, int64_t ld_x, const T* res, int64_t ld_res, const T* w, int64_t D,
                              float eps, T* out, T* res_out, int64_t m0, int64_t m1) {
  norm_rows<T>(x, ld_x, res, ld_res, w, D, eps, out, res_out, m0, m1);
}
#endif

template <typename T>
void norm(int isa, const void* x, int64_t ld_x, const void* res, int64_t ld_res, const void* w, int64_t D, float eps,
          void* out, void* res_out, int64_t m0, int64_t m1) {
  const T* xt = static_cast<const T*>(x);
  const T* rt = static_cast<const T*>(res);
  const T* wt = static_cast<const T*>(w);
  T* ot = static_cast<T*>(out);
  T* rot = static_cast<T*>(res_out);
  switch (isa) {
#if KR_CPU_X86
    case KR_CPU_ISA_AVX512_BF16:  // only the bf16 x bf16 linear uses the bf16 dot product
    case KR_CPU_ISA_AVX512: norm_avx512<T>(xt, ld_x, rt, ld_res, wt, D, eps, ot, rot, m0, m1); return;
    case KR_CPU_ISA_AVX2: norm_avx2<T>(xt, ld_x, rt, ld_res, wt, D, eps, ot, rot, m0, m1); return;
#endif
    default: norm_portable<T>(xt, ld_x, rt, ld_res, wt, D, eps, ot, rot, m0, m1); return;
  }
}

}  // namespace

extern "C" int kr_cpu_rms_norm_rows(int isa, int dtype, const void* x, int64_t ld_x, const void* residual,
                                    int64_t ld_res, const void* weight, int64_t D, float eps, void* out,
                                    void* residual_out, int64_t m_begin, int64_t m_end) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (D <= 0 || m_begin < 0 || m_end < m_begin || (dtype != KR_CPU_FLOAT32 && dtype != KR_CPU_BFLOAT16))
    return KR_CPU_BAD_ARGUMENT;
  if (m_begin == m_end) return KR_CPU_OK;
  if (x == nullptr || weight == nullptr || out == nullptr || ld_x < D || (residual != nullptr &&
      (residual_out == nullptr || ld_res < D)))
    return KR_CPU_BAD_ARGUMENT;
  if (dtype == KR_CPU_FLOAT32)
    norm<float>(isa, x, ld_x, residual, ld_res, weight, D, eps, out, residual_out, m_begin, m_end);
  else
    norm<uint16_t>(isa, x, ld_x, residual, ld_res, weight, D, eps, out, residual_out, m_begin, m_end);
  return KR_CPU_OK;
}
