// kangaroo_rt._cpu: pybind11/torch glue over the raw-pointer CPU kernels of csrc/cpu/ (see cpu/kr_cpu.h).
// kangaroo_rt/_cpu_ext.py routes the inputs these functions refuse to the torch reference.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
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
  for (int isa : {KR_CPU_ISA_AVX512, KR_CPU_ISA_AVX2, KR_CPU_ISA_PORTABLE}) {
    if (name == kr_cpu_isa_name(isa)) {
      TORCH_CHECK_VALUE(kr_cpu_isa_supported(isa), "kangaroo_rt._cpu: this CPU cannot run the ", name, " variant");
      return isa;
    }
  }
  TORCH_CHECK_VALUE(false, "kangaroo_rt._cpu: unknown variant ", name, " (avx512, avx2, portable)");
  return KR_CPU_ISA_INVALID;
}

// x: (..., K) fp32 or bf16; weight: (N, K) fp32 or bf16, contiguous; bias: (N,) fp32 or bf16 -> (..., N) in x's
// dtype. bf16 activations are widened to fp32 (exact) and the fp32 result is rounded to bf16 at the end, as
// torch's bf16 linear does. Rows are independent: any number of them, computed in passes of at most
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
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->layout() == at::kStrided && bias->device().is_cpu(), what,
                      ": bias must be a dense CPU tensor, got ", bias->device());
    TORCH_CHECK_TYPE(kernel_dtype(bias->scalar_type()), what, ": bias must be float32 or bfloat16, got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, what, ": bias must be (N,) with N = ", N, ", got shape ",
                      bias->sizes());
    bias_f = bias->to(at::kFloat).contiguous();
  }

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  int64_t M = 1;
  for (int64_t d : out_shape) M *= d;
  out_shape.push_back(N);
  at::Tensor x2 = x.reshape({M, K});
  if (x2.scalar_type() != at::kFloat) x2 = x2.to(at::kFloat);
  if (M > 0 && K > 0 && (x2.stride(1) != 1 || (M > 1 && x2.stride(0) < K))) x2 = x2.contiguous();
  const int64_t ldx = M > 1 ? x2.stride(0) : K;
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));

  if (M > 0 && N > 0) {
    const float* xp = x2.const_data_ptr<float>();
    const void* wp = weight.const_data_ptr();
    const float* bp = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
    float* yp = y.mutable_data_ptr<float>();
    const int w_dtype = weight_dtype_code(weight.scalar_type());
    const int64_t row_bytes = K * static_cast<int64_t>(weight.element_size());
    const int64_t block_bytes = std::max<int64_t>(1, KR_CPU_ROW_BLOCK * row_bytes);
    const int64_t n_blocks = (N + KR_CPU_ROW_BLOCK - 1) / KR_CPU_ROW_BLOCK;
    const int64_t grain = std::max<int64_t>(1, kMinWeightBytesPerTask / block_bytes);
    // Each task takes a contiguous run of whole row blocks; a row's bits do not depend on the split.
    at::parallel_for(0, n_blocks, grain, [&](int64_t b0, int64_t b1) {
      const int64_t n_begin = b0 * KR_CPU_ROW_BLOCK, n_end = std::min(N, b1 * KR_CPU_ROW_BLOCK);
      const int rc = kr_cpu_linear_rows_isa(isa, xp, M, K, ldx, wp, w_dtype, N, bp, yp, N, n_begin, n_end);
      TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel refused its arguments (status ", rc, ")");
    });
  }
  if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
  return y.view(out_shape);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return linear_with(x, weight, bias, process_isa());
}

at::Tensor linear_with_isa(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const std::string& isa) {
  return linear_with(x, weight, bias, isa_by_name(isa));
}

std::string isa() { return kr_cpu_isa_name(process_isa()); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (int isa : {KR_CPU_ISA_AVX512, KR_CPU_ISA_AVX2, KR_CPU_ISA_PORTABLE})
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
        "linear() with a given variant (avx512, avx2, portable), for tests and benchmarks");
  m.def("isa", &isa, "the variant this process uses; ValueError when KANGAROO_RT_CPU_ISA asks for one it cannot");
  m.def("supported_isas", &supported_isas, "the variants this CPU runs, best first");
  m.attr("ROW_BLOCK") = KR_CPU_ROW_BLOCK;
  m.attr("MAX_ROWS_PER_PASS") = KR_CPU_MAX_ROWS_PER_PASS;
}
