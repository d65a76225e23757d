// kangaroo_rt._C: pybind11/torch glue over the raw-pointer launchers of csrc/*.cu (see kangaroo_rt.h).
// Signatures follow kangaroo_rt.reference; kangaroo_rt/_ext.py routes unsupported inputs to the reference.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <initializer_list>
#include <string>
#include <tuple>
#include <vector>

#include "kangaroo_rt.h"

namespace {

using TensorRefs = std::initializer_list<const at::Tensor*>;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "kangaroo_rt._C.", what, ": ", cudaGetErrorString(err));
}

int dtype_code(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return KR_FLOAT32;
    case at::kHalf: return KR_FLOAT16;
    case at::kBFloat16: return KR_BFLOAT16;
    default: TORCH_CHECK(false, "kangaroo_rt._C.", what, ": unsupported dtype ", t, " (float32, float16, bfloat16)");
  }
  return -1;
}

void check_on(const at::Tensor& t, const at::Tensor& like, const char* name, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "kangaroo_rt._C.", what, ": ", name,
              " must be a CUDA tensor on ", like.device());
}

void check_long(const at::Tensor& t, int64_t dim, const char* name, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == dim, "kangaroo_rt._C.", what, ": ", name, " must be a ",
              dim, "-D int64 tensor, got ", t.scalar_type(), " with ", t.dim(), " dims");
}

// In-place (B,) state must be contiguous so that its raw pointer indexes rows.
void check_row_state(const at::Tensor& t, int64_t batch, at::ScalarType type, const char* name, const char* what) {
  TORCH_CHECK(t.scalar_type() == type && t.dim() == 1 && t.size(0) >= batch && t.is_contiguous(), "kangaroo_rt._C.",
              what, ": ", name, " must be a contiguous 1-D ", type, " tensor of >= ", batch, " rows");
}

// Read-only per-row input (n_drafts, count): one value per row, any integer type (made int64 and contiguous).
void check_rows(const at::Tensor& t, int64_t batch, const char* name, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "kangaroo_rt._C.", what, ": ", name, " must be (", batch,
              ",), got ", t.sizes());
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Runs a launcher and checks what it returns. The launchers end with cudaGetLastError(), which also reports an
// earlier, unrelated failure on this thread (left by another library, say): that is cleared first, so an
// error names this launch.
template <typename Launcher>
void run_launcher(const char* what, Launcher&& launcher) {
  (void)cudaGetLastError();
  check_cuda(launcher(), what);
}

std::pair<const int64_t*, int64_t> eos_args(const c10::optional<at::Tensor>& eos, at::Tensor& holder,
                                            const at::Tensor& like) {
  if (!eos.has_value() || eos->numel() == 0) return {nullptr, 0};
  holder = eos->reshape({-1}).to(like.device(), at::kLong).contiguous();
  return {holder.data_ptr<int64_t>(), holder.numel()};
}

std::tuple<at::Tensor, at::Tensor> norm_impl(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                             const at::Tensor& weight, double eps, const char* what) {
  TORCH_CHECK(x.is_cuda(), "kangaroo_rt._C.", what, ": x must be a CUDA tensor");
  check_on(weight, x, "weight", what);
  const int64_t n_cols = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n_cols && weight.scalar_type() == x.scalar_type(),
              "kangaroo_rt._C.", what, ": weight must be (", n_cols, ",) in ", x.scalar_type());
  const int code = dtype_code(x.scalar_type(), what);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x2 = x.reshape({-1, n_cols});
  if (x2.stride(-1) != 1) x2 = x2.contiguous();
  at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor new_residual, r2;
  if (residual.has_value()) {
    check_on(*residual, x, "residual", what);
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "kangaroo_rt._C.",
                what, ": residual must match x in shape and dtype");
    r2 = residual->reshape({-1, n_cols});
    if (r2.stride(-1) != 1) r2 = r2.contiguous();
    new_residual = at::empty(x.sizes(), x.options());
  }
  run_launcher(what, [&] {
    return kr_rms_norm(x2.data_ptr(), x2.stride(0), r2.defined() ? r2.data_ptr() : nullptr,
                       r2.defined() ? r2.stride(0) : 0, new_residual.defined() ? new_residual.data_ptr() : nullptr,
                       n_cols, w.data_ptr(), out.data_ptr(), n_cols, x2.size(0), n_cols, static_cast<float>(eps),
                       code, stream());
  });
  return {new_residual, out};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return std::get<1>(norm_impl(x, c10::nullopt, weight, eps, "rms_norm"));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  return norm_impl(x, residual, weight, eps, "add_rms_norm");
}

at::Tensor rope_cache_append(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                             const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& positions) {
  const char* what = "rope_cache_append";
  TORCH_CHECK(q.is_cuda() && q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k_cache.dim() == 4 &&
                  v_cache.dim() == 4,
              "kangaroo_rt._C.rope_cache_append: q, k, v and the caches must be 4-D CUDA tensors");
  const int64_t batch = q.size(0), n_q = q.size(1), q_len = q.size(2), head_dim = q.size(3);
  const int64_t n_kv = k.size(1);
  TORCH_CHECK(head_dim % 2 == 0, "kangaroo_rt._C.rope_cache_append: head_dim must be even, got ", head_dim);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == batch && k.size(2) == q_len && k.size(3) == head_dim,
              "kangaroo_rt._C.rope_cache_append: k and v must be (", batch, ", Hkv, ", q_len, ", ", head_dim, ")");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(0) >= batch && k_cache.size(1) == n_kv &&
                  k_cache.size(3) == head_dim,
              "kangaroo_rt._C.rope_cache_append: caches must be (>= ", batch, ", ", n_kv, ", T, ", head_dim, ")");
  for (const at::Tensor* t : TensorRefs{&k, &v, &cos, &sin, &k_cache, &v_cache, &positions}) {
    check_on(*t, q, "input", what);
  }
  for (const at::Tensor* t : TensorRefs{&k, &v, &cos, &sin, &k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "kangaroo_rt._C.rope_cache_append: every tensor but positions "
                                                     "must be ", q.scalar_type(), ", got ", t->scalar_type());
  }
  TORCH_CHECK(positions.scalar_type() == at::kLong, "kangaroo_rt._C.rope_cache_append: positions must be int64");
  const int code = dtype_code(q.scalar_type(), what);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor c = cos.expand({batch, q_len, head_dim}), s = sin.expand({batch, q_len, head_dim});
  at::Tensor p = positions.expand({batch, q_len});
  at::Tensor q_out = at::empty({batch, n_q, q_len, head_dim}, q.options());
  kr_rope_args a = {};
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.v = v.data_ptr(); a.cos = c.data_ptr(); a.sin = s.data_ptr();
  a.k_cache = k_cache.data_ptr(); a.v_cache = v_cache.data_ptr(); a.positions = p.data_ptr<int64_t>();
  a.q_out = q_out.data_ptr();
  a.batch = batch; a.q_len = q_len; a.n_q_heads = n_q; a.n_kv_heads = n_kv; a.head_dim = head_dim;
  a.max_len = k_cache.size(2);
  for (int i = 0; i < 4; ++i) {
    a.sq[i] = q.stride(i); a.sk[i] = k.stride(i); a.sv[i] = v.stride(i);
    a.skc[i] = k_cache.stride(i); a.svc[i] = v_cache.stride(i);
  }
  for (int i = 0; i < 3; ++i) { a.scos[i] = c.stride(i); a.ssin[i] = s.stride(i); }
  a.spos[0] = p.stride(0); a.spos[1] = p.stride(1);
  run_launcher(what, [&] { return kr_rope_cache_append(&a, code, stream()); });
  return q_out;
}

std::tuple<at::Tensor, at::Tensor> accept_greedy(const at::Tensor& drafts, const at::Tensor& n_drafts,
                                                 const at::Tensor& target_tokens) {
  const char* what = "accept_greedy";
  TORCH_CHECK(drafts.is_cuda(), "kangaroo_rt._C.accept_greedy: drafts must be a CUDA tensor");
  check_long(drafts, 2, "drafts", what);
  check_long(target_tokens, 2, "target_tokens", what);
  check_on(n_drafts, drafts, "n_drafts", what);
  check_on(target_tokens, drafts, "target_tokens", what);
  const int64_t batch = drafts.size(0), k = drafts.size(1);
  TORCH_CHECK(target_tokens.size(0) == batch && target_tokens.size(1) == k + 1,
              "kangaroo_rt._C.accept_greedy: target_tokens must be (", batch, ", ", k + 1, ")");
  check_rows(n_drafts, batch, "n_drafts", what);
  const c10::cuda::CUDAGuard guard(drafts.device());
  at::Tensor n = n_drafts.to(at::kLong).contiguous();
  at::Tensor accepted = at::empty({batch}, drafts.options()), next_token = at::empty({batch}, drafts.options());
  run_launcher(what, [&] {
    return kr_accept_greedy(drafts.data_ptr<int64_t>(), drafts.stride(0), drafts.stride(1), n.data_ptr<int64_t>(),
                            target_tokens.data_ptr<int64_t>(), target_tokens.stride(0), target_tokens.stride(1),
                            batch, k, accepted.data_ptr<int64_t>(), next_token.data_ptr<int64_t>(), stream());
  });
  return {accepted, next_token};
}

at::Tensor commit_tokens(at::Tensor out, at::Tensor n_gen, at::Tensor finished, const at::Tensor& tokens,
                         const at::Tensor& count, const c10::optional<at::Tensor>& eos) {
  const char* what = "commit_tokens";
  TORCH_CHECK(tokens.is_cuda(), "kangaroo_rt._C.commit_tokens: tokens must be a CUDA tensor");
  check_long(tokens, 2, "tokens", what);
  check_long(out, 2, "out", what);
  const int64_t batch = tokens.size(0);
  for (const at::Tensor* t : TensorRefs{&out, &n_gen, &finished, &count}) check_on(*t, tokens, "input", what);
  check_row_state(n_gen, batch, at::kLong, "n_gen", what);
  check_row_state(finished, batch, at::kBool, "finished", what);
  TORCH_CHECK(out.size(0) >= batch && out.stride(1) == 1, "kangaroo_rt._C.commit_tokens: out must be (>= ", batch,
              ", W) with unit column stride");
  check_rows(count, batch, "count", what);
  const c10::cuda::CUDAGuard guard(tokens.device());
  at::Tensor c = count.to(at::kLong).contiguous();
  at::Tensor eos_holder;
  auto e = eos_args(eos, eos_holder, tokens);
  at::Tensor committed = at::empty({batch}, tokens.options());
  run_launcher(what, [&] {
    return kr_commit_tokens(tokens.data_ptr<int64_t>(), tokens.stride(0), tokens.stride(1), tokens.size(1),
                            c.data_ptr<int64_t>(), out.data_ptr<int64_t>(), out.stride(0), out.size(1),
                            n_gen.data_ptr<int64_t>(), reinterpret_cast<uint8_t*>(finished.data_ptr<bool>()),
                            e.first, e.second, batch, committed.data_ptr<int64_t>(), stream());
  });
  return committed;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> accept_greedy_commit(
    const at::Tensor& drafts, const at::Tensor& n_drafts, const at::Tensor& target_tokens, at::Tensor out,
    at::Tensor n_gen, at::Tensor finished, at::Tensor pos, const c10::optional<at::Tensor>& eos) {
  const char* what = "accept_greedy_commit";
  TORCH_CHECK(drafts.is_cuda(), "kangaroo_rt._C.accept_greedy_commit: drafts must be a CUDA tensor");
  check_long(drafts, 2, "drafts", what);
  check_long(target_tokens, 2, "target_tokens", what);
  check_long(out, 2, "out", what);
  const int64_t batch = drafts.size(0), k = drafts.size(1);
  TORCH_CHECK(target_tokens.size(0) == batch && target_tokens.size(1) == k + 1,
              "kangaroo_rt._C.accept_greedy_commit: target_tokens must be (", batch, ", ", k + 1, ")");
  for (const at::Tensor* t : TensorRefs{&n_drafts, &target_tokens, &out, &n_gen, &finished, &pos}) {
    check_on(*t, drafts, "input", what);
  }
  check_row_state(n_gen, batch, at::kLong, "n_gen", what);
  check_row_state(finished, batch, at::kBool, "finished", what);
  check_row_state(pos, batch, at::kLong, "pos", what);
  TORCH_CHECK(out.size(0) >= batch && out.stride(1) == 1, "kangaroo_rt._C.accept_greedy_commit: out must be (>= ",
              batch, ", W) with unit column stride");
  check_rows(n_drafts, batch, "n_drafts", what);
  const c10::cuda::CUDAGuard guard(drafts.device());
  at::Tensor n = n_drafts.to(at::kLong).contiguous();
  at::Tensor eos_holder;
  auto e = eos_args(eos, eos_holder, drafts);
  at::Tensor accepted = at::empty({batch}, drafts.options());
  at::Tensor next_token = at::empty({batch}, drafts.options()), committed = at::empty({batch}, drafts.options());
  run_launcher(what, [&] {
    return kr_accept_greedy_commit(drafts.data_ptr<int64_t>(), drafts.stride(0), drafts.stride(1),
                                   n.data_ptr<int64_t>(), target_tokens.data_ptr<int64_t>(), target_tokens.stride(0),
                                   target_tokens.stride(1), batch, k, out.data_ptr<int64_t>(), out.stride(0),
                                   out.size(1), n_gen.data_ptr<int64_t>(),
                                   reinterpret_cast<uint8_t*>(finished.data_ptr<bool>()), pos.data_ptr<int64_t>(),
                                   e.first, e.second, accepted.data_ptr<int64_t>(),
                                   next_token.data_ptr<int64_t>(), committed.data_ptr<int64_t>(), stream());
  });
  return {accepted, next_token, committed};
}

void replay_rounds(const std::vector<int64_t>& execs, int64_t rounds) {
  TORCH_CHECK(!execs.empty(), "kangaroo_rt._C.replay_rounds: no graph executables given");
  TORCH_CHECK(rounds >= 0, "kangaroo_rt._C.replay_rounds: rounds must be >= 0, got ", rounds);
  std::vector<cudaGraphExec_t> handles;
  for (int64_t h : execs) {
    TORCH_CHECK(h != 0, "kangaroo_rt._C.replay_rounds: a null cudaGraphExec_t was given");
    handles.push_back(reinterpret_cast<cudaGraphExec_t>(h));
  }
  run_launcher("replay_rounds", [&] {
    return kr_replay_rounds(handles.data(), static_cast<int>(handles.size()), rounds, stream());
  });
}

// A device-side round loop over captured graphs; keeps the tensors its condition kernel reads alive.
class WhileGraph {
 public:
  WhileGraph(const std::vector<int64_t>& bodies, at::Tensor finished, at::Tensor iters, int64_t max_iters)
      : finished_(std::move(finished)), iters_(std::move(iters)) {
    TORCH_CHECK(!bodies.empty(), "kangaroo_rt._C.WhileGraph: no body graphs given");
    TORCH_CHECK(finished_.is_cuda() && finished_.scalar_type() == at::kBool && finished_.dim() == 1 &&
                    finished_.is_contiguous(),
                "kangaroo_rt._C.WhileGraph: finished must be a contiguous 1-D bool CUDA tensor");
    TORCH_CHECK(iters_.device() == finished_.device() && iters_.scalar_type() == at::kLong && iters_.numel() == 1,
                "kangaroo_rt._C.WhileGraph: iters must be a one-element int64 tensor on the same device");
    TORCH_CHECK(kr_while_graph_supported(), "kangaroo_rt._C.WhileGraph: conditional while nodes need CUDA >= 12.4 "
                                            "(this build or driver is older)");
    std::vector<cudaGraph_t> graphs;
    for (int64_t h : bodies) {
      TORCH_CHECK(h != 0, "kangaroo_rt._C.WhileGraph: a null cudaGraph_t was given");
      graphs.push_back(reinterpret_cast<cudaGraph_t>(h));
    }
    const c10::cuda::CUDAGuard guard(finished_.device());
    check_cuda(kr_while_graph_create(graphs.data(), static_cast<int>(graphs.size()),
                                     reinterpret_cast<const uint8_t*>(finished_.data_ptr<bool>()), finished_.numel(),
                                     iters_.data_ptr<int64_t>(), max_iters, &graph_),
               "WhileGraph");
  }
  ~WhileGraph() { kr_while_graph_destroy(graph_); }
  WhileGraph(const WhileGraph&) = delete;
  WhileGraph& operator=(const WhileGraph&) = delete;

  void launch() {
    const c10::cuda::CUDAGuard guard(finished_.device());
    run_launcher("WhileGraph.launch", [&] { return kr_while_graph_launch(graph_, stream()); });
  }

 private:
  at::Tensor finished_, iters_;
  kr_while_graph* graph_ = nullptr;
};

int64_t cuda_runtime_version() {
  int v = 0;
  check_cuda(cudaRuntimeGetVersion(&v), "cuda_runtime_version");
  return v;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kangaroo_rt CUDA ops (csrc/*.cu) and the graph round loop";
  m.def("rms_norm", &rms_norm, "x (..., D), weight (D,) -> (..., D)");
  m.def("add_rms_norm", &add_rms_norm, "x, residual (..., D), weight (D,) -> (x + residual, rms_norm(x + residual))");
  m.def("rope_cache_append", &rope_cache_append, "RoPE on q/k, append k/v to the caches; returns rotated q");
  m.def("accept_greedy", &accept_greedy, "drafts (B, K), n_drafts (B,), target (B, K+1) -> (accepted, next_token)");
  m.def("commit_tokens", &commit_tokens, "commit (B, n) tokens into out at n_gen, in place; returns committed (B,)");
  m.def("accept_greedy_commit", &accept_greedy_commit, "fused greedy accept + commit + pos update, in place");
  m.def("replay_rounds", &replay_rounds,
        "launch graph executables (ints) in order, `rounds` times, on the current stream");
  m.def("while_graph_supported", []() { return kr_while_graph_supported() != 0; });
  m.def("cuda_runtime_version", &cuda_runtime_version);
  pybind11::class_<WhileGraph>(m, "WhileGraph")
      .def(pybind11::init<const std::vector<int64_t>&, at::Tensor, at::Tensor, int64_t>(), pybind11::arg("bodies"),
           pybind11::arg("finished"), pybind11::arg("iters"), pybind11::arg("max_iters"))
      .def("launch", &WhileGraph::launch, "run the loop on the current stream (no host sync)");
}
