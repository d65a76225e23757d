// Pieces of the CPU linear kernel with fp32 activations, linear.cpp (fp32 or bf16 weights; internal: not part of the
// C ABI of kr_cpu.h): the register blocks' row loop with its software prefetch of the weights, and the lane sums
// that store a tile (see linear.cpp for the reduction order). Until 2026-12-06 the bf16 x bf16 kernel
// (linear_bf16.cpp) shared them too: the measurements below that name bf16 rows or "2-row blocks" were made on its
// K-in-lanes blocks, which its packed panels (rows of W in the lanes) have replaced.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kr_cpu.h"
#include "kr_cpu_avx512.h"
#include "kr_cpu_common.h"

namespace kr_cpu_linear {
namespace {  // internal linkage in each kernel file, as when this was part of linear.cpp (the same code)

// Whether this CPU runs a variant (isa.cpp).
inline bool cpu_runs(int isa) { return kr_cpu_isa_supported(isa) != 0; }

inline bool bad_rows_args(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t ldy, int64_t n_begin, int64_t n_end) {
  return M < 0 || K < 0 || N < 0 || n_begin < 0 || n_end < n_begin || n_end > N || (M > 1 && ldx < K) ||
         (M > 1 && ldy < n_end);
}

#if KR_CPU_X86

// Register blocks: NB rows of W by MB activation rows, one accumulator (two ymm halves on AVX2) per pair.
// AVX-512: 16 accumulators, 4 x and 1 w register; AVX2 (16 ymm): 12 accumulators, 3 x and 1 w.
constexpr int kNbAvx512 = 4, kMbAvx512 = 4;
// Software prefetch of the weights this many blocks ahead: the AVX2 paths and the packed layout's; the AVX-512
// paths now go kPrefetchBytes ahead (below). History (measured with the T1 hint: 2 beats 0, 1 and 4;
// prefetching into L1 with T0 evicts the block being read when K is large). The hint is NTA, non-temporal, on the
// Zen 5 host: against T1 (into L2), bench_ab --in-process (SmolLM2's matrices, bf16, 2 threads, context 600, two
// runs of 3 and 5 rounds) measured verify steps over 3 / 4 / 5 tokens 0.89-0.95 / 0.92-0.93 / 0.95x, the 3-5 row
// sweeps 0.87-0.97x, the 8-row sweep 0.95x (fp32 0.86x). On the Zen 4 host T1 is the faster one from 3 rows and in
// fp32 (kL2MinRowsBf16 below, kr_cpu_prefetch_target()). One bf16 row: the 2-row blocks with kPrefetchBytesFewBf16
// since 2026-12-06 (the
// packed layout's: kAheadOneRow). A second, far prefetch (T1 16 KB or T2 32 KB
// ahead, a block's lines at each block's start) made 2-8 rows 1.04-1.16x slower (no performance counters here to
// say why; a software prefetch that misses holds one of the L1's miss buffers, which the stream's loads need too).
constexpr int kPrefetchBlocks = 2;
// The AVX-512 paths that prefetch go about this many bytes ahead, in whole blocks (at least one): fp32 with any
// rows, bf16 with 8 or more (bf16 with 1-7 rows, in the 2-row blocks: kPrefetchBytesFewBf16, linear_bf16.cpp, since
// 2026-12-06). As measured on the Zen 5 host when bf16 2-8 rows took it: SmolLM2's bf16 2-row blocks 4 ahead for
// K = 576 (9.2 KB) and 2 for K = 1536 (12.3 KB), its 4-row blocks 2 (9.2 KB) and 1 (12.3 KB), its fp32 4-row blocks
// 1 (9.2 KB and 24.6 KB), where kPrefetchBlocks had put the bf16 2-row blocks only 4.6 KB ahead for K = 576 and the
// others 18-49 KB ahead. Measured with bench_ab
// --in-process against the 2-block build (SmolLM2's matrices, 2 threads, context 600), the third of the repeats
// where the host was fastest / slowest:
//   bf16 (300 repeats, cpu-20261205-s15-prefetch-bytes; plain step 5.0 / 7.4 ms): 2-4 row passes 0.948-0.974x /
//   1.008-1.022x, 5-8 rows 0.955-0.979x / 0.967-0.994x, verify steps over 2-5 tokens 0.966-0.974x / 1.002-1.022x,
//   the unchanged plain step 1.009x / 1.018x (the noise);
//   fp32 (150 repeats, cpu-20261205-s15-prefetch-bytes-fp32; plain step 9.7 / 13.1 ms): passes of 1-8 rows
//   0.947-0.994x / 0.962-0.994x, the plain step 0.981x / 1.002x, verify steps over 2-5 tokens 0.959-0.972x /
//   0.977-1.005x.
// Scratch runs: the bf16 2-row blocks alone 3 or 4 ahead at every K, 0.96x in the fast phase, 4 ahead 1.01-1.02x
// slower in the slow one; 3 blocks of 4 rows made bf16 5-8 rows 1.02-1.03x slower; one bf16 row (kAheadOneRow) 1
// block ahead (9.2 KB) 1.10-1.12x slower in the fast third.
constexpr int64_t kPrefetchBytes = 9 * 1024;

// Where the target is L2 (kr_cpu_prefetch_target(): the Zen 4 host), passes over fp32 weights, and over bf16
// weights with this many activation rows or more, prefetch into L2 (T1); fewer rows over bf16 weights stay
// non-temporal (NTA). There, over SmolLM2's
// matrices in 2 MB pages (a scratch harness loading the builds in one process, 12 repeats), T1 took 0.88-0.93x NTA's
// time at 5-8 bf16 rows and 0.58-0.70x at 5-8 fp32 rows, where the arithmetic per weight byte had held the NTA stream
// back, but 1.05-1.11x at one bf16 row and 1.01-1.09x at two (fp32 0.97x and 1.02-1.06x, within the noise; with NTA
// below 3 fp32 rows, bench_ab measured the fp32 one-row pass 1.17-1.22x slower, with T1 0.88-0.93x: docs/design.md).
constexpr int64_t kL2MinRowsBf16 = 3;

// The whole blocks nearest to bytes ahead, at least one.
inline int ahead_blocks(int64_t bytes, int64_t block_bytes) {
  return static_cast<int>(std::max<int64_t>(1, (bytes + block_bytes / 2) / std::max<int64_t>(1, block_bytes)));
}

// Software prefetch (NTA, or T1 where kr_cpu_prefetch_target() says L2: above) of the block a few ahead of the
// current one (kPrefetchBlocks, or the blocks nearest to a
// distance in bytes). The register groups of a block (one per MB activation rows) each take an equal slice of it,
// spread over their K loop, so that requests go out at an even rate whatever M. The rate is fixed-point bytes per k,
// set once a call: a division per chunk (or per block) costs as much as a few-row chunk's arithmetic. The even spread
// matters: the whole block ahead requested during the first group instead (bench_ab --in-process, 2026-12-06,
// cpu-20261206-s20-prefetch-front) made 7 / 8 / 16 row passes 1.09 / 1.13-1.15 / 1.36-1.46x slower in fp32 and
// 1.03-1.09 / 1.10-1.12 / 1.33-1.43x in bf16. So does every line: a request for every other line only (leaving the
// rest to the hardware prefetchers) made 1-8 row passes 1.16-1.65x slower in fp32 and 2-8 rows 1.75-2.1x in bf16
// (cpu-20261206-s20-prefetch-half; bf16's one row, which then did not prefetch, unchanged).
struct Prefetch {
  const char* begin = nullptr;  // nullptr: nothing to prefetch
  int64_t rate = 0;             // the slice's bytes * 2^16 / K
  int64_t issued = 0;
  bool l2 = false;              // T1 (kr_cpu_prefetch_target() == KR_CPU_PREFETCH_L2) instead of NTA

  // The slice [lo, lo + bytes of rate) of the block ahead; nothing when W (tail_bytes from the block's start on) ends
  // before it.
  static Prefetch slice(const void* block, int64_t block_bytes, int64_t tail_bytes, int64_t lo, int64_t rate,
                        int ahead, bool l2) {
    Prefetch p;
    if (ahead == 0 || (ahead + 1) * block_bytes > tail_bytes) return p;
    p.begin = static_cast<const char*>(block) + ahead * block_bytes + lo;
    p.rate = rate;
    p.l2 = l2;
    return p;
  }

  // After the step that ends at k: the slice's first k / K has been requested.
  KR_TARGET_AVX2 inline void step(int64_t k) {
    if (begin == nullptr) return;
    const int64_t until = (rate * k) >> 16;
    if (l2) {
      for (; issued < until; issued += 64) _mm_prefetch(begin + issued, _MM_HINT_T1);
    } else {
      for (; issued < until; issued += 64) _mm_prefetch(begin + issued, _MM_HINT_NTA);
    }
  }
};

// The row loop every SIMD variant shares: blocks of NB rows of W, each run against the activation rows in groups
// of at most MB (Group(mb, x, ldx, w, prefetch, K, bias, y, ldy) with 1 <= mb <= MB), the block kAhead ahead (or
// ahead_blocks(kAheadBytes) when that is set) requested along the way; the last (n_end - n_begin) % NB rows one at
// a time (Single, no prefetch). Inlined into each variant's rows function, so that the group functions, of the same
// target, inline as well.
template <int NB, int MB, typename XT, typename WT, auto Group, auto Single, int kAhead = kPrefetchBlocks,
          int64_t kAheadBytes = 0>
KR_INLINE void for_each_group(const XT* x, int64_t M, int64_t K, int64_t ldx, const WT* w, int64_t N,
                              const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  // The groups' first rows and slices of the block ahead, computed once a call: a division per block costs as much
  // as a few-row block's stores (measured: 3-4 rows 8-17% slower with two divisions a block). Full groups then the
  // rest: groups of equal size instead (2 + 3 rows for 5, 3 + 3 + 3 for 9) measured 0.97-1.03x, the same within the
  // noise (bench_ab --in-process, 2026-12-06, cpu-20261206-s20-balanced-groups).
  constexpr int64_t kMaxGroups = (KR_CPU_MAX_ROWS_PER_PASS + MB - 1) / MB;
  const int64_t groups = std::min<int64_t>(kMaxGroups, (M + MB - 1) / MB);  // (M <= KR_CPU_MAX_ROWS_PER_PASS)
  const int64_t block_bytes = NB * K * static_cast<int64_t>(sizeof(WT));
  int64_t m_at[kMaxGroups + 1], pf_at[kMaxGroups + 1], pf_rate[kMaxGroups];
  for (int64_t g = 0; g <= groups; ++g) m_at[g] = std::min<int64_t>(M, g * MB), pf_at[g] = block_bytes * g / groups;
  for (int64_t g = 0; g < groups; ++g) pf_rate[g] = ((pf_at[g + 1] - pf_at[g]) << 16) / std::max<int64_t>(K, 1);
  const int ahead = kAheadBytes > 0 ? ahead_blocks(kAheadBytes, block_bytes) : kAhead;
  const bool l2 = (sizeof(WT) == 4 || M >= kL2MinRowsBf16) && kr_cpu_prefetch_target() == KR_CPU_PREFETCH_L2;
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) {
    const WT* block = w + n * K;
    const float* b = bias != nullptr ? bias + n : nullptr;
    const int64_t tail_bytes = (N - n) * K * static_cast<int64_t>(sizeof(WT));
    for (int64_t g = 0; g < groups; ++g) {
      const Prefetch pf = Prefetch::slice(block, block_bytes, tail_bytes, pf_at[g], pf_rate[g], ahead, l2);
      Group(static_cast<int>(m_at[g + 1] - m_at[g]), x + m_at[g] * ldx, ldx, block, pf, K, b, y + m_at[g] * ldy + n,
            ldy);
    }
  }
  for (; n < n_end; ++n) {
    const float* b = bias != nullptr ? bias + n : nullptr;
    for (int64_t g = 0; g < groups; ++g)
      Single(static_cast<int>(m_at[g + 1] - m_at[g]), x + m_at[g] * ldx, ldx, w + n * K, Prefetch(), K, b,
             y + m_at[g] * ldy + n, ldy);
  }
}


KR_TARGET_AVX512 inline float tree16_avx512(__m512 a) {
  const __m256 lo = _mm512_castps512_ps256(a);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
  const __m256 s8 = _mm256_add_ps(lo, hi);                                                // a[i] + a[i+8]
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));  // s8[i] + s8[i+4]
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                                // s4[i] + s4[i+2]
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));                              // s2[0] + s2[1]
}

// The same tree on four accumulators at once -> [tree(a), tree(b), tree(c), tree(d)]: every add pairs the lanes
// tree16 pairs (a commuted pair is the same add), so the sums are the same bits.
KR_TARGET_AVX512 inline __m128 tree16x4_avx512(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));  // [s8(a) | s8(b)]
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));  // [s8(c) | s8(d)]
  const __m512 s4 = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));  // [s4(a) .. s4(d)]
  const __m512 s2 = _mm512_add_ps(s4, _mm512_permute_ps(s4, _MM_SHUFFLE(1, 0, 3, 2)));    // s4[i] + s4[i+2]
  const __m512 s1 = _mm512_add_ps(s2, _mm512_permute_ps(s2, _MM_SHUFFLE(2, 3, 0, 1)));    // s2[0] + s2[1]
  const __m512i lanes = _mm512_setr_epi32(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(lanes, s1));
}

// y[m, j] = tree16(acc[j][m]) (+ bias[j]) for the NB x MB accumulators of a tile.
template <int NB, int MB>
KR_TARGET_AVX512 inline void store_tile_avx512(const __m512 (&acc)[NB][MB], const float* bias, float* y, int64_t ldy) {
  if constexpr (NB % 4 == 0) {
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NB; j += 4) {
        __m128 s = tree16x4_avx512(acc[j][m], acc[j + 1][m], acc[j + 2][m], acc[j + 3][m]);
        if (bias != nullptr) s = _mm_add_ps(s, _mm_loadu_ps(bias + j));
        _mm_storeu_ps(y + m * ldy + j, s);
      }
  } else {
    for (int j = 0; j < NB; ++j)
      for (int m = 0; m < MB; ++m) {
        const float s = tree16_avx512(acc[j][m]);
        y[m * ldy + j] = bias != nullptr ? s + bias[j] : s;
      }
  }
}

KR_TARGET_AVX2 inline float tree16_avx2(__m256 lo, __m256 hi) {
  const __m256 s8 = _mm256_add_ps(lo, hi);                                                // a[i] + a[i+8]
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));  // s8[i] + s8[i+4]
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                                // s4[i] + s4[i+2]
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));                              // s2[0] + s2[1]
}

// y[m, j] = tree16 of lanes lo[j][m] (0-7) and hi[j][m] (8-15) (+ bias[j]) for the accumulators of a tile.
template <int NB, int MB>
KR_TARGET_AVX2 inline void store_tile_avx2(const __m256 (&lo)[NB][MB], const __m256 (&hi)[NB][MB], const float* bias,
                                           float* y, int64_t ldy) {
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) {
      const float s = tree16_avx2(lo[j][m], hi[j][m]);
      y[m * ldy + j] = bias != nullptr ? s + bias[j] : s;
    }
}

#endif  // KR_CPU_X86

}  // namespace
}  // namespace kr_cpu_linear
