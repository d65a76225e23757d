// The accept kernel: greedy acceptance, the commit of a round's tokens, and both fused with the position
// update (kangaroo_rt.reference.accept_greedy / commit_tokens / accept_greedy_commit). One thread per row:
// a row's work is a scan over at most gamma + 1 tokens.
#include "kangaroo_rt.h"
#include "kr_accept_rows.h"

namespace {

constexpr int kThreads = 128;

__global__ void accept_greedy_kernel(const int64_t* drafts, int64_t sd0, int64_t sd1, const int64_t* n_drafts,
                                     const int64_t* target, int64_t st0, int64_t st1, int64_t batch, int64_t k,
                                     int64_t* accepted, int64_t* next_token) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  kr_rows::greedy_count(b, drafts, sd0, sd1, n_drafts, target, st0, st1, k, accepted + b, next_token + b);
}

__global__ void commit_tokens_kernel(const int64_t* tokens, int64_t stk0, int64_t stk1, int64_t n,
                                     const int64_t* count, int64_t* out, int64_t out_row_stride, int64_t out_width,
                                     int64_t* n_gen, uint8_t* finished, const int64_t* eos, int64_t n_eos,
                                     int64_t batch, int64_t* committed) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  committed[b] = kr_rows::commit_tokens_row(b, tokens, stk0, stk1, n, count, out, out_row_stride, out_width, n_gen,
                                            finished, eos, n_eos);
}

__global__ void accept_greedy_commit_kernel(const int64_t* drafts, int64_t sd0, int64_t sd1, const int64_t* n_drafts,
                                            const int64_t* target, int64_t st0, int64_t st1, int64_t batch, int64_t k,
                                            int64_t* out, int64_t out_row_stride, int64_t out_width, int64_t* n_gen,
                                            uint8_t* finished, int64_t* pos, const int64_t* eos, int64_t n_eos,
                                            int64_t* accepted, int64_t* next_token, int64_t* committed) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  committed[b] = kr_rows::accept_commit_row(b, drafts, sd0, sd1, n_drafts, target, st0, st1, k, out, out_row_stride,
                                            out_width, n_gen, finished, pos, eos, n_eos, accepted + b, next_token + b);
}

unsigned blocks_for(int64_t batch) { return static_cast<unsigned>((batch + kThreads - 1) / kThreads); }

}  // namespace

extern "C" cudaError_t kr_accept_greedy(const int64_t* drafts, int64_t sd0, int64_t sd1, const int64_t* n_drafts,
                                        const int64_t* target, int64_t st0, int64_t st1, int64_t batch, int64_t k,
                                        int64_t* accepted, int64_t* next_token, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  accept_greedy_kernel<<<blocks_for(batch), kThreads, 0, stream>>>(drafts, sd0, sd1, n_drafts, target, st0, st1,
                                                                   batch, k, accepted, next_token);
  return cudaGetLastError();
}

extern "C" cudaError_t kr_commit_tokens(const int64_t* tokens, int64_t stk0, int64_t stk1, int64_t n,
                                        const int64_t* count, int64_t* out, int64_t out_row_stride, int64_t out_width,
                                        int64_t* n_gen, uint8_t* finished, const int64_t* eos, int64_t n_eos,
                                        int64_t batch, int64_t* committed, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  if (eos == nullptr) n_eos = 0;
  commit_tokens_kernel<<<blocks_for(batch), kThreads, 0, stream>>>(tokens, stk0, stk1, n, count, out, out_row_stride,
                                                                   out_width, n_gen, finished, eos, n_eos, batch,
                                                                   committed);
  return cudaGetLastError();
}

extern "C" cudaError_t kr_accept_greedy_commit(const int64_t* drafts, int64_t sd0, int64_t sd1,
                                               const int64_t* n_drafts, const int64_t* target, int64_t st0,
                                               int64_t st1, int64_t batch, int64_t k, int64_t* out,
                                               int64_t out_row_stride, int64_t out_width, int64_t* n_gen,
                                               uint8_t* finished, int64_t* pos, const int64_t* eos, int64_t n_eos,
                                               int64_t* accepted, int64_t* next_token, int64_t* committed,
                                               cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  if (eos == nullptr) n_eos = 0;
  accept_greedy_commit_kernel<<<blocks_for(batch), kThreads, 0, stream>>>(
      drafts, sd0, sd1, n_drafts, target, st0, st1, batch, k, out, out_row_stride, out_width, n_gen, finished, pos,
      eos, n_eos, accepted, next_token, committed);
  return cudaGetLastError();
}
