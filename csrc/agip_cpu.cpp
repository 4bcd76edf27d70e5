// AGIP step on the CPU: the three passes of the fused backends (stats, refine, update)
// as vectorizable, multi-threaded loops over one flat bucket. docs/algorithm.md §1-2;
// docs/design.md "The way data flows". Compiled on first use by agip/backends/cpp.py with
// -O3 -march=native -fopenmp -ffp-contract=off (no fused multiply-adds: the saliency
// and its EMA must round exactly as the reference backend does, so masks are identical).
//
// Determinism: G^2 is summed per fixed chunk of CHUNK entries (16 double lanes, then the
// lanes in order, in double), and the chunks in order, so the result does not depend on
// the thread count; histogram counts are integers, merged exactly.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "agip_math.h"

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

namespace {

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

void merge(std::mutex& mu, const LocalHist& local, int32_t* global) {
  if (local.empty()) return;
  std::lock_guard<std::mutex> lock(mu);
  for (int k = 0; k < SUBHISTS; ++k)
    for (int64_t b = 0; b < HIST_BINS; ++b) global[b] += local.c[k * HIST_STRIDE + b];
}

void check_bucket(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

const uint8_t* mask_ptr(const torch::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous(), "mask must be a contiguous bool tensor");
  return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
}

void check_hist(const torch::Tensor& h) {
  TORCH_CHECK(h.scalar_type() == at::kInt && h.numel() == HIST_BINS && h.is_contiguous(), "histograms must be int32[65536]");
}

ScoreArgs score_args(double clip, double beta2, double omb2, double ema_keep, double ema_new) {
  return ScoreArgs{static_cast<float>(clip), static_cast<float>(beta2), static_cast<float>(omb2),
                   static_cast<float>(ema_keep), static_cast<float>(ema_new)};
}

// UpdateArgs from agip.backends.UpdateArgs.numbers(), rounded to fp32 once.
UpdateArgs update_args(const std::vector<double>& x) {
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
void open_candidates(Candidates& c, const c10::optional<torch::Tensor>& cand, const c10::optional<torch::Tensor>& cand_n,
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

void close_candidates(const Candidates& c, const c10::optional<torch::Tensor>& cand_n) {
  if (cand_n.has_value()) cand_n->fill_(c.overflow.load() ? int64_t{-1} : c.size.load());
}

// Pass A. Returns per-chunk partial sums of (g*M)^2 (fp64; zeros without with_sumsq). With
// with_saliency, adds the top-16-bit histogram of the score of active prunable entries to
// sal_hist and, with regrowth, that of |g| of pruned entries to grow_hist. Score bins
// outside the window [sal_lo, sal_hi] are lumped into bins sal_lo - 1 and sal_hi + 1. The
// Fisher score needs the clip factor, so the driver calls this a second time for it, once
// G^2 is known (without with_sumsq). With cand (int32, any size) and cand_n (int64[1]),
// the keys (fp32 bits) of the scores whose first digit lies in [cand_lo, cand_hi] (inside
// the window) are also written to cand, and cand_n[0] gets their number, or -1 if they did
// not fit: a second digit inside that band then needs no pass over the buckets
// (refine_keys; algorithm.md §2.2).
torch::Tensor stats(torch::Tensor g, torch::Tensor w, torch::Tensor v, torch::Tensor mask,
                    c10::optional<torch::Tensor> ema, int64_t n_prunable, bool with_saliency, bool regrow,
                    int64_t fisher_q, double clip, double beta2, double omb2, double ema_keep, double ema_new,
                    int64_t sal_lo, int64_t sal_hi, torch::Tensor sal_hist, torch::Tensor grow_hist, bool with_sumsq,
                    c10::optional<torch::Tensor> cand, c10::optional<torch::Tensor> cand_n, int64_t cand_lo,
                    int64_t cand_hi) {
  TORCH_CHECK(0 <= sal_lo && sal_lo <= sal_hi && sal_hi < HIST_BINS, "bad saliency window");
  check_bucket(g, "g");
  check_bucket(w, "w");
  check_bucket(v, "v");
  TORCH_CHECK(mask.numel() == n_prunable, "mask must have n_prunable entries");
  check_hist(sal_hist);
  check_hist(grow_hist);
  const int64_t n = g.numel();
  const int64_t nchunks = (n + CHUNK - 1) / CHUNK;
  auto partial = torch::zeros({nchunks}, torch::dtype(torch::kFloat64));
  double* part = partial.data_ptr<double>();
  const uint8_t* mk = mask_ptr(mask);
  const float* em = ema.has_value() ? ema->data_ptr<float>() : nullptr;
  int32_t* sh = sal_hist.data_ptr<int32_t>();
  int32_t* gh = grow_hist.data_ptr<int32_t>();
  const ScoreArgs sa = score_args(clip, beta2, omb2, ema_keep, ema_new);
  with_saliency = with_saliency && n_prunable > 0;
  regrow = regrow && n_prunable > 0;
  TORCH_CHECK(!cand.has_value() || with_saliency, "candidates are the saliency's: with_saliency must be set");
  Candidates cands;
  open_candidates(cands, cand, cand_n, std::max(cand_lo, sal_lo), std::min(cand_hi, sal_hi), false);
  Window win{sh, static_cast<uint32_t>(sal_lo), static_cast<uint32_t>(sal_hi), &cands};
  std::mutex mu;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "agip_stats", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    with_score(fisher_q, em != nullptr, [&](auto score, auto has_ema) {
      constexpr int SCORE = decltype(score)::value;
      constexpr bool HAS_EMA = decltype(has_ema)::value;
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        std::optional<WindowLocal> ls;
        LocalHist lg;
        if (with_saliency) ls.emplace();
        if (regrow) lg.init();
        uint32_t keys[TILE], kept[TILE];
        int64_t unused = 0;
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t lo = c * CHUNK, hi = std::min(n, lo + CHUNK), mid = std::clamp(n_prunable, lo, hi);
          if (with_sumsq) part[c] = sumsq<true>(gp, mk, lo, mid) + sumsq<false>(gp, mk, mid, hi);
          if (!with_saliency && !regrow) continue;
          for (int64_t t0 = lo; t0 < mid; t0 += TILE) {
            const int64_t len = std::min(TILE, mid - t0);
            if (with_saliency)
              ls->add(win, keys, len, tile_keys<true, SCORE, HAS_EMA>(wp, gp, vp, mk, em, t0, len, sa, win.lo, win.hi,
                                                                      keys, ls->below, ls->above));
            if (regrow &&
                tile_keys<false, -1, false>(wp, gp, vp, mk, em, t0, len, sa, 0, HIST_BINS - 1, keys, unused, unused))
              lg.count<16>(kept, compact_keys(keys, len, kept));
          }
        }
        if (ls) ls->merge_into(win);
        merge(mu, lg, gh);
      });
    });
  });
  close_candidates(cands, cand_n);
  return partial;
}

// Pass B's loop over [0, n) in tiles: fill(t0, len, bins) writes the low digits of one
// tile's hits (SKIP_KEY for the rest) and returns how many; their counts go to hist.
template <typename Fill>
void count_low_digits(int64_t n, int32_t* hist, Fill&& fill) {
  std::mutex mu;
  at::parallel_for(0, n, CHUNK, [&](int64_t lo, int64_t hi) {
    LocalHist local;
    local.init();
    uint32_t bins[TILE];
    for (int64_t t0 = lo; t0 < hi; t0 += TILE) {
      const int64_t len = std::min(TILE, hi - t0);
      if (fill(t0, len, bins)) local.count<0>(bins, compact_keys(bins, len, bins));  // the hits alone
    }
    merge(mu, local, hist);
  });
}

// Pass B: adds to hist the low-16-bit counts of the values whose top 16 bits equal
// prefix: the score of active entries, or |g| of pruned entries.
void refine(torch::Tensor g, torch::Tensor w, torch::Tensor v, torch::Tensor mask, c10::optional<torch::Tensor> ema,
            int64_t n_prunable, int64_t prefix, bool with_saliency, int64_t fisher_q, double clip, double beta2,
            double omb2, double ema_keep, double ema_new, torch::Tensor hist) {
  check_bucket(g, "g");
  check_bucket(w, "w");
  check_bucket(v, "v");
  check_hist(hist);
  const uint8_t* mk = mask_ptr(mask);
  const float* em = ema.has_value() ? ema->data_ptr<float>() : nullptr;
  int32_t* hp = hist.data_ptr<int32_t>();
  const ScoreArgs sa = score_args(clip, beta2, omb2, ema_keep, ema_new);
  const uint32_t want = static_cast<uint32_t>(prefix);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "agip_refine", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    with_score(with_saliency ? fisher_q : -1, with_saliency && em != nullptr, [&](auto score, auto has_ema) {
      constexpr int SCORE = decltype(score)::value;
      constexpr bool HAS_EMA = decltype(has_ema)::value;
      count_low_digits(n_prunable, hp, [&](int64_t t0, int64_t len, uint32_t* bins) {
        return with_saliency ? tile_low_bins<true, SCORE, HAS_EMA>(wp, gp, vp, mk, em, t0, len, sa, want, bins)
                             : tile_low_bins<false, -1, false>(wp, gp, vp, mk, em, t0, len, sa, want, bins);
      });
    });
  });
}

// Pass B over candidate keys (stats' cand[0, n)): adds to hist the low-16-bit counts of
// the keys whose top 16 bits equal prefix.
void refine_keys(torch::Tensor cand, int64_t n, int64_t prefix, torch::Tensor hist) {
  TORCH_CHECK(cand.scalar_type() == at::kInt && cand.is_contiguous() && cand.device().is_cpu(),
              "cand must be a contiguous int32 CPU tensor");
  TORCH_CHECK(0 <= n && n <= cand.numel(), "n must lie in [0, cand.numel()]");
  check_hist(hist);
  const uint32_t* keys = reinterpret_cast<const uint32_t*>(cand.data_ptr<int32_t>());
  int32_t* hp = hist.data_ptr<int32_t>();
  const uint32_t want = static_cast<uint32_t>(prefix);
  count_low_digits(n, hp, [&](int64_t t0, int64_t len, uint32_t* bins) {
    int64_t hits = 0;
    for (int64_t j = 0; j < len; ++j) {
      const uint32_t k = keys[t0 + j];
      const bool hit = (k >> 16) == want;
      bins[j] = hit ? (k & 0xFFFF) : SKIP_KEY;
      hits += hit;
    }
    return hits;
  });
}

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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define AGIP_ONE_LOOP_AHEAD 1
// v^(Q/4) of 16 lanes, correctly rounded square roots only (agip::fisher_factor); sq = sqrt(v)
template <int Q>
inline __m512 fisher_factor16(__m512 v, __m512 sq) {
  if constexpr (Q <= 0) return _mm512_set1_ps(1.f);
  else if constexpr (Q == 1) return _mm512_sqrt_ps(sq);
  else if constexpr (Q == 2) return sq;
  else return v;
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
void update(torch::Tensor w, torch::Tensor g, torch::Tensor m, torch::Tensor v, torch::Tensor mask,
            c10::optional<torch::Tensor> ema, int64_t start, int64_t end, std::vector<double> numbers, bool prunable,
            bool prune_step, int64_t fisher_q, c10::optional<torch::Tensor> ahead_hist, int64_t ahead_lo,
            int64_t ahead_hi, c10::optional<torch::Tensor> cand, c10::optional<torch::Tensor> cand_n, int64_t cand_lo,
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("stats", &stats, "AGIP pass A: G^2 chunk sums and first-digit histograms");
  mod.def("refine", &refine, "AGIP pass B: second-digit histogram inside one bin");
  mod.def("refine_keys", &refine_keys, "AGIP pass B over the candidate keys pass A collected");
  mod.def("update", &update, "AGIP pass C: clip, AdamW, TA, new mask, w/m/v * M'");
  mod.attr("HIST_BINS") = HIST_BINS;
}
