// CPU greedy acceptance and commit of a decoding round (kangaroo_rt.reference.commit_tokens /
// accept_greedy_commit): the per-row logic of csrc/kr_accept_rows.h, which csrc/accept.cu runs a CUDA thread per
// row, in a loop over rows. See kr_cpu.h for the contract.
//
// On the CPU the torch reference of a round's accept + commit is about 25 small tensor ops: ~170 us a round with
// SmolLM2 in bf16 (4% of a plain step), where the work itself is a scan over at most gamma + 1 tokens per row.
#include "kr_cpu.h"
#include "../kr_accept_rows.h"

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
  for (int64_t b = 0; b < batch; ++b)
    committed[b] = kr_rows::commit_tokens_row(b, tokens, stk0, stk1, n, count, out, out_row_stride, out_width, n_gen,
                                              finished, eos, n_eos);
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
  for (int64_t b = 0; b < batch; ++b)
    committed[b] = kr_rows::accept_commit_row(b, drafts, sd0, sd1, n_drafts, target, st0, st1, k, out, out_row_stride,
                                              out_width, n_gen, finished, pos, eos, n_eos, accepted + b,
                                              next_token + b);
  return KR_CPU_OK;
}
