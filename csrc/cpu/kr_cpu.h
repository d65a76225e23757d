// CPU kernels of kangaroo_rt: plain C signatures (raw pointers, strides in elements), no ATen, no pybind11,
// so that csrc/cpu/*.cpp compile in seconds; csrc/cpu_bindings.cpp wraps them for torch as kangaroo_rt._cpu.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Weight element types (the codes of kr_dtype in csrc/kangaroo_rt.h). bf16 is passed as its uint16 bits.
enum kr_cpu_dtype { KR_CPU_FLOAT32 = 0, KR_CPU_BFLOAT16 = 2 };

// Instruction-set variants of the kernels, lowest first. All of them compute the same bits (see linear.cpp).
enum kr_cpu_isa_code { KR_CPU_ISA_INVALID = -1, KR_CPU_ISA_PORTABLE = 0, KR_CPU_ISA_AVX2 = 1, KR_CPU_ISA_AVX512 = 2 };

// Return codes.
enum kr_cpu_status { KR_CPU_OK = 0, KR_CPU_BAD_ARGUMENT = 1, KR_CPU_BAD_ISA = 2 };

// Output rows per block: a caller that splits [0, N) over threads should cut it at multiples of this, so that
// every thread runs whole register blocks (any split gives the same bits; this one is just the fastest).
#define KR_CPU_ROW_BLOCK 16

// Activation rows per pass over the weights: more rows are processed in passes of at most this many.
#define KR_CPU_MAX_ROWS_PER_PASS 64

// The variant this process uses: the best this CPU runs, or the lower one KANGAROO_RT_CPU_ISA=avx512|avx2|portable
// names. Chosen at the first call and fixed for the process. KR_CPU_ISA_INVALID when KANGAROO_RT_CPU_ISA is not
// a variant's name or names one this CPU cannot run; kr_cpu_isa_error() then says which.
int kr_cpu_isa(void);

// "" when kr_cpu_isa() is valid, otherwise why not (a static string).
const char* kr_cpu_isa_error(void);

// "avx512", "avx2", "portable", or "invalid" for any other code.
const char* kr_cpu_isa_name(int isa);

// Whether this CPU (and its operating system) runs the variant.
int kr_cpu_isa_supported(int isa);

// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for m < M and n_begin <= n < n_end, in fp32, with the variant
// of kr_cpu_isa().
//   x: (M, K) fp32, row stride ldx (>= K when M > 1), unit column stride
//   w: (N, K) row-major contiguous, fp32 or bf16 bits (w_dtype, a kr_cpu_dtype)
//   bias: (N,) fp32 or NULL
//   y: (M, N) fp32, row stride ldy; only columns [n_begin, n_end) are written
// Every weight byte in [n_begin, n_end) is read from memory once per pass of at most KR_CPU_MAX_ROWS_PER_PASS
// rows. Each y[m, n] is produced by one fixed sequence of operations that depends on K only: not on M, on m,
// on [n_begin, n_end) nor on the variant. Returns a kr_cpu_status.
int kr_cpu_linear_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const void* w, int w_dtype, int64_t N,
                       const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end);

// The same with a given variant (tests, benchmarks); KR_CPU_BAD_ISA when this CPU cannot run it.
int kr_cpu_linear_rows_isa(int isa, const float* x, int64_t M, int64_t K, int64_t ldx, const void* w, int w_dtype,
                           int64_t N, const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end);

#ifdef __cplusplus
}
#endif
