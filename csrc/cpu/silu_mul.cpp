// CPU SwiGLU activation of the decode path: out = silu(gate) * up. See kr_cpu.h for the contract.
//
// torch's silu rounds through its own exp (SLEEF's on vectors, libm's on a loop's scalar tail, which a row's
// elements land in or not with the row count), so the layer stack (decoder.cpp), which must give the per-op
// path's bits without calling torch, has its own: exp by kr_cpu::exp_fixed, then the roundings torch makes
// (silu rounded to the dtype, then the product rounded). Elementwise: any split, any row count, the same bits.
#include "kr_cpu.h"
#include "kr_cpu_common.h"

namespace {

template <typename T>
KR_INLINE void silu_mul_rows(const T* gate, int64_t ld_gate, const T* up, int64_t ld_up, int64_t n, T* out,
                             int64_t ld_out, int64_t m_begin, int64_t m_end) {
  for (int64_t m = m_begin; m < m_end; ++m) {
    const T* g = gate + m * ld_gate;
    const T* u = up + m * ld_up;
    T* o = out + m * ld_out;
    for (int64_t j = 0; j < n; ++j) {
      const float x = kr_cpu::to_float(g[j]);
      const float silu = kr_cpu::round_to<T>(x / (1.0f + kr_cpu::exp_fixed(-x)));
      o[j] = kr_cpu::from_float<T>(silu * kr_cpu::to_float(u[j]));
    }
  }
}

template <typename T>
void silu_mul_portable(const T* g, int64_t lg, const T* u, int64_t lu, int64_t n, T* o, int64_t lo, int64_t m0,
                       int64_t m1) {
  silu_mul_rows<T>(g, lg, u, lu, n, o, lo, m0, m1);
}

#if KR_CPU_X86
template <typename T>
KR_TARGET_AVX512 void silu_mul_avx512(const T* g, int64_t lg, const T* u, int64_t lu, int64_t n, T* o, int64_t lo,
                                      int64_t m0, int64_t m1) {
  silu_mul_rows<T>(g, lg, u, lu, n, o, lo, m0, m1);
}

template <typename T>
KR_TARGET_AVX2 void silu_mul_avx2(const T* g, int64_t lg, const T* u, int64_t lu, int64_t n, T* o, int64_t lo,
                                  int64_t m0, int64_t m1) {
  silu_mul_rows<T>(g, lg, u, lu, n, o, lo, m0, m1);
}
#endif

template <typename T>
void silu_mul(int isa, const void* g, int64_t lg, const void* u, int64_t lu, int64_t n, void* o, int64_t lo,
              int64_t m0, int64_t m1) {
  const T* gt = static_cast<const T*>(g);
  const T* ut = static_cast<const T*>(u);
  T* ot = static_cast<T*>(o);
  switch (isa) {
#if KR_CPU_X86
    case KR_CPU_ISA_AVX512_BF16:  // only the bf16 x bf16 linear uses the bf16 dot product
    case KR_CPU_ISA_AVX512: silu_mul_avx512<T>(gt, lg, ut, lu, n, ot, lo, m0, m1); return;
    case KR_CPU_ISA_AVX2: silu_mul_avx2<T>(gt, lg, ut, lu, n, ot, lo, m0, m1); return;
#endif
    default: silu_mul_portable<T>(gt, lg, ut, lu, n, ot, lo, m0, m1); return;
  }
}

}  // namespace

extern "C" int kr_cpu_silu_mul_rows(int isa, int dtype, const void* gate, int64_t ld_gate, const void* up,
                                    int64_t ld_up, int64_t n, void* out, int64_t ld_out, int64_t m_begin,
                                    int64_t m_end) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (n < 0 || m_begin < 0 || m_end < m_begin || (dtype != KR_CPU_FLOAT32 && dtype != KR_CPU_BFLOAT16))
    return KR_CPU_BAD_ARGUMENT;
  if (m_begin == m_end || n == 0) return KR_CPU_OK;
  if (gate == nullptr || up == nullptr || out == nullptr) return KR_CPU_BAD_ARGUMENT;
  if (dtype == KR_CPU_FLOAT32)
    silu_mul<float>(isa, gate, ld_gate, up, ld_up, n, out, ld_out, m_begin, m_end);
  else
    silu_mul<uint16_t>(isa, gate, ld_gate, up, ld_up, n, out, ld_out, m_begin, m_end);
  return KR_CPU_OK;
}
