// CPU attention of the decode path: a handful of new queries per row (a plain step's 1, a verification's k + 1)
// over the static KV cache, with per-row positions and GQA. See kr_cpu.h for the contract.
//
// Why not torch's fused SDPA: on CPU it rounds a query's result differently with the number of queries and of
// masked key slots in the call, so a verify pass would not give the bits of single steps, and for one query it
// costs about 100 us a layer here, where the arithmetic takes a few. A task is a tile of a few (query, head) pairs
// that read one kv head (GQA's heads of a group, a verify pass's queries): the AVX-512 path widens each key and
// value once for the whole tile and runs the tile's pairs side by side, which also gives the value sum enough
// independent accumulators to hide the latency of its fused multiply-adds. Each pair still runs the fixed sequence
// of kr_cpu.h, alone: a tile changes how many pairs share a load, never an operation of a pair. The loops over
// 16-lane arrays vectorize at the variant's width with the same bits.
//
// bf16 takes the pairs order of vdpbf16ps for both products, as the bf16 x bf16 linear does: the score, one
// instruction per 32 of a key's values against the query's own bits, where the fp32 order widens each key (two
// operations per 16 values) and needs two fused multiply-adds; the value sum, one instruction per two keys and 16
// outputs, with e_j rounded to bf16 (torch's CPU flash attention stores its probabilities in bf16 for that product
// too; the tolerance tests measure the same error as torch's). Variants without AVX512-BF16 perform the same
// sequence (two fused multiply-adds on the odd and even halves of each pair, or kr_cpu::fma_ftz), and the whole
// bf16 call runs under DAZ + FTZ so that everything around the products flushes alike too. Measured (bench_ab
// --in-process, SmolLM2's heads): a step's attention 0.84-0.95x, the most for many queries over many keys.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "kr_cpu.h"
#include "kr_cpu_avx512.h"
#include "kr_cpu_common.h"

namespace {

using kr_cpu::kLanes;

// Tasks: b * (Hkv * tiles) + g * tiles + t, tile t of the group*Q (query, head) pairs that read kv head g of row b.
// Pairs are numbered query-major (pair p: query p / group, head g * group + p % group), so that a tile mostly holds
// the heads of one query, which read the same keys. Tiles split the pairs as evenly as possible.
struct Tiling {
  int64_t group, pairs, tiles;

  explicit Tiling(const kr_cpu_attention_args& a)
      : group(a.n_heads / a.n_kv_heads), pairs(group * a.q_len),
        tiles(pairs == 0 ? 0 : (pairs + kr_cpu_attention_tile_pairs(a.head_dim) - 1) /
                                   kr_cpu_attention_tile_pairs(a.head_dim)) {}

  // Row, kv head and pair range [p0, p1) of a task.
  void task(const kr_cpu_attention_args& a, int64_t task, int64_t* b, int64_t* g, int64_t* p0, int64_t* p1) const {
    const int64_t t = task % tiles;
    *g = task / tiles % a.n_kv_heads;
    *b = task / tiles / a.n_kv_heads;
    *p0 = t * pairs / tiles;
    *p1 = (t + 1) * pairs / tiles;
  }
};

// The query's key count n (slots 0..n-1; 0 when its position is negative).
KR_INLINE int64_t visible_keys(const kr_cpu_attention_args& a, int64_t b, int64_t i) {
  const int64_t p = a.positions[b * a.pos_stride[0] + i * a.pos_stride[1]];
  return p < 0 ? 0 : std::min(p, a.kv_len - 1) + 1;  // (p + 1 could overflow)
}

// The pairs of a task: fn(kb, vb, q row, key count n >= 1, output row) for each pair that sees a key, where kb, vb
// are the task's kv head; a pair at a negative position gets a zero output.
template <typename T, typename Fn>
KR_INLINE void for_each_pair(const kr_cpu_attention_args& a, const Tiling& tiling, int64_t task, Fn&& fn) {
  int64_t b, g, p0, p1;
  tiling.task(a, task, &b, &g, &p0, &p1);
  const int64_t row = a.cache_rows != nullptr ? a.cache_rows[b] : b;
  const T* kb = static_cast<const T*>(a.k_cache) + row * a.cache_stride[0] + g * a.cache_stride[1];
  const T* vb = static_cast<const T*>(a.v_cache) + row * a.cache_stride[0] + g * a.cache_stride[1];
  for (int64_t pair = p0; pair < p1; ++pair) {
    const int64_t i = pair / tiling.group, h = g * tiling.group + pair % tiling.group;
    const int64_t n = visible_keys(a, b, i);
    T* o = static_cast<T*>(a.out) + b * a.out_stride[0] + h * a.out_stride[1] + i * a.out_stride[2];
    if (n == 0) {
      for (int64_t d = 0; d < a.head_dim; ++d) o[d] = kr_cpu::from_float<T>(0.0f);
      continue;
    }
    fn(kb, vb, static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] + i * a.q_stride[2], n, o);
  }
}

template <typename T>
KR_INLINE void attend_tasks(const kr_cpu_attention_args& a, int64_t task_begin, int64_t task_end) {
  const int64_t D = a.head_dim;
  const Tiling tiling(a);
  const int64_t d_pad = (D + kLanes - 1) / kLanes * kLanes;
  static thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(2 * d_pad + std::max<int64_t>(a.kv_len, 1)));
  float* qf = scratch.data();  // (d_pad,) the query, widened and zero-padded
  float* acc = qf + d_pad;     // (d_pad,) sum_j e_j v_j
  float* s = acc + d_pad;      // (kv_len,) scores, then their exponentials
  for (int64_t task = task_begin; task < task_end; ++task) {
    for_each_pair<T>(a, tiling, task, [&](const T* kb, const T* vb, const T* qr, int64_t n, T* o) {
      for (int64_t d = 0; d < d_pad; ++d) qf[d] = d < D ? kr_cpu::to_float(qr[d]) : 0.0f;
      float m = -3.402823466e38f;
      for (int64_t j = 0; j < n; ++j) {
        float sj;
        if constexpr (std::is_same_v<T, uint16_t>) {  // bf16: the pairs order of vdpbf16ps (see kr_cpu.h)
          float lanes[kLanes];
          kr_cpu::dot_bf16_pairs_lanes(qr, kb + j * a.cache_stride[2], D, lanes);
          sj = kr_cpu::tree16(lanes) * a.scale;
        } else {
          sj = kr_cpu::dot_fixed(qf, kb + j * a.cache_stride[2], D) * a.scale;
        }
        s[j] = sj;
        m = std::max(m, sj);
      }
      for (int64_t j = 0; j < n; ++j) s[j] = kr_cpu::round_to<T>(kr_cpu::exp_nonpositive(s[j] - m));
      const float l = kr_cpu::sum_fixed(s, n);
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
      if constexpr (std::is_same_v<T, uint16_t>) {  // bf16: keys in pairs, vdpbf16ps's order (see kr_cpu.h)
        for (int64_t j = 0; j < n; j += 2) {
          const T* v0 = vb + j * a.cache_stride[2];
          const T* v1 = j + 1 < n ? v0 + a.cache_stride[2] : nullptr;
          const float e1 = v1 != nullptr ? s[j + 1] : 0.0f;
          for (int64_t d = 0; d < D; ++d) {
            acc[d] = kr_cpu::fma_ftz(v1 != nullptr ? kr_cpu::to_float(v1[d]) : 0.0f, e1, acc[d]);
            acc[d] = kr_cpu::fma_ftz(kr_cpu::to_float(v0[d]), s[j], acc[d]);
          }
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const T* vr = vb + j * a.cache_stride[2];
          const float e = s[j];
          for (int64_t d = 0; d < D; ++d) acc[d] = std::fma(e, kr_cpu::to_float(vr[d]), acc[d]);
        }
      }
      for (int64_t d = 0; d < D; ++d) o[d] = kr_cpu::from_float<T>(acc[d] / l);
    });
  }
}

template <typename T>
void attend_portable(const kr_cpu_attention_args& a, int64_t t0, int64_t t1) { attend_tasks<T>(a, t0, t1); }

#if KR_CPU_X86
using kr_cpu::exp16;

template <typename T>
KR_TARGET_AVX2 void attend_avx2(const kr_cpu_attention_args& a, int64_t t0, int64_t t1) { attend_tasks<T>(a, t0, t1); }

// ----- AVX-512 with intrinsics, for head sizes that are a multiple of 16 up to kMaxChunks * 16: the same
// operations as attend_tasks in the same order (so the same bits), with the per-key trees of the scores done 16
// keys at a time (a transpose that adds exactly the pairs tree16 adds) and the output accumulated in registers.

constexpr int kMaxChunks = 8;  // head_dim <= 128

using kr_cpu::bf16_bits16;

KR_TARGET_AVX512 inline void store16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits16(v)));
}

// tree16(v[t]) for 16 keys' lane vectors v[0..15] at once, lane t of the result for key t: the pairs (i, i + 8),
// (i, i + 4), (i, i + 2), (0, 1) of each vector added by four rounds of shuffles, each round halving the vectors, and
// a final permute. The first round, for keys (2i, 2i + 1): lanes 0-7 the sums (l, l + 8) of a, 8-15 those of b.
KR_TARGET_AVX512 inline __m512 tree_round1(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}

// Its second round, of two first rounds (keys 4i..4i + 3): quarter k the sums (l, l + 4) of key 4i + k.
KR_TARGET_AVX512 inline __m512 tree_round2(__m512 x0, __m512 x1) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Its last two rounds and the permute, of the four second rounds z[0..3].
KR_TARGET_AVX512 inline __m512 tree_rounds34(const __m512* z) {
  __m512 w[2];
  for (int i = 0; i < 2; ++i)  // quarter k: (s2a, s2b) of v[8i + k], then of v[8i + 4 + k]
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // quarter k, lane m: s2a + s2b of v[4m + k]
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i where = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(where, s);
}

// The queries of a tile and their 16 score lanes against a key (to be summed by the tree above). fp32: q widened (qf,
// 16 * C floats a pair), lane l of chunk c takes d = 16c + l, one fused multiply-add each. bf16: q's own bits (qf
// holds them as uint16, zero-padded to whole chunks of 32), lane l takes the pair d = 32c + 2l + 1, then 32c + 2l,
// as vdpbf16ps does (kHw), or as two fused multiply-adds on the odd and even halves of each pair under the caller's
// DAZ + FTZ: the same operations, so the same bits.
template <typename T, int C, int NQ, bool kHw>
struct Query;

template <int C, int NQ, bool kHw>
struct Query<float, C, NQ, kHw> {
  __m512 qv[NQ][C];
  KR_TARGET_AVX512 explicit Query(const float* qf) {
    for (int q = 0; q < NQ; ++q)
      for (int c = 0; c < C; ++c) qv[q][c] = _mm512_loadu_ps(qf + q * 16 * C + 16 * c);
  }
  KR_TARGET_AVX512 inline void dots(const float* kr, __m512* out) const {
    __m512 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = _mm512_loadu_ps(kr + 16 * c);
    for (int q = 0; q < NQ; ++q) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) acc = _mm512_fmadd_ps(qv[q][c], kv[c], acc);
      out[q] = acc;
    }
  }
};

template <int C, int NQ, bool kHw>
struct Query<uint16_t, C, NQ, kHw> {
  static constexpr int P = (C + 1) / 2;  // chunks of 32
  __m512i qb[NQ][P];
  KR_TARGET_AVX512_BF16 explicit Query(const float* qf) {
    const uint16_t* q16 = reinterpret_cast<const uint16_t*>(qf);
    for (int q = 0; q < NQ; ++q)
      for (int p = 0; p < P; ++p) qb[q][p] = _mm512_loadu_si512(q16 + q * 32 * P + 32 * p);
  }
  KR_TARGET_AVX512_BF16 inline void dots(const uint16_t* kr, __m512* out) const {
    __m512i kv[P];
    for (int p = 0; p < P; ++p)  // (an odd C's last chunk holds 16 of the key's values: the rest read as zeros)
      kv[p] = (C % 2 == 1 && p == P - 1) ? _mm512_maskz_loadu_epi16(0xffffu, kr + 32 * p)
                                         : _mm512_loadu_si512(kr + 32 * p);
    for (int q = 0; q < NQ; ++q) {
      __m512 acc = _mm512_setzero_ps();
      for (int p = 0; p < P; ++p) acc = kr_cpu::dp_pairs<kHw>(acc, kv[p], qb[q][p]);
      out[q] = acc;
    }
  }
};

// The value sums of an fp32 tile, out = sum_j e_j v_j / l with e_j in s: each query's keys in order, one fused
// multiply-add each, the queries' chains interleaved.
template <int C, int NQ>
KR_TARGET_AVX512 void values_fp32(const int64_t* n, int64_t n_min, int64_t n_max, const float* vb, int64_t stride_t,
                                  const float* s, int64_t ls, const float* l, float* const* o) {
  __m512 acc[NQ][C];
  for (int q = 0; q < NQ; ++q)
    for (int c = 0; c < C; ++c) acc[q][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n_min; ++j) {  // every query's key
    const float* vr = vb + j * stride_t;
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = _mm512_loadu_ps(vr + 16 * c);
    for (int q = 0; q < NQ; ++q) {
      const __m512 e = _mm512_set1_ps(s[q * ls + j]);
      for (int c = 0; c < C; ++c) acc[q][c] = _mm512_fmadd_ps(e, vv[c], acc[q][c]);
    }
  }
  for (int64_t j = n_min; j < n_max; ++j) {  // the keys only some queries see (a verify pass's later ones)
    const float* vr = vb + j * stride_t;
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = _mm512_loadu_ps(vr + 16 * c);
    for (int q = 0; q < NQ; ++q) {
      if (j >= n[q]) continue;
      const __m512 e = _mm512_set1_ps(s[q * ls + j]);
      for (int c = 0; c < C; ++c) acc[q][c] = _mm512_fmadd_ps(e, vv[c], acc[q][c]);
    }
  }
  for (int q = 0; q < NQ; ++q) {
    const __m512 lq = _mm512_set1_ps(l[q]);
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(o[q] + 16 * c, _mm512_div_ps(acc[q][c], lq));
  }
}

// The value sums of a bf16 tile, out = sum_j e_j v_j / l with e_j in bf16 (eb, zero from n[q] on): keys in pairs
// (j, j + 1), j even, one vdpbf16ps each (kHw; otherwise two fused multiply-adds on the odd and even halves under
// the caller's DAZ + FTZ): output lane d takes e_{j+1} v_{j+1}[d] and then e_j v_j[d]. A pair whose second key is
// past a query's n gives it a zero row there, so that a query's operations are those it has alone. The two value
// rows are interleaved per 128-bit lane (unpacklo/hi), which leaves the outputs of each 32 values in the order
// [0-3, 8-11, 16-19, 24-27] and [4-7, 12-15, 20-23, 28-31]; a permute puts them back before the division.
template <int C, int NQ, bool kHw>
KR_TARGET_AVX512_BF16 void values_bf16(const int64_t* n, int64_t n_min, int64_t n_max, const uint16_t* vb,
                                       int64_t stride_t, const uint16_t* eb, int64_t ls, const float* l,
                                       uint16_t* const* o) {
  constexpr int P = (C + 1) / 2;  // 32 values a chunk
  __m512 acc[NQ][2 * P];
  for (int q = 0; q < NQ; ++q)
    for (int i = 0; i < 2 * P; ++i) acc[q][i] = _mm512_setzero_ps();
  // rows j and j + 1 (second: else zeros) interleaved: lo[p], hi[p] for chunk p
  auto rows = [&](int64_t j, bool second, __m512i* lo, __m512i* hi) KR_TARGET_AVX512_BF16 {
    const uint16_t* v0 = vb + j * stride_t;
    for (int p = 0; p < P; ++p) {
      const bool half = C % 2 == 1 && p == P - 1;  // an odd C's last chunk: 16 values, the rest zeros
      const __m512i a = half ? _mm512_maskz_loadu_epi16(0xffffu, v0 + 32 * p) : _mm512_loadu_si512(v0 + 32 * p);
      const __m512i b = !second ? _mm512_setzero_si512()
                        : half  ? _mm512_maskz_loadu_epi16(0xffffu, v0 + stride_t + 32 * p)
                                : _mm512_loadu_si512(v0 + stride_t + 32 * p);
      lo[p] = _mm512_unpacklo_epi16(a, b);
      hi[p] = _mm512_unpackhi_epi16(a, b);
    }
  };
  auto add = [&](int q, int64_t j, const __m512i* lo, const __m512i* hi) KR_TARGET_AVX512_BF16 {
    uint32_t pair;
    std::memcpy(&pair, eb + q * ls + j, sizeof pair);  // e_j in the low half, e_{j+1} in the high
    const __m512i e2 = _mm512_set1_epi32(static_cast<int>(pair));
    for (int p = 0; p < P; ++p) {
      acc[q][2 * p] = kr_cpu::dp_pairs<kHw>(acc[q][2 * p], lo[p], e2);
      acc[q][2 * p + 1] = kr_cpu::dp_pairs<kHw>(acc[q][2 * p + 1], hi[p], e2);
    }
  };
  __m512i lo[P], hi[P];
  const int64_t shared = n_min / 2 * 2;  // keys [0, shared): whole pairs every query sees
  for (int64_t j = 0; j < shared; j += 2) {
    rows(j, true, lo, hi);
    for (int q = 0; q < NQ; ++q) add(q, j, lo, hi);
  }
  for (int64_t j = shared; j < n_max; j += 2) {  // the pairs only some queries see, whole or with the second zeroed
    bool whole = false, halved = false;
    for (int q = 0; q < NQ; ++q) whole |= j + 1 < n[q], halved |= j + 1 == n[q];
    __m512i lo1[P], hi1[P];
    if (whole) rows(j, true, lo, hi);
    if (halved) rows(j, false, lo1, hi1);
    for (int q = 0; q < NQ; ++q) {
      if (j >= n[q]) continue;
      if (j + 1 < n[q])
        add(q, j, lo, hi);
      else
        add(q, j, lo1, hi1);
    }
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int q = 0; q < NQ; ++q) {
    const __m512 lq = _mm512_set1_ps(l[q]);
    for (int p = 0; p < P; ++p) {
      const __m512 a = acc[q][2 * p], b = acc[q][2 * p + 1];
      store16(o[q] + 32 * p, _mm512_div_ps(_mm512_permutex2var_ps(a, first, b), lq));
      if (!(C % 2 == 1 && p == P - 1))
        store16(o[q] + 32 * p + 16, _mm512_div_ps(_mm512_permutex2var_ps(a, second, b), lq));
    }
  }
}

// The NQ pairs of a tile, each one query over its n[q] >= 1 keys, side by side: the same operations per pair as
// attend_tasks in the same order (so the same bits), each key and value read once for all of them. The score of
// key j is the fixed-order dot times the scale, computed for j < max n (the keys past a pair's own n are real keys
// of the row, read for the others, and their scores are never used); the max is exact in any order. The value sum
// runs each pair's keys in order, the pairs' chains interleaved. x > -87 in exp16 matters only where the scalar
// clamps: max with -87 is the same select.
template <typename T, int C, int NQ, bool kHw>
KR_TARGET_AVX512_BF16 void attend_tile_avx512(const float* qf, const int64_t* n, const T* kb, const T* vb,
                                              int64_t stride_t, float scale, float* s, uint16_t* eb, int64_t ls,
                                              T* const* o) {
  constexpr bool kBf16 = std::is_same_v<T, uint16_t>;
  int64_t n_max = n[0], n_min = n[0];
  for (int q = 1; q < NQ; ++q) n_max = std::max(n_max, n[q]), n_min = std::min(n_min, n[q]);
  Query<T, C, NQ, kHw> query(qf);
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax[NQ];
  for (int q = 0; q < NQ; ++q) vmax[q] = _mm512_set1_ps(-3.402823466e38f);
  // 16 keys at a time, the tree's first two rounds taken as the keys come (two keys, then four), so that a tile's
  // dot vectors need not all be kept until the block ends (they had spilled to the stack): bf16 attention 0.88-0.96x
  // the time; fp32, whose widened queries take twice the registers, 0.99-1.03x (cpu-20261206-s22-tree-rounds)
  for (int64_t j0 = 0; j0 < n_max; j0 += 16) {
    const int cnt = static_cast<int>(std::min<int64_t>(16, n_max - j0));
    __m512 z[NQ][4];
    for (int g = 0; g < 4; ++g) {
      __m512 x[NQ][2];
      for (int h = 0; h < 2; ++h) {
        const int t = 4 * g + 2 * h;
        __m512 a[NQ], b[NQ];
        if (t < cnt) {
          query.dots(kb + (j0 + t) * stride_t, a);
        } else {
          for (int q = 0; q < NQ; ++q) a[q] = _mm512_setzero_ps();
        }
        if (t + 1 < cnt) {
          query.dots(kb + (j0 + t + 1) * stride_t, b);
        } else {
          for (int q = 0; q < NQ; ++q) b[q] = _mm512_setzero_ps();
        }
        for (int q = 0; q < NQ; ++q) x[q][h] = tree_round1(a[q], b[q]);
      }
      for (int q = 0; q < NQ; ++q) z[q][g] = tree_round2(x[q][0], x[q][1]);
    }
    for (int q = 0; q < NQ; ++q) {
      const int64_t live_n = std::min<int64_t>(16, std::max<int64_t>(0, n[q] - j0));
      const __mmask16 live = static_cast<__mmask16>((1u << live_n) - 1u);
      const __m512 sc = _mm512_mul_ps(tree_rounds34(z[q]), vscale);
      _mm512_mask_storeu_ps(s + q * ls + j0, live, sc);
      vmax[q] = _mm512_mask_max_ps(vmax[q], live, sc, vmax[q]);  // a NaN score is skipped, as by std::max(m, sj)
    }
  }
  float l[NQ];
  for (int q = 0; q < NQ; ++q) {
    float* sq = s + q * ls;
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax[q]));
    __m512 lanes = _mm512_setzero_ps();  // the 16 lanes of sum_fixed
    for (int64_t j0 = 0; j0 < n[q]; j0 += 16) {
      const int cnt = static_cast<int>(std::min<int64_t>(16, n[q] - j0));
      const __mmask16 live = static_cast<__mmask16>((1u << cnt) - 1u);
      __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, sq + j0), m)));
      if constexpr (kBf16 && kHw) {  // the same rounding in one instruction: round to nearest even, as bf16_bits16,
        // for the values e takes here, 0 or at least 2^-126 (x >= -87, and FTZ under the call's DAZ + FTZ): a denormal
        // input would flush to zero where bf16_bits16 rounds it. Its NaN keeps the sign and payload; NaN lanes take
        // bf16_bits16's 0x7fc0, so that eb holds the emulation's bits (the output is NaN either way).
        const __m256i h = _mm256_mask_mov_epi16((__m256i)_mm512_cvtneps_pbh(e),
                                                _mm512_cmp_ps_mask(e, e, _CMP_UNORD_Q), _mm256_set1_epi16(0x7fc0));
        e = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        _mm256_mask_storeu_epi16(eb + q * ls + j0, live, h);
      } else if constexpr (kBf16) {  // e_j rounded to bf16, as the value sum takes it, and its bits kept for that
        const __m512i bits = bf16_bits16(e);
        e = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
        _mm256_mask_storeu_epi16(eb + q * ls + j0, live, _mm512_cvtepi32_epi16(bits));
      } else {
        _mm512_mask_storeu_ps(sq + j0, live, e);
      }
      lanes = _mm512_add_ps(lanes, e);  // lanes past n add +0, as sum_fixed's zero padding
    }
    if constexpr (kBf16)
      for (int64_t j = n[q]; j <= n_max; ++j) eb[q * ls + j] = 0;  // the pairs past n take e = 0
    float lane_sums[16];
    _mm512_storeu_ps(lane_sums, lanes);
    l[q] = kr_cpu::tree16(lane_sums);
  }
  if constexpr (kBf16)
    values_bf16<C, NQ, kHw>(n, n_min, n_max, vb, stride_t, eb, ls, l, o);
  else
    values_fp32<C, NQ>(n, n_min, n_max, vb, stride_t, s, ls, l, o);
}

// attend_tile_avx512<T, C, nq, kHw> for 1 <= nq <= NQ.
template <typename T, int C, int NQ, bool kHw>
KR_TARGET_AVX512_BF16 void tile_avx512(int nq, const float* qf, const int64_t* n, const T* kb, const T* vb,
                                       int64_t stride_t, float scale, float* s, uint16_t* eb, int64_t ls,
                                       T* const* o) {
  if constexpr (NQ > 1) {
    if (nq < NQ) return tile_avx512<T, C, NQ - 1, kHw>(nq, qf, n, kb, vb, stride_t, scale, s, eb, ls, o);
  }
  attend_tile_avx512<T, C, NQ, kHw>(qf, n, kb, vb, stride_t, scale, s, eb, ls, o);
}

// kHw = false never reaches an AVX512-BF16 instruction: only kr_cpu::dp_pairs<true> has one (the target attribute
// is shared so that one template serves both, as in linear.cpp).
template <typename T, int C, bool kHw>
KR_TARGET_AVX512_BF16 void attend_tasks_avx512(const kr_cpu_attention_args& a, int64_t task_begin,
                                               int64_t task_end) {
  constexpr int NQ = 4;  // >= kr_cpu_attention_tile_pairs(16 * C)
  constexpr bool kBf16 = std::is_same_v<T, uint16_t>;
  constexpr int kQueryFloats = kBf16 ? 16 * ((C + 1) / 2) : 16 * C;  // a pair's q: 16 C floats or 32 P bf16
  const Tiling tiling(a);
  const int64_t ls = (a.kv_len + 15) / 16 * 16 + 16;  // a pair's scores
  static thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(NQ * kQueryFloats + NQ * ls + (kBf16 ? NQ * ls / 2 : 0)));
  float* qf = scratch.data();
  float* s = qf + NQ * kQueryFloats;
  uint16_t* eb = kBf16 ? reinterpret_cast<uint16_t*>(s + NQ * ls) : nullptr;  // bf16: e_j's bits, ls a query
  for (int64_t task = task_begin; task < task_end; ++task) {
    int nq = 0;
    int64_t n[NQ];
    T* o[NQ];
    const T *kb = nullptr, *vb = nullptr;
    for_each_pair<T>(a, tiling, task, [&](const T* k, const T* v, const T* qr, int64_t keys, T* out) {
      kb = k, vb = v;
      if constexpr (kBf16) {
        uint16_t* q16 = reinterpret_cast<uint16_t*>(qf + nq * kQueryFloats);
        for (int64_t d = 0; d < 2 * kQueryFloats; ++d) q16[d] = d < 16 * C ? qr[d] : 0;
      } else {
        for (int64_t d = 0; d < 16 * C; ++d) qf[nq * kQueryFloats + d] = kr_cpu::to_float(qr[d]);
      }
      n[nq] = keys;
      o[nq++] = out;
    });
    if (nq > 0) tile_avx512<T, C, NQ, kHw>(nq, qf, n, kb, vb, a.cache_stride[2], a.scale, s, eb, ls, o);
  }
}

template <typename T, bool kHw>
KR_TARGET_AVX512_BF16 void attend_avx512(const kr_cpu_attention_args& a, int64_t t0, int64_t t1) {
  switch (a.head_dim) {
    case 16: attend_tasks_avx512<T, 1, kHw>(a, t0, t1); return;
    case 32: attend_tasks_avx512<T, 2, kHw>(a, t0, t1); return;
    case 48: attend_tasks_avx512<T, 3, kHw>(a, t0, t1); return;
    case 64: attend_tasks_avx512<T, 4, kHw>(a, t0, t1); return;
    case 80: attend_tasks_avx512<T, 5, kHw>(a, t0, t1); return;
    case 96: attend_tasks_avx512<T, 6, kHw>(a, t0, t1); return;
    case 112: attend_tasks_avx512<T, 7, kHw>(a, t0, t1); return;
    case 128: attend_tasks_avx512<T, kMaxChunks, kHw>(a, t0, t1); return;
    default: attend_tasks<T>(a, t0, t1); return;
  }
}
#endif

template <typename T>
void attend(int isa, const kr_cpu_attention_args& a, int64_t t0, int64_t t1) {
#if KR_CPU_X86
  // bf16: the whole call with denormals flushed, in every variant (vdpbf16ps flushes whatever MXCSR says; the rest
  // of the call must then flush alike for the variants to agree).
  struct NoFlush {};
  using Flush = std::conditional_t<std::is_same_v<T, uint16_t>, kr_cpu::FlushDenormals, NoFlush>;
  const Flush flush;
  (void)flush;
  switch (isa) {
    case KR_CPU_ISA_AVX512_BF16:
      if constexpr (std::is_same_v<T, uint16_t>) return attend_avx512<T, true>(a, t0, t1);
      return attend_avx512<T, false>(a, t0, t1);
    case KR_CPU_ISA_AVX512: attend_avx512<T, false>(a, t0, t1); return;
    case KR_CPU_ISA_AVX2: attend_avx2<T>(a, t0, t1); return;
    default: attend_portable<T>(a, t0, t1); return;
  }
#else
  (void)isa;
  attend_portable<T>(a, t0, t1);
#endif
}

}  // namespace

extern "C" int64_t kr_cpu_attention_tile_pairs(int64_t head_dim) { return head_dim <= 64 ? 4 : 2; }

extern "C" int64_t kr_cpu_attention_tasks(const kr_cpu_attention_args* a) {
  if (a == nullptr || a->batch <= 0 || a->n_heads <= 0 || a->n_kv_heads <= 0 || a->n_heads % a->n_kv_heads != 0 ||
      a->q_len <= 0 || a->head_dim <= 0)
    return 0;
  return a->batch * a->n_kv_heads * Tiling(*a).tiles;
}

extern "C" int kr_cpu_attention(int isa, const kr_cpu_attention_args* a, int64_t task_begin, int64_t task_end) {
  if (!kr_cpu_isa_supported(isa)) return KR_CPU_BAD_ISA;
  if (a == nullptr || a->batch < 0 || a->n_heads <= 0 || a->n_kv_heads <= 0 || a->n_heads % a->n_kv_heads != 0 ||
      a->q_len < 0 || a->head_dim <= 0 || a->kv_len < 0 || task_begin < 0 || task_end < task_begin ||
      task_end > kr_cpu_attention_tasks(a) || (a->dtype != KR_CPU_FLOAT32 && a->dtype != KR_CPU_BFLOAT16))
    return KR_CPU_BAD_ARGUMENT;
  if (task_begin == task_end || a->q_len == 0) return KR_CPU_OK;
  if (a->q == nullptr || a->k_cache == nullptr || a->v_cache == nullptr || a->positions == nullptr ||
      a->out == nullptr)
    return KR_CPU_BAD_ARGUMENT;
  if (a->dtype == KR_CPU_FLOAT32)
    attend<float>(isa, *a, task_begin, task_end);
  else
    attend<uint16_t>(isa, *a, task_begin, task_end);
  return KR_CPU_OK;
}
