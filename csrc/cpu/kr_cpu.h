// CPU kernels of kangaroo_rt: plain C signatures (raw pointers, strides in elements), no ATen, no pybind11,
// so that csrc/cpu/*.cpp compile in seconds; csrc/cpu_bindings*.cpp wrap them for torch as kangaroo_rt._cpu.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Weight element types (the codes of kr_dtype in csrc/kangaroo_rt.h). bf16 is passed as its uint16 bits.
enum kr_cpu_dtype { KR_CPU_FLOAT32 = 0, KR_CPU_BFLOAT16 = 2 };

// Instruction-set variants of the kernels, lowest first. All of them compute the same bits (see linear.cpp).
// avx512_bf16 is avx512 plus AVX512-BF16's dot product, which only the bf16 x bf16 linear uses; every other op
// runs its avx512 code there.
enum kr_cpu_isa_code {
  KR_CPU_ISA_INVALID = -1,
  KR_CPU_ISA_PORTABLE = 0,
  KR_CPU_ISA_AVX2 = 1,
  KR_CPU_ISA_AVX512 = 2,
  KR_CPU_ISA_AVX512_BF16 = 3
};

// Return codes.
// KR_CPU_FAILED: a kernel's scratch allocation failed, or a one-call region ran more phases than its workspace's
// counters hold (a bug of the region's phase count: kr_cpu_stack.h's Phases refuses it rather than overrun).
// KR_CPU_NOT_A_DISTRIBUTION: a sampled choice met logits or probabilities it cannot draw from (a NaN or infinite
// logit; torch.multinomial refuses those rows too).
enum kr_cpu_status {
  KR_CPU_OK = 0,
  KR_CPU_BAD_ARGUMENT = 1,
  KR_CPU_BAD_ISA = 2,
  KR_CPU_FAILED = 3,
  KR_CPU_NOT_A_DISTRIBUTION = 4
};

// Output rows per block: a caller that splits [0, N) over threads should cut it at multiples of this, so that
// every thread runs whole register blocks (any split gives the same bits; this one is just the fastest).
#define KR_CPU_ROW_BLOCK 16

// Activation rows per pass over the weights: more rows are processed in passes of at most this many.
#define KR_CPU_MAX_ROWS_PER_PASS 64

// The variant this process uses: the best this CPU runs, or the lower one KANGAROO_RT_CPU_ISA=avx512_bf16|avx512|avx2|portable
// names. Chosen at the first call and fixed for the process. KR_CPU_ISA_INVALID when KANGAROO_RT_CPU_ISA is not
// a variant's name or names one this CPU cannot run; kr_cpu_isa_error() then says which.
int kr_cpu_isa(void);

// "" when kr_cpu_isa() is valid, otherwise why not (a static string).
const char* kr_cpu_isa_error(void);

// "avx512_bf16", "avx512", "avx2", "portable", or "invalid" for any other code.
const char* kr_cpu_isa_name(int isa);

// Whether this CPU (and its operating system) runs the variant.
int kr_cpu_isa_supported(int isa);

// Where the kernels' software prefetch of the weights asks lines to go, fixed for the process at the first call:
// KR_CPU_PREFETCH_NTA, the choice measured on the Zen 5 EPYC host (the linear passes' Prefetch and RowsPrefetch
// non-temporal, the screened head's T0, into L1), or KR_CPU_PREFETCH_L2 (T1, into L2, for the screened head, every
// fp32-weight pass and bf16-weight passes of 3 rows or more, kr_cpu_linear.h's kL2MinRowsBf16; fewer bf16 rows stay
// NTA): on the Zen 4 EPYC host the same streams ran up to 1.7x faster that way. L2 on AMD family 19h with AVX-512
// (Zen 4), NTA elsewhere, or what KANGAROO_RT_CPU_PREFETCH=nta|l2 names; every ISA variant follows it (the AVX2 paths
// with L2 were not measured). Either gives the same bits. An invalid value makes kr_cpu_isa() invalid, with
// kr_cpu_isa_error() saying why.
enum kr_cpu_prefetch_code { KR_CPU_PREFETCH_NTA = 0, KR_CPU_PREFETCH_L2 = 1 };
int kr_cpu_prefetch_target(void);

// "nta", "l2", or "invalid" for any other code.
const char* kr_cpu_prefetch_name(int target);

// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for m < M and n_begin <= n < n_end, in fp32, with the variant
// of kr_cpu_isa().
//   x: (M, K) fp32, row stride ldx (>= K when M > 1), unit column stride
//   w: (N, K) row-major contiguous, fp32 or bf16 bits (w_dtype, a kr_cpu_dtype)
//   bias: (N,) fp32 or NULL
//   y: (M, N) fp32, row stride ldy; only columns [n_begin, n_end) are written
// Every weight byte in [n_begin, n_end) is read from memory once per pass of at most KR_CPU_MAX_ROWS_PER_PASS
// rows. Each y[m, n] is produced by one fixed sequence of operations that depends on K only: not on M, on m,
// on [n_begin, n_end) nor on the variant. Returns a kr_cpu_status.
int kr_cpu_linear_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const void* w, int w_dtype, int64_t N,
                       const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end);

// The same with a given variant (tests, benchmarks); KR_CPU_BAD_ISA when this CPU cannot run it.
int kr_cpu_linear_rows_isa(int isa, const float* x, int64_t M, int64_t K, int64_t ldx, const void* w, int w_dtype,
                           int64_t N, const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end);

// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for bf16 x and bf16 w, as kr_cpu_linear_rows, in the order of
// AVX512-BF16's dot product (vdpbf16ps) on one lane: each y[m, n] is one chain of fused multiply-adds over the pairs
// of k's from 0, for p = 0, 1, ..., ceil(K / 2) - 1 first k = 2p + 1 (zero past K) and then k = 2p, then the bias.
// The whole computation flushes denormals, inputs and results, to zero, as vdpbf16ps does (every variant performs
// this, so all give the same bits). x: (M, K) bf16 bits, row stride ldx; w: (N, K) bf16 bits, contiguous; bias:
// (N,) fp32 or NULL; y: (M, N) fp32, row stride ldy. Row-major W is packed into a scratch panel set (below) by
// each call, run by run: a decode step's weights should be packed once (kr_cpu_pack_bf16) and read with
// kr_cpu_linear_rows_bf16_packed, which streams them at the memory's rate.
int kr_cpu_linear_rows_bf16(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w,
                            int64_t N, const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end);

// The packed layout of a bf16 (N, K) weight: panels of KR_CPU_PACK_ROWS rows, panel b holding rows 16b..16b+r-1
// (r = 16, or what is left for the last one), each row as its K2 = ceil(K / 2) pairs of bf16 (k = 2p low, 2p + 1
// high, zero past K) as 32-bit words, stored pair-major: word (p, l) of panel b at 16 b K2 + p r + l. So a panel
// streams as one run of memory, and each 64 bytes of it is one step of 16 rows' chains. N * K2 words in all:
// out holds N * 2 * K2 bf16 (an (N, K) tensor's size for an even K).
#define KR_CPU_PACK_ROWS 16
void kr_cpu_pack_bf16(const uint16_t* w, int64_t N, int64_t K, uint16_t* out);

// kr_cpu_linear_rows_bf16 (the same bits) with W in the packed layout (kr_cpu_pack_bf16); n_begin a multiple of
// KR_CPU_PACK_ROWS, n_end one too or N.
int kr_cpu_linear_rows_bf16_packed(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w,
                                   int64_t N, const float* bias, float* y, int64_t ldy, int64_t n_begin,
                                   int64_t n_end);

// dst[i] = src[i] rounded to bf16 (nearest even; NaN -> the canonical quiet NaN 0x7fc0, as c10::BFloat16), for
// i < n: how a linear with bf16 activations stores its fp32 rows, inside the task that computed them. Every variant
// gives the same bits. Returns a kr_cpu_status.
int kr_cpu_round_bf16(int isa, const float* src, uint16_t* dst, int64_t n);

// The multiply-adds per second that `threads` threads reach together with the instruction the linear kernel's
// variant `isa` uses for weights of `dtype` (vdpbf16ps for bf16 on AVX512-BF16, else the variant's fused
// multiply-add; scalar std::fma for the portable one), each running `iters` rounds of 12 independent register
// chains: the arithmetic ceiling a linear of M rows meets at N * K * M multiply-adds (peak.cpp). -1 for an
// unsupported isa, a dtype other than KR_CPU_FLOAT32 / KR_CPU_BFLOAT16, threads outside 1..1024 or iters < 1.
double kr_cpu_peak_macs(int isa, int dtype, int64_t threads, int64_t iters);

// ---- The other ops of a decode layer. Each runs one fixed sequence of operations per output element that does
// not depend on how many rows, tokens or heads are in the call, nor on the task split, nor on the variant:
// verification over k + 1 tokens gives the bits of k + 1 single steps. Tensors are of one dtype (a kr_cpu_dtype)
// with a unit stride on their last dimension; other strides are in elements. Tasks [task_begin, task_end) let a
// caller split a call over threads.

// RMSNorm of rows, fused with the residual add before it when residual != NULL:
//   h = x + residual (stored to residual_out, rounded to the dtype), out = weight * (h / sqrt(mean(h^2) + eps)),
// in fp32 with the dtype's rounding where torch rounds (bf16: the normalized row, then its product by weight).
//   x, residual: (M, D) with row strides ld_x, ld_res; weight: (D,); out, residual_out: (M, D) contiguous.
// Tasks are rows, [m_begin, m_end).
int kr_cpu_rms_norm_rows(int isa, int dtype, const void* x, int64_t ld_x, const void* residual, int64_t ld_res,
                         const void* weight, int64_t D, float eps, void* out, void* residual_out, int64_t m_begin,
                         int64_t m_end);

// Rotary embedding (rotate-half convention) of q and k, and the append of the rotated k and of v to the cache.
typedef struct kr_cpu_rope_args {
  int dtype;
  int64_t batch, n_heads, n_kv_heads, q_len, head_dim, max_len;  // B, Hq, Hkv, Q, D, cache slots T
  const void* q;                                                 // (B, Hq, Q, D)
  int64_t q_stride[3];                                           //   strides of B, H, Q
  const void* k;                                                 // (B, Hkv, Q, D)
  int64_t k_stride[3];
  const void* v;  // (B, Hkv, Q, D)
  int64_t v_stride[3];
  const void* cos;  // (B, Q, D) contiguous
  const void* sin;  // (B, Q, D) contiguous
  const int64_t* positions;  // (B, Q): cache slot of each token; outside [0, T) writes nothing
  int64_t pos_stride[2];
  void* k_cache;  // (B_max, Hkv, T, D): B_max > every cache row (b, or cache_rows[b])
  void* v_cache;
  int64_t cache_stride[3];  // strides of B, H, T (both caches)
  void* q_out;              // (B, Hq, Q, D) contiguous: the rotated q
  const int64_t* cache_rows;  // (B,): the cache row batch row b writes (rows sharing one: distinct positions); NULL: b
} kr_cpu_rope_args;

// Tasks are tokens b * Q + i. Each element is x * cos + rotate_half(x) * sin with torch's roundings (bf16: each
// product and the sum), so the bits are those of kangaroo_rt.reference.rope_cache_append.
int kr_cpu_rope_cache_append(int isa, const kr_cpu_rope_args* a, int64_t task_begin, int64_t task_end);

// Causal attention of new queries over the static cache: the query at position p of row b attends to that row's
// cache slots 0..min(p, kv_len - 1), none when p < 0 (output 0). GQA: query head h reads kv head h / (Hq / Hkv).
typedef struct kr_cpu_attention_args {
  int dtype;
  int64_t batch, n_heads, n_kv_heads, q_len, head_dim, kv_len;  // B, Hq, Hkv, Q, D, readable slots
  float scale;                                                  // softmax scale, 1 / sqrt(D) for Llama
  const void* q;                                                // (B, Hq, Q, D)
  int64_t q_stride[3];
  const void* k_cache;  // (B_max, Hkv, T >= kv_len, D): B_max > every cache row (b, or cache_rows[b])
  const void* v_cache;
  int64_t cache_stride[3];
  const int64_t* positions;  // (B, Q)
  int64_t pos_stride[2];
  void* out;  // (B, Hq, Q, D)
  int64_t out_stride[3];  // strides of B, H, Q (contiguous: Hq * Q * D, Q * D, D)
  const int64_t* cache_rows;  // (B,): the cache row batch row b reads; NULL: row b
} kr_cpu_attention_args;

// Tasks are [0, kr_cpu_attention_tasks(a)): tiles of at most kr_cpu_attention_tile_pairs(D) (query, head) pairs
// that read one kv head of one row (the heads of a GQA group, the queries of a verify pass), each pair in one
// task. Per pair: scores q.k_j * scale by the fixed 16-lane dot (fused multiply-adds), their max, e_j = exp(s_j -
// max) (a polynomial exp), l = the fixed-order sum of e_j, out = (sum_j e_j v_j, fused multiply-adds in j order) / l.
// bf16 takes AVX512-BF16's vdpbf16ps order for both products: in the dot, lane l takes d = 32c + 2l + 1, then
// 32c + 2l; e_j is rounded to bf16 (l sums the rounded values) and the value sum takes the keys in pairs, e_{j+1}
// v_{j+1}[d] and then e_j v_j[d] for even j (a missing last key as zeros); the whole bf16 call runs with denormals
// flushed (DAZ + FTZ) in every variant. Nothing depends on the other queries or heads, on the tiling, on Q or on
// kv_len beyond the slots read.
int kr_cpu_attention(int isa, const kr_cpu_attention_args* a, int64_t task_begin, int64_t task_end);

// The number of attention tasks of a call (0 for an empty or invalid one), and the pairs a tile holds at most.
int64_t kr_cpu_attention_tasks(const kr_cpu_attention_args* a);
int64_t kr_cpu_attention_tile_pairs(int64_t head_dim);

// SwiGLU's activation, out = silu(gate) * up, elementwise over rows of n elements: silu(x) = x / (1 + exp(-x)) with
// kr_cpu's fixed exp, rounded to the dtype, then the product rounded (torch's roundings; not its exp). gate, up,
// out: (M, n) with row strides ld_gate, ld_up, ld_out. Tasks are rows, [m_begin, m_end).
int kr_cpu_silu_mul_rows(int isa, int dtype, const void* gate, int64_t ld_gate, const void* up, int64_t ld_up,
                         int64_t n, void* out, int64_t ld_out, int64_t m_begin, int64_t m_end);

// ---- Greedy choices over rows of logits (argmax.cpp): x (M, n) of row stride ld, n in [1, 2^31). index[m] = the
// first index of row m's largest value, a NaN counting as the largest (torch.argmax); with conf, conf[m] = that
// token's softmax probability, 1 / sum_j exp(x_j - max) in a fixed order, and on a row with a NaN, +inf or only
// -inf index 0 and NaN (torch's softmax and max there).
// Tasks are rows, [m_begin, m_end).
int kr_cpu_argmax_rows(int isa, int dtype, const void* x, int64_t ld, int64_t n, int64_t* index, float* conf,
                       int64_t m_begin, int64_t m_end);

// ---- Sampling (sampling.cpp).
// probs[m] = the probabilities of kangaroo_rt.reference.process_logits for row m of logits (M, n), row stride ld,
// fp32 or bf16 bits: scores = logits / divisor (divisor = max(temperature, 1e-6), > 0), then top-k (top_k in
// (0, n): the scores below the k-th largest removed; otherwise none), then top-p (top_p < 1: a token stays while the
// mass of the tokens ranked above it, by descending score and then index, is below top_p; the first always stays),
// then exp(s - max) / sum over the kept tokens, 0 elsewhere (and where s - max < -87). probs: (M, n) fp32, row stride ldp. status[m] = 0, or
// 1 when the row has a NaN or +inf score or only -inf ones (probs[m] then undefined: the caller computes it).
// Tasks are rows, [m_begin, m_end). n in [1, 2^31).
int kr_cpu_process_logits_rows(int isa, int dtype, const void* logits, int64_t ld, int64_t n, float divisor,
                               int64_t top_k, double top_p, float* probs, int64_t ldp, int32_t* status, int64_t m_begin,
                               int64_t m_end);

// tokens[m] = the first index j of row m of probs (M, n) (row stride ld, fp32, non-negative) at which the running sum
// of probs[m, 0..j] passes u[m] * (the row's sum), u[m] in [0, 1): a draw from the row's distribution, as
// torch.multinomial(probs, 1) makes one. Sums in double, in chunks of 64. tokens[m] = -1 where the row is not a
// distribution (a negative, NaN or infinite value, a sum of 0) or u[m] is outside [0, 1). Tasks are rows.
int kr_cpu_sample_rows(int isa, const float* probs, int64_t ld, int64_t n, const double* u, int64_t* tokens,
                       int64_t m_begin, int64_t m_end);

// Speculative sampling's acceptance (kangaroo_rt.reference.accept_sampling) for rows [m_begin, m_end): drafts (B, K)
// int64 (row stride ld_drafts), n_drafts (B,) in [0, K], p (B, K + 1, V) and q (B, K, V) fp32 contiguous, u_accept
// (B, K) fp32 contiguous, u_next (B,) float64 in [0, 1). accepted[b] = the drafts i < n_drafts[b] before the first
// with !(u_accept[b, i] * q[b, i, d_i] < p[b, i, d_i]) (in fp32, as the reference tests it); next[b] = a draw as
// kr_cpu_sample_rows makes it with u_next[b]: from max(p - q, 0) at a rejection (p where that has no mass), from
// p[b, n_drafts[b]] after a full acceptance; -1 where that row is not a distribution (a NaN in p - q included). A
// draft outside [0, V) within n_drafts is rejected (the reference clamps it to token 0; the decoder never has one).
int kr_cpu_accept_sampling_rows(int isa, const int64_t* drafts, int64_t ld_drafts, const int64_t* n_drafts,
                                const float* p, const float* q, int64_t K, int64_t V, const float* u_accept,
                                const double* u_next, int64_t* accepted, int64_t* next, int64_t m_begin,
                                int64_t m_end);

// ---- The screened greedy head (head_screen.cpp): the first index of the largest logit of y = x W^T, with y rounded
// to the dtype as the head computes it (kr_cpu_linear_rows / _bf16 + rounding), the same index as
// kr_cpu_argmax_rows over the whole row, while most of W is read as int8. W ~ scale[v] * q[v] (per-row int8); x is
// split into two int8 parts, x ~ s1 * u1 + s2 * u2, so that the integer dots (exact) give an estimate of every
// logit and a proven bound on its distance from the computed logit (Cauchy-Schwarz over the two quantization errors,
// plus the rounding of the estimate and of the head's own fixed-order sum). Only the rows whose interval can reach
// the largest are computed exactly, by the head's kernel on that row alone (whose bits do not depend on the rows
// it is called with), and the choice among them is the one over the whole row. A row with a non-finite input, or
// whose best logit is zero, takes the whole head.
typedef struct kr_cpu_head_screen {
  const int8_t* q;       // (V, kp): round(W / scale[v]) in [-127, 127], zero past K
  const float* scale;    // (V,) > 0
  const int32_t* qsum;   // (V,): sum of q[v]
  const float* err;      // (V,) >= || W[v] - scale[v] * q[v] ||_2
  const float* wnorm;    // (V,) >= || W[v] ||_2
  int64_t kp;            // q's row stride: a multiple of 64, >= K, <= 32768 (the int32 dots)
} kr_cpu_head_screen;

enum { KR_CPU_SCREEN_STATS = 11 };  // doubles per row of kr_cpu_screen_prepare_rows

// x (M, K) of row stride ldx in the dtype -> u (M, 2, kp) uint8 (u1 + 128, u2 + 128; 128 past K) and stats
// (M, KR_CPU_SCREEN_STATS): the bounds' constants of each row, for both parts and for the first alone (a row with a
// non-finite value is marked for the whole head). Tasks are rows.
int kr_cpu_screen_prepare_rows(int dtype, const void* x, int64_t ldx, int64_t K, int64_t kp, uint8_t* u,
                               double* stats, int64_t m_begin, int64_t m_end);

// For rows v in [n_begin, n_end) of the head and each of the M prepared rows: hi[m * ld + v] and lo[m * ld + v],
// bounds of the logit the head computes. isa: AVX-512 with VNNI where the CPU has it, otherwise portable (the same
// integers, so the same bounds).
// floors NULL, or M < 6 (where both parts cost about as much: head_screen.cpp): every bound from both of x's
// parts. Else floors (M,) are running lower bounds of each prepared row's largest logit (-inf, or any such bound,
// before a pass's first call; the calls of one pass may run at once, each raising them): in blocks of 16 rows of W,
// each row's bounds come from x's first part alone (half the integer dot products) unless that upper bound reaches
// the floor as the block starts, where both parts give them, and the floor is then raised to the block's largest
// lower bound. The first part's bounds hold the logit too, and a row they leave out cannot be the largest, so
// kr_cpu_screen_argmax_row makes the same choice from either; which rows get which bounds can depend on the order
// in which the calls ran (the same order gives the same bits on every variant).
int kr_cpu_screen_rows(int isa, const uint8_t* u, const double* stats, int64_t M, int64_t K,
                       const kr_cpu_head_screen* s, float* hi, float* lo, int64_t ld, int64_t n_begin, int64_t n_end,
                       float* floors);

// The estimates instead of the bounds: y[m * ld + v] = a_v = scale[v] * (s1 * (d1 - 128 qsum[v]) + s2 * (d2 - 128
// qsum[v])) in fp32, the value kr_cpu_screen_rows' bounds are centred on (the same bits on every variant), or NaN
// throughout for a prepared row marked for the whole head (a non-finite or huge input). Its distance from the
// logit is within those bounds, but it is not the head's logit: for drafting, where any logits will do (Kangaroo's
// draft head read as int8, half the bytes of bf16; the tokens the target keeps do not depend on them). err and wnorm
// are not read.
int kr_cpu_screen_estimate_rows(int isa, const uint8_t* u, const double* stats, int64_t M, int64_t K,
                                const kr_cpu_head_screen* s, float* y, int64_t ld, int64_t n_begin, int64_t n_end);

// The most rows (batch x tokens) of a pass for which the screened head is faster than the whole head, by dtype.
int64_t kr_cpu_screen_max_rows(int dtype);

// The choice of one row m: *index over V logits from its bounds (hi, lo: V each, lo overwritten) and exact logits
// of the rows that can win (x_row (K,) in the dtype, head (V, K) in the dtype, as the pass's head takes them;
// packed: a bf16 head in kr_cpu_pack_bf16's layout).
int kr_cpu_screen_argmax_row(int isa, int dtype, const void* x_row, int64_t K, const void* head, int packed, int64_t V,
                             const double* stats, const float* hi, float* lo, int64_t* index);

// ---- The commit of a round's tokens and greedy acceptance fused with it (accept.cpp): csrc/accept.cu's semantics.
// tokens (B, n) of strides (stk0, stk1): row b commits its first min(count[b], n) tokens into out (B, out_width) of
// row stride out_row_stride from column n_gen[b] on, up to and including the first of the n_eos ids in eos, unless
// finished[b]; then n_gen[b] += committed[b] and finished[b] |= an EOS was committed. Columns at or past out_width
// are not written (they count as committed: the caller sizes out).
int kr_cpu_commit_tokens(const int64_t* tokens, int64_t stk0, int64_t stk1, int64_t n, const int64_t* count,
                         int64_t* out, int64_t out_row_stride, int64_t out_width, int64_t* n_gen, uint8_t* finished,
                         const int64_t* eos, int64_t n_eos, int64_t batch, int64_t* committed);

// Greedy acceptance of drafts (B, k) (strides sd0, sd1) against the target's tokens (B, k + 1) (st0, st1):
// accepted[b] = the length of the agreeing prefix within n_drafts[b], next_token[b] = the target's token after it;
// then the commit above of those drafts and next_token, and pos[b] += accepted[b] + 1 on rows not finished before.
int kr_cpu_accept_greedy_commit(const int64_t* drafts, int64_t sd0, int64_t sd1, const int64_t* n_drafts,
                                const int64_t* target, int64_t st0, int64_t st1, int64_t batch, int64_t k,
                                int64_t* out, int64_t out_row_stride, int64_t out_width, int64_t* n_gen,
                                uint8_t* finished, int64_t* pos, const int64_t* eos, int64_t n_eos, int64_t* accepted,
                                int64_t* next_token, int64_t* committed);

// ---- Per-row sampling settings of a decode batch (the draft chain's and the target pass's sampled choice): row b is
// greedy where divisor[b] == 0, else sampled as kr_cpu_process_logits_rows takes divisor[b] (> 0), top_k[b] (0:
// none) and top_p[b] (1: none). Each array (B,).
typedef struct kr_cpu_row_sampling {
  const float* divisor;
  const int64_t* top_k;
  const double* top_p;
} kr_cpu_row_sampling;

// KR_CPU_OK when every row's settings are valid (a divisor >= 0, not NaN; top_k >= 0; top_p not NaN).
int kr_cpu_row_sampling_check(const kr_cpu_row_sampling* s, int64_t batch);

// ---- A stack of Llama decoder layers in one call (decoder.cpp): per layer, the ops above in the order of
// kangaroo_rt.model.DecoderLayer (input norm, fused q/k/v linear, RoPE + cache append, attention, o linear,
// residual add + post-attention norm, fused gate/up linear, silu * up, down linear + residual add), each output
// element by the same function as the per-op path, so the same bits. The ops run in fewer phases than there are
// ops (kr_cpu_stack.h): each norm at the start of the linear after it, on every thread, the o linear's residual add
// in its own chunks, silu * up inside the gate/up linear's (where the intermediate size is a multiple of 16). Every thread that takes part calls
// kr_cpu_decoder_layers with the same arguments; the work of each op is cut into chunks that the threads claim
// as they come, and an op starts once every chunk of the one before is done. Any number of threads, one
// included, computes the whole stack, with the same bits.
//
// A layer without gate_up and down (both NULL) is attention-only, Kangaroo's adapter: its output is
// post_norm(h + o(attention)), the normed state (kangaroo_rt.adapter.Adapter.forward), not a residual stream.

typedef struct kr_cpu_decoder_layer {
  const void* input_norm;  // (D,)
  const void* qkv;         // (Hq * Dh + 2 * Hkv * Dh, D) contiguous: q rows, then k, then v
  const float* qkv_bias;   // (Hq * Dh + 2 * Hkv * Dh,) fp32, or NULL
  const void* o;           // (D, Hq * Dh) contiguous
  const float* o_bias;     // (D,) fp32, or NULL
  const void* post_norm;   // (D,): the post-attention norm (an attention-only layer: the output's norm)
  const void* gate_up;     // (2 * I, D) contiguous: gate rows, then up rows; NULL: attention-only (with down)
  const void* down;        // (D, I) contiguous, or NULL
  void* k_cache;           // (B_max, Hkv, T, Dh), strides cache_stride (unit last), B_max > every cache row
  void* v_cache;
} kr_cpu_decoder_layer;

typedef struct kr_cpu_decoder_args {
  int dtype;
  int64_t batch, q_len, hidden_size, n_heads, n_kv_heads, head_dim, intermediate;  // B, Q, D, Hq, Hkv, Dh, I (0:
                                                                                   // attention-only layers)
  int64_t max_len, kv_len;  // cache slots T; slots attention reads (<= T)
  float eps, scale;         // RMSNorm epsilon; softmax scale
  int64_t n_layers;
  const kr_cpu_decoder_layer* layers;  // (n_layers,)
  int64_t cache_stride[3];             // strides of B, H, T of every layer's caches
  const void* cos;                     // (B, Q, Dh) contiguous
  const void* sin;
  const int64_t* positions;  // (B, Q)
  int64_t pos_stride[2];
  void* hidden;       // (B * Q, D) contiguous: the input, overwritten by the output
  int64_t threads;    // how many threads are expected to call (sizes the chunks; any number may)
  void* workspace;    // kr_cpu_decoder_workspace_bytes(args) bytes, 64-byte aligned, see below
  // (B,): the cache row of batch row b, for RoPE's append and attention; NULL: row b. Rows that share a cache row
  // must hold distinct positions (the target pass's compacted tokens: one batch row a token).
  const int64_t* cache_rows;
  int packed;  // bf16 only: every layer's qkv, o, gate_up and down in kr_cpu_pack_bf16's layout
} kr_cpu_decoder_args;

// Bytes of workspace the call needs; -1 for impossible sizes. *zeroed_bytes (when not NULL) is set to the
// leading bytes of it (the threads' counters) that must be zero before the call; the rest may hold anything. The
// same for the draft chain, the target pass and the sweep below.
int64_t kr_cpu_decoder_workspace_bytes(const kr_cpu_decoder_args* a, int64_t* zeroed_bytes);

// KR_CPU_OK when kr_cpu_decoder_layers can run these arguments (sizes, pointers, variant), checked once before
// the threads start, so that no thread stops alone.
int kr_cpu_decoder_check(int isa, const kr_cpu_decoder_args* a);

// One thread's part of the stack (see above). Returns a kr_cpu_status.
int kr_cpu_decoder_layers(int isa, const kr_cpu_decoder_args* a);

// ---- Kangaroo's greedy draft chain, a whole round's drafting in one call (draft.cpp): what
// kangaroo_rt.speculative.Decoder does step by step under greedy choice: begin_round (each row's cap of drafts), then
// per step s the shallow step (the embedding of x, the target's layers 0..l-1 at positions pos + s, the exit state
// stored to exits[:, s]), keep_drafting (s > 0: a row stops after a draft of confidence < eta or at its cap), and,
// while a row drafts and s < gamma, the draft step: the adapter (step 0 on two positions, e_prev at pos - 1 and
// the exit state at pos), the head (the LM head or the draft vocabulary's rows), the greedy choice and its
// confidence as kr_cpu_argmax_rows gives them, the draft (-1 on rows that stopped) appended. Every op runs on the
// kernels above with the same arguments as the per-step path, and RoPE's cos and sin are rows of tables made by
// the same function: the same bits. Rows that stopped are computed with the others (their results are not used).
// gamma 0 (a round without drafts: the engine's verification budget) runs the shallow step, then the adapter over
// step 0's two positions without the head, so that the adapter's cache takes the new exit state.
// Every thread that takes part calls kr_cpu_draft_chain with the same arguments, as for the decoder stack.
typedef struct kr_cpu_draft_args {
  int dtype;
  int64_t batch, hidden_size, n_heads, n_kv_heads, head_dim, intermediate, max_len;  // B, D, Hq, Hkv, Dh, I, T
  float eps, adapter_eps, scale;  // the target's and the adapter's RMSNorm epsilon; the softmax scale
  int64_t gamma;                  // drafts a round at most (>= 0)
  float eta;                      // confidence threshold
  int64_t base_len;               // slots the attention of step 0 reads (max(pos) + 1); step s reads base_len + s
  int64_t exit_layer;             // l >= 1
  const kr_cpu_decoder_layer* layers;   // (l,): the target's layers 0..l-1 and their caches
  const kr_cpu_decoder_layer* adapter;  // one attention-only layer (gate_up and down NULL) and its caches
  int64_t cache_stride[3];              // strides of B, H, T of every cache, the adapter's included
  const void* embed;                    // (vocab, D) contiguous: the token embedding
  int64_t vocab;
  const void* head;         // (head_rows, D) contiguous
  int64_t head_rows;
  int packed;               // bf16 only: the layers', the adapter's and the head's weights in kr_cpu_pack_bf16's layout
  const int64_t* head_ids;  // (head_rows,): the vocabulary id of each head row, or NULL (row n is id n)
  // Not NULL: the head's logits are its int8 form's estimates (kr_cpu_screen_estimate_rows of the adapter's output,
  // prepared as for the screened head), rounded to the dtype, instead of head's (V = head_rows, K = D; head unread).
  const kr_cpu_head_screen* head_q8;
  const void* rope_cos;     // (T, Dh) contiguous: cos and sin of positions 0..T-1
  const void* rope_sin;
  // The decode state, read: (B,) each; e_prev (B, D) contiguous, the exit state at pos - 1. Needs 1 <= pos[b] and
  // pos[b] + gamma < T.
  const int64_t* pos;
  const int64_t* token;
  const int64_t* n_gen;
  const int64_t* max_new;
  const uint8_t* finished;
  const void* e_prev;
  // The chain, written: (B,) each; drafts (B, gamma) and exits (B, gamma + 1, D) contiguous.
  int64_t* cap;
  uint8_t* active;
  float* conf;
  int64_t* x;
  int64_t* drafts;
  int64_t* n_drafts;
  void* exits;
  int64_t* steps;   // out: the drafting steps run, k (the exit states of exits[:, :k + 1] are set)
  // Sampled drafts (sample_q not NULL): step s of a sampled row b (see kr_cpu_row_sampling) draws its draft from q =
  // kr_cpu_process_logits_rows of its head logits (with the row's settings), stored to sample_q (B, gamma,
  // head_rows) fp32 at [b, s], with kr_cpu_sample_rows and the uniform sample_u (B, gamma) float64 at [b, s]; its
  // confidence is the largest q. A greedy row drafts as with sample_q NULL (its q set to 0). A sampled row whose
  // logits are not finite fails the call (KR_CPU_NOT_A_DISTRIBUTION). NULL: every row greedy.
  float* sample_q;
  const double* sample_u;
  kr_cpu_row_sampling sampling;
  int64_t threads;  // how many threads are expected to call (sizes the chunks; any number may)
  void* workspace;  // kr_cpu_draft_workspace_bytes(args) bytes, 64-byte aligned, see below
} kr_cpu_draft_args;

// Bytes of workspace the call needs; -1 for impossible sizes.
int64_t kr_cpu_draft_workspace_bytes(const kr_cpu_draft_args* a, int64_t* zeroed_bytes);

// KR_CPU_OK when kr_cpu_draft_chain can run these arguments (sizes, pointers, positions, variant), checked once
// before the threads start.
int kr_cpu_draft_check(int isa, const kr_cpu_draft_args* a);

// One thread's part of the chain. Returns a kr_cpu_status (KR_CPU_BAD_ARGUMENT for a token outside the vocabulary).
int kr_cpu_draft_chain(int isa, const kr_cpu_draft_args* a);

// ---- A target pass with its acceptance in one call (target_pass.cpp): a plain decoding step (the embedding of
// each row's token at pos, all layers) or Kangaroo's verification (the exit states of a round's k drafts + 1 at
// pos .. pos + k, layers l..N-1), then the final norm, the LM head, the greedy choice per position and
// kr_cpu_accept_greedy_commit's acceptance and commit (k = 0: the step's token committed), the rows that reached
// max_new finished, token set to each row's next token and, for a verification, e_prev to the exit state at the
// accepted length. What kangaroo_rt.speculative.Decoder.ar_step and .verify do under greedy choice, each op on the
// kernels above: the same bits and tokens. Of a row's k + 1 positions only the first 1 + min(max(n_drafts[b], 0), k)
// are computed (those the acceptance reads; the step-by-step path pads every row to k + 1), each one a row of the
// layer stack in row b's cache (kr_cpu_decoder_args.cache_rows): the cache slots past them are not written.
// Sampled (sample_u_next not NULL; no head_screen): on a sampled row (see kr_cpu_row_sampling), instead of the
// greedy choice, every position's probabilities p = kr_cpu_process_logits_rows of its logits (with the row's
// settings), then a plain step's draw (kr_cpu_sample_rows with sample_u_next[b]) or kr_cpu_accept_sampling_rows over
// the k drafts with their draft probabilities sample_q + b * sample_q_stride ((k, sample_q_rows) fp32 contiguous), the
// uniforms sample_u_accept + b * sample_u_accept_stride ((k,) fp32) and sample_u_next[b]; a greedy row takes the
// greedy choice and acceptance; then every row's accepted drafts and next token are committed as
// kr_cpu_commit_tokens commits them and pos advances past them on rows not finished before: Decoder.ar_step and
// .verify under kangaroo_rt.speculative's BatchSampling or RowSampling with those uniforms. A sampled row whose
// acceptance reaches a position that cannot be drawn from (a NaN or infinite logit: the test of its draft, or the
// next token's draw there) fails the call (KR_CPU_NOT_A_DISTRIBUTION) before any commit; positions past the first
// such one are not read. Drafts past n_drafts[b] or q_len - 1 are not tested.
typedef struct kr_cpu_target_pass_args {
  int dtype;
  int64_t batch, q_len;  // B; Q = k + 1 positions per row (1 for a plain step)
  int64_t hidden_size, n_heads, n_kv_heads, head_dim, intermediate, max_len, kv_len;  // D, Hq, Hkv, Dh, I, T, slots
  float eps, norm_eps, scale;  // the layers' and the final norm's epsilon; the softmax scale
  int64_t n_layers;
  const kr_cpu_decoder_layer* layers;  // (n_layers,)
  int64_t cache_stride[3];
  const void* embed;  // (vocab, D): the pass starts from the embedding of token (a plain step); NULL: from exits
  int64_t vocab;
  const void* exits;  // (B, >= Q, D) of row stride exits_stride (in elements) when embed is NULL
  int64_t exits_stride;
  const void* norm;   // (D,)
  const void* head;   // (head_rows, D) contiguous
  int64_t head_rows;
  int packed;         // bf16 only: the layers' and the head's weights in kr_cpu_pack_bf16's layout
  const kr_cpu_head_screen* head_screen;  // NULL: the whole head, then the argmax; else the screened head
  const void* rope_cos;  // (T, Dh) contiguous: cos and sin of positions 0..T-1; needs pos[b] + Q <= T
  const void* rope_sin;
  const int64_t* drafts;  // (B, Q - 1) of row stride drafts_stride, NULL when Q == 1
  int64_t drafts_stride;
  const int64_t* n_drafts;  // (B,), NULL when Q == 1
  // The decode state, in place: (B,) each; out (B, out_width) of row stride out_stride; e_prev (B, D) or NULL.
  int64_t* pos;
  int64_t* token;
  int64_t* out;
  int64_t out_stride, out_width;
  int64_t* n_gen;
  uint8_t* finished;
  const int64_t* max_new;
  const int64_t* eos;  // (n_eos,)
  int64_t n_eos;
  void* e_prev;
  int64_t* accepted;   // out (B,)
  int64_t* committed;  // out (B,)
  // The sampled choice (see above); sample_u_next NULL: greedy.
  const double* sample_u_next;    // (B,) float64 in [0, 1)
  const float* sample_u_accept;   // (B, >= Q - 1) fp32, row stride sample_u_accept_stride; NULL when Q == 1
  int64_t sample_u_accept_stride;
  // (B, >= Q - 1, sample_q_rows) fp32, row stride sample_q_stride; NULL when Q == 1. Row n of a position's q is
  // token sample_q_ids[n]'s probability (sample_q_ids NULL: token n's, sample_q_rows == head_rows), 0 elsewhere:
  // a draft vocabulary's (distinct ids in [0, head_rows)).
  const float* sample_q;
  int64_t sample_q_stride, sample_q_rows;
  const int64_t* sample_q_ids;
  kr_cpu_row_sampling sampling;
  int64_t threads;     // how many threads are expected to call (sizes the chunks; any number may)
  void* workspace;     // kr_cpu_target_pass_workspace_bytes(args) bytes, 64-byte aligned, see below
} kr_cpu_target_pass_args;

// Bytes of workspace the call needs; -1 for impossible sizes.
int64_t kr_cpu_target_pass_workspace_bytes(const kr_cpu_target_pass_args* a, int64_t* zeroed_bytes);

// KR_CPU_OK when kr_cpu_target_pass can run these arguments, checked once before the threads start.
int kr_cpu_target_pass_check(int isa, const kr_cpu_target_pass_args* a);

// One thread's part of the pass. Returns a kr_cpu_status (KR_CPU_BAD_ARGUMENT for a token outside the vocabulary).
int kr_cpu_target_pass(int isa, const kr_cpu_target_pass_args* a);

// ---- A sweep of linears, for benchmarks: y_i = x W_i^T for i = 0..n-1, one after another on one set of threads that
// claim chunks of each as the decoder stack claims its linears (the same code), so that a benchmark measures the
// kernel's stream as the stack drives it, without a call, a thread start and an output allocation per matrix.
// Every thread that takes part calls kr_cpu_linear_sweep with the same arguments; y_i's bits are those of
// kr_cpu_linear_rows (bf16: rounded to bf16) for any number of threads.
typedef struct kr_cpu_linear_sweep_args {
  int dtype;                   // of x, every weight and y: KR_CPU_FLOAT32 or KR_CPU_BFLOAT16
  int64_t rows;                // M
  int64_t n_linears;
  const void* const* weights;  // (n_linears,): weight i is (n_out[i], n_in[i]) contiguous
  const int64_t* n_out;        // (n_linears,)
  const int64_t* n_in;         // (n_linears,), each <= ld_x
  const void* x;               // (M, ld_x): linear i reads the first n_in[i] columns
  int64_t ld_x;
  void* y;                     // (M, ld_y): linear i writes n_out[i] columns after those of linears 0..i-1
  int64_t ld_y;                // >= the sum of n_out
  int64_t threads;             // how many threads are expected to call (sizes the chunks; any number may)
  void* workspace;             // kr_cpu_linear_sweep_workspace_bytes(args) bytes, 64-byte aligned, see below
  int packed;                  // bf16 only: every weight in kr_cpu_linear_rows_bf16_packed's layout
} kr_cpu_linear_sweep_args;

// Bytes of workspace the call needs; -1 for impossible sizes.
int64_t kr_cpu_linear_sweep_workspace_bytes(const kr_cpu_linear_sweep_args* a, int64_t* zeroed_bytes);

// KR_CPU_OK when kr_cpu_linear_sweep can run these arguments, checked once before the threads start.
int kr_cpu_linear_sweep_check(int isa, const kr_cpu_linear_sweep_args* a);

// One thread's part of the sweep. Returns a kr_cpu_status.
int kr_cpu_linear_sweep(int isa, const kr_cpu_linear_sweep_args* a);

// Where the one-call regions' time goes (the decoder stack, the draft chain, the target pass, the linear sweep): every
// phase (an op of a layer, the head, the screen, the bookkeeping) adds, per thread, the wall time its chunks' bodies
// took and the time the thread spent claiming and waiting for the other threads' last chunks, under a kind that
// names the op, the part of the model (the target's layers, the draft's shallow layers, the adapter) and whether
// it ran over one row or more. Off by default (a relaxed load per phase); for profiling, not for decoding.
// Kinds: for part p (0 layers, 1 shallow, 2 adapter), rows r (0: one, 1: more) and op o (KR_CPU_PHASE_OPS of them,
// in the stack's order) the kind (p * 2 + r) * KR_CPU_PHASE_OPS + o; then the head, the draft head, the screen,
// and everything else. kr_cpu_phase_kind_name says which. The norms count under the linear after them and silu
// under gate_up where they run in its phase (the stack's regular layers): input_norm, post_norm and silu then
// have no phases of their own.
#define KR_CPU_PHASE_OPS 9
#define KR_CPU_PHASE_KINDS (6 * KR_CPU_PHASE_OPS + 4)

// Turns the accounting on (nonzero) or off; returns the previous setting.
int kr_cpu_phase_stats_enable(int on);

// Zeroes the totals. Call it between regions, not while one runs.
void kr_cpu_phase_stats_reset(void);

// "layers.qkv", "shallow.down[n]" (over more than one row), "adapter.attention", "head", "draft_head", "screen",
// "other"; "" for a kind out of range.
const char* kr_cpu_phase_kind_name(int kind);

// The totals over all threads since the last reset: out[3 * kind] nanoseconds in the bodies of chunks, out[3 * kind
// + 1] nanoseconds claiming and waiting, out[3 * kind + 2] phases run (one per thread that ran the phase).
// out: (3 * KR_CPU_PHASE_KINDS,).
void kr_cpu_phase_stats_read(int64_t* out);

#ifdef __cplusplus
}
#endif
