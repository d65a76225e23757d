// The machinery of csrc/cpu/decoder.cpp's one-call layer stack, shared with draft.cpp (internal: not part of the
// C ABI of kr_cpu.h). The threads start once and meet between ops at counters: each op's work is cut into chunks
// (output-row blocks of a linear, rows of a norm, batch rows of RoPE, tiles of attention) that the threads claim
// one at a time (Phases), and a thread moves on to the next op when the last chunk of this one is done. A chunk runs
// the per-op kernel on its slice, and those kernels give each output element the same bits whatever the slice.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <vector>

#include "kr_cpu.h"
#include "kr_cpu_common.h"

#if KR_CPU_X86
#include <immintrin.h>
#endif
#include <sched.h>

namespace kr_cpu {


// Phases of a layer: q/k/v (its input norm run by every thread first), RoPE, attention, o (+ the residual), gate/up
// with silu (its norm first), down (+ the residual); a gate/up that cannot take silu along (gate_up_fusable) adds
// silu's, an attention-only layer has the post-attention norm's instead of the last two.
constexpr int64_t kPhasesPerLayer = 7;
constexpr int64_t kCounterStride = 16;  // int64s per phase: "next" and "done" on separate 64-byte lines
constexpr int64_t kMinChunkWeightBytes = 32 * 1024;
// A linear's claims take 1 / (kGuide * threads) of the rows left (see Phases::run). Measured on SmolLM2 (2 threads):
// 1 streams the layers at 59-66 GB/s, 2 at 52-56, 4 at 47; fixed chunks of 1/4 to 1/16 of a matrix, 52-55.
constexpr int64_t kGuide = 1;
constexpr int64_t kSiluChunk = 512;      // elements of a row per silu chunk

inline int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

inline int64_t elt_size(int dtype) { return dtype == KR_CPU_FLOAT32 ? 4 : 2; }

// Whether a head's int8 form can serve rows of K: its rows, scales and sums (with bounds: err and wnorm too), its
// row stride kp a multiple of 64 in [K, 32768] (the int32 dots). NULL serves (nothing is read).
inline bool screen_serves(const kr_cpu_head_screen* sc, int64_t K, bool bounds) {
  return sc == nullptr || (sc->q != nullptr && sc->scale != nullptr && sc->qsum != nullptr &&
                           (!bounds || (sc->err != nullptr && sc->wnorm != nullptr)) && sc->kp >= K &&
                           sc->kp % 64 == 0 && sc->kp <= 32768);
}

struct Sizes {
  int64_t M, D, Nqkv, QW, I, Ymax;  // rows, hidden, fused q/k/v rows, q width (Hq * Dh), intermediate, widest y
};

inline Sizes sizes_of(const kr_cpu_decoder_args& a) {
  Sizes s{};
  s.M = a.batch * a.q_len;
  s.D = a.hidden_size;
  s.QW = a.n_heads * a.head_dim;
  s.Nqkv = s.QW + 2 * a.n_kv_heads * a.head_dim;
  s.I = a.intermediate;
  s.Ymax = std::max({s.Nqkv, s.D, 2 * s.I});
  return s;
}

// Consecutive 64-byte aligned parts of a workspace: take(bytes) returns the next part's offset; at is the size so far.
struct Carve {
  int64_t at = 0;
  int64_t operator()(int64_t bytes) {
    const int64_t here = at;
    at += align64(bytes);
    return here;
  }
};

// The scratch rows of a stack's ops, carved out of a workspace: their bytes and offsets.
struct StackBuffers {
  int64_t xn, qkv, q_rot, attn, o, gu, act, yf, total;  // byte offsets from the start of the buffers

  StackBuffers(const Sizes& s, int dtype) {
    const int64_t e = elt_size(dtype);
    Carve take;
    xn = take(s.M * s.D * e);
    qkv = take(s.M * s.Nqkv * e);
    q_rot = take(s.M * s.QW * e);
    attn = take(s.M * s.QW * e);
    o = take(s.M * s.D * e);
    gu = take(s.M * 2 * s.I * e);
    act = take(s.M * s.I * e);
    yf = take(s.M * s.Ymax * 4);
    total = take.at;
  }
};

// The phase time accounting (kr_cpu_phase_stats_*, phase_stats.cpp). A thread's phases count under the kind its
// code last named: stack_body names each op (with the part the caller set and its row count), the regions name
// their heads and screens, and anything else is kOther (each Phases starts there).
namespace phase_stats {

enum Part : int { kLayers = 0, kShallow = 1, kAdapter = 2 };
enum Op : int { kInputNorm, kQkv, kRope, kAttention, kO, kPostNorm, kGateUp, kSilu, kDown };
constexpr int kExtra = 6 * KR_CPU_PHASE_OPS;
enum Extra : int { kHead = kExtra, kDraftHead, kScreen, kOther, kKinds };
static_assert(kKinds == KR_CPU_PHASE_KINDS, "kr_cpu.h's count of phase kinds");

extern std::atomic<int> g_on;
inline thread_local int t_part = kLayers;
inline thread_local int t_kind = kOther;

inline bool on() { return g_on.load(std::memory_order_relaxed) != 0; }
inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline void name_op(Op op, int64_t rows) { t_kind = (t_part * 2 + (rows > 1 ? 1 : 0)) * KR_CPU_PHASE_OPS + op; }
inline void name(int kind) { t_kind = kind; }
void record(int kind, int64_t body_ns, int64_t wait_ns);

// The part of the model a stack_body call runs (the shallow layers and the adapter of the draft chain), for its
// scope.
class PartScope {
 public:
  explicit PartScope(Part part) { t_part = part; }
  ~PartScope() { t_part = kLayers, t_kind = kOther; }
  PartScope(const PartScope&) = delete;
  PartScope& operator=(const PartScope&) = delete;
};

}  // namespace phase_stats

KR_INLINE void spin_pause() {
#if KR_CPU_X86
  _mm_pause();
#endif
}

// The ops of the stack in order, each a set of items (row blocks, rows, tokens, heads) claimed in chunks through
// its own pair of counters: "next" (the first unclaimed item) and "done" (items finished).
class Phases {
 public:
  // counters: capacity pairs of counters (a phase each, kCounterStride int64s apart), zeroed by the caller.
  Phases(int64_t* counters, int64_t* status, int64_t threads, int64_t capacity)
      : counters_(counters), status_(status), threads_(threads), capacity_(capacity) {
    phase_stats::t_part = phase_stats::kLayers, phase_stats::t_kind = phase_stats::kOther;
  }

  // body(begin, end) over chunks of items: each claim takes max(min_claim, remaining / (guide * threads)) items
  // (guided self-scheduling: large chunks first, which stream well, small ones last, which keep the threads
  // finishing together), or one item with guide = 0.
  template <typename Body>
  void run(int64_t n_items, int64_t min_claim, int64_t guide, Body&& body) {
    run(n_items, min_claim, guide, [] { return static_cast<int>(KR_CPU_OK); }, body);
  }

  // The same, with prologue() run by every thread before it claims its first chunk (each thread's own inputs of the
  // chunks, such as a norm of the rows that every chunk reads: computed where they are read instead of in a phase
  // of their own and a meeting of the threads); its time counts as body.
  template <typename Prologue, typename Body>
  void run(int64_t n_items, int64_t min_claim, int64_t guide, Prologue&& prologue, Body&& body) {
    if (index_ >= capacity_) {  // a region that runs more phases than its workspace counts: fail, never overrun
      ++index_;                 // (every thread runs the same phases, so every thread skips this one)
      __atomic_store_n(status_, static_cast<int64_t>(KR_CPU_FAILED), __ATOMIC_RELAXED);
      return;
    }
    int64_t* next = counters_ + index_ * kCounterStride;
    int64_t* done = next + kCounterStride / 2;
    ++index_;
    const bool timed = phase_stats::on();
    const int64_t t_start = timed ? phase_stats::now_ns() : 0;
    int64_t body_ns = 0;
    if (n_items > 0) {
      int rc;
      try {
        rc = prologue();
      } catch (...) {
        rc = KR_CPU_FAILED;
      }
      if (rc != KR_CPU_OK) __atomic_store_n(status_, static_cast<int64_t>(rc), __ATOMIC_RELAXED);
      if (timed) body_ns += phase_stats::now_ns() - t_start;
    }
    for (;;) {
      int64_t begin = __atomic_load_n(next, __ATOMIC_RELAXED), end = begin;  // (set before use; GCC cannot tell)
      do {
        if (begin >= n_items) break;
        const int64_t take = guide > 0 ? std::max(min_claim, (n_items - begin) / (guide * threads_)) : 1;
        end = std::min(n_items, begin + take);
      } while (!__atomic_compare_exchange_n(next, &begin, end, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
      if (begin >= n_items) break;
      int rc;
      const int64_t t_body = timed ? phase_stats::now_ns() : 0;
      try {
        rc = body(begin, end);
      } catch (...) {  // (a kernel's scratch allocation): the chunk still counts as done, or the others would wait
        rc = KR_CPU_FAILED;
      }
      if (timed) body_ns += phase_stats::now_ns() - t_body;
      if (rc != KR_CPU_OK) __atomic_store_n(status_, static_cast<int64_t>(rc), __ATOMIC_RELAXED);
      __atomic_fetch_add(done, end - begin, __ATOMIC_RELEASE);  // publishes this chunk's writes
    }
    for (int spins = 0; __atomic_load_n(done, __ATOMIC_ACQUIRE) < n_items; ++spins) {
      if (spins < 2000)
        spin_pause();
      else
        sched_yield();  // the thread with the last chunk may have lost its core
    }
    if (timed) phase_stats::record(phase_stats::t_kind, body_ns, phase_stats::now_ns() - t_start - body_ns);
  }

  // One item per claim.
  template <typename Body>
  void each(int64_t n_items, Body&& body) {
    run(n_items, 1, 0, [&](int64_t begin, int64_t) { return body(begin); });
  }

 private:
  int64_t* counters_;
  int64_t* status_;
  int64_t threads_;
  int64_t capacity_;
  int64_t index_ = 0;
};

// The phases a workspace's counters hold: the bytes from its first counter (sync) to its status word.
inline int64_t phase_capacity(int64_t sync, int64_t status) { return (status - sync) / (kCounterStride * 8); }

// A step's inputs that a region gathers itself: the RoPE tables' row of position p ((T, Dh) each, p checked by the
// caller) into c and s, and a token's embedding row ((vocab, D)) into h (KR_CPU_BAD_ARGUMENT, nothing written, for
// a token outside [0, vocab)).
template <typename T>
void rope_row(const void* cos_table, const void* sin_table, int64_t p, int64_t Dh, T* c, T* s) {
  std::memcpy(c, static_cast<const T*>(cos_table) + p * Dh, static_cast<size_t>(Dh) * sizeof(T));
  std::memcpy(s, static_cast<const T*>(sin_table) + p * Dh, static_cast<size_t>(Dh) * sizeof(T));
}

template <typename T>
int embed_row(const void* embed, int64_t vocab, int64_t token, int64_t D, T* h) {
  if (token < 0 || token >= vocab) return KR_CPU_BAD_ARGUMENT;
  std::memcpy(h, static_cast<const T*>(embed) + token * D, static_cast<size_t>(D) * sizeof(T));
  return KR_CPU_OK;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The two phases of a pass over a head's int8 form (head_screen.cpp): each of x's M rows (K values, row stride ldx)
// prepared into u and stats (and its running floor, where floors is not NULL, set to -inf), then the head's V rows
// claimed in blocks of 64 (at least kMinChunkWeightBytes of int8 rows a claim), rows(v0, v1) running the screen's
// kernel over rows [v0, v1).
template <typename Rows>
void screen_phases(Phases& ph, int dtype, const void* x, int64_t ldx, int64_t M, int64_t K,
                   const kr_cpu_head_screen* sc, int64_t V, uint8_t* u, double* stats, float* floors, Rows&& rows) {
  ph.each(M, [&](int64_t m) {
    if (floors != nullptr) floors[m] = -__builtin_inff();
    return kr_cpu_screen_prepare_rows(dtype, x, ldx, K, sc->kp, u, stats, m, m + 1);
  });
  const int64_t min_rows = std::max<int64_t>(64, kMinChunkWeightBytes / sc->kp);
  ph.run(ceil_div(V, 64), ceil_div(min_rows, 64), kGuide,
         [&](int64_t b0, int64_t b1) { return rows(b0 * 64, std::min(V, b1 * 64)); });
}

// The kernel call of y = x W^T (+ bias) over output rows [n0, n1) into y (M, *) fp32 of row stride ldy (fp32: the
// destination itself). packed (bf16): w is in kr_cpu_linear_rows_bf16_packed's layout. x: (M, K) of row stride ldx.
template <typename T>
int linear_rows(int isa, const T* x, int64_t M, int64_t K, int64_t ldx, const void* w, int64_t N, const float* bias,
                float* y, int64_t ldy, int64_t n0, int64_t n1, bool packed) {
  if constexpr (sizeof(T) == 4)
    return kr_cpu_linear_rows_isa(isa, reinterpret_cast<const float*>(x), M, K, ldx, w, KR_CPU_FLOAT32, N, bias, y,
                                  ldy, n0, n1);
  else if (packed)
    return kr_cpu_linear_rows_bf16_packed(isa, reinterpret_cast<const uint16_t*>(x), M, K, ldx,
                                          static_cast<const uint16_t*>(w), N, bias, y, ldy, n0, n1);
  else
    return kr_cpu_linear_rows_bf16(isa, reinterpret_cast<const uint16_t*>(x), M, K, ldx,
                                   static_cast<const uint16_t*>(w), N, bias, y, ldy, n0, n1);
}

// Columns [n0, n1) of the fp32 rows y (M, *) of row stride ldy stored to dst (M, *) of row stride ld_dst in T: each
// rounded to T, or with add, dst += y (y rounded to T, the sum rounded to T, as torch's h + linear(x)).
template <typename T>
int store_rows(int isa, const float* y, int64_t ldy, int64_t M, T* dst, int64_t ld_dst, bool add, int64_t n0,
               int64_t n1) {
  if constexpr (sizeof(T) == 2) {
    if (!add) {
      for (int64_t m = 0; m < M; ++m) {
        const int rr = kr_cpu_round_bf16(isa, y + m * ldy + n0, reinterpret_cast<uint16_t*>(dst + m * ld_dst) + n0,
                                         n1 - n0);
        if (rr != KR_CPU_OK) return rr;
      }
      return KR_CPU_OK;
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    T* d = dst + m * ld_dst;
    const float* ym = y + m * ldy;
    for (int64_t n = n0; n < n1; ++n)
      d[n] = add ? kr_cpu::from_float<T>(kr_cpu::to_float(d[n]) + kr_cpu::round_to<T>(ym[n]))
                 : kr_cpu::from_float<T>(ym[n]);
  }
  return KR_CPU_OK;
}

// The smallest claim of a linear's phase, in items of item_bytes of weights each.
inline int64_t min_claim_of(int64_t item_bytes) {
  return ceil_div(kMinChunkWeightBytes, std::max<int64_t>(1, item_bytes));
}

// y = x W^T (+ bias) over output rows claimed in chunks of whole row blocks, stored to dst (M, N) of row stride
// ld_dst in T; with add, dst += y (each rounded to T, as torch's h + linear(x)). packed (bf16): w is in
// kr_cpu_linear_rows_bf16_packed's layout. prologue: Phases::run's (each thread's x, before its first chunk).
// x: (M, K) of row stride ldx.
template <typename T, typename Prologue>
void linear_phase(Phases& ph, int isa, const T* x, int64_t M, int64_t K, int64_t ldx, const void* w, int64_t N,
                  const float* bias, T* dst, int64_t ld_dst, bool add, float* yf, bool packed, Prologue&& prologue) {
  const int64_t n_blocks = ceil_div(N, KR_CPU_ROW_BLOCK);
  constexpr bool kFloat = sizeof(T) == 4;
  const bool direct = kFloat && !add;
  ph.run(n_blocks, min_claim_of(KR_CPU_ROW_BLOCK * K * static_cast<int64_t>(sizeof(T))), kGuide, prologue,
         [&](int64_t b0, int64_t b1) -> int {
           const int64_t n0 = b0 * KR_CPU_ROW_BLOCK, n1 = std::min(N, b1 * KR_CPU_ROW_BLOCK);
           float* y = direct ? reinterpret_cast<float*>(dst) : yf;
           const int64_t ldy = direct ? ld_dst : N;
           const int rc = linear_rows<T>(isa, x, M, K, ldx, w, N, bias, y, ldy, n0, n1, packed);
           if (rc != KR_CPU_OK || direct) return rc;
           return store_rows<T>(isa, y, ldy, M, dst, ld_dst, add, n0, n1);
         });
}

template <typename T>
void linear_phase(Phases& ph, int isa, const T* x, int64_t M, int64_t K, int64_t ldx, const void* w, int64_t N,
                  const float* bias, T* dst, int64_t ld_dst, bool add, float* yf, bool packed = false) {
  linear_phase<T>(ph, isa, x, M, K, ldx, w, N, bias, dst, ld_dst, add, yf, packed,
                  [] { return static_cast<int>(KR_CPU_OK); });
}

// act = silu(gate) * up with [gate | up] = x W^T for the fused gate/up weight W (2I, K), in one phase: a chunk takes
// the same row blocks of both halves (whole panels of the packed layout: I a multiple of KR_CPU_ROW_BLOCK, which
// gate_up_fusable says), rounds them to T in gu (M, 2I) as the unfused linear does and multiplies them in place
// (kr_cpu_silu_mul_rows), so that act (M, I) has the bits of the two phases without the meeting between them or a
// round trip of gate and up through the other core's cache.
inline bool gate_up_fusable(int64_t I) { return I % KR_CPU_ROW_BLOCK == 0 && I % KR_CPU_PACK_ROWS == 0; }

template <typename T, typename Prologue>
void gate_up_silu_phase(Phases& ph, int isa, int dtype, const T* x, int64_t M, int64_t K, const void* w, int64_t I,
                        T* gu, T* act, float* yf, bool packed, Prologue&& prologue) {
  constexpr bool kFloat = sizeof(T) == 4;
  const int64_t N = 2 * I;
  const int64_t item_bytes = 2 * KR_CPU_ROW_BLOCK * K * static_cast<int64_t>(sizeof(T));
  ph.run(I / KR_CPU_ROW_BLOCK, min_claim_of(item_bytes), kGuide, prologue, [&](int64_t b0, int64_t b1) -> int {
    const int64_t n0 = b0 * KR_CPU_ROW_BLOCK, n1 = b1 * KR_CPU_ROW_BLOCK;
    float* y = kFloat ? reinterpret_cast<float*>(gu) : yf;
    for (const int64_t at : {int64_t{0}, I}) {  // the gate's rows, then the up's
      int rc = linear_rows<T>(isa, x, M, K, K, w, N, nullptr, y, N, at + n0, at + n1, packed);
      if (rc == KR_CPU_OK && !kFloat) rc = store_rows<T>(isa, y, N, M, gu, N, false, at + n0, at + n1);
      if (rc != KR_CPU_OK) return rc;
    }
    return kr_cpu_silu_mul_rows(isa, dtype, gu + n0, N, gu + I + n0, N, n1 - n0, act + n0, I, 0, M);
  });
}

// The layers of a (over a.hidden, in place) on the threads that share ph, with scratch rows at buffers (laid out as
// StackBuffers(sizes_of(a), a.dtype) says). Every thread calls it with the same arguments.
template <typename T>
void stack_body(Phases& ph, int isa, const kr_cpu_decoder_args& a, char* buffers) {
  const Sizes s = sizes_of(a);
  const StackBuffers l(s, a.dtype);
  char* ws = buffers;
  T* h = static_cast<T*>(a.hidden);
  T* xn = reinterpret_cast<T*>(ws + l.xn);
  T* qkv = reinterpret_cast<T*>(ws + l.qkv);
  T* q_rot = reinterpret_cast<T*>(ws + l.q_rot);
  T* attn = reinterpret_cast<T*>(ws + l.attn);
  T* o = reinterpret_cast<T*>(ws + l.o);
  T* gu = reinterpret_cast<T*>(ws + l.gu);
  T* act = reinterpret_cast<T*>(ws + l.act);
  float* yf = reinterpret_cast<float*>(ws + l.yf);
  const int64_t B = a.batch, Q = a.q_len, Dh = a.head_dim, Hq = a.n_heads, Hkv = a.n_kv_heads;
  const int64_t norm_rows = std::max<int64_t>(1, 4096 / s.D);
  const int64_t silu_per_row = ceil_div(s.I, kSiluChunk);
  namespace ps = phase_stats;
  // Each thread's own normed rows (M, D): the norm before a linear runs on every thread, over every row, in the
  // linear's phase (the same bits: a row's norm does not depend on the rows beside it), which saves a phase.
  // (Without its buffer a thread's chunks get a null x, which the kernels refuse: the call fails, and every thread
  // still runs every phase.)
  static thread_local std::vector<T> xn_rows;
  T* xn_t = nullptr;
  try {
    if (static_cast<int64_t>(xn_rows.size()) < s.M * s.D) xn_rows.resize(static_cast<size_t>(s.M * s.D));
    xn_t = xn_rows.data();
  } catch (...) {
  }
  const auto norm_all = [&](const void* weight) -> int {
    if (xn_t == nullptr && s.M > 0) return KR_CPU_FAILED;
    return kr_cpu_rms_norm_rows(isa, a.dtype, h, s.D, nullptr, 0, weight, s.D, a.eps, xn_t, nullptr, 0, s.M);
  };

  for (int64_t li = 0; li < a.n_layers; ++li) {
    const kr_cpu_decoder_layer& L = a.layers[li];
    ps::name_op(ps::kQkv, s.M);  // each thread's xn_t = input_norm(h), then the q/k/v rows it claims
    linear_phase<T>(ph, isa, xn_t, s.M, s.D, s.D, L.qkv, s.Nqkv, L.qkv_bias, qkv, s.Nqkv, false, yf, a.packed != 0,
                    [&] { return norm_all(L.input_norm); });

    kr_cpu_rope_args r{};  // q, k, v: column slices of qkv (B*Q, Nqkv) seen as (B, H, Q, Dh)
    r.dtype = a.dtype;
    r.batch = B, r.n_heads = Hq, r.n_kv_heads = Hkv, r.q_len = Q, r.head_dim = Dh, r.max_len = a.max_len;
    r.q = qkv, r.k = qkv + s.QW, r.v = qkv + s.QW + Hkv * Dh;
    const int64_t head_strides[3] = {Q * s.Nqkv, Dh, s.Nqkv};
    for (int d = 0; d < 3; ++d) {
      r.q_stride[d] = r.k_stride[d] = r.v_stride[d] = head_strides[d];
      r.cache_stride[d] = a.cache_stride[d];
    }
    r.cos = a.cos, r.sin = a.sin, r.positions = a.positions;
    r.pos_stride[0] = a.pos_stride[0], r.pos_stride[1] = a.pos_stride[1];
    r.k_cache = L.k_cache, r.v_cache = L.v_cache, r.q_out = q_rot, r.cache_rows = a.cache_rows;
    // A row's tokens in one chunk, in order: two tokens at one position write one slot, and the last one must win.
    // (Batch rows that share a cache row, cache_rows, hold distinct positions.)
    ps::name_op(ps::kRope, s.M);
    ph.each(B, [&](int64_t b) { return kr_cpu_rope_cache_append(isa, &r, b * Q, (b + 1) * Q); });

    kr_cpu_attention_args t{};  // q_rot (B, Hq, Q, Dh) contiguous -> attn laid out (B, Q, Hq, Dh): o's input rows
    t.dtype = a.dtype;
    t.batch = B, t.n_heads = Hq, t.n_kv_heads = Hkv, t.q_len = Q, t.head_dim = Dh, t.kv_len = a.kv_len;
    t.scale = a.scale;
    t.q = q_rot, t.q_stride[0] = Hq * Q * Dh, t.q_stride[1] = Q * Dh, t.q_stride[2] = Dh;
    t.k_cache = L.k_cache, t.v_cache = L.v_cache, t.cache_rows = a.cache_rows;
    for (int d = 0; d < 3; ++d) t.cache_stride[d] = a.cache_stride[d];
    t.positions = a.positions, t.pos_stride[0] = a.pos_stride[0], t.pos_stride[1] = a.pos_stride[1];
    t.out = attn, t.out_stride[0] = Q * s.QW, t.out_stride[1] = Dh, t.out_stride[2] = s.QW;
    ps::name_op(ps::kAttention, s.M);
    ph.each(kr_cpu_attention_tasks(&t), [&](int64_t c) { return kr_cpu_attention(isa, &t, c, c + 1); });

    ps::name_op(ps::kO, s.M);
    if (L.gate_up == nullptr) {  // attention-only: xn = o + h, h = post_norm(xn) (a row's sum stored before its norm)
      linear_phase<T>(ph, isa, attn, s.M, s.QW, s.QW, L.o, s.D, L.o_bias, o, s.D, false, yf, a.packed != 0);
      ps::name_op(ps::kPostNorm, s.M);
      ph.each(ceil_div(s.M, norm_rows), [&](int64_t c) {
        return kr_cpu_rms_norm_rows(isa, a.dtype, o, s.D, h, s.D, L.post_norm, s.D, a.eps, h, xn, c * norm_rows,
                                    std::min(s.M, (c + 1) * norm_rows));
      });
      continue;
    }
    // h += o(attn): the residual add of torch's h + o, rounded as it rounds (o to T, then the sum)
    linear_phase<T>(ph, isa, attn, s.M, s.QW, s.QW, L.o, s.D, L.o_bias, h, s.D, true, yf, a.packed != 0);
    ps::name_op(ps::kGateUp, s.M);  // each thread's xn_t = post_norm(h), then gate/up rows it claims (and silu)
    if (gate_up_fusable(s.I)) {
      gate_up_silu_phase<T>(ph, isa, a.dtype, xn_t, s.M, s.D, L.gate_up, s.I, gu, act, yf, a.packed != 0,
                            [&] { return norm_all(L.post_norm); });
    } else {
      linear_phase<T>(ph, isa, xn_t, s.M, s.D, s.D, L.gate_up, 2 * s.I, nullptr, gu, 2 * s.I, false, yf,
                      a.packed != 0, [&] { return norm_all(L.post_norm); });
      ps::name_op(ps::kSilu, s.M);
      ph.each(s.M * silu_per_row, [&](int64_t c) {  // act = silu(gate) * up, a column slice of one row
        const int64_t m = c / silu_per_row, j0 = (c % silu_per_row) * kSiluChunk;
        const int64_t n = std::min(kSiluChunk, s.I - j0);
        const T* g = gu + m * 2 * s.I + j0;
        return kr_cpu_silu_mul_rows(isa, a.dtype, g, 2 * s.I, g + s.I, 2 * s.I, n, act + m * s.I + j0, s.I, 0, 1);
      });
    }
    ps::name_op(ps::kDown, s.M);
    linear_phase<T>(ph, isa, act, s.M, s.I, s.I, L.down, s.D, nullptr, h, s.D, true, yf, a.packed != 0);  // h += down(act)
  }
  ps::name(ps::kOther);
}

}  // namespace kr_cpu
