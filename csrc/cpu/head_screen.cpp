// The screened greedy head: the greedy token of y = x W^T without reading all of W at its own precision. See
// kr_cpu.h for the contract.
//
// A decode step's head (SmolLM2: 49152 x 576, 57 MB in bf16, a fifth of the step's weight bytes) is only ever
// reduced to its argmax on the greedy paths. Here W is read as int8 with a scale per row (half the bytes of bf16,
// a quarter of fp32), x as two int8 parts (x ~ s1 u1 + s2 u2, the second quantizing the first one's residual), and
// the integer dots, exact in int32 (AVX512-VNNI's vpdpbusd, 64 multiply-adds an instruction, or portable C++: the
// same integers), give each logit an estimate a_v = scale_v (s1 d1 + s2 d2) and a bound R_v on its distance from
// the logit F_v the head's own kernel computes:
//   |x.W_v - xh.Wh_v| <= ||x - xh|| ||W_v|| + ||xh|| ||W_v - Wh_v||   (Cauchy-Schwarz, xh and Wh the int8 forms)
//   |F_v - x.W_v|     <= gamma_n ||x|| ||W_v|| + (flushes)            (the head kernel's fixed order: a bf16 chain of K fused multiply-adds, or fp32's K / 16 and a tree; n = K + 8 bounds both)
// plus the float rounding of a_v itself; the per-row norms come from the caller (computed in fp64, rounded up).
// Every v whose interval [a_v - R_v, a_v + R_v] cannot reach max_u (a_u - R_u) is not the largest F; the rest (a
// few rows: a median of 3 of 49152 on SmolLM2's real hidden states) are computed exactly, by the head's kernel on
// that row alone, which gives the row the bits it has in the whole head (the kernel's bits do not depend on the
// rows it is called with), rounded to the dtype as the pass rounds its logits. The rounded best L* then admits
// every v whose interval reaches L*'s lower rounding boundary (a tie under rounding must be seen, the first index
// wins), those are computed too, and the choice is the first index of the largest among them: kr_cpu_argmax_rows's
// over the whole row. A row with a non-finite input, a non-finite exact logit or a best of zero (where a rounded
// tie with -0 could hide) computes the whole head instead.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kr_cpu.h"
#include "kr_cpu_avx512.h"  // (the intrinsics, and GCC 12's warnings inside them silenced)
#include "kr_cpu_common.h"

namespace {

// stats of a prepared row (KR_CPU_SCREEN_STATS doubles)
// (kCoefNorm1, kCoefErr1, kCoefScale1: the bounds' constants of the first part alone, xh = s1 u1)
enum Stat { kValid = 0, kS1, kS2, kCoefNorm, kCoefErr, kCoefScale, kXNorm, kAbs, kCoefNorm1, kCoefErr1, kCoefScale1 };
static_assert(kCoefScale1 + 1 == KR_CPU_SCREEN_STATS, "kr_cpu.h's KR_CPU_SCREEN_STATS counts the stats");

constexpr double kUnit = 1.0 / 16777216.0;  // 2^-24, fp32's unit roundoff
constexpr float kInflate = 1.0f + 1.0f / 65536.0f;  // covers the float arithmetic of the bounds (a few roundings)
// A row v with ||x|| ||W_v|| above this could overflow fp32 inside the head's sum (F_v infinite or NaN, which the
// whole head's argmax sees): its bounds are (-inf, +inf), so that it is always computed exactly.
constexpr float kMaxNormProduct = 1.2676506e30f;  // 2^100
constexpr double kMaxInput = 1.152921504606846976e18;  // 2^60: larger inputs take the whole head
constexpr int kBlock = 8;  // rows of W a screening step takes
constexpr int kFloorBlock = 2 * kBlock;  // with running floors: rows of W whose first parts one hsum16 sums
// The fewest prepared rows that take the running floors. Measured on the 2-core Zen 4 EPYC: in a scratch harness
// (SmolLM2's head shape, random bf16 weights, 2 threads, cold, the same rows in turns) the bounds of 1 / 2 / 3 / 4 /
// 5 / 6 / 7 / 8 rows took 1.05 / 1.05 / 1.01 / 0.97 / 0.87 / 0.80 / 0.81 / 0.78x the time of both parts everywhere;
// in SmolLM2's decoding (bench_phases --switch KANGAROO_RT_SCREEN_FLOORS, 8 held-out prompts x 256 tokens, bf16)
// the screen of 5-token verifications (gamma 4, eta 0) took 1.03x, of 7-token ones (gamma 6, eta 0) 0.83x. Up to 3
// rows the stream of both parts is memory-bound, and the first part's loop (two loads and two vpdpbusd a chunk)
// streamed slower than both parts' (one thread at 1 row: 1.3-1.4x the time), whatever its prefetch distance (16-128
// rows), with four rows a step instead of two, or with its loads kept out of the vpdpbusd.
constexpr int64_t kFloorMinRows = 6;
// The software prefetch of the rows ahead of the pair being read. Into L1 (T0), two blocks (9 KB for SmolLM2) ahead,
// where each 64 weights cost a load and two vpdpbusd a row: without it, both parts for every row had taken 0.66 /
// 0.65 / 1.46 / 1.71x the whole bf16 head's time at 1 / 2 / 4 / 8 rows (the Zen 5 host). Where the kernels
// prefetch into L2 (kr_cpu_prefetch_target(), the Zen 4 host), T1 four blocks (18 KB) ahead: there the stream ran
// at ~20 GB/s with T0 whatever the distance (4.6-37 KB) or with NTA, at 29-39 GB/s with T1 or T2 at 9-74 KB (a
// scratch harness of this loop, 2 threads, cold, 4 KB and 2 MB pages).
constexpr int kAheadRowsL1 = 2 * kBlock, kAheadRowsL2 = 4 * kBlock;
// the longest rows whose integer dots stay within int32: |sum| <= 255 * 127 * kp (kr_cpu.h's kr_cpu_head_screen)
constexpr int64_t kMaxKp = 32768;

// x rounded to an integer, halves away from zero (|x| <= 2^31; any rounding would do: the stats follow u).
inline double round_half_away(double x) {
  return static_cast<double>(static_cast<int64_t>(x + (x >= 0.0 ? 0.5 : -0.5)));
}

template <typename T>
void prepare_row(const T* x, int64_t K, int64_t kp, uint8_t* u, double* st) {
  std::memset(u, 128, static_cast<size_t>(2 * kp));
  std::fill(st, st + KR_CPU_SCREEN_STATS, 0.0);
  double amax = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    const double h = kr_cpu::to_float(x[i]);
    if (!std::isfinite(h)) return;  // kValid stays 0: the whole head
    amax = std::max(amax, std::fabs(h));
  }
  if (amax > kMaxInput) return;  // (the estimates' float arithmetic could overflow): the whole head
  // (a scale that underflows to 0 in float takes 1: u is then 0 there, and the bounds hold for any scale)
  const float s1f = static_cast<float>(amax / 127.0), s1 = s1f > 0.0f ? s1f : 1.0f;
  double rmax = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    const double h = kr_cpu::to_float(x[i]);
    const double q = std::min(127.0, std::max(-127.0, round_half_away(h / s1)));
    u[i] = static_cast<uint8_t>(static_cast<int>(q) + 128);
    rmax = std::max(rmax, std::fabs(h - s1 * q));  // exact: s1 * q has at most 31 significant bits
  }
  const float s2f = static_cast<float>(rmax / 127.0), s2 = s2f > 0.0f ? s2f : 1.0f;
  double dh2 = 0.0, xh2 = 0.0, x2 = 0.0, d1h2 = 0.0, x1h2 = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    const double h = kr_cpu::to_float(x[i]);
    const double q1 = static_cast<double>(u[i]) - 128.0;
    const double r = h - s1 * q1;
    const double q2 = std::min(127.0, std::max(-127.0, round_half_away(r / s2)));
    u[kp + i] = static_cast<uint8_t>(static_cast<int>(q2) + 128);
    const double xh = s1 * q1 + s2 * q2;
    dh2 += (h - xh) * (h - xh), xh2 += xh * xh, x2 += h * h;
    d1h2 += r * r, x1h2 += (s1 * q1) * (s1 * q1);  // (the first part alone: xh = s1 u1, its residual r)
  }
  const double n = static_cast<double>(K) + 8.0;
  const double gamma = 1.01 * n * kUnit / (1.0 - n * kUnit);
  const double up = 1.0 + 1e-12;  // the fp64 sums' own rounding, many times over
  st[kValid] = 1.0, st[kS1] = s1, st[kS2] = s2;
  // (a denormal x_i read as 0 by DAZ loses |x_i w_i| <= 2^-126 |w_i|, and sum |w_i| <= sqrt(K) ||W_v||)
  const double daz = std::ldexp(std::sqrt(static_cast<double>(K)), -126);
  st[kCoefNorm] = (std::sqrt(dh2) + gamma * std::sqrt(x2) + daz) * up;
  st[kCoefErr] = std::sqrt(xh2) * up;
  st[kCoefScale] = 16.0 * kUnit * 127.0 * 127.0 * static_cast<double>(K) * (static_cast<double>(s1) + s2);
  st[kXNorm] = std::sqrt(x2) * up;
  st[kCoefNorm1] = (std::sqrt(d1h2) + gamma * std::sqrt(x2) + daz) * up;
  st[kCoefErr1] = std::sqrt(x1h2) * up;
  st[kCoefScale1] = 16.0 * kUnit * 127.0 * 127.0 * static_cast<double>(K) * static_cast<double>(s1);
  // what flushing denormal products and sums to zero (DAZ + FTZ in the bf16 head) can move a logit, and more
  st[kAbs] = 1e-30 + 4.0 * (static_cast<double>(K) + 16.0) * std::ldexp(amax + 1.0, -126);
}

// The bounds' constants of a prepared row (its stats) for both parts of x (kParts 2) or the first alone (1).
template <int kParts>
struct Coef {
  float s1, s2, norm, err, fscale, abs, xnorm;
  explicit Coef(const double* st)
      : s1(static_cast<float>(st[kS1])), s2(kParts == 2 ? static_cast<float>(st[kS2]) : 0.0f),
        norm(static_cast<float>(st[kParts == 2 ? kCoefNorm : kCoefNorm1])),
        err(static_cast<float>(st[kParts == 2 ? kCoefErr : kCoefErr1])),
        fscale(static_cast<float>(st[kParts == 2 ? kCoefScale : kCoefScale1])), abs(static_cast<float>(st[kAbs])),
        xnorm(static_cast<float>(st[kXNorm])) {}
};

// The estimate a_v of row v's logit from its integer dots d1, d2 (row m's parts; d2 unread for one part).
template <int kParts>
KR_INLINE float estimate(const kr_cpu_head_screen* s, const Coef<kParts>& c, int64_t v, int32_t d1, int32_t d2) {
  const int32_t off = 128 * s->qsum[v];
  if constexpr (kParts == 1) return s->scale[v] * (c.s1 * static_cast<float>(d1 - off));
  return s->scale[v] * (c.s1 * static_cast<float>(d1 - off) + c.s2 * static_cast<float>(d2 - off));
}

// hi/lo of rows v of the block from their integer dots d1, d2 (row m's parts).
template <int kParts>
KR_INLINE void bounds(const kr_cpu_head_screen* s, const Coef<kParts>& c, int64_t v, int32_t d1, int32_t d2, float* hi,
                      float* lo) {
  const float a = estimate(s, c, v, d1, d2);
  const float r = (c.norm * s->wnorm[v] + c.err * s->err[v] + c.fscale * s->scale[v] + c.abs) * kInflate +
                  std::fabs(a) * (1.0f / 1048576.0f);
  const bool wide = !(c.xnorm * s->wnorm[v] <= kMaxNormProduct);
  *hi = wide ? __builtin_inff() : a + r, *lo = wide ? -__builtin_inff() : a - r;
}

// kEstimate: the estimates a_v into hi (NaN for a row marked for the whole head), lo unused; else the bounds.
template <bool kEstimate>
void screen_portable(const uint8_t* u, const double* stats, int64_t M, int64_t K, const kr_cpu_head_screen* s,
                     float* hi, float* lo, int64_t ld, int64_t n_begin, int64_t n_end) {
  const int64_t kp = s->kp;
  for (int64_t v = n_begin; v < n_end; ++v) {
    const int8_t* q = s->q + v * kp;
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* u1 = u + m * 2 * kp;
      const double* st = stats + m * KR_CPU_SCREEN_STATS;
      int32_t d1 = 0, d2 = 0;
      for (int64_t i = 0; i < K; ++i) d1 += u1[i] * q[i], d2 += u1[kp + i] * q[i];  // (q is 0 past K)
      if constexpr (kEstimate)
        hi[m * ld + v] = st[kValid] == 1.0 ? estimate(s, Coef<2>(st), v, d1, d2) : __builtin_nanf("");
      else
        bounds(s, Coef<2>(st), v, d1, d2, hi + m * ld + v, lo + m * ld + v);
    }
  }
}

// The running floors (kr_cpu_screen_rows with floors): floor m is a lower bound of prepared row m's largest logit,
// shared by the threads that screen the pass (any value a thread reads is one), raised to each block's largest lower
// bound.
inline float load_floor(const float* f) {
  float r;
  __atomic_load(f, &r, __ATOMIC_RELAXED);
  return r;
}

// floor = max(floor, top).
inline void raise_floor(float* floor, float top) {
  float cur = load_floor(floor);
  while (top > cur && !__atomic_compare_exchange(floor, &cur, &top, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

// The bounds with running floors: blocks of kFloorBlock rows of W from n_begin (the last one shorter), and for each
// prepared row m, every row's bounds from x's first part alone, those whose upper bound reaches floor m (as read at
// the block's start) from both parts instead, then floor m raised to the block's largest lower bound. A row the
// first part rules out never needs its second: its upper bound is below a lower bound of the largest logit.
void screen_floor_portable(const uint8_t* u, const double* stats, int64_t M, int64_t K, const kr_cpu_head_screen* s,
                           float* hi, float* lo, int64_t ld, int64_t n_begin, int64_t n_end, float* floors) {
  const int64_t kp = s->kp;
  for (int64_t v0 = n_begin; v0 < n_end; v0 += kFloorBlock) {
    const int64_t v1 = std::min(n_end, v0 + kFloorBlock);
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* u1 = u + m * 2 * kp;
      const double* st = stats + m * KR_CPU_SCREEN_STATS;
      const float floor = load_floor(floors + m);
      float top = -__builtin_inff();
      for (int64_t v = v0; v < v1; ++v) {
        const int8_t* q = s->q + v * kp;
        int32_t d1 = 0;
        for (int64_t i = 0; i < K; ++i) d1 += u1[i] * q[i];
        float h, l;
        bounds(s, Coef<1>(st), v, d1, 0, &h, &l);
        if (h >= floor) {
          int32_t d2 = 0;
          for (int64_t i = 0; i < K; ++i) d2 += u1[kp + i] * q[i];
          bounds(s, Coef<2>(st), v, d1, d2, &h, &l);
        }
        hi[m * ld + v] = h, lo[m * ld + v] = l;
        top = std::max(top, l);
      }
      raise_floor(floors + m, top);
    }
  }
}

#if KR_CPU_X86
#define KR_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))

bool cpu_has_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}

// Lane t of the result: the sum of v[t]'s 16 lanes (int32, exact in any order), by four rounds of shuffles and
// adds that halve the vectors, then a permute.
KR_TARGET_VNNI inline __m512 ps(__m512i a) { return _mm512_castsi512_ps(a); }
KR_TARGET_VNNI inline __m512i si(__m512 a) { return _mm512_castps_si512(a); }

KR_TARGET_VNNI inline __m512i hsum16(const __m512i* v) {
  __m512i x[8], z[4], w[2];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)
    z[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_epi32(si(_mm512_shuffle_ps(ps(z[2 * i]), ps(z[2 * i + 1]), _MM_SHUFFLE(1, 0, 1, 0))),
                            si(_mm512_shuffle_ps(ps(z[2 * i]), ps(z[2 * i + 1]), _MM_SHUFFLE(3, 2, 3, 2))));
  const __m512i t = _mm512_add_epi32(si(_mm512_shuffle_ps(ps(w[0]), ps(w[1]), _MM_SHUFFLE(2, 0, 2, 0))),
                                     si(_mm512_shuffle_ps(ps(w[0]), ps(w[1]), _MM_SHUFFLE(3, 1, 3, 1))));
  const __m512i where = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_epi32(where, t);
}

// estimate() of both parts on 8 rows v0..v0+7 at once, d1 in the low and d2 in the high half of d: the same
// operations per lane.
KR_TARGET_VNNI inline __m256 estimate8(const kr_cpu_head_screen* s, const Coef<2>& c, int64_t v0, __m512i d) {
  const __m256i off = _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s->qsum + v0)), 7);
  const __m256 f1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm512_castsi512_si256(d), off));
  const __m256 f2 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm512_extracti64x4_epi64(d, 1), off));
  const __m256 scale = _mm256_loadu_ps(s->scale + v0);
  return _mm256_mul_ps(scale, _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(c.s1), f1),
                                            _mm256_mul_ps(_mm256_set1_ps(c.s2), f2)));
}

// bounds() of both parts on 8 rows v0..v0+7 at once, as estimate8: the same operations per lane (the first part
// alone: first_part_bounds16).
KR_TARGET_VNNI inline void bounds8(const kr_cpu_head_screen* s, const Coef<2>& c, int64_t v0, __m512i d, __m256* hi,
                                   __m256* lo) {
  const __m256 scale = _mm256_loadu_ps(s->scale + v0);
  const __m256 a = estimate8(s, c, v0, d);
  __m256 r = _mm256_mul_ps(_mm256_set1_ps(c.norm), _mm256_loadu_ps(s->wnorm + v0));
  r = _mm256_add_ps(r, _mm256_mul_ps(_mm256_set1_ps(c.err), _mm256_loadu_ps(s->err + v0)));
  r = _mm256_add_ps(r, _mm256_mul_ps(_mm256_set1_ps(c.fscale), scale));
  r = _mm256_mul_ps(_mm256_add_ps(r, _mm256_set1_ps(c.abs)), _mm256_set1_ps(kInflate));
  const __m256 abs_a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a);
  r = _mm256_add_ps(r, _mm256_mul_ps(abs_a, _mm256_set1_ps(1.0f / 1048576.0f)));
  const __m256 product = _mm256_mul_ps(_mm256_set1_ps(c.xnorm), _mm256_loadu_ps(s->wnorm + v0));
  const __m256 wide = _mm256_cmp_ps(product, _mm256_set1_ps(kMaxNormProduct), _CMP_NLE_UQ);  // (as bounds())
  *hi = _mm256_blendv_ps(_mm256_add_ps(a, r), _mm256_set1_ps(__builtin_inff()), wide);
  *lo = _mm256_blendv_ps(_mm256_sub_ps(a, r), _mm256_set1_ps(-__builtin_inff()), wide);
}

// Rows v0 + j and v0 + j + 1 of W (at q) against the G prepared rows at u: their d1 and d2 into part[g * 2 * kBlock
// + j (+ 1)] and part[g * 2 * kBlock + kBlock + j (+ 1)], hsum16's order. Each 64-byte chunk of the two rows is loaded
// once for the G rows, and the rows' chunks stream in order, two rows at a time: on the Zen 4 host the stream of
// the head ran at ~20 GB/s in blocks of 8 rows read chunk by chunk (8 strided streams), the prepared rows after
// the first re-reading the block from L1 while no load went to memory.
enum class Ahead { kNone, kL1, kL2 };

template <int G, int kParts = 2>
KR_TARGET_VNNI KR_INLINE void screen_pair_vnni(const uint8_t* u, int64_t kp, const int8_t* q, Ahead ahead, int j,
                                                __m512i* part) {
  __m512i acc[G][2 * kParts];  // (d1 of row j, d1 of row j + 1, d2 of row j, d2 of row j + 1) of each prepared row
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < 2 * kParts; ++i) acc[g][i] = _mm512_setzero_si512();
  const uintptr_t at = reinterpret_cast<uintptr_t>(q);
  for (int64_t c = 0; c < kp; c += 64) {
    // (addresses formed as integers: near the end of the head they lie past it, where a prefetch is harmless but
    // pointer arithmetic would not be defined)
    if (ahead == Ahead::kL2) {
      _mm_prefetch(reinterpret_cast<const char*>(at + kAheadRowsL2 * kp + c), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(at + (kAheadRowsL2 + 1) * kp + c), _MM_HINT_T1);
    } else if (ahead == Ahead::kL1) {
      _mm_prefetch(reinterpret_cast<const char*>(at + kAheadRowsL1 * kp + c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(at + (kAheadRowsL1 + 1) * kp + c), _MM_HINT_T0);
    }
    const __m512i w0 = _mm512_loadu_si512(q + c), w1 = _mm512_loadu_si512(q + kp + c);
    for (int g = 0; g < G; ++g) {
      const uint8_t* ug = u + g * 2 * kp;
      const __m512i x1 = _mm512_loadu_si512(ug + c);
      acc[g][0] = _mm512_dpbusd_epi32(acc[g][0], x1, w0);
      acc[g][1] = _mm512_dpbusd_epi32(acc[g][1], x1, w1);
      if constexpr (kParts == 2) {
        const __m512i x2 = _mm512_loadu_si512(ug + kp + c);
        acc[g][2] = _mm512_dpbusd_epi32(acc[g][2], x2, w0);
        acc[g][3] = _mm512_dpbusd_epi32(acc[g][3], x2, w1);
      }
    }
  }
  for (int g = 0; g < G; ++g) {  // (the first part alone: rows j, j + 1 of the prepared row's 16 slots, j < 16)
    __m512i* pg = part + g * 2 * kBlock;
    pg[j] = acc[g][0], pg[j + 1] = acc[g][1];
    if constexpr (kParts == 2) pg[kBlock + j] = acc[g][2], pg[kBlock + j + 1] = acc[g][3];
  }
}

// The pairs of a block (q: its first row) against G prepared rows (u: the first's parts): both parts over kBlock rows,
// or the first part alone over kFloorBlock rows (a prepared row's 16 vectors then hold the 16 rows' d1).
template <int G, int kParts>
KR_TARGET_VNNI void screen_pairs_vnni(const uint8_t* u, int64_t kp, const int8_t* q, Ahead ahead, __m512i* part) {
  constexpr int rows = kParts == 2 ? kBlock : kFloorBlock;
  for (int j = 0; j < rows; j += 2) screen_pair_vnni<G, kParts>(u, kp, q + j * kp, ahead, j, part);
}

// kBlock rows of W against the M prepared rows, in groups of at most kGroupMax rows (one group up to kOneGroupMax:
// 4 accumulators a prepared row, 24 at 6, with the two weight chunks and x's two parts in the 32 registers); a
// group after the first re-reads the block from L1. The integer dots are exact, so any order gives the same bounds.
// With the first part alone (the running floors' pass), 2 accumulators a row: one group up to kOnePartGroupMax.
constexpr int kOneGroupMax = 6, kGroupMax = 4, kOnePartGroupMax = 8;

template <int kParts>
KR_TARGET_VNNI void screen_groups_vnni(int64_t g, const uint8_t* u, int64_t kp, const int8_t* q, Ahead ahead,
                                       __m512i* part) {
  switch (g) {
    case 1: return screen_pairs_vnni<1, kParts>(u, kp, q, ahead, part);
    case 2: return screen_pairs_vnni<2, kParts>(u, kp, q, ahead, part);
    case 3: return screen_pairs_vnni<3, kParts>(u, kp, q, ahead, part);
    case 4: return screen_pairs_vnni<4, kParts>(u, kp, q, ahead, part);
    case 5: return screen_pairs_vnni<5, kParts>(u, kp, q, ahead, part);
    case 6: return screen_pairs_vnni<6, kParts>(u, kp, q, ahead, part);
  }
  if constexpr (kParts == 1) {
    if (g == 7) return screen_pairs_vnni<7, 1>(u, kp, q, ahead, part);
    return screen_pairs_vnni<8, 1>(u, kp, q, ahead, part);
  }
}

template <bool kEstimate>
KR_TARGET_VNNI void screen_block_vnni(const uint8_t* u, const double* stats, int64_t M, const kr_cpu_head_screen* s,
                                      float* hi, float* lo, int64_t ld, int64_t v0, bool l2) {
  const int64_t kp = s->kp;
  const int8_t* q = s->q + v0 * kp;
  const int64_t group = M <= kOneGroupMax ? M : kGroupMax;
  __m512i part[kOneGroupMax * 2 * kBlock];
  for (int64_t m0 = 0; m0 < M; m0 += group) {
    const int64_t g = std::min(group, M - m0);
    const Ahead prefetch = m0 > 0 ? Ahead::kNone : l2 ? Ahead::kL2 : Ahead::kL1;  // (the first group's pass)
    screen_groups_vnni<2>(g, u + m0 * 2 * kp, kp, q, prefetch, part);
    for (int64_t i = 0; i < g; ++i) {
      const int64_t m = m0 + i;
      const double* st = stats + m * KR_CPU_SCREEN_STATS;
      if constexpr (kEstimate) {
        _mm256_storeu_ps(hi + m * ld + v0, st[kValid] == 1.0
                                               ? estimate8(s, Coef<2>(st), v0, hsum16(part + i * 2 * kBlock))
                                               : _mm256_set1_ps(__builtin_nanf("")));
      } else {
        __m256 h, l;
        bounds8(s, Coef<2>(st), v0, hsum16(part + i * 2 * kBlock), &h, &l);
        _mm256_storeu_ps(hi + m * ld + v0, h);
        _mm256_storeu_ps(lo + m * ld + v0, l);
      }
    }
  }
}

// bounds() of the first part alone on 16 rows v0..v0+15 at once (d: their d1): the same operations per lane.
KR_TARGET_VNNI inline void first_part_bounds16(const kr_cpu_head_screen* s, const Coef<1>& c, int64_t v0, __m512i d,
                                               __m512* hi, __m512* lo) {
  const __m512i off = _mm512_slli_epi32(_mm512_loadu_si512(s->qsum + v0), 7);
  const __m512 f1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(d, off));
  const __m512 scale = _mm512_loadu_ps(s->scale + v0), wnorm = _mm512_loadu_ps(s->wnorm + v0);
  const __m512 a = _mm512_mul_ps(scale, _mm512_mul_ps(_mm512_set1_ps(c.s1), f1));
  __m512 r = _mm512_mul_ps(_mm512_set1_ps(c.norm), wnorm);
  r = _mm512_add_ps(r, _mm512_mul_ps(_mm512_set1_ps(c.err), _mm512_loadu_ps(s->err + v0)));
  r = _mm512_add_ps(r, _mm512_mul_ps(_mm512_set1_ps(c.fscale), scale));
  r = _mm512_mul_ps(_mm512_add_ps(r, _mm512_set1_ps(c.abs)), _mm512_set1_ps(kInflate));
  r = _mm512_add_ps(r, _mm512_mul_ps(_mm512_abs_ps(a), _mm512_set1_ps(1.0f / 1048576.0f)));
  const __mmask16 wide =
      _mm512_cmp_ps_mask(_mm512_mul_ps(_mm512_set1_ps(c.xnorm), wnorm), _mm512_set1_ps(kMaxNormProduct), _CMP_NLE_UQ);
  *hi = _mm512_mask_blend_ps(wide, _mm512_add_ps(a, r), _mm512_set1_ps(__builtin_inff()));
  *lo = _mm512_mask_blend_ps(wide, _mm512_sub_ps(a, r), _mm512_set1_ps(-__builtin_inff()));
}

// v with its upper 8 lanes replaced by h.
KR_TARGET_VNNI inline __m512 upper(__m512 v, __m256 h) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(v), _mm256_castps_pd(h), 1));
}

// screen_floor_portable's block of kFloorBlock rows: the same integers, bounds and choices, so the same bits.
KR_TARGET_VNNI void screen_block_floor_vnni(const uint8_t* u, const double* stats, int64_t M,
                                            const kr_cpu_head_screen* s, float* hi, float* lo, int64_t ld, int64_t v0,
                                            bool l2, float* floors) {
  const int64_t kp = s->kp;
  const int8_t* q = s->q + v0 * kp;
  const int64_t group = M <= kOnePartGroupMax ? M : kGroupMax;
  __m512i part[kOnePartGroupMax * 2 * kBlock];
  __m512i both[2 * kBlock];
  for (int64_t m0 = 0; m0 < M; m0 += group) {
    const int64_t g = std::min(group, M - m0);
    const Ahead prefetch = m0 > 0 ? Ahead::kNone : l2 ? Ahead::kL2 : Ahead::kL1;  // (the first group's pass)
    screen_groups_vnni<1>(g, u + m0 * 2 * kp, kp, q, prefetch, part);
    for (int64_t i = 0; i < g; ++i) {
      const int64_t m = m0 + i;
      const double* st = stats + m * KR_CPU_SCREEN_STATS;
      const float floor = load_floor(floors + m);
      __m512 h, l;
      first_part_bounds16(s, Coef<1>(st), v0, hsum16(part + i * 2 * kBlock), &h, &l);
      const __mmask16 need = _mm512_cmp_ps_mask(h, _mm512_set1_ps(floor), _CMP_GE_OQ);
      for (int half = 0; half < 2; ++half) {  // both parts of this prepared row over the 8 rows (in L1 now)
        if (((need >> (half * kBlock)) & 0xffu) == 0) continue;
        screen_groups_vnni<2>(1, u + m * 2 * kp, kp, q + half * kBlock * kp, Ahead::kNone, both);
        __m256 h2, l2;
        bounds8(s, Coef<2>(st), v0 + half * kBlock, hsum16(both), &h2, &l2);
        const __mmask16 take = need & static_cast<__mmask16>(0xffu << (half * kBlock));
        const __m512 h2w = half == 0 ? _mm512_castps256_ps512(h2) : upper(h, h2);
        const __m512 l2w = half == 0 ? _mm512_castps256_ps512(l2) : upper(l, l2);
        h = _mm512_mask_blend_ps(take, h, h2w), l = _mm512_mask_blend_ps(take, l, l2w);
      }
      _mm512_storeu_ps(hi + m * ld + v0, h);
      _mm512_storeu_ps(lo + m * ld + v0, l);
      raise_floor(floors + m, _mm512_reduce_max_ps(l));  // (lo is never NaN: finite stats, or -inf where wide)
    }
  }
}

// Whole blocks of rows here (kBlock rows, or kFloorBlock with running floors); the last few rows by the portable
// loop: the same integers.
template <bool kEstimate>
KR_TARGET_VNNI int64_t screen_vnni(const uint8_t* u, const double* stats, int64_t M, const kr_cpu_head_screen* s,
                                   float* hi, float* lo, int64_t ld, int64_t n_begin, int64_t n_end, float* floors) {
  const bool l2 = kr_cpu_prefetch_target() == KR_CPU_PREFETCH_L2;
  int64_t v = n_begin;
  if (!kEstimate && floors != nullptr) {
    for (; v + kFloorBlock <= n_end; v += kFloorBlock)
      screen_block_floor_vnni(u, stats, M, s, hi, lo, ld, v, l2, floors);
    return v;
  }
  for (; v + kBlock <= n_end; v += kBlock) screen_block_vnni<kEstimate>(u, stats, M, s, hi, lo, ld, v, l2);
  return v;
}
#endif

// max of x[0..n) (n >= 1; a NaN lane is skipped, as by std::max(m, x)).
#if KR_CPU_X86
KR_TARGET_AVX512 float max_avx512(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-__builtin_inff());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(_mm512_loadu_ps(x + i), m);
  float r = _mm512_reduce_max_ps(m);
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
}
#endif

float max_of(int isa, const float* x, int64_t n) {
#if KR_CPU_X86
  if (isa >= KR_CPU_ISA_AVX512) return max_avx512(x, n);
#endif
  (void)isa;
  float r = -__builtin_inff();
  for (int64_t i = 0; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

// f(v) for each v in [0, n) with x[v] >= t, in increasing v.
#if KR_CPU_X86
template <typename F>
KR_TARGET_AVX512 void at_least_avx512(const float* x, int64_t n, float t, F&& f) {
  const __m512 tv = _mm512_set1_ps(t);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (uint32_t k = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), tv, _CMP_GE_OQ); k != 0; k &= k - 1)
      f(i + __builtin_ctz(k));
  }
  for (; i < n; ++i)
    if (x[i] >= t) f(i);
}
#endif

template <typename F>
void for_each_at_least(int isa, const float* x, int64_t n, float t, F&& f) {
#if KR_CPU_X86
  if (isa >= KR_CPU_ISA_AVX512) return at_least_avx512(x, n, t, f);
#endif
  (void)isa;
  for (int64_t i = 0; i < n; ++i)
    if (x[i] >= t) f(i);
}

// The logits of rows [v0, v1) of the head for x_row, as the pass computes them (the head's kernel, then rounded to
// the dtype), into out[v0..v1) (out: V floats). packed (bf16): the head in kr_cpu_pack_bf16's layout, where one row
// is computed with the 16 of its panel (a panel is a packed matrix of its own), the others' logits not stored.
int exact_logits(int isa, int dtype, const void* x_row, int64_t K, const void* head, bool packed, int64_t V,
                 int64_t v0, int64_t v1, float* out) {
  if (dtype == KR_CPU_FLOAT32)
    return kr_cpu_linear_rows_isa(isa, static_cast<const float*>(x_row), 1, K, K, head, KR_CPU_FLOAT32, V, nullptr,
                                  out, V, v0, v1);
  const uint16_t* x = static_cast<const uint16_t*>(x_row);
  const uint16_t* w = static_cast<const uint16_t*>(head);
  int rc = KR_CPU_OK;
  if (!packed) {
    rc = kr_cpu_linear_rows_bf16(isa, x, 1, K, K, w, V, nullptr, out, V, v0, v1);
  } else if (v0 == 0 && v1 == V) {
    rc = kr_cpu_linear_rows_bf16_packed(isa, x, 1, K, K, w, V, nullptr, out, V, 0, V);
  } else {
    constexpr int64_t P = KR_CPU_PACK_ROWS;
    const int64_t Kp = K + K % 2;
    float panel_out[P];
    for (int64_t v = v0; rc == KR_CPU_OK && v < v1; ++v) {
      const int64_t b = v / P, rows = std::min<int64_t>(P, V - b * P);
      rc = kr_cpu_linear_rows_bf16_packed(isa, x, 1, K, K, w + b * P * Kp, rows, nullptr, panel_out, rows, 0, rows);
      out[v] = panel_out[v - b * P];
    }
  }
  for (int64_t v = v0; rc == KR_CPU_OK && v < v1; ++v) {
    uint16_t bits = 0;
    rc = kr_cpu_round_bf16(isa, out + v, &bits, 1);
    out[v] = kr_cpu::bf16_bits_to_float(bits);
  }
  return rc;
}

}  // namespace

// Measured against the whole head and its argmax (benchmarks/bench_head_screen.py: SmolLM2's head shape, 2 threads,
// caches flushed between calls; the AMD EPYC, 2026-12-05, cpu-20261205-s16-head-screen): bf16 1 / 2 / 4 / 8 rows
// 0.59 / 0.60 / 0.69 / 0.85x the time, fp32 0.30 / 0.36 / 0.48 / 0.31x. Tried: the first part of x alone from two
// rows on (half the vpdpbusd; faster on random rows), but on SmolLM2's real hidden states its bounds leave a median
// of 107 and a 90th percentile of 6451 rows that can win, and Kangaroo's decoding took 1.074x the time.
extern "C" int64_t kr_cpu_screen_max_rows(int dtype) {
  (void)dtype;
  return 8;
}

extern "C" int kr_cpu_screen_prepare_rows(int dtype, const void* x, int64_t ldx, int64_t K, int64_t kp, uint8_t* u,
                                          double* stats, int64_t m_begin, int64_t m_end) {
  if (x == nullptr || u == nullptr || stats == nullptr || K <= 0 || kp < K || kp % 64 != 0 || kp > kMaxKp || ldx < K ||
      m_begin < 0 || m_end < m_begin || (dtype != KR_CPU_FLOAT32 && dtype != KR_CPU_BFLOAT16))
    return KR_CPU_BAD_ARGUMENT;
  for (int64_t m = m_begin; m < m_end; ++m) {
    if (dtype == KR_CPU_FLOAT32)
      prepare_row(static_cast<const float*>(x) + m * ldx, K, kp, u + m * 2 * kp, stats + m * KR_CPU_SCREEN_STATS);
    else
      prepare_row(static_cast<const uint16_t*>(x) + m * ldx, K, kp, u + m * 2 * kp, stats + m * KR_CPU_SCREEN_STATS);
  }
  return KR_CPU_OK;
}

namespace {

template <bool kEstimate>
int screen_or_estimate(int isa, const uint8_t* u, const double* stats, int64_t M, int64_t K,
                       const kr_cpu_head_screen* s, float* hi, float* lo, int64_t ld, int64_t n_begin, int64_t n_end,
                       float* floors) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (u == nullptr || stats == nullptr || s == nullptr || s->q == nullptr || s->scale == nullptr ||
      s->qsum == nullptr || (!kEstimate && (s->err == nullptr || s->wnorm == nullptr || lo == nullptr)) ||
      hi == nullptr || M < 0 || K <= 0 || s->kp < K || s->kp % 64 != 0 || s->kp > kMaxKp || n_begin < 0 ||
      n_end < n_begin || ld < n_end)
    return KR_CPU_BAD_ARGUMENT;
  if (M < kFloorMinRows) floors = nullptr;
#if KR_CPU_X86
  if (isa >= KR_CPU_ISA_AVX512 && cpu_has_vnni())
    n_begin = screen_vnni<kEstimate>(u, stats, M, s, hi, lo, ld, n_begin, n_end, floors);
#endif
  if (!kEstimate && floors != nullptr)
    screen_floor_portable(u, stats, M, K, s, hi, lo, ld, n_begin, n_end, floors);
  else
    screen_portable<kEstimate>(u, stats, M, K, s, hi, lo, ld, n_begin, n_end);
  return KR_CPU_OK;
}

}  // namespace

extern "C" int kr_cpu_screen_rows(int isa, const uint8_t* u, const double* stats, int64_t M, int64_t K,
                                  const kr_cpu_head_screen* s, float* hi, float* lo, int64_t ld, int64_t n_begin,
                                  int64_t n_end, float* floors) {
  return screen_or_estimate<false>(isa, u, stats, M, K, s, hi, lo, ld, n_begin, n_end, floors);
}

extern "C" int kr_cpu_screen_estimate_rows(int isa, const uint8_t* u, const double* stats, int64_t M, int64_t K,
                                           const kr_cpu_head_screen* s, float* y, int64_t ld, int64_t n_begin,
                                           int64_t n_end) {
  return screen_or_estimate<true>(isa, u, stats, M, K, s, y, nullptr, ld, n_begin, n_end, nullptr);
}

extern "C" int kr_cpu_screen_argmax_row(int isa, int dtype, const void* x_row, int64_t K, const void* head,
                                        int packed, int64_t V, const double* stats, const float* hi, float* lo, int64_t* index) {
  if (x_row == nullptr || head == nullptr || stats == nullptr || hi == nullptr || lo == nullptr ||
      index == nullptr || K <= 0 || V <= 0 || V >= (int64_t{1} << 31))
    return KR_CPU_BAD_ARGUMENT;
  float* ex = lo;  // the exact logits, over the lower bounds once their max is taken
  auto whole_head = [&]() -> int {
    const int rc = exact_logits(isa, dtype, x_row, K, head, packed != 0, V, 0, V, ex);
    return rc != KR_CPU_OK ? rc : kr_cpu_argmax_rows(isa, KR_CPU_FLOAT32, ex, V, V, index, nullptr, 0, 1);
  };
  if (stats[kValid] != 1.0) return whole_head();
  const float floor = max_of(isa, lo, V);  // the largest logit is at least this
  if (!std::isfinite(floor)) return whole_head();
  // the rows that can reach floor, computed exactly; their best, rounded as the pass rounds, is the row's best
  float best = -__builtin_inff();
  int rc = KR_CPU_OK;
  for_each_at_least(isa, hi, V, floor, [&](int64_t v) {
    if (rc == KR_CPU_OK) rc = exact_logits(isa, dtype, x_row, K, head, packed != 0, V, v, v + 1, ex);
    best = std::max(best, rc == KR_CPU_OK && std::isfinite(ex[v]) ? ex[v] : __builtin_inff());
  });
  if (rc != KR_CPU_OK) return rc;
  if (!(best != 0.0f) || !std::isfinite(best)) return whole_head();  // (a non-finite exact logit made best inf)
  // below this, a logit rounds to less than best (a conservative bound of its lower rounding boundary)
  const float boundary = best - std::fabs(best) * (dtype == KR_CPU_FLOAT32 ? 1.0f / 4194304.0f : 1.0f / 128.0f);
  int64_t at = -1;
  float top = -__builtin_inff();
  bool finite = true;
  for_each_at_least(isa, hi, V, boundary, [&](int64_t v) {
    if (!(hi[v] >= floor)) {  // not computed above
      if (rc == KR_CPU_OK) rc = exact_logits(isa, dtype, x_row, K, head, packed != 0, V, v, v + 1, ex);
      finite = finite && std::isfinite(ex[v]);
    }
    if (ex[v] > top) top = ex[v], at = v;
  });
  if (rc != KR_CPU_OK) return rc;
  if (!finite) return whole_head();
  if (at < 0) return whole_head();  // (cannot happen: best's own row is in)
  *index = at;
  return KR_CPU_OK;
}
