// kangaroo_rt._cpu's one-call paths: a stack of decoder layers, Kangaroo's draft chain, a target pass with greedy
// acceptance, greedy decoding to the end, and the benchmarks' linear sweep, each on one set of threads meeting at
// counters (csrc/cpu/{decoder,draft,target_pass}.cpp). The ops one by one and the module are in cpu_bindings.cpp.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/kr_cpu.h"
#include "cpu_bindings.hpp"

namespace kr_bind {
namespace {

// ---- A stack of decoder layers in one call (csrc/cpu/decoder.cpp): kangaroo_rt.model.DecoderLayer.forward on the
// kernels of the functions above, so the bits of the per-op path, on one set of threads and without a torch call
// per op (about a dozen per layer: dispatch, checks, allocations and a thread fork each cost ~45 us a layer).

// Per layer, in this order: input norm (D,), fused q/k/v weight (Hq*Dh + 2*Hkv*Dh, D), o weight (D, Hq*Dh),
// post-attention norm (D,), fused gate/up weight (2*I, D), down weight (D, I).
constexpr size_t kLayerWeights = 6;

void check_matrix(const at::Tensor& w, const at::Tensor& ref, int64_t rows, int64_t cols, const char* what, size_t layer,
                  const char* name, bool packed = false) {
  check_like(w, ref, what, name);
  if (packed) cols += cols % 2;  // kr_cpu_pack_bf16's pairs
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
  for (int rc : status) {
    TORCH_CHECK_VALUE(rc != KR_CPU_NOT_A_DISTRIBUTION, what,
                      ": probability tensor contains either `inf`, `nan` or element < 0 (a sampled position's logits "
                      "or distribution cannot be drawn from)");
    TORCH_CHECK(rc == KR_CPU_OK, what, ": the kernel failed (status ", rc,
                rc == KR_CPU_FAILED ? ": out of memory, or more phases than the workspace counts" : "", ")");
  }
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
               bool packed, const char* what) {
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
  a.hidden = out.mutable_data_ptr(), a.packed = packed ? 1 : 0;
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
                                            std::vector<at::Tensor>& biases, bool packed, const char* what) {
  TORCH_CHECK_VALUE(!packed || hidden.scalar_type() == at::kBFloat16, what, ": packed weights are bf16 only, got ",
                    hidden.scalar_type(), " hidden states");
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
    check_matrix(w[1], hidden, q_width + 2 * kv_width, D, what, i, "the fused q/k/v weight", packed);
    check_matrix(w[2], hidden, D, q_width, what, i, "the o weight", packed);
    if (mlp) {
      check_matrix(w[4], hidden, 2 * inter, D, what, i, "the fused gate/up weight", packed);
      check_matrix(w[5], hidden, D, inter, what, i, "the down weight", packed);
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
                          double eps, c10::optional<int64_t> kv_len, bool packed) {
  const char* what = "kangaroo_rt._cpu.decoder_layers";
  int64_t inter = 0;
  std::vector<at::Tensor> biases;  // fp32 copies, kept alive for the call
  const std::vector<kr_cpu_decoder_layer> ls = layers_of(hidden, weights, qkv_bias, o_bias, k_caches, v_caches, n_heads,
                                                         n_kv_heads, head_dim, inter, biases, packed, what);
  at::Tensor out = hidden.clone(at::MemoryFormat::Contiguous);
  if (ls.empty() || out.numel() == 0) return out;
  run_stack(out, positions, cos, sin, ls, k_caches[0], n_heads, n_kv_heads, head_dim, inter, eps, kv_len, packed, what);
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

// Per-row sampling settings (kr_cpu_row_sampling) from (B,) CPU tensors: temperature (0: a greedy row), top_k (0:
// none) and top_p (>= 1: none), converted as the sampling op's binding converts them; the arrays stay with the plan.
struct RowSamplingArrays {
  at::Tensor divisor, top_k, top_p;

  RowSamplingArrays(const at::Tensor& temperature, const at::Tensor& k, const at::Tensor& p, int64_t B,
                    const char* what) {
    for (const at::Tensor* t : {&temperature, &k, &p})
      TORCH_CHECK_VALUE(t->device().is_cpu() && t->dim() == 1 && t->size(0) == B, what,
                        ": temperature, top_k and top_p must be (", B, ",) CPU tensors, one setting a row, got ",
                        t->sizes());
    const at::Tensor t = temperature.to(at::kDouble).contiguous(), pp = p.to(at::kDouble).contiguous();
    top_k = k.to(at::kLong).contiguous().clone();
    divisor = at::empty({B}, at::TensorOptions().dtype(at::kFloat)), top_p = at::empty({B}, pp.options());
    for (int64_t b = 0; b < B; ++b) {
      const double tb = t.const_data_ptr<double>()[b], pb = pp.const_data_ptr<double>()[b];
      TORCH_CHECK_VALUE(tb >= 0.0 && !std::isnan(pb) && top_k.const_data_ptr<int64_t>()[b] >= 0, what, ": row ", b,
                        ": temperature must be >= 0, top_k >= 0 and top_p not NaN");
      divisor.mutable_data_ptr<float>()[b] = tb == 0.0 ? 0.0f : sampling_divisor(tb);
      top_p.mutable_data_ptr<double>()[b] = sampling_top_p(pb);
    }
  }

  kr_cpu_row_sampling view() const {
    return {divisor.const_data_ptr<float>(), top_k.const_data_ptr<int64_t>(), top_p.const_data_ptr<double>()};
  }
};

// Kangaroo's greedy draft chain of one round (csrc/cpu/draft.cpp), in place on the chain's tensors: the decode state
// pos, token, n_gen, max_new (B,) int64, finished (B,) bool, e_prev (B, D); the chain cap (B,) int64, active (B,)
// bool, conf (B,) fp32, x (B,) int64, drafts (B, gamma) int64, n_drafts (B,) int64, exits (B, gamma + 1, D), all
// contiguous; embed (V, D); rope_cos, rope_sin (T, Dh): the RoPE tables of positions 0..T-1; the target's layers
// 0..l-1 as decoder_layers takes them, and the adapter's (gate/up and down None); head (N, D) with head_ids (N,)
// (None: row n is token n) -> k, the drafting steps run.
// draft_chain's arguments, checked once and kept (the args point into the plan, which stays in place): run() drafts
// one round from the slots base_len (max(pos) + 1) on; the loop of decode_loop runs it every round.
struct DraftPlan {
  kr_cpu_draft_args a{};
  std::vector<kr_cpu_decoder_layer> ls, adapter;
  std::vector<at::Tensor> keep;  // what the pointers point into (biases, head ids, the state and chain tensors)
  at::Tensor sample_u, sample_q;  // sampled drafts: the round's uniforms (B, gamma) and draft probabilities
  std::unique_ptr<RowSamplingArrays> sampling;
  kr_cpu_head_screen head_q8{};  // a.head_q8's, when given
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
    int64_t n_kv_heads, int64_t head_dim, double eps, double adapter_eps, int64_t gamma, double eta,
    const c10::optional<at::Tensor>& sample_q, const c10::optional<at::Tensor>& sample_u,
    const c10::optional<at::Tensor>& temperature, const c10::optional<at::Tensor>& top_k,
    const c10::optional<at::Tensor>& top_p, bool packed, const c10::optional<std::vector<at::Tensor>>& head_q8) {
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
                                                                      biases, packed, what);
  std::vector<at::Tensor> ak{adapter_k_cache}, av{adapter_v_cache};
  const std::vector<c10::optional<at::Tensor>> no_bias(1);
  const std::vector<kr_cpu_decoder_layer>& adapter = plan->adapter = layers_of(
      probe, adapter_weights, no_bias, no_bias, ak, av, n_heads, n_kv_heads, head_dim, adapter_inter, biases, packed,
      what);
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
  TORCH_CHECK_VALUE(e_prev.size(0) == B && e_prev.size(1) == D && embed.size(1) == D &&
                        head.size(1) == (packed ? D + D % 2 : D),
                    what, ": e_prev (B, D), embed (V, D) and head (N, D) must match exits' D = ", D,
                    packed ? " (a packed head: D rounded up to even)" : "");
  const int64_t T = k_caches[0].size(2);
  check_rope_rows(rope_cos, rope_sin, exits, T, head_dim, what);
  at::Tensor ids;
  if (head_ids.has_value()) {
    check_tokens(*head_ids, 1, what, "head_ids");
    TORCH_CHECK_VALUE(head_ids->size(0) == head.size(0), what, ": head_ids must have one id per head row");
    ids = head_ids->contiguous();
  }
  TORCH_CHECK_VALUE(sample_q.has_value() == sample_u.has_value(), what, ": sampled drafts need sample_q and sample_u");
  if (sample_q.has_value()) {
    TORCH_CHECK_VALUE(sample_q->device().is_cpu() && sample_q->scalar_type() == at::kFloat &&
                          sample_q->is_contiguous() && sample_q->dim() == 3 && sample_q->size(0) == B &&
                          sample_q->size(1) == gamma && sample_q->size(2) == head.size(0),
                      what, ": sample_q must be a contiguous float32 (", B, ", ", gamma, ", ", head.size(0), "), got ",
                      sample_q->scalar_type(), " ", sample_q->sizes());
    TORCH_CHECK_VALUE(sample_u->device().is_cpu() && sample_u->scalar_type() == at::kDouble &&
                          sample_u->is_contiguous() && sample_u->dim() == 2 && sample_u->size(0) == B &&
                          sample_u->size(1) == gamma,
                      what, ": sample_u must be a contiguous float64 (", B, ", ", gamma, "), got ",
                      sample_u->scalar_type(), " ", sample_u->sizes());
    TORCH_CHECK_VALUE(temperature.has_value() && top_k.has_value() && top_p.has_value(), what,
                      ": sampled drafts need each row's temperature, top_k and top_p");
    plan->sampling = std::make_unique<RowSamplingArrays>(*temperature, *top_k, *top_p, B, what);
  }
  // the state and chain tensors the pointers below point into
  for (const at::Tensor& t : {pos, token, n_gen, max_new, finished, e_prev, cap, active, conf, x, drafts, n_drafts,
                              exits, ids})
    plan->keep.push_back(t);
  if (sample_q.has_value()) plan->sample_q = *sample_q, plan->sample_u = *sample_u;
  kr_cpu_draft_args& a = plan->a;
  if (sample_q.has_value()) {
    a.sample_q = sample_q->mutable_data_ptr<float>(), a.sample_u = sample_u->const_data_ptr<double>();
    a.sampling = plan->sampling->view();
  }
  a.dtype = dtype_code(exits, what, "exits");
  a.batch = B, a.hidden_size = D, a.n_heads = n_heads, a.n_kv_heads = n_kv_heads, a.head_dim = head_dim;
  a.intermediate = inter, a.max_len = T;
  a.eps = static_cast<float>(eps), a.adapter_eps = static_cast<float>(adapter_eps);
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  a.gamma = gamma, a.eta = static_cast<float>(eta);
  a.exit_layer = static_cast<int64_t>(ls.size()), a.layers = ls.data(), a.adapter = adapter.data();
  for (int d = 0; d < 3; ++d) a.cache_stride[d] = k_caches[0].stride(d);
  a.embed = embed.const_data_ptr(), a.vocab = embed.size(0);
  a.head = head.const_data_ptr(), a.head_rows = head.size(0), a.packed = packed ? 1 : 0;
  a.head_ids = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
  if (head_q8.has_value()) {  // the head read as its int8 form's estimates
    plan->head_q8 = screen_of(*head_q8, head.size(0), D, what);
    for (const at::Tensor& t : *head_q8) plan->keep.push_back(t);
    a.head_q8 = &plan->head_q8;
  }
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
// one pass over q_len <= q_len_max tokens a row reading kv_len slots; the loop of decode_loop runs it every step.
struct TargetPlan {
  kr_cpu_target_pass_args a{};
  std::vector<kr_cpu_decoder_layer> ls;
  std::vector<at::Tensor> keep;  // what the pointers point into (biases, the state tensors, the inputs)
  at::Tensor eos_holder, accepted, committed;  // (B,) int64 each: the last run's
  kr_cpu_head_screen screen{};                 // a.head_screen's, when given
  int64_t q_len_max = 1;
  at::Tensor u_next, u_accept, q, q_ids;       // sampled: the uniforms and draft probabilities the pass reads
  std::unique_ptr<RowSamplingArrays> sampling;
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

// A sampled pass's inputs (kr_cpu_target_pass_args' sample_*): u_next (B,) float64; for a verification (q_len_max >
// 1) u_accept (B, >= q_len_max - 1) fp32 of unit column stride and q (B, >= q_len_max - 1, N) fp32 whose last two
// dimensions are contiguous: over the head's rows, or over the N token ids q_ids (a draft vocabulary's); each row's
// temperature, top_k, top_p (RowSamplingArrays).
void set_sampled(TargetPlan& plan, const at::Tensor& u_next, const c10::optional<at::Tensor>& u_accept,
                 const c10::optional<at::Tensor>& q, const c10::optional<at::Tensor>& q_ids,
                 const c10::optional<at::Tensor>& temperature, const c10::optional<at::Tensor>& top_k,
                 const c10::optional<at::Tensor>& top_p, const char* what) {
  kr_cpu_target_pass_args& a = plan.a;
  const int64_t B = a.batch, K = plan.q_len_max - 1;
  int64_t N = a.head_rows;
  if (q_ids.has_value()) {
    check_tokens(*q_ids, 1, what, "sample_q_ids");
    TORCH_CHECK_VALUE(q_ids->size(0) >= 1 && q_ids->size(0) <= N, what, ": sample_q_ids must name 1 to ", N,
                      " tokens, got ", q_ids->size(0));
    plan.q_ids = q_ids->contiguous();
    N = q_ids->size(0);
    const int64_t* ids = plan.q_ids.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < N; ++r)
      TORCH_CHECK_VALUE(0 <= ids[r] && ids[r] < a.head_rows, what, ": sample_q_ids[", r, "] = ", ids[r],
                        " is outside the head's ", a.head_rows, " rows");
  }
  TORCH_CHECK_VALUE(u_next.device().is_cpu() && u_next.scalar_type() == at::kDouble && u_next.dim() == 1 &&
                        u_next.size(0) == B && u_next.is_contiguous(),
                    what, ": sample_u_next must be a contiguous float64 (", B, ",), got ", u_next.scalar_type(), " ",
                    u_next.sizes());
  TORCH_CHECK_VALUE(temperature.has_value() && top_k.has_value() && top_p.has_value(), what,
                    ": a sampled pass needs each row's temperature, top_k and top_p");
  TORCH_CHECK_VALUE(a.head_screen == nullptr, what, ": a sampled pass takes the whole head, not head_screen");
  plan.sampling = std::make_unique<RowSamplingArrays>(*temperature, *top_k, *top_p, B, what);
  a.sampling = plan.sampling->view();
  plan.u_next = u_next;
  a.sample_u_next = u_next.const_data_ptr<double>();
  if (K == 0) return;
  TORCH_CHECK_VALUE(u_accept.has_value() && q.has_value(), what,
                    ": a sampled verification needs sample_u_accept and sample_q");
  TORCH_CHECK_VALUE(u_accept->device().is_cpu() && u_accept->scalar_type() == at::kFloat && u_accept->dim() == 2 &&
                        u_accept->size(0) == B && u_accept->size(1) >= K && u_accept->stride(1) == 1 &&
                        (B == 1 || u_accept->stride(0) >= K),
                    what, ": sample_u_accept must be a float32 (", B, ", >= ", K,
                    ") of rows of their own, unit column stride, got ", u_accept->scalar_type(), " ",
                    u_accept->sizes());
  TORCH_CHECK_VALUE(q->device().is_cpu() && q->scalar_type() == at::kFloat && q->dim() == 3 && q->size(0) == B &&
                        q->size(1) >= K && q->size(2) == N && q->stride(2) == 1 && q->stride(1) == N &&
                        (B == 1 || q->stride(0) >= K * N),
                    what, ": sample_q must be a float32 (", B, ", >= ", K, ", ", N,
                    ") with contiguous rows of draft probabilities, got ", q->scalar_type(), " ", q->sizes(),
                    " strides ", q->strides());
  plan.u_accept = *u_accept, plan.q = *q;
  a.sample_q_rows = N;
  a.sample_q_ids = plan.q_ids.defined() ? plan.q_ids.const_data_ptr<int64_t>() : nullptr;
  a.sample_u_accept = u_accept->const_data_ptr<float>(), a.sample_u_accept_stride = B > 1 ? u_accept->stride(0) : K;
  a.sample_q = q->const_data_ptr<float>(), a.sample_q_stride = B > 1 ? q->stride(0) : K * N;
}

std::unique_ptr<TargetPlan> plan_target_pass(
    at::Tensor pos, at::Tensor token, at::Tensor out, at::Tensor n_gen, at::Tensor finished, const at::Tensor& max_new,
    const c10::optional<at::Tensor>& eos, c10::optional<at::Tensor> e_prev, const c10::optional<at::Tensor>& embed,
    const c10::optional<at::Tensor>& exits, const c10::optional<at::Tensor>& drafts,
    const c10::optional<at::Tensor>& n_drafts, int64_t q_len, const at::Tensor& rope_cos, const at::Tensor& rope_sin,
    const std::vector<c10::optional<at::Tensor>>& weights, const std::vector<c10::optional<at::Tensor>>& qkv_bias,
    const std::vector<c10::optional<at::Tensor>>& o_bias, std::vector<at::Tensor> k_caches,
    std::vector<at::Tensor> v_caches, const at::Tensor& norm, double norm_eps, const at::Tensor& head, int64_t n_heads,
    int64_t n_kv_heads, int64_t head_dim, double eps, const c10::optional<std::vector<at::Tensor>>& head_screen,
    const c10::optional<at::Tensor>& sample_u_next, const c10::optional<at::Tensor>& sample_u_accept,
    const c10::optional<at::Tensor>& sample_q, const c10::optional<at::Tensor>& sample_q_ids,
    const c10::optional<at::Tensor>& temperature, const c10::optional<at::Tensor>& top_k,
    const c10::optional<at::Tensor>& top_p, bool packed) {
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
                                                                      packed, what);
  TORCH_CHECK_VALUE(!ls.empty(), what, ": expects at least one layer");
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&pos), static_cast<const at::Tensor*>(&token),
                              static_cast<const at::Tensor*>(&n_gen), &max_new})
    check_state_row(*t, B, at::kLong, what, "a state row");
  check_state_row(finished, B, at::kBool, what, "finished");
  check_out(out, B, what);
  const auto e = eos_ids(eos, plan->eos_holder, what);
  for (const at::Tensor* t : {&norm, &head}) {
    check_like(*t, ref, what, "the norm or the head");
    TORCH_CHECK_VALUE(t->is_contiguous() && t->size(-1) == (packed && t == &head ? D + D % 2 : D), what,
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
  a.packed = packed ? 1 : 0;
  if (head_screen.has_value()) {
    plan->screen = screen_of(*head_screen, head.size(0), D, what);
    for (const at::Tensor& t : *head_screen) plan->keep.push_back(t);
    a.head_screen = &plan->screen;
  }
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
  if (sample_u_next.has_value())
    set_sampled(*plan, *sample_u_next, sample_u_accept, sample_q, sample_q_ids, temperature, top_k, top_p, what);
  else
    TORCH_CHECK_VALUE(!sample_u_accept.has_value() && !sample_q.has_value() && !sample_q_ids.has_value(), what,
                      ": sample_u_accept, sample_q and sample_q_ids come with sample_u_next (a sampled pass)");
  return plan;
}


// Decoding to the end in one call: Decoder.decode's loop when no streamer waits for each step. Plain steps (draft
// None: pass from the rows' tokens, kv_len max(pos) + 1) or Kangaroo rounds (draft's chain from base_len = max(pos)
// + 1, then pass over its k drafts, kv_len base_len + k), each run as draft_chain and target_pass run it, with no
// Python between them: the same tokens and bits. Sampled plans (a sampled pass, and a sampled chain with it) take
// their uniforms from gen (None: torch's default generator) in the order and dtypes that BatchSampling draws them a
// round: the chain's (B, gamma) float64, then the acceptance's (B, k) fp32, then the next tokens' (B,) float64 (a
// plain step: that last one only), so that a seed gives the Python loop's tokens. Stops when every row is finished,
// after max_rounds, or before a round whose slots would pass the cache (base_len + gamma, or a plain step's kv_len,
// above T: the Python loop takes over there). -> (rounds run R, and per round: rows active at its start (R, B)
// bool, tokens committed, drafts proposed, drafts accepted (R, B) int64, drafting steps (R,) int64, seconds
// drafting and verifying (R, 2) fp64).
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

std::vector<at::Tensor> decode_loop_plans(TargetPlan& pass, DraftPlan* draft, int64_t max_rounds,
                                          const c10::optional<at::Generator>& gen) {
  using Clock = std::chrono::steady_clock;
  const char* what = "kangaroo_rt._cpu.decode_loop";
  TORCH_CHECK_VALUE(max_rounds >= 0, what, ": max_rounds must be >= 0");
  const kr_cpu_target_pass_args& a = pass.a;
  const bool sampled = a.sample_u_next != nullptr;
  TORCH_CHECK_VALUE(draft == nullptr || (draft->a.batch == a.batch && draft->a.pos == a.pos &&
                                          pass.q_len_max == draft->a.gamma + 1 && a.exits == draft->a.exits),
                    what, ": the pass must verify the draft plan's chain over the same state (q_len gamma + 1)");
  TORCH_CHECK_VALUE(draft == nullptr || (draft->a.sample_q != nullptr) == sampled, what,
                    ": the draft plan and the pass must both be greedy or both be sampled");
  TORCH_CHECK_VALUE(draft == nullptr || !sampled ||
                        (a.sample_q == draft->a.sample_q && a.sample_q_rows == draft->a.head_rows &&
                         (a.sample_q_ids == nullptr) == (draft->a.head_ids == nullptr) &&
                         (a.sample_q_ids == nullptr ||
                          std::equal(a.sample_q_ids, a.sample_q_ids + a.sample_q_rows, draft->a.head_ids))),
                    what, ": a sampled pass must read the draft plan's own draft probabilities (sample_q, over its "
                    "head's ids)");
  TORCH_CHECK_VALUE(!gen.has_value() || gen->device().is_cpu(), what, ": the generator must be a CPU generator");
  TORCH_CHECK_VALUE(draft != nullptr || a.embed != nullptr, what, ": plain steps need a pass from the rows' tokens");
  const int64_t B = a.batch, T = a.max_len, gamma = draft == nullptr ? 0 : draft->a.gamma;
  const at::TensorOptions f64 = at::TensorOptions().dtype(at::kDouble), f32 = at::TensorOptions().dtype(at::kFloat);
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
    if (sampled && draft != nullptr) draft->sample_u.copy_(at::rand({B, gamma}, gen, f64));
    const int64_t k = draft == nullptr ? 0 : draft->run(base_len);
    const Clock::time_point drafted = Clock::now();
    if (sampled) {
      if (draft != nullptr) pass.u_accept.narrow(1, 0, k).copy_(at::rand({B, k}, gen, f32));
      pass.u_next.copy_(at::rand({B}, gen, f64));
    }
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

std::vector<at::Tensor> decode_loop(const py::object& plan, const py::object& draft, int64_t max_rounds,
                                    const c10::optional<at::Generator>& generator) {
  const char* what = "kangaroo_rt._cpu.decode_loop";
  TargetPlan* pass = from_capsule<TargetPlan>(plan, kTargetPlan, what);
  DraftPlan* chain = draft.is_none() ? nullptr : from_capsule<DraftPlan>(draft, kDraftPlan, what);
  py::gil_scoped_release release;
  return decode_loop_plans(*pass, chain, max_rounds, generator);
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
    TORCH_CHECK_VALUE(!packed || w.size(1) % 2 == 0, what, ": packed weight ", i,
                      " must be (N, K) of an even K (kr_cpu_pack_bf16 rounds K up to pairs), got ", w.sizes());
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

}  // namespace

void define_decode(py::module_& m) {
  m.def("decoder_layers", &decoder_layers, py::arg("hidden"), py::arg("positions"), py::arg("cos"), py::arg("sin"),
        py::arg("weights"), py::arg("qkv_bias"), py::arg("o_bias"), py::arg("k_caches"), py::arg("v_caches"),
        py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("kv_len") = py::none(),
        py::arg("packed") = false, py::call_guard<py::gil_scoped_release>(),
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
      py::arg("gamma"), py::arg("eta"), py::arg("sample_q") = py::none(), py::arg("sample_u") = py::none(),           \
      py::arg("temperature") = py::none(), py::arg("top_k") = py::none(), py::arg("top_p") = py::none(),             \
      py::arg("packed") = false, py::arg("head_q8") = py::none()
#define KR_PASS_ARGS                                                                                                  \
  py::arg("pos"), py::arg("token"), py::arg("out"), py::arg("n_gen"), py::arg("finished"), py::arg("max_new"),        \
      py::arg("eos"), py::arg("e_prev"), py::arg("embed"), py::arg("exits"), py::arg("drafts"), py::arg("n_drafts"),  \
      py::arg("q_len"), py::arg("rope_cos"), py::arg("rope_sin"), py::arg("weights"), py::arg("qkv_bias"),            \
      py::arg("o_bias"), py::arg("k_caches"), py::arg("v_caches"), py::arg("norm"), py::arg("norm_eps"),              \
      py::arg("head"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("eps"),               \
      py::arg("head_screen").none(true), py::arg("sample_u_next") = py::none(),                                       \
      py::arg("sample_u_accept") = py::none(), py::arg("sample_q") = py::none(), py::arg("sample_q_ids") = py::none(), \
      py::arg("temperature") = py::none(), py::arg("top_k") = py::none(), py::arg("top_p") = py::none(),             \
      py::arg("packed") = false
  m.def("draft_chain", draft_once(&plan_draft_chain), KR_CHAIN_ARGS, py::arg("base_len"),
        py::call_guard<py::gil_scoped_release>(),
        "a round's Kangaroo drafting in one call (begin_round, shallow steps, keep_drafting, draft steps), in place "
        "on the chain's tensors, greedy or (sample_q, sample_u) sampled; the bits of the per-step path; -> k, the "
        "drafting steps run");
  m.def("target_pass", pass_once(&plan_target_pass), KR_PASS_ARGS, py::arg("kv_len"),
        py::call_guard<py::gil_scoped_release>(),
        "a plain step (from embed) or a verification (from exits) with the final norm, the head, greedy or "
        "(sample_u_next, ...) sampled acceptance and commit, in place on the decode state; the bits and tokens of "
        "the step-by-step path; -> (accepted, committed)");
  m.def("plan_draft_chain", capsuled(&plan_draft_chain, kDraftPlan), KR_CHAIN_ARGS,
        "draft_chain's arguments without base_len, checked once: a plan (capsule) for decode_loop");
  m.def("plan_target_pass", capsuled(&plan_target_pass, kTargetPlan), KR_PASS_ARGS,
        "target_pass's arguments without kv_len, checked once: a plan (capsule) for decode_loop; q_len is the most "
        "tokens a row a pass may take");
#undef KR_CHAIN_ARGS
#undef KR_PASS_ARGS
  m.def("decode_loop", &decode_loop, py::arg("plan"), py::arg("draft").none(true), py::arg("max_rounds"),
        py::arg("generator") = py::none(),
        "plain steps (draft None) or Kangaroo rounds until every row is finished, in one call, greedy or sampled "
        "(uniforms from generator): -> (rounds, active, committed, n_drafts, accepted, steps, seconds)");
  m.def("linear_sweep", &linear_sweep, py::arg("x"), py::arg("weights"), py::arg("out") = py::none(),
        py::arg("packed") = false,
        py::call_guard<py::gil_scoped_release>(),
        "x (M, K) @ each weight (N_i, K_i <= K)^T in one call on one set of threads -> (M, sum N_i) (into out when "
        "given), for benchmarks; packed: bf16 weights in the packed layout (_cpu.pack_bf16)");
}

}  // namespace kr_bind
