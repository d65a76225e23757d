// RMSNorm and residual-add + RMSNorm: one block per row, fp32 reduction (kangaroo_rt.reference.rms_norm).
#include "kangaroo_rt.h"
#include "kr_device.h"

namespace {

template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ residual,
                                int64_t residual_stride, T* __restrict__ new_residual, int64_t new_residual_stride,
                                const T* __restrict__ weight, T* __restrict__ out, int64_t out_stride,
                                int64_t n_cols, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * x_stride;
  float sum_sq = 0.0f;
  for (int64_t c = threadIdx.x; c < n_cols; c += blockDim.x) {
    T v = xr[c];
    if (residual != nullptr) {
      // The sum is rounded to the element type first, as torch's x + residual is.
      v = kr::from_float<T>(kr::to_float(v) + kr::to_float(residual[row * residual_stride + c]));
      new_residual[row * new_residual_stride + c] = v;
    }
    const float f = kr::to_float(v);
    sum_sq += f * f;
  }
  const float rstd = rsqrtf(kr::block_sum(sum_sq) / static_cast<float>(n_cols) + eps);
  const T* src = residual != nullptr ? new_residual + row * new_residual_stride : xr;
  for (int64_t c = threadIdx.x; c < n_cols; c += blockDim.x) {
    const T normed = kr::from_float<T>(kr::to_float(src[c]) * rstd);
    out[row * out_stride + c] = kr::from_float<T>(kr::to_float(weight[c]) * kr::to_float(normed));
  }
}

}  // namespace

extern "C" cudaError_t kr_rms_norm(const void* x, int64_t x_row_stride, const void* residual,
                                   int64_t residual_row_stride, void* new_residual, int64_t new_residual_row_stride,
                                   const void* weight, void* out, int64_t out_row_stride, int64_t n_rows,
                                   int64_t n_cols, float eps, int dtype, cudaStream_t stream) {
  if (n_rows <= 0 || n_cols <= 0) return cudaSuccess;
  if (n_rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (residual != nullptr && new_residual == nullptr) return cudaErrorInvalidValue;
  int threads = 32;
  while (threads < 1024 && threads < n_cols) threads <<= 1;
  KR_DISPATCH_DTYPE(dtype, T,
                    rms_norm_kernel<T><<<static_cast<unsigned>(n_rows), threads, 0, stream>>>(
                        static_cast<const T*>(x), x_row_stride, static_cast<const T*>(residual),
                        residual_row_stride, static_cast<T*>(new_residual), new_residual_row_stride,
                        static_cast<const T*>(weight), static_cast<T*>(out), out_row_stride, n_cols, eps));
  return cudaGetLastError();
}
