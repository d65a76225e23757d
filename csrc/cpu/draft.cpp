// Kangaroo's draft chain in one call, on one set of threads: greedy drafts, or sampled ones (sampling.cpp's kernels
// on each step's head logits, with uniforms drawn before the call). See kr_cpu.h for the contract.
//
// Drafting a round step by step from Python costs ~0.5 ms beyond the kernels' work (SmolLM2, bf16: per step an
// embedding, a RoPE table, two extension calls, the head, the choice and a dozen small tensor ops; ~0.14 of a plain
// step per round). Here the round's steps run on the decoder stack's machinery (kr_cpu_stack.h): the threads start
// once, and the small serial parts (positions and RoPE rows, the embedding, the bookkeeping of the chain) are
// one-chunk phases between the stacks' phases.
#include "kr_cpu_stack.h"

namespace {

using namespace kr_cpu;

// The phases a draft step takes beyond its layers: the shallow step's inputs, the exit state and the control, the
// adapter's inputs and its 5 phases, the head (2 for an int8 head), the choice, the bookkeeping (and begin_round,
// once).
constexpr int64_t kStepPhases = 12;

struct DraftLayout {
  int64_t sync, status, go, h, a_in, pos_s, pos_a, cos_s, sin_s, cos_a, sin_a, logits, yf, q8_u, q8_stats, idx, cf,
      shallow, adapter, total;
};

// The decoder-stack arguments of the shallow layers (q_len 1) and of the adapter (q_len 1, or 2 at step 0); the
// per-step fields (kv_len, hidden, positions, rope rows) are set by the chain.
kr_cpu_decoder_args stack_args(const kr_cpu_draft_args& a, bool adapter, int64_t q_len) {
  kr_cpu_decoder_args s{};
  s.dtype = a.dtype;
  s.batch = a.batch, s.q_len = q_len, s.hidden_size = a.hidden_size, s.n_heads = a.n_heads;
  s.n_kv_heads = a.n_kv_heads, s.head_dim = a.head_dim, s.intermediate = adapter ? 0 : a.intermediate;
  s.max_len = a.max_len, s.kv_len = a.base_len;
  s.eps = adapter ? a.adapter_eps : a.eps, s.scale = a.scale;
  s.n_layers = adapter ? 1 : a.exit_layer, s.layers = adapter ? a.adapter : a.layers, s.packed = a.packed;
  for (int d = 0; d < 3; ++d) s.cache_stride[d] = a.cache_stride[d];
  s.pos_stride[0] = q_len, s.pos_stride[1] = 1;
  s.threads = a.threads;
  return s;
}

DraftLayout draft_layout_of(const kr_cpu_draft_args& a) {
  const int64_t e = elt_size(a.dtype), B = a.batch, D = a.hidden_size, Dh = a.head_dim, N = a.head_rows;
  const int64_t phases = 1 + (a.gamma + 1) * (kPhasesPerLayer * a.exit_layer + kStepPhases);
  DraftLayout l{};
  Carve take;
  l.sync = take(phases * kCounterStride * 8);
  l.status = take(8);
  l.go = take(8);
  l.h = take(B * D * e);
  l.a_in = take(2 * B * D * e);
  l.pos_s = take(B * 8);
  l.pos_a = take(2 * B * 8);
  l.cos_s = take(B * Dh * e);
  l.sin_s = take(B * Dh * e);
  l.cos_a = take(2 * B * Dh * e);
  l.sin_a = take(2 * B * Dh * e);
  l.logits = take(B * N * e);
  l.yf = take(a.dtype == KR_CPU_FLOAT32 ? 0 : B * N * 4);
  l.q8_u = take(a.head_q8 == nullptr ? 0 : B * 2 * a.head_q8->kp);
  l.q8_stats = take(a.head_q8 == nullptr ? 0 : B * KR_CPU_SCREEN_STATS * 8);
  l.idx = take(B * 8);
  l.cf = take(B * 4);
  l.shallow = take(StackBuffers(sizes_of(stack_args(a, false, 1)), a.dtype).total);
  l.adapter = take(StackBuffers(sizes_of(stack_args(a, true, 2)), a.dtype).total);
  l.total = take.at;
  return l;
}

// A sampled draft of row b at step s from its head logits (N of them): q at sample_q[b, s], the draw with
// sample_u[b, s] into *index (a head row), the largest q into *conf.
template <typename T>
int sample_draft(int isa, const kr_cpu_draft_args& a, const T* logits, int64_t b, int64_t s, int64_t* index,
                 float* conf) {
  const int64_t N = a.head_rows;
  float* q = a.sample_q + (b * a.gamma + s) * N;
  int32_t left = 0;
  int rc = kr_cpu_process_logits_rows(isa, a.dtype, logits, N, N, a.sampling.divisor[b], a.sampling.top_k[b],
                                      a.sampling.top_p[b], q, N, &left, 0, 1);
  if (rc != KR_CPU_OK) return rc;
  if (left != 0) return KR_CPU_NOT_A_DISTRIBUTION;  // a NaN or infinite logit: no distribution to draw from
  rc = kr_cpu_sample_rows(isa, q, N, N, a.sample_u + b * a.gamma + s, index, 0, 1);
  if (rc != KR_CPU_OK || *index < 0) return rc != KR_CPU_OK ? rc : KR_CPU_NOT_A_DISTRIBUTION;
  float top = 0.0f;
  for (int64_t n = 0; n < N; ++n) top = q[n] > top ? q[n] : top;
  *conf = top;
  return KR_CPU_OK;
}

template <typename T>
int run_chain(int isa, const kr_cpu_draft_args& a) {
  const DraftLayout l = draft_layout_of(a);
  char* ws = static_cast<char*>(a.workspace);
  int64_t* status = reinterpret_cast<int64_t*>(ws + l.status);
  int64_t* go = reinterpret_cast<int64_t*>(ws + l.go);
  Phases ph(reinterpret_cast<int64_t*>(ws + l.sync), status, std::max<int64_t>(1, a.threads),
            phase_capacity(l.sync, l.status));
  const int64_t B = a.batch, D = a.hidden_size, Dh = a.head_dim, G = a.gamma, N = a.head_rows;
  T* h = reinterpret_cast<T*>(ws + l.h);
  T* a_in = reinterpret_cast<T*>(ws + l.a_in);
  int64_t* pos_s = reinterpret_cast<int64_t*>(ws + l.pos_s);
  int64_t* pos_a = reinterpret_cast<int64_t*>(ws + l.pos_a);
  T* cos_s = reinterpret_cast<T*>(ws + l.cos_s);
  T* sin_s = reinterpret_cast<T*>(ws + l.sin_s);
  T* cos_a = reinterpret_cast<T*>(ws + l.cos_a);
  T* sin_a = reinterpret_cast<T*>(ws + l.sin_a);
  T* logits = reinterpret_cast<T*>(ws + l.logits);
  float* yf = reinterpret_cast<float*>(ws + l.yf);
  int64_t* idx = reinterpret_cast<int64_t*>(ws + l.idx);
  float* cf = reinterpret_cast<float*>(ws + l.cf);
  T* exits = static_cast<T*>(a.exits);
  const size_t row_bytes = static_cast<size_t>(D) * sizeof(T);
  auto rope = [&](int64_t p, T* c, T* s) { rope_row(a.rope_cos, a.rope_sin, p, Dh, c, s); };  // (p checked)

  ph.each(1, [&](int64_t) {  // begin_round
    for (int64_t b = 0; b < B; ++b) {
      const int64_t left = std::min(G, std::max<int64_t>(0, a.max_new[b] - a.n_gen[b] - 1));
      a.cap[b] = a.finished[b] ? 0 : left;
      a.active[b] = a.cap[b] > 0;
      for (int64_t j = 0; j < G; ++j) a.drafts[b * G + j] = -1;
      a.n_drafts[b] = 0;
      a.x[b] = a.token[b];
    }
    return KR_CPU_OK;
  });
  kr_cpu_decoder_args shallow = stack_args(a, false, 1);
  shallow.hidden = h, shallow.positions = pos_s, shallow.cos = cos_s, shallow.sin = sin_s;
  for (int64_t step = 0;; ++step) {
    ph.each(1, [&](int64_t) {  // the shallow step's inputs: positions pos + step, their RoPE rows, the embedding of x
      int rc = KR_CPU_OK;
      for (int64_t b = 0; b < B; ++b) {
        pos_s[b] = a.pos[b] + step;
        rope(pos_s[b], cos_s + b * Dh, sin_s + b * Dh);
        if (embed_row(a.embed, a.vocab, a.x[b], D, h + b * D) != KR_CPU_OK) rc = KR_CPU_BAD_ARGUMENT;
      }
      return rc;
    });
    shallow.kv_len = a.base_len + step;
    {
      const phase_stats::PartScope part(phase_stats::kShallow);
      stack_body<T>(ph, isa, shallow, ws + l.shallow);
    }
    ph.each(1, [&](int64_t) {  // the exit state; keep_drafting; whether a draft step follows
      for (int64_t b = 0; b < B; ++b) std::memcpy(exits + (b * (G + 1) + step) * D, h + b * D, row_bytes);
      bool any = false;
      if (step < G) {
        for (int64_t b = 0; b < B; ++b) {
          if (step > 0) a.active[b] = a.active[b] && a.conf[b] >= a.eta && step < a.cap[b];
          any = any || a.active[b];
        }
      }
      if (!any) *a.steps = step;
      __atomic_store_n(go, static_cast<int64_t>(any), __ATOMIC_RELAXED);
      return KR_CPU_OK;
    });
    // The adapter: at step 0 over (e_prev at pos - 1, the exit state at pos), after that over the exit state in place.
    const int64_t Q = step == 0 ? 2 : 1;
    kr_cpu_decoder_args adapter = stack_args(a, true, Q);
    adapter.kv_len = a.base_len + step;
    auto adapter_step0 = [&]() {  // (e_prev, the exit state) -> the adapter's two positions
      ph.each(1, [&](int64_t) {
        for (int64_t b = 0; b < B; ++b) {
          std::memcpy(a_in + 2 * b * D, static_cast<const T*>(a.e_prev) + b * D, row_bytes);
          std::memcpy(a_in + (2 * b + 1) * D, h + b * D, row_bytes);
          pos_a[2 * b] = a.pos[b] - 1, pos_a[2 * b + 1] = a.pos[b];
          rope(pos_a[2 * b], cos_a + 2 * b * Dh, sin_a + 2 * b * Dh);
          rope(pos_a[2 * b + 1], cos_a + (2 * b + 1) * Dh, sin_a + (2 * b + 1) * Dh);
        }
        return KR_CPU_OK;
      });
      adapter.hidden = a_in, adapter.positions = pos_a, adapter.cos = cos_a, adapter.sin = sin_a;
      const phase_stats::PartScope part(phase_stats::kAdapter);
      stack_body<T>(ph, isa, adapter, ws + l.adapter);
    };
    // Every thread reads the flag after the phase's end (which publishes it); a thread that ran ahead alone can only
    // set it again at the next step's control, and only to stop a chain that this thread would then leave early.
    if (!__atomic_load_n(go, __ATOMIC_RELAXED)) {
      if (G == 0) adapter_step0();  // a round without drafts: the adapter's cache still takes the new exit state
      break;
    }
    if (Q == 2) {
      adapter_step0();
    } else {
      adapter.hidden = h, adapter.positions = pos_s, adapter.cos = cos_s, adapter.sin = sin_s;
      const phase_stats::PartScope part(phase_stats::kAdapter);
      stack_body<T>(ph, isa, adapter, ws + l.adapter);
    }
    // The head over each row's last position, then the greedy choice and its confidence per row.
    const T* last = static_cast<const T*>(adapter.hidden) + (Q - 1) * D;
    phase_stats::name(phase_stats::kDraftHead);  // the head and the choice
    if (a.head_q8 == nullptr) {
      linear_phase<T>(ph, isa, last, B, D, Q * D, a.head, N, nullptr, logits, N, false, yf, a.packed != 0);
    } else {  // the int8 form's estimates, rounded to the dtype (fp32: straight into the logits)
      const kr_cpu_head_screen* sc = a.head_q8;
      uint8_t* u = reinterpret_cast<uint8_t*>(ws + l.q8_u);
      double* stats = reinterpret_cast<double*>(ws + l.q8_stats);
      float* est = sizeof(T) == 4 ? reinterpret_cast<float*>(logits) : yf;
      screen_phases(ph, a.dtype, last, Q * D, B, D, sc, N, u, stats, nullptr, [&](int64_t n0, int64_t n1) {
        int rc = kr_cpu_screen_estimate_rows(isa, u, stats, B, D, sc, est, N, n0, n1);
        for (int64_t m = 0; sizeof(T) == 2 && rc == KR_CPU_OK && m < B; ++m)
          rc = kr_cpu_round_bf16(isa, yf + m * N + n0, reinterpret_cast<uint16_t*>(logits + m * N) + n0, n1 - n0);
        return rc;
      });
    }
    ph.each(B, [&](int64_t b) {
      if (a.sample_q != nullptr && a.sampling.divisor[b] > 0.0f)
        return sample_draft(isa, a, logits + b * N, b, step, idx + b, cf + b);
      if (a.sample_q != nullptr) std::fill_n(a.sample_q + (b * G + step) * N, N, 0.0f);  // a greedy row: no q
      return kr_cpu_argmax_rows(isa, a.dtype, logits, N, N, idx, cf, b, b + 1);
    });
    phase_stats::name(phase_stats::kOther);
    ph.each(1, [&](int64_t) {  // the draft appended where the row drafts; x, conf for the next step
      for (int64_t b = 0; b < B; ++b) {
        const int64_t token = a.head_ids != nullptr ? a.head_ids[idx[b]] : idx[b];
        a.drafts[b * G + step] = a.active[b] ? token : -1;
        a.n_drafts[b] += a.active[b] ? 1 : 0;
        a.conf[b] = cf[b];
        a.x[b] = token;
      }
      return KR_CPU_OK;
    });
  }
  return static_cast<int>(__atomic_load_n(status, __ATOMIC_RELAXED));
}

}  // namespace

extern "C" int64_t kr_cpu_draft_workspace_bytes(const kr_cpu_draft_args* a, int64_t* zeroed_bytes) {
  if (a == nullptr || a->batch < 0 || a->hidden_size <= 0 || a->n_heads <= 0 || a->n_kv_heads <= 0 ||
      a->head_dim <= 0 || a->intermediate < 0 || a->gamma < 0 || a->exit_layer < 1 || a->head_rows <= 0 ||
      a->head_rows >= (int64_t{1} << 31) || (a->dtype != KR_CPU_FLOAT32 && a->dtype != KR_CPU_BFLOAT16))
    return -1;
  const DraftLayout l = draft_layout_of(*a);
  if (zeroed_bytes != nullptr) *zeroed_bytes = l.h;
  return l.total;
}

// The checks of kr_cpu_draft_check; with state, also the values it reads (positions, head ids), which only the
// one check before the threads start needs to read.
static int check_chain(int isa, const kr_cpu_draft_args* a, bool state) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (kr_cpu_draft_workspace_bytes(a, nullptr) < 0 || a->threads < 1 || a->vocab <= 0 || a->max_len < 1 ||
      a->base_len < 1 || a->base_len + a->gamma > a->max_len)
    return KR_CPU_BAD_ARGUMENT;
  if (a->batch == 0) return KR_CPU_OK;
  if (a->embed == nullptr || a->head == nullptr || a->rope_cos == nullptr || a->rope_sin == nullptr ||
      a->pos == nullptr || a->token == nullptr || a->n_gen == nullptr || a->max_new == nullptr ||
      a->finished == nullptr || a->e_prev == nullptr || a->cap == nullptr || a->active == nullptr ||
      a->conf == nullptr || a->x == nullptr || (a->drafts == nullptr && a->gamma > 0) || a->n_drafts == nullptr ||
      a->exits == nullptr ||
      a->steps == nullptr || a->workspace == nullptr || reinterpret_cast<uintptr_t>(a->workspace) % 64 != 0 ||
      (a->sample_q != nullptr &&
       (a->sample_u == nullptr || kr_cpu_row_sampling_check(&a->sampling, a->batch) != KR_CPU_OK)))
    return KR_CPU_BAD_ARGUMENT;
  for (int64_t b = 0; state && b < a->batch; ++b)
    if (a->pos[b] < 1 || a->pos[b] + a->gamma >= a->max_len) return KR_CPU_BAD_ARGUMENT;
  for (int64_t n = 0; state && a->head_ids != nullptr && n < a->head_rows; ++n)
    if (a->head_ids[n] < 0 || a->head_ids[n] >= a->vocab) return KR_CPU_BAD_ARGUMENT;
  if (a->adapter == nullptr || a->adapter->gate_up != nullptr || a->adapter->down != nullptr)
    return KR_CPU_BAD_ARGUMENT;
  if (!screen_serves(a->head_q8, a->hidden_size, false)) return KR_CPU_BAD_ARGUMENT;
  for (int adapter = 0; adapter < 2; ++adapter) {  // each stack as the decoder stack checks it
    kr_cpu_decoder_args s = stack_args(*a, adapter == 1, 1 + adapter);
    s.cos = a->rope_cos, s.sin = a->rope_sin, s.positions = a->pos, s.hidden = a->exits, s.workspace = a->workspace;
    const int rc = kr_cpu_decoder_check(isa, &s);
    if (rc != KR_CPU_OK) return rc;
  }
  return KR_CPU_OK;
}

extern "C" int kr_cpu_draft_check(int isa, const kr_cpu_draft_args* a) { return check_chain(isa, a, true); }

extern "C" int kr_cpu_draft_chain(int isa, const kr_cpu_draft_args* a) {
  const int rc = check_chain(isa, a, false);
  if (rc != KR_CPU_OK) return rc;
  if (a->batch == 0) {
    *a->steps = 0;
    return KR_CPU_OK;
  }
  return a->dtype == KR_CPU_FLOAT32 ? run_chain<float>(isa, *a) : run_chain<uint16_t>(isa, *a);
}
