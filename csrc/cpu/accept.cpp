// CPU greedy acceptance and commit of a decoding round (kangaroo_rt.reference.commit_tokens /
// accept_greedy_commit): csrc/accept.cu's per-row logic, a loop over rows. See kr_cpu.h for the contract.
//
// On the CPU the torch reference of a round's accept + commit is about 25 small tensor ops: ~170 us a round with
// SmolLM2 in bf16 (4% of a plain step), where the work itself is a scan over at most gamma + 1 tokens per row.
#include "kr_cpu.h"

namespace {

// Commits token_at(i) for i < count up to and including the first EOS into row b of out (columns < out_width);
// returns the number committed. A finished row commits nothing.
template <typename TokenAt>
int64_t commit_row(int64_t b, TokenAt token_at, int64_t count, int64_t* out, int64_t out_row_stride,
                   int64_t out_width, int64_t* n_gen, uint8_t* finished, const int64_t* eos, int64_t n_eos) {
  const bool was_finished = finished[b] != 0;
  int64_t committed = 0;
  bool hit = false;
  if (!was_finished) {
    for (int64_t i = 0; i < count && !hit; ++i) {
      const int64_t tok = token_at(i);
      const int64_t col = n_gen[b] + i;
      if (col >= 0 && col < out_width) out[b * out_row_stride + col] = tok;
      ++committed;
      for (int64_t e = 0; e < n_eos; ++e) hit = hit || tok == eos[e];
    }
  }
  n_gen[b] += committed;
  finished[b] = (was_finished || hit) ? 1 : 0;
  return committed;
}

}  // namespace

extern "C" int kr_cpu_commit_tokens(const int64_t* tokens, int64_t stk0, int64_t stk1, int64_t n, const int64_t* count,
                                    int64_t* out, int64_t out_row_stride, int64_t out_width, int64_t* n_gen,
                                    uint8_t* finished, const int64_t* eos, int64_t n_eos, int64_t batch,
                                    int64_t* committed) {
  if (batch < 0 || n < 0 || out_width < 0 || n_eos < 0) return KR_CPU_BAD_ARGUMENT;
  if (batch == 0) return KR_CPU_OK;
  if (tokens == nullptr && n > 0) return KR_CPU_BAD_ARGUMENT;
  if (count == nullptr || out == nullptr || n_gen == nullptr || finished == nullptr || committed == nullptr ||
      (eos == nullptr && n_eos > 0))
    return KR_CPU_BAD_ARGUMENT;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t c = count[b] < n ? (count[b] < 0 ? 0 : count[b]) : n;
    auto token_at = [&](int64_t i) { return tokens[b * stk0 + i * stk1]; };
    committed[b] = commit_row(b, token_at, c, out, out_row_stride, out_width, n_gen, finished, eos, n_eos);
  }
  return KR_CPU_OK;
}

extern "C" int kr_cpu_accept_greedy_commit(const int64_t* drafts, int64_t sd0, int64_t sd1, const int64_t* n_drafts,
                                           const int64_t* target, int64_t st0, int64_t st1, int64_t batch, int64_t k,
                                           int64_t* out, int64_t out_row_stride, int64_t out_width, int64_t* n_gen,
                                           uint8_t* finished, int64_t* pos, const int64_t* eos, int64_t n_eos,
                                           int64_t* accepted, int64_t* next_token, int64_t* committed) {
  if (batch < 0 || k < 0 || out_width < 0 || n_eos < 0) return KR_CPU_BAD_ARGUMENT;
  if (batch == 0) return KR_CPU_OK;
  if ((drafts == nullptr && k > 0) || n_drafts == nullptr || target == nullptr || out == nullptr ||
      n_gen == nullptr || finished == nullptr || pos == nullptr || accepted == nullptr || next_token == nullptr ||
      committed == nullptr || (eos == nullptr && n_eos > 0))
    return KR_CPU_BAD_ARGUMENT;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = n_drafts[b];
    int64_t a = 0;
    while (a < k && a < n && drafts[b * sd0 + a * sd1] == target[b * st0 + a * st1]) ++a;
    const int64_t nxt = target[b * st0 + a * st1];
    const bool was_active = finished[b] == 0;
    auto token_at = [&](int64_t i) { return i == a ? nxt : drafts[b * sd0 + i * sd1]; };
    committed[b] = commit_row(b, token_at, a + 1, out, out_row_stride, out_width, n_gen, finished, eos, n_eos);
    if (was_active) pos[b] += a + 1;
    accepted[b] = a;
    next_token[b] = nxt;
  }
  return KR_CPU_OK;
}
