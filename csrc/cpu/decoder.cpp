// A stack of Llama decoder layers in one call, on one set of threads. See kr_cpu.h for the contract.
//
// The per-op path (kangaroo_rt.model.DecoderLayer calling each op) costs about 45 us a layer at one token beyond
// its weight stream: a dozen torch dispatches, allocations and views, and a thread fork and join per op. Here
// the threads start once for the whole stack and meet between ops at a counter: each op's work is cut into
// chunks (output-row blocks of a linear, rows of a norm, batch rows of RoPE, tiles of attention) that the threads
// claim one at a time, and a thread moves on to the next op when the last chunk of this one is done. A chunk
// runs the per-op kernel on its slice, and those kernels give each output element the same bits whatever the
// slice, so the stack has the per-op path's bits for any number of threads. Buffers live in one workspace.
#include "kr_cpu_stack.h"

namespace {

using namespace kr_cpu;

// Byte offsets of a stack's workspace: a pair of counters per phase, the status, the scratch rows.
struct Layout {
  int64_t sync, status, buffers, total;
};

Layout layout_of(const kr_cpu_decoder_args& a) {
  Layout l{};
  l.sync = 0;
  l.status = align64(a.n_layers * kPhasesPerLayer * kCounterStride * 8);
  l.buffers = l.status + 64;
  l.total = l.buffers + StackBuffers(sizes_of(a), a.dtype).total;
  return l;
}

template <typename T>
int run_stack(int isa, const kr_cpu_decoder_args& a) {
  const Layout l = layout_of(a);
  char* ws = static_cast<char*>(a.workspace);
  int64_t* status = reinterpret_cast<int64_t*>(ws + l.status);
  Phases ph(reinterpret_cast<int64_t*>(ws + l.sync), status, std::max<int64_t>(1, a.threads),
            phase_capacity(l.sync, l.status));
  stack_body<T>(ph, isa, a, ws + l.buffers);
  return static_cast<int>(__atomic_load_n(status, __ATOMIC_RELAXED));
}

// Byte offsets of a sweep's workspace: a pair of counters per linear, the status, and bf16's fp32 rows.
struct SweepLayout {
  int64_t sync, status, yf, total;
};

SweepLayout sweep_layout_of(const kr_cpu_linear_sweep_args& a) {
  int64_t n_max = 0;
  for (int64_t i = 0; i < a.n_linears; ++i) n_max = std::max(n_max, a.n_out[i]);
  SweepLayout l{};
  l.sync = 0;
  l.status = align64(a.n_linears * kCounterStride * 8);
  l.yf = l.status + 64;
  l.total = l.yf + align64(a.dtype == KR_CPU_FLOAT32 ? 0 : a.rows * n_max * 4);
  return l;
}

template <typename T>
int run_sweep(int isa, const kr_cpu_linear_sweep_args& a) {
  const SweepLayout l = sweep_layout_of(a);
  char* ws = static_cast<char*>(a.workspace);
  Phases ph(reinterpret_cast<int64_t*>(ws + l.sync), reinterpret_cast<int64_t*>(ws + l.status),
            std::max<int64_t>(1, a.threads), phase_capacity(l.sync, l.status));
  int64_t col = 0;
  for (int64_t i = 0; i < a.n_linears; ++i) {
    linear_phase<T>(ph, isa, static_cast<const T*>(a.x), a.rows, a.n_in[i], a.ld_x, a.weights[i], a.n_out[i], nullptr,
                    static_cast<T*>(a.y) + col, a.ld_y, false, reinterpret_cast<float*>(ws + l.yf), a.packed != 0);
    col += a.n_out[i];
  }
  return static_cast<int>(__atomic_load_n(reinterpret_cast<int64_t*>(ws + l.status), __ATOMIC_RELAXED));
}

}  // namespace

extern "C" int64_t kr_cpu_linear_sweep_workspace_bytes(const kr_cpu_linear_sweep_args* a, int64_t* zeroed_bytes) {
  if (a == nullptr || a->rows < 0 || a->n_linears < 0 || (a->n_linears > 0 && a->n_out == nullptr) ||
      (a->dtype != KR_CPU_FLOAT32 && a->dtype != KR_CPU_BFLOAT16))
    return -1;
  const SweepLayout l = sweep_layout_of(*a);
  if (zeroed_bytes != nullptr) *zeroed_bytes = l.yf;
  return l.total;
}

extern "C" int kr_cpu_linear_sweep_check(int isa, const kr_cpu_linear_sweep_args* a) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (kr_cpu_linear_sweep_workspace_bytes(a, nullptr) < 0 || a->threads < 1) return KR_CPU_BAD_ARGUMENT;
  if (a->n_linears == 0 || a->rows == 0) return KR_CPU_OK;
  if (a->weights == nullptr || a->n_in == nullptr || a->x == nullptr || a->y == nullptr || a->workspace == nullptr ||
      reinterpret_cast<uintptr_t>(a->workspace) % 64 != 0)
    return KR_CPU_BAD_ARGUMENT;
  int64_t cols = 0;
  for (int64_t i = 0; i < a->n_linears; ++i) {
    if (a->weights[i] == nullptr || a->n_in[i] <= 0 || a->n_in[i] > a->ld_x || a->n_out[i] <= 0)
      return KR_CPU_BAD_ARGUMENT;
    if (a->packed && (a->dtype != KR_CPU_BFLOAT16 || a->n_in[i] % 2 != 0))
      return KR_CPU_BAD_ARGUMENT;
    cols += a->n_out[i];
  }
  return cols <= a->ld_y ? KR_CPU_OK : KR_CPU_BAD_ARGUMENT;
}

extern "C" int kr_cpu_linear_sweep(int isa, const kr_cpu_linear_sweep_args* a) {
  const int rc = kr_cpu_linear_sweep_check(isa, a);
  if (rc != KR_CPU_OK) return rc;
  if (a->n_linears == 0 || a->rows == 0) return KR_CPU_OK;
  return a->dtype == KR_CPU_FLOAT32 ? run_sweep<float>(isa, *a) : run_sweep<uint16_t>(isa, *a);
}

extern "C" int64_t kr_cpu_decoder_workspace_bytes(const kr_cpu_decoder_args* a, int64_t* zeroed_bytes) {
  if (a == nullptr || a->batch < 0 || a->q_len < 0 || a->hidden_size <= 0 || a->n_heads <= 0 ||
      a->n_kv_heads <= 0 || a->head_dim <= 0 || a->intermediate < 0 || a->n_layers < 0 ||
      (a->dtype != KR_CPU_FLOAT32 && a->dtype != KR_CPU_BFLOAT16))
    return -1;
  const Layout l = layout_of(*a);
  if (zeroed_bytes != nullptr) *zeroed_bytes = l.buffers;
  return l.total;
}

extern "C" int kr_cpu_decoder_check(int isa, const kr_cpu_decoder_args* a) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (kr_cpu_decoder_workspace_bytes(a, nullptr) < 0 || a->n_heads % a->n_kv_heads != 0 || a->head_dim % 2 != 0 ||
      a->max_len < 0 || a->kv_len < 0 || a->kv_len > a->max_len || a->threads < 1 ||
      (a->packed != 0 && a->dtype != KR_CPU_BFLOAT16))
    return KR_CPU_BAD_ARGUMENT;
  if (a->n_layers == 0 || a->batch * a->q_len == 0) return KR_CPU_OK;
  if (a->layers == nullptr || a->cos == nullptr || a->sin == nullptr || a->positions == nullptr ||
      a->hidden == nullptr || a->workspace == nullptr || reinterpret_cast<uintptr_t>(a->workspace) % 64 != 0)
    return KR_CPU_BAD_ARGUMENT;
  for (int64_t i = 0; i < a->n_layers; ++i) {
    const kr_cpu_decoder_layer& L = a->layers[i];
    if (L.input_norm == nullptr || L.qkv == nullptr || L.o == nullptr || L.post_norm == nullptr ||
        (L.gate_up == nullptr) != (L.down == nullptr) || (L.gate_up != nullptr && a->intermediate == 0) ||
        L.k_cache == nullptr || L.v_cache == nullptr)
      return KR_CPU_BAD_ARGUMENT;
  }
  return KR_CPU_OK;
}

extern "C" int kr_cpu_decoder_layers(int isa, const kr_cpu_decoder_args* a) {
  const int rc = kr_cpu_decoder_check(isa, a);
  if (rc != KR_CPU_OK) return rc;
  if (a->n_layers == 0 || a->batch * a->q_len == 0) return KR_CPU_OK;
  return a->dtype == KR_CPU_FLOAT32 ? run_stack<float>(isa, *a) : run_stack<uint16_t>(isa, *a);
}
