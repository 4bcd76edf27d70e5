// Pass B of the AGIP step on the CPU (docs/algorithm.md §2.2, pruning steps only): the
// second-digit histogram inside one first-digit bin, over the buckets or the candidate keys.
#include "agip_cpu.h"

namespace agip_cpu {


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
void refine(Tensor g, Tensor w, Tensor v, Tensor mask, c10::optional<Tensor> ema,
            int64_t n_prunable, int64_t prefix, bool with_saliency, int64_t fisher_q, double clip, double beta2,
            double omb2, double ema_keep, double ema_new, Tensor hist) {
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
void refine_keys(Tensor cand, int64_t n, int64_t prefix, Tensor hist) {
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

}  // namespace agip_cpu
