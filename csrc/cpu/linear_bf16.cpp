// CPU linear kernel of a bf16 model's decode path: y = x W^T (+ bias) for a handful of bf16 activation rows with
// bf16 weights, fp32 accumulation (the fp32 kernel, its memory layout and its reduction order: linear.cpp; the row
// loop and prefetch both share: kr_cpu_linear.h).
//
// The reduction order (kr_cpu_linear_rows_bf16, where linear.cpp's fp32 activations have their own) is that of
// AVX512-BF16's vdpbf16ps, which multiplies and adds pairs of bf16 straight from memory, so one instruction does
// the 32 multiply-adds that widening takes two conversions and two FMAs for (measured here: the FMA-bound rows
// counts, M >= 4, cost about half). Lane l takes, per chunk of 32 k's, k = 32c + 2l + 1 and then k = 32c + 2l,
// each one fused multiply-add, with denormal inputs read as zero and denormal results flushed to zero (DAZ + FTZ,
// which vdpbf16ps always applies). The instruction's results were checked bit for bit against that description
// on 32 M random lanes (random bit patterns included) on the AMD EPYC of 2026-12-04. The other variants perform
// the same sequence (AVX-512 and AVX2 with two FMAs on the odd and even halves of each 32-bit pair, under the
// MXCSR's DAZ + FTZ; portable C++ with explicit flushes), and the whole call, lane sums and bias included, runs
// with denormals flushed, so again every variant gives the same bits.
#include <cstring>
#include <vector>

#include "kr_cpu_linear.h"

namespace {

using namespace kr_cpu_linear;
using kr_cpu::flush_denormal;
using kr_cpu::kLanes;

constexpr int64_t kPairChunk = 2 * kLanes;  // k's per step of the bf16 x bf16 order: a pair per lane

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

// bf16 x bf16 (AVX512-BF16) with 2-7 rows, as a verify step has (k + 1 for k drafts): blocks of 2 rows of W by all
// the activation rows, in one group, so that only 2 rows of W stream at a time. On the Zen 5 EPYC of the earlier
// sessions (SmolLM2-shaped random weights, 2 threads, interleaved A/B runs) the verify step (layers 1-29 and the
// head) over 3 / 4 tokens took 4.98-5.06 / 5.35-5.37 ms here against 5.81-5.90 / 5.96-6.11 with 4 x 4 blocks, and 5
// or more rows were slower or neutral here: one group of 5-8 rows, 16 accumulators, made the 8-row pass 1.08x
// slower; with the prefetch 9 KB ahead, 2 x 8 blocks took 0.99x / 1.03-1.06x the 5 / 8 row passes' time, verify
// steps over 5 / 8 tokens 0.98x / 1.03x, in a slow phase (cpu-20261206-s21-panels/bf16-2x8-tried); 5-8 rows in
// groups of up to 4 here, 0.99-1.07x (cpu-20261206-s23-tried/linear-2row-blocks-5-8). 5-7 rows joined on
// 2026-12-06 on this session's 2-core Zen 4 EPYC (bench_ab --in-process, cpu-20261206-s24-rows-5-7), where the 4 x 4
// blocks re-read each block for a 5th row: the 5 / 6 / 7 row passes 0.74-0.83 / 0.78-0.88 / 0.84-0.91x the time of
// the 4 x 4 blocks, verify steps over 5 / 6 / 7 tokens 0.75-0.78 / 0.81-0.84 / 0.92-0.94x; 8 rows in one group here
// measured 1.04-1.10x the pass and 1.04-1.06x the 8-token verify step, so 8 rows keep 4 x 4. The same blocks for
// fp32 were faster alone on the model's matrices but not inside the layer stack, and slower with bf16 weights widened
// to fp32: fp32 with 1-6 rows has its own 2-row blocks since 2026-12-06 (kNbManyFp32, linear.cpp).
// Two rows joined these blocks on 2026-12-05, from the one-row path's 8-row blocks with the NTA prefetch one block
// ahead (bench_ab --in-process, SmolLM2's matrices, 2 threads, context 600, four runs of 6-8 rounds): in the host's
// fast phases (plain step 4.8-5.1 ms) the two-row pass 0.955-0.968x and a 2-token verify step 0.957-0.959x, in its
// slow ones (6.2 ms) the pass 0.93-1.0x and the verify step 0.98-1.0x; 2 x 4 rows of W (the 5+ row blocks) gave
// 0.985-0.988x. With the T1 hint before it, the 8-row blocks had been the faster ones (0.85-0.92x).
constexpr int kNbFewBf16 = 2, kFewRowsMaxBf16 = 7;
// Their software prefetch goes about 4.5 KB ahead (2 blocks at K = 576, 1 at K = 1536), where the other paths go
// kPrefetchBytes (9 KB): on the Zen 4 host (bench_ab --in-process against 9 KB, cpu-20261206-s24-prefetch-bytes) the
// one-row pass 0.93-0.95x the time, a plain bf16 step 0.95-1.0x, a 5-token verify 0.97-0.98x; fp32's one and two
// rows 1.06-1.2x slower that way, so fp32 keeps 9 KB. 18 KB made every case 1.04-1.35x slower (18kb-tried/).
constexpr int64_t kPrefetchBytesFewBf16 = 4608;
// One activation row (a plain step, a draft step) of bf16 x bf16 on AVX-512 runs in the 2-7 rows' blocks of 2 rows
// of W, with their software prefetch (then 9 KB ahead), since 2026-12-06: measured on a 2-core AMD EPYC 9004
// (Zen 4, 29-58 GB/s) with bench_ab --in-process (cpu-20261206-s24-one-row), the one-row pass of SmolLM2's matrices
// 0.63-0.69x the time of the 8-row blocks below, a plain bf16 step 0.68-0.77x (the AVX-512 variant without
// AVX512-BF16 took the same path, untimed); there one row had been slower than
// two (plain step 13.2 ms, a 2-token verification 9.7). The 8-row blocks with the same prefetch measured 0.94-0.95x,
// 4-row blocks 0.95x: it is the two rows of W streaming at a time, not the prefetch, that pays there. Before, on the
// Zen 5 EPYC of the earlier sessions, one row had 8-row blocks without prefetch (8 independent accumulators: the
// pass 0.93-0.95x the time of 4 x 4 blocks; their prefetch made it slower there, 1.10-1.12x at one block ahead);
// one row in 2-row blocks was not measured on that machine.
// The packed layout (below) keeps 8-row blocks without prefetch for one and two rows.
constexpr int kNbOneRow = 8;
constexpr int kAheadOneRow = 0;

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
  // The 2-row blocks (1-7 rows since 2026-12-06) and the 4 x 4 ones (8+) take two chunks a trip (the same chunks in
  // the same order: the same bits). Measured
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
  if (M == 1)  // (its own path: the row count a literal, see above)
    return rows_path_bf16_avx512<kNbFewBf16, 1, kHw, 0, false, kPrefetchBytesFewBf16>(x, 1, K, ldx, w, N, bias, y,
                                                                                      ldy, n_begin, n_end);
  if (M <= kFewRowsMaxBf16)
    return rows_path_bf16_avx512<kNbFewBf16, kFewRowsMaxBf16, kHw, 0, false, kPrefetchBytesFewBf16>(
        x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
  return rows_path_bf16_avx512<kNbAvx512, kMbAvx512, kHw, 0, false, kPrefetchBytes>(x, M, K, ldx, w, N, bias, y,
                                                                                       ldy, n_begin, n_end);
}

// The packed layout's rows: blocks of KR_CPU_PACK_ROWS rows of W (kNbOneRow: the one-row path's blocks until
// 2026-12-06), each read as one sequential run of memory. One and two rows in 8-row blocks (two rows as the
// row-major path had them before 2026-12-05); more in groups of kMbPacked activation rows (24 accumulators) with
// the software prefetch of the 2 x 4 and 4 x 4 blocks. Measured against the row-major paths
// (bench_linear, SmolLM2's matrices, one call per pass, 2 threads, passes back to back as decode steps run,
// cpu-20261205-s12-linear-packed): 1 / 2 / 4 / 8 rows 0.95 / 0.99 / 0.97 / 0.96x, 16 / 32 / 64 rows 0.85 / 0.80 /
// 0.78x; scratch runs in one process gave 0.86-0.99x at 1-8 rows. After a torch pass instead (no warm pass before)
// 0.99-1.09x at 1-8 rows. Groups of 2 or no prefetch were slower from 4 or 5 rows on (up to 1.23x at 8 rows), groups
// of 4 (32 accumulators) mixed. Not used by the layer stack: a scratch build whose stack read packed weights took
// 1.04-1.10x the time of a plain step and 1.15-1.20x of a 2-token verify (0.97-0.99x at 5-7 tokens).
constexpr int kMbPacked = 3;
static_assert(KR_CPU_PACK_ROWS == kNbOneRow, "packs are kNbOneRow rows");
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

#endif  // KR_CPU_X86

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

}  // namespace

extern "C" {

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

}  // extern "C"
