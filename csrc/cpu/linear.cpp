// CPU linear kernel of the decode path: y = x W^T (+ bias) for a handful of activation rows, fp32 accumulation:
// fp32 activations with fp32 weights or bf16 weights (widened exactly to fp32); bf16 activations with bf16 weights
// take the order of AVX512-BF16's dot product, in linear_bf16.cpp. See kr_cpu.h for the contract.
//
// Memory: decoding a few rows is bound by reading the weights. The kernel takes a block of output rows (rows of
// W) and runs every activation row against it, in register-blocked groups, before it moves on: the block comes
// from DRAM once and is re-read from L1 for the other groups. Meanwhile a block about 9 KB ahead is prefetched
// (hint NTA, or T1: kr_cpu_prefetch_target()), a request for every line, spread evenly over the groups' K loops:
// that lets most of the arithmetic of 8 rows hide under the DRAM read (without it, 8 rows cost 1.4x one row in
// fp32; with it, 1.05x).
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
// bf16 activations with bf16 weights (a bf16 model) take a second order, in linear_bf16.cpp. The row loop and its
// prefetch, shared by both, are in kr_cpu_linear.h.
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kr_cpu_linear.h"

namespace {

using namespace kr_cpu_linear;
using kr_cpu::kLanes;
using kr_cpu::to_float;
using kr_cpu::tree16;

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

#if KR_CPU_X86

// fp32 x fp32 with 1-6 activation rows (plain and verify steps, a batch's rounds): blocks of 2 rows of W by all the
// rows in one group (2-12 accumulators). 1-4 rows joined on 2026-12-06, on this session's 2-core Zen 4 EPYC
// (bench_ab --in-process against the 4 x 4 blocks, cpu-20261206-s24-fp32-rows-1-4): the 1 / 2 / 4 row passes
// 0.89-0.93 / 0.95-1.01 / 0.75-0.82x, the plain step 0.91-0.92x, verify steps over 2 / 4 tokens 1.01x / 0.86-0.91x
// (not measured on the Zen 5 EPYC of the earlier sessions). 5-6 rows since 2026-12-06 (Zen 5), where 4 x 4 blocks
// take a group of 4 and one of 1-2 rows, the second re-reading the block from L1 while only the prefetch streams
// (which made 5-6 rows cost more than 7-8).
// Measured with bench_ab --in-process against 5e68e5f (SmolLM2's matrices, fp32, 2 threads, 3 x 8 repeats, paired
// medians, cpu-20261206-s20-fp32-rows56): the 5 / 6 row passes 0.89-0.91x / 0.94x, verify steps over 5 / 6 tokens
// 0.91x / 0.96x, 1, 4, 7 and 8 rows (unchanged code) 0.98-1.03x. The same blocks for 7-8 rows (2 x 8, two-by-eight/)
// took 1.04-1.05x the time in calls per matrix, 0.99x (7 rows) and 1.05x (8 rows) in one call per pass, and verify
// steps over 7 / 8 tokens 1.02x / 1.04x, where a scratch harness outside the layer stack had them 5-9% faster.
constexpr int kNbManyFp32 = 2, kMbManyFp32 = 6;
constexpr int kNbAvx2 = 2, kMbAvx2 = 3;

// ----- AVX-512: one zmm is the 16 lanes.

KR_TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

KR_TARGET_AVX512 inline __m512 load16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

using kr_cpu::load16_tail;

// The chunks of k in [k0, k1) of the block at w (NB rows of W, row stride K) against x (MB rows, row stride ldx),
// added to acc; k1 == K takes the zero-padded last chunk too. pf (a Prefetch or a RowsPrefetch) is stepped along
// the way, in proportion to k - k0.
template <int NB, int MB, typename WT, typename PF>
KR_TARGET_AVX512 KR_INLINE void tile_piece_avx512(const float* x, int64_t ldx, const WT* w, PF& pf, int64_t K,
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

// fp32 x fp32 with 7-8 activation rows and a wide K (SmolLM2's down projection, K = 1536): panels of kPanelBlocks
// 4 x 4 blocks (16 rows of W) taken a piece of K (kKPiece) at a time: for each piece, every block of the panel, each
// by both register groups, their accumulators kept in a buffer between pieces. Each lane still adds its k's in
// increasing order (a piece is a whole number of chunks of 16), so the bits are those of the whole-K loop. What
// that buys: the rows of x a piece reads (8 x 768 B) serve the panel's 4 blocks from L1, and the second group
// re-reads a block's piece straight after the first, where over the whole K the rows of x (48 KB for 8 rows, Zen
// 5's whole L1) and the 24.6 KB block came from L2 again. The software prefetch (RowsPrefetch) asks for exactly
// the piece of a block that comes kPrefetchUnits (block, piece) units later in this order, into the next panel at
// the end of one, where the first K-blocked build (2026-12-06: pieces of 256, one block at a time) requested the
// whole next block (24.6 KB ahead of the block being read) in contiguous slices of 2 KB, one per group and piece.
// Measured in a scratch harness over 120 down projections (2 threads, each a half of every matrix, paired with one
// row in every repeat), 8 rows over 1 row, against the one-block pieces: in the third of the repeats where the host
// streamed fastest (one row at 57-62 GB/s) 1.15-1.21x against 1.51-1.59x, in the others the same within 1-3%; with
// the weights in L2, one thread, 88-94 against 74-79 GMAC/s (fp32 peak 133). Pieces of 128 and 256 were 2-8%
// slower than 192 in the fast third; panels of 1, 2, 6 or 8 blocks slower; 8 units ahead the same as 4. At K = 576
// (whole-K pieces, 4-block panels) the harness measured 0.91x in the fast third and 0.99x in the others, but 0.86x
// the hot rate: not used there. bench_ab --in-process against the pieces of 256 (SmolLM2's matrices, fp32, 2
// threads, 4 x 8 repeats, paired medians, cpu-20261206-s21-panels): a run whose host stayed fast, 7-8 row passes
// 0.92-0.94x and verify steps over 7-8 tokens 0.93-0.95x; a run that swung, 0.92-0.95x in its fast third and
// 0.99-1.04x in its slow one. Panels for 5-6 rows (groups of 4 and 1-2) took 1.0-1.03x the 2-row blocks' time
// (rows56-tried/): those keep kNbManyFp32. bf16 x bf16 panels (pieces of 384 k's, the same bytes, for 5-8 rows)
// took 0.99-1.08x the whole-K 4 x 4 blocks' time (bf16-tried/): not used.
constexpr int64_t kKPiece = 192, kKBlockMinK = 1024;
constexpr int kPanelBlocks = 4, kPrefetchUnits = 4;

// Software prefetch (NTA, or T1 where kr_cpu_prefetch_target() says L2) of rows of W: bytes [0, row_bytes) of rows
// at row, row + row_stride, ..., requested at an
// even rate along a K loop (rate: fixed-point bytes per k, as Prefetch's), a line at a time.
struct RowsPrefetch {
  const char* row = nullptr;  // nullptr: nothing to prefetch
  int64_t row_stride = 0, row_bytes = 0, rate = 0, issued = 0, at = 0;
  bool l2 = false;  // T1 instead of NTA (kr_cpu_prefetch_target())

  static RowsPrefetch rows(const float* first, int64_t rows, int64_t K, int64_t k0, int64_t k1, int64_t span,
                           bool l2) {
    RowsPrefetch p;
    p.l2 = l2;
    p.row = reinterpret_cast<const char*>(first + k0);
    p.row_stride = K * static_cast<int64_t>(sizeof(float));
    // a row that does not start on a line (K not a multiple of 16) spans one more line than its bytes
    p.row_bytes = (k1 - k0) * static_cast<int64_t>(sizeof(float)) + (p.row_stride % 64 != 0 ? 63 : 0);
    p.rate = ((rows * ((p.row_bytes + 63) / 64 * 64)) << 16) / span;
    return p;
  }

  KR_TARGET_AVX2 inline void step(int64_t k) {
    if (row == nullptr) return;
    const int64_t until = (rate * k) >> 16;
    for (; issued < until; issued += 64) {
      if (l2)
        _mm_prefetch(row + at, _MM_HINT_T1);
      else
        _mm_prefetch(row + at, _MM_HINT_NTA);
      at += 64;
      if (at >= row_bytes) at = 0, row += row_stride;
    }
  }
};

// One register group's piece [k0, k1) of a block: its accumulators from saved (zeros for the first piece), and back
// to saved, or, after the last piece, summed into y.
template <int NB, int MB>
KR_TARGET_AVX512 KR_INLINE void panel_piece(const float* x, int64_t ldx, const float* block, RowsPrefetch pf,
                                            int64_t K, int64_t k0, int64_t k1, bool first, bool last,
                                            float (&saved)[NB][MB][kLanes], const float* bias, float* y,
                                            int64_t ldy) {
  __m512 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) acc[j][m] = first ? _mm512_setzero_ps() : _mm512_load_ps(saved[j][m]);
  tile_piece_avx512<NB, MB, float>(x, ldx, block, pf, K, k0, k1, acc);
  pf.step(k1 - k0);  // the rest of the unit ahead, where the piece ends in a partial chunk (its loop steps whole ones)
  if (last) return store_tile_avx512<NB, MB>(acc, bias, y, ldy);
  for (int j = 0; j < NB; ++j)
    for (int m = 0; m < MB; ++m) _mm512_store_ps(saved[j][m], acc[j][m]);
}

template <int MB1>
__attribute__((noinline, flatten)) KR_TARGET_AVX512 void rows_panels_avx512(
    const float* x, int64_t K, int64_t ldx, const float* w, int64_t N, const float* bias, float* y, int64_t ldy,
    int64_t n_begin, int64_t n_end) {
  constexpr int NB = kNbAvx512, MB0 = kMbAvx512, S = kPanelBlocks;
  const int64_t pieces = (K + kKPiece - 1) / kKPiece;
  alignas(64) float saved0[S][NB][MB0][kLanes], saved1[S][NB][MB1][kLanes];
  const bool l2 = kr_cpu_prefetch_target() == KR_CPU_PREFETCH_L2;
  int64_t n = n_begin;
  while (n + NB <= n_end) {
    const int64_t blocks = std::min<int64_t>(S, (n_end - n) / NB), units = pieces * blocks;
    // the panel after this one as far as W goes (it may be another thread's: a prefetch only reads), laid out as
    // the panel a range starting there would take, which it is when ranges are cut at multiples of 16 rows, as
    // KR_CPU_ROW_BLOCK asks and every caller here does (elsewhere only the prefetch's aim suffers)
    const int64_t next_n = n + blocks * NB, next_blocks = std::min<int64_t>(S, (N - next_n) / NB);
    for (int64_t p = 0; p < pieces; ++p) {
      const int64_t k0 = p * kKPiece, k1 = std::min(K, k0 + kKPiece);
      for (int64_t t = 0; t < blocks; ++t) {
        int64_t u = p * blocks + t + kPrefetchUnits, pn = n, pb = blocks;  // the unit ahead: (piece, block) of a panel
        if (u >= units) u -= units, pn = next_n, pb = next_blocks;
        RowsPrefetch pf0, pf1;
        if (pb > 0 && u < pieces * pb) {
          const float* ahead = w + (pn + (u % pb) * NB) * K;
          const int64_t a0 = (u / pb) * kKPiece, a1 = std::min(K, a0 + kKPiece);
          pf0 = RowsPrefetch::rows(ahead, NB / 2, K, a0, a1, k1 - k0, l2);  // rows 0-1 with the first group,
          pf1 = RowsPrefetch::rows(ahead + (NB / 2) * K, NB - NB / 2, K, a0, a1, k1 - k0, l2);  // 2-3 with the second
        }
        const float* block = w + (n + t * NB) * K;
        const float* b = bias != nullptr ? bias + n + t * NB : nullptr;
        panel_piece<NB, MB0>(x, ldx, block, pf0, K, k0, k1, p == 0, p + 1 == pieces, saved0[t], b, y + n + t * NB, ldy);
        panel_piece<NB, MB1>(x + MB0 * ldx, ldx, block, pf1, K, k0, k1, p == 0, p + 1 == pieces, saved1[t], b,
                             y + MB0 * ldy + n + t * NB, ldy);
      }
    }
    n = next_n;
  }
  // the last (n_end - n_begin) % NB rows of W: the whole-K path's one-row-at-a-time tail
  rows_path_avx512<NB, MB0, float>(x, MB0 + MB1, K, ldx, w, N, bias, y, ldy, n, n_end);
}

template <typename WT>
KR_TARGET_AVX512 void rows_avx512(const float* x, int64_t M, int64_t K, int64_t ldx, const WT* w, int64_t N,
                                  const float* bias, float* y, int64_t ldy, int64_t n_begin, int64_t n_end) {
  if constexpr (std::is_same_v<WT, float>) {
    if (M <= kMbManyFp32)
      return rows_path_avx512<kNbManyFp32, kMbManyFp32, WT>(x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
    if (K >= kKBlockMinK && (M == 7 || M == 8))
      return M == 7 ? rows_panels_avx512<3>(x, K, ldx, w, N, bias, y, ldy, n_begin, n_end)
                    : rows_panels_avx512<4>(x, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
  }
  rows_path_avx512<kNbAvx512, kMbAvx512, WT>(x, M, K, ldx, w, N, bias, y, ldy, n_begin, n_end);
}

// ----- AVX2 + FMA: the 16 lanes are two ymm, lanes 0-7 and 8-15.

KR_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

KR_TARGET_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
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
