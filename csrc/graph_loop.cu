// The round loop over captured CUDA graphs: a host loop of graph launches, and a device-side loop built
// on a conditional while node (CUDA >= 12.4) whose body is the round's graphs (as child graphs) followed
// by a one-block kernel that keeps looping while some row is unfinished.
#include <stdlib.h>

#include "kangaroo_rt.h"

extern "C" cudaError_t kr_replay_rounds(const cudaGraphExec_t* execs, int n_execs, int64_t rounds,
                                        cudaStream_t stream) {
  if (n_execs <= 0 || execs == nullptr) return cudaErrorInvalidValue;
  for (int64_t r = 0; r < rounds; ++r) {
    for (int i = 0; i < n_execs; ++i) {
      const cudaError_t err = cudaGraphLaunch(execs[i], stream);
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

#if defined(CUDART_VERSION) && CUDART_VERSION >= 12040

namespace {

// Sets the loop condition: 1 while some row is unfinished and the iteration bound is not reached.
// count != 0 counts one more iteration (the check at the end of a round's body).
__global__ void set_condition_kernel(cudaGraphConditionalHandle handle, const uint8_t* finished, int64_t n_rows,
                                     int64_t* iters, int64_t max_iters, int count) {
  __shared__ int any_active;
  if (threadIdx.x == 0) any_active = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n_rows; i += blockDim.x) {
    if (finished[i] == 0) any_active = 1;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t it = *iters;
    if (count) *iters = ++it;
    cudaGraphSetConditional(handle, (any_active && it < max_iters) ? 1u : 0u);
  }
}

cudaError_t add_node(cudaGraphNode_t* node, cudaGraph_t graph, const cudaGraphNode_t* deps, size_t n_deps,
                     cudaGraphNodeParams* params) {
#if CUDART_VERSION >= 13000
  return cudaGraphAddNode(node, graph, deps, nullptr, n_deps, params);
#else
  return cudaGraphAddNode(node, graph, deps, n_deps, params);
#endif
}

struct ConditionArgs {
  cudaGraphConditionalHandle handle;
  const uint8_t* finished;
  int64_t n_rows;
  int64_t* iters;
  int64_t max_iters;
  int count;
};

cudaError_t add_condition_kernel(cudaGraphNode_t* node, cudaGraph_t graph, const cudaGraphNode_t* dep,
                                 ConditionArgs* args) {
  void* params[] = {&args->handle, &args->finished, &args->n_rows, &args->iters, &args->max_iters, &args->count};
  cudaKernelNodeParams kp = {};
  kp.func = reinterpret_cast<void*>(set_condition_kernel);
  kp.gridDim = dim3(1);
  kp.blockDim = dim3(256);
  kp.sharedMemBytes = 0;
  kp.kernelParams = params;
  return cudaGraphAddKernelNode(node, graph, dep, dep != nullptr ? 1 : 0, &kp);
}

}  // namespace

struct kr_while_graph {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
};

extern "C" int kr_while_graph_supported(void) {
  int runtime = 0, driver = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess || cudaDriverGetVersion(&driver) != cudaSuccess) return 0;
  return runtime >= 12040 && driver >= 12040;
}

extern "C" cudaError_t kr_while_graph_create(const cudaGraph_t* bodies, int n_bodies, const uint8_t* finished,
                                             int64_t n_rows, int64_t* iters, int64_t max_iters,
                                             kr_while_graph** out) {
  if (out == nullptr || bodies == nullptr || n_bodies <= 0 || finished == nullptr || iters == nullptr) {
    return cudaErrorInvalidValue;
  }
  *out = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  cudaError_t err = cudaGraphCreate(&graph, 0);
  if (err != cudaSuccess) return err;
#define KR_TRY(call)              \
  do {                            \
    err = (call);                 \
    if (err != cudaSuccess) {     \
      cudaGraphDestroy(graph);    \
      return err;                 \
    }                             \
  } while (0)
  cudaGraphConditionalHandle handle;
  KR_TRY(cudaGraphConditionalHandleCreate(&handle, graph, 0, 0));
  ConditionArgs first = {handle, finished, n_rows, iters, max_iters, 0};
  cudaGraphNode_t check;
  KR_TRY(add_condition_kernel(&check, graph, nullptr, &first));
  cudaGraphNodeParams cond = {};
  cond.type = cudaGraphNodeTypeConditional;
  cond.conditional.handle = handle;
  cond.conditional.type = cudaGraphCondTypeWhile;
  cond.conditional.size = 1;
  cudaGraphNode_t loop;
  KR_TRY(add_node(&loop, graph, &check, 1, &cond));
  cudaGraph_t body = cond.conditional.phGraph_out[0];
  cudaGraphNode_t prev = nullptr;
  for (int i = 0; i < n_bodies; ++i) {
    cudaGraphNode_t node;
    KR_TRY(cudaGraphAddChildGraphNode(&node, body, prev != nullptr ? &prev : nullptr, prev != nullptr ? 1 : 0,
                                      bodies[i]));
    prev = node;
  }
  ConditionArgs again = {handle, finished, n_rows, iters, max_iters, 1};
  cudaGraphNode_t tail;
  KR_TRY(add_condition_kernel(&tail, body, &prev, &again));
  KR_TRY(cudaGraphInstantiate(&exec, graph, 0));
#undef KR_TRY
  kr_while_graph* g = static_cast<kr_while_graph*>(malloc(sizeof(kr_while_graph)));
  if (g == nullptr) {
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    return cudaErrorMemoryAllocation;
  }
  g->graph = graph;
  g->exec = exec;
  *out = g;
  return cudaSuccess;
}

extern "C" cudaError_t kr_while_graph_launch(kr_while_graph* graph, cudaStream_t stream) {
  if (graph == nullptr) return cudaErrorInvalidValue;
  return cudaGraphLaunch(graph->exec, stream);
}

extern "C" void kr_while_graph_destroy(kr_while_graph* graph) {
  if (graph == nullptr) return;
  cudaGraphExecDestroy(graph->exec);
  cudaGraphDestroy(graph->graph);
  free(graph);
}

#else  // CUDA < 12.4: no conditional nodes; callers use the host loop.

struct kr_while_graph {
  int unused;
};

extern "C" int kr_while_graph_supported(void) { return 0; }

extern "C" cudaError_t kr_while_graph_create(const cudaGraph_t*, int, const uint8_t*, int64_t, int64_t*, int64_t,
                                             kr_while_graph** out) {
  if (out != nullptr) *out = nullptr;
  return cudaErrorNotSupported;
}

extern "C" cudaError_t kr_while_graph_launch(kr_while_graph*, cudaStream_t) { return cudaErrorNotSupported; }

extern "C" void kr_while_graph_destroy(kr_while_graph*) {}

#endif
