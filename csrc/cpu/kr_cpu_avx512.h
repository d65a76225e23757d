// AVX-512 pieces shared by the CPU kernels of csrc/cpu/ (internal: not part of the C ABI of kr_cpu.h): the
// intrinsics header, the bf16 pairs that AVX512-BF16's vdpbf16ps multiplies, with their emulation, and the fixed exp.
#pragma once

#include "kr_cpu_common.h"

#if KR_CPU_X86
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
// GCC 12 warns that the _mm*_undefined_*() placeholders inside its own AVX-512 intrinsics are uninitialized
// (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace kr_cpu {

// The odd (high) and the even (low) bf16 of each 32-bit pair of v, widened to fp32 (exact).
KR_TARGET_AVX512 inline __m512 bf16_odd(__m512i v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
KR_TARGET_AVX512 inline __m512 bf16_even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }

// acc plus the pairs of a and b in vdpbf16ps's order: per lane the odd product, then the even one, each a fused
// multiply-add. kHw: the instruction itself; otherwise two fused multiply-adds, which give its bits under the
// caller's DAZ + FTZ (FlushDenormals). kHw = false never reaches an AVX512-BF16 instruction (the target attribute
// is shared so that one template serves both).
template <bool kHw>
KR_TARGET_AVX512_BF16 inline __m512 dp_pairs(__m512 acc, __m512i a, __m512i b) {
  if constexpr (kHw) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  } else {
    acc = _mm512_fmadd_ps(bf16_odd(a), bf16_odd(b), acc);
    return _mm512_fmadd_ps(bf16_even(a), bf16_even(b), acc);
  }
}

// 16 elements from p as fp32 (bf16 widened exactly), the lanes outside mask 0.
KR_TARGET_AVX512 inline __m512 load16_tail(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
KR_TARGET_AVX512 inline __m512 load16_tail(const uint16_t* p, __mmask16 mask) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// kr_cpu::float_to_bf16_bits on 16 lanes: round to nearest even, NaN -> 0x7fc0; the bits in the low half of each
// 32-bit lane.
KR_TARGET_AVX512 inline __m512i bf16_bits16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
}

// kr_cpu::exp_nonpositive on 16 lanes, operation for operation.
KR_TARGET_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // a NaN x stays NaN, as in the scalar select
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic), magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // x - n c in one rounding: fma(-n, c, x)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-06f), r);
  __m512 p = _mm512_set1_ps(1.98412698412698413e-04f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.38888888888888889e-03f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.33333333333333333e-03f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.16666666666666667e-02f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.66666666666666667e-01f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

}  // namespace kr_cpu
#endif
