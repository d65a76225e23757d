// CPU linear kernel of a bf16 model's decode path: y = x W^T (+ bias) for a handful of bf16 activation rows with
// bf16 weights, fp32 accumulation (the fp32 kernel, its memory layout and its reduction order: linear.cpp).
//
// The reduction order (kr_cpu_linear_rows_bf16 and its packed twin; linear.cpp's fp32 activations have their own):
// each output element is one chain of fused multiply-adds over the pairs of k's, from 0: for p = 0, 1, ...,
// ceil(K / 2) - 1, first k = 2p + 1 (zero past K) and then k = 2p, with denormal inputs read as zero and denormal
// results flushed to zero (DAZ + FTZ), then the bias. That is what AVX512-BF16's vdpbf16ps does to one fp32 lane
// given a pair of w and a pair of x, so that with 16 rows of W in the lanes (the packed layout, kr_cpu.h) and the
// activation's pair broadcast, one instruction takes a step of 16 output elements' chains, and no lane sums are
// needed at the end. The instruction's per-lane order (odd product, then even, each a fused multiply-add under
// DAZ + FTZ) was checked bit for bit on 32 M random lanes (random bit patterns included) on the AMD EPYC of
// 2026-12-04. The other variants perform the same sequence (AVX-512 and AVX2 with two FMAs on the odd and even
// halves of each pair under the MXCSR's DAZ + FTZ; portable C++ with explicit flushes), so every variant gives the
// same bits, for any number of rows, any row's place among them, and any split of the output rows.
//
// Until 2026-12-06 the lanes ran along K (16 partial sums per output element and a 16 -> 1 tree at the end), which
// needs no layout of its own; measured on the 2-core Zen 4 EPYC (a scratch harness, SmolLM2's matrices, bf16, 2
// threads), the rows in the lanes took the in-cache 2-8 row passes from 69-109 to 144-217 G multiply-adds a second
// (83-94% of vdpbf16ps's peak), and the whole model's cold stream at 5-7 rows from 18-26 to 24-31 GB/s, one row the
// same. docs/design.md has the measurements.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kr_cpu_linear.h"  // (kr_cpu.h, the intrinsics, and the argument checks both linear kernels share)

namespace {

using kr_cpu::flush_denormal;
using kr_cpu::fma_ftz;
using kr_cpu_linear::bad_rows_args;
using kr_cpu_linear::cpu_runs;

constexpr int64_t P = KR_CPU_PACK_ROWS;  // rows of W in a panel: the lanes of a step

inline int64_t pairs_of(int64_t K) { return (K + 1) / 2; }

// The pair p of a bf16 row of K values as 32 bits: k = 2p low, k = 2p + 1 high (zero past K).
KR_INLINE uint32_t pair_at(const uint16_t* row, int64_t K, int64_t p) {
  const uint32_t lo = row[2 * p];
  const uint32_t hi = 2 * p + 1 < K ? row[2 * p + 1] : 0u;
  return lo | (hi << 16);
}

// The packed layout's panel b: its row count (16, or what is left for the last one; it starts at 16 b K2 words).
KR_INLINE int64_t panel_rows(int64_t N, int64_t b) { return std::min<int64_t>(P, N - b * P); }

// ----- portable: the chain per output element, explicit flushes.

KR_INLINE float chain_step(float acc, uint32_t w, uint32_t x) {
  acc = fma_ftz(kr_cpu::bf16_bits_to_float(static_cast<uint16_t>(w >> 16)),
                kr_cpu::bf16_bits_to_float(static_cast<uint16_t>(x >> 16)), acc);
  return fma_ftz(kr_cpu::bf16_bits_to_float(static_cast<uint16_t>(w & 0xffffu)),
                 kr_cpu::bf16_bits_to_float(static_cast<uint16_t>(x & 0xffffu)), acc);
}

KR_INLINE float add_bias(float s, const float* bias, int64_t n) {
  return bias != nullptr ? flush_denormal(flush_denormal(s) + flush_denormal(bias[n])) : s;
}

void panels_portable(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint32_t* w, int64_t N,
                     const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const int64_t K2 = pairs_of(K);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t b = n / P, lane = n % P, rows = panel_rows(N, b);
    const uint32_t* panel = w + b * P * K2;
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* xr = x + m * ldx;
      float acc = 0.0f;
      for (int64_t p = 0; p < K2; ++p) acc = chain_step(acc, panel[p * rows + lane], pair_at(xr, K, p));
      y[m * ldy + n] = add_bias(acc, bias, n);
    }
  }
}

#if KR_CPU_X86

// The pair p of row m of x (bf16, row stride ldx, K even or padded) as 32 bits.
KR_INLINE uint32_t x_pair(const uint16_t* x, int64_t ldx, int m, int64_t p) {
  uint32_t v;
  std::memcpy(&v, x + m * ldx + 2 * p, sizeof v);
  return v;
}

// Rows of x whose K is odd, copied with a zero after each row's last value (so that the last pair reads no value
// past the row); an even K reads x in place.
struct PaddedRows {
  std::vector<uint16_t> v;
  const uint16_t* of(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, int64_t& ld) {
    if (K % 2 == 0) return ld = ldx, x;
    ld = K + 1;
    v.assign(static_cast<size_t>(M * ld), 0);
    for (int64_t m = 0; m < M; ++m)
      std::memcpy(v.data() + m * ld, x + m * ldx, static_cast<size_t>(K) * sizeof(uint16_t));
    return v.data();
  }
};

// NV full panels (or one panel of `rows` < 16 rows: kPart) by R activation rows: acc[v][m] lane l is y[m, 16v + l]
// of the group.
// kHw: vdpbf16ps with the pair broadcast; otherwise the odd then the even halves as two FMAs (under the caller's
// DAZ + FTZ: the same bits).
// kAhead > 0: each full panel's line kAhead steps (64 bytes a step) ahead is prefetched at every step, into L2 (T1)
// with kL2, else non-temporal (NTA), as kr_cpu_prefetch_target() and the row count say (kr_cpu_linear.h).
template <int NV, int R, bool kHw, bool kPart, int kAhead = 0, bool kL2 = false>
KR_TARGET_AVX512_BF16 inline void panels_avx512(const uint16_t* x, int64_t ldx, int64_t K2, const uint32_t* w, int rows,
                                                const float* bias, float* y, int64_t ldy) {
  __m512 acc[NV][R];
  for (int v = 0; v < NV; ++v)
    for (int m = 0; m < R; ++m) acc[v][m] = _mm512_setzero_ps();
  const __mmask16 mask = kPart ? static_cast<__mmask16>((1u << rows) - 1u) : static_cast<__mmask16>(0xffff);
  const int64_t stride = kPart ? rows : P;
  for (int64_t p = 0; p < K2; ++p) {
    if constexpr (kAhead > 0 && !kPart) {
      // (past the last panel the line is not W's: a prefetch never faults)
      for (int v = 0; v < NV; ++v)
        _mm_prefetch(reinterpret_cast<const char*>(w + v * P * K2 + (p + kAhead) * P),
                     kL2 ? _MM_HINT_T1 : _MM_HINT_NTA);
    }
    // each activation pair broadcast once a step, then each panel's 64 bytes loaded once and used by every row (in
    // that order GCC keeps both in registers; with the rows outer it loaded each panel's vector again for every row)
    __m512i xb[R];
    for (int m = 0; m < R; ++m) xb[m] = _mm512_set1_epi32(static_cast<int>(x_pair(x, ldx, m, p)));
    for (int v = 0; v < NV; ++v) {
      const __m512i wv =
          kPart ? _mm512_maskz_loadu_epi32(mask, w + p * stride) : _mm512_loadu_si512(w + v * P * K2 + p * P);
      for (int m = 0; m < R; ++m) acc[v][m] = kr_cpu::dp_pairs<kHw>(acc[v][m], wv, xb[m]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const __m512 b = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, bias + v * P);
    for (int m = 0; m < R; ++m) {
      const __m512 s = bias == nullptr ? acc[v][m] : _mm512_add_ps(acc[v][m], b);
      if (kPart)
        _mm512_mask_storeu_ps(y + m * ldy, mask, s);
      else
        _mm512_storeu_ps(y + m * ldy + v * P, s);
    }
  }
}

// R activation rows (1 <= r <= R) over the panels [b_begin, b_end): groups of NV full panels, then single ones, the
// last possibly partial.
template <int NV, int R, bool kHw, int kAhead, bool kL2>
KR_TARGET_AVX512_BF16 void row_group_avx512(int r, const uint16_t* x, int64_t ldx, int64_t K2, const uint32_t* w,
                                            int64_t N, const float* bias, float* y, int64_t ldy, int64_t b_begin,
                                            int64_t b_end) {
  if constexpr (R > 1) {
    if (r < R) return row_group_avx512<NV, R - 1, kHw, kAhead, kL2>(r, x, ldx, K2, w, N, bias, y, ldy, b_begin, b_end);
  }
  int64_t b = b_begin;
  const int64_t full_end = std::min(b_end, N / P);
  for (; b + NV <= full_end; b += NV)
    panels_avx512<NV, R, kHw, false, kAhead, kL2>(x, ldx, K2, w + b * P * K2, P, bias ? bias + b * P : nullptr,
                                                  y + b * P, ldy);
  for (; b < full_end; ++b)
    panels_avx512<1, R, kHw, false, kAhead, kL2>(x, ldx, K2, w + b * P * K2, P, bias ? bias + b * P : nullptr,
                                                 y + b * P, ldy);
  if (b < b_end)
    panels_avx512<1, R, kHw, true>(x, ldx, K2, w + b * P * K2, static_cast<int>(panel_rows(N, b)),
                                   bias ? bias + b * P : nullptr, y + b * P, ldy);
}

// The row counts' groups: up to 6 rows in one group of 4 panels (24 accumulators), 7-8 in one of 2 panels, more in
// balanced groups of at most 8 over 2 panels at a time (the panels re-read from cache for each group, not memory).
// Measured (scratch harness, 2-core Zen 4, in cache): 4 panels 184-213 G multiply-adds a second at 1-6 rows against
// 138-213 for 2; 2 panels 199-215 at 7-8 rows against 191-198 for 4 (28-32 accumulators: spills).
template <bool kHw, int kAhead, bool kL2>
KR_TARGET_AVX512_BF16 void panels_rows_avx512_hint(const uint16_t* x, int64_t ldx, int64_t M, int64_t K2,
                                                   const uint32_t* w, int64_t N, const float* bias, float* y,
                                                   int64_t ldy, int64_t b_begin, int64_t b_end) {
  const int r = static_cast<int>(M);
  if (M <= 6) return row_group_avx512<4, 6, kHw, kAhead, kL2>(r, x, ldx, K2, w, N, bias, y, ldy, b_begin, b_end);
  if (M <= 8) return row_group_avx512<2, 8, kHw, kAhead, kL2>(r, x, ldx, K2, w, N, bias, y, ldy, b_begin, b_end);
  const int64_t groups = (M + 7) / 8;
  constexpr int64_t kStep = 2;  // panels a trip, every group over them before the next
  for (int64_t b = b_begin; b < b_end; b += kStep) {
    const int64_t b1 = std::min(b_end, b + kStep);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t m0 = M * g / groups, m1 = M * (g + 1) / groups;
      row_group_avx512<2, 8, kHw, kAhead, kL2>(static_cast<int>(m1 - m0), x + m0 * ldx, ldx, K2, w, N, bias,
                                               y + m0 * ldy, ldy, b, b1);
    }
  }
}

// The software prefetch: from kMinRowsAhead rows on, each panel's line kAheadSteps steps (4.5 KB) ahead, into L2 (T1)
// where kr_cpu_prefetch_target() says L2, else non-temporal; fewer rows leave the stream to the hardware. Measured on
// the 2-core Zen 4 EPYC (the layer stack and head in one process against the K-in-lanes build, a slow spell): without
// any prefetch 1-2 rows took 0.86-0.91x its time and 4-8 rows 1.09-1.22x; with T1 at every row count 1-2 rows took
// 1.01-1.11x and 3-8 rows 0.95-1.05x; with it from 3 rows on, 0.87-0.99x at 1-7 rows and 1.03x at 8.
constexpr int kAheadSteps = 72;
constexpr int64_t kMinRowsAhead = 3;

template <bool kHw>
KR_TARGET_AVX512_BF16 void panels_rows_avx512(const uint16_t* x, int64_t ldx, int64_t M, int64_t K2, const uint32_t* w,
                                              int64_t N, const float* bias, float* y, int64_t ldy, int64_t b_begin,
                                              int64_t b_end) {
  if (M < kMinRowsAhead)
    panels_rows_avx512_hint<kHw, 0, false>(x, ldx, M, K2, w, N, bias, y, ldy, b_begin, b_end);
  else if (kr_cpu_prefetch_target() == KR_CPU_PREFETCH_L2)
    panels_rows_avx512_hint<kHw, kAheadSteps, true>(x, ldx, M, K2, w, N, bias, y, ldy, b_begin, b_end);
  else
    panels_rows_avx512_hint<kHw, kAheadSteps, false>(x, ldx, M, K2, w, N, bias, y, ldy, b_begin, b_end);
}

// AVX2: a panel's lanes 0-7 and 8-15 as two halves, one panel and up to 2 rows at a time, two FMAs a pair.
template <int R>
KR_TARGET_AVX2 void panel_avx2(const uint16_t* x, int64_t ldx, int64_t K2, const uint32_t* w, int rows,
                               const float* bias, float* y, int64_t ldy) {
  const int64_t stride = rows;  // (a full panel: P)
  alignas(32) int32_t lane_on[16];
  for (int l = 0; l < 16; ++l) lane_on[l] = l < rows ? -1 : 0;
  const __m256i on_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_on));
  const __m256i on_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_on + 8));
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 lo[R], hi[R];
  for (int m = 0; m < R; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
  for (int64_t p = 0; p < K2; ++p) {
    const int* at = reinterpret_cast<const int*>(w + p * stride);
    const __m256i wl = _mm256_maskload_epi32(at, on_lo), wh = _mm256_maskload_epi32(at + 8, on_hi);
    const __m256 wlo = _mm256_castsi256_ps(_mm256_and_si256(wl, high));  // lanes 0-7: odd halves, then even
    const __m256 wle = _mm256_castsi256_ps(_mm256_slli_epi32(wl, 16));
    const __m256 who = _mm256_castsi256_ps(_mm256_and_si256(wh, high));  // lanes 8-15
    const __m256 whe = _mm256_castsi256_ps(_mm256_slli_epi32(wh, 16));
    for (int m = 0; m < R; ++m) {
      const uint32_t pair = x_pair(x, ldx, m, p);
      const __m256 xo = _mm256_set1_ps(kr_cpu::bf16_bits_to_float(static_cast<uint16_t>(pair >> 16)));
      const __m256 xe = _mm256_set1_ps(kr_cpu::bf16_bits_to_float(static_cast<uint16_t>(pair & 0xffffu)));
      lo[m] = _mm256_fmadd_ps(wlo, xo, lo[m]);
      lo[m] = _mm256_fmadd_ps(wle, xe, lo[m]);
      hi[m] = _mm256_fmadd_ps(who, xo, hi[m]);
      hi[m] = _mm256_fmadd_ps(whe, xe, hi[m]);
    }
  }
  for (int m = 0; m < R; ++m) {
    alignas(32) float s[16];
    _mm256_store_ps(s, lo[m]);
    _mm256_store_ps(s + 8, hi[m]);
    for (int l = 0; l < rows; ++l) y[m * ldy + l] = bias != nullptr ? s[l] + bias[l] : s[l];
  }
}

KR_TARGET_AVX2 void panels_rows_avx2(const uint16_t* x, int64_t ldx, int64_t M, int64_t K2, const uint32_t* w,
                                     int64_t N, const float* bias, float* y, int64_t ldy, int64_t b_begin,
                                     int64_t b_end) {
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int rows = static_cast<int>(panel_rows(N, b));
    const float* bb = bias != nullptr ? bias + b * P : nullptr;
    for (int64_t m = 0; m < M; m += 2) {
      if (M - m >= 2)
        panel_avx2<2>(x + m * ldx, ldx, K2, w + b * P * K2, rows, bb, y + m * ldy + b * P, ldy);
      else
        panel_avx2<1>(x + m * ldx, ldx, K2, w + b * P * K2, rows, bb, y + m * ldy + b * P, ldy);
    }
  }
}

#endif  // KR_CPU_X86

// Panels [b_begin, b_end) of packed W with the variant isa (the caller checked it runs here).
void run_panels(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint32_t* w, int64_t N,
                const float* bias, float* y, int64_t ldy, int64_t b_begin, int64_t b_end) {
#if KR_CPU_X86
  if (isa != KR_CPU_ISA_PORTABLE) {
    static thread_local PaddedRows padded;
    int64_t ld = 0;
    const uint16_t* xr = padded.of(x, M, K, ldx, ld);
    const int64_t K2 = pairs_of(K);
    const kr_cpu::FlushDenormals flush;
    if (isa == KR_CPU_ISA_AVX512_BF16)
      panels_rows_avx512<true>(xr, ld, M, K2, w, N, bias, y, ldy, b_begin, b_end);
    else if (isa == KR_CPU_ISA_AVX512)
      panels_rows_avx512<false>(xr, ld, M, K2, w, N, bias, y, ldy, b_begin, b_end);
    else
      panels_rows_avx2(xr, ld, M, K2, w, N, bias, y, ldy, b_begin, b_end);
    return;
  }
#endif
  panels_portable(x, M, K, ldx, w, N, bias, y, ldy, b_begin * P, std::min(N, b_end * P));
}

bool bad_packed_range(int64_t N, int64_t n_begin, int64_t n_end) {
  return n_begin % P != 0 || (n_end % P != 0 && n_end != N);
}

}  // namespace

extern "C" {

void kr_cpu_pack_bf16(const uint16_t* w, int64_t N, int64_t K, uint16_t* out) {
  const int64_t K2 = pairs_of(K);
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  for (int64_t b = 0; b * P < N; ++b) {
    const int64_t rows = panel_rows(N, b);
    uint32_t* panel = o + b * P * K2;
    const uint16_t* first = w + b * P * K;
    if (K % 2 == 0) {  // (the pairs read in place: the writes go in order, the reads along the panel's rows)
      for (int64_t p = 0; p < K2; ++p)
        for (int64_t l = 0; l < rows; ++l) std::memcpy(panel + p * rows + l, first + l * K + 2 * p, sizeof(uint32_t));
    } else {
      for (int64_t p = 0; p < K2; ++p)
        for (int64_t l = 0; l < rows; ++l) panel[p * rows + l] = pair_at(first + l * K, K, p);
    }
  }
}

int kr_cpu_linear_rows_bf16_packed(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w,
                                   int64_t N, const float* bias, float* y, int64_t ldy, int64_t n_begin,
                                   int64_t n_end) {
  if (!cpu_runs(isa)) return KR_CPU_BAD_ISA;
  if (bad_rows_args(M, K, ldx, N, ldy, n_begin, n_end) || bad_packed_range(N, n_begin, n_end))
    return KR_CPU_BAD_ARGUMENT;
  if (M == 0 || n_begin == n_end) return KR_CPU_OK;
  if (y == nullptr || (K > 0 && (x == nullptr || w == nullptr))) return KR_CPU_BAD_ARGUMENT;
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(w);
  for (int64_t m0 = 0; m0 < M; m0 += KR_CPU_MAX_ROWS_PER_PASS) {  // passes as in kr_cpu_linear_rows_isa
    const int64_t rows = std::min<int64_t>(KR_CPU_MAX_ROWS_PER_PASS, M - m0);
    run_panels(isa, x + m0 * ldx, rows, K, ldx, wp, N, bias, y + m0 * ldy, ldy, n_begin / P, (n_end + P - 1) / P);
  }
  return KR_CPU_OK;
}

int kr_cpu_linear_rows_bf16(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w,
                            int64_t N, const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  if (!cpu_runs(isa)) return KR_CPU_BAD_ISA;
  if (bad_rows_args(M, K, ldx, N, ldy, n_begin, n_end)) return KR_CPU_BAD_ARGUMENT;
  if (M == 0 || n_begin == n_end) return KR_CPU_OK;
  if (y == nullptr || (K > 0 && (x == nullptr || w == nullptr))) return KR_CPU_BAD_ARGUMENT;
  // Row-major W: each run of up to kRun rows packed into a scratch panel set first (the same operations per output
  // element, so the same bits; the rows stream as separate runs, slower than W packed once: kr_cpu.h).
  constexpr int64_t kRun = 4 * P;
  static thread_local std::vector<uint16_t> scratch;
  const int64_t Kp = 2 * pairs_of(K);
  scratch.resize(static_cast<size_t>(kRun * Kp));
  for (int64_t n = n_begin; n < n_end; n += kRun) {
    const int64_t rows = std::min(kRun, n_end - n);
    kr_cpu_pack_bf16(w + n * K, rows, K, scratch.data());
    const int rc = kr_cpu_linear_rows_bf16_packed(isa, x, M, K, ldx, scratch.data(), rows,
                                                  bias != nullptr ? bias + n : nullptr, y + n, ldy, 0, rows);
    if (rc != KR_CPU_OK) return rc;
  }
  return KR_CPU_OK;
}

}  // extern "C"
