// kangaroo_rt._cpu: pybind11/torch glue over the raw-pointer CPU kernels of csrc/cpu/ (see cpu/kr_cpu.h).
// kangaroo_rt/_cpu_ext.py routes the inputs these functions refuse to the torch reference. The one-call paths (layer
// stack, draft chain, target pass, greedy decode) are in cpu_bindings_decode.cpp, the helpers both use in
// cpu_bindings.hpp.
#include <climits>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <utility>
#include <string>
#include <vector>

#include "cpu/kr_cpu.h"
#include "cpu_bindings.hpp"

namespace {

using namespace kr_bind;

// Below this many weight bytes per thread, splitting a call over threads costs more than it saves.
constexpr int64_t kMinWeightBytesPerTask = 64 * 1024;

int isa_by_name(const std::string& name) {
  for (int isa : {KR_CPU_ISA_AVX512_BF16, KR_CPU_ISA_AVX512, KR_CPU_ISA_AVX2, KR_CPU_ISA_PORTABLE}) {
    if (name == kr_cpu_isa_name(isa)) {
      TORCH_CHECK_VALUE(kr_cpu_isa_supported(isa), "kangaroo_rt._cpu: this CPU cannot run the ", name, " variant");
      return isa;
    }
  }
  TORCH_CHECK_VALUE(false, "kangaroo_rt._cpu: unknown variant ", name, " (avx512_bf16, avx512, avx2, portable)");
  return KR_CPU_ISA_INVALID;
}

// x: (..., K) fp32 or bf16; weight: (N, K) fp32 or bf16, contiguous; bias: (N,) fp32 or bf16 -> (..., N) in x's
// dtype. bf16 activations with bf16 weights take kr_cpu_linear_rows_bf16 (vdpbf16ps's order); bf16 activations
// with fp32 weights are widened to fp32 (exact). The fp32 result is rounded to bf16 at the end, as torch's bf16
// linear does. Rows are independent: any number of them, computed in passes of at most
// KR_CPU_MAX_ROWS_PER_PASS, gives each row the bits it has alone. packed: a bf16 weight in kr_cpu_pack_bf16's
// layout ((N, K) for an even K, (N, K + 1) for an odd one), with bf16 x: the same bits as the row-major weight.
at::Tensor linear_with(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int isa,
                       bool packed) {
  const char* what = "kangaroo_rt._cpu.linear";
  TORCH_CHECK_VALUE(x.layout() == at::kStrided && weight.layout() == at::kStrided, what,
                    ": x and weight must be dense (strided) tensors");
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), what, ": x and weight must be CPU tensors, got ",
                    x.device(), " and ", weight.device());
  TORCH_CHECK_TYPE(kernel_dtype(x.scalar_type()), what, ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(kernel_dtype(weight.scalar_type()), what, ": weight must be float32 or bfloat16, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, what, ": weight must be (N, K), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(!packed || (x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16), what,
                    ": a packed weight takes bf16 x and a bf16 weight, got ", x.scalar_type(), " and ",
                    weight.scalar_type());
  const int64_t N = weight.size(0), K = packed && x.dim() >= 1 ? x.size(-1) : weight.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K && weight.size(1) == (packed ? K + K % 2 : K), what,
                    ": x must be (..., K) with K = weight.shape[1] = ", weight.size(1),
                    packed ? " (a packed weight: K rounded up to even)" : "", ", got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.is_contiguous(), what, ": weight must be contiguous (row-major (N, K), as nn.Linear ",
                    "stores it), got strides ", weight.strides());
  const at::Tensor bias_f = bias_as_float(bias, N, what);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  int64_t M = 1;
  for (int64_t d : out_shape) M *= d;
  out_shape.push_back(N);
  const bool pairs = x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16;
  at::Tensor x2 = x.reshape({M, K});
  if (!pairs && x2.scalar_type() != at::kFloat) x2 = x2.to(at::kFloat);
  if (M > 0 && K > 0 && (x2.stride(1) != 1 || (M > 1 && x2.stride(0) < K))) x2 = x2.contiguous();
  const int64_t ldx = M > 1 ? x2.stride(0) : K;
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  // bf16 activations: each task rounds the rows it computed into out itself (no second pass over y afterwards).
  const bool round_out = x.scalar_type() != at::kFloat;
  at::Tensor out = round_out ? at::empty({M, N}, x.options()) : y;

  if (M > 0 && N > 0) {
    const void* xp = x2.const_data_ptr();
    const void* wp = weight.const_data_ptr();
    const float* bp = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
    float* yp = y.mutable_data_ptr<float>();
    uint16_t* op = round_out ? static_cast<uint16_t*>(out.mutable_data_ptr()) : nullptr;
    const int w_dtype = weight_dtype_code(weight.scalar_type());
    const int64_t row_bytes = K * static_cast<int64_t>(weight.element_size());
    const int64_t block_bytes = std::max<int64_t>(1, KR_CPU_ROW_BLOCK * row_bytes);
    const int64_t n_blocks = (N + KR_CPU_ROW_BLOCK - 1) / KR_CPU_ROW_BLOCK;
    const int64_t grain = std::max<int64_t>(1, kMinWeightBytesPerTask / block_bytes);
    // Each task takes a contiguous run of whole row blocks; a row's bits do not depend on the split.
    at::parallel_for(0, n_blocks, grain, [&](int64_t b0, int64_t b1) {
      const int64_t n_begin = b0 * KR_CPU_ROW_BLOCK, n_end = std::min(N, b1 * KR_CPU_ROW_BLOCK);
      const int rc =
          packed ? kr_cpu_linear_rows_bf16_packed(isa, static_cast<const uint16_t*>(xp), M, K, ldx,
                                                  static_cast<const uint16_t*>(wp), N, bp, yp, N, n_begin, n_end)
          : pairs ? kr_cpu_linear_rows_bf16(isa, static_cast<const uint16_t*>(xp), M, K, ldx,
                                          static_cast<const uint16_t*>(wp), N, bp, yp, N, n_begin, n_end)
                : kr_cpu_linear_rows_isa(isa, static_cast<const float*>(xp), M, K, ldx, wp, w_dtype, N, bp, yp, N,
                                         n_begin, n_end);
      TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
      for (int64_t m = 0; round_out && m < M; ++m)
        TORCH_CHECK(kr_cpu_round_bf16(isa, yp + m * N + n_begin, op + m * N + n_begin, n_end - n_begin) == KR_CPU_OK,
                    what, ": rounding to bf16 failed");
    });
  }
  return out.view(out_shape);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool packed) {
  return linear_with(x, weight, bias, process_isa(), packed);
}

at::Tensor linear_with_isa(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const std::string& isa, bool packed) {
  return linear_with(x, weight, bias, isa_by_name(isa), packed);
}

// weight (N, K) bf16 -> kr_cpu_pack_bf16's layout of it, an (N, K + K % 2) bf16 tensor (into out when given).
at::Tensor pack_bf16(const at::Tensor& weight, c10::optional<at::Tensor> out) {
  const char* what = "kangaroo_rt._cpu.pack_bf16";
  TORCH_CHECK_VALUE(weight.device().is_cpu() && weight.layout() == at::kStrided && weight.dim() == 2, what,
                    ": weight must be a dense 2-d CPU tensor, got ", weight.sizes(), " on ", weight.device());
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kBFloat16, what, ": weight must be bfloat16, got ", weight.scalar_type());
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor packed = out.has_value() ? *out : at::empty({N, K + K % 2}, w.options());
  TORCH_CHECK_VALUE(packed.device().is_cpu() && packed.scalar_type() == at::kBFloat16 && packed.dim() == 2 &&
                        packed.size(0) == N && packed.size(1) == K + K % 2 && packed.is_contiguous(),
                    what, ": out must be a contiguous bfloat16 (", N, ", ", K + K % 2, ") CPU tensor, got ",
                    packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK_VALUE(!packed.is_same(w) && packed.data_ptr() != w.data_ptr(), what, ": out must not be the weight");
  if (N > 0 && K > 0) {
    const uint16_t* src = static_cast<const uint16_t*>(w.const_data_ptr());
    uint16_t* dst = static_cast<uint16_t*>(packed.mutable_data_ptr());
    const int64_t Kp = K + K % 2, panels = (N + KR_CPU_PACK_ROWS - 1) / KR_CPU_PACK_ROWS;
    // a run of whole panels is a packed matrix of its own, so the threads take runs of them
    at::parallel_for(0, panels, std::max<int64_t>(1, (int64_t{1} << 20) / (KR_CPU_PACK_ROWS * Kp * 2)),
                     [&](int64_t b0, int64_t b1) {
                       const int64_t n0 = b0 * KR_CPU_PACK_ROWS, n1 = std::min(N, b1 * KR_CPU_PACK_ROWS);
                       kr_cpu_pack_bf16(src + n0 * K, n1 - n0, K, dst + n0 * Kp);
                     });
  }
  return packed;
}

// ---- The other ops of a decode layer (csrc/cpu/{rms_norm,rope_cache_append,attention}.cpp).

// Below this many multiply-adds per thread, a parallel region costs more than it saves.
constexpr int64_t kMinWorkPerTask = 32 * 1024;

int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, work_per_task));
}

// A (..., D) tensor as rows of unit column stride: (pointer owner, row stride).
std::pair<at::Tensor, int64_t> as_rows(const at::Tensor& t, int64_t D) {
  at::Tensor r = t.reshape({-1, D});
  if (r.size(0) > 0 && (r.stride(1) != 1 || (r.size(0) > 1 && r.stride(0) < D))) r = r.contiguous();
  return {r, r.size(0) > 1 ? r.stride(0) : D};
}

void run_rms_norm(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, double eps,
                  at::Tensor& out, at::Tensor* residual_out, const char* what) {
  const int dtype = dtype_code(x, what, "x");
  check_like(x, x, what, "x");
  check_like(weight, x, what, "weight");
  const int64_t D = weight.numel();
  TORCH_CHECK_VALUE(weight.dim() == 1 && D > 0 && x.dim() >= 1 && x.size(-1) == D, what,
                    ": x must be (..., D) and weight (D,), got ", x.sizes(), " and ", weight.sizes());
  const std::pair<at::Tensor, int64_t> x_rows = as_rows(x, D);
  const at::Tensor& xr = x_rows.first;
  const int64_t ld_x = x_rows.second;
  at::Tensor w = weight.contiguous();
  at::Tensor rr;
  int64_t ld_res = D;
  if (residual != nullptr) {
    check_like(*residual, x, what, "residual");
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), what, ": residual must have x's shape ", x.sizes(), ", got ",
                      residual->sizes());
    std::tie(rr, ld_res) = as_rows(*residual, D);
  }
  const int64_t M = xr.size(0);
  out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (residual_out != nullptr) *residual_out = at::empty_like(out);
  const int isa = process_isa();
  const void* xp = xr.const_data_ptr();
  const void* rp = residual != nullptr ? rr.const_data_ptr() : nullptr;
  void* rop = residual_out != nullptr ? residual_out->mutable_data_ptr() : nullptr;
  void* op = out.mutable_data_ptr();
  const void* wp = w.const_data_ptr();
  at::parallel_for(0, M, grain_for(D), [&](int64_t m0, int64_t m1) {
    const int rc = kr_cpu_rms_norm_rows(isa, dtype, xp, ld_x, rp, ld_res, wp, D, static_cast<float>(eps), op, rop,
                                        m0, m1);
    TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
  });
}

// x: (..., D), weight: (D,), one dtype (fp32 or bf16) -> (..., D).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor out;
  run_rms_norm(x, nullptr, weight, eps, out, nullptr, "kangaroo_rt._cpu.rms_norm");
  return out;
}

// -> (x + residual, rms_norm(x + residual)).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  at::Tensor out, new_residual;
  run_rms_norm(x, &residual, weight, eps, out, &new_residual, "kangaroo_rt._cpu.add_rms_norm");
  return {new_residual, out};
}

// q: (B, Hq, Q, D); k, v: (B, Hkv, Q, D); cos, sin: (B, Q, D); caches (B_max, Hkv, T, D); positions (B, Q)
// -> rotated q (B, Hq, Q, D); rotated k and v written into the caches at the positions.
at::Tensor rope_cache_append(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                             const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                             const at::Tensor& positions) {
  const char* what = "kangaroo_rt._cpu.rope_cache_append";
  const int dtype = dtype_code(q, what, "q");
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4, what, ": q and k must be (B, H, q, D), got ", q.sizes(), " and ",
                    k.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), Q = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK_VALUE(D % 2 == 0 && D > 0, what, ": the head size must be even, got ", D);
  check_head_tensor(q, q, B, Hq, Q, D, what, "q");
  check_head_tensor(k, q, B, Hkv, Q, D, what, "k");
  check_head_tensor(v, q, B, Hkv, Q, D, what, "v");
  check_rope_tables(cos, sin, q, B, Q, D, what);
  check_cache(k_cache, q, B, Hkv, D, what, "k_cache");
  check_cache(v_cache, q, B, Hkv, D, what, "v_cache");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(), what,
                    ": k_cache and v_cache must have one shape and layout");
  at::Tensor pos = check_positions(positions, B, Q, what);
  at::Tensor c = cos.contiguous(), s = sin.contiguous();
  at::Tensor q_out = at::empty({B, Hq, Q, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  kr_cpu_rope_args a{};
  a.dtype = dtype;
  a.batch = B, a.n_heads = Hq, a.n_kv_heads = Hkv, a.q_len = Q, a.head_dim = D, a.max_len = k_cache.size(2);
  a.q = q.const_data_ptr(), a.k = k.const_data_ptr(), a.v = v.const_data_ptr();
  for (int d = 0; d < 3; ++d) {
    a.q_stride[d] = q.stride(d), a.k_stride[d] = k.stride(d), a.v_stride[d] = v.stride(d);
    a.cache_stride[d] = k_cache.stride(d);
  }
  a.cos = c.const_data_ptr(), a.sin = s.const_data_ptr();
  a.positions = pos.const_data_ptr<int64_t>(), a.pos_stride[0] = pos.stride(0), a.pos_stride[1] = pos.stride(1);
  a.k_cache = k_cache.mutable_data_ptr(), a.v_cache = v_cache.mutable_data_ptr(), a.q_out = q_out.mutable_data_ptr();
  const int isa = process_isa();
  at::parallel_for(0, B * Q, grain_for((Hq + 2 * Hkv) * D), [&](int64_t t0, int64_t t1) {
    const int rc = kr_cpu_rope_cache_append(isa, &a, t0, t1);
    TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
  });
  return q_out;
}

// q: (B, Hq, Q, D); caches (B_max, Hkv, T, D) holding the new keys; positions (B, Q); kv_len: slots to read
// (default T) -> (B, Hq, Q, D).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& positions, c10::optional<int64_t> kv_len) {
  const char* what = "kangaroo_rt._cpu.attention";
  const int dtype = dtype_code(q, what, "q");
  TORCH_CHECK_VALUE(q.dim() == 4 && k_cache.dim() == 4, what, ": q and the caches must be 4-d, got ", q.sizes(),
                    " and ", k_cache.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), Q = q.size(2), D = q.size(3), Hkv = k_cache.size(1);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, what, ": the query heads (", Hq, ") must be a multiple of the kv heads (",
                    Hkv, ")");
  check_head_tensor(q, q, B, Hq, Q, D, what, "q");
  check_cache(k_cache, q, B, Hkv, D, what, "k_cache");
  check_cache(v_cache, q, B, Hkv, D, what, "v_cache");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(), what,
                    ": k_cache and v_cache must have one shape and layout");
  const int64_t T = k_cache.size(2);
  const int64_t slots = kv_len.has_value() ? *kv_len : T;
  TORCH_CHECK_VALUE(0 <= slots && slots <= T, what, ": kv_len must be in [0, ", T, "], got ", slots);
  at::Tensor pos = check_positions(positions, B, Q, what);
  at::Tensor out = at::empty({B, Hq, Q, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  kr_cpu_attention_args a{};
  a.dtype = dtype;
  a.batch = B, a.n_heads = Hq, a.n_kv_heads = Hkv, a.q_len = Q, a.head_dim = D, a.kv_len = slots;
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  a.q = q.const_data_ptr(), a.k_cache = k_cache.const_data_ptr(), a.v_cache = v_cache.const_data_ptr();
  for (int d = 0; d < 3; ++d) a.q_stride[d] = q.stride(d), a.cache_stride[d] = k_cache.stride(d);
  a.positions = pos.const_data_ptr<int64_t>(), a.pos_stride[0] = pos.stride(0), a.pos_stride[1] = pos.stride(1);
  a.out = out.mutable_data_ptr();
  for (int d = 0; d < 3; ++d) a.out_stride[d] = out.stride(d);
  const int isa = process_isa();
  const int64_t tasks = kr_cpu_attention_tasks(&a);
  const int64_t pairs_per_task = std::max<int64_t>(1, B * Hq * Q / std::max<int64_t>(1, tasks));
  const int64_t grain = grain_for(2 * pairs_per_task * std::max<int64_t>(1, slots) * D);
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    const int rc = kr_cpu_attention(isa, &a, t0, t1);
    TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
  });
  return out;
}

// out = silu(gate) * up for gate, up (..., n) of one dtype (fp32/bf16) and shape, unit last stride.
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  const char* what = "kangaroo_rt._cpu.silu_mul";
  const int dtype = dtype_code(gate, what, "gate");
  check_like(gate, gate, what, "gate");
  check_like(up, gate, what, "up");
  TORCH_CHECK_VALUE(gate.dim() >= 1 && gate.sizes() == up.sizes(), what,
                    ": gate and up must have one shape (..., n), got ", gate.sizes(), " and ", up.sizes());
  const int64_t n = gate.size(-1);
  at::Tensor out = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const std::pair<at::Tensor, int64_t> g = as_rows(gate, n), u = as_rows(up, n);
  const int isa = process_isa();
  const void* gp = g.first.const_data_ptr();
  const void* up_ = u.first.const_data_ptr();
  void* op = out.mutable_data_ptr();
  at::parallel_for(0, g.first.size(0), grain_for(16 * n), [&](int64_t m0, int64_t m1) {
    const int rc = kr_cpu_silu_mul_rows(isa, dtype, gp, g.second, up_, u.second, n, op, n, m0, m1);
    TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
  });
  return out;
}

// ---- Greedy choices over logits (csrc/cpu/argmax.cpp): rows in parallel.

// logits (..., n) fp32/bf16 -> index (...) int64 and, with conf, the chosen token's softmax probability (...) fp32.
void run_argmax(const at::Tensor& logits, at::Tensor& index, at::Tensor* conf, const char* what) {
  const int dtype = dtype_code(logits, what, "logits");
  check_like(logits, logits, what, "logits");
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) > 0 && logits.size(-1) < INT32_MAX, what,
                    ": logits must be (..., n) with 0 < n < 2^31, got ", logits.sizes());
  const int64_t n = logits.size(-1);
  const std::pair<at::Tensor, int64_t> rows = as_rows(logits, n);
  const at::IntArrayRef lead = logits.sizes().slice(0, logits.dim() - 1);
  index = at::empty(lead, logits.options().dtype(at::kLong));
  if (conf != nullptr) *conf = at::empty(lead, logits.options().dtype(at::kFloat));
  const int64_t M = rows.first.size(0);
  if (M == 0) return;
  const int isa = process_isa();
  const void* x = rows.first.const_data_ptr();
  int64_t* ip = index.mutable_data_ptr<int64_t>();
  float* cp = conf != nullptr ? conf->mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, M, grain_for(4 * n), [&](int64_t m0, int64_t m1) {
    const int rc = kr_cpu_argmax_rows(isa, dtype, x, rows.second, n, ip, cp, m0, m1);
    TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
  });
}

at::Tensor argmax(const at::Tensor& logits) {
  at::Tensor index;
  run_argmax(logits, index, nullptr, "kangaroo_rt._cpu.argmax");
  return index;
}

std::tuple<at::Tensor, at::Tensor> greedy_with_confidence(const at::Tensor& logits) {
  at::Tensor index, conf;
  run_argmax(logits, index, &conf, "kangaroo_rt._cpu.greedy_with_confidence");
  return {index, conf};
}

// ---- Sampling (csrc/cpu/sampling.cpp): rows in parallel.

// logits (..., n) fp32/bf16 -> (probs (..., n) fp32, left (...) bool: the rows the kernel left to the caller, those
// with a NaN or +inf score or only -inf ones, whose probs are undefined).
std::tuple<at::Tensor, at::Tensor> process_logits(const at::Tensor& logits, double temperature, int64_t top_k,
                                                  double top_p) {
  const char* what = "kangaroo_rt._cpu.process_logits";
  const int dtype = dtype_code(logits, what, "logits");
  check_like(logits, logits, what, "logits");
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) > 0 && logits.size(-1) < INT32_MAX, what,
                    ": logits must be (..., n) with 0 < n < 2^31, got ", logits.sizes());
  TORCH_CHECK_VALUE(!std::isnan(temperature) && !std::isnan(top_p), what, ": temperature and top_p must not be NaN");
  const int64_t n = logits.size(-1);
  const std::pair<at::Tensor, int64_t> rows = as_rows(logits, n);
  at::Tensor probs = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  const int64_t M = rows.first.size(0);
  at::Tensor status = at::zeros({M}, logits.options().dtype(at::kInt));
  if (M > 0) {
    const int isa = process_isa();
    const float divisor = sampling_divisor(temperature);
    const double p = sampling_top_p(top_p);  // (in double: a float's step near 1 moves the cut's tail)
    const void* x = rows.first.const_data_ptr();
    float* pp = probs.mutable_data_ptr<float>();
    int32_t* sp = status.mutable_data_ptr<int32_t>();
    at::parallel_for(0, M, grain_for(16 * n), [&](int64_t m0, int64_t m1) {
      const int rc = kr_cpu_process_logits_rows(isa, dtype, x, rows.second, n, divisor, top_k, p, pp, n, sp, m0, m1);
      TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
    });
  }
  return {probs, status.ne(0).reshape(logits.sizes().slice(0, logits.dim() - 1))};
}

// probs (B, n) fp32, u (B,) float64 in [0, 1) -> tokens (B,) int64, -1 on rows that are not distributions.
at::Tensor sample(const at::Tensor& probs, const at::Tensor& u) {
  const char* what = "kangaroo_rt._cpu.sample";
  TORCH_CHECK_TYPE(probs.scalar_type() == at::kFloat && probs.device().is_cpu() && probs.layout() == at::kStrided,
                   what, ": probs must be a dense float32 CPU tensor, got ", probs.scalar_type(), " on ",
                   probs.device());
  TORCH_CHECK_VALUE(probs.dim() == 2 && probs.size(1) > 0, what, ": probs must be (B, n) with n > 0, got ",
                    probs.sizes());
  TORCH_CHECK_VALUE(u.scalar_type() == at::kDouble && u.device().is_cpu() && u.dim() == 1 &&
                        u.size(0) == probs.size(0),
                    what, ": u must be a (", probs.size(0), ",) float64 CPU tensor, got ", u.scalar_type(), " ",
                    u.sizes());
  const int64_t n = probs.size(1);
  const std::pair<at::Tensor, int64_t> rows = as_rows(probs, n);
  const at::Tensor uc = u.contiguous();
  const int64_t B = probs.size(0);
  at::Tensor tokens = at::empty({B}, probs.options().dtype(at::kLong));
  const float* pp = rows.first.const_data_ptr<float>();
  const double* up = uc.const_data_ptr<double>();
  int64_t* tp = tokens.mutable_data_ptr<int64_t>();
  const int isa = process_isa();
  at::parallel_for(0, B, grain_for(2 * n), [&](int64_t m0, int64_t m1) {
    const int rc = kr_cpu_sample_rows(isa, pp, rows.second, n, up, tp, m0, m1);
    TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
  });
  return tokens;
}

// drafts (B, K) int64 (unit column stride), n_drafts (B,) int64, p (B, K + 1, V) and q (B, K, V) float32, u_accept
// (B, K) float32, u_next (B,) float64 -> (accepted (B,), next (B,)) int64; next -1 on rows that are not distributions.
std::tuple<at::Tensor, at::Tensor> accept_sampling(const at::Tensor& drafts, const at::Tensor& n_drafts,
                                                   const at::Tensor& p, const at::Tensor& q, const at::Tensor& u_accept,
                                                   const at::Tensor& u_next) {
  const char* what = "kangaroo_rt._cpu.accept_sampling";
  TORCH_CHECK_VALUE(drafts.dim() == 2 && drafts.scalar_type() == at::kLong && drafts.device().is_cpu() &&
                        (drafts.size(1) <= 1 || drafts.stride(1) == 1) &&
                        (drafts.size(0) <= 1 || drafts.size(1) == 0 || drafts.stride(0) >= drafts.size(1)),
                    what, ": drafts must be a (B, K) int64 CPU tensor of unit column stride and rows that do not overlap, "
                    "got ", drafts.sizes(), " strides ", drafts.strides());
  const int64_t B = drafts.size(0), K = drafts.size(1);
  TORCH_CHECK_VALUE(p.dim() == 3 && p.size(0) == B && p.size(1) == K + 1 && p.size(2) > 0, what,
                    ": p must be (B, K + 1, V) = (", B, ", ", K + 1, ", V), got ", p.sizes());
  const int64_t V = p.size(2);
  TORCH_CHECK_VALUE(q.dim() == 3 && q.size(0) == B && q.size(1) == K && q.size(2) == V, what, ": q must be (", B, ", ",
                    K, ", ", V, "), got ", q.sizes());
  for (const at::Tensor* t : {&p, &q, &u_accept})
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->is_contiguous(), what,
                      ": p, q and u_accept must be contiguous float32 CPU tensors");
  TORCH_CHECK_VALUE(u_accept.dim() == 2 && u_accept.size(0) == B && u_accept.size(1) == K, what,
                    ": u_accept must be (B, K), got ", u_accept.sizes());
  TORCH_CHECK_VALUE(n_drafts.dim() == 1 && n_drafts.size(0) == B && n_drafts.scalar_type() == at::kLong &&
                        n_drafts.device().is_cpu() && n_drafts.is_contiguous(),
                    what, ": n_drafts must be a contiguous (B,) int64 CPU tensor");
  TORCH_CHECK_VALUE(u_next.dim() == 1 && u_next.size(0) == B && u_next.scalar_type() == at::kDouble &&
                        u_next.device().is_cpu() && u_next.is_contiguous(),
                    what, ": u_next must be a contiguous (B,) float64 CPU tensor");
  at::Tensor accepted = at::empty({B}, n_drafts.options()), next = at::empty({B}, n_drafts.options());
  if (B == 0) return {accepted, next};
  const int isa = process_isa();
  const int64_t ld = B <= 1 ? K : drafts.stride(0);
  at::parallel_for(0, B, grain_for(3 * V), [&](int64_t m0, int64_t m1) {
    const int rc = kr_cpu_accept_sampling_rows(
        isa, drafts.const_data_ptr<int64_t>(), ld, n_drafts.const_data_ptr<int64_t>(), p.const_data_ptr<float>(),
        q.const_data_ptr<float>(), K, V, u_accept.const_data_ptr<float>(), u_next.const_data_ptr<double>(),
        accepted.mutable_data_ptr<int64_t>(), next.mutable_data_ptr<int64_t>(), m0, m1);
    TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
  });
  return {accepted, next};
}

// ---- The screened greedy head (csrc/cpu/head_screen.cpp): x's int8 parts, then the head's rows in parallel.

// x (M, K) -> u (M, 2, kp), stats (M, KR_CPU_SCREEN_STATS), hi and lo (M, V) of head_screen's rows (estimate: the
// estimates in hi, no lo; floors: with running floors (M,), as the target pass screens).
struct ScreenRun {
  at::Tensor x, u, stats, hi, lo, floors;
  kr_cpu_head_screen s{};
};

ScreenRun run_screen(const at::Tensor& x, const std::vector<at::Tensor>& screen, const char* what,
                     bool estimate = false, bool floors = false) {
  const int dtype = dtype_code(x, what, "x");
  check_like(x, x, what, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0, what, ": x must be (M, K), got ", x.sizes());
  ScreenRun r;
  r.x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), V = screen.empty() ? 0 : screen[0].size(0);
  r.s = screen_of(screen, V, K, what);
  r.u = at::empty({M, 2, r.s.kp}, x.options().dtype(at::kByte));
  r.stats = at::empty({M, KR_CPU_SCREEN_STATS}, x.options().dtype(at::kDouble));
  r.hi = at::empty({M, V}, x.options().dtype(at::kFloat));
  if (!estimate) r.lo = at::empty({M, V}, x.options().dtype(at::kFloat));
  if (floors) r.floors = at::full({M}, -std::numeric_limits<float>::infinity(), x.options().dtype(at::kFloat));
  if (M == 0) return r;
  const int isa = process_isa();
  int rc = kr_cpu_screen_prepare_rows(dtype, r.x.const_data_ptr(), K, K, r.s.kp, r.u.mutable_data_ptr<uint8_t>(),
                                      r.stats.mutable_data_ptr<double>(), 0, M);
  TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
  at::parallel_for(0, (V + 63) / 64, grain_for(64 * r.s.kp), [&](int64_t b0, int64_t b1) {
    const uint8_t* u = r.u.const_data_ptr<uint8_t>();
    const double* stats = r.stats.const_data_ptr<double>();
    float* hi = r.hi.mutable_data_ptr<float>();
    const int64_t n0 = b0 * 64, n1 = std::min(V, b1 * 64);
    const int rr = estimate ? kr_cpu_screen_estimate_rows(isa, u, stats, M, K, &r.s, hi, V, n0, n1)
                            : kr_cpu_screen_rows(isa, u, stats, M, K, &r.s, hi, r.lo.mutable_data_ptr<float>(), V,
                                                 n0, n1, floors ? r.floors.mutable_data_ptr<float>() : nullptr);
    TORCH_CHECK(rr == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rr, ")");
  });
  return r;
}

std::tuple<at::Tensor, at::Tensor> screen_bounds(const at::Tensor& x, const std::vector<at::Tensor>& screen,
                                                 bool floors) {
  ScreenRun r = run_screen(x, screen, "kangaroo_rt._cpu.screen_bounds", false, floors);
  return {r.hi, r.lo};
}

// x (M, K) -> (M, V) in x's dtype: the int8 head's estimates (kr_cpu_screen_estimate_rows), rounded as the draft
// chain rounds its logits.
at::Tensor screen_estimate(const at::Tensor& x, const std::vector<at::Tensor>& screen) {
  ScreenRun r = run_screen(x, screen, "kangaroo_rt._cpu.screen_estimate", true);
  if (x.scalar_type() == at::kFloat) return r.hi;
  at::Tensor out = at::empty(r.hi.sizes(), x.options());
  if (out.numel() == 0) return out;
  const int rc = kr_cpu_round_bf16(process_isa(), r.hi.const_data_ptr<float>(),
                                   reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>()), out.numel());
  TORCH_CHECK(rc == KR_CPU_OK, "kangaroo_rt._cpu.screen_estimate: the kernel refused its arguments (status ", rc, ")");
  return out;
}

at::Tensor screened_argmax(const at::Tensor& x, const at::Tensor& head, const std::vector<at::Tensor>& screen,
                           bool floors) {
  const char* what = "kangaroo_rt._cpu.screened_argmax";
  check_like(head, x, what, "head");
  TORCH_CHECK_VALUE(head.dim() == 2 && head.is_contiguous() && x.dim() == 2 && head.size(1) == x.size(-1), what,
                    ": head must be a contiguous (V, K) for x (M, K), got ", head.sizes(), " and ", x.sizes());
  TORCH_CHECK_VALUE(!screen.empty() && screen[0].size(0) == head.size(0), what, ": the screen is not this head's");
  const int dtype = dtype_code(x, what, "x");
  ScreenRun r = run_screen(x, screen, what, false, floors);
  const int64_t M = x.size(0), K = x.size(1), V = head.size(0);
  at::Tensor index = at::empty({M}, x.options().dtype(at::kLong));
  const int isa = process_isa();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int rc = kr_cpu_screen_argmax_row(
          isa, dtype, static_cast<const char*>(r.x.const_data_ptr()) + m * K * x.element_size(), K,
          head.const_data_ptr(), 0, V, r.stats.const_data_ptr<double>() + m * KR_CPU_SCREEN_STATS,
          r.hi.const_data_ptr<float>() + m * V, r.lo.mutable_data_ptr<float>() + m * V,
          index.mutable_data_ptr<int64_t>() + m);
      TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
    }
  });
  return index;
}

// ---- A round's commit and greedy acceptance (csrc/cpu/accept.cpp), in place on the decode state.

// count-like (B,) of any integer type -> contiguous int64
at::Tensor row_counts(const at::Tensor& t, int64_t batch, const char* what, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 1 && t.size(0) == batch && !at::isFloatingType(t.scalar_type()),
                    what, ": ", name, " must be an integer (", batch, ",) CPU tensor, got ", t.scalar_type(), " ",
                    t.sizes(), " on ", t.device());
  return t.to(at::kLong).contiguous();
}

at::Tensor commit_tokens(at::Tensor out, at::Tensor n_gen, at::Tensor finished, const at::Tensor& tokens,
                         const at::Tensor& count, const c10::optional<at::Tensor>& eos) {
  const char* what = "kangaroo_rt._cpu.commit_tokens";
  check_tokens(tokens, 2, what, "tokens");
  const int64_t batch = tokens.size(0);
  check_out(out, batch, what);
  check_state_row(n_gen, batch, at::kLong, what, "n_gen");
  check_state_row(finished, batch, at::kBool, what, "finished");
  const at::Tensor c = row_counts(count, batch, what, "count");
  at::Tensor eos_holder;
  const auto e = eos_ids(eos, eos_holder, what);
  at::Tensor committed = at::empty({batch}, tokens.options());
  const int rc = kr_cpu_commit_tokens(tokens.const_data_ptr<int64_t>(), tokens.stride(0), tokens.stride(1),
                                      tokens.size(1), c.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(),
                                      out.stride(0), out.size(1), n_gen.mutable_data_ptr<int64_t>(),
                                      reinterpret_cast<uint8_t*>(finished.mutable_data_ptr<bool>()), e.first, e.second,
                                      batch, committed.mutable_data_ptr<int64_t>());
  TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
  return committed;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> accept_greedy_commit(
    const at::Tensor& drafts, const at::Tensor& n_drafts, const at::Tensor& target_tokens, at::Tensor out,
    at::Tensor n_gen, at::Tensor finished, at::Tensor pos, const c10::optional<at::Tensor>& eos) {
  const char* what = "kangaroo_rt._cpu.accept_greedy_commit";
  check_tokens(drafts, 2, what, "drafts");
  check_tokens(target_tokens, 2, what, "target_tokens");
  const int64_t batch = drafts.size(0), k = drafts.size(1);
  TORCH_CHECK_VALUE(target_tokens.size(0) == batch && target_tokens.size(1) == k + 1, what,
                    ": target_tokens must be (", batch, ", ", k + 1, "), got ", target_tokens.sizes());
  check_out(out, batch, what);
  check_state_row(n_gen, batch, at::kLong, what, "n_gen");
  check_state_row(finished, batch, at::kBool, what, "finished");
  check_state_row(pos, batch, at::kLong, what, "pos");
  const at::Tensor n = row_counts(n_drafts, batch, what, "n_drafts");
  at::Tensor eos_holder;
  const auto e = eos_ids(eos, eos_holder, what);
  at::Tensor accepted = at::empty({batch}, drafts.options()), next_token = at::empty({batch}, drafts.options());
  at::Tensor committed = at::empty({batch}, drafts.options());
  const int rc = kr_cpu_accept_greedy_commit(
      drafts.const_data_ptr<int64_t>(), drafts.stride(0), drafts.stride(1), n.const_data_ptr<int64_t>(),
      target_tokens.const_data_ptr<int64_t>(), target_tokens.stride(0), target_tokens.stride(1), batch, k,
      out.mutable_data_ptr<int64_t>(), out.stride(0), out.size(1), n_gen.mutable_data_ptr<int64_t>(),
      reinterpret_cast<uint8_t*>(finished.mutable_data_ptr<bool>()), pos.mutable_data_ptr<int64_t>(), e.first,
      e.second, accepted.mutable_data_ptr<int64_t>(), next_token.mutable_data_ptr<int64_t>(),
      committed.mutable_data_ptr<int64_t>());
  TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
  return {accepted, next_token, committed};
}

std::string isa() { return kr_cpu_isa_name(process_isa()); }

std::string prefetch_target() {
  process_isa();  // (raises where KANGAROO_RT_CPU_PREFETCH or KANGAROO_RT_CPU_ISA is invalid)
  return kr_cpu_prefetch_name(kr_cpu_prefetch_target());
}

double peak_macs(const std::string& dtype, int64_t threads, int64_t iters) {
  TORCH_CHECK_VALUE(dtype == "float32" || dtype == "bfloat16",
                    "kangaroo_rt._cpu.peak_macs: dtype must be 'float32' or 'bfloat16', got '", dtype, "'");
  TORCH_CHECK_VALUE(threads >= 1 && threads <= 1024 && iters >= 1,
                    "kangaroo_rt._cpu.peak_macs: threads must be in 1..1024 and iters positive, got ", threads, ", ",
                    iters);
  const double rate = kr_cpu_peak_macs(process_isa(), dtype == "float32" ? KR_CPU_FLOAT32 : KR_CPU_BFLOAT16, threads,
                                       iters);
  TORCH_CHECK(rate > 0, "kangaroo_rt._cpu.peak_macs: the measurement failed");
  return rate;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (int isa : {KR_CPU_ISA_AVX512_BF16, KR_CPU_ISA_AVX512, KR_CPU_ISA_AVX2, KR_CPU_ISA_PORTABLE})
    if (kr_cpu_isa_supported(isa)) names.emplace_back(kr_cpu_isa_name(isa));
  return names;
}

// {kind name: (body ns, wait ns, phases)} of the kinds that ran since the last reset (kr_cpu_phase_stats_read).
py::dict phase_stats(bool reset) {
  std::vector<int64_t> v(3 * KR_CPU_PHASE_KINDS);
  kr_cpu_phase_stats_read(v.data());
  if (reset) kr_cpu_phase_stats_reset();
  py::dict out;
  for (int k = 0; k < KR_CPU_PHASE_KINDS; ++k)
    if (v[3 * k + 2] > 0) out[kr_cpu_phase_kind_name(k)] = py::make_tuple(v[3 * k], v[3 * k + 1], v[3 * k + 2]);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kangaroo_rt's CPU kernels (csrc/cpu/); kangaroo_rt.ops dispatches to them";
  m.def("linear", &linear, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("packed") = false,
        py::call_guard<py::gil_scoped_release>(),
        "x (..., K) fp32/bf16 @ weight (N, K) fp32/bf16 contiguous ^T (+ bias (N,)) -> (..., N) in x's dtype; "
        "each row's bits are those it has alone; packed: a bf16 weight from pack_bf16 (the same bits)");
  m.def("pack_bf16", &pack_bf16, py::arg("weight"), py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>(),
        "weight (N, K) bf16 -> its packed layout (N, K + K % 2) for linear(packed=True) and the decode stacks: "
        "panels of 16 rows, pair-major (csrc/cpu/kr_cpu.h)");
  m.def("linear_with_isa", &linear_with_isa, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("isa"),
        py::arg("packed") = false, py::call_guard<py::gil_scoped_release>(),
        "linear() with a given variant (avx512_bf16, avx512, avx2, portable), for tests and benchmarks");
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>(), "RMSNorm of x (..., D) by weight (D,), one dtype (fp32/bf16)");
  m.def("add_rms_norm", &add_rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>(), "-> (x + residual, rms_norm(x + residual))");
  m.def("rope_cache_append", &rope_cache_append, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"),
        py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("positions"),
        py::call_guard<py::gil_scoped_release>(),
        "RoPE on q and k, rotated k and v written into the caches at positions; -> rotated q (B, Hq, q, D)");
  m.def("attention", &attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("positions"),
        py::arg("kv_len") = py::none(), py::call_guard<py::gil_scoped_release>(),
        "causal attention of q (B, Hq, q, D) over the caches at per-row positions (B, q) -> (B, Hq, q, D); "
        "each query's bits do not depend on the others");
  m.def("silu_mul", &silu_mul, py::arg("gate"), py::arg("up"), py::call_guard<py::gil_scoped_release>(),
        "silu(gate) * up for gate, up (..., n) of one dtype (fp32/bf16): the activation of a Llama MLP");
  kr_bind::define_decode(m);  // decoder_layers, draft_chain, target_pass, their plans, decode_loop, linear_sweep
  m.def("screen_bounds", &screen_bounds, py::arg("x"), py::arg("screen"), py::arg("floors") = false,
        py::call_guard<py::gil_scoped_release>(),
        "x (M, K) fp32/bf16, a head's screen (_cpu_ext.make_head_screen) -> (hi, lo) (M, V) fp32: bounds of the "
        "logits the head computes (floors: with running floors, the first int8 part of x alone where it rules a "
        "row out)");
  m.def("screen_estimate", &screen_estimate, py::arg("x"), py::arg("screen"),
        py::call_guard<py::gil_scoped_release>(),
        "x (M, K) fp32/bf16, a head's screen (_cpu_ext.make_head_screen) -> (M, V) in x's dtype: the int8 head's "
        "estimates of linear(x, head), rounded to the dtype (NaN rows for a non-finite x): the draft chain's int8 "
        "head logits");
  m.def("screened_argmax", &screened_argmax, py::arg("x"), py::arg("head"), py::arg("screen"),
        py::arg("floors") = true, py::call_guard<py::gil_scoped_release>(),
        "x (M, K), head (V, K) fp32/bf16 and its screen -> (M,) int64: argmax(linear(x, head)), each row's head "
        "logits rounded to the dtype, from the int8 screen (with running floors, as the target pass runs it, or "
        "without) and the few rows that can win");
  m.def("argmax", &argmax, py::arg("logits"), py::call_guard<py::gil_scoped_release>(),
        "logits (..., n) fp32/bf16 -> (...) int64: the first index of the largest value, a NaN the largest");
  m.def("greedy_with_confidence", &greedy_with_confidence, py::arg("logits"), py::call_guard<py::gil_scoped_release>(),
        "logits (..., n) fp32/bf16 -> (argmax (...) int64, its softmax probability (...) fp32)");
  m.def("process_logits", &process_logits, py::arg("logits"), py::arg("temperature"), py::arg("top_k"),
        py::arg("top_p"), py::call_guard<py::gil_scoped_release>(),
        "logits (..., n) fp32/bf16 -> (probs (..., n) fp32 after temperature / top-k (0: none) / top-p (1: none), "
        "left (...) bool: rows with a NaN or +inf score or only -inf ones, whose probs the caller must compute)");
  m.def("sample", &sample, py::arg("probs"), py::arg("u"), py::call_guard<py::gil_scoped_release>(),
        "probs (B, n) fp32, u (B,) float64 in [0, 1) -> (B,) int64: the first index where the running sum passes "
        "u * the row's sum (a draw, as torch.multinomial's); -1 on a row that is not a distribution");
  m.def("accept_sampling", &accept_sampling, py::arg("drafts"), py::arg("n_drafts"), py::arg("p"), py::arg("q"),
        py::arg("u_accept"), py::arg("u_next"), py::call_guard<py::gil_scoped_release>(),
        "speculative sampling's acceptance and next token, (B,) each: the drafts before the first with "
        "!(u_accept * q(d) < p(d)), then a draw with u_next from max(p - q, 0) or, after a full acceptance, p");
  m.def("commit_tokens", &commit_tokens, py::arg("out"), py::arg("n_gen"), py::arg("finished"), py::arg("tokens"),
        py::arg("count"), py::arg("eos") = py::none(),
        "commit (B, n) tokens into out at n_gen, up to an EOS, in place; -> committed (B,)");
  m.def("accept_greedy_commit", &accept_greedy_commit, py::arg("drafts"), py::arg("n_drafts"),
        py::arg("target_tokens"), py::arg("out"), py::arg("n_gen"), py::arg("finished"), py::arg("pos"),
        py::arg("eos") = py::none(), "greedy acceptance fused with the commit and the position update, in place; "
        "-> (accepted, next_token, committed)");
  m.def("peak_macs", &peak_macs, py::arg("dtype"), py::arg("threads"), py::arg("iters") = 20000000,
        py::call_guard<py::gil_scoped_release>(),
        "multiply-adds per second of the linear kernel's inner instruction for weights of dtype ('float32' or "
        "'bfloat16') on this many threads together: its arithmetic ceiling");
  m.def("isa", &isa, "the variant this process uses; ValueError when KANGAROO_RT_CPU_ISA asks for one it cannot");
  m.def("supported_isas", &supported_isas, "the variants this CPU runs, best first");
  m.def("prefetch_target", &prefetch_target,
        "where the kernels' software prefetch of the weights goes in this process: 'nta' or 'l2' (this CPU's default, "
        "or KANGAROO_RT_CPU_PREFETCH); ValueError when that variable is invalid");
  m.def("phase_stats_enable", [](bool on) { return kr_cpu_phase_stats_enable(on ? 1 : 0) != 0; }, py::arg("on"),
        "turn the per-phase time accounting of the one-call regions (decoder_layers, draft_chain, target_pass, "
        "decode_loop, linear_sweep) on or off -> the previous setting; off by default");
  m.def("phase_kinds", []() {
          std::vector<std::string> names;
          for (int k = 0; k < KR_CPU_PHASE_KINDS; ++k) names.emplace_back(kr_cpu_phase_kind_name(k));
          return names;
        }, "every kind of phase the accounting names, in kr_cpu.h's order");
  m.def("phase_stats", &phase_stats, py::arg("reset") = false,
        "{kind: (body_ns, wait_ns, phases)} summed over threads since the last reset (then reset, with reset=True): "
        "kinds 'layers.qkv', 'shallow.down[n]' ('[n]': over more than one row), 'adapter.attention', 'head', "
        "'draft_head', 'screen', 'other'");
  m.attr("ROW_BLOCK") = KR_CPU_ROW_BLOCK;
  m.attr("MAX_ROWS_PER_PASS") = KR_CPU_MAX_ROWS_PER_PASS;
}
