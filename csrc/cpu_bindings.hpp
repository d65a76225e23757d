// Helpers shared by the two translation units of kangaroo_rt._cpu's bindings: cpu_bindings.cpp (the ops and the
// module) and cpu_bindings_decode.cpp (the one-call layer stack, draft chain, target pass and greedy decode). Inline,
// so that each unit compiles them; only the bindings include this. It pulls in torch/extension.h, hence .hpp: the
// csrc/*.h headers stay torch-free for the .cu files and plain C (tests/test_csrc_compile.py).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <utility>

#include "cpu/kr_cpu.h"

namespace kr_bind {

inline int weight_dtype_code(at::ScalarType t) { return t == at::kFloat ? KR_CPU_FLOAT32 : KR_CPU_BFLOAT16; }

inline bool kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

                         inline int process_isa() {
  const int isa = kr_cpu_isa();
  TORCH_CHECK_VALUE(isa != KR_CPU_ISA_INVALID, "kangaroo_rt._cpu: ", kr_cpu_isa_error());
  return isa;
}

// kr_cpu_process_logits_rows' divisor and top_p from a sampling configuration, as the reference applies them: the
// temperature clamped to 1e-6 (then float, as torch divides the fp32 scores), top_p in double, 1 for none.
inline float sampling_divisor(double temperature) { return static_cast<float>(std::max(temperature, 1e-6)); }
inline double sampling_top_p(double top_p) { return top_p >= 1.0 ? 1.0 : top_p; }

// An optional bias (N,), float32 or bfloat16, as the fp32 (N,) the kernels add; an undefined tensor without one.
inline at::Tensor bias_as_float(const c10::optional<at::Tensor>& bias, int64_t N, const std::string& what) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(bias->layout() == at::kStrided && bias->device().is_cpu(), what,
                    ": bias must be a dense CPU tensor, got ", bias->device());
  TORCH_CHECK_TYPE(kernel_dtype(bias->scalar_type()), what, ": bias must be float32 or bfloat16, got ",
                   bias->scalar_type());
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, what, ": bias must be (N,) with N = ", N, ", got shape ",
                    bias->sizes());
  return bias->to(at::kFloat).contiguous();
}

inline int dtype_code(const at::Tensor& t, const char* what, const char* name) {
  TORCH_CHECK_TYPE(kernel_dtype(t.scalar_type()), what, ": ", name, " must be float32 or bfloat16, got ",
                   t.scalar_type());
  return weight_dtype_code(t.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* what, const char* name) {
  TORCH_CHECK_VALUE(t.layout() == at::kStrided && t.device().is_cpu(), what, ": ", name,
                    " must be a dense CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), what, ": ", name, " must be ", ref.scalar_type(),
                   " like the other inputs, got ", t.scalar_type());
}

inline void check_head_tensor(const at::Tensor& t, const at::Tensor& ref, int64_t B, int64_t H, int64_t Q, int64_t D,
                              const char* what, const char* name) {
  check_like(t, ref, what, name);
  TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == B && t.size(1) == H && t.size(2) == Q && t.size(3) == D, what,
                    ": ", name, " must be (", B, ", ", H, ", ", Q, ", ", D, "), got ", t.sizes());
  TORCH_CHECK_VALUE(D == 0 || t.stride(3) == 1 || t.numel() == 0, what, ": ", name,
                    " must have a unit stride on its last dimension, got strides ", t.strides());
}

inline void check_cache(const at::Tensor& c, const at::Tensor& ref, int64_t B, int64_t Hkv, int64_t D, const char* what,
                        const char* name) {
  check_like(c, ref, what, name);
  TORCH_CHECK_VALUE(c.dim() == 4 && c.size(0) >= B && c.size(1) == Hkv && c.size(3) == D && c.stride(3) == 1, what,
                    ": ", name, " must be (B_max >= ", B, ", ", Hkv, ", T, ", D, ") with a unit last stride, got ",
                    c.sizes(), " strides ", c.strides());
}

// RoPE's cos and sin tables: (B, Q, D) each, of ref's dtype.
inline void check_rope_tables(const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& ref, int64_t B, int64_t Q,
                              int64_t D, const char* what) {
  for (const at::Tensor* t : {&cos, &sin}) {
    check_like(*t, ref, what, "cos/sin");
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == B && t->size(1) == Q && t->size(2) == D, what,
                      ": cos and sin must be (", B, ", ", Q, ", ", D, "), got ", t->sizes());
  }
}

// The screened head's tensors (q (V, kp) int8, scale, qsum int32, err, wnorm (V,) float32; _cpu_ext.head_screen
// makes them) for a head of V rows of D, checked.
inline kr_cpu_head_screen screen_of(const std::vector<at::Tensor>& t, int64_t V, int64_t D, const char* what) {
  TORCH_CHECK_VALUE(t.size() == 5, what, ": head_screen must be (q, scale, qsum, err, wnorm), got ", t.size(),
                    " tensors");
  const at::ScalarType types[5] = {at::kChar, at::kFloat, at::kInt, at::kFloat, at::kFloat};
  for (int i = 0; i < 5; ++i)
    TORCH_CHECK_VALUE(t[i].device().is_cpu() && t[i].scalar_type() == types[i] && t[i].is_contiguous() &&
                          t[i].dim() == (i == 0 ? 2 : 1) && t[i].size(0) == V,
                      what, ": head_screen tensor ", i, " must be a contiguous CPU ", types[i], " with ", V,
                      " rows, got ", t[i].scalar_type(), " ", t[i].sizes());
  const int64_t kp = t[0].size(1);
  TORCH_CHECK_VALUE(kp >= D && kp % 64 == 0 && kp <= 32768, what,
                    ": head_screen's q must have a multiple of 64 in [", D, ", 32768] columns, got ", kp);
  kr_cpu_head_screen s{};
  s.q = t[0].const_data_ptr<int8_t>(), s.scale = t[1].const_data_ptr<float>();
  s.qsum = t[2].const_data_ptr<int32_t>(), s.err = t[3].const_data_ptr<float>();
  s.wnorm = t[4].const_data_ptr<float>(), s.kp = kp;
  return s;
}

inline at::Tensor check_positions(const at::Tensor& positions, int64_t B, int64_t Q, const char* what) {
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong && positions.device().is_cpu(), what,
                   ": positions must be a CPU int64 tensor, got ", positions.scalar_type(), " on ",
                   positions.device());
  TORCH_CHECK_VALUE(positions.dim() == 2, what, ": positions must be (B, q), got ", positions.sizes());
  return positions.expand({B, Q});
}

inline void check_tokens(const at::Tensor& t, int64_t dim, const char* what, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == dim, what, ": ", name,
                    " must be a ", dim, "-d int64 CPU tensor, got ", t.scalar_type(), " ", t.sizes(), " on ",
                    t.device());
}

inline void check_state_row(const at::Tensor& t, int64_t batch, at::ScalarType type, const char* what,
                            const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == type && t.dim() == 1 && t.size(0) >= batch &&
                        t.is_contiguous(),
                    what, ": ", name, " must be a contiguous (>= ", batch, ",) ", type, " CPU tensor, got ",
                    t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// eos ids (E,) -> (contiguous int64 holder, pointer, E); (nullptr, 0) when none
inline std::pair<const int64_t*, int64_t> eos_ids(const c10::optional<at::Tensor>& eos, at::Tensor& holder,
                                                  const char* what) {
  if (!eos.has_value() || eos->numel() == 0) return {nullptr, 0};
  TORCH_CHECK_VALUE(eos->device().is_cpu() && !at::isFloatingType(eos->scalar_type()), what,
                    ": eos must be integer ids on the CPU, got ", eos->scalar_type(), " on ", eos->device());
  holder = eos->reshape({-1}).to(at::kLong).contiguous();
  return {holder.const_data_ptr<int64_t>(), holder.numel()};
}

inline void check_out(const at::Tensor& out, int64_t batch, const char* what) {
  check_tokens(out, 2, what, "out");
  TORCH_CHECK_VALUE(out.size(0) >= batch && out.stride(1) == 1, what, ": out must be (>= ", batch,
                    ", W) with unit column stride, got ", out.sizes(), " strides ", out.strides());
}

// The decode-side functions' definitions on the module (cpu_bindings_decode.cpp).
void define_decode(pybind11::module_& m);

}  // namespace kr_bind
