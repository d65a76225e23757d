// A target pass with its acceptance in one call, on one set of threads: greedy, or sampled from given uniforms. See
// kr_cpu.h for the contract.
//
// The step-by-step path (Decoder.ar_step / .verify) spends ~0.1 ms (a plain step) to ~0.27 ms (a verification) in
// Python around its extension calls on SmolLM2: positions and RoPE rows, the stack call's argument lists, the
// final norm, the head, the choice, the acceptance and a few state updates, each a call of its own. Here they are
// phases of one region on the decoder stack's machinery (kr_cpu_stack.h).
//
// Only the positions the acceptance reads are computed: row b's first 1 + min(max(n_drafts[b], 0), Q - 1) (a plain
// step's one), packed one after another ("tokens"), where a batch's verification pads every row to Q = k + 1 for the
// row with the most drafts (SmolLM2 with the shipped adapter, 4 concurrent requests: 9.5 of 13.8 rows a round on
// average, 8 requests: 14.6 of 26.3). Each token is a batch row of its own for the layer stack, reading and writing its
// row's cache (kr_cpu_decoder_args.cache_rows); every op gives a row's bits whatever the rows beside it, so the tokens
// get the bits of the padded pass. The cache slots past a row's tokens are not written (nothing reads them: they are
// past the row's accepted length).
#include <cstdlib>
#include <cstring>

#include "kr_cpu_stack.h"

#include "../kr_accept_rows.h"

namespace {

using namespace kr_cpu;

// inputs, final norm, head, choice, acceptance (+ one spare); the screened head: its inputs, the screen, the choice;
// sampled: the probabilities, the draws, the commit
constexpr int64_t kExtraPhases = 6;

struct PassLayout {
  int64_t sync, status, h, xn, positions, cos, sin, logits, yf, idx, next, no_drafts, stack, total;
  int64_t tok_row, tok_at, row_start;  // the packed tokens' rows, their b * Q + i, each row's first token (B + 1)
  int64_t screen_u, screen_stats, screen_hi, screen_floors;  // the screened head's: x's int8 parts, their stats, the
  // upper bounds, the running floors
  // sampled: p (M, V) fp32, process_logits' row status (M,), the drafts' q over the whole vocabulary (B, Q - 1, V)
  // fp32 when they come over a draft vocabulary's ids
  int64_t probs, left, q_dense;
};

kr_cpu_decoder_args stack_args(const kr_cpu_target_pass_args& a) {
  kr_cpu_decoder_args s{};
  s.dtype = a.dtype;
  s.batch = a.batch, s.q_len = a.q_len, s.hidden_size = a.hidden_size, s.n_heads = a.n_heads;
  s.n_kv_heads = a.n_kv_heads, s.head_dim = a.head_dim, s.intermediate = a.intermediate;
  s.max_len = a.max_len, s.kv_len = a.kv_len, s.eps = a.eps, s.scale = a.scale;
  s.n_layers = a.n_layers, s.layers = a.layers, s.packed = a.packed;
  for (int d = 0; d < 3; ++d) s.cache_stride[d] = a.cache_stride[d];
  s.pos_stride[0] = a.q_len, s.pos_stride[1] = 1;
  s.threads = a.threads;
  return s;
}

bool sampled(const kr_cpu_target_pass_args& a) { return a.sample_u_next != nullptr; }

// Whether the screened head runs with its running floors (kr_cpu_screen_rows): KANGAROO_RT_SCREEN_FLOORS=0 turns
// them off (every bound from both of x's parts, the A/B baseline), read at each pass as the Python switches are.
bool screen_floors_on() {
  const char* env = std::getenv("KANGAROO_RT_SCREEN_FLOORS");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// Whether the pass takes the screened head (given, greedy, and this many rows are faster with it).
bool screened(const kr_cpu_target_pass_args& a) {
  return a.head_screen != nullptr && !sampled(a) && a.batch * a.q_len <= kr_cpu_screen_max_rows(a.dtype);
}

PassLayout pass_layout_of(const kr_cpu_target_pass_args& a) {
  const int64_t e = elt_size(a.dtype), M = a.batch * a.q_len, D = a.hidden_size, Dh = a.head_dim, V = a.head_rows;
  PassLayout l{};
  Carve take;
  l.sync = take((kPhasesPerLayer * a.n_layers + kExtraPhases) * kCounterStride * 8);
  l.status = take(8);
  l.h = take(M * D * e);
  l.xn = take(M * D * e);
  l.positions = take(M * 8);
  l.cos = take(M * Dh * e);
  l.sin = take(M * Dh * e);
  const bool screen = screened(a);
  l.logits = take(screen ? 0 : M * V * e);
  l.yf = take(a.dtype == KR_CPU_FLOAT32 && !screen ? 0 : M * V * 4);  // screened: the lower bounds
  l.idx = take(M * 8);
  l.next = take(a.batch * 8);
  l.no_drafts = take(a.batch * 8);
  l.tok_row = take(M * 8);
  l.tok_at = take(M * 8);
  l.row_start = take((a.batch + 1) * 8);
  l.stack = take(StackBuffers(sizes_of(stack_args(a)), a.dtype).total);
  l.screen_u = take(screen ? M * 2 * a.head_screen->kp : 0);
  l.screen_stats = take(screen ? M * KR_CPU_SCREEN_STATS * 8 : 0);
  l.screen_hi = take(screen ? M * V * 4 : 0);
  l.screen_floors = take(screen ? M * 4 : 0);
  l.probs = take(sampled(a) ? M * V * 4 : 0);
  l.left = take(sampled(a) ? M * 4 : 0);
  l.q_dense = take(sampled(a) && a.sample_q_ids != nullptr ? a.batch * (a.q_len - 1) * V * 4 : 0);
  l.total = take.at;
  return l;
}

// The positions of row b that the acceptance reads: 1 + the drafts it tests (a plain step: 1).
inline int64_t row_tokens(const kr_cpu_target_pass_args& a, int64_t b) {
  return a.q_len == 1 ? 1 : 1 + std::min(std::max<int64_t>(a.n_drafts[b], 0), a.q_len - 1);
}

// After the commit: the rows that reached max_new finished, each row's next token, and e_prev the exit state at the
// accepted length.
template <typename T>
void finish_round(const kr_cpu_target_pass_args& a, const int64_t* next) {
  const int64_t D = a.hidden_size;
  for (int64_t b = 0; b < a.batch; ++b) {
    if (a.n_gen[b] >= a.max_new[b]) a.finished[b] = 1;
    a.token[b] = next[b];
    if (a.e_prev != nullptr)
      std::memcpy(static_cast<T*>(a.e_prev) + b * D, static_cast<const T*>(a.exits) + b * a.exits_stride +
                  a.accepted[b] * D, static_cast<size_t>(D) * sizeof(T));
  }
}

// The sampled choice over the packed tokens' logits (n_tok, V) (Decoder.ar_step / .verify with BatchSampling or
// RowSampling; row b's positions are tokens row_start[b] ..): on a
// sampled row p per position, then a draw or the speculative acceptance into accepted and next; on a greedy row the
// argmax per position and the greedy acceptance; then the commit of the accepted drafts and the next token. A
// position that cannot be drawn from sets KR_CPU_NOT_A_DISTRIBUTION and nothing is committed.
template <typename T>
void sampled_choice(Phases& ph, int isa, const kr_cpu_target_pass_args& a, const PassLayout& l, const T* logits,
                    int64_t n_tok, int64_t* next) {
  char* ws = static_cast<char*>(a.workspace);
  const int64_t B = a.batch, Q = a.q_len, V = a.head_rows;
  float* p = reinterpret_cast<float*>(ws + l.probs);
  int32_t* left = reinterpret_cast<int32_t*>(ws + l.left);
  int64_t* target = reinterpret_cast<int64_t*>(ws + l.idx);  // (n_tok): a greedy row's choices
  const int64_t* tok_row = reinterpret_cast<const int64_t*>(ws + l.tok_row);
  const int64_t* row_start = reinterpret_cast<const int64_t*>(ws + l.row_start);
  const kr_cpu_row_sampling& rs = a.sampling;
  ph.each(n_tok, [&](int64_t t) -> int {
    const int64_t b = tok_row[t];
    if (rs.divisor[b] == 0.0f) return kr_cpu_argmax_rows(isa, a.dtype, logits, V, V, target, nullptr, t, t + 1);
    return kr_cpu_process_logits_rows(isa, a.dtype, logits, V, V, rs.divisor[b], rs.top_k[b], rs.top_p[b], p, V,
                                      left, t, t + 1);
  });
  ph.each(B, [&](int64_t b) -> int {
    const int64_t n = row_tokens(a, b) - 1, t0 = row_start[b];  // the drafts to test, the row's first token
    if (rs.divisor[b] == 0.0f) {  // the greedy acceptance: the drafts that agree with the target's choices
      kr_rows::greedy_count(0, Q > 1 ? a.drafts + b * a.drafts_stride : nullptr, 0, 1, &n, target + t0, 0, 1, Q - 1,
                            a.accepted + b, next + b);
      return KR_CPU_OK;
    }
    // Positions from the first without a distribution f on (a NaN or infinite logit) are not read: the step-by-step
    // path fails only where it reaches f, a test of draft f or the next token's draw there.
    int64_t f = 0;
    while (f <= n && left[t0 + f] == 0) ++f;
    const int64_t tested = std::min(n, f);
    const float* q = Q > 1 ? a.sample_q + b * a.sample_q_stride : nullptr;
    if (Q > 1 && a.sample_q_ids != nullptr) {  // the tested drafts' q over the draft vocabulary's ids -> over all
      float* dense = reinterpret_cast<float*>(ws + l.q_dense) + b * (Q - 1) * V;
      for (int64_t i = 0; i < tested; ++i) {
        std::fill_n(dense + i * V, V, 0.0f);
        for (int64_t r = 0; r < a.sample_q_rows; ++r) dense[i * V + a.sample_q_ids[r]] = q[i * a.sample_q_rows + r];
      }
      q = dense;
    }
    int rc;
    if (Q == 1) {  // a plain step's draw
      a.accepted[b] = 0;
      rc = f == 0 ? KR_CPU_OK : kr_cpu_sample_rows(isa, p + t0 * V, V, V, a.sample_u_next + b, next + b, 0, 1);
    } else {
      rc = kr_cpu_accept_sampling_rows(isa, a.drafts + b * a.drafts_stride, a.drafts_stride, &tested, p + t0 * V,
                                       q, Q - 1, V, a.sample_u_accept + b * a.sample_u_accept_stride,
                                       a.sample_u_next + b, a.accepted + b, next + b, 0, 1);
    }
    if (rc != KR_CPU_OK) return rc;
    return a.accepted[b] == f || next[b] < 0 ? KR_CPU_NOT_A_DISTRIBUTION : KR_CPU_OK;
  });
  ph.each(1, [&](int64_t) -> int {  // the commit: the accepted drafts, then the drawn token
    const int64_t failed = __atomic_load_n(reinterpret_cast<int64_t*>(ws + l.status), __ATOMIC_RELAXED);
    if (failed != KR_CPU_OK) return static_cast<int>(failed);
    for (int64_t b = 0; b < B; ++b)
      a.committed[b] = kr_rows::commit_accepted_row(b, a.drafts, a.drafts_stride, 1, a.accepted[b], next[b], a.out,
                                                    a.out_stride, a.out_width, a.n_gen, a.finished, a.pos, a.eos,
                                                    a.n_eos);
    finish_round<T>(a, next);
    return KR_CPU_OK;
  });
}

template <typename T>
int run_pass(int isa, const kr_cpu_target_pass_args& a) {
  const PassLayout l = pass_layout_of(a);
  char* ws = static_cast<char*>(a.workspace);
  int64_t* status = reinterpret_cast<int64_t*>(ws + l.status);
  Phases ph(reinterpret_cast<int64_t*>(ws + l.sync), status, std::max<int64_t>(1, a.threads),
            phase_capacity(l.sync, l.status));
  const int64_t B = a.batch, Q = a.q_len, D = a.hidden_size, Dh = a.head_dim, V = a.head_rows;
  T* h = reinterpret_cast<T*>(ws + l.h);
  T* xn = reinterpret_cast<T*>(ws + l.xn);
  int64_t* positions = reinterpret_cast<int64_t*>(ws + l.positions);
  T* cos = reinterpret_cast<T*>(ws + l.cos);
  T* sin = reinterpret_cast<T*>(ws + l.sin);
  T* logits = reinterpret_cast<T*>(ws + l.logits);
  int64_t* idx = reinterpret_cast<int64_t*>(ws + l.idx);
  int64_t* next = reinterpret_cast<int64_t*>(ws + l.next);
  const T* exits = static_cast<const T*>(a.exits);
  const size_t row_bytes = static_cast<size_t>(D) * sizeof(T);
  int64_t* tok_row = reinterpret_cast<int64_t*>(ws + l.tok_row);
  int64_t* tok_at = reinterpret_cast<int64_t*>(ws + l.tok_at);
  int64_t* row_start = reinterpret_cast<int64_t*>(ws + l.row_start);
  int64_t n_tok = 0;  // (every thread counts them; n_drafts is an input, read-only here)
  for (int64_t b = 0; b < B; ++b) n_tok += row_tokens(a, b);

  ph.each(1, [&](int64_t) {  // the inputs: each row's tokens at positions pos + i, their RoPE rows, hidden states
    int rc = KR_CPU_OK;
    int64_t t = 0;
    for (int64_t b = 0; b < B; ++b) {
      row_start[b] = t;
      const int64_t n = row_tokens(a, b);
      for (int64_t i = 0; i < n; ++i, ++t) {
        const int64_t p = a.pos[b] + i;
        tok_row[t] = b, tok_at[t] = b * Q + i, positions[t] = p;
        rope_row(a.rope_cos, a.rope_sin, p, Dh, cos + t * Dh, sin + t * Dh);
        if (a.embed == nullptr)
          std::memcpy(h + t * D, exits + b * a.exits_stride + i * D, row_bytes);
        else if (embed_row(a.embed, a.vocab, a.token[b], D, h + t * D) != KR_CPU_OK)
          rc = KR_CPU_BAD_ARGUMENT;
      }
    }
    row_start[B] = t;
    return rc;
  });
  kr_cpu_decoder_args s = stack_args(a);  // one batch row a token, in its row's cache
  s.batch = n_tok, s.q_len = 1, s.pos_stride[0] = 1, s.pos_stride[1] = 0;
  s.hidden = h, s.positions = positions, s.cos = cos, s.sin = sin, s.cache_rows = tok_row;
  stack_body<T>(ph, isa, s, ws + l.stack);
  const int64_t norm_rows = std::max<int64_t>(1, 4096 / D);
  ph.each(ceil_div(n_tok, norm_rows), [&](int64_t c) {  // the final norm
    return kr_cpu_rms_norm_rows(isa, a.dtype, h, D, nullptr, 0, a.norm, D, a.norm_eps, xn, nullptr, c * norm_rows,
                                std::min(n_tok, (c + 1) * norm_rows));
  });
  // The whole or screened head's greedy choices go to idx[b * Q + i], where the acceptance reads them (the sampled
  // choice reads its rows packed: sampled_choice).
  phase_stats::name(screened(a) ? phase_stats::kScreen : phase_stats::kHead);  // the head and the choices
  if (!screened(a)) {  // (a sampled pass is never screened)
    linear_phase<T>(ph, isa, xn, n_tok, D, D, a.head, V, nullptr, logits, V, false,
                    reinterpret_cast<float*>(ws + l.yf), a.packed != 0);
    if (sampled(a)) {
      sampled_choice(ph, isa, a, l, logits, n_tok, next);
      return static_cast<int>(__atomic_load_n(status, __ATOMIC_RELAXED));
    }
    ph.each(n_tok, [&](int64_t t) {
      return kr_cpu_argmax_rows(isa, a.dtype, logits + t * V, V, V, idx + tok_at[t], nullptr, 0, 1);
    });
  } else {  // the same choices from the int8 head and the few rows that can win (head_screen.cpp)
    const kr_cpu_head_screen* sc = a.head_screen;
    uint8_t* u = reinterpret_cast<uint8_t*>(ws + l.screen_u);
    double* stats = reinterpret_cast<double*>(ws + l.screen_stats);
    float* hi = reinterpret_cast<float*>(ws + l.screen_hi);
    float* lo = reinterpret_cast<float*>(ws + l.yf);
    // (the floors are set whatever the switch says: each thread reads it, and a thread that read it on while another
    // read it off must still find them set)
    float* floors = reinterpret_cast<float*>(ws + l.screen_floors);
    float* used = screen_floors_on() ? floors : nullptr;
    screen_phases(ph, a.dtype, xn, D, n_tok, D, sc, V, u, stats, floors, [&](int64_t v0, int64_t v1) {
      return kr_cpu_screen_rows(isa, u, stats, n_tok, D, sc, hi, lo, V, v0, v1, used);
    });
    ph.each(n_tok, [&](int64_t t) {
      return kr_cpu_screen_argmax_row(isa, a.dtype, xn + t * D, D, a.head, a.packed, V, stats + t * KR_CPU_SCREEN_STATS,
                                      hi + t * V, lo + t * V, idx + tok_at[t]);
    });
  }
  phase_stats::name(phase_stats::kOther);
  ph.each(1, [&](int64_t) {  // acceptance and commit, the limits, the next round's token and exit state
    int64_t* no_drafts = reinterpret_cast<int64_t*>(ws + l.no_drafts);
    if (Q == 1) std::fill(no_drafts, no_drafts + B, int64_t{0});
    const int64_t* n_drafts = Q > 1 ? a.n_drafts : no_drafts;
    const int rc = kr_cpu_accept_greedy_commit(a.drafts, a.drafts_stride, 1, n_drafts, idx, Q, 1, B, Q - 1, a.out,
                                               a.out_stride, a.out_width, a.n_gen, a.finished, a.pos, a.eos, a.n_eos,
                                               a.accepted, next, a.committed);
    if (rc == KR_CPU_OK) finish_round<T>(a, next);
    return rc;
  });
  return static_cast<int>(__atomic_load_n(status, __ATOMIC_RELAXED));
}

}  // namespace

extern "C" int64_t kr_cpu_target_pass_workspace_bytes(const kr_cpu_target_pass_args* a, int64_t* zeroed_bytes) {
  if (a == nullptr || a->batch < 0 || a->q_len < 1 || a->q_len > KR_CPU_MAX_ROWS_PER_PASS || a->hidden_size <= 0 ||
      a->n_heads <= 0 || a->n_kv_heads <= 0 || a->head_dim <= 0 || a->intermediate < 0 || a->n_layers < 0 ||
      a->head_rows <= 0 || a->head_rows >= (int64_t{1} << 31) ||
      (a->dtype != KR_CPU_FLOAT32 && a->dtype != KR_CPU_BFLOAT16))
    return -1;
  const PassLayout l = pass_layout_of(*a);
  if (zeroed_bytes != nullptr) *zeroed_bytes = l.h;
  return l.total;
}

// The checks of kr_cpu_target_pass_check; with state, also the positions, which the pass itself advances: only the
// one check before the threads start reads them (a thread starting late would race with the commit).
static int check_pass(int isa, const kr_cpu_target_pass_args* a, bool state) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (kr_cpu_target_pass_workspace_bytes(a, nullptr) < 0 || a->threads < 1 || a->n_eos < 0 || a->out_width < 0)
    return KR_CPU_BAD_ARGUMENT;
  if (a->batch == 0) return KR_CPU_OK;
  const bool from_tokens = a->embed != nullptr;
  const bool bad_source = from_tokens ? (a->q_len != 1 || a->vocab <= 0)
                                      : (a->exits == nullptr || a->exits_stride < a->q_len * a->hidden_size);
  if (bad_source ||
      (a->q_len > 1 && (a->drafts == nullptr || a->n_drafts == nullptr || a->drafts_stride < a->q_len - 1)) ||
      (a->e_prev != nullptr && from_tokens) || a->norm == nullptr || a->head == nullptr || a->rope_cos == nullptr ||
      a->rope_sin == nullptr || a->pos == nullptr || a->token == nullptr || a->out == nullptr || a->n_gen == nullptr ||
      a->finished == nullptr || a->max_new == nullptr || (a->eos == nullptr && a->n_eos > 0) ||
      a->accepted == nullptr || a->committed == nullptr || a->workspace == nullptr ||
      reinterpret_cast<uintptr_t>(a->workspace) % 64 != 0)
    return KR_CPU_BAD_ARGUMENT;
  if (a->sample_u_next != nullptr &&
      (a->head_screen != nullptr || kr_cpu_row_sampling_check(&a->sampling, a->batch) != KR_CPU_OK ||
       (a->q_len > 1 && (a->sample_q == nullptr || a->sample_u_accept == nullptr ||
                         (a->sample_q_ids == nullptr ? a->sample_q_rows != a->head_rows
                                                     : a->sample_q_rows < 1 || a->sample_q_rows > a->head_rows) ||
                         a->sample_q_stride < (a->q_len - 1) * a->sample_q_rows ||
                         a->sample_u_accept_stride < a->q_len - 1))))
    return KR_CPU_BAD_ARGUMENT;
  if (!screen_serves(a->head_screen, a->hidden_size, true)) return KR_CPU_BAD_ARGUMENT;
  for (int64_t b = 0; state && b < a->batch; ++b)
    if (a->pos[b] < 0 || a->pos[b] + a->q_len > a->max_len) return KR_CPU_BAD_ARGUMENT;
  for (int64_t r = 0; state && a->sample_u_next != nullptr && a->sample_q_ids != nullptr && r < a->sample_q_rows; ++r)
    if (a->sample_q_ids[r] < 0 || a->sample_q_ids[r] >= a->head_rows) return KR_CPU_BAD_ARGUMENT;
  kr_cpu_decoder_args s = stack_args(*a);
  s.cos = a->rope_cos, s.sin = a->rope_sin, s.positions = a->pos, s.hidden = a->pos, s.workspace = a->workspace;
  return kr_cpu_decoder_check(isa, &s);
}

extern "C" int kr_cpu_target_pass_check(int isa, const kr_cpu_target_pass_args* a) {
  return check_pass(isa, a, true);
}

extern "C" int kr_cpu_target_pass(int isa, const kr_cpu_target_pass_args* a) {
  const int rc = check_pass(isa, a, false);
  if (rc != KR_CPU_OK) return rc;
  if (a->batch == 0) return KR_CPU_OK;
  return a->dtype == KR_CPU_FLOAT32 ? run_pass<float>(isa, *a) : run_pass<uint16_t>(isa, *a);
}
