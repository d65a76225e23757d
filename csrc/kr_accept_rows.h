// One row of greedy acceptance and of a commit (kangaroo_rt.reference.accept_greedy / commit_tokens /
// accept_greedy_commit), shared by csrc/accept.cu (a CUDA thread per row) and csrc/cpu/accept.cpp (a loop over
// rows): one definition, so one behaviour. A row's work is a scan over at most gamma + 1 tokens. Plain C++ with
// __host__ __device__ under nvcc; no CUDA or ATen headers.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define KR_ROW_FN __host__ __device__ __forceinline__
#else
#define KR_ROW_FN inline
#endif

namespace kr_rows {

// Row b: the agreeing prefix of drafts (k, strides sd0/sd1) and the target's tokens within n_drafts[b], and the
// target's token after it.
KR_ROW_FN void greedy_count(int64_t b, const int64_t* drafts, int64_t sd0, int64_t sd1, const int64_t* n_drafts,
                            const int64_t* target, int64_t st0, int64_t st1, int64_t k, int64_t* accepted,
                            int64_t* next_token) {
  const int64_t n = n_drafts[b];
  int64_t a = 0;
  while (a < k && a < n && drafts[b * sd0 + a * sd1] == target[b * st0 + a * st1]) ++a;
  *accepted = a;
  *next_token = target[b * st0 + a * st1];
}

// Commits token_at(i) for i < count into row b of out from column n_gen[b] on (columns past out_width not
// written), up to and including the first of the n_eos ids; a finished row commits nothing. Returns the number
// committed; n_gen[b] += it, finished[b] |= an EOS was committed.
template <typename TokenAt>
KR_ROW_FN int64_t commit_row(int64_t b, TokenAt token_at, int64_t count, int64_t* out, int64_t out_row_stride,
                             int64_t out_width, int64_t* n_gen, uint8_t* finished, const int64_t* eos, int64_t n_eos) {
  const bool was_finished = finished[b] != 0;
  const int64_t gen = n_gen[b];
  int64_t committed = 0;
  bool hit = false;
  if (!was_finished) {
    for (int64_t i = 0; i < count && !hit; ++i) {
      const int64_t tok = token_at(i);
      const int64_t col = gen + i;
      if (col >= 0 && col < out_width) out[b * out_row_stride + col] = tok;
      ++committed;
      for (int64_t e = 0; e < n_eos; ++e) hit = hit || tok == eos[e];
    }
  }
  n_gen[b] = gen + committed;
  finished[b] = (was_finished || hit) ? 1 : 0;
  return committed;
}

// Row b of commit_tokens: its first min(count[b], n) tokens (strides stk0, stk1; a negative count commits none).
KR_ROW_FN int64_t commit_tokens_row(int64_t b, const int64_t* tokens, int64_t stk0, int64_t stk1, int64_t n,
                                    const int64_t* count, int64_t* out, int64_t out_row_stride, int64_t out_width,
                                    int64_t* n_gen, uint8_t* finished, const int64_t* eos, int64_t n_eos) {
  const int64_t c = count[b] < n ? (count[b] < 0 ? 0 : count[b]) : n;
  auto token_at = [&](int64_t i) { return tokens[b * stk0 + i * stk1]; };
  return commit_row(b, token_at, c, out, out_row_stride, out_width, n_gen, finished, eos, n_eos);
}

// Row b of a round's commit once its acceptance is known: the first a drafts, then nxt, and pos[b] += a + 1 on a row
// not finished before. Returns the number committed.
KR_ROW_FN int64_t commit_accepted_row(int64_t b, const int64_t* drafts, int64_t sd0, int64_t sd1, int64_t a,
                                      int64_t nxt, int64_t* out, int64_t out_row_stride, int64_t out_width,
                                      int64_t* n_gen, uint8_t* finished, int64_t* pos, const int64_t* eos,
                                      int64_t n_eos) {
  const bool was_active = finished[b] == 0;
  auto token_at = [&](int64_t i) { return i == a ? nxt : drafts[b * sd0 + i * sd1]; };
  const int64_t committed = commit_row(b, token_at, a + 1, out, out_row_stride, out_width, n_gen, finished, eos,
                                       n_eos);
  if (was_active) pos[b] += a + 1;
  return committed;
}

// Row b of accept_greedy_commit: greedy_count, then commit_accepted_row. Returns the number committed.
KR_ROW_FN int64_t accept_commit_row(int64_t b, const int64_t* drafts, int64_t sd0, int64_t sd1,
                                    const int64_t* n_drafts, const int64_t* target, int64_t st0, int64_t st1, int64_t k,
                                    int64_t* out, int64_t out_row_stride, int64_t out_width, int64_t* n_gen,
                                    uint8_t* finished, int64_t* pos, const int64_t* eos, int64_t n_eos,
                                    int64_t* accepted, int64_t* next_token) {
  int64_t a, nxt;
  greedy_count(b, drafts, sd0, sd1, n_drafts, target, st0, st1, k, &a, &nxt);
  *accepted = a;
  *next_token = nxt;
  return commit_accepted_row(b, drafts, sd0, sd1, a, nxt, out, out_row_stride, out_width, n_gen, finished, pos, eos,
                             n_eos);
}

}  // namespace kr_rows
