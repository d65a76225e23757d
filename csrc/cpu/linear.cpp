// CPU linear kernel of the decode path: y = x W^T (+ bias) for a handful of activation rows, fp32 accumulation:
// fp32 activations with fp32 weights or bf16 weights (widened exactly to fp32), and bf16 activations with bf16
// weights in the order of AVX512-BF16's dot product (below). See kr_cpu.h for the contract.
//
// Memory: decoding a few rows is bound by reading the weights. The kernel takes a block of output rows (rows of
// W) and runs every activation row against it, in register-blocked groups, before it moves on: the block comes
// from DRAM once and is re-read from L1 for the other groups. Meanwhile a block about 9 KB ahead is prefetched
// (hint NTA), a request for every line, spread evenly over the groups' K loops: that lets most of the arithmetic of
// 8 rows hide under the DRAM read (without it, 8 rows cost 1.4x one row in fp32; with it, 1.05x).
//
// The reduction order, which makes a row's bits independent of the batch (Kangaroo's verification over k + 1
// tokens must give the bits of k + 1 single steps): y[m, n] is computed as if on 16 fp32 lanes. Lane l starts
// at +0 and accumulates w[n, k] * x[m, k] for k = l, l + 16, l + 32, ... in increasing k, one fused multiply-add
// each; the last, partial chunk of 16 is zero-padded (lanes past K accumulate 0 * 0). The lanes are then summed
// by a fixed tree, s8[i] = a[i] + a[i+8], s4[i] = s8[i] + s8[i+4], s2[i] = s4[i] + s4[i+2], s = s2[0] + s2[1],
// and the bias, if any, is added last. Nothing in that sequence depends on M, on the row's place among the rows,
// on how rows are grouped into register blocks or passes, or on the thread split [n_begin, n_end). Every
// variant (AVX-512, AVX2 + FMA as two 8-lane halves, portable C++ with std::fma) performs exactly this
// sequence, so on a platform without excess precision (x86-64, AArch64) the results are the same bits whichever
// variant runs. That needs strict IEEE arithmetic: no -ffast-math, no contraction of a * b + c (the build passes
// -ffp-contract=off; the kernels only ever add or call an explicit FMA).
//
// bf16 activations with bf16 weights (a bf16 model) take a second order, kr_cpu_linear_rows_bf16: that of
// AVX512-BF16's vdpbf16ps, which multiplies and adds pairs of bf16 straight from memory, so one instruction does
// the 32 multiply-adds that widening takes two conversions and two FMAs for (measured here: the FMA-bound rows
// counts, M >= 4, cost about half). Lane l takes, per chunk of 32 k's, k = 32c + 2l + 1 and then k = 32c + 2l,
// each one fused multiply-add, with denormal inputs read as zero and denormal results flushed to zero (DAZ + FTZ,
// which vdpbf16ps always applies). The instruction's results were checked bit for bit against that description
// on 32 M random lanes (random bit patterns included) on the AMD EPYC of 2026-12-04. The other variants perform
// the same sequence (AVX-512 and AVX2 with two FMAs on the odd and even halves of each 32-bit pair, under the
// MXCSR's DAZ + FTZ; portable C++ with explicit flushes), and the whole call, lane sums and bias included, runs
// with denormals flushed, so again every variant gives the same bits. fp32 activations keep the order above.
#include "kr_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "kr_cpu_avx512.h"
#include "kr_cpu_common.h"

namespace {

using kr_cpu::flush_denormal;
using kr_cpu::kLanes;
using kr_cpu::to_float;
using kr_cpu::tree16;

constexpr int64_t kPairChunk = 2 * kLanes;  // k's per step of the bf16 x bf16 order: a pair per lane

// ---------------------------------------------------------------------------------------------------------------
// Portable C++: one output element at a time; a W row stays in L1 while every activation row runs against it.

template <typename WT>
void rows_portable(const float* x, int64_t M, int64_t K, int64_t ldx, const WT* w, const float* bias, float* y,
                   int64_t ldy, int64_t n_begin, int64_t n_end) {
  const int64_t k_full = K - K % kLanes;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const WT* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * ldx;
      float acc[kLanes] = {};
      for (int64_t k = 0; k < k_full; k += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] = std::fma(to_float(wr[k + l]), xr[k + l], acc[l]);
      if (k_full < K) {
        for (int l = 0; l < kLanes; ++l) {
          const bool in = k_full + l < K;
          acc[l] = std::fma(in ? to_float(wr[k_full + l]) : 0.0f, in ? xr[k_full + l] : 0.0f, acc[l]);
        }
      }
      const float s = tree16(acc);
      y[m * ldy + n] = bias != nullptr ? s + bias[n] : s;
    }
  }
}

// bf16 x bf16 in vdpbf16ps's order (see the top of this file), each operation flushing denormals as DAZ + FTZ do
// (kr_cpu::fma_ftz and these).
KR_INLINE float add_ftz(float a, float b) { return flush_denormal(flush_denormal(a) + flush_denormal(b)); }

KR_INLINE float tree16_ftz(const float* a) {
  float s8[8], s4[4];
  for (int i = 0; i < 8; ++i) s8[i] = add_ftz(a[i], a[i + 8]);
  for (int i = 0; i < 4; ++i) s4[i] = add_ftz(s8[i], s8[i + 4]);
  return add_ftz(add_ftz(s4[0], s4[2]), add_ftz(s4[1], s4[3]));
}

void rows_portable_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, const float* bias,
                        float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint16_t* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* xr = x + m * ldx;
      float acc[kLanes];
      kr_cpu::dot_bf16_pairs_lanes(wr, xr, K, acc);
      const float s = tree16_ftz(acc);
      y[m * ldy + n] = bias != nullptr ? add_ftz(s, bias[n]) : s;
    }
  }
}

#if KR_CPU_X86

// Register blocks: NB rows of W by MB activation rows, one accumulator (two ymm halves on AVX2) per pair.
// AVX-512: 16 accumulators, 4 x and 1 w register; AVX2 (16 ymm): 12 accumulators, 3 x and 1 w.
constexpr int kNbAvx512 = 4, kMbAvx512 = 4;
// bf16 x bf16 (AVX512-BF16) with 2-4 rows, as a verify step has (k + 1 for k drafts): blocks of 2 rows of W by all
// the activation rows, in one group, so that only 2 rows of W stream at a time. Measured here on SmolLM2-shaped
// random weights, 2 threads, interleaved A/B runs: the verify step (layers 1-29 and the head) over 3 / 4 tokens took
// 4.98-5.06 / 5.35-5.37 ms against 5.81-5.90 / 5.96-6.11 with 4 x 4 blocks. 5 or more rows keep 4 x 4, slower in
// these blocks (the few accumulators leave vdpbf16ps's latency exposed; one group of 5-8 rows here, 16 accumulators,
// made the 8-row pass 1.08x slower). The same blocks for fp32 were faster alone on the model's matrices but not
// inside the layer stack, and slower with bf16 weights widened to fp32: those stay 4 x 4 (fp32 with 5-6 rows has
// its own 2-row blocks since 2026-12-06: kNbManyFp32).
// Two rows joined these blocks on 2026-12-05, from the one-row path's 8-row blocks with the NTA prefetch one block
// ahead (bench_ab --in-process, SmolLM2's matrices, 2 threads, context 600, four runs of 6-8 rounds): in the host's
// fast phases (plain step 4.8-5.1 ms) the two-row pass 0.955-0.968x and a 2-token verify step 0.957-0.959x, in its
// slow ones (6.2 ms) the pass 0.93-1.0x and the verify step 0.98-1.0x; 2 x 4 rows of W (the 5+ row blocks) gave
// 0.985-0.988x. With the T1 hint before it, the 8-row blocks had been the faster ones (0.85-0.92x).
constexpr int kNbFewBf16 = 2, kFewRowsMaxBf16 = 4;
// One activation row (a plain step, a draft step) of bf16 x bf16 on AVX-512: blocks of 8 rows of W, 8 independent
// accumulators where 4 x 4 blocks give one row 4, which leave vdpbf16ps's latency exposed. Measured (bench_ab,
// SmolLM2's matrices, 2 threads, two runs): the bf16 pass 0.93-0.95x, a bf16 plain step 0.95-0.97x; with the weights
// in cache a 1536 x 576 matrix 10.7 against 15.0 us. fp32 (twice the bytes, bound by the stream) measured no gain.
constexpr int kNbOneRow = 8;
// fp32 x fp32 with 5-6 activation rows (verify steps over 5-6 tokens, a batch's rounds): blocks of 2 rows of W by
// all the rows in one group (10-12 accumulators), where 4 x 4 blocks take a group of 4 and one of 1-2 rows, the
// second re-reading the block from L1 while only the prefetch streams (which made 5-6 rows cost more than 7-8).
// Measured with bench_ab --in-process against 5e68e5f (SmolLM2's matrices, fp32, 2 threads, 3 x 8 repeats, paired
// medians, cpu-20261206-s20-fp32-rows56): the 5 / 6 row passes 0.89-0.91x / 0.94x, verify steps over 5 / 6 tokens
// 0.91x / 0.96x, 1, 4, 7 and 8 rows (unchanged code) 0.98-1.03x. The same blocks for 7-8 rows (2 x 8, two-by-eight/)
// took 1.04-1.05x the time in calls per matrix, 0.99x (7 rows) and 1.05x (8 rows) in one call per pass, and verify
// steps over 7 / 8 tokens 1.02x / 1.04x, where a scratch harness outside the layer stack had them 5-9% faster.
constexpr int kNbManyFp32 = 2, kMbManyFp32 = 6;
constexpr int kNbAvx2 = 2, kMbAvx2 = 3;
// Software prefetch of the weights this many blocks ahead: the AVX2 paths and the packed layout's; the AVX-512
// paths now go kPrefetchBytes ahead (below). History (measured with the T1 hint: 2 beats 0, 1 and 4;
// prefetching into L1 with T0 evicts the block being read when K is large). The hint is NTA, non-temporal: against
// T1 (into L2), bench_ab --in-process (SmolLM2's matrices, bf16, 2 threads, context 600, two runs of 3 and 5 rounds)
// measured verify steps over 3 / 4 / 5 tokens 0.89-0.95 / 0.92-0.93 / 0.95x, the 3-5 row sweeps 0.87-0.97x, the
// 8-row sweep 0.95x (fp32 0.86x). One bf16 row: kAheadOneRow. A second, far prefetch (T1 16 KB or T2 32 KB
// ahead, a block's lines at each block's start) made 2-8 rows 1.04-1.16x slower (no performance counters here to
// say why; a software prefetch that misses holds one of the L1's miss buffers, which the stream's loads need too).
constexpr int kPrefetchBlocks = 2;
// One bf16 activation row in blocks of 8 rows of W (rows_bf16_avx512): no software prefetch. It made the one-row
// stream slower where it makes 2-8 rows in the smaller blocks much faster (measured with T1, bench_ab, SmolLM2's
// matrices, 2 threads, context 600: without it one row 0.87-0.92x, a plain bf16 step 0.84-0.91x; 2-8 rows in 2 x 4
// and 4 x 4 blocks 1.3-1.7x slower). The fp32 path keeps it: a branch for one row in rows_avx512 made its 2-8 rows
// 6-22% slower, inlined or not.
constexpr int kAheadOneRow = 0;
// The AVX-512 paths that prefetch (bf16 with 2-8 rows, fp32 with any) go about this many bytes ahead, in whole
// blocks (at least one): SmolLM2's bf16 2-row blocks 4 ahead for K = 576 (9.2 KB) and 2 for K = 1536 (12.3 KB), its
// 4-row blocks 2 (9.2 KB) and 1 (12.3 KB), its fp32 4-row blocks 1 (9.2 KB and 24.6 KB), where kPrefetchBlocks had
// put the bf16 2-row blocks only 4.6 KB ahead for K = 576 and the others 18-49 KB ahead. Measured with bench_ab
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

// The whole blocks nearest to bytes ahead, at least one.
inline int ahead_blocks(int64_t bytes, int64_t block_bytes) {
  return static_cast<int>(std::max<int64_t>(1, (bytes + block_bytes / 2) / std::max<int64_t>(1, block_bytes)));
}

// Software prefetch (NTA) of the block a few ahead of the current one (kPrefetchBlocks, or the blocks nearest to a
// distance in bytes). The register groups of a block (one per MB activation rows) each take an equal slice of it,
// spread over their K loop, so that requests go out at an even rate whatever M. The rate is fixed-point bytes per k,
// set once a call: a division per chunk (or per block) costs as much as a few-row chunk's arithmetic. The even spread
// matters: the whole block ahead requested during the first group instead (bench_ab --in-process, 2026-12-06,
// cpu-20261206-s20-prefetch-front) made 7 / 8 / 16 row passes 1.09 / 1.13-1.15 / 1.36-1.46x slower in fp32 and
// 1.03-1.09 / 1.10-1.12 / 1.33-1.43x in bf16. So does every line: a request for every other line only (leaving the
// rest to the hardware prefetchers) made 1-8 row passes 1.16-1.65x slower in fp32 and 2-8 rows 1.75-2.1x in bf16
// (cpu-20261206-s20-prefetch-half; bf16's one row, which does not prefetch, unchanged).
struct Prefetch {
  const char* begin = nullptr;  // nullptr: nothing to prefetch
  int64_t rate = 0;             // the slice's bytes * 2^16 / K
  int64_t issued = 0;

  // The slice [lo, lo + bytes of rate) of the block ahead; nothing when W (tail_bytes from the block's start on) ends
  // before it.
  static Prefetch slice(const void* block, int64_t block_bytes, int64_t tail_bytes, int64_t lo, int64_t rate,
                        int ahead) {
    Prefetch p;
    if (ahead == 0 || (ahead + 1) * block_bytes > tail_bytes) return p;
    p.begin = static_cast<const char*>(block) + ahead * block_bytes + lo;
    p.rate = rate;
    return p;
  }

  // After the step that ends at k: the slice's first k / K has been requested.
  KR_TARGET_AVX2 inline void step(int64_t k) {
    if (begin == nullptr) return;
    const int64_t until = (rate * k) >> 16;
    for (; issued < until; issued += 64) _mm_prefetch(begin + issued, _MM_HINT_NTA);
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
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) {
    const WT* block = w + n * K;
    const float* b = bias != nullptr ? bias + n : nullptr;
    const int64_t tail_bytes = (N - n) * K * static_cast<int64_t>(sizeof(WT));
    for (int64_t g = 0; g < groups; ++g) {
      const Prefetch pf = Prefetch::slice(block, block_bytes, tail_bytes, pf_at[g], pf_rate[g], ahead);
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

// ----- AVX-512: one zmm is the 16 lanes.

KR_TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

KR_TARGET_AVX512 inline __m512 load16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

using kr_cpu::load16_tail;

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

// The chunks of k in [k0, k1) of the block at w (NB rows of W, row stride K) against x (MB rows, row stride ldx),
// added to acc; k1 == K takes the zero-padded last chunk too. pf's slice of a later block is requested along the
// way, in proportion to k - k0.
template <int NB, int MB, typename WT>
KR_TARGET_AVX512 KR_INLINE void tile_piece_avx512(const float* x, int64_t ldx, const WT* w, Prefetch& pf, int64_t K,
                                                  int64_t k0, int64_t k1, __m512 (&acc)[NB][MB]) {
  const int64_t k_full = k1 == K ? K - K % kLanes : k1;
  for (int64_t k = k0; k < k_full; k += kLanes) {
    pf.step(k - k0 + kLanes);
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(x + m * ldx + k);
    for (int j = 0; j < NB; ++j) {
      const __m512 wv = load16(w + j * K + k);
      for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_fmadd_ps(wv, xv[m], acc[j][m]);
    }
  }
  if (k_full < k1) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (k1 - k_full)) - 1u);
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * ldx + k_full);
    for (int j = 0; j < NB; ++j) {
      const __m512 wv = load16_tail(w + j * K + k_full, mask);
      for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_fmadd_ps(wv, xv[m], acc[j][m]);
    }
  }
}

// y[m, j] for m < MB, j < NB of the block at w (NB rows of W, row stride K), x (MB rows, row stride ldx); pf's
// slice of a later block is requested along the K loop.
template <int NB, int MB, typename WT>
KR_TARGET_AVX512 void tile_avx512(const float* x, int64_t ldx, const WT* w, Prefetch pf, int64_t K,
                                  const float* bias, float* y, int64_t ldy) {
  __m512 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_setzero_ps();
  tile_piece_avx512<NB, MB, WT>(x, ldx, w, pf, K, 0, K, acc);
  store_tile_avx512<NB, MB>(acc, bias, y, ldy);
}

// tile_avx512<NB, mb> for a group of 1 <= mb <= MB rows.
template <int NB, int MB, typename WT>
KR_TARGET_AVX512 void group_avx512(int mb, const float* x, int64_t ldx, const WT* w, Prefetch pf, int64_t K,
                                   const float* bias, float* y, int64_t ldy) {
  if constexpr (MB > 1) {
    if (mb < MB) return group_avx512<NB, MB - 1>(mb, x, ldx, w, pf, K, bias, y, ldy);
  }
  tile_avx512<NB, MB>(x, ldx, w, pf, K, bias, y, ldy);
}

// One row count's loop in a function of its own, everything it calls inlined (as rows_path_bf16_avx512).
template <int NB, int MB, typename WT>
__attribute__((noinline, flatten)) KR_TARGET_AVX512 void rows_path_avx512(
    const float* x, int64_t M, int64_t K, int64_t ldx, const WT* w, int64_t N, const float* bias, float* y,
    int64_t ldy, int64_t n_begin, int64_t n_end) {
  for_each_group<NB, MB, float, WT, group_avx512<NB, MB, WT>, group_avx512<1, MB, WT>, 0, kPrefetchBytes>(
      x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
}

// fp32 x fp32 with 7-8 activation rows and a wide K (SmolLM2's down projection, K = 1536): the two register groups
// of 4 x 4 blocks take K in pieces of kKPiece, both groups a piece at a time, each group's accumulators kept in a
// small buffer between its pieces. Each lane still adds its k's in increasing order (a piece is a whole number of
// chunks of 16), so the bits are those of the whole-K loop. The second group then re-reads a piece of the block
// (4 rows of W x 1 KB) right after the first read it, from L1, where over the whole K it re-read the 24.6 KB block
// after the first group had streamed that block and its 4 rows of x (24 KB) through the 48 KB L1, besides the
// block being prefetched. (x itself, 48 KB for 8 rows, is still read whole once per block.) Measured with bench_ab
// --in-process against b4929a1 (SmolLM2's matrices, fp32, 2 threads, 3 x 8 repeats, paired medians,
// cpu-20261206-s20-kblocked): 7 / 8 row passes 0.95x /
// 0.95-0.97x, verify steps over 7 / 8 tokens 0.955x / 0.979x, 1 and 4 rows unchanged (0.98-1.01x). A scratch harness
// over down projections alone: 8 rows 1.40-1.55x one row before, 1.19-1.27x in pieces of 256 (1.22-1.36x in 512 or
// 768). The 5-6 row path (one group, K whole) and bf16 (half the bytes of x) are not blocked. For 2-4 rows at
// K >= 1024, 2-row blocks of W (12.3 KB) instead of 4 measured 0.98-1.0x the passes' time and 0.93-1.01x the
// verify steps' (cpu-20261206-s20-two-row-blocks-wide-k): too little to take.
constexpr int64_t kKPiece = 256, kKBlockMinK = 1024;

// One register group's piece [k0, k1) of a K-blocked block: its accumulators from saved (zeros for the first piece),
// and back to saved, or, after the last piece, summed into y.
template <int NB, int MB>
KR_TARGET_AVX512 KR_INLINE void kblocked_piece(const float* x, int64_t ldx, const float* block, Prefetch pf, int64_t K,
                                               int64_t k0, int64_t k1, bool first, bool last,
                                               float (&saved)[NB][MB][kLanes], const float* bias, float* y,
                                               int64_t ldy) {
  __m512 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) acc[j][m] = first ? _mm512_setzero_ps() : _mm512_load_ps(saved[j][m]);
  tile_piece_avx512<NB, MB, float>(x, ldx, block, pf, K, k0, k1, acc);
  if (last) return store_tile_avx512<NB, MB>(acc, bias, y, ldy);
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) _mm512_store_ps(saved[j][m], acc[j][m]);
}
template <int NB, int MB1>
__attribute__((noinline, flatten)) KR_TARGET_AVX512 void rows_kblocked_avx512(
    const float* x, int64_t K, int64_t ldx, const float* w, int64_t N, const float* bias, float* y, int64_t ldy,
    int64_t n_begin, int64_t n_end) {
  constexpr int MB0 = kMbAvx512;
  const int64_t pieces = (K + kKPiece - 1) / kKPiece, slices = 2 * pieces;
  const int64_t block_bytes = NB * K * static_cast<int64_t>(sizeof(float));
  const int ahead = ahead_blocks(kPrefetchBytes, block_bytes);
  alignas(64) float saved0[NB][MB0][kLanes], saved1[NB][MB1][kLanes];
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) {
    const float* block = w + n * K;
    const float* b = bias != nullptr ? bias + n : nullptr;
    const int64_t tail_bytes = (N - n) * K * static_cast<int64_t>(sizeof(float));
    for (int64_t p = 0; p < pieces; ++p) {
      const int64_t k0 = p * kKPiece, k1 = std::min(K, k0 + kKPiece);
      const bool last = p + 1 == pieces;
      const auto slice = [&](int64_t s) {
        const int64_t lo = block_bytes * s / slices, hi = block_bytes * (s + 1) / slices;
        return Prefetch::slice(block, block_bytes, tail_bytes, lo, ((hi - lo) << 16) / (k1 - k0), ahead);
      };
      kblocked_piece<NB, MB0>(x, ldx, block, slice(2 * p), K, k0, k1, p == 0, last, saved0, b, y + n, ldy);
      kblocked_piece<NB, MB1>(x + MB0 * ldx, ldx, block, slice(2 * p + 1), K, k0, k1, p == 0, last, saved1, b,
                              y + MB0 * ldy + n, ldy);
    }
  }
  // the last (n_end - n_begin) % NB rows of W: the whole-K path's one-row-at-a-time tail
  rows_path_avx512<NB, MB0, float>(x, MB0 + MB1, K, ldx, w, N, bias, y, ldy, n, n_end);
}

template <typename WT>
KR_TARGET_AVX512 void rows_avx512(const float* x, int64_t M, int64_t K, int64_t ldx, const WT* w, int64_t N,
                                  const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  if constexpr (std::is_same_v<WT, float>) {
    if (M > kMbAvx512 && M <= kMbManyFp32)
      return rows_path_avx512<kNbManyFp32, kMbManyFp32, WT>(x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
    if (K >= kKBlockMinK && (M == 7 || M == 8))
      return M == 7 ? rows_kblocked_avx512<kNbAvx512, 3>(x, K, ldx, w, N, bias, y, ldy, n_begin, n_end)
                    : rows_kblocked_avx512<kNbAvx512, 4>(x, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
  }
  rows_path_avx512<kNbAvx512, kMbAvx512, WT>(x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
}

// ----- AVX2 + FMA: the 16 lanes are two ymm, lanes 0-7 and 8-15.

KR_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

KR_TARGET_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
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

// One chunk of 16 k's: x rows at x (stride ldx), W rows at w (stride ldw).
template <int NB, int MB, typename WT>
KR_TARGET_AVX2 inline void chunk_avx2(const float* x, int64_t ldx, const WT* w, int64_t ldw, __m256 (&lo)[NB][MB],
                                      __m256 (&hi)[NB][MB]) {
  __m256 xv[MB];
  for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx);
  for (int j = 0; j < NB; ++j) {
    const __m256 wv = load8(w + j * ldw);
    for (int m = 0; m < MB; ++m) lo[j][m] = _mm256_fmadd_ps(wv, xv[m], lo[j][m]);
  }
  for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + 8);
  for (int j = 0; j < NB; ++j) {
    const __m256 wv = load8(w + j * ldw + 8);
    for (int m = 0; m < MB; ++m) hi[j][m] = _mm256_fmadd_ps(wv, xv[m], hi[j][m]);
  }
}

template <int NB, int MB, typename WT>
KR_TARGET_AVX2 void tile_avx2(const float* x, int64_t ldx, const WT* w, Prefetch pf, int64_t K,
                              const float* bias, float* y, int64_t ldy) {
  __m256 lo[NB][MB], hi[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) lo[j][m] = hi[j][m] = _mm256_setzero_ps();
  const int64_t k_full = K - K % kLanes;
  for (int64_t k = 0; k < k_full; k += kLanes) {
    pf.step(k + kLanes);
    chunk_avx2<NB, MB>(x + k, ldx, w + k, K, lo, hi);
  }
  if (k_full < K) {  // the zero-padded last chunk, from copies
    float xt[MB][kLanes] = {};
    WT wt[NB][kLanes] = {};
    for (int m = 0; m < MB; ++m) std::memcpy(xt[m], x + m * ldx + k_full, (K - k_full) * sizeof(float));
    for (int j = 0; j < NB; ++j) std::memcpy(wt[j], w + j * K + k_full, (K - k_full) * sizeof(WT));
    chunk_avx2<NB, MB>(&xt[0][0], kLanes, &wt[0][0], kLanes, lo, hi);
  }
  store_tile_avx2<NB, MB>(lo, hi, bias, y, ldy);
}

template <int NB, int MB, typename WT>
KR_TARGET_AVX2 void group_avx2(int mb, const float* x, int64_t ldx, const WT* w, Prefetch pf, int64_t K,
                               const float* bias, float* y, int64_t ldy) {
  if constexpr (MB > 1) {
    if (mb < MB) return group_avx2<NB, MB - 1>(mb, x, ldx, w, pf, K, bias, y, ldy);
  }
  tile_avx2<NB, MB>(x, ldx, w, pf, K, bias, y, ldy);
}

template <typename WT>
KR_TARGET_AVX2 void rows_avx2(const float* x, int64_t M, int64_t K, int64_t ldx, const WT* w, int64_t N,
                              const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  constexpr int NB = kNbAvx2, MB = kMbAvx2;
  for_each_group<NB, MB, float, WT, group_avx2<NB, MB, WT>, group_avx2<1, MB, WT>>(x, M, K, ldx, w, N, bias, y, ldy,
                                                                                   n_begin, n_end);
}

// ----- bf16 x bf16 (vdpbf16ps's order) on x86: the caller holds a FlushDenormals for the whole call.

using kr_cpu::FlushDenormals;  // (kr_cpu_common.h)

// One chunk of 32 k's of an NB x MB block: kHw uses vdpbf16ps, otherwise the odd halves of the 32-bit pairs
// (the high bf16, masked) and then the even ones (the low bf16, shifted up) are fused-multiply-added. kTail
// zero-pads past K (mask).
template <int NB, int MB, bool kHw, bool kTail>
KR_TARGET_AVX512_BF16 inline void chunk_bf16_avx512(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw,
                                                    __mmask32 mask, __m512 (&acc)[NB][MB]) {
  __m512i xv[MB];
  for (int m = 0; m < MB; ++m)
    xv[m] = kTail ? _mm512_maskz_loadu_epi16(mask, x + m * ldx) : _mm512_loadu_si512(x + m * ldx);
  if constexpr (kHw) {
    for (int j = 0; j < NB; ++j) {
      const __m512i wv = kTail ? _mm512_maskz_loadu_epi16(mask, w + j * ldw) : _mm512_loadu_si512(w + j * ldw);
      for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_dpbf16_ps(acc[j][m], (__m512bh)wv, (__m512bh)xv[m]);
    }
  } else {
    __m512 xo[MB], xe[MB];
    for (int m = 0; m < MB; ++m) xo[m] = kr_cpu::bf16_odd(xv[m]), xe[m] = kr_cpu::bf16_even(xv[m]);
    for (int j = 0; j < NB; ++j) {
      const __m512i wv = kTail ? _mm512_maskz_loadu_epi16(mask, w + j * ldw) : _mm512_loadu_si512(w + j * ldw);
      const __m512 wo = kr_cpu::bf16_odd(wv), we = kr_cpu::bf16_even(wv);
      for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_fmadd_ps(wo, xo[m], acc[j][m]);
      for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_fmadd_ps(we, xe[m], acc[j][m]);
    }
  }
}

// kPacked: the block's NB rows of W are in the packed layout (kr_cpu_linear_rows_bf16_packed, NB = KR_CPU_PACK_ROWS,
// K a multiple of 32): chunk c of its rows is NB x 32 consecutive bf16, row j's 32 at c * NB * 32 + j * 32.
template <int NB, int MB, bool kHw, bool kPacked = false>
KR_TARGET_AVX512_BF16 void tile_bf16_avx512(const uint16_t* x, int64_t ldx, const uint16_t* w, Prefetch pf,
                                            int64_t K, const float* bias, float* y, int64_t ldy) {
  __m512 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_setzero_ps();
  const int64_t k_full = K - K % kPairChunk;
  int64_t k = 0;
  // The 3-4 and 5+ row blocks take two chunks a trip (the same chunks in the same order: the same bits). Measured
  // (bench_ab --in-process probes, three processes): verify steps over 4 / 5 / 6-7 tokens 0.95-0.97 / 0.94-0.95 /
  // 0.98-0.99x, the 5-row pass 0.92-0.94x, the 8-row pass 1.02-1.04x, 1-3 rows unchanged.
  static_assert(!kPacked || NB == KR_CPU_PACK_ROWS, "a packed block is KR_CPU_PACK_ROWS rows");
  if constexpr (!kPacked && (NB == kNbFewBf16 || NB == kNbAvx512)) {  // (row-major addressing below)
    for (; k + 2 * kPairChunk <= k_full; k += 2 * kPairChunk) {
      pf.step(k + kPairChunk);
      chunk_bf16_avx512<NB, MB, kHw, false>(x + k, ldx, w + k, K, 0, acc);
      pf.step(k + 2 * kPairChunk);
      chunk_bf16_avx512<NB, MB, kHw, false>(x + k + kPairChunk, ldx, w + k + kPairChunk, K, 0, acc);
    }
  }
  for (; k < k_full; k += kPairChunk) {
    pf.step(k + kPairChunk);
    if constexpr (kPacked)
      chunk_bf16_avx512<NB, MB, kHw, false>(x + k, ldx, w + k * NB, kPairChunk, 0, acc);
    else
      chunk_bf16_avx512<NB, MB, kHw, false>(x + k, ldx, w + k, K, 0, acc);
  }
  if (!kPacked && k_full < K) {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k_full)) - 1ull);
    chunk_bf16_avx512<NB, MB, kHw, true>(x + k_full, ldx, w + k_full, K, mask, acc);
  }
  store_tile_avx512<NB, MB>(acc, bias, y, ldy);
}

template <int NB, int MB, bool kHw, bool kPacked = false>
KR_TARGET_AVX512_BF16 void group_bf16_avx512(int mb, const uint16_t* x, int64_t ldx, const uint16_t* w, Prefetch pf,
                                             int64_t K, const float* bias, float* y, int64_t ldy) {
  if constexpr (MB > 1) {
    if (mb < MB) return group_bf16_avx512<NB, MB - 1, kHw, kPacked>(mb, x, ldx, w, pf, K, bias, y, ldy);
  }
  tile_bf16_avx512<NB, MB, kHw, kPacked>(x, ldx, w, pf, K, bias, y, ldy);
}

// One row count's loop over the rows of W in a function of its own, with everything it calls inlined into it
// (flatten), so that a path compiles to the same code whatever the other paths are. The dispatcher passes one row
// as a literal, which the compiler propagates into its path (the group bookkeeping in for_each_group folds away).
// Measured (benchmarks/bench_ab.py --in-process), when two rows had a path of their own in 8-row blocks: 0.86-0.92x
// the time of the 2 x 4 blocks with the row count propagated, 0.96x without; with the paths inlined into one
// dispatcher, adding the two-row path made one row 6-15% slower.
template <int NB, int MB, bool kHw, int kAhead, bool kPacked = false, int64_t kAheadBytes = 0>
__attribute__((noinline, flatten)) KR_TARGET_AVX512_BF16 void rows_path_bf16_avx512(
    const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N, const float* bias, float* y,
    int64_t ldy, int64_t n_begin, int64_t n_end) {
  // (packed calls cover whole packs of NB rows: the one-row Single never runs for them)
  for_each_group<NB, MB, uint16_t, uint16_t, group_bf16_avx512<NB, MB, kHw, kPacked>, group_bf16_avx512<1, MB, kHw>,
                 kAhead, kAheadBytes>(x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
}

// kHw = false never reaches an AVX512-BF16 instruction: only chunk_bf16_avx512's kHw branch has one (the target
// attribute is shared so that one template serves both; objdump of the build shows vdpbf16ps only in the kHw = true
// instantiations, and the compiler emits it only from the intrinsic).
template <bool kHw>
KR_TARGET_AVX512_BF16 void rows_bf16_avx512(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w,
                                            int64_t N, const float* bias, float* y, int64_t ldy, int64_t n_begin,
                                            int64_t n_end) {
  if (M == 1)
    return rows_path_bf16_avx512<kNbOneRow, 1, kHw, kAheadOneRow>(x, 1, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
  if (M <= kFewRowsMaxBf16)
    return rows_path_bf16_avx512<kNbFewBf16, kFewRowsMaxBf16, kHw, 0, false, kPrefetchBytes>(
        x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
  return rows_path_bf16_avx512<kNbAvx512, kMbAvx512, kHw, 0, false, kPrefetchBytes>(x, M, K, ldx, w, N, bias, y,
                                                                                       ldy, n_begin, n_end);
}

// The packed layout's rows: blocks of KR_CPU_PACK_ROWS rows of W (the one-row path's blocks), each read as one
// sequential run of memory. One and two rows in 8-row blocks (two rows as the row-major path had them before
// 2026-12-05); more in groups of kMbPacked activation rows
// (24 accumulators) with the software prefetch of the 2 x 4 and 4 x 4 blocks. Measured against the row-major paths
// (bench_linear, SmolLM2's matrices, one call per pass, 2 threads, passes back to back as decode steps run,
// cpu-20261205-s12-linear-packed): 1 / 2 / 4 / 8 rows 0.95 / 0.99 / 0.97 / 0.96x, 16 / 32 / 64 rows 0.85 / 0.80 /
// 0.78x; scratch runs in one process gave 0.86-0.99x at 1-8 rows. After a torch pass instead (no warm pass before)
// 0.99-1.09x at 1-8 rows. Groups of 2 or no prefetch were slower from 4 or 5 rows on (up to 1.23x at 8 rows), groups
// of 4 (32 accumulators) mixed. Not used by the layer stack: a scratch build whose stack read packed weights took
// 1.04-1.10x the time of a plain step and 1.15-1.20x of a 2-token verify (0.97-0.99x at 5-7 tokens).
constexpr int kMbPacked = 3;
static_assert(KR_CPU_PACK_ROWS == kNbOneRow, "packs are the one-row path's blocks");
template <bool kHw>
KR_TARGET_AVX512_BF16 void rows_bf16_packed_avx512(const uint16_t* x, int64_t M, int64_t K, int64_t ldx,
                                                   const uint16_t* w, int64_t N, const float* bias, float* y,
                                                   int64_t ldy, int64_t n_begin, int64_t n_end) {
  constexpr int P = KR_CPU_PACK_ROWS;
  if (M == 1)
    return rows_path_bf16_avx512<P, 1, kHw, kAheadOneRow, true>(x, 1, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
  if (M == 2)
    return rows_path_bf16_avx512<P, 2, kHw, kAheadOneRow, true>(x, 2, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
  return rows_path_bf16_avx512<P, kMbPacked, kHw, kPrefetchBlocks, true>(x, M, K, ldx, w, N, bias, y, ldy, n_begin,
                                                                          n_end);
}

// AVX2: lanes 0-7 hold the pairs of k's 0-15 of a chunk, lanes 8-15 those of k's 16-31; two FMAs per pair as in
// the emulated AVX-512 chunk. Fewer accumulators than the fp32 path: the odd and even x halves take registers.
constexpr int kNbAvx2Bf16 = 2, kMbAvx2Bf16 = 2;

template <int NB, int MB>
KR_TARGET_AVX2 inline void half_bf16_avx2(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw,
                                          __m256 (&acc)[NB][MB]) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 xo[MB], xe[MB];
  for (int m = 0; m < MB; ++m) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * ldx));
    xo[m] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    xe[m] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
  for (int j = 0; j < NB; ++j) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * ldw));
    const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    for (int m = 0; m < MB; ++m) acc[j][m] = _mm256_fmadd_ps(wo, xo[m], acc[j][m]);
    for (int m = 0; m < MB; ++m) acc[j][m] = _mm256_fmadd_ps(we, xe[m], acc[j][m]);
  }
}

template <int NB, int MB>
KR_TARGET_AVX2 void tile_bf16_avx2(const uint16_t* x, int64_t ldx, const uint16_t* w, Prefetch pf, int64_t K,
                                   const float* bias, float* y, int64_t ldy) {
  __m256 lo[NB][MB], hi[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) lo[j][m] = hi[j][m] = _mm256_setzero_ps();
  const int64_t k_full = K - K % kPairChunk;
  for (int64_t k = 0; k < k_full; k += kPairChunk) {
    pf.step(k + kPairChunk);
    half_bf16_avx2<NB, MB>(x + k, ldx, w + k, K, lo);
    half_bf16_avx2<NB, MB>(x + k + 16, ldx, w + k + 16, K, hi);
  }
  if (k_full < K) {  // the zero-padded last chunk, from copies
    uint16_t xt[MB][kPairChunk] = {}, wt[NB][kPairChunk] = {};
    for (int m = 0; m < MB; ++m) std::memcpy(xt[m], x + m * ldx + k_full, (K - k_full) * sizeof(uint16_t));
    for (int j = 0; j < NB; ++j) std::memcpy(wt[j], w + j * K + k_full, (K - k_full) * sizeof(uint16_t));
    half_bf16_avx2<NB, MB>(&xt[0][0], kPairChunk, &wt[0][0], kPairChunk, lo);
    half_bf16_avx2<NB, MB>(&xt[0][16], kPairChunk, &wt[0][16], kPairChunk, hi);
  }
  store_tile_avx2<NB, MB>(lo, hi, bias, y, ldy);
}

template <int NB, int MB>
KR_TARGET_AVX2 void group_bf16_avx2(int mb, const uint16_t* x, int64_t ldx, const uint16_t* w, Prefetch pf, int64_t K,
                                    const float* bias, float* y, int64_t ldy) {
  if constexpr (MB > 1) {
    if (mb < MB) return group_bf16_avx2<NB, MB - 1>(mb, x, ldx, w, pf, K, bias, y, ldy);
  }
  tile_bf16_avx2<NB, MB>(x, ldx, w, pf, K, bias, y, ldy);
}

KR_TARGET_AVX2 void rows_bf16_avx2(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N,
                                   const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  constexpr int NB = kNbAvx2Bf16, MB = kMbAvx2Bf16;
  for_each_group<NB, MB, uint16_t, uint16_t, group_bf16_avx2<NB, MB>, group_bf16_avx2<1, MB>>(x, M, K, ldx, w, N, bias,
                                                                                              y, ldy, n_begin, n_end);
}

// float -> bf16 bits, 16 at a time: (u + 0x7fff + ((u >> 16) & 1)) >> 16, NaN -> 0x7fc0 (float_to_bf16_bits).
KR_TARGET_AVX512 void round_bf16_avx512(const float* src, uint16_t* dst, int64_t n) {
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), nan = _mm512_set1_epi32(0x7fc0);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const __m512 v = _mm512_loadu_ps(src + i);
    const __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias),
                                                   _mm512_and_si512(_mm512_srli_epi32(u, 16), one)), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(r));
  }
  for (; i < n; ++i) dst[i] = kr_cpu::float_to_bf16_bits(src[i]);
}

#endif  // KR_CPU_X86

// Whether this CPU runs a variant (isa.cpp).
inline bool cpu_runs(int isa) { return kr_cpu_isa_supported(isa) != 0; }

template <typename WT>
void run_rows(int isa, const float* x, int64_t M, int64_t K, int64_t ldx, const WT* w, int64_t N, const float* bias,
              float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  switch (isa) {
#if KR_CPU_X86
    case KR_CPU_ISA_AVX512_BF16:  // fp32 activations: the widening order
    case KR_CPU_ISA_AVX512: rows_avx512(x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end); return;
    case KR_CPU_ISA_AVX2: rows_avx2(x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end); return;
#endif
    default: rows_portable(x, M, K, ldx, w, bias, y, ldy, n_begin, n_end); return;
  }
}

void run_rows_bf16(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N,
                   const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  switch (isa) {
#if KR_CPU_X86
    case KR_CPU_ISA_AVX512_BF16: {
      const FlushDenormals flush;
      rows_bf16_avx512<true>(x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
      return;
    }
    case KR_CPU_ISA_AVX512: {
      const FlushDenormals flush;
      rows_bf16_avx512<false>(x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
      return;
    }
    case KR_CPU_ISA_AVX2: {
      const FlushDenormals flush;
      rows_bf16_avx2(x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
      return;
    }
#endif
    default: rows_portable_bf16(x, M, K, ldx, w, bias, y, ldy, n_begin, n_end); return;
  }
}

// Packed rows on a variant without a packed loop: each pack's rows unpacked into a row-major block, then that
// variant's row-major rows (the same operations, so the same bits).
void run_rows_bf16_packed(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N,
                          const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  constexpr int64_t P = KR_CPU_PACK_ROWS;
  switch (isa) {
#if KR_CPU_X86
    case KR_CPU_ISA_AVX512_BF16: {
      const FlushDenormals flush;
      rows_bf16_packed_avx512<true>(x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
      return;
    }
    case KR_CPU_ISA_AVX512: {
      const FlushDenormals flush;
      rows_bf16_packed_avx512<false>(x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
      return;
    }
#endif
    default: {
      static thread_local std::vector<uint16_t> block;
      block.resize(static_cast<size_t>(P * K));
      for (int64_t n = n_begin; n < n_end; n += P) {
        const uint16_t* pack = w + n * K;
        for (int64_t c = 0; c < K / kPairChunk; ++c)
          for (int64_t j = 0; j < P; ++j)
            std::memcpy(block.data() + j * K + c * kPairChunk, pack + (c * P + j) * kPairChunk,
                        kPairChunk * sizeof(uint16_t));
        run_rows_bf16(isa, x, M, K, ldx, block.data(), P, bias != nullptr ? bias + n : nullptr, y + n, ldy, 0, P);
      }
    }
  }
}

bool bad_rows_args(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t ldy, int64_t n_begin, int64_t n_end) {
  return M < 0 || K < 0 || N < 0 || n_begin < 0 || n_end < n_begin || n_end > N || (M > 1 && ldx < K) ||
         (M > 1 && ldy < n_end);
}

}  // namespace

extern "C" {

int kr_cpu_linear_rows_isa(int isa, const float* x, int64_t M, int64_t K, int64_t ldx, const void* w, int w_dtype,
                           int64_t N, const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  if (!cpu_runs(isa)) return KR_CPU_BAD_ISA;
  if (bad_rows_args(M, K, ldx, N, ldy, n_begin, n_end) || (w_dtype != KR_CPU_FLOAT32 && w_dtype != KR_CPU_BFLOAT16))
    return KR_CPU_BAD_ARGUMENT;
  if (M == 0 || n_begin == n_end) return KR_CPU_OK;
  if (y == nullptr || (K > 0 && (x == nullptr || w == nullptr))) return KR_CPU_BAD_ARGUMENT;  // K = 0: y = bias
  // Passes of at most KR_CPU_MAX_ROWS_PER_PASS rows keep the activations a pass re-reads in L2. Rows are
  // independent, so where a pass boundary falls changes no bits.
  for (int64_t m0 = 0; m0 < M; m0 += KR_CPU_MAX_ROWS_PER_PASS) {
    const int64_t rows = std::min<int64_t>(KR_CPU_MAX_ROWS_PER_PASS, M - m0);
    if (w_dtype == KR_CPU_FLOAT32)
      run_rows(isa, x + m0 * ldx, rows, K, ldx, static_cast<const float*>(w), N, bias, y + m0 * ldy, ldy, n_begin,
               n_end);
    else
      run_rows(isa, x + m0 * ldx, rows, K, ldx, static_cast<const uint16_t*>(w), N, bias, y + m0 * ldy, ldy,
               n_begin, n_end);
  }
  return KR_CPU_OK;
}

int kr_cpu_linear_rows_bf16(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w,
                            int64_t N, const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  if (!cpu_runs(isa)) return KR_CPU_BAD_ISA;
  if (bad_rows_args(M, K, ldx, N, ldy, n_begin, n_end)) return KR_CPU_BAD_ARGUMENT;
  if (M == 0 || n_begin == n_end) return KR_CPU_OK;
  if (y == nullptr || (K > 0 && (x == nullptr || w == nullptr))) return KR_CPU_BAD_ARGUMENT;
  for (int64_t m0 = 0; m0 < M; m0 += KR_CPU_MAX_ROWS_PER_PASS) {  // passes as in kr_cpu_linear_rows_isa
    const int64_t rows = std::min<int64_t>(KR_CPU_MAX_ROWS_PER_PASS, M - m0);
    run_rows_bf16(isa, x + m0 * ldx, rows, K, ldx, w, N, bias, y + m0 * ldy, ldy, n_begin, n_end);
  }
  return KR_CPU_OK;
}

int kr_cpu_linear_rows_bf16_packed(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w,
                                   int64_t N, const float* bias, float* y, int64_t ldy, int64_t n_begin,
                                   int64_t n_end) {
  if (!cpu_runs(isa)) return KR_CPU_BAD_ISA;
  if (bad_rows_args(M, K, ldx, N, ldy, n_begin, n_end) || K % kPairChunk != 0 || N % KR_CPU_PACK_ROWS != 0 ||
      n_begin % KR_CPU_PACK_ROWS != 0 || n_end % KR_CPU_PACK_ROWS != 0)
    return KR_CPU_BAD_ARGUMENT;
  if (M == 0 || n_begin == n_end) return KR_CPU_OK;
  if (y == nullptr || (K > 0 && (x == nullptr || w == nullptr))) return KR_CPU_BAD_ARGUMENT;
  for (int64_t m0 = 0; m0 < M; m0 += KR_CPU_MAX_ROWS_PER_PASS) {  // passes as in kr_cpu_linear_rows_isa
    const int64_t rows = std::min<int64_t>(KR_CPU_MAX_ROWS_PER_PASS, M - m0);
    run_rows_bf16_packed(isa, x + m0 * ldx, rows, K, ldx, w, N, bias, y + m0 * ldy, ldy, n_begin, n_end);
  }
  return KR_CPU_OK;
}

int kr_cpu_linear_rows(const float* x, int64_t M, int64_t K, int64_t ldx, const void* w, int w_dtype, int64_t N,
                       const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  const int isa = kr_cpu_isa();
  if (isa == KR_CPU_ISA_INVALID) return KR_CPU_BAD_ISA;
  return kr_cpu_linear_rows_isa(isa, x, M, K, ldx, w, w_dtype, N, bias, y, ldy, n_begin, n_end);
}

int kr_cpu_round_bf16(int isa, const float* src, uint16_t* dst, int64_t n) {
  if (!cpu_runs(isa)) return KR_CPU_BAD_ISA;
  if (n < 0 || (n > 0 && (src == nullptr || dst == nullptr))) return KR_CPU_BAD_ARGUMENT;
#if KR_CPU_X86
  if (isa >= KR_CPU_ISA_AVX512) {
    round_bf16_avx512(src, dst, n);
    return KR_CPU_OK;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = kr_cpu::float_to_bf16_bits(src[i]);
  return KR_CPU_OK;
}

}  // extern "C"
