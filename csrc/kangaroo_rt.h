// Launchers of the kangaroo_rt CUDA kernels: plain C signatures (raw pointers, strides in elements, a
// stream), no ATen, no pybind11. bindings.cpp wraps them for torch; every .cu compiles alone with nvcc.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types of floating-point tensors.
enum kr_dtype { KR_FLOAT32 = 0, KR_FLOAT16 = 1, KR_BFLOAT16 = 2 };

// RMSNorm over rows: out = weight * cast(x * rsqrt(mean(x^2) + eps)), reductions in fp32. With residual
// != NULL, x + residual (in the element type) is normed and written to new_residual first.
// x, residual, new_residual, out: (n_rows, n_cols) with unit column stride; weight: (n_cols,); one dtype.
cudaError_t kr_rms_norm(const void* x, int64_t x_row_stride, const void* residual, int64_t residual_row_stride,
                        void* new_residual, int64_t new_residual_row_stride, const void* weight, void* out,
                        int64_t out_row_stride, int64_t n_rows, int64_t n_cols, float eps, int dtype,
                        cudaStream_t stream);

// RoPE (rotate-half, fp32 math) on q and k, then the append of the rotated k and of v into the caches at
// per-row positions. Strides are in elements; every tensor has the same dtype except positions (int64).
typedef struct {
  const void* q;         // (B, Hq, q_len, D)
  const void* k;         // (B, Hkv, q_len, D)
  const void* v;         // (B, Hkv, q_len, D)
  const void* cos;       // (B, q_len, D)
  const void* sin;       // (B, q_len, D)
  void* k_cache;         // (B_max, Hkv, T_max, D)
  void* v_cache;         // (B_max, Hkv, T_max, D)
  const int64_t* positions;  // (B, q_len), each in [0, T_max)
  void* q_out;           // (B, Hq, q_len, D) contiguous, out
  int64_t batch, q_len, n_q_heads, n_kv_heads, head_dim, max_len;
  int64_t sq[4], sk[4], sv[4], scos[3], ssin[3], skc[4], svc[4], spos[2];
} kr_rope_args;

cudaError_t kr_rope_cache_append(const kr_rope_args* args, int dtype, cudaStream_t stream);

// Greedy acceptance. drafts: (B, K) int64 (-1 placeholders), strides sd0/sd1; n_drafts: (B,) int64;
// target: (B, K+1) int64, strides st0/st1. Writes accepted (B,) and next_token (B,).
cudaError_t kr_accept_greedy(const int64_t* drafts, int64_t sd0, int64_t sd1, const int64_t* n_drafts,
                             const int64_t* target, int64_t st0, int64_t st1, int64_t batch, int64_t k,
                             int64_t* accepted, int64_t* next_token, cudaStream_t stream);

// Commit tokens (B, n) (first count[b] valid, stop after an EOS) into out (B, W) at n_gen; updates n_gen,
// finished (one byte per row) in place; writes committed (B,). eos: (n_eos,) int64, may be NULL.
cudaError_t kr_commit_tokens(const int64_t* tokens, int64_t stk0, int64_t stk1, int64_t n, const int64_t* count,
                             int64_t* out, int64_t out_row_stride, int64_t out_width, int64_t* n_gen,
                             uint8_t* finished, const int64_t* eos, int64_t n_eos, int64_t batch,
                             int64_t* committed, cudaStream_t stream);

// Greedy acceptance fused with the commit and the position update of one round (pos += accepted + 1 on
// rows that were not finished). Shapes as above.
cudaError_t kr_accept_greedy_commit(const int64_t* drafts, int64_t sd0, int64_t sd1, const int64_t* n_drafts,
                                    const int64_t* target, int64_t st0, int64_t st1, int64_t batch, int64_t k,
                                    int64_t* out, int64_t out_row_stride, int64_t out_width, int64_t* n_gen,
                                    uint8_t* finished, int64_t* pos, const int64_t* eos, int64_t n_eos,
                                    int64_t* accepted, int64_t* next_token, int64_t* committed, cudaStream_t stream);

// Host round loop: launch the graph executables execs[0..n_execs-1] in order, `rounds` times, on stream.
cudaError_t kr_replay_rounds(const cudaGraphExec_t* execs, int n_execs, int64_t rounds, cudaStream_t stream);

// Device-side round loop: a graph whose conditional while node runs the bodies (child graphs, in order)
// while some row of finished (n_rows bytes) is 0 and *iters < max_iters (iters is incremented per round).
typedef struct kr_while_graph kr_while_graph;
int kr_while_graph_supported(void);  // 1 when built with CUDA >= 12.4 and the driver/runtime allow it
cudaError_t kr_while_graph_create(const cudaGraph_t* bodies, int n_bodies, const uint8_t* finished, int64_t n_rows,
                                  int64_t* iters, int64_t max_iters, kr_while_graph** out);
cudaError_t kr_while_graph_launch(kr_while_graph* graph, cudaStream_t stream);
void kr_while_graph_destroy(kr_while_graph* graph);

#ifdef __cplusplus
}
#endif
