// CPU rotary embedding of q and k fused with the KV-cache append. See kr_cpu.h for the contract.
//
// The torch reference takes about twenty small ops a layer (cat, two multiplies, negation, masks, an index_put);
// on two cores their dispatch cost more than a step's attention. Elementwise, so any split and any number of
// tokens give the same bits; each element is computed as torch computes it: x * cos, rotate_half(x) * sin and
// their sum, each rounded to the dtype. The AVX-512 variants do it 16 elements of each half at a time (until
// 2026-12-07 every variant ran the scalar loop: in SmolLM2's bf16 decoding, bench_phases' layers.rope took 0.026 ms a
// plain step and 0.111 / 0.154 ms a 5- / 7-token verification, then 0.014 and 0.058 / 0.078 ms, runs apart).
#include "kr_cpu.h"
#include "kr_cpu_avx512.h"
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

struct Scalar {
  template <typename T>
  KR_INLINE void operator()(const T* x, const T* cos, const T* sin, int64_t D, T* out) const {
    rotate(x, cos, sin, D, out);
  }
};

// Rotate is rotate() or a vector form of it (the same operations per element).
template <typename T, typename Rotate = Scalar>
KR_INLINE void rope_tasks(const kr_cpu_rope_args& a, int64_t task_begin, int64_t task_end, Rotate&& rotate = {}) {
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
// 16 elements of a head from p as fp32 (bf16 widened exactly), the lanes outside mask 0; and their store.
KR_TARGET_AVX512 inline __m512 load_lanes(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
KR_TARGET_AVX512 inline __m512 load_lanes(const uint16_t* p, __mmask16 m) { return kr_cpu::load16_tail(p, m); }
KR_TARGET_AVX512 inline void store_lanes(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
KR_TARGET_AVX512 inline void store_lanes(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(kr_cpu::bf16_bits16(v)));
}

// kr_cpu::round_to<T> on 16 lanes.
template <typename T>
KR_TARGET_AVX512 inline __m512 round_lanes(__m512 v) {
  if constexpr (sizeof(T) == 4) return v;
  return _mm512_castsi512_ps(_mm512_slli_epi32(kr_cpu::bf16_bits16(v), 16));
}

// rotate() 16 elements of each half at a time: element d < D / 2 takes x[d] cos[d] and -x[d + D/2] sin[d], element
// d + D/2 takes x[d + D/2] cos[d + D/2] and x[d] sin[d + D/2], each product rounded to T and their sum too, as there.
struct Avx512 {
  template <typename T>
  KR_TARGET_AVX512 void operator()(const T* x, const T* cos, const T* sin, int64_t D, T* out) const {
    const int64_t half = D / 2;
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    for (int64_t i = 0; i < half; i += 16) {
      const __mmask16 m = half - i >= 16 ? static_cast<__mmask16>(0xffff)
                                         : static_cast<__mmask16>((1u << (half - i)) - 1u);
      const __m512 x0 = load_lanes(x + i, m), x1 = load_lanes(x + half + i, m);
      const __m512 neg_x1 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x1), sign));
      const __m512 a0 = round_lanes<T>(_mm512_mul_ps(x0, load_lanes(cos + i, m)));
      const __m512 b0 = round_lanes<T>(_mm512_mul_ps(neg_x1, load_lanes(sin + i, m)));
      const __m512 a1 = round_lanes<T>(_mm512_mul_ps(x1, load_lanes(cos + half + i, m)));
      const __m512 b1 = round_lanes<T>(_mm512_mul_ps(x0, load_lanes(sin + half + i, m)));
      store_lanes(out + i, _mm512_add_ps(a0, b0), m);
      store_lanes(out + half + i, _mm512_add_ps(a1, b1), m);
    }
  }
};

template <typename T>
KR_TARGET_AVX512 void rope_avx512(const kr_cpu_rope_args& a, int64_t t0, int64_t t1) {
  rope_tasks<T>(a, t0, t1, Avx512{});
}

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
