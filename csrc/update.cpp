// Pass C of the AGIP step on the CPU (docs/algorithm.md §1.3-1.6, 2.3): clip, AdamW, TA, the
// new mask, the saliency EMA and w, m, v * M'; with scores ahead, the next step's histogram
// (docs/design.md "Scores ahead") in one AVX-512 loop where the CPU has it.
#include "agip_cpu.h"

namespace agip_cpu {

// Calls f(std::bool_constant<b>...) for the runtime flags b..., so a loop is compiled once per case.
template <typename F>
void with_bools(F&& f) {
  f();
}
template <typename F, typename... Rest>
void with_bools(F&& f, bool first, Rest... rest) {
  auto bind = [&](auto c) { with_bools([&](auto... cs) { f(c, cs...); }, rest...); };
  if (first) bind(std::true_type{});
  else bind(std::false_type{});
}

// v^(Q/4) of a vector of lanes, correctly rounded square roots only (agip::fisher_factor), from
// v and sq = sqrt(v); one and vsqrt are the vector type's 1 and square root
template <int Q, typename V, typename Sqrt>
inline V fisher_factor_lanes(V v, V sq, V one, Sqrt vsqrt) {
  if constexpr (Q <= 0) return one;
  else if constexpr (Q == 1) return vsqrt(sq);
  else if constexpr (Q == 2) return sq;
  else return v;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define AGIP_ONE_LOOP_AHEAD 1
template <int Q>
inline __m512 fisher_factor16(__m512 v, __m512 sq) {
  return fisher_factor_lanes<Q>(v, sq, _mm512_set1_ps(1.f), [](__m512 x) { return _mm512_sqrt_ps(x); });
}

// A Fisher score (Q = 1: |w| v^(1/4), Q = 2: |w| v^(1/2)) against a bound B without square roots
// (docs/design.md "Scores against a bound"): with B = m 2^e, a = |w| 2^-e and R = 4 / Q,
// P = a^R v (fp32, a^2 first) is within 14 ulps of (S 2^-e)^R (S: the score as rounded: three
// roundings; P: four), and (B 2^-e)^R lies in [1, 16). So P > (B 2^-e)^R (1 + 2^-16) proves
// S > B and P < (B 2^-e)^R (1 - 2^-16) proves S < B; the rest (a^R overflowing, NaN) is
// unproven and scored exactly. Underflow needs no care: a product too small for a normal
// float belongs to a score far below B.
struct PowerBound {
  bool ok = false;  // B is a normal float with |e| <= 120; else nothing is proven
  float scale = 0.f, lo = 0.f, hi = 0.f;
};

template <int Q>
PowerBound power_bound(float b) {
  PowerBound pb;
  if (!std::isnormal(b) || b < 0.f) return pb;
  const int e = std::ilogb(b);
  if (e < -120 || e > 120) return pb;
  pb.scale = std::ldexp(1.0f, -e);
  const float mb = b * pb.scale, m2 = mb * mb, r = Q == 1 ? m2 * m2 : m2;
  pb.lo = r * (1.0f - 0x1p-16f);
  pb.hi = r * (1.0f + 0x1p-16f);
  pb.ok = true;
  return pb;
}

struct Proven {
  __mmask16 above, below;  // S > B proven, S < B proven (never both)
};

template <int Q>
inline Proven against(__m512 w, __m512 v, const PowerBound& pb) {
  const __m512 a = _mm512_mul_ps(_mm512_abs_ps(w), _mm512_set1_ps(pb.scale));
  const __m512 a2 = _mm512_mul_ps(a, a);
  const __m512 ar = Q == 1 ? _mm512_mul_ps(a2, a2) : a2;
  const __m512 p = _mm512_mul_ps(ar, v);
  const __mmask16 bad = _mm512_cmp_ps_mask(ar, _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  return {static_cast<__mmask16>(_mm512_cmp_ps_mask(p, _mm512_set1_ps(pb.hi), _CMP_GT_OQ) & ~bad),
          static_cast<__mmask16>(_mm512_cmp_ps_mask(p, _mm512_set1_ps(pb.lo), _CMP_LT_OQ) & ~bad)};
}

// keys of the scores of the counted lanes: below / above the window [lo, hi] counted, the
// others packed into keys at n (room for 16 more)
inline void window_keys(__m512 score, __mmask16 counted, __m512i vlo, __m512i vhi, uint32_t* __restrict__ keys,
                        int64_t& n, int64_t& nb, int64_t& na) {
  const __m512i key = _mm512_castps_si512(score), bin = _mm512_srli_epi32(key, 16);
  const __mmask16 lt = _mm512_mask_cmplt_epu32_mask(counted, bin, vlo), gt = _mm512_mask_cmpgt_epu32_mask(counted, bin, vhi);
  const __mmask16 in = counted & ~(lt | gt);
  nb += __builtin_popcount(lt);
  na += __builtin_popcount(gt);
  _mm512_storeu_si512(keys + n, _mm512_maskz_compress_epi32(in, key));
  n += __builtin_popcount(in);
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

// A pruning step's update of one fp32 tile [t0, t1) with scores ahead, without regrowth or EMA,
// in one loop over 16 lanes (docs/design.md "Scores ahead"): AdamW + TA as agip::adamw, this
// step's M' = (S > theta) with S the score of v_(t-1) (beta2' v + omb2' ghat^2), w, m, v * M',
// then the next step's score of what it stores, |w| v^(Q/4), with AdamW's own sqrt(v), its key
// counted below / above the window or packed into keys (returns how many) for the histogram.
// BOUNDED (Q = 1 or 2; bt: theta's bound, bw: that of the first score above the window):
// whatever the bounds prove needs no square root; the next scores not proven above the window
// are packed (|w|, sqrt(v)) into pw, ps and scored after the loop. Every operation is the
// scalar code's, in its order (no fused multiply-adds), so every bit is the same.
template <int Q, bool BOUNDED>
int64_t update_tile_ahead(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                          float* __restrict__ v, uint8_t* __restrict__ mask, int64_t t0, int64_t t1, const UpdateArgs& a,
                          uint32_t lo, uint32_t hi, uint32_t* __restrict__ keys, int64_t& below, int64_t& above,
                          const PowerBound& bt, const PowerBound& bw, float* __restrict__ pw, float* __restrict__ ps) {
  const __m512 decay = _mm512_set1_ps(a.decay), lw = _mm512_set1_ps(a.lerp_weight),
               omlw = _mm512_set1_ps(1.0f - a.lerp_weight), beta2 = _mm512_set1_ps(a.beta2),
               omb2 = _mm512_set1_ps(a.one_minus_beta2), step = _mm512_set1_ps(a.step_size),
               bc2 = _mm512_set1_ps(a.bc2_sqrt), eps = _mm512_set1_ps(a.eps), clip = _mm512_set1_ps(a.clip),
               nls = _mm512_set1_ps(a.neg_lr_s), theta = _mm512_set1_ps(a.theta), sb2 = _mm512_set1_ps(a.score_beta2),
               somb2 = _mm512_set1_ps(a.score_omb2), zero = _mm512_setzero_ps();
  const __m512i vlo = _mm512_set1_epi32(static_cast<int32_t>(lo)), vhi = _mm512_set1_epi32(static_cast<int32_t>(hi));
  const __mmask16 small = a.lerp_weight < 0.5f ? 0xFFFF : 0;  // lerp's two branches, as torch (agip::adamw)
  int64_t n = 0, nb = 0, na = 0, np = 0;
  // full vectors load and store unmasked (AMD's masked stores are slow); the tail is masked
  auto vector = [&](int64_t i, __mmask16 lm, auto full) {
    constexpr bool FULL = decltype(full)::value;
    auto load = [&](const float* p) { return FULL ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lm, p); };
    auto store = [&](float* p, __m512 x) {
      if constexpr (FULL) _mm512_storeu_ps(p, x);
      else _mm512_mask_storeu_ps(p, lm, x);
    };
    const __m512 w0 = load(w + i), gi = load(g + i), m0 = load(m + i), v0 = load(v + i);
    const __m128i m8 = FULL ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(mask + i)) : _mm_maskz_loadu_epi8(lm, mask + i);
    const __m512 act = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m8));
    const __m512 ghat = _mm512_mul_ps(_mm512_mul_ps(gi, act), clip);
    // AdamW and the terminal attractor (agip::adamw)
    __m512 wi = _mm512_mul_ps(w0, decay);
    const __m512 d = _mm512_sub_ps(ghat, m0);
    const __m512 mi = _mm512_mask_blend_ps(small, _mm512_sub_ps(ghat, _mm512_mul_ps(d, omlw)),
                                           _mm512_add_ps(m0, _mm512_mul_ps(lw, d)));
    const __m512 vi = _mm512_add_ps(_mm512_mul_ps(v0, beta2), _mm512_mul_ps(_mm512_mul_ps(omb2, ghat), ghat));
    const __m512 sq = _mm512_sqrt_ps(vi);
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(sq, bc2), eps);
    wi = _mm512_add_ps(wi, _mm512_mul_ps(step, _mm512_div_ps(mi, denom)));
    wi = _mm512_add_ps(wi, _mm512_mul_ps(nls, ghat));
    // this step's score of v_(t-1) and M' = (S > theta) (agip::score of agip::second_moment, no regrowth)
    const __m512 vs = _mm512_add_ps(_mm512_mul_ps(v0, sb2), _mm512_mul_ps(_mm512_mul_ps(somb2, ghat), ghat));
    __mmask16 kept;
    if constexpr (BOUNDED) {
      const Proven pr = against<Q>(w0, vs, bt);
      kept = pr.above & lm;
      if (const __mmask16 unsure = lm & ~(pr.above | pr.below)) {
        const __m512 s = _mm512_mul_ps(_mm512_abs_ps(w0), fisher_factor16<Q>(vs, _mm512_sqrt_ps(vs)));
        kept |= _mm512_mask_cmp_ps_mask(unsure, s, theta, _CMP_GT_OQ);
      }
    } else {
      const __m512 s = _mm512_mul_ps(_mm512_abs_ps(w0), fisher_factor16<Q>(vs, _mm512_sqrt_ps(vs)));
      kept = _mm512_cmp_ps_mask(s, theta, _CMP_GT_OQ) & lm;
    }
    const __m512 ws = _mm512_mask_blend_ps(kept, zero, wi), vst = _mm512_mask_blend_ps(kept, zero, vi);
    store(w + i, ws);
    store(m + i, _mm512_mask_blend_ps(kept, zero, mi));
    store(v + i, vst);
    if constexpr (FULL) _mm_storeu_si128(reinterpret_cast<__m128i*>(mask + i), _mm_maskz_set1_epi8(kept, 1));
    else _mm_mask_storeu_epi8(mask + i, lm, _mm_maskz_set1_epi8(kept, 1));
    // the next step's score of the kept entries, from what was stored (sqrt(v) is AdamW's own)
    if constexpr (BOUNDED) {
      const __mmask16 up = against<Q>(ws, vst, bw).above & kept, rest = kept & ~up;
      na += __builtin_popcount(up);
      _mm512_storeu_ps(pw + np, _mm512_maskz_compress_ps(rest, _mm512_abs_ps(ws)));
      _mm512_storeu_ps(ps + np, _mm512_maskz_compress_ps(rest, sq));
      np += __builtin_popcount(rest);
    } else {
      window_keys(_mm512_mul_ps(_mm512_abs_ps(ws), fisher_factor16<Q>(vst, sq)), kept, vlo, vhi, keys, n, nb, na);
    }
  };
  int64_t i = t0;
  for (; i + 16 <= t1; i += 16) vector(i, static_cast<__mmask16>(0xFFFF), std::true_type{});
  if (i < t1) vector(i, tail_mask(t1 - i), std::false_type{});
  if constexpr (BOUNDED) {  // the packed next scores, exactly: |w| v^(Q/4) from |w| and sqrt(v)
    for (int64_t j = 0; j < np; j += 16) {
      const __mmask16 lm = tail_mask(np - j);
      const __m512 sq = _mm512_maskz_loadu_ps(lm, ps + j);
      window_keys(_mm512_mul_ps(_mm512_maskz_loadu_ps(lm, pw + j), fisher_factor16<Q>(sq, sq)), lm, vlo, vhi, keys, n,
                  nb, na);
    }
  }
  below += nb;
  above += na;
  return n;
}
#elif defined(__AVX2__) && !defined(__AVX512F__)  // (COMPRESS_LANES: agip_cpu.h)
#define AGIP_ONE_LOOP_AHEAD_AVX2 1
template <int Q>
inline __m256 fisher_factor8(__m256 v, __m256 sq) {
  return fisher_factor_lanes<Q>(v, sq, _mm256_set1_ps(1.f), [](__m256 x) { return _mm256_sqrt_ps(x); });
}

inline __m256 abs8(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }

// the bytes 0/1 of an 8-bit mask, for the mask store (2 KiB)
constexpr std::array<uint64_t, 256> mask_bytes() {
  std::array<uint64_t, 256> t{};
  for (int k = 0; k < 256; ++k)
    for (int l = 0; l < 8; ++l) t[k] |= static_cast<uint64_t>(k >> l & 1) << (8 * l);
  return t;
}
alignas(64) constexpr auto MASK_BYTES = mask_bytes();

// update_tile_ahead for AVX2 (8 lanes; no bounds: on an AVX2 Zen 3 deciding the mask without
// square roots was slower, docs/performance.md): the same operations in the same order as the
// scalar code, so the same bits. The tail (< 8 entries) runs the same vector code on a copy
// padded with zeros; only its valid lanes are written back and counted.
template <int Q>
int64_t update_tile_ahead8(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                           float* __restrict__ v, uint8_t* __restrict__ mask, int64_t t0, int64_t t1, const UpdateArgs& a,
                           uint32_t lo, uint32_t hi, uint32_t* __restrict__ keys, int64_t& below, int64_t& above) {
  const __m256 decay = _mm256_set1_ps(a.decay), lw = _mm256_set1_ps(a.lerp_weight),
               omlw = _mm256_set1_ps(1.0f - a.lerp_weight), beta2 = _mm256_set1_ps(a.beta2),
               omb2 = _mm256_set1_ps(a.one_minus_beta2), step = _mm256_set1_ps(a.step_size),
               bc2 = _mm256_set1_ps(a.bc2_sqrt), eps = _mm256_set1_ps(a.eps), clip = _mm256_set1_ps(a.clip),
               nls = _mm256_set1_ps(a.neg_lr_s), theta = _mm256_set1_ps(a.theta), sb2 = _mm256_set1_ps(a.score_beta2),
               somb2 = _mm256_set1_ps(a.score_omb2);
  // bins are 16-bit: signed compares order them as unsigned ones would
  const __m256i vlo = _mm256_set1_epi32(static_cast<int32_t>(lo)), vhi = _mm256_set1_epi32(static_cast<int32_t>(hi));
  const bool small = a.lerp_weight < 0.5f;  // lerp's two branches, as torch (agip::adamw)
  int64_t n = 0, nb = 0, na = 0;
  auto vector = [&](float* wp, const float* gp, float* mp, float* vp, uint8_t* mkp, int valid) {
    const __m256 w0 = _mm256_loadu_ps(wp), gi = _mm256_loadu_ps(gp), m0 = _mm256_loadu_ps(mp), v0 = _mm256_loadu_ps(vp);
    const __m256 act = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mkp))));
    const __m256 ghat = _mm256_mul_ps(_mm256_mul_ps(gi, act), clip);
    // AdamW and the terminal attractor (agip::adamw)
    __m256 wi = _mm256_mul_ps(w0, decay);
    const __m256 d = _mm256_sub_ps(ghat, m0);
    const __m256 mi = small ? _mm256_add_ps(m0, _mm256_mul_ps(lw, d)) : _mm256_sub_ps(ghat, _mm256_mul_ps(d, omlw));
    const __m256 vi = _mm256_add_ps(_mm256_mul_ps(v0, beta2), _mm256_mul_ps(_mm256_mul_ps(omb2, ghat), ghat));
    const __m256 sq = _mm256_sqrt_ps(vi);
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(sq, bc2), eps);
    wi = _mm256_add_ps(wi, _mm256_mul_ps(step, _mm256_div_ps(mi, denom)));
    wi = _mm256_add_ps(wi, _mm256_mul_ps(nls, ghat));
    // this step's score of v_(t-1) and M' = (S > theta) (agip::score of agip::second_moment, no regrowth)
    const __m256 vs = _mm256_add_ps(_mm256_mul_ps(v0, sb2), _mm256_mul_ps(_mm256_mul_ps(somb2, ghat), ghat));
    const __m256 s = _mm256_mul_ps(abs8(w0), fisher_factor8<Q>(vs, _mm256_sqrt_ps(vs)));
    const __m256 keep = _mm256_cmp_ps(s, theta, _CMP_GT_OQ);
    const int kept = _mm256_movemask_ps(keep) & valid;
    const __m256 ws = _mm256_and_ps(keep, wi), vst = _mm256_and_ps(keep, vi);
    _mm256_storeu_ps(wp, ws);
    _mm256_storeu_ps(mp, _mm256_and_ps(keep, mi));
    _mm256_storeu_ps(vp, vst);
    std::memcpy(mkp, &MASK_BYTES[kept], 8);
    // the next step's score of the kept entries, from what was stored (sqrt(v) is AdamW's own)
    const __m256i key = _mm256_castps_si256(_mm256_mul_ps(abs8(ws), fisher_factor8<Q>(vst, sq)));
    const __m256i bin = _mm256_srli_epi32(key, 16);
    const int lt = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(vlo, bin))) & kept;
    const int gt = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bin, vhi))) & kept;
    const int in = kept & ~(lt | gt);
    nb += __builtin_popcount(lt);
    na += __builtin_popcount(gt);
    const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(COMPRESS_LANES[in].data()));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + n), _mm256_permutevar8x32_epi32(key, lanes));
    n += __builtin_popcount(in);
  };
  int64_t i = t0;
  for (; i + 8 <= t1; i += 8) vector(w + i, g + i, m + i, v + i, mask + i, 0xFF);
  if (const int64_t left = t1 - i) {
    alignas(32) float tw[8] = {}, tg[8] = {}, tm[8] = {}, tv[8] = {};
    uint8_t tk[8] = {};
    std::memcpy(tw, w + i, left * sizeof(float));
    std::memcpy(tg, g + i, left * sizeof(float));
    std::memcpy(tm, m + i, left * sizeof(float));
    std::memcpy(tv, v + i, left * sizeof(float));
    std::memcpy(tk, mask + i, left);
    vector(tw, tg, tm, tv, tk, (1 << left) - 1);
    std::memcpy(w + i, tw, left * sizeof(float));
    std::memcpy(m + i, tm, left * sizeof(float));
    std::memcpy(v + i, tv, left * sizeof(float));
    std::memcpy(mask + i, tk, left);
  }
  below += nb;
  above += na;
  return n;
}
#endif

// Pass C over [lo, hi). AHEAD (the Fisher score, no EMA): then, one tile at a time while it
// is in the cache, the keys of the next step's score of v_(t-1) = the v just stored, of the
// entries that stay active, into a thread's WindowLocal (docs/design.md "Scores ahead"),
// computed by pass A's own tile_keys from the values as stored, so they are the keys pass A
// would find. (In the update loop itself they stopped it vectorizing: 332 -> 687 ms at 134.5M.)
// With AVX-512, fp32 buckets, the score of v_(t-1) and no regrowth, update_tile_ahead does all of
// it in one loop per tile instead (on a Zen 5 the pruning step 0.81-0.87x of the time of these loops).
template <typename T, bool PRUNABLE, bool PRUNE_STEP, int SCORE, bool HAS_EMA, bool SCORE_VT, bool AHEAD>
void update_range(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                  uint8_t* __restrict__ mask, float* __restrict__ ema, int64_t lo, int64_t hi, const UpdateArgs a,
                  Window* win, WindowLocal* ahead) {
  static_assert(!AHEAD || (PRUNABLE && SCORE >= 0 && !HAS_EMA), "scores ahead: the Fisher score, no EMA");
  // scalars in locals: loads through a struct inside the loop block vectorization
  const float decay = a.decay, lw = a.lerp_weight, beta2 = a.beta2, omb2 = a.one_minus_beta2,
              step_size = a.step_size, bc2_sqrt = a.bc2_sqrt, eps = a.eps, clip = a.clip, neg_lr_s = a.neg_lr_s,
              theta = a.theta, regrow_theta = a.regrow_theta, keep = a.ema_keep, fresh = a.ema_new,
              sb2 = a.score_beta2, somb2 = a.score_omb2;
  // SCORE_VT: the score reads v_t, which the update computes; else v_(t-1) as stored (sb2, somb2 = 1, 0).
  // A template parameter, not a runtime select: the select stopped the loop vectorizing (Fisher pruning
  // step 424 -> 624 ms at 134.5M)
  const float one_minus_lw = 1.0f - lw;
  const bool small = lw < 0.5f;
  const float inf = std::numeric_limits<float>::infinity();
  const ScoreArgs none{};  // the next step's score reads w and v as stored (STORED): no constants
  uint32_t keys[AHEAD ? TILE + 16 : 1];  // (+16: a 16-lane store past the packed keys)
  // tiles only for AHEAD; else the whole range in one loop
  const int64_t tile = AHEAD ? TILE : std::max<int64_t>(hi - lo, 1);
#ifdef AGIP_ONE_LOOP_AHEAD
  // fp32, the score of v_(t-1), no regrowth: the whole tile in one AVX-512 loop
  constexpr bool ONE_LOOP = AHEAD && PRUNE_STEP && !SCORE_VT && !HAS_EMA && std::is_same_v<T, float>;
  if constexpr (ONE_LOOP) {
    if (regrow_theta == inf) {
      // square roots only where the bounds prove nothing (p = 1/4, 1/2; theta and the first
      // score above the window normal floats)
      PowerBound bt, bw;
      if constexpr (SCORE == 1 || SCORE == 2) {
        bt = power_bound<SCORE>(theta);
        if (win->hi + 1 < static_cast<uint32_t>(HIST_BINS)) bw = power_bound<SCORE>(bits_float((win->hi + 1) << 16));
      }
      alignas(64) float pw[TILE + 16], ps[TILE + 16];
      for (int64_t t0 = lo; t0 < hi; t0 += TILE) {
        const int64_t t1 = std::min(hi, t0 + TILE);
        const int64_t n =
            (SCORE == 1 || SCORE == 2) && bt.ok && bw.ok
                ? update_tile_ahead<SCORE, SCORE == 1 || SCORE == 2>(w, g, m, v, mask, t0, t1, a, win->lo, win->hi, keys,
                                                                   ahead->below, ahead->above, bt, bw, pw, ps)
                : update_tile_ahead<SCORE, false>(w, g, m, v, mask, t0, t1, a, win->lo, win->hi, keys, ahead->below,
                                                 ahead->above, bt, bw, pw, ps);
        ahead->add_packed(*win, keys, n);
      }
      return;
    }
  }
#elif defined(AGIP_ONE_LOOP_AHEAD_AVX2)
  // the same on AVX2: the whole tile in one 8-lane loop
  constexpr bool ONE_LOOP = AHEAD && PRUNE_STEP && !SCORE_VT && !HAS_EMA && std::is_same_v<T, float>;
  if constexpr (ONE_LOOP) {
    if (regrow_theta == inf) {
      for (int64_t t0 = lo; t0 < hi; t0 += TILE) {
        const int64_t t1 = std::min(hi, t0 + TILE);
        ahead->add_packed(*win, keys, update_tile_ahead8<SCORE>(w, g, m, v, mask, t0, t1, a, win->lo, win->hi, keys,
                                                               ahead->below, ahead->above));
      }
      return;
    }
  }
#endif
  for (int64_t t0 = lo; t0 < hi; t0 += tile) {
    const int64_t t1 = std::min(hi, t0 + tile);
#pragma GCC ivdep
    for (int64_t i = t0; i < t1; ++i) {
      const float w0 = static_cast<float>(w[i]), gi = static_cast<float>(g[i]);
      const float v0 = static_cast<float>(v[i]);
      float wi = w0, mi = static_cast<float>(m[i]), vi = v0;
      float ghat, act = 1.f;
      if constexpr (PRUNABLE) {
        act = static_cast<float>(mask[i]);
        ghat = gi * act * clip;  // the gradient of the active network, clipped
      } else {
        ghat = gi * clip;
      }
      // AdamW and the terminal attractor; vi becomes v_t, which the Fisher score reads
      agip::adamw(wi, mi, vi, ghat, decay, lw, one_minus_lw, small, beta2, omb2, step_size, bc2_sqrt, eps, neg_lr_s);
      if constexpr (PRUNABLE) {
        // the score from pre-update w and raw g (Taylor) or v_t (Fisher), as in stats/refine
        float s;
        if constexpr (SCORE_VT) s = agip::score<SCORE>(w0, gi, vi);
        else s = agip::score<SCORE>(w0, gi, agip::second_moment(v0, ghat, sb2, somb2));
        if constexpr (HAS_EMA) s = ema[i] * keep + s * fresh;
        bool kept = act != 0.f;
        if constexpr (PRUNE_STEP) {
          const bool grown = act == 0.f && std::fabs(gi) > regrow_theta;
          kept = (grown ? inf : s) > theta;
          mask[i] = static_cast<uint8_t>(kept);
        }
        wi = kept ? wi : 0.f;
        mi = kept ? mi : 0.f;
        vi = kept ? vi : 0.f;
        if constexpr (HAS_EMA) ema[i] = kept ? s : 0.f;
      }
      w[i] = static_cast<T>(wi);
      m[i] = static_cast<T>(mi);
      v[i] = static_cast<T>(vi);
    }
    if constexpr (AHEAD)
      ahead->add(*win, keys, t1 - t0,
                 tile_keys<true, SCORE, false, T, true>(w, g, v, mask, nullptr, t0, t1 - t0, none, win->lo, win->hi, keys,
                                               ahead->below, ahead->above));
  }
}

// Pass C over [start, end) of one bucket (one param group's range); numbers are
// agip.backends.UpdateArgs.numbers(), the flags its last three fields. With ahead_hist
// (a prunable range, the Fisher score of v_(t-1), no EMA): also adds the first-digit
// histogram of the next step's score of the entries that stay active over the window
// [ahead_lo, ahead_hi] (lumps next to it, as stats does), and with cand / cand_n appends
// the keys in [cand_lo, cand_hi] to cand (cand_n: the count so far, -1 once they did not fit).
void update(Tensor w, Tensor g, Tensor m, Tensor v, Tensor mask,
            c10::optional<Tensor> ema, int64_t start, int64_t end, std::vector<double> numbers, bool prunable,
            bool prune_step, int64_t fisher_q, c10::optional<Tensor> ahead_hist, int64_t ahead_lo,
            int64_t ahead_hi, c10::optional<Tensor> cand, c10::optional<Tensor> cand_n, int64_t cand_lo,
            int64_t cand_hi) {
  check_bucket(w, "w");
  TORCH_CHECK(g.scalar_type() == w.scalar_type() && m.scalar_type() == w.scalar_type() && v.scalar_type() == w.scalar_type(),
              "w, g, m, v must share a dtype");
  TORCH_CHECK(0 <= start && start <= end && end <= w.numel(), "bad range");
  TORCH_CHECK(!prunable || end <= mask.numel(), "a prunable range must lie inside the mask");
  const UpdateArgs args = update_args(numbers);
  uint8_t* mk = const_cast<uint8_t*>(mask_ptr(mask));
  float* em = (prunable && ema.has_value()) ? ema->data_ptr<float>() : nullptr;
  // the score's moment: v_t (unless its constants say v_(t-1)); Taylor ignores it
  const bool vt = fisher_q < 0 || (args.score_beta2 == args.beta2 && args.score_omb2 == args.one_minus_beta2);
  const bool ahead = ahead_hist.has_value();
  // (this step's own score may still be of v_t: step 1, algorithm.md §2.1b)
  TORCH_CHECK(!ahead || (prunable && fisher_q >= 0 && em == nullptr),
              "scores ahead need a prunable range, the Fisher score and no saliency EMA");
  TORCH_CHECK(!cand.has_value() || ahead, "candidates are the scores ahead's: pass ahead_hist");
  Candidates cands;
  std::optional<Window> win;
  if (ahead) {
    check_hist(*ahead_hist);
    TORCH_CHECK(0 <= ahead_lo && ahead_lo <= ahead_hi && ahead_hi < HIST_BINS, "bad window for the scores ahead");
    open_candidates(cands, cand, cand_n, std::max(cand_lo, ahead_lo), std::min(cand_hi, ahead_hi), true);
    win.emplace(ahead_hist->data_ptr<int32_t>(), static_cast<uint32_t>(ahead_lo), static_cast<uint32_t>(ahead_hi),
                &cands);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "agip_update", [&] {
    scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    if (!prunable) {
      at::parallel_for(start, end, CHUNK, [&](int64_t lo, int64_t hi) {
        update_range<scalar_t, false, false, -1, false, true, false>(wp, gp, mp, vp, mk, em, lo, hi, args, nullptr,
                                                                     nullptr);
      });
      return;
    }
    with_score(fisher_q, em != nullptr, [&](auto score, auto has_ema) {
      constexpr int SCORE = decltype(score)::value;
      constexpr bool HAS_EMA = decltype(has_ema)::value;
      with_bools([&](auto prune_c, auto vt_c, auto ahead_c) {
        constexpr bool PRUNE = decltype(prune_c)::value, VT = decltype(vt_c)::value, AHEAD = decltype(ahead_c)::value;
        if constexpr (AHEAD && (SCORE < 0 || HAS_EMA)) {
          TORCH_CHECK(false, "unreachable: scores ahead were checked above");
        } else {
          at::parallel_for(start, end, CHUNK, [&](int64_t lo, int64_t hi) {
            std::optional<WindowLocal> local;
            if constexpr (AHEAD) local.emplace();
            update_range<scalar_t, true, PRUNE, SCORE, HAS_EMA, VT, AHEAD>(wp, gp, mp, vp, mk, em, lo, hi, args,
                                                                           win ? &*win : nullptr,
                                                                           local ? &*local : nullptr);
            if constexpr (AHEAD) local->merge_into(*win);
          });
        }
      }, prune_step, vt, ahead);
    });
  });
  if (ahead) close_candidates(cands, cand_n);
}

}  // namespace agip_cpu
