// The accept kernel: greedy acceptance, the commit of a round's tokens, and both fused with the position
// update (kangaroo_rt.reference.accept_greedy / commit_tokens / accept_greedy_commit). One thread per row:
// a row's work is a scan over at most gamma + 1 tokens.
#include "kangaroo_rt.h"

namespace {

constexpr int kThreads = 128;

__device__ void greedy_count(int64_t b, const int64_t* drafts, int64_t sd0, int64_t sd1, const int64_t* n_drafts,
                             const int64_t* target, int64_t st0, int64_t st1, int64_t k, int64_t* accepted,
                             int64_t* next_token) {
  const int64_t n = n_drafts[b];
  int64_t a = 0;
  while (a < k && a < n && drafts[b * sd0 + a * sd1] == target[b * st0 + a * st1]) ++a;
  *accepted = a;
  *next_token = target[b * st0 + a * st1];
}

// Commits token(i) for i < count up to the first EOS; returns the number committed.
template <typename TokenAt>
__device__ int64_t commit_row(int64_t b, TokenAt token_at, int64_t count, int64_t* out, int64_t out_row_stride,
                              int64_t out_width, int64_t* n_gen, uint8_t* finished, const int64_t* eos,
                              int64_t n_eos) {
  const bool was_finished = finished[b] != 0;
  int64_t gen = n_gen[b];
  int64_t committed = 0;
  bool hit = false;
  if (!was_finished) {
    for (int64_t i = 0; i < count && !hit; ++i) {
      const int64_t tok = token_at(i);
      const int64_t col = gen + i;
      if (col < out_width) out[b * out_row_stride + col] = tok;
      ++committed;
      for (int64_t e = 0; e < n_eos; ++e) hit = hit || tok == eos[e];
    }
  }
  gen += committed;
  n_gen[b] = gen;
  finished[b] = (was_finished || hit) ? 1 : 0;
  return committed;
}

__global__ void accept_greedy_kernel(const int64_t* drafts, int64_t sd0, int64_t sd1, const int64_t* n_drafts,
                                     const int64_t* target, int64_t st0, int64_t st1, int64_t batch, int64_t k,
                                     int64_t* accepted, int64_t* next_token) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  greedy_count(b, drafts, sd0, sd1, n_drafts, target, st0, st1, k, accepted + b, next_token + b);
}

__global__ void commit_tokens_kernel(const int64_t* tokens, int64_t stk0, int64_t stk1, int64_t n,
                                     const int64_t* count, int64_t* out, int64_t out_row_stride, int64_t out_width,
                                     int64_t* n_gen, uint8_t* finished, const int64_t* eos, int64_t n_eos,
                                     int64_t batch, int64_t* committed) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int64_t c = count[b] < n ? count[b] : n;
  auto token_at = [&](int64_t i) { return tokens[b * stk0 + i * stk1]; };
  committed[b] = commit_row(b, token_at, c, out, out_row_stride, out_width, n_gen, finished, eos, n_eos);
}

__global__ void accept_greedy_commit_kernel(const int64_t* drafts, int64_t sd0, int64_t sd1, const int64_t* n_drafts,
                                            const int64_t* target, int64_t st0, int64_t st1, int64_t batch, int64_t k,
                                            int64_t* out, int64_t out_row_stride, int64_t out_width, int64_t* n_gen,
                                            uint8_t* finished, int64_t* pos, const int64_t* eos, int64_t n_eos,
                                            int64_t* accepted, int64_t* next_token, int64_t* committed) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  int64_t a, nxt;
  greedy_count(b, drafts, sd0, sd1, n_drafts, target, st0, st1, k, &a, &nxt);
  const bool was_active = finished[b] == 0;
  auto token_at = [&](int64_t i) { return i == a ? nxt : drafts[b * sd0 + i * sd1]; };
  committed[b] = commit_row(b, token_at, a + 1, out, out_row_stride, out_width, n_gen, finished, eos, n_eos);
  if (was_active) pos[b] += a + 1;
  accepted[b] = a;
  next_token[b] = nxt;
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
