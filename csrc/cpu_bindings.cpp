// kangaroo_rt._cpu: pybind11/torch glue over the raw-pointer CPU kernels of csrc/cpu/ (see cpu/kr_cpu.h).
// kangaroo_rt/_cpu_ext.py routes the inputs these functions refuse to the torch reference.
#include <climits>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstring>
#include <memory>
#include <tuple>
#include <utility>
#include <string>
#include <vector>

#include "cpu/kr_cpu.h"

namespace {

// Below this many weight bytes per thread, splitting a call over threads costs more than it saves.
constexpr int64_t kMinWeightBytesPerTask = 64 * 1024;

int weight_dtype_code(at::ScalarType t) { return t == at::kFloat ? KR_CPU_FLOAT32 : KR_CPU_BFLOAT16; }

bool kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

int process_isa() {
  const int isa = kr_cpu_isa();
  TORCH_CHECK_VALUE(isa != KR_CPU_ISA_INVALID, "kangaroo_rt._cpu: ", kr_cpu_isa_error());
  return isa;
}

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

// An optional bias (N,), float32 or bfloat16, as the fp32 (N,) the kernels add; an undefined tensor without one.
at::Tensor bias_as_float(const c10::optional<at::Tensor>& bias, int64_t N, const std::string& what) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(bias->layout() == at::kStrided && bias->device().is_cpu(), what,
                    ": bias must be a dense CPU tensor, got ", bias->device());
  TORCH_CHECK_TYPE(kernel_dtype(bias->scalar_type()), what, ": bias must be float32 or bfloat16, got ",
                   bias->scalar_type());
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, what, ": bias must be (N,) with N = ", N, ", got shape ",
                    bias->sizes());
  return bias->to(at::kFloat).contiguous();
}

// x: (..., K) fp32 or bf16; weight: (N, K) fp32 or bf16, contiguous; bias: (N,) fp32 or bf16 -> (..., N) in x's
// dtype. bf16 activations with bf16 weights take kr_cpu_linear_rows_bf16 (vdpbf16ps's order); bf16 activations
// with fp32 weights are widened to fp32 (exact). The fp32 result is rounded to bf16 at the end, as torch's bf16
// linear does. Rows are independent: any number of them, computed in passes of at most
// KR_CPU_MAX_ROWS_PER_PASS, gives each row the bits it has alone.
at::Tensor linear_with(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int isa) {
  const char* what = "kangaroo_rt._cpu.linear";
  TORCH_CHECK_VALUE(x.layout() == at::kStrided && weight.layout() == at::kStrided, what,
                    ": x and weight must be dense (strided) tensors");
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), what, ": x and weight must be CPU tensors, got ",
                    x.device(), " and ", weight.device());
  TORCH_CHECK_TYPE(kernel_dtype(x.scalar_type()), what, ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(kernel_dtype(weight.scalar_type()), what, ": weight must be float32 or bfloat16, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, what, ": weight must be (N, K), got shape ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, what, ": x must be (..., K) with K = weight.shape[1] = ", K,
                    ", got shape ", x.sizes());
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
          pairs ? kr_cpu_linear_rows_bf16(isa, static_cast<const uint16_t*>(xp), M, K, ldx,
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

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return linear_with(x, weight, bias, process_isa());
}

at::Tensor linear_with_isa(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const std::string& isa) {
  return linear_with(x, weight, bias, isa_by_name(isa));
}

// ---- The other ops of a decode layer (csrc/cpu/{rms_norm,rope_cache_append,attention}.cpp).

// Below this many multiply-adds per thread, a parallel region costs more than it saves.
constexpr int64_t kMinWorkPerTask = 32 * 1024;

int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, work_per_task));
}

int dtype_code(const at::Tensor& t, const char* what, const char* name) {
  TORCH_CHECK_TYPE(kernel_dtype(t.scalar_type()), what, ": ", name, " must be float32 or bfloat16, got ",
                   t.scalar_type());
  return weight_dtype_code(t.scalar_type());
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* what, const char* name) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided && t.device().is_cpu(), what, ": ", name,
                    " must be a dense CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), what, ": ", name, " must be ", ref.scalar_type(),
                   " like the other inputs, got ", t.scalar_type());
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

void check_head_tensor(const at::Tensor& t, const at::Tensor& ref, int64_t B, int64_t H, int64_t Q, int64_t D,
                       const char* what, const char* name) {
  check_like(t, ref, what, name);
  TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == B && t.size(1) == H && t.size(2) == Q && t.size(3) == D, what,
                    ": ", name, " must be (", B, ", ", H, ", ", Q, ", ", D, "), got ", t.sizes());
  TORCH_CHECK_VALUE(D == 0 || t.stride(3) == 1 || t.numel() == 0, what, ": ", name,
                    " must have a unit stride on its last dimension, got strides ", t.strides());
}

void check_cache(const at::Tensor& c, const at::Tensor& ref, int64_t B, int64_t Hkv, int64_t D, const char* what,
                 const char* name) {
  check_like(c, ref, what, name);
  TORCH_CHECK_VALUE(c.dim() == 4 && c.size(0) >= B && c.size(1) == Hkv && c.size(3) == D && c.stride(3) == 1, what,
                    ": ", name, " must be (B_max >= ", B, ", ", Hkv, ", T, ", D, ") with a unit last stride, got ",
                    c.sizes(), " strides ", c.strides());
}

// RoPE's cos and sin tables: (B, Q, D) each, of ref's dtype.
void check_rope_tables(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& ref, int64_t B, int64_t Q,
                       int64_t D, const char* what) {
  for (const at::Tensor* t : {&cos, &sin}) {
    check_like(*t, ref, what, "cos/sin");
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == B && t->size(1) == Q && t->size(2) == D, what,
                      ": cos and sin must be (", B, ", ", Q, ", ", D, "), got ", t->sizes());
  }
}

at::Tensor check_positions(const at::Tensor& positions, int64_t B, int64_t Q, const char* what) {
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong && positions.device().is_cpu(), what,
                   ": positions must be a CPU int64 tensor, got ", positions.scalar_type(), " on ",
                   positions.device());
  TORCH_CHECK_VALUE(positions.dim() == 2, what, ": positions must be (B, q), got ", positions.sizes());
  return positions.expand({B, Q});
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

// ---- A round's commit and greedy acceptance (csrc/cpu/accept.cpp), in place on the decode state.

void check_tokens(const at::Tensor& t, int64_t dim, const char* what, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == dim, what, ": ", name,
                    " must be a ", dim, "-d int64 CPU tensor, got ", t.scalar_type(), " ", t.sizes(), " on ",
                    t.device());
}

void check_state_row(const at::Tensor& t, int64_t batch, at::ScalarType type, const char* what, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == type && t.dim() == 1 && t.size(0) >= batch &&
                        t.is_contiguous(),
                    what, ": ", name, " must be a contiguous (>= ", batch, ",) ", type, " CPU tensor, got ",
                    t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// count-like (B,) of any integer type -> contiguous int64
at::Tensor row_counts(const at::Tensor& t, int64_t batch, const char* what, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 1 && t.size(0) == batch && !at::isFloatingType(t.scalar_type()),
                    what, ": ", name, " must be an integer (", batch, ",) CPU tensor, got ", t.scalar_type(), " ",
                    t.sizes(), " on ", t.device());
  return t.to(at::kLong).contiguous();
}

// eos ids (E,) -> (contiguous int64 holder, pointer, E); (nullptr, 0) when none
std::pair<const int64_t*, int64_t> eos_ids(const c10::optional<at::Tensor>& eos, at::Tensor& holder, const char* what) {
  if (!eos.has_value() || eos->numel() == 0) return {nullptr, 0};
  TORCH_CHECK_VALUE(eos->device().is_cpu() && !at::isFloatingType(eos->scalar_type()), what,
                    ": eos must be integer ids on the CPU, got ", eos->scalar_type(), " on ", eos->device());
  holder = eos->reshape({-1}).to(at::kLong).contiguous();
  return {holder.const_data_ptr<int64_t>(), holder.numel()};
}

void check_out(const at::Tensor& out, int64_t batch, const char* what) {
  check_tokens(out, 2, what, "out");
  TORCH_CHECK_VALUE(out.size(0) >= batch && out.stride(1) == 1, what, ": out must be (>= ", batch,
                    ", W) with unit column stride, got ", out.sizes(), " strides ", out.strides());
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

// ---- A stack of decoder layers in one call (csrc/cpu/decoder.cpp): kangaroo_rt.model.DecoderLayer.forward on the
// kernels of the functions above, so the bits of the per-op path, on one set of threads and without a torch call
// per op (about a dozen per layer: dispatch, checks, allocations and a thread fork each cost ~45 us a layer).

// Per layer, in this order: input norm (D,), fused q/k/v weight (Hq*Dh + 2*Hkv*Dh, D), o weight (D, Hq*Dh),
// post-attention norm (D,), fused gate/up weight (2*I, D), down weight (D, I).
constexpr size_t kLayerWeights = 6;

void check_matrix(const at::Tensor& w, const at::Tensor& ref, int64_t rows, int64_t cols, const char* what, size_t layer,
                  const char* name) {
  check_like(w, ref, what, name);
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols && w.is_contiguous(), what, ": layer ",
                    layer, ": ", name, " must be a contiguous (", rows, ", ", cols, "), got ", w.sizes(), " strides ",
                    w.strides());
}

// A kernel that runs on one set of threads meeting at counters (the decoder stack and a linear sweep: decoder.cpp;
// the draft chain; the target pass): sets args.threads and a workspace of the size bytes() asks (its counters
// zeroed; kept in region for the next call, and grown when that call asks for more), checks the arguments once
// before any thread starts (so that no thread stops alone), then runs one task per thread, each calling
// run(isa, &args) with the same arguments. Fewer threads (a nested call runs inline) compute the same bits.
struct Region {
  at::Tensor workspace;
};

template <typename Args>
void run_region(Args& args, Region& region, int64_t (*bytes)(const Args*, int64_t*), int (*check)(int, const Args*),
                int (*run)(int, const Args*), const char* what) {
  args.threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t zeroed = 0;
  const int64_t n = bytes(&args, &zeroed);
  TORCH_CHECK_VALUE(n >= 0, what, ": impossible sizes");
  if (!region.workspace.defined() || region.workspace.numel() < n)
    region.workspace = at::empty({n}, at::TensorOptions().dtype(at::kByte));  // (64-byte aligned)
  args.workspace = region.workspace.data_ptr();
  std::memset(args.workspace, 0, static_cast<size_t>(zeroed));  // the counters; the scratch rows need no zeros
  const int isa = process_isa();
  const int checked = check(isa, &args);
  TORCH_CHECK_VALUE(checked == KR_CPU_OK, what, ": the kernel refused its arguments (status ", checked, ")");
  std::vector<int> status(static_cast<size_t>(args.threads), KR_CPU_OK);
  at::parallel_for(0, args.threads, 1, [&](int64_t t0, int64_t) {
    status[static_cast<size_t>(t0)] = run(isa, &args);
  });
  for (int rc : status)
    TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel failed (status ", rc, rc == KR_CPU_FAILED ? ": out of memory?" : "",
                ")");
}

template <typename Args>
void run_one_region(Args& args, int64_t (*bytes)(const Args*, int64_t*), int (*check)(int, const Args*),
                    int (*run)(int, const Args*), const char* what) {
  Region region;
  run_region(args, region, bytes, check, run, what);
}

// The layers ls (their pointers set and checked) over out (B, Q, D), the input overwritten by the output: the rope
// tables, positions and kv_len checked, then the stack run on one set of threads.
void run_stack(at::Tensor& out, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
               const std::vector<kr_cpu_decoder_layer>& ls, const at::Tensor& cache0, int64_t n_heads,
               int64_t n_kv_heads, int64_t head_dim, int64_t inter, double eps, c10::optional<int64_t> kv_len,
               const char* what) {
  const int64_t B = out.size(0), Q = out.size(1), D = out.size(2);
  check_rope_tables(cos, sin, out, B, Q, head_dim, what);
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const at::Tensor pos = check_positions(positions, B, Q, what);
  const int64_t T = cache0.size(2);
  const int64_t slots = kv_len.has_value() ? *kv_len : T;
  TORCH_CHECK_VALUE(0 <= slots && slots <= T, what, ": kv_len must be in [0, ", T, "], got ", slots);

  kr_cpu_decoder_args a{};
  a.dtype = dtype_code(out, what, "hidden");
  a.batch = B, a.q_len = Q, a.hidden_size = D, a.n_heads = n_heads, a.n_kv_heads = n_kv_heads;
  a.head_dim = head_dim, a.intermediate = inter, a.max_len = T, a.kv_len = slots;
  a.eps = static_cast<float>(eps), a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  a.n_layers = static_cast<int64_t>(ls.size()), a.layers = ls.data();
  for (int d = 0; d < 3; ++d) a.cache_stride[d] = cache0.stride(d);
  a.cos = c.const_data_ptr(), a.sin = s.const_data_ptr();
  a.positions = pos.const_data_ptr<int64_t>(), a.pos_stride[0] = pos.stride(0), a.pos_stride[1] = pos.stride(1);
  a.hidden = out.mutable_data_ptr();
  run_one_region(a, kr_cpu_decoder_workspace_bytes, kr_cpu_decoder_check, kr_cpu_decoder_layers, what);
}

// hidden: (B, Q, D); positions: (B, Q) int64; cos, sin: (B, Q, Dh); weights: kLayerWeights per layer (gate/up and
// down None: an attention-only layer, whose output is the post-attention norm of h + attention: Kangaroo's
// adapter); qkv_bias, o_bias: one per layer (None: no bias); k_caches, v_caches: one (B_max, Hkv, T, Dh) per
// layer, all of one layout -> hidden after the layers, their keys and values written into the caches.
// The kernel's view of the layers given as weights (kLayerWeights per layer), biases and caches (see decoder_layers),
// checked against hidden (B, q, D) and the head layout; inter is set from the first layer with an MLP (0: none) and
// biases keeps the fp32 copies of the biases alive.
std::vector<kr_cpu_decoder_layer> layers_of(const at::Tensor& hidden,
                                            const std::vector<c10::optional<at::Tensor>>& weights,
                                            const std::vector<c10::optional<at::Tensor>>& qkv_bias,
                                            const std::vector<c10::optional<at::Tensor>>& o_bias,
                                            std::vector<at::Tensor>& k_caches, std::vector<at::Tensor>& v_caches,
                                            int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t& inter,
                                            std::vector<at::Tensor>& biases, const char* what) {
  const size_t layers = k_caches.size();
  TORCH_CHECK_VALUE(weights.size() == kLayerWeights * layers && qkv_bias.size() == layers &&
                        o_bias.size() == layers && v_caches.size() == layers,
                    what, ": expected ", kLayerWeights, " weights, 2 biases and 2 caches per layer, got ",
                    weights.size(), " weights, ", qkv_bias.size(), " + ", o_bias.size(), " biases and ",
                    k_caches.size(), " + ", v_caches.size(), " caches");
  dtype_code(hidden, what, "hidden");
  check_like(hidden, hidden, what, "hidden");
  TORCH_CHECK_VALUE(hidden.dim() == 3, what, ": hidden must be (B, q, D), got ", hidden.sizes());
  TORCH_CHECK_VALUE(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                    what, ": bad head layout: ", n_heads, " query heads, ", n_kv_heads, " kv heads of size ",
                    head_dim);
  constexpr int64_t kMaxHeadElements = int64_t{1} << 31;  // keeps every width and product below far from overflow
  TORCH_CHECK_VALUE(n_heads <= kMaxHeadElements / head_dim, what, ": ", n_heads, " heads of size ", head_dim,
                    " are too many");
  const int64_t B = hidden.size(0), D = hidden.size(2);
  const int64_t q_width = n_heads * head_dim, kv_width = n_kv_heads * head_dim;
  const at::Tensor none;
  auto weight = [&](size_t i, size_t j) -> const at::Tensor& {
    const c10::optional<at::Tensor>& w = weights[kLayerWeights * i + j];
    return w.has_value() ? *w : none;
  };
  inter = 0;
  for (size_t i = 0; i < layers && inter == 0; ++i) {
    const at::Tensor& gate_up = weight(i, 4);
    if (!gate_up.defined()) continue;
    inter = gate_up.dim() == 2 && gate_up.size(0) % 2 == 0 ? gate_up.size(0) / 2 : 0;
    TORCH_CHECK_VALUE(inter > 0, what, ": the fused gate/up weight must have an even, positive number of rows, got ",
                      gate_up.sizes());
  }
  std::vector<kr_cpu_decoder_layer> ls(layers);
  if (layers == 0) return ls;
  const at::Tensor& cache0 = k_caches[0];
  for (size_t i = 0; i < layers; ++i) {
    const at::Tensor w[kLayerWeights] = {weight(i, 0), weight(i, 1), weight(i, 2), weight(i, 3), weight(i, 4),
                                         weight(i, 5)};
    for (int j : {0, 1, 2, 3})
      TORCH_CHECK_VALUE(w[j].defined(), what, ": layer ", i, ": only the MLP's weights may be None, got None at ", j);
    const bool mlp = w[4].defined() || w[5].defined();  // without: attention-only (Kangaroo's adapter)
    TORCH_CHECK_VALUE(mlp == (w[4].defined() && w[5].defined()), what, ": layer ", i,
                      ": the gate/up and down weights must both be given or both be None");
    for (int j : {0, 3}) {
      check_like(w[j], hidden, what, "a norm weight");
      TORCH_CHECK_VALUE(w[j].dim() == 1 && w[j].size(0) == D && w[j].is_contiguous(), what, ": layer ", i,
                        ": norm weights must be contiguous (", D, ",), got ", w[j].sizes());
    }
    check_matrix(w[1], hidden, q_width + 2 * kv_width, D, what, i, "the fused q/k/v weight");
    check_matrix(w[2], hidden, D, q_width, what, i, "the o weight");
    if (mlp) {
      check_matrix(w[4], hidden, 2 * inter, D, what, i, "the fused gate/up weight");
      check_matrix(w[5], hidden, D, inter, what, i, "the down weight");
    }
    for (const at::Tensor* c : {&k_caches[i], &v_caches[i]}) {
      check_cache(*c, hidden, B, n_kv_heads, head_dim, what, "a cache");
      TORCH_CHECK_VALUE(c->sizes() == cache0.sizes() && c->strides() == cache0.strides(), what,
                        ": every layer's k and v caches must have one shape and layout, got ", c->sizes(), " strides ",
                        c->strides(), " and ", cache0.sizes(), " strides ", cache0.strides());
    }
    kr_cpu_decoder_layer& L = ls[i];
    L.input_norm = w[0].const_data_ptr(), L.qkv = w[1].const_data_ptr(), L.o = w[2].const_data_ptr();
    L.post_norm = w[3].const_data_ptr();
    L.gate_up = mlp ? w[4].const_data_ptr() : nullptr, L.down = mlp ? w[5].const_data_ptr() : nullptr;
    for (auto [bias, n, slot] : {std::make_tuple(&qkv_bias[i], q_width + 2 * kv_width, &L.qkv_bias),
                                 std::make_tuple(&o_bias[i], D, &L.o_bias)}) {
      at::Tensor f = bias_as_float(*bias, n, std::string(what) + ": layer " + std::to_string(i));
      *slot = f.defined() ? f.const_data_ptr<float>() : nullptr;
      if (f.defined()) biases.push_back(std::move(f));
    }
    L.k_cache = k_caches[i].mutable_data_ptr(), L.v_cache = v_caches[i].mutable_data_ptr();
  }
  return ls;
}

at::Tensor decoder_layers(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& cos,
                          const at::Tensor& sin, const std::vector<c10::optional<at::Tensor>>& weights,
                          const std::vector<c10::optional<at::Tensor>>& qkv_bias,
                          const std::vector<c10::optional<at::Tensor>>& o_bias, std::vector<at::Tensor> k_caches,
                          std::vector<at::Tensor> v_caches, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                          double eps, c10::optional<int64_t> kv_len) {
  const char* what = "kangaroo_rt._cpu.decoder_layers";
  int64_t inter = 0;
  std::vector<at::Tensor> biases;  // fp32 copies, kept alive for the call
  const std::vector<kr_cpu_decoder_layer> ls = layers_of(hidden, weights, qkv_bias, o_bias, k_caches, v_caches, n_heads,
                                                         n_kv_heads, head_dim, inter, biases, what);
  at::Tensor out = hidden.clone(at::MemoryFormat::Contiguous);
  if (ls.empty() || out.numel() == 0) return out;
  run_stack(out, positions, cos, sin, ls, k_caches[0], n_heads, n_kv_heads, head_dim, inter, eps, kv_len, what);
  return out;
}

// RoPE tables of positions 0..T-1 (the one-call round's inputs): cos and sin, each a contiguous (T, Dh) like ref.
void check_rope_rows(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& ref, int64_t T, int64_t Dh,
                     const char* what) {
  for (const at::Tensor* t : {&cos, &sin}) {
    check_like(*t, ref, what, "a RoPE table");
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == T && t->size(1) == Dh && t->is_contiguous(), what,
                      ": the RoPE tables must be contiguous (T, Dh) = (", T, ", ", Dh, "), got ", t->sizes());
  }
}

// Kangaroo's greedy draft chain of one round (csrc/cpu/draft.cpp), in place on the chain's tensors: the decode state
// pos, token, n_gen, max_new (B,) int64, finished (B,) bool, e_prev (B, D); the chain cap (B,) int64, active (B,)
// bool, conf (B,) fp32, x (B,) int64, drafts (B, gamma) int64, n_drafts (B,) int64, exits (B, gamma + 1, D), all
// contiguous; embed (V, D); rope_cos, rope_sin (T, Dh): the RoPE tables of positions 0..T-1; the target's layers
// 0..l-1 as decoder_layers takes them, and the adapter's (gate/up and down None); head (N, D) with head_ids (N,)
// (None: row n is token n) -> k, the drafting steps run.
// draft_chain's arguments, checked once and kept (the args point into the plan, which stays in place): run() drafts
// one round from the slots base_len (max(pos) + 1) on; the loop of greedy_decode runs it every round.
struct DraftPlan {
  kr_cpu_draft_args a{};
  std::vector<kr_cpu_decoder_layer> ls, adapter;
  std::vector<at::Tensor> keep;  // what the pointers point into (biases, head ids, the state and chain tensors)
  int64_t steps = 0;
  Region region;

  // -> k, the drafting steps run.
  int64_t run(int64_t base_len) {
    steps = 0;
    if (a.batch == 0) return steps;
    a.base_len = base_len;
    run_region(a, region, kr_cpu_draft_workspace_bytes, kr_cpu_draft_check, kr_cpu_draft_chain,
               "kangaroo_rt._cpu.draft_chain");
    return steps;
  }
};

std::unique_ptr<DraftPlan> plan_draft_chain(
    const at::Tensor& pos, const at::Tensor& token, const at::Tensor& n_gen, const at::Tensor& max_new,
    const at::Tensor& finished, const at::Tensor& e_prev, at::Tensor cap, at::Tensor active, at::Tensor conf,
    at::Tensor x, at::Tensor drafts, at::Tensor n_drafts, at::Tensor exits, const at::Tensor& embed,
    const at::Tensor& rope_cos, const at::Tensor& rope_sin, const std::vector<c10::optional<at::Tensor>>& weights,
    const std::vector<c10::optional<at::Tensor>>& qkv_bias, const std::vector<c10::optional<at::Tensor>>& o_bias,
    std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
    const std::vector<c10::optional<at::Tensor>>& adapter_weights, at::Tensor adapter_k_cache,
    at::Tensor adapter_v_cache, const at::Tensor& head, const c10::optional<at::Tensor>& head_ids, int64_t n_heads,
    int64_t n_kv_heads, int64_t head_dim, double eps, double adapter_eps, int64_t gamma, double eta) {
  const char* what = "kangaroo_rt._cpu.draft_chain";
  TORCH_CHECK_VALUE(exits.dim() == 3 && exits.is_contiguous() && exits.size(1) == gamma + 1, what,
                    ": exits must be a contiguous (B, gamma + 1, D) with gamma = ", gamma, ", got ", exits.sizes());
  const int64_t B = exits.size(0), D = exits.size(2);
  const at::Tensor probe = exits.narrow(1, 0, 1);  // (B, 1, D): what the layers' checks compare against
  auto plan = std::make_unique<DraftPlan>();
  int64_t inter = 0, adapter_inter = 0;
  std::vector<at::Tensor>& biases = plan->keep;
  const std::vector<kr_cpu_decoder_layer>& ls = plan->ls = layers_of(probe, weights, qkv_bias, o_bias, k_caches,
                                                                      v_caches, n_heads, n_kv_heads, head_dim, inter,
                                                                      biases, what);
  std::vector<at::Tensor> ak{adapter_k_cache}, av{adapter_v_cache};
  const std::vector<c10::optional<at::Tensor>> no_bias(1);
  const std::vector<kr_cpu_decoder_layer>& adapter = plan->adapter = layers_of(
      probe, adapter_weights, no_bias, no_bias, ak, av, n_heads, n_kv_heads, head_dim, adapter_inter, biases, what);
  TORCH_CHECK_VALUE(!ls.empty() && adapter.size() == 1 && adapter_inter == 0, what,
                    ": expects at least one target layer and one attention-only adapter layer");
  TORCH_CHECK_VALUE(ak[0].strides() == k_caches[0].strides() && ak[0].size(2) == k_caches[0].size(2), what,
                    ": the adapter's caches must have the target's layout");
  for (const at::Tensor* t : {&pos, &token, &n_gen, &max_new, static_cast<const at::Tensor*>(&cap),
                              static_cast<const at::Tensor*>(&x), static_cast<const at::Tensor*>(&n_drafts)})
    check_state_row(*t, B, at::kLong, what, "a (B,) state or chain tensor");
  for (const at::Tensor* t : {&finished, static_cast<const at::Tensor*>(&active)})
    check_state_row(*t, B, at::kBool, what, "a (B,) flag tensor");
  check_state_row(conf, B, at::kFloat, what, "conf");
  check_tokens(drafts, 2, what, "drafts");
  TORCH_CHECK_VALUE(drafts.size(0) == B && drafts.size(1) == gamma && drafts.is_contiguous(), what,
                    ": drafts must be a contiguous (", B, ", ", gamma, "), got ", drafts.sizes());
  for (const at::Tensor* t : {&e_prev, &embed, &head}) {
    check_like(*t, exits, what, "a hidden-state or weight tensor");
    TORCH_CHECK_VALUE(t->dim() == 2 && t->is_contiguous(), what, ": e_prev, embed and head must be contiguous 2-d ",
                      "tensors, got ", t->sizes());
  }
  TORCH_CHECK_VALUE(e_prev.size(0) == B && e_prev.size(1) == D && embed.size(1) == D && head.size(1) == D, what,
                    ": e_prev (B, D), embed (V, D) and head (N, D) must match exits' D = ", D);
  const int64_t T = k_caches[0].size(2);
  check_rope_rows(rope_cos, rope_sin, exits, T, head_dim, what);
  at::Tensor ids;
  if (head_ids.has_value()) {
    check_tokens(*head_ids, 1, what, "head_ids");
    TORCH_CHECK_VALUE(head_ids->size(0) == head.size(0), what, ": head_ids must have one id per head row");
    ids = head_ids->contiguous();
  }
  // the state and chain tensors the pointers below point into
  for (const at::Tensor& t : {pos, token, n_gen, max_new, finished, e_prev, cap, active, conf, x, drafts, n_drafts,
                              exits, ids})
    plan->keep.push_back(t);
  kr_cpu_draft_args& a = plan->a;
  a.dtype = dtype_code(exits, what, "exits");
  a.batch = B, a.hidden_size = D, a.n_heads = n_heads, a.n_kv_heads = n_kv_heads, a.head_dim = head_dim;
  a.intermediate = inter, a.max_len = T;
  a.eps = static_cast<float>(eps), a.adapter_eps = static_cast<float>(adapter_eps);
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  a.gamma = gamma, a.eta = static_cast<float>(eta);
  a.exit_layer = static_cast<int64_t>(ls.size()), a.layers = ls.data(), a.adapter = adapter.data();
  for (int d = 0; d < 3; ++d) a.cache_stride[d] = k_caches[0].stride(d);
  a.embed = embed.const_data_ptr(), a.vocab = embed.size(0);
  a.head = head.const_data_ptr(), a.head_rows = head.size(0);
  a.head_ids = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
  a.rope_cos = rope_cos.const_data_ptr(), a.rope_sin = rope_sin.const_data_ptr();
  a.pos = pos.const_data_ptr<int64_t>(), a.token = token.const_data_ptr<int64_t>();
  a.n_gen = n_gen.const_data_ptr<int64_t>(), a.max_new = max_new.const_data_ptr<int64_t>();
  a.finished = reinterpret_cast<const uint8_t*>(finished.const_data_ptr<bool>()), a.e_prev = e_prev.const_data_ptr();
  a.cap = cap.mutable_data_ptr<int64_t>(), a.active = reinterpret_cast<uint8_t*>(active.mutable_data_ptr<bool>());
  a.conf = conf.mutable_data_ptr<float>(), a.x = x.mutable_data_ptr<int64_t>();
  a.drafts = drafts.mutable_data_ptr<int64_t>(), a.n_drafts = n_drafts.mutable_data_ptr<int64_t>();
  a.exits = exits.mutable_data_ptr(), a.steps = &plan->steps;
  return plan;
}


// A target pass with greedy acceptance (csrc/cpu/target_pass.cpp), in place on the decode state pos, token, n_gen,
// max_new (B,) int64, finished (B,) bool, out (B, W) int64, e_prev (B, D) or None: from embed (V, D) over each row's
// token (q_len 1: a plain step), or from exits (B, >= q_len, D) with drafts (B, >= q_len - 1) and n_drafts (B,) (a
// verification); the layers as decoder_layers takes them; norm (D,), head (N, D), RoPE tables (T, Dh) ->
// (accepted, committed) (B,) int64.
// target_pass's arguments, checked once and kept (the args point into the plan, which stays in place): run() makes
// one pass over q_len <= q_len_max tokens a row reading kv_len slots; the loop of greedy_decode runs it every step.
struct TargetPlan {
  kr_cpu_target_pass_args a{};
  std::vector<kr_cpu_decoder_layer> ls;
  std::vector<at::Tensor> keep;  // what the pointers point into (biases, the state tensors, the inputs)
  at::Tensor eos_holder, accepted, committed;  // (B,) int64 each: the last run's
  int64_t q_len_max = 1;
  Region region;

  void run(int64_t q_len, int64_t kv_len) {
    TORCH_CHECK_VALUE(1 <= q_len && q_len <= q_len_max, "kangaroo_rt._cpu.target_pass: q_len ", q_len,
                      " is outside [1, ", q_len_max, "]");
    if (a.batch == 0) return;
    a.q_len = q_len, a.kv_len = kv_len;
    run_region(a, region, kr_cpu_target_pass_workspace_bytes, kr_cpu_target_pass_check, kr_cpu_target_pass,
               "kangaroo_rt._cpu.target_pass");
  }
};

std::unique_ptr<TargetPlan> plan_target_pass(
    at::Tensor pos, at::Tensor token, at::Tensor out, at::Tensor n_gen, at::Tensor finished, const at::Tensor& max_new,
    const c10::optional<at::Tensor>& eos, c10::optional<at::Tensor> e_prev, const c10::optional<at::Tensor>& embed,
    const c10::optional<at::Tensor>& exits, const c10::optional<at::Tensor>& drafts,
    const c10::optional<at::Tensor>& n_drafts, int64_t q_len, const at::Tensor& rope_cos, const at::Tensor& rope_sin,
    const std::vector<c10::optional<at::Tensor>>& weights, const std::vector<c10::optional<at::Tensor>>& qkv_bias,
    const std::vector<c10::optional<at::Tensor>>& o_bias, std::vector<at::Tensor> k_caches,
    std::vector<at::Tensor> v_caches, const at::Tensor& norm, double norm_eps, const at::Tensor& head, int64_t n_heads,
    int64_t n_kv_heads, int64_t head_dim, double eps) {
  const char* what = "kangaroo_rt._cpu.target_pass";
  TORCH_CHECK_VALUE(embed.has_value() != exits.has_value(), what, ": give embed (a plain step) or exits, not both");
  TORCH_CHECK_VALUE(q_len >= 1 && (exits.has_value() || q_len == 1), what, ": q_len must be >= 1 (1 from embed)");
  check_tokens(pos, 1, what, "pos");
  const int64_t B = pos.size(0);
  const at::Tensor& src = embed.has_value() ? *embed : *exits;
  TORCH_CHECK_VALUE(src.dim() == (embed.has_value() ? 2 : 3) && src.is_contiguous() &&
                        (embed.has_value() || (src.size(0) == B && src.size(1) >= q_len)),
                    what, ": embed must be a contiguous (V, D), exits a contiguous (B, >= q_len, D), got ",
                    src.sizes());
  const int64_t D = src.size(-1);
  const at::Tensor ref = embed.has_value() ? embed->narrow(0, 0, 1).unsqueeze(0).expand({B, 1, D})
                                           : exits->narrow(1, 0, q_len);  // (B, q_len, D): what the checks compare
  auto plan = std::make_unique<TargetPlan>();
  plan->q_len_max = q_len;
  int64_t inter = 0;
  const std::vector<kr_cpu_decoder_layer>& ls = plan->ls = layers_of(ref, weights, qkv_bias, o_bias, k_caches, v_caches,
                                                                      n_heads, n_kv_heads, head_dim, inter, plan->keep,
                                                                      what);
  TORCH_CHECK_VALUE(!ls.empty(), what, ": expects at least one layer");
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&pos), static_cast<const at::Tensor*>(&token),
                              static_cast<const at::Tensor*>(&n_gen), &max_new})
    check_state_row(*t, B, at::kLong, what, "a state row");
  check_state_row(finished, B, at::kBool, what, "finished");
  check_out(out, B, what);
  const auto e = eos_ids(eos, plan->eos_holder, what);
  for (const at::Tensor* t : {&norm, &head}) {
    check_like(*t, ref, what, "the norm or the head");
    TORCH_CHECK_VALUE(t->is_contiguous() && t->size(-1) == D, what,
                      ": the norm (D,) and head (N, D) must be contiguous, got ", t->sizes());
  }
  TORCH_CHECK_VALUE(norm.dim() == 1 && head.dim() == 2, what, ": bad norm or head shapes");
  check_rope_rows(rope_cos, rope_sin, ref, k_caches[0].size(2), head_dim, what);
  if (e_prev.has_value()) {
    check_like(*e_prev, ref, what, "e_prev");
    TORCH_CHECK_VALUE(e_prev->dim() == 2 && e_prev->size(0) == B && e_prev->size(1) == D && e_prev->is_contiguous(),
                      what, ": e_prev must be a contiguous (B, D)");
  }
  if (q_len > 1) {
    TORCH_CHECK_VALUE(drafts.has_value() && n_drafts.has_value(), what, ": a verification needs drafts and n_drafts");
    check_tokens(*drafts, 2, what, "drafts");
    TORCH_CHECK_VALUE(drafts->size(0) == B && drafts->size(1) >= q_len - 1 && drafts->stride(1) == 1, what,
                      ": drafts must be (B, >= q_len - 1) of unit column stride, got ", drafts->sizes());
    check_state_row(*n_drafts, B, at::kLong, what, "n_drafts");
  }
  plan->accepted = at::zeros({B}, pos.options()), plan->committed = at::zeros({B}, pos.options());
  // the state tensors and inputs the pointers below point into
  for (const at::Tensor& t : {pos, token, out, n_gen, finished, max_new, norm, head, rope_cos, rope_sin})
    plan->keep.push_back(t);
  for (const c10::optional<at::Tensor>* t :
       std::initializer_list<const c10::optional<at::Tensor>*>{&e_prev, &embed, &exits, &drafts, &n_drafts})
    if (t->has_value()) plan->keep.push_back(**t);
  kr_cpu_target_pass_args& a = plan->a;
  a.dtype = dtype_code(ref, what, "hidden");
  a.batch = B, a.q_len = q_len, a.hidden_size = D, a.n_heads = n_heads, a.n_kv_heads = n_kv_heads;
  a.head_dim = head_dim, a.intermediate = inter, a.max_len = k_caches[0].size(2);
  a.eps = static_cast<float>(eps), a.norm_eps = static_cast<float>(norm_eps);
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  a.n_layers = static_cast<int64_t>(ls.size()), a.layers = ls.data();
  for (int d = 0; d < 3; ++d) a.cache_stride[d] = k_caches[0].stride(d);
  if (embed.has_value())
    a.embed = embed->const_data_ptr(), a.vocab = embed->size(0);
  else
    a.exits = exits->const_data_ptr(), a.exits_stride = exits->stride(0);
  a.norm = norm.const_data_ptr(), a.head = head.const_data_ptr(), a.head_rows = head.size(0);
  a.rope_cos = rope_cos.const_data_ptr(), a.rope_sin = rope_sin.const_data_ptr();
  if (q_len > 1) {
    a.drafts = drafts->const_data_ptr<int64_t>(), a.drafts_stride = drafts->stride(0);
    a.n_drafts = n_drafts->const_data_ptr<int64_t>();
  }
  a.pos = pos.mutable_data_ptr<int64_t>(), a.token = token.mutable_data_ptr<int64_t>();
  a.out = out.mutable_data_ptr<int64_t>(), a.out_stride = out.stride(0), a.out_width = out.size(1);
  a.n_gen = n_gen.mutable_data_ptr<int64_t>();
  a.finished = reinterpret_cast<uint8_t*>(finished.mutable_data_ptr<bool>());
  a.max_new = max_new.const_data_ptr<int64_t>(), a.eos = e.first, a.n_eos = e.second;
  a.e_prev = e_prev.has_value() ? e_prev->mutable_data_ptr() : nullptr;
  a.accepted = plan->accepted.mutable_data_ptr<int64_t>(), a.committed = plan->committed.mutable_data_ptr<int64_t>();
  return plan;
}


// Greedy decoding to the end in one call: Decoder.decode's loop when no streamer waits for each step. Plain steps
// (draft None: pass from the rows' tokens, kv_len max(pos) + 1) or Kangaroo rounds (draft's chain from base_len =
// max(pos) + 1, then pass over its k drafts, kv_len base_len + k), each run as draft_chain and target_pass run it,
// with no Python between them: the same tokens and bits. Stops when every row is finished, after max_rounds, or
// before a round whose slots would pass the cache (base_len + gamma, or a plain step's kv_len, above T: the Python
// loop takes over there). -> (rounds run R, and per round: rows active at its start (R, B) bool, tokens committed,
// drafts proposed, drafts accepted (R, B) int64, drafting steps (R,) int64, seconds drafting and verifying (R, 2)
// fp64).
// Plans travel to Python as capsules (no pybind11 class: two builds of this extension load side by side in one
// process, as benchmarks/bench_ab.py does, and a class would be registered twice).
constexpr const char* kTargetPlan = "kangaroo_rt._cpu.TargetPlan";
constexpr const char* kDraftPlan = "kangaroo_rt._cpu.DraftPlan";

template <typename Plan>
py::capsule to_capsule(std::unique_ptr<Plan> plan, const char* name) {
  return py::capsule(plan.release(), name, [](PyObject* o) {
    delete static_cast<Plan*>(PyCapsule_GetPointer(o, PyCapsule_GetName(o)));
  });
}

// draft_chain(args..., base_len) and target_pass(args..., kv_len): a plan made and run once.
template <typename... Args>
auto draft_once(std::unique_ptr<DraftPlan> (*make)(Args...)) {
  return [make](Args... args, int64_t base_len) { return make(args...)->run(base_len); };
}

template <typename... Args>
auto pass_once(std::unique_ptr<TargetPlan> (*make)(Args...)) {
  return [make](Args... args, int64_t kv_len) {
    const std::unique_ptr<TargetPlan> plan = make(args...);
    plan->run(plan->q_len_max, kv_len);
    return std::make_tuple(plan->accepted, plan->committed);
  };
}

// A binding of make(args...) that hands its plan to Python as a capsule.
template <typename Plan, typename... Args>
auto capsuled(std::unique_ptr<Plan> (*make)(Args...), const char* name) {
  return [make, name](Args... args) { return to_capsule(make(args...), name); };
}

template <typename Plan>
Plan* from_capsule(const py::object& o, const char* name, const char* what) {
  TORCH_CHECK_VALUE(PyCapsule_CheckExact(o.ptr()) && PyCapsule_IsValid(o.ptr(), name), what, ": expected a plan from ",
                    name == kTargetPlan ? "plan_target_pass" : "plan_draft_chain");
  return static_cast<Plan*>(PyCapsule_GetPointer(o.ptr(), name));
}

std::vector<at::Tensor> greedy_decode_plans(TargetPlan& pass, DraftPlan* draft, int64_t max_rounds) {
  using Clock = std::chrono::steady_clock;
  const char* what = "kangaroo_rt._cpu.greedy_decode";
  TORCH_CHECK_VALUE(max_rounds >= 0, what, ": max_rounds must be >= 0");
  const kr_cpu_target_pass_args& a = pass.a;
  TORCH_CHECK_VALUE(draft == nullptr || (draft->a.batch == a.batch && draft->a.pos == a.pos &&
                                          pass.q_len_max == draft->a.gamma + 1 && a.exits == draft->a.exits),
                    what, ": the pass must verify the draft plan's chain over the same state (q_len gamma + 1)");
  TORCH_CHECK_VALUE(draft != nullptr || a.embed != nullptr, what, ": plain steps need a pass from the rows' tokens");
  const int64_t B = a.batch, T = a.max_len, gamma = draft == nullptr ? 0 : draft->a.gamma;
  const at::TensorOptions i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor active = at::zeros({max_rounds, B}, at::TensorOptions().dtype(at::kBool));
  at::Tensor committed = at::zeros({max_rounds, B}, i64), n_drafts = at::zeros({max_rounds, B}, i64);
  at::Tensor accepted = at::zeros({max_rounds, B}, i64), steps = at::zeros({max_rounds}, i64);
  at::Tensor seconds = at::zeros({max_rounds, 2}, at::TensorOptions().dtype(at::kDouble));
  int64_t r = 0;
  for (; r < max_rounds; ++r) {
    bool any = false;
    int64_t max_pos = 0;
    for (int64_t b = 0; b < B; ++b) {
      any = any || a.finished[b] == 0;
      max_pos = b == 0 ? a.pos[b] : std::max(max_pos, a.pos[b]);
    }
    const int64_t base_len = max_pos + 1;
    if (!any || base_len + gamma > T) break;
    for (int64_t b = 0; b < B; ++b) active[r][b] = a.finished[b] == 0;
    const Clock::time_point start = Clock::now();
    const int64_t k = draft == nullptr ? 0 : draft->run(base_len);
    const Clock::time_point drafted = Clock::now();
    pass.run(k + 1, base_len + k);
    const std::chrono::duration<double> draft_s = drafted - start, verify_s = Clock::now() - drafted;
    committed[r].copy_(pass.committed);
    accepted[r].copy_(pass.accepted);
    if (draft != nullptr)
      std::copy(draft->a.n_drafts, draft->a.n_drafts + B, n_drafts[r].mutable_data_ptr<int64_t>());
    steps[r] = k;
    seconds[r][0] = draft_s.count(), seconds[r][1] = verify_s.count();
  }
  return {at::scalar_tensor(r, i64), active.narrow(0, 0, r), committed.narrow(0, 0, r), n_drafts.narrow(0, 0, r),
          accepted.narrow(0, 0, r), steps.narrow(0, 0, r), seconds.narrow(0, 0, r)};
}

std::vector<at::Tensor> greedy_decode(const py::object& plan, const py::object& draft, int64_t max_rounds) {
  const char* what = "kangaroo_rt._cpu.greedy_decode";
  TargetPlan* pass = from_capsule<TargetPlan>(plan, kTargetPlan, what);
  DraftPlan* chain = draft.is_none() ? nullptr : from_capsule<DraftPlan>(draft, kDraftPlan, what);
  py::gil_scoped_release release;
  return greedy_decode_plans(*pass, chain, max_rounds);
}

// x: (M, K_max) fp32 or bf16, contiguous; weights: (N_i, K_i) of x's dtype, contiguous, K_i <= K_max -> (M, sum N_i)
// (out, when given: a benchmark reuses it rather than fault in a fresh allocation per pass):
// linear i's output in its own columns, each row's bits those of linear(x[:, :K_i], W_i). One call, one start of
// the threads, for a whole list of matrices (benchmarks/bench_linear.py: the kernel's stream as the stack drives it).
at::Tensor linear_sweep(const at::Tensor& x, const std::vector<at::Tensor>& weights, c10::optional<at::Tensor> out,
                        bool packed) {
  const char* what = "kangaroo_rt._cpu.linear_sweep";
  const int dtype = dtype_code(x, what, "x");
  TORCH_CHECK_VALUE(!packed || dtype == KR_CPU_BFLOAT16, what, ": packed weights are bf16 only");
  check_like(x, x, what, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), what, ": x must be a contiguous (M, K), got ", x.sizes(),
                    " strides ", x.strides());
  std::vector<const void*> ptrs;
  std::vector<int64_t> n_out, n_in;
  int64_t cols = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    check_like(w, x, what, "a weight");
    TORCH_CHECK_VALUE(w.dim() == 2 && w.is_contiguous() && w.size(0) > 0 && w.size(1) > 0 && w.size(1) <= x.size(1),
                      what, ": weight ", i, " must be a contiguous, non-empty (N, K) with K <= x.shape[1] = ",
                      x.size(1), ", got ", w.sizes(), " strides ", w.strides());
    TORCH_CHECK_VALUE(!packed || (w.size(0) % KR_CPU_PACK_ROWS == 0 && w.size(1) % 32 == 0), what, ": packed weight ",
                      i, " must have N a multiple of ", KR_CPU_PACK_ROWS, " and K of 32, got ", w.sizes());
    ptrs.push_back(w.const_data_ptr());
    n_out.push_back(w.size(0));
    n_in.push_back(w.size(1));
    cols += w.size(0);
  }
  at::Tensor y = out.has_value() ? *out : at::empty({x.size(0), cols}, x.options());
  if (out.has_value()) {
    check_like(y, x, what, "out");
    TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == cols && y.is_contiguous(), what,
                      ": out must be a contiguous (", x.size(0), ", ", cols, "), got ", y.sizes());
  }
  kr_cpu_linear_sweep_args a{};
  a.dtype = dtype, a.rows = x.size(0), a.n_linears = static_cast<int64_t>(weights.size()), a.packed = packed ? 1 : 0;
  a.weights = ptrs.data(), a.n_out = n_out.data(), a.n_in = n_in.data();
  a.x = x.const_data_ptr(), a.ld_x = x.size(1), a.y = y.mutable_data_ptr(), a.ld_y = cols;
  run_one_region(a, kr_cpu_linear_sweep_workspace_bytes, kr_cpu_linear_sweep_check, kr_cpu_linear_sweep, what);
  return y;
}

std::string isa() { return kr_cpu_isa_name(process_isa()); }

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kangaroo_rt's CPU kernels (csrc/cpu/); kangaroo_rt.ops dispatches to them";
  m.def("linear", &linear, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        "x (..., K) fp32/bf16 @ weight (N, K) fp32/bf16 contiguous ^T (+ bias (N,)) -> (..., N) in x's dtype; "
        "each row's bits are those it has alone");
  m.def("linear_with_isa", &linear_with_isa, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("isa"),
        py::call_guard<py::gil_scoped_release>(),
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
  m.def("decoder_layers", &decoder_layers, py::arg("hidden"), py::arg("positions"), py::arg("cos"), py::arg("sin"),
        py::arg("weights"), py::arg("qkv_bias"), py::arg("o_bias"), py::arg("k_caches"), py::arg("v_caches"),
        py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("kv_len") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        "a stack of Llama decoder layers (fused q/k/v and gate/up weights; gate/up and down None: an "
        "attention-only layer with a normed output, Kangaroo's adapter) over the static cache in one call; "
        "the bits of the per-op path");
// The arguments of plan_draft_chain and plan_target_pass (draft_chain and target_pass add base_len and kv_len).
#define KR_CHAIN_ARGS                                                                                                 \
  py::arg("pos"), py::arg("token"), py::arg("n_gen"), py::arg("max_new"), py::arg("finished"), py::arg("e_prev"),     \
      py::arg("cap"), py::arg("active"), py::arg("conf"), py::arg("x"), py::arg("drafts"), py::arg("n_drafts"),       \
      py::arg("exits"), py::arg("embed"), py::arg("rope_cos"), py::arg("rope_sin"), py::arg("weights"),               \
      py::arg("qkv_bias"), py::arg("o_bias"), py::arg("k_caches"), py::arg("v_caches"), py::arg("adapter_weights"),   \
      py::arg("adapter_k_cache"), py::arg("adapter_v_cache"), py::arg("head"), py::arg("head_ids"),                  \
      py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("adapter_eps"),        \
      py::arg("gamma"), py::arg("eta")
#define KR_PASS_ARGS                                                                                                  \
  py::arg("pos"), py::arg("token"), py::arg("out"), py::arg("n_gen"), py::arg("finished"), py::arg("max_new"),        \
      py::arg("eos"), py::arg("e_prev"), py::arg("embed"), py::arg("exits"), py::arg("drafts"), py::arg("n_drafts"),  \
      py::arg("q_len"), py::arg("rope_cos"), py::arg("rope_sin"), py::arg("weights"), py::arg("qkv_bias"),            \
      py::arg("o_bias"), py::arg("k_caches"), py::arg("v_caches"), py::arg("norm"), py::arg("norm_eps"),              \
      py::arg("head"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("eps")
  m.def("draft_chain", draft_once(&plan_draft_chain), KR_CHAIN_ARGS, py::arg("base_len"),
        py::call_guard<py::gil_scoped_release>(),
        "a round's greedy Kangaroo drafting in one call (begin_round, shallow steps, keep_drafting, draft steps), "
        "in place on the chain's tensors; the bits of the per-step path; -> k, the drafting steps run");
  m.def("target_pass", pass_once(&plan_target_pass), KR_PASS_ARGS, py::arg("kv_len"),
        py::call_guard<py::gil_scoped_release>(),
        "a plain step (from embed) or a verification (from exits) with the final norm, the head, greedy acceptance "
        "and commit, in place on the decode state; the bits of the step-by-step path; -> (accepted, committed)");
  m.def("plan_draft_chain", capsuled(&plan_draft_chain, kDraftPlan), KR_CHAIN_ARGS,
        "draft_chain's arguments without base_len, checked once: a plan (capsule) for greedy_decode");
  m.def("plan_target_pass", capsuled(&plan_target_pass, kTargetPlan), KR_PASS_ARGS,
        "target_pass's arguments without kv_len, checked once: a plan (capsule) for greedy_decode; q_len is the most "
        "tokens a row a pass may take");
#undef KR_CHAIN_ARGS
#undef KR_PASS_ARGS
  m.def("greedy_decode", &greedy_decode, py::arg("plan"), py::arg("draft").none(true), py::arg("max_rounds"),
        "plain steps (draft None) or Kangaroo rounds until every row is finished, in one call: -> (rounds, active, "
        "committed, n_drafts, accepted, steps, seconds)");
  m.def("linear_sweep", &linear_sweep, py::arg("x"), py::arg("weights"), py::arg("out") = py::none(),
        py::arg("packed") = false,
        py::call_guard<py::gil_scoped_release>(),
        "x (M, K) @ each weight (N_i, K_i <= K)^T in one call on one set of threads -> (M, sum N_i) (into out when "
        "given), for benchmarks; packed: bf16 weights in the packed layout (_cpu_ext.pack_rows_bf16)");
  m.def("argmax", &argmax, py::arg("logits"), py::call_guard<py::gil_scoped_release>(),
        "logits (..., n) fp32/bf16 -> (...) int64: the first index of the largest value, a NaN the largest");
  m.def("greedy_with_confidence", &greedy_with_confidence, py::arg("logits"), py::call_guard<py::gil_scoped_release>(),
        "logits (..., n) fp32/bf16 -> (argmax (...) int64, its softmax probability (...) fp32)");
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
  m.attr("ROW_BLOCK") = KR_CPU_ROW_BLOCK;
  m.attr("MAX_ROWS_PER_PASS") = KR_CPU_MAX_ROWS_PER_PASS;
}
