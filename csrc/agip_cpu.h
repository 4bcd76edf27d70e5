// What the C++ CPU backend's passes share (csrc/stats.cpp, refine.cpp, update.cpp; bound to
// Python in agip_cpu.cpp): the tile and histogram constants, the score of one entry, key
// compaction, the per-thread histograms, the candidate-key buffer and the argument checks.
// docs/algorithm.md §1-2; docs/design.md "The way data flows". Every source is compiled with
// the same flags (agip/backends/cpp.py): -O3 -march=native -fopenmp -ffp-contract=off (no
// fused multiply-adds: the saliency and its EMA must round exactly as the reference backend
// does, so masks are identical).
//
// Determinism: G^2 is summed per fixed chunk of CHUNK entries (16 double lanes, then the
// lanes in order, in double), and the chunks in order, so the result does not depend on
// the thread count; histogram counts are integers, merged exactly.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>


#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "agip_math.h"

namespace agip_cpu {

using Tensor = at::Tensor;


constexpr int64_t CHUNK = 1 << 16;
constexpr int64_t HIST_BINS = 1 << 16;
constexpr int64_t TILE = 1024;  // bins are computed for a tile (vectorized), then counted
constexpr int SUBHISTS = 4;     // interleaved copies break store-to-load chains on hot bins
// the key of entries that are not counted: a negative NaN's bits, which no score has
// (scores are |.| or sums of them, never negative)
constexpr uint32_t SKIP_KEY = 0xFFFFFFFFu;
constexpr int LANES = 16;

inline uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

inline float bits_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

using agip::ScoreArgs;
using agip::UpdateArgs;

// The score of entry i (algorithm.md §2.1, §2.1b) from pre-update w, raw g (Taylor) or
// v_t = beta2 v + (1 - beta2) ghat^2 with ghat = g M c (Fisher), then its EMA; every
// product and sum rounded separately, in the reference backend's order.
// STORED: the Fisher score of v as stored (the next step's score of v_(t-1)), which
// v * 1 + 0 * ghat^2 equals exactly for a finite ghat: without reading g.
template <int SCORE, bool HAS_EMA, typename T, bool STORED = false>
inline float saliency(const T* __restrict__ w, const T* __restrict__ g, const T* __restrict__ v,
                      const uint8_t* __restrict__ mk, const float* __restrict__ ema, int64_t i, const ScoreArgs& a) {
  float vt = 0.f;
  if constexpr (SCORE >= 0 && STORED) {
    vt = static_cast<float>(v[i]);
  } else if constexpr (SCORE >= 0) {
    const float ghat = static_cast<float>(g[i]) * static_cast<float>(mk[i]) * a.clip;
    vt = agip::second_moment(static_cast<float>(v[i]), ghat, a.beta2, a.omb2);
  }
  float s = agip::score<SCORE>(static_cast<float>(w[i]), static_cast<float>(g[i]), vt);
  if constexpr (HAS_EMA) s = ema[i] * a.ema_keep + s * a.ema_new;
  return s;
}

// Calls f(std::integral_constant<int, SCORE>, std::bool_constant<HAS_EMA>) for the runtime
// score and EMA, so the hot loops are compiled once per case (and vectorize).
template <typename F>
void with_score(int64_t fisher_q, bool has_ema, F&& f) {
  auto ema_case = [&](auto score) {
    if (has_ema) f(score, std::true_type{});
    else f(score, std::false_type{});
  };
  switch (fisher_q) {
    case -1: return ema_case(std::integral_constant<int, -1>{});
    case 0: return ema_case(std::integral_constant<int, 0>{});
    case 1: return ema_case(std::integral_constant<int, 1>{});
    case 2: return ema_case(std::integral_constant<int, 2>{});
    case 4: return ema_case(std::integral_constant<int, 4>{});
    default: TORCH_CHECK(false, "fisher_q must be -1 (Taylor) or 0, 1, 2, 4 (Fisher power x 4), got ", fisher_q);
  }
}

// The score keys (fp32 bits) of one tile of the prunable segment: saliency of active
// entries (SALIENCY) or |g| of pruned ones. Keys whose first digit (top 16 bits) lies
// outside [lo, hi] are only counted (below / above, no scatter) and get SKIP_KEY, as do
// entries not counted. Branch-free: vectorizes. Returns the number of keys kept.
template <bool SALIENCY, int SCORE, bool HAS_EMA, typename T, bool STORED = false>
int64_t tile_keys(const T* __restrict__ w, const T* __restrict__ g, const T* __restrict__ v,
                  const uint8_t* __restrict__ mk, const float* __restrict__ ema, int64_t t0, int64_t len,
                  const ScoreArgs a, uint32_t lo, uint32_t hi, uint32_t* __restrict__ keys, int64_t& below,
                  int64_t& above) {
  int64_t nb = 0, na = 0, kept = 0;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t i = t0 + j;
    const float s =
        SALIENCY ? saliency<SCORE, HAS_EMA, T, STORED>(w, g, v, mk, ema, i, a) : std::fabs(static_cast<float>(g[i]));
    // bitwise, not short-circuit, logic: branches here would stop the loop vectorizing
    const bool counted = SALIENCY ? mk[i] != 0 : mk[i] == 0;
    const uint32_t k = float_bits(s), b = k >> 16;
    const bool in = counted & (b >= lo) & (b <= hi);
    nb += counted & (b < lo);
    na += counted & (b > hi);
    kept += in;
    keys[j] = in ? k : SKIP_KEY;
  }
  below += nb;
  above += na;
  return kept;
}

#if !defined(__AVX512F__) && defined(__AVX2__)
// AVX2 has no compress: for each 8-bit keep mask, the lanes to gather, kept lanes first in
// order (8 KiB)
constexpr std::array<std::array<int32_t, 8>, 256> compress_lanes() {
  std::array<std::array<int32_t, 8>, 256> t{};
  for (int m = 0; m < 256; ++m) {
    int n = 0;
    for (int l = 0; l < 8; ++l)
      if (m >> l & 1) t[m][n++] = l;  // the lanes after them stay 0 (t{})
  }
  return t;
}
alignas(32) constexpr auto COMPRESS_LANES = compress_lanes();
#endif

// Moves the keys other than SKIP_KEY to the front of out (room for len: a 16-lane store at
// the write index never reaches past the block just read), keeping their order; returns how
// many. With AVX-512, 16 lanes per compress; with AVX2, 8 lanes per permute (the scalar loop,
// whose write index depends on the last key, was the hottest spot of the Fisher pruning
// step's update on an AMD EPYC Zen 3).
// In place (out == keys) is allowed: the write index never passes the read index.
inline int64_t compact_keys(const uint32_t* keys, int64_t len, uint32_t* out) {
  int64_t n = 0, j = 0;
#ifdef __AVX512F__
  const __m512i skip = _mm512_set1_epi32(-1);
  for (; j + 16 <= len; j += 16) {
    const __m512i k = _mm512_loadu_si512(keys + j);
    const __mmask16 keep = _mm512_cmpneq_epi32_mask(k, skip);
    _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi32(keep, k));
    n += __builtin_popcount(keep);
  }
#elif defined(__AVX2__)
  const __m256i skip = _mm256_set1_epi32(-1);
  for (; j + 8 <= len; j += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
    const int keep = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, skip))) & 0xFF;
    const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(COMPRESS_LANES[keep].data()));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + n), _mm256_permutevar8x32_epi32(k, lanes));
    n += __builtin_popcount(keep);
  }
#endif
  for (; j < len; ++j) {
    out[n] = keys[j];
    n += keys[j] != SKIP_KEY;
  }
  return n;
}

// Moves the keys whose first digit (key >> 16) lies in [lo, hi] to the front of out (room
// for n), keeping their order; returns how many. Vectorized as compact_keys (the band of a
// tile's kept keys: a scalar loop whose write index depends on the last key); in [lo, hi]
// as one unsigned compare, (b - lo) <= (hi - lo).
inline int64_t compact_band(const uint32_t* keys, int64_t n, uint32_t lo, uint32_t hi, uint32_t* out) {
  int64_t nb = 0, j = 0;
  if (lo > hi) return 0;  // an empty band (hi - lo would wrap)
#ifdef __AVX512F__
  const __m512i vlo = _mm512_set1_epi32(static_cast<int32_t>(lo));
  const __m512i span = _mm512_set1_epi32(static_cast<int32_t>(hi - lo));
  for (; j + 16 <= n; j += 16) {
    const __m512i k = _mm512_loadu_si512(keys + j);
    const __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(_mm512_srli_epi32(k, 16), vlo), span);
    _mm512_storeu_si512(out + nb, _mm512_maskz_compress_epi32(in, k));
    nb += __builtin_popcount(in);
  }
#elif defined(__AVX2__)
  const __m256i vlo = _mm256_set1_epi32(static_cast<int32_t>(lo));
  const __m256i span = _mm256_set1_epi32(static_cast<int32_t>(hi - lo));
  for (; j + 8 <= n; j += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
    const __m256i d = _mm256_sub_epi32(_mm256_srli_epi32(k, 16), vlo);
    const __m256i in_v = _mm256_cmpeq_epi32(_mm256_min_epu32(d, span), d);  // d <= span, unsigned
    const int in = _mm256_movemask_ps(_mm256_castsi256_ps(in_v));
    const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(COMPRESS_LANES[in].data()));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + nb), _mm256_permutevar8x32_epi32(k, lanes));
    nb += __builtin_popcount(in);
  }
#endif
  for (; j < n; ++j) {
    const uint32_t b = keys[j] >> 16;
    out[nb] = keys[j];
    nb += b >= lo && b <= hi;
  }
  return nb;
}

// Pass B's tile: low-digit bins of the counted values whose top 16 bits equal prefix
// (SKIP_KEY for the others).
template <bool SALIENCY, int SCORE, bool HAS_EMA, typename T>
int64_t tile_low_bins(const T* __restrict__ w, const T* __restrict__ g, const T* __restrict__ v,
                      const uint8_t* __restrict__ mk, const float* __restrict__ ema, int64_t t0, int64_t len,
                      const ScoreArgs a, uint32_t want, uint32_t* __restrict__ bins) {
  int64_t hits = 0;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t i = t0 + j;
    const float s =
        SALIENCY ? saliency<SCORE, HAS_EMA>(w, g, v, mk, ema, i, a) : std::fabs(static_cast<float>(g[i]));
    const uint32_t b = float_bits(s);
    const bool hit = (SALIENCY ? mk[i] != 0 : mk[i] == 0) & ((b >> 16) == want);
    bins[j] = hit ? (b & 0xFFFF) : SKIP_KEY;
    hits += hit;
  }
  return hits;
}

// sum over [lo, hi) of (g * M)^2 (M = 1 unless MASKED), in a fixed order: squares in
// fp32 (as every backend), accumulated in double lanes (fp32 lanes over a 65,536-entry
// chunk drift by ~1e-6; the pass is memory-bound either way)
template <bool MASKED, typename T>
double sumsq(const T* __restrict__ g, const uint8_t* __restrict__ mask, int64_t lo, int64_t hi) {
  double acc[LANES] = {0};
  int64_t i = lo;
#ifdef __AVX512F__
  // fp32 buffers: the same sums, lane for lane (so the same bits), in two 8-lane double
  // registers; GCC's own vectorization of the loop below converts far more slowly (an
  // Intel Xeon: 50 -> 29 ms for 64M entries on one thread)
  if constexpr (std::is_same_v<T, float>) {
    __m512d lo8 = _mm512_setzero_pd(), hi8 = _mm512_setzero_pd();
    for (; i + LANES <= hi; i += LANES) {
      __m512 x = _mm512_loadu_ps(g + i);
      if constexpr (MASKED)
        x = _mm512_mul_ps(x, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(mask + i)))));
      const __m512 sq = _mm512_mul_ps(x, x);
      lo8 = _mm512_add_pd(lo8, _mm512_cvtps_pd(_mm512_castps512_ps256(sq)));
      hi8 = _mm512_add_pd(hi8, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sq), 1))));
    }
    _mm512_storeu_pd(acc, lo8);
    _mm512_storeu_pd(acc + 8, hi8);
  }
#endif
  for (; i + LANES <= hi; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      float x = static_cast<float>(g[i + j]);
      if constexpr (MASKED) x = x * static_cast<float>(mask[i + j]);
      acc[j] += static_cast<double>(x * x);
    }
  }
  double s = 0.0;
  for (int j = 0; j < LANES; ++j) s += acc[j];
  for (; i < hi; ++i) {
    float x = static_cast<float>(g[i]);
    if constexpr (MASKED) x = x * static_cast<float>(mask[i]);
    s += static_cast<double>(x * x);
  }
  return s;
}

// A thread's private histogram: SUBHISTS interleaved copies, HIST_STRIDE apart (one bin of
// padding: copies exactly 256 KiB apart would put a bin's copies in the same cache sets).
constexpr int64_t HIST_STRIDE = HIST_BINS + 1;
struct LocalHist {
  std::vector<int32_t> c;
  void init() { c.assign(SUBHISTS * HIST_STRIDE, 0); }
  bool empty() const { return c.empty(); }
  // counts values[j] >> SHIFT for n values, none of them SKIP_KEY (compact_keys' output):
  // SHIFT 16 counts the first digits of keys, SHIFT 0 low digits
  template <int SHIFT>
  void count(const uint32_t* values, int64_t n) {
    int64_t j = 0;
    for (; j + SUBHISTS <= n; j += SUBHISTS)
      for (int k = 0; k < SUBHISTS; ++k) ++c[k * HIST_STRIDE + (values[j + k] >> SHIFT)];
    for (; j < n; ++j) ++c[values[j] >> SHIFT];
  }
};

inline void merge(std::mutex& mu, const LocalHist& local, int32_t* global) {
  if (local.empty()) return;
  std::lock_guard<std::mutex> lock(mu);
  for (int k = 0; k < SUBHISTS; ++k)
    for (int64_t b = 0; b < HIST_BINS; ++b) global[b] += local.c[k * HIST_STRIDE + b];
}

inline void check_bucket(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

inline const uint8_t* mask_ptr(const Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous(), "mask must be a contiguous bool tensor");
  return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
}

inline void check_hist(const Tensor& h) {
  TORCH_CHECK(h.scalar_type() == at::kInt && h.numel() == HIST_BINS && h.is_contiguous(), "histograms must be int32[65536]");
}

inline ScoreArgs score_args(double clip, double beta2, double omb2, double ema_keep, double ema_new) {
  return ScoreArgs{static_cast<float>(clip), static_cast<float>(beta2), static_cast<float>(omb2),
                   static_cast<float>(ema_keep), static_cast<float>(ema_new)};
}

// UpdateArgs from agip.backends.UpdateArgs.numbers(), rounded to fp32 once.
inline UpdateArgs update_args(const std::vector<double>& x) {
  TORCH_CHECK(x.size() == agip::UPDATE_ARGS, "update takes ", agip::UPDATE_ARGS, " numbers (UpdateArgs), got ",
              x.size());
  float f[agip::UPDATE_ARGS];
  for (int i = 0; i < agip::UPDATE_ARGS; ++i) f[i] = static_cast<float>(x[i]);
  return UpdateArgs{f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11], f[12], f[13], f[14]};
}

// Candidate keys collected by pass A: the in-window keys whose first digit lies in the band
// [lo, hi], written at an atomic offset per tile, in any order (only their histograms are
// used); past the capacity, collection stops and is marked overflowed, and the driver
// refines with pass B instead.
struct Candidates {
  uint32_t* keys = nullptr;
  int64_t capacity = 0;
  uint32_t lo = 0, hi = 0;
  std::atomic<int64_t> size{0};
  std::atomic<bool> overflow{false};
  bool open() const { return keys != nullptr && !overflow.load(std::memory_order_relaxed); }
  // appends band[0, nb) at an atomic offset (one per call: callers batch their keys)
  void put(const uint32_t* band, int64_t nb) {
    if (nb == 0 || !open()) return;
    const int64_t at = size.fetch_add(nb, std::memory_order_relaxed);
    if (at + nb > capacity) overflow.store(true, std::memory_order_relaxed);
    else std::memcpy(keys + at, band, nb * sizeof(uint32_t));
  }
};

// A first-digit histogram over the window [lo, hi] that several threads fill (pass A's; the
// next step's score in the update, docs/design.md "Scores ahead"), with the kept band's keys:
// each thread counts its tiles into a private WindowLocal and merges it once, at its end.
struct Window {
  int32_t* hist;
  uint32_t lo, hi;
  Candidates* cands;
  std::mutex mu;
  Window(int32_t* h, uint32_t l, uint32_t u, Candidates* c) : hist(h), lo(l), hi(u), cands(c) {}
};

struct WindowLocal {
  LocalHist h;
  int64_t below = 0, above = 0;  // counted scores below / above the window
  uint32_t kept[TILE];
  // the band's keys of this thread's tiles, handed to Candidates in batches: one atomic offset
  // a tile cost more than the copy on 2 cores ping-ponging its cache line
  static constexpr int64_t BATCH = 16 * TILE;
  std::vector<uint32_t> band = std::vector<uint32_t>(BATCH + TILE + 16);  // (+16: compact_band stores 16 lanes)
  int64_t nband = 0;
  WindowLocal() { h.init(); }
  // one tile's keys (tile_keys', SKIP_KEY included), nk of them kept
  void add(Window& win, const uint32_t* keys, int64_t len, int64_t nk) {
    if (nk == 0) return;
    add_packed(win, kept, compact_keys(keys, len, kept));
  }
  // n keys of the window, packed (none SKIP_KEY); packed may be kept itself
  void add_packed(Window& win, const uint32_t* packed, int64_t n) {
    if (n == 0) return;
    h.count<16>(packed, n);
    Candidates& c = *win.cands;
    if (!c.open()) return;
    nband += compact_band(packed, n, c.lo, c.hi, band.data() + nband);  // n <= TILE: room left
    if (nband >= BATCH) flush(win);
  }
  void flush(Window& win) {
    win.cands->put(band.data(), nband);
    nband = 0;
  }
  // the bins next to the window take the scores outside it (below > 0 implies lo > 0)
  void merge_into(Window& win) {
    flush(win);
    merge(win.mu, h, win.hist);
    if (below == 0 && above == 0) return;
    std::lock_guard<std::mutex> lock(win.mu);
    if (below) win.hist[win.lo - 1] += static_cast<int32_t>(below);
    if (above) win.hist[win.hi + 1] += static_cast<int32_t>(above);
  }
};

// Candidates from optional (cand, cand_n) tensors: cand_n[0] holds the keys already in cand
// (the update appends, one param group's range after another), -1 once they did not fit.
inline void open_candidates(Candidates& c, const c10::optional<Tensor>& cand, const c10::optional<Tensor>& cand_n,
                     int64_t lo, int64_t hi, bool append) {
  TORCH_CHECK(cand.has_value() == cand_n.has_value(), "cand and cand_n go together");
  if (!cand.has_value()) return;
  TORCH_CHECK(cand->scalar_type() == at::kInt && cand->is_contiguous() && cand->device().is_cpu(),
              "cand must be a contiguous int32 CPU tensor");
  TORCH_CHECK(cand_n->scalar_type() == at::kLong && cand_n->numel() == 1, "cand_n must be int64[1]");
  c.keys = reinterpret_cast<uint32_t*>(cand->data_ptr<int32_t>());
  c.capacity = cand->numel();
  c.lo = static_cast<uint32_t>(lo);
  c.hi = static_cast<uint32_t>(hi);
  const int64_t n0 = append ? cand_n->item<int64_t>() : 0;
  TORCH_CHECK(n0 <= c.capacity, "cand_n exceeds cand's size");
  c.size.store(std::max<int64_t>(n0, 0));
  c.overflow.store(n0 < 0);
}

inline void close_candidates(const Candidates& c, const c10::optional<Tensor>& cand_n) {
  if (cand_n.has_value()) cand_n->fill_(c.overflow.load() ? int64_t{-1} : c.size.load());
}

// The passes, one file each (their comments say what they compute).
Tensor stats(Tensor g, Tensor w, Tensor v, Tensor mask,
                    c10::optional<Tensor> ema, int64_t n_prunable, bool with_saliency, bool regrow,
                    int64_t fisher_q, double clip, double beta2, double omb2, double ema_keep, double ema_new,
                    int64_t sal_lo, int64_t sal_hi, Tensor sal_hist, Tensor grow_hist, bool with_sumsq,
                    c10::optional<Tensor> cand, c10::optional<Tensor> cand_n, int64_t cand_lo,
                    int64_t cand_hi);
void refine(Tensor g, Tensor w, Tensor v, Tensor mask, c10::optional<Tensor> ema,
            int64_t n_prunable, int64_t prefix, bool with_saliency, int64_t fisher_q, double clip, double beta2,
            double omb2, double ema_keep, double ema_new, Tensor hist);
void refine_keys(Tensor cand, int64_t n, int64_t prefix, Tensor hist);
void update(Tensor w, Tensor g, Tensor m, Tensor v, Tensor mask,
            c10::optional<Tensor> ema, int64_t start, int64_t end, std::vector<double> numbers, bool prunable,
            bool prune_step, int64_t fisher_q, c10::optional<Tensor> ahead_hist, int64_t ahead_lo,
            int64_t ahead_hi, c10::optional<Tensor> cand, c10::optional<Tensor> cand_n, int64_t cand_lo,
            int64_t cand_hi);

}  // namespace agip_cpu
