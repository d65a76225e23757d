// Helpers shared by the CPU kernels of csrc/cpu/ (internal: not part of the C ABI of kr_cpu.h).
//
// Element types: fp32, or bf16 passed as its uint16 bits. Widening bf16 to fp32 is exact; narrowing rounds to
// nearest even, as torch does, so a kernel that computes in fp32 and stores bf16 rounds once, where torch would.
//
// Fixed reduction orders: a reduction over n terms is computed as if on 16 fp32 lanes (lane l takes the terms
// l, l + 16, ... in increasing order, zero-padded at the end), then summed by the tree of tree16. The kernels
// written with these helpers multiply and add, and fuse a multiply-add only where the source says so (std::fma;
// never a contracted a * b + c: the build passes -ffp-contract=off), so the compiler may vectorize them at any
// width and the bits stay those of the source.
#pragma once

#include <stdint.h>

#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define KR_CPU_X86 1
#define KR_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define KR_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define KR_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))
#else
#define KR_CPU_X86 0
#endif

#define KR_INLINE inline __attribute__((always_inline))

namespace kr_cpu {

constexpr int kLanes = 16;  // the virtual vector width that fixes every reduction order

KR_INLINE float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A denormal fp32 value as the zero of its sign (what DAZ does to an input and FTZ to a result); others as they are.
KR_INLINE float flush_denormal(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// Round to nearest even; NaN -> the canonical quiet NaN (as c10::BFloat16).
KR_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

KR_INLINE float to_float(float v) { return v; }
KR_INLINE float to_float(uint16_t v) { return bf16_bits_to_float(v); }

template <typename T>
KR_INLINE T from_float(float v);
template <>
KR_INLINE float from_float<float>(float v) { return v; }
template <>
KR_INLINE uint16_t from_float<uint16_t>(float v) { return float_to_bf16_bits(v); }

// The value an element of type T holds after a float result is stored in it (fp32: itself; bf16: rounded).
template <typename T>
KR_INLINE float round_to(float v) { return to_float(from_float<T>(v)); }

// fma(a, b, c) as x86 computes it with denormals flushed (DAZ on the inputs, FTZ on the result), on any platform.
// x86's FTZ judges a result tiny after rounding it to 24 bits as if the exponent were unbounded, so an exact result
// just below 2^-126 that rounds up to 2^-126 in fp32 (denormals on) can still be tiny there and flush: the scaled
// recomputation decides those (scaling by 2^24 is exact here: a result near 2^-126 from bf16 products and a
// flushed accumulator has operands far from overflow).
KR_INLINE float fma_ftz(float a, float b, float c) {
  a = flush_denormal(a);
  b = flush_denormal(b);
  c = flush_denormal(c);
  const float r = std::fma(a, b, c);
  if (std::fabs(r) == 0x1p-126f) {
    const float scaled = std::fma(a * 0x1p24f, b, c * 0x1p24f);
    if (std::fabs(scaled) < 0x1p-102f) return std::copysign(0.0f, scaled);
  }
  return flush_denormal(r);
}

// The fixed 16 -> 1 summation tree.
KR_INLINE float tree16(const float* a) {
  float s8[8], s4[4];
  for (int i = 0; i < 8; ++i) s8[i] = a[i] + a[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  const float s2a = s4[0] + s4[2], s2b = s4[1] + s4[3];
  return s2a + s2b;
}

// sum_k a[k] * b[k] over k < n in the fixed order, each term one fused multiply-add into its lane (std::fma:
// one rounding, whatever the instruction set), a already fp32 and zero-padded to a multiple of 16.
template <typename T>
KR_INLINE float dot_fixed(const float* a, const T* b, int64_t n) {
  float acc[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t k = 0; k < full; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = std::fma(a[k + l], to_float(b[k + l]), acc[l]);
  if (full < n)
    for (int l = 0; l < kLanes; ++l) acc[l] = full + l < n ? std::fma(a[full + l], to_float(b[full + l]), acc[l])
                                                           : acc[l] + 0.0f;  // a zero-padded lane: fma(0, 0, acc)
  return tree16(acc);
}

// The 16 lanes of sum_k a[k] * b[k] over k < n for bf16 a and b in the order of AVX512-BF16's vdpbf16ps: per chunk of
// 32 k's, lane l takes k = 32c + 2l + 1 and then k = 32c + 2l, each one fused multiply-add with denormals flushed
// (fma_ftz), the last chunk zero-padded.
KR_INLINE void dot_bf16_pairs_lanes(const uint16_t* a, const uint16_t* b, int64_t n, float* acc) {
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
  for (int64_t k = 0; k < n; k += 2 * kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const int64_t even = k + 2 * l, odd = even + 1;
      acc[l] = fma_ftz(odd < n ? to_float(a[odd]) : 0.0f, odd < n ? to_float(b[odd]) : 0.0f, acc[l]);
      acc[l] = fma_ftz(even < n ? to_float(a[even]) : 0.0f, even < n ? to_float(b[even]) : 0.0f, acc[l]);
    }
}

// sum_k a[k] over k < n in the fixed order.
KR_INLINE float sum_fixed(const float* a, int64_t n) {
  float acc[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t k = 0; k < full; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] + a[k + l];
  if (full < n)
    for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] + (full + l < n ? a[full + l] : 0.0f);
  return tree16(acc);
}

// exp(r) and n for x = n ln2 + r, n = round(x / ln2), |r| <= ln2 / 2 (a hair more where the fused rounding of n falls
// the other way), each step one fused multiply-add (std::fma: one rounding at every width, so a loop of it
// vectorizes with the same bits wherever the target has FMA): exp(r) by its degree-7 Taylor polynomial in Horner's
// form (relative error below 1e-8 there). x must lie in [-87, 88.73] (or be NaN). (Until 2026-12-06 the steps were
// separate multiplies and adds: 26 vector operations per 16 lanes where these are 16. The portable variant, built
// without FMA, calls libm's fma: 1.0-1.04x its attention's time on this CPU, which has FMA behind libm's ifunc;
// software-emulated on a CPU without it.)
KR_INLINE float exp_reduced(float x, float* n_out) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float n = std::fma(x, 1.44269504088896341f, magic) - magic;
  float r = std::fma(-n, 0.693145751953125f, x);  // ln2 split in two for an exact n * ln2_hi
  r = std::fma(-n, 1.42860682030941723e-06f, r);
  float p = 1.98412698412698413e-04f;  // 1/7!
  p = std::fma(p, r, 1.38888888888888889e-03f);
  p = std::fma(p, r, 8.33333333333333333e-03f);
  p = std::fma(p, r, 4.16666666666666667e-02f);
  p = std::fma(p, r, 1.66666666666666667e-01f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  *n_out = n;
  return p;
}

// 2^n for an integer-valued n in [-126, 127], built in the exponent bits (a NaN n, from a NaN x, gives 1: the
// polynomial is NaN already).
KR_INLINE float exp2_integer(float n) {
  const int32_t bits = (static_cast<int32_t>(n == n ? n : 0.0f) + 127) * (1 << 23);
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return scale;
}

// exp(x) for x <= 0: exp(r) * 2^n. x below -87 gives exp(-87) (about 1.6e-38), which next to the 1 that a
// softmax's largest term contributes is 0.
KR_INLINE float exp_nonpositive(float x) {
  float n;
  const float p = exp_reduced(x < -87.0f ? -87.0f : x, &n);
  return p * exp2_integer(n);
}

// exp(x) for any x with the same operations: below -87, exp(-87) stands for the underflow; from 88.7228394 (the
// first float above ln(FLT_MAX)) on, +inf, as exp overflows there; 2^n built as 2^(n-1) * 2 when n = 128. Relative
// error below 1e-7 (a few ulp) elsewhere; NaN stays NaN.
KR_INLINE float exp_fixed(float x) {
  constexpr float kOverflow = 88.72283935546875f;
  float n;
  const float p = exp_reduced(x < -87.0f ? -87.0f : (x > kOverflow ? kOverflow : x), &n);
  const float top = n > 127.0f ? 1.0f : 0.0f;
  const float e = (p * exp2_integer(n - top)) * (1.0f + top);
  return x >= kOverflow ? __builtin_inff() : e;
}

#if KR_CPU_X86
// DAZ + FTZ in this thread's MXCSR while alive: every SSE/AVX operation between reads denormal inputs as zero and
// flushes denormal results, as vdpbf16ps always does. The compiler barriers keep the loads and stores of the work
// between them (the arithmetic between depends on those loads and feeds those stores).
struct FlushDenormals {
  unsigned saved;
  FlushDenormals() : saved(__builtin_ia32_stmxcsr()) {
    __builtin_ia32_ldmxcsr(saved | 0x8040u);  // DAZ (bit 6) | FTZ (bit 15)
    asm volatile("" ::: "memory");
  }
  ~FlushDenormals() {
    asm volatile("" ::: "memory");
    __builtin_ia32_ldmxcsr(saved);
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};
#endif

}  // namespace kr_cpu
