// RoPE on q and k fused with the KV-cache append at per-row positions (kangaroo_rt.reference.rope_cache_append).
// One block per (row, token); threads walk (head, d < D/2) pairs of every q and kv head of that token.
#include "kangaroo_rt.h"
#include "kr_device.h"

namespace {

template <typename T>
__global__ void rope_cache_append_kernel(kr_rope_args a) {
  const int64_t b = blockIdx.x / a.q_len, t = blockIdx.x % a.q_len;
  const int64_t half = a.head_dim / 2;
  const T* cos = static_cast<const T*>(a.cos) + b * a.scos[0] + t * a.scos[1];
  const T* sin = static_cast<const T*>(a.sin) + b * a.ssin[0] + t * a.ssin[1];
  const int64_t p = a.positions[b * a.spos[0] + t * a.spos[1]];
  const bool p_ok = p >= 0 && p < a.max_len;
  const int64_t n_pairs = (a.n_q_heads + a.n_kv_heads) * half;
  for (int64_t i = threadIdx.x; i < n_pairs; i += blockDim.x) {
    const int64_t h = i / half, d = i % half;
    const float c1 = kr::to_float(cos[d * a.scos[2]]), c2 = kr::to_float(cos[(d + half) * a.scos[2]]);
    const float s1 = kr::to_float(sin[d * a.ssin[2]]), s2 = kr::to_float(sin[(d + half) * a.ssin[2]]);
    if (h < a.n_q_heads) {
      const T* src = static_cast<const T*>(a.q) + b * a.sq[0] + h * a.sq[1] + t * a.sq[2];
      const float x1 = kr::to_float(src[d * a.sq[3]]), x2 = kr::to_float(src[(d + half) * a.sq[3]]);
      T* dst = static_cast<T*>(a.q_out) + ((b * a.n_q_heads + h) * a.q_len + t) * a.head_dim;
      dst[d] = kr::from_float<T>(x1 * c1 - x2 * s1);
      dst[d + half] = kr::from_float<T>(x2 * c2 + x1 * s2);
    } else if (p_ok) {
      const int64_t hk = h - a.n_q_heads;
      const T* src = static_cast<const T*>(a.k) + b * a.sk[0] + hk * a.sk[1] + t * a.sk[2];
      const float x1 = kr::to_float(src[d * a.sk[3]]), x2 = kr::to_float(src[(d + half) * a.sk[3]]);
      T* kc = static_cast<T*>(a.k_cache) + b * a.skc[0] + hk * a.skc[1] + p * a.skc[2];
      kc[d * a.skc[3]] = kr::from_float<T>(x1 * c1 - x2 * s1);
      kc[(d + half) * a.skc[3]] = kr::from_float<T>(x2 * c2 + x1 * s2);
      const T* vs = static_cast<const T*>(a.v) + b * a.sv[0] + hk * a.sv[1] + t * a.sv[2];
      T* vc = static_cast<T*>(a.v_cache) + b * a.svc[0] + hk * a.svc[1] + p * a.svc[2];
      vc[d * a.svc[3]] = vs[d * a.sv[3]];
      vc[(d + half) * a.svc[3]] = vs[(d + half) * a.sv[3]];
    }
  }
}

}  // namespace

extern "C" cudaError_t kr_rope_cache_append(const kr_rope_args* args, int dtype, cudaStream_t stream) {
  const kr_rope_args a = *args;
  if (a.batch * a.q_len == 0) return cudaSuccess;
  if (a.head_dim < 2 || a.head_dim % 2 != 0 || a.batch * a.q_len > 0x7fffffffLL) return cudaErrorInvalidValue;
  const int64_t pairs = (a.n_q_heads + a.n_kv_heads) * (a.head_dim / 2);
  int threads = 32;
  while (threads < 256 && threads < pairs) threads <<= 1;
  const unsigned blocks = static_cast<unsigned>(a.batch * a.q_len);
  KR_DISPATCH_DTYPE(dtype, T, rope_cache_append_kernel<T><<<blocks, threads, 0, stream>>>(a));
  return cudaGetLastError();
}
