// CPU rotary embedding of q and k fused with the KV-cache append. See kr_cpu.h for the contract.
//
// The torch reference takes about twenty small ops a layer (cat, two multiplies, negation, masks, an index_put);
// on two cores their dispatch cost more than a step's attention. Elementwise, so any split and any number of
// tokens give the same bits; each element is computed as torch computes it: x * cos, rotate_half(x) * sin and
// their sum, each rounded to the dtype.
#include "kr_cpu.h"
#include "kr_cpu_common.h"

namespace {

template <typename T>
KR_INLINE void rotate(const T* x, const T* cos, const T* sin, int64_t D, T* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float xv = kr_cpu::to_float(x[d]);
    const float rot = d < half ? -kr_cpu::to_float(x[d + half]) : kr_cpu::to_float(x[d - half]);
    const float a = kr_cpu::round_to<T>(xv * kr_cpu::to_float(cos[d]));
    const float b = kr_cpu::round_to<T>(rot * kr_cpu::to_float(sin[d]));
    out[d] = kr_cpu::from_float<T>(a + b);
  }
}

template <typename T>
KR_INLINE void rope_tasks(const kr_cpu_rope_args& a, int64_t task_begin, int64_t task_end) {
  const int64_t D = a.head_dim;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* k_cache = static_cast<T*>(a.k_cache);
  T* v_cache = static_cast<T*>(a.v_cache);
  T* q_out = static_cast<T*>(a.q_out);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / a.q_len, i = task % a.q_len;
    const T* cos = static_cast<const T*>(a.cos) + task * D;
    const T* sin = static_cast<const T*>(a.sin) + task * D;
    for (int64_t h = 0; h < a.n_heads; ++h)
      rotate(q + b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2], cos, sin, D,
             q_out + ((b * a.n_heads + h) * a.q_len + i) * D);
    const int64_t p = a.positions[b * a.pos_stride[0] + i * a.pos_stride[1]];
    if (p < 0 || p >= a.max_len) continue;
    const int64_t row = a.cache_rows != nullptr ? a.cache_rows[b] : b;
    for (int64_t h = 0; h < a.n_kv_heads; ++h) {
      const int64_t slot = row * a.cache_stride[0] + h * a.cache_stride[1] + p * a.cache_stride[2];
      rotate(k + b * a.k_stride[0] + h * a.k_stride[1] + i * a.k_stride[2], cos, sin, D, k_cache + slot);
      const T* vr = v + b * a.v_stride[0] + h * a.v_stride[1] + i * a.v_stride[2];
      for (int64_t d = 0; d < D; ++d) v_cache[slot + d] = vr[d];
    }
  }
}

template <typename T>
void rope_portable(const kr_cpu_rope_args& a, int64_t t0, int64_t t1) { rope_tasks<T>(a, t0, t1); }

#if KR_CPU_X86
template <typename T>
KR_TARGET_AVX512 void rope_avx512(const kr_cpu_rope_args& a, int64_t t0, int64_t t1) { rope_tasks<T>(a, t0, t1); }

template <typename T>
KR_TARGET_AVX2 void rope_avx2(const kr_cpu_rope_args& a, int64_t t0, int64_t t1) { rope_tasks<T>(a, t0, t1); }
#endif

template <typename T>
void rope(int isa, const kr_cpu_rope_args& a, int64_t t0, int64_t t1) {
  switch (isa) {
#if KR_CPU_X86
    case KR_CPU_ISA_AVX512_BF16:  // only the bf16 x bf16 linear uses the bf16 dot product
    case KR_CPU_ISA_AVX512: rope_avx512<T>(a, t0, t1); return;
    case KR_CPU_ISA_AVX2: rope_avx2<T>(a, t0, t1); return;
#endif
    default: rope_portable<T>(a, t0, t1); return;
  }
}

}  // namespace

extern "C" int kr_cpu_rope_cache_append(int isa, const kr_cpu_rope_args* a, int64_t task_begin, int64_t task_end) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (a == nullptr || a->batch < 0 || a->n_heads <= 0 || a->n_kv_heads <= 0 || a->q_len < 0 || a->head_dim <= 0 ||
      a->head_dim % 2 != 0 || a->max_len < 0 || task_begin < 0 || task_end < task_begin ||
      task_end > a->batch * a->q_len || (a->dtype != KR_CPU_FLOAT32 && a->dtype != KR_CPU_BFLOAT16))
    return KR_CPU_BAD_ARGUMENT;
  if (task_begin == task_end) return KR_CPU_OK;
  if (a->q == nullptr || a->k == nullptr || a->v == nullptr || a->cos == nullptr || a->sin == nullptr ||
      a->positions == nullptr || a->k_cache == nullptr || a->v_cache == nullptr || a->q_out == nullptr)
    return KR_CPU_BAD_ARGUMENT;
  if (a->dtype == KR_CPU_FLOAT32)
    rope<float>(isa, *a, task_begin, task_end);
  else
    rope<uint16_t>(isa, *a, task_begin, task_end);
  return KR_CPU_OK;
}
