// The arithmetic ceiling of the linear kernel (kr_cpu.h, kr_cpu_peak_macs): each thread runs the multiply-add
// instruction the kernel's variant streams its weights through, on 12 independent register accumulators (enough to
// cover the instruction's latency), with no memory operand. A decode step's rows multiply every weight once per
// activation row, so with M rows the kernel cannot beat max(weight bytes / read bandwidth, N * K * M / this rate):
// past a few rows the second bound is the one that holds (benchmarks/bench_linear.py reports both).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <thread>
#include <vector>

#include "kr_cpu.h"
#include "kr_cpu_common.h"

#if KR_CPU_X86
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC bug 105593, as in linear.cpp
#endif
#endif

namespace {

constexpr int kChains = 12;

// Each variant runs `iters` rounds of kChains independent multiply-adds and returns the multiply-adds done. The
// accumulators escape through `sink` (and x through an empty asm each round) so that nothing folds away.
#if KR_CPU_X86
KR_TARGET_AVX512_BF16 int64_t run_dpbf16(int64_t iters, float* sink) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  __m512i x = _mm512_set1_epi16(0x3f80), w = _mm512_set1_epi16(0x3c00);  // bf16 1.0, 0.0078125
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)x, (__m512bh)w);
    asm volatile("" : "+v"(x));
  }
  for (int i = 1; i < kChains; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  *sink = _mm512_reduce_add_ps(acc[0]);
  return iters * kChains * 32;
}

KR_TARGET_AVX512 int64_t run_fma512(int64_t iters, float* sink) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  __m512 x = _mm512_set1_ps(1.0f), w = _mm512_set1_ps(1e-6f);
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(x, w, acc[i]);
    asm volatile("" : "+v"(x));
  }
  for (int i = 1; i < kChains; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  *sink = _mm512_reduce_add_ps(acc[0]);
  return iters * kChains * 16;
}

KR_TARGET_AVX2 int64_t run_fma256(int64_t iters, float* sink) {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i));
  __m256 x = _mm256_set1_ps(1.0f), w = _mm256_set1_ps(1e-6f);
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(x, w, acc[i]);
    asm volatile("" : "+x"(x));
  }
  for (int i = 1; i < kChains; ++i) acc[0] = _mm256_add_ps(acc[0], acc[i]);
  float lanes[8];
  _mm256_storeu_ps(lanes, acc[0]);
  *sink = lanes[0];
  return iters * kChains * 8;
}
#endif

int64_t run_scalar(int64_t iters, float* sink) {
  float acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = static_cast<float>(i);
  volatile float x = 1.0f;
  const float xv = x, w = 1e-6f;
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < kChains; ++i) acc[i] = std::fma(xv, w, acc[i]);
  for (int i = 1; i < kChains; ++i) acc[0] += acc[i];
  *sink = acc[0];
  return iters * kChains;
}

// The instruction the kernel uses for (isa, weight dtype): bf16 weights on AVX512-BF16 take vdpbf16ps (bf16
// activations); otherwise a fused multiply-add of the variant's width (bf16 weights widened to fp32 first, which
// the kernel's inner loop does on top of it).
int64_t run_variant(int isa, int dtype, int64_t iters, float* sink) {
  switch (isa) {
#if KR_CPU_X86
    case KR_CPU_ISA_AVX512_BF16:
      return dtype == KR_CPU_BFLOAT16 ? run_dpbf16(iters, sink) : run_fma512(iters, sink);
    case KR_CPU_ISA_AVX512: return run_fma512(iters, sink);
    case KR_CPU_ISA_AVX2: return run_fma256(iters, sink);
#endif
    default: return run_scalar(iters, sink);
  }
}

}  // namespace

extern "C" double kr_cpu_peak_macs(int isa, int dtype, int64_t threads, int64_t iters) {
  if (!kr_cpu_isa_supported(isa) || (dtype != KR_CPU_FLOAT32 && dtype != KR_CPU_BFLOAT16) || threads < 1 ||
      threads > 1024 || iters < 1)
    return -1.0;
  std::vector<float> sinks(static_cast<size_t>(threads));
  std::vector<int64_t> done(static_cast<size_t>(threads));
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t)
    pool.emplace_back([&, t] { done[t] = run_variant(isa, dtype, iters, &sinks[t]); });
  done[0] = run_variant(isa, dtype, iters, &sinks[0]);
  for (auto& th : pool) th.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  double macs = 0.0;
  for (int64_t d : done) macs += static_cast<double>(d);
  return seconds > 0.0 ? macs / seconds : -1.0;
}
